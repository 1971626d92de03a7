// Argument checks shared by the CPU and CUDA implementations of the dpf ops.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace dpf
