// CPU implementations of the dpf ops: ATen glue around the torch-free kernels in kernels.h.
//
// Many tensors are processed in one parallel region: they are cut into chunks of at most
// kChunk elements, the chunks are split into as many contiguous groups ("tasks") as there
// are threads, and each task accumulates into its own histogram or counters, which are
// summed at the end (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../op_checks.h"
#include "kernels.h"

namespace dpf {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < int64_t(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// Tasks for `chunks`: one per thread, and enough that no task counts 2^31 elements (the
// per-task histograms are int32).
int64_t num_tasks(const std::vector<Chunk>& chunks) {
  const int64_t by_size = int64_t(chunks.size()) * kChunk / (int64_t(1) << 31) + 1;
  return std::max<int64_t>(1, std::min<int64_t>(int64_t(chunks.size()),
                                                std::max<int64_t>(at::get_num_threads(), by_size)));
}

// fn(task, chunk) for every chunk; task t handles a contiguous group of chunks.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t tasks, const F& fn) {
  const int64_t n = int64_t(chunks.size());
  at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t)
      for (int64_t c = n * t / tasks; c < n * (t + 1) / tasks; ++c) fn(t, chunks[c]);
  });
}

// fn(T{}) with T the kernel storage type of `dtype`.
template <typename F>
void with_dtype(at::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(Half{});
    case at::kBFloat16:
      return fn(BFloat16{});
    default:
      TORCH_CHECK(false, "dpf: unsupported dtype ", dtype, "; expected float32, float16 or bfloat16");
  }
}

std::vector<at::Tensor> contiguous(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

// Sum per-task int32 histograms into an int64 tensor of `bins`.
at::Tensor sum_histograms(const std::vector<int32_t>& local, int64_t tasks, int64_t bins) {
  at::Tensor out = at::zeros({bins}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, bins, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t b = b0; b < b1; ++b) o[b] += local[t * bins + b];
  });
  return out;
}

// Elements per row of each weight, for the channel floor's row_max tensors (none: zeros).
std::vector<int64_t> row_lengths(const std::vector<at::Tensor>& ws, at::TensorList row_max) {
  std::vector<int64_t> lens(ws.size(), 0);
  for (size_t i = 0; i < row_max.size(); ++i)
    if (ws[i].numel()) lens[i] = ws[i].numel() / row_max[i].numel();
  return lens;
}

// The first pass's window of second-pass histograms (none without `window`).
cpu::Window window_of(const char* op, const std::optional<at::Tensor>& window,
                      const std::optional<at::Tensor>& start) {
  if (!window.has_value()) return {nullptr, 0, 0};
  check_window_args(op, *window, start);
  return {window->data_ptr<int64_t>(), start->item<int64_t>(), uint32_t(window->numel() / kLowBins)};
}

int64_t* row_max_ptr(at::TensorList row_max, int64_t t) {
  return row_max.empty() ? nullptr : row_max[t].data_ptr<int64_t>();
}

// fn(task, chunk, hist) for every chunk of `ps`, hist being the task's int32 histogram when
// `histogram` is given (else null); the task histograms are then added into `histogram`.
template <typename F>
void for_each_chunk_counting(const std::vector<at::Tensor>& ps, const std::optional<at::Tensor>& histogram,
                             const F& fn) {
  const auto chunks = make_chunks(ps);
  const int64_t tasks = num_tasks(chunks);
  const bool with_hist = histogram.has_value();
  std::vector<int32_t> local(with_hist ? tasks * kHighBins : 0, 0);
  for_each_chunk(chunks, tasks, [&](int64_t task, const Chunk& c) {
    fn(task, c, with_hist ? local.data() + task * kHighBins : nullptr);
  });
  if (with_hist) histogram->add_(sum_histograms(local, tasks, kHighBins));
}

at::Tensor magnitude_histogram_cpu(at::TensorList weights, const std::optional<at::Tensor>& prefix,
                                   at::TensorList row_max, const std::optional<at::Tensor>& window,
                                   const std::optional<at::Tensor>& window_start) {
  check_row_max_args(weights, row_max);
  const cpu::Window win = window_of("magnitude_histogram", window, window_start);
  const auto ws = contiguous(weights);
  const auto row_len = row_lengths(ws, row_max);
  const bool low = prefix.has_value();
  const int64_t bins = low ? kLowBins : kHighBins;
  const uint32_t pre = low ? uint32_t(prefix->item<int64_t>()) : 0u;
  const auto chunks = make_chunks(ws);
  const int64_t tasks = num_tasks(chunks);
  std::vector<int32_t> local(tasks * bins, 0);
  for_each_chunk(chunks, tasks, [&](int64_t task, const Chunk& c) {
    int32_t* hist = local.data() + task * bins;
    with_dtype(ws[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* w = static_cast<const T*>(ws[c.tensor].const_data_ptr());
      if (low)
        cpu::histogram_low(w, c.begin, c.end, pre, hist);
      else
        cpu::histogram_high(w, c.begin, c.end, hist, row_max_ptr(row_max, c.tensor),
                            row_len[c.tensor], win);
    });
  });
  return sum_histograms(local, tasks, bins);
}

at::Tensor update_masks_cpu(at::TensorList weights, const at::Tensor& taus, at::TensorList masks,
                            bool shrink_only, at::TensorList row_max) {
  check_update_masks_args(weights, taus, masks);
  check_row_max_args(weights, row_max);
  const int64_t n = int64_t(weights.size());
  const auto ws = contiguous(weights);
  const auto row_len = row_lengths(ws, row_max);
  const auto ms = contiguous(masks);
  const at::Tensor tau_cpu = taus.to(at::kFloat).contiguous();
  std::vector<uint32_t> tau_bits(n);
  for (int64_t i = 0; i < n; ++i) tau_bits[i] = threshold_bits(tau_cpu.const_data_ptr<float>()[i]);

  const auto chunks = make_chunks(ws);
  const int64_t tasks = num_tasks(chunks);
  std::vector<int64_t> local(tasks * n * 2, 0);
  for_each_chunk(chunks, tasks, [&](int64_t task, const Chunk& c) {
    int64_t* counts = local.data() + (task * n + c.tensor) * 2;
    with_dtype(ws[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* w = static_cast<const T*>(ws[c.tensor].const_data_ptr());
      bool* m = ms[c.tensor].data_ptr<bool>();
      cpu::update_mask(w, c.begin, c.end, tau_bits[c.tensor], shrink_only,
                       row_max_ptr(row_max, c.tensor), row_len[c.tensor], m, counts,
                       counts + 1);
    });
  });
  for (int64_t i = 0; i < n; ++i)
    if (!ms[i].is_same(masks[i])) masks[i].copy_(ms[i]);
  at::Tensor stats = at::zeros({n, 2}, at::kLong);
  int64_t* s = stats.data_ptr<int64_t>();
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < 2 * n; ++i) s[i] += local[t * n * 2 + i];
  return stats;
}

at::Tensor nm_masks_cpu(at::TensorList weights, int64_t n, int64_t m, at::TensorList masks) {
  check_nm_args(weights, n, m, masks);
  const int64_t count = int64_t(weights.size());
  const auto ws = contiguous(weights);
  const auto ms = contiguous(masks);
  // chunks of whole groups: kChunk groups each
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t groups = ws[t].numel() / m;
    for (int64_t b = 0; b < groups; b += kChunk) chunks.push_back({t, b, std::min(groups, b + kChunk)});
  }
  const int64_t tasks = num_tasks(chunks);
  std::vector<int64_t> local(tasks * count * 3, 0);
  for_each_chunk(chunks, tasks, [&](int64_t task, const Chunk& c) {
    int64_t* counts = local.data() + (task * count + c.tensor) * 3;
    with_dtype(ws[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      cpu::nm_mask(static_cast<const T*>(ws[c.tensor].const_data_ptr()), c.begin, c.end, int(n), int(m),
                   ms[c.tensor].data_ptr<bool>(), counts, counts + 1, counts + 2);
    });
  });
  for (int64_t i = 0; i < count; ++i)
    if (!ms[i].is_same(masks[i])) masks[i].copy_(ms[i]);
  at::Tensor stats = at::zeros({count, 3}, at::kLong);
  int64_t* s = stats.data_ptr<int64_t>();
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < 3 * count; ++i) s[i] += local[t * count * 3 + i];
  return stats;
}

at::Tensor masked_weight_cpu(const at::Tensor& weight, const at::Tensor& mask, bool /*feedback*/) {
  check_masked_weight_args(weight, mask);
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty_like(w);
  with_dtype(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* wp = static_cast<const T*>(w.const_data_ptr());
    const bool* mp = m.const_data_ptr<bool>();
    T* op = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, w.numel(), kChunk, [&](int64_t b, int64_t e) {
      cpu::masked_weight(wp + b, mp + b, e - b, op + b);
    });
  });
  return out;
}

void feedback_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           const c10::List<bool>& fresh_list, double lr, double momentum, double dampening,
                           bool nesterov, double weight_decay, bool maximize, at::TensorList masks,
                           at::TensorList masked_out, const std::optional<at::Tensor>& histogram,
                           at::TensorList row_max, const std::optional<at::Tensor>& window,
                           const std::optional<at::Tensor>& window_start) {
  const int64_t n = int64_t(params.size());
  const bool use_buf = momentum != 0.0;
  const bool write_masked = !masked_out.empty();
  check_sgd_args(params, grads, momentum_buffers, fresh_list.size(), use_buf, masks, masked_out);
  check_first_pass_args("feedback_sgd_step", params, histogram, row_max, window);
  const cpu::Window win = window_of("feedback_sgd_step", window, window_start);
  std::vector<char> fresh(fresh_list.begin(), fresh_list.end());
  std::vector<at::Tensor> ps, gs, bs, ms, outs;
  for (int64_t i = 0; i < n; ++i) {
    ps.push_back(params[i].contiguous());
    gs.push_back(grads[i].contiguous());
    if (use_buf) bs.push_back(momentum_buffers[i].contiguous());
    if (write_masked) {
      ms.push_back(masks[i].contiguous());
      outs.push_back(masked_out[i].contiguous());
    }
  }
  const SgdParams s{float(lr), float(momentum), float(dampening), float(weight_decay), nesterov, maximize};
  const auto row_len = row_lengths(ps, row_max);
  for_each_chunk_counting(ps, histogram, [&](int64_t, const Chunk& c, int32_t* h) {
    with_dtype(ps[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t t = c.tensor;
      T* p = static_cast<T*>(ps[t].data_ptr());
      const T* g = static_cast<const T*>(gs[t].const_data_ptr());
      T* b = use_buf ? static_cast<T*>(bs[t].data_ptr()) : nullptr;
      const bool* m = write_masked ? ms[t].const_data_ptr<bool>() : nullptr;
      T* o = write_masked ? static_cast<T*>(outs[t].data_ptr()) : nullptr;
      cpu::sgd_step(p, g, b, use_buf && fresh[t], c.begin, c.end, s, m, o, h,
                    row_max_ptr(row_max, t), row_len[t], win);
    });
  });
  for (int64_t i = 0; i < n; ++i) {
    if (!ps[i].is_same(params[i])) params[i].copy_(ps[i]);
    if (use_buf && !bs[i].is_same(momentum_buffers[i])) momentum_buffers[i].copy_(bs[i]);
    if (write_masked && !outs[i].is_same(masked_out[i])) masked_out[i].copy_(outs[i]);
  }
}

void feedback_adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, int64_t step,
                             double lr, double beta1, double beta2, double eps, double weight_decay,
                             bool amsgrad, bool maximize, const std::optional<at::Tensor>& histogram,
                             at::TensorList row_max, const std::optional<at::Tensor>& window,
                             const std::optional<at::Tensor>& window_start) {
  const int64_t n = int64_t(params.size());
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  check_first_pass_args("feedback_adamw_step", params, histogram, row_max, window);
  const cpu::Window win = window_of("feedback_adamw_step", window, window_start);
  const AdamwParams a = adamw_params(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, step);
  std::vector<at::Tensor> ps, gs, ms, vs, vmaxs;
  for (int64_t i = 0; i < n; ++i) {
    ps.push_back(params[i].contiguous());
    gs.push_back(grads[i].contiguous());
    ms.push_back(exp_avgs[i].contiguous());
    vs.push_back(exp_avg_sqs[i].contiguous());
    if (amsgrad) vmaxs.push_back(max_exp_avg_sqs[i].contiguous());
  }
  const auto row_len = row_lengths(ps, row_max);
  for_each_chunk_counting(ps, histogram, [&](int64_t, const Chunk& c, int32_t* h) {
    with_dtype(ps[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t t = c.tensor;
      cpu::adamw_step(static_cast<T*>(ps[t].data_ptr()), static_cast<const T*>(gs[t].const_data_ptr()),
                      static_cast<T*>(ms[t].data_ptr()), static_cast<T*>(vs[t].data_ptr()),
                      amsgrad ? static_cast<T*>(vmaxs[t].data_ptr()) : nullptr, c.begin, c.end, a, h,
                      row_max_ptr(row_max, t), row_len[t], win);
    });
  });
  for (int64_t i = 0; i < n; ++i) {
    if (!ps[i].is_same(params[i])) params[i].copy_(ps[i]);
    if (!ms[i].is_same(exp_avgs[i])) exp_avgs[i].copy_(ms[i]);
    if (!vs[i].is_same(exp_avg_sqs[i])) exp_avg_sqs[i].copy_(vs[i]);
    if (amsgrad && !vmaxs[i].is_same(max_exp_avg_sqs[i])) max_exp_avg_sqs[i].copy_(vmaxs[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dpf, CPU, m) {
  m.impl("magnitude_histogram", &magnitude_histogram_cpu);
  m.impl("update_masks", &update_masks_cpu);
  m.impl("masked_weight", &masked_weight_cpu);
  m.impl("nm_masks", &nm_masks_cpu);
  m.impl("feedback_sgd_step", &feedback_sgd_step_cpu);
  m.impl("feedback_adamw_step", &feedback_adamw_step_cpu);
}

}  // namespace dpf
