// CUDA implementations of the dpf ops: builds the tensor tables on the device and launches
// the torch-free kernels of kernels.cu on the current stream. Nothing here waits for the
// device: tables travel by asynchronous copies from pinned memory, results stay on the GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "../op_checks.h"
#include "kernels.h"

namespace dpf {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat;
    case at::kHalf:
      return cuda::DType::kHalf;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "dpf: unsupported dtype ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dpf::", what, ": ", cudaGetErrorString(err));
}

// Positions of the non-empty tensors, grouped by dtype: one launch per group.
std::map<at::ScalarType, std::vector<int64_t>> by_dtype(at::TensorList tensors) {
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (int64_t i = 0; i < int64_t(tensors.size()); ++i)
    if (tensors[i].numel()) groups[tensors[i].scalar_type()].push_back(i);
  return groups;
}

// int64 columns copied to the device in one asynchronous transfer.
class DeviceArrays {
 public:
  explicit DeviceArrays(std::vector<std::vector<int64_t>> columns, const at::Device& device) {
    std::vector<int64_t> offsets;
    int64_t total = 0;
    for (const auto& c : columns) {
      offsets.push_back(total);
      total += int64_t(c.size());
    }
    at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.data_ptr<int64_t>();
    for (size_t k = 0; k < columns.size(); ++k)
      std::copy(columns[k].begin(), columns[k].end(), h + offsets[k]);
    device_ = host.to(device, /*non_blocking=*/true);
    for (int64_t o : offsets) columns_.push_back(device_.data_ptr<int64_t>() + o);
  }
  const int64_t* operator[](size_t k) const { return columns_[k]; }
  template <typename P>
  P as(size_t k) const {
    return reinterpret_cast<P>(const_cast<int64_t*>(columns_[k]));
  }

 private:
  at::Tensor device_;
  std::vector<const int64_t*> columns_;
};

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

// The table of `tensors` (contiguous, non-empty) with `extra` pointer columns appended.
struct Launch {
  std::vector<at::Tensor> keep_alive;
  std::optional<DeviceArrays> arrays;
  cuda::Table table{};
};

// `unit`: the table counts units of that many elements (N:M groups), not elements.
Launch make_launch(const std::vector<at::Tensor>& tensors,
                   const std::vector<std::vector<int64_t>>& extra_columns, int64_t unit = 1) {
  Launch l;
  std::vector<int64_t> ptrs, numels, starts{0};
  for (const auto& t : tensors) {
    const int64_t units = t.numel() / unit;
    ptrs.push_back(address(t));
    numels.push_back(units);
    starts.push_back(starts.back() + (units + cuda::kChunk - 1) / cuda::kChunk);
  }
  std::vector<std::vector<int64_t>> columns{ptrs, numels, starts};
  columns.insert(columns.end(), extra_columns.begin(), extra_columns.end());
  l.arrays.emplace(columns, tensors.front().device());
  l.table = {l.arrays->as<const void* const*>(0), (*l.arrays)[1], (*l.arrays)[2],
             int(tensors.size()), starts.back()};
  return l;
}

std::vector<at::Tensor> contiguous(at::TensorList tensors, const std::vector<int64_t>& idx) {
  std::vector<at::Tensor> out;
  for (int64_t i : idx) out.push_back(tensors[i].contiguous());
  return out;
}

// The channel floor's columns for the tensors at `idx`: row_max pointers and row lengths
// (both empty without row maxima).
std::vector<std::vector<int64_t>> row_columns(const std::vector<at::Tensor>& ws, at::TensorList row_max,
                                              const std::vector<int64_t>& idx) {
  std::vector<int64_t> ptrs, lengths;
  if (!row_max.empty()) {
    for (size_t j = 0; j < idx.size(); ++j) {
      ptrs.push_back(address(row_max[idx[j]]));
      lengths.push_back(ws[j].numel() / row_max[idx[j]].numel());
    }
  }
  return {ptrs, lengths};
}

// The Rows view of the two row columns appended at `first` (none without row maxima).
cuda::Rows rows_at(const Launch& l, size_t first, bool with_rows) {
  if (!with_rows) return {nullptr, nullptr};
  return {l.arrays->as<long long* const*>(first), (*l.arrays)[first + 1]};
}

// The current device's SM count and shared-memory opt-in limit, queried once per device.
const cuda::DeviceInfo& device_info() {
  static std::mutex lock;
  static std::map<int, cuda::DeviceInfo> known;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const std::lock_guard<std::mutex> guard(lock);
  auto it = known.find(device);
  if (it == known.end()) {
    cuda::DeviceInfo info{};
    check_cuda(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&info.max_shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    it = known.emplace(device, info).first;
  }
  return it->second;
}

// The first pass's window on the device (none without `window`); `start` keeps the device
// copy of its first bin alive.
cuda::Window window_of(const char* op, const std::optional<at::Tensor>& window,
                       const std::optional<at::Tensor>& window_start, const at::Device& device,
                       at::Tensor& start) {
  if (!window.has_value()) return {nullptr, nullptr, 0};
  check_window_args(op, *window, window_start);
  TORCH_CHECK(window->device() == device, "dpf::", op, ": the window is on ", window->device(),
              ", the weights on ", device);
  start = window_start->to(device, at::kLong).contiguous();
  return {reinterpret_cast<unsigned long long*>(window->data_ptr<int64_t>()), start.const_data_ptr<int64_t>(),
          int(window->numel() / kLowBins)};
}

at::Tensor magnitude_histogram_cuda(at::TensorList weights, const std::optional<at::Tensor>& prefix,
                                    at::TensorList row_max, const std::optional<at::Tensor>& window,
                                    const std::optional<at::Tensor>& window_start) {
  check_row_max_args(weights, row_max);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const bool low = prefix.has_value();
  at::Tensor hist = at::zeros({low ? kLowBins : kHighBins}, weights[0].options().dtype(at::kLong));
  at::Tensor pre = low ? prefix->to(weights[0].device(), at::kLong).contiguous() : at::Tensor();
  at::Tensor start;
  const cuda::Window win = window_of("magnitude_histogram", window, window_start, weights[0].device(), start);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, idx] : by_dtype(weights)) {
    const auto ws = contiguous(weights, idx);
    const Launch l = make_launch(ws, row_columns(ws, row_max, idx));
    check_cuda(cuda::magnitude_histogram(l.table, dtype_of(ws[0]), low ? pre.const_data_ptr<int64_t>() : nullptr,
                                         reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                                         rows_at(l, 3, !row_max.empty()), device_info(), stream, win),
               "magnitude_histogram");
  }
  return hist;
}

at::Tensor update_masks_cuda(at::TensorList weights, const at::Tensor& taus, at::TensorList masks,
                             bool shrink_only, at::TensorList row_max) {
  check_update_masks_args(weights, taus, masks);
  check_row_max_args(weights, row_max);
  const int64_t n = int64_t(weights.size());
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::Tensor stats = at::zeros({n, 2}, weights[0].options().dtype(at::kLong));
  const at::Tensor tau = taus.to(weights[0].device(), at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, idx] : by_dtype(weights)) {
    const auto ws = contiguous(weights, idx);
    const auto ms = contiguous(masks, idx);
    std::vector<int64_t> mask_ptrs;
    for (const auto& m : ms) mask_ptrs.push_back(address(m));
    auto columns = row_columns(ws, row_max, idx);
    columns.insert(columns.begin(), {mask_ptrs, idx});
    const Launch l = make_launch(ws, columns);
    check_cuda(cuda::update_masks(l.table, dtype_of(ws[0]), l.arrays->as<bool* const*>(3),
                                  tau.const_data_ptr<float>(), (*l.arrays)[4], shrink_only,
                                  rows_at(l, 5, !row_max.empty()),
                                  reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>()),
                                  stream),
               "update_masks");
    for (size_t j = 0; j < idx.size(); ++j)
      if (!ms[j].is_same(masks[idx[j]])) masks[idx[j]].copy_(ms[j]);
  }
  return stats;
}

at::Tensor nm_masks_cuda(at::TensorList weights, int64_t n, int64_t m, at::TensorList masks) {
  check_nm_args(weights, n, m, masks);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::Tensor stats = at::zeros({int64_t(weights.size()), 3}, weights[0].options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, idx] : by_dtype(weights)) {
    const auto ws = contiguous(weights, idx);
    const auto ms = contiguous(masks, idx);
    std::vector<int64_t> mask_ptrs;
    for (const auto& mk : ms) mask_ptrs.push_back(address(mk));
    const Launch l = make_launch(ws, {mask_ptrs, idx}, m);
    check_cuda(cuda::nm_masks(l.table, dtype_of(ws[0]), l.arrays->as<bool* const*>(3), (*l.arrays)[4], int(n),
                              int(m), reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>()), stream),
               "nm_masks");
    for (size_t j = 0; j < idx.size(); ++j)
      if (!ms[j].is_same(masks[idx[j]])) masks[idx[j]].copy_(ms[j]);
  }
  return stats;
}

at::Tensor masked_weight_cuda(const at::Tensor& weight, const at::Tensor& mask, bool /*feedback*/) {
  check_masked_weight_args(weight, mask);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty_like(w);
  check_cuda(cuda::masked_weight(w.const_data_ptr(), m.const_data_ptr<bool>(), out.data_ptr(), w.numel(),
                                 dtype_of(w), c10::cuda::getCurrentCUDAStream()),
             "masked_weight");
  return out;
}

void check_sparse_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ptr,
                       const at::Tensor& idx, const char* op) {
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous(),
                op, ": the activations must be contiguous 2-D float32 CUDA tensors");
  TORCH_CHECK(ptr.is_cuda() && ptr.scalar_type() == at::kLong && ptr.dim() == 1 && ptr.numel() >= 1 &&
                  ptr.is_contiguous() && idx.is_cuda() && idx.scalar_type() == at::kInt &&
                  idx.dim() == 1 && idx.is_contiguous(),
              op, ": ptr must be contiguous int64 and idx contiguous int32, on the GPU");
}

at::Tensor sparse_mm_cuda(const at::Tensor& xt, const at::Tensor& values, const at::Tensor& ptr,
                          const at::Tensor& idx, const std::optional<at::Tensor>& bias) {
  check_sparse_args(xt, xt, ptr, idx, "dpf::sparse_mm");
  TORCH_CHECK(values.is_cuda() && values.scalar_type() == at::kFloat && values.is_contiguous() &&
                  values.numel() == idx.numel(),
              "dpf::sparse_mm: one contiguous float32 value per index entry");
  const int64_t rows = ptr.numel() - 1, B = xt.size(1);
  if (bias) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == rows,
                "dpf::sparse_mm: bias must be a contiguous float32 tensor of one entry per row");
  }
  const c10::cuda::CUDAGuard guard(xt.device());
  at::Tensor y = at::empty({B, rows}, xt.options());
  check_cuda(cuda::sparse_mm(ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(),
                             values.const_data_ptr<float>(), xt.const_data_ptr<float>(), B,
                             bias ? bias->const_data_ptr<float>() : nullptr, y.data_ptr<float>(), rows,
                             c10::cuda::getCurrentCUDAStream()),
             "sparse_mm");
  return y;
}

at::Tensor sampled_mm_cuda(const at::Tensor& dyt, const at::Tensor& xt, const at::Tensor& ptr,
                           const at::Tensor& idx) {
  check_sparse_args(dyt, xt, ptr, idx, "dpf::sampled_mm");
  const int64_t rows = ptr.numel() - 1, cols = xt.size(0), B = xt.size(1);
  TORCH_CHECK(dyt.size(0) == rows && dyt.size(1) == B, "dpf::sampled_mm: dyt must be (rows, B)");
  const c10::cuda::CUDAGuard guard(xt.device());
  at::Tensor g = at::empty({rows, cols}, xt.options());
  check_cuda(cuda::sampled_mm(ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(),
                              dyt.const_data_ptr<float>(), xt.const_data_ptr<float>(), B, rows, cols,
                              g.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "sampled_mm");
  return g;
}

at::Tensor sampled_values_cuda(const at::Tensor& dyt, const at::Tensor& xt, const at::Tensor& ptr,
                               const at::Tensor& idx) {
  check_sparse_args(dyt, xt, ptr, idx, "dpf::sampled_values");
  const int64_t rows = ptr.numel() - 1, B = xt.size(1);
  TORCH_CHECK(dyt.size(0) == rows && dyt.size(1) == B, "dpf::sampled_values: dyt must be (rows, B)");
  const c10::cuda::CUDAGuard guard(xt.device());
  at::Tensor values = at::empty({idx.numel()}, xt.options());
  check_cuda(cuda::sampled_values(ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(),
                                  dyt.const_data_ptr<float>(), xt.const_data_ptr<float>(), B, rows,
                                  idx.numel(), values.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "sampled_values");
  return values;
}

void check_conv_args(const at::Tensor& a, const at::Tensor& ptr, const at::Tensor& idx,
                     int64_t kh, int64_t kw, const char* op) {
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kFloat && a.dim() == 4 && a.is_contiguous(),
              op, ": the activations must be contiguous 4-D float32 CUDA tensors");
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh % 2 == 1 && kw % 2 == 1, op,
              ": the kernel sizes must be odd (\"same\" padding)");
  TORCH_CHECK(ptr.is_cuda() && ptr.scalar_type() == at::kLong && ptr.dim() == 1 && ptr.numel() >= 1 &&
                  ptr.is_contiguous() && idx.is_cuda() && idx.scalar_type() == at::kInt &&
                  idx.dim() == 1 && idx.is_contiguous(),
              op, ": ptr must be contiguous int64 and idx contiguous int32, on the GPU");
}

at::Tensor sparse_conv_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& ptr,
                            const at::Tensor& idx, int64_t kh, int64_t kw,
                            const std::optional<at::Tensor>& bias) {
  check_conv_args(x, ptr, idx, kh, kw, "dpf::sparse_conv");
  TORCH_CHECK(values.is_cuda() && values.scalar_type() == at::kFloat && values.is_contiguous() &&
                  values.numel() == idx.numel(),
              "dpf::sparse_conv: one contiguous float32 value per index entry");
  const int64_t rows = ptr.numel() - 1;
  if (bias) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == rows,
                "dpf::sparse_conv: bias must be a contiguous float32 tensor of one entry per row");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), rows, x.size(2), x.size(3)}, x.options());
  check_cuda(cuda::sparse_conv(ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(),
                               values.const_data_ptr<float>(), x.const_data_ptr<float>(), x.size(0),
                               x.size(1), x.size(2), x.size(3), kh, kw,
                               bias ? bias->const_data_ptr<float>() : nullptr, y.data_ptr<float>(),
                               rows, c10::cuda::getCurrentCUDAStream()),
             "sparse_conv");
  return y;
}

at::Tensor sampled_conv_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& ptr,
                             const at::Tensor& idx, int64_t kh, int64_t kw) {
  check_conv_args(x, ptr, idx, kh, kw, "dpf::sampled_conv");
  check_conv_args(dy, ptr, idx, kh, kw, "dpf::sampled_conv");
  const int64_t rows = ptr.numel() - 1;
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) == rows && dy.size(2) == x.size(2) &&
                  dy.size(3) == x.size(3),
              "dpf::sampled_conv: dy must be (N, rows, H, W) of x's N, H and W");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g = at::empty({rows, x.size(1) * kh * kw}, x.options());
  check_cuda(cuda::sampled_conv(ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(),
                                dy.const_data_ptr<float>(), x.const_data_ptr<float>(), x.size(0),
                                x.size(1), x.size(2), x.size(3), kh, kw, rows, g.data_ptr<float>(),
                                c10::cuda::getCurrentCUDAStream()),
             "sampled_conv");
  return g;
}

void feedback_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            const c10::List<bool>& fresh, double lr, double momentum, double dampening,
                            bool nesterov, double weight_decay, bool maximize, at::TensorList masks,
                            at::TensorList masked_out, const std::optional<at::Tensor>& histogram,
                            at::TensorList row_max, const std::optional<at::Tensor>& window,
                            const std::optional<at::Tensor>& window_start) {
  if (params.empty()) return;
  const bool use_buf = momentum != 0.0;
  const bool write_masked = !masked_out.empty();
  check_sgd_args(params, grads, momentum_buffers, fresh.size(), use_buf, masks, masked_out);
  check_first_pass_args("feedback_sgd_step", params, histogram, row_max, window);
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor start;
  const cuda::Window win = window_of("feedback_sgd_step", window, window_start, params[0].device(), start);
  const SgdParams hp{float(lr), float(momentum), float(dampening), float(weight_decay), nesterov, maximize};
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, idx] : by_dtype(params)) {
    const auto ps = contiguous(params, idx);
    const auto gs = contiguous(grads, idx);
    std::vector<at::Tensor> bs, ms, outs;
    std::vector<int64_t> grad_ptrs, buf_ptrs, fresh_flags, mask_ptrs, out_ptrs;
    for (size_t j = 0; j < idx.size(); ++j) {
      const int64_t i = idx[j];
      grad_ptrs.push_back(address(gs[j]));
      if (use_buf) {
        bs.push_back(momentum_buffers[i].contiguous());
        buf_ptrs.push_back(address(bs.back()));
        fresh_flags.push_back(fresh.get(i) ? 1 : 0);
      }
      if (write_masked) {
        ms.push_back(masks[i].contiguous());
        outs.push_back(masked_out[i].contiguous());
        mask_ptrs.push_back(address(ms.back()));
        out_ptrs.push_back(address(outs.back()));
      }
    }
    auto columns = row_columns(ps, row_max, idx);
    columns.insert(columns.begin(), {grad_ptrs, buf_ptrs, fresh_flags, mask_ptrs, out_ptrs});
    const Launch l = make_launch(ps, columns);
    check_cuda(
        cuda::sgd_step(l.table, dtype_of(ps[0]), l.arrays->as<const void* const*>(3),
                       use_buf ? l.arrays->as<void* const*>(4) : nullptr,
                       use_buf ? (*l.arrays)[5] : nullptr,
                       write_masked ? l.arrays->as<const bool* const*>(6) : nullptr,
                       write_masked ? l.arrays->as<void* const*>(7) : nullptr, hp,
                       histogram ? reinterpret_cast<unsigned long long*>(histogram->data_ptr<int64_t>()) : nullptr,
                       rows_at(l, 8, !row_max.empty()), device_info(), stream, win),
        "feedback_sgd_step");
    for (size_t j = 0; j < idx.size(); ++j) {
      const int64_t i = idx[j];
      if (!ps[j].is_same(params[i])) params[i].copy_(ps[j]);
      if (use_buf && !bs[j].is_same(momentum_buffers[i])) momentum_buffers[i].copy_(bs[j]);
      if (write_masked && !outs[j].is_same(masked_out[i])) masked_out[i].copy_(outs[j]);
    }
  }
}

void feedback_adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, int64_t step,
                              double lr, double beta1, double beta2, double eps, double weight_decay,
                              bool amsgrad, bool maximize, const std::optional<at::Tensor>& histogram,
                              at::TensorList row_max, const std::optional<at::Tensor>& window,
                              const std::optional<at::Tensor>& window_start) {
  if (params.empty()) return;
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  check_first_pass_args("feedback_adamw_step", params, histogram, row_max, window);
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor start;
  const cuda::Window win = window_of("feedback_adamw_step", window, window_start, params[0].device(), start);
  const AdamwParams hp = adamw_params(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, step);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, idx] : by_dtype(params)) {
    const auto ps = contiguous(params, idx);
    const auto gs = contiguous(grads, idx);
    const auto ms = contiguous(exp_avgs, idx);
    const auto vs = contiguous(exp_avg_sqs, idx);
    const auto vmaxs = amsgrad ? contiguous(max_exp_avg_sqs, idx) : std::vector<at::Tensor>{};
    std::vector<int64_t> grad_ptrs, m_ptrs, v_ptrs, vmax_ptrs;
    for (size_t j = 0; j < idx.size(); ++j) {
      grad_ptrs.push_back(address(gs[j]));
      m_ptrs.push_back(address(ms[j]));
      v_ptrs.push_back(address(vs[j]));
      if (amsgrad) vmax_ptrs.push_back(address(vmaxs[j]));
    }
    auto columns = row_columns(ps, row_max, idx);
    columns.insert(columns.begin(), {grad_ptrs, m_ptrs, v_ptrs, vmax_ptrs});
    const Launch l = make_launch(ps, columns);
    check_cuda(
        cuda::adamw_step(l.table, dtype_of(ps[0]), l.arrays->as<const void* const*>(3),
                         l.arrays->as<void* const*>(4), l.arrays->as<void* const*>(5),
                         amsgrad ? l.arrays->as<void* const*>(6) : nullptr, hp,
                         histogram ? reinterpret_cast<unsigned long long*>(histogram->data_ptr<int64_t>()) : nullptr,
                         rows_at(l, 7, !row_max.empty()), device_info(), stream, win),
        "feedback_adamw_step");
    for (size_t j = 0; j < idx.size(); ++j) {
      const int64_t i = idx[j];
      if (!ps[j].is_same(params[i])) params[i].copy_(ps[j]);
      if (!ms[j].is_same(exp_avgs[i])) exp_avgs[i].copy_(ms[j]);
      if (!vs[j].is_same(exp_avg_sqs[i])) exp_avg_sqs[i].copy_(vs[j]);
      if (amsgrad && !vmaxs[j].is_same(max_exp_avg_sqs[i])) max_exp_avg_sqs[i].copy_(vmaxs[j]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dpf, CUDA, m) {
  m.impl("magnitude_histogram", &magnitude_histogram_cuda);
  m.impl("update_masks", &update_masks_cuda);
  m.impl("masked_weight", &masked_weight_cuda);
  m.impl("sparse_mm", &sparse_mm_cuda);
  m.impl("sampled_mm", &sampled_mm_cuda);
  m.impl("sampled_values", &sampled_values_cuda);
  m.impl("sparse_conv", &sparse_conv_cuda);
  m.impl("sampled_conv", &sampled_conv_cuda);
  m.impl("nm_masks", &nm_masks_cuda);
  m.impl("feedback_sgd_step", &feedback_sgd_step_cuda);
  m.impl("feedback_adamw_step", &feedback_adamw_step_cuda);
}

}  // namespace dpf
