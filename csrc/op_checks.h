// Argument checks shared by the CPU and CUDA implementations of the dpf ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "dpf_math.h"

namespace dpf {

inline void check_update_masks_args(at::TensorList weights, const at::Tensor& taus,
                                    at::TensorList masks) {
  TORCH_CHECK(masks.size() == weights.size() && taus.numel() == int64_t(weights.size()),
              "dpf::update_masks: need one mask and one threshold per weight");
  for (const auto& m : masks)
    TORCH_CHECK(m.scalar_type() == at::kBool, "dpf::update_masks: masks must be bool");
}

// The channel floor's row maxima: none, or one contiguous int64 tensor per weight with one
// entry per row (rows are equal slices of the flattened weight).
inline void check_row_max_args(at::TensorList weights, at::TensorList row_max) {
  if (row_max.empty()) return;
  TORCH_CHECK(row_max.size() == weights.size(), "dpf: need one row_max tensor per weight");
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& r = row_max[i];
    const int64_t rows = r.numel(), n = weights[i].numel();
    TORCH_CHECK(r.scalar_type() == at::kLong && r.is_contiguous() && r.device() == weights[i].device() &&
                    (n == 0 || (rows > 0 && n % rows == 0)),
                "dpf: row_max ", i, " must be a contiguous int64 tensor with one entry per row of its weight");
  }
}

inline void check_nm_args(at::TensorList weights, int64_t n, int64_t m, at::TensorList masks) {
  TORCH_CHECK(0 < n && n < m && m <= kMaxGroup, "dpf::nm_masks: need 0 < n < m <= ", kMaxGroup);
  TORCH_CHECK(masks.size() == weights.size(), "dpf::nm_masks: need one mask per weight");
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool && masks[i].sizes() == weights[i].sizes(),
                "dpf::nm_masks: mask ", i, " must be a bool tensor of its weight's shape");
    TORCH_CHECK(weights[i].numel() % m == 0, "dpf::nm_masks: weight ", i, " has ", weights[i].numel(),
                " elements, not a multiple of m = ", m);
  }
}

// The first pass's window: a contiguous int64 tensor of whole low histograms and its first
// high bin.
inline void check_window_args(const char* op, const at::Tensor& window, const std::optional<at::Tensor>& start) {
  TORCH_CHECK(window.scalar_type() == at::kLong && window.is_contiguous() && window.numel() > 0 &&
                  window.numel() % kLowBins == 0,
              "dpf::", op, ": window must be a contiguous int64 tensor of whole low histograms");
  TORCH_CHECK(start.has_value() && start->numel() == 1, "dpf::", op, ": window needs its window_start");
}

// What a fused step counts of the threshold's first pass: row_max and a window only with
// the histogram.
inline void check_first_pass_args(const char* op, at::TensorList params, const std::optional<at::Tensor>& histogram,
                                  at::TensorList row_max, const std::optional<at::Tensor>& window) {
  check_row_max_args(params, row_max);
  TORCH_CHECK((row_max.empty() && !window.has_value()) || histogram.has_value(), "dpf::", op,
              ": row_max and window are counted with the histogram");
}

inline void check_masked_weight_args(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == weight.sizes(),
              "dpf::masked_weight: mask must be a bool tensor of the weight's shape");
}

inline void check_sgd_args(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers, size_t fresh, bool use_buf,
                           at::TensorList masks, at::TensorList masked_out) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "dpf::feedback_sgd_step: one grad per param");
  TORCH_CHECK(!use_buf || (momentum_buffers.size() == n && fresh == n),
              "dpf::feedback_sgd_step: one momentum buffer and fresh flag per param");
  TORCH_CHECK(masked_out.empty() || (masks.size() == n && masked_out.size() == n),
              "dpf::feedback_sgd_step: one mask and one output per param");
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type() && grads[i].sizes() == params[i].sizes(),
                "dpf::feedback_sgd_step: grad ", i, " must match its param's dtype and shape");
}

inline void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "dpf::feedback_adamw_step: one grad, exp_avg and exp_avg_sq per param");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n,
              "dpf::feedback_adamw_step: amsgrad needs one max_exp_avg_sq per param");
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    for (const auto* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == p.scalar_type() && t->sizes() == p.sizes(),
                  "dpf::feedback_adamw_step: grad and state ", i, " must match their param's dtype and shape");
  }
}

// The coefficients of one AdamW step at optimizer step `step` (see dpf_math.h).
inline AdamwParams adamw_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                                bool amsgrad, bool maximize, int64_t step) {
  return {float(1.0 - lr * weight_decay), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
          float(lr / (1.0 - std::pow(beta1, double(step)))),
          float(std::sqrt(1.0 - std::pow(beta2, double(step)))), amsgrad, maximize};
}

}  // namespace dpf
