// CPU implementations of the sparse-product ops: ATen glue around sparse_kernels.h. Each op
// is one parallel region in which the threads take chunks of rows from a shared counter
// (dynamic scheduling, no barrier per row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "sparse_kernels.h"

namespace dpf {
namespace {

const sparse::Kernels* active = sparse::kernels();

// fn(begin, end) over [0, rows) in chunks of `chunk` rows handed out dynamically.
template <typename F>
void for_row_chunks(int64_t rows, int64_t chunk, const F& fn) {
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1) {
    if (rows > 0) fn(int64_t(0), rows);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      fn(c * chunk, std::min(rows, (c + 1) * chunk));
  });
}

int64_t chunk_rows(int64_t rows) {
  const int64_t per = rows / (int64_t(at::get_num_threads()) * 8);
  const int64_t tiles = std::max<int64_t>(1, per / sparse::kTileRows);
  return tiles * sparse::kTileRows;
}

void check_index(const at::Tensor& ptr, const at::Tensor& idx, int64_t cols, const char* op) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.dim() == 1 && ptr.numel() >= 1 &&
                  ptr.is_contiguous() && ptr.device().is_cpu(),
              op, ": ptr must be a contiguous 1-D int64 CPU tensor of rows + 1 offsets");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous() &&
                  idx.device().is_cpu(),
              op, ": idx must be a contiguous 1-D int32 CPU tensor");
  TORCH_CHECK(cols <= INT32_MAX, op, ": more than 2^31 columns");
}

void check_float(const at::Tensor& t, int64_t dim, const char* what, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous() &&
                  t.device().is_cpu(),
              op, ": ", what, " must be a contiguous ", dim, "-D float32 CPU tensor");
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t rows, const char* op) {
  if (!bias) return;
  check_float(*bias, 1, "bias", op);
  TORCH_CHECK(bias->numel() == rows, op, ": bias must have one entry per row");
}

// y (B, rows) = the CSR matrix (ptr, idx, values) times xt (cols, B), plus bias.
at::Tensor sparse_mm_cpu(const at::Tensor& xt, const at::Tensor& values, const at::Tensor& ptr,
                         const at::Tensor& idx, const std::optional<at::Tensor>& bias) {
  const char* op = "dpf::sparse_mm";
  check_float(xt, 2, "xt", op);
  check_float(values, 1, "values", op);
  check_index(ptr, idx, xt.size(0), op);
  TORCH_CHECK(values.numel() == idx.numel(), op, ": one value per index entry");
  const int64_t rows = ptr.numel() - 1, B = xt.size(1);
  check_bias(bias, rows, op);
  at::Tensor y = at::empty({B, rows}, xt.options());
  if (B == 0 || rows == 0) return y;
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int32_t* i = idx.data_ptr<int32_t>();
  const float* v = values.data_ptr<float>();
  const float* x = xt.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  // One parallel region: the work items are (panel, chunk of rows), panel by panel; each
  // thread packs a panel into its own buffer when its next item is of another one (a panel
  // costs cols x P floats to pack, its rows' products nnz x P multiply-adds).
  const int64_t cols = xt.size(0), vb = sparse::panel_vectors(active, cols, B),
                P = vb * active->lanes, panels = (B + P - 1) / P;
  const int64_t chunk = chunk_rows(rows), chunks = (rows + chunk - 1) / chunk;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), panels * chunks));
  const sparse::Kernels* k = active;
  const bool packed = P != B;  // a batch of exactly one panel is its own panel
  at::Tensor buffers = at::empty({packed ? threads : 0, std::max<int64_t>(cols * P, 1)}, xt.options());
  std::atomic<int64_t> next{0}, slot{0};
  auto work = [&](int64_t, int64_t) {
    float* buffer = packed ? buffers.data_ptr<float>() + slot.fetch_add(1) * buffers.size(1) : nullptr;
    const float* panel = packed ? buffer : x;
    int64_t held = packed ? -1 : 0;
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < panels * chunks;) {
      const int64_t n = item / chunks, b0 = n * P, w = std::min(P, B - b0);
      if (n != held) {
        k->pack_panel(x, B, b0, w, P, buffer, 0, cols);
        held = n;
      }
      const int64_t r0 = (item % chunks) * chunk;
      k->spmm_panel(p, i, v, panel, vb, b, out, rows, b0, w, r0, std::min(rows, r0 + chunk));
    }
  };
  if (threads == 1) {
    work(0, 1);
  } else {
    at::parallel_for(0, threads, 1, work);
  }
  return y;
}

// The sampled product dyt (rows, B) times xt (cols, B) transposed at the kept positions,
// written either into the dense g (rows, cols; 0 elsewhere) or, with g null, into `values`
// (one float per kept weight, in the index's order).
void sampled_rows(const at::Tensor& dyt, const at::Tensor& xt, const at::Tensor& ptr,
                  const at::Tensor& idx, float* g, float* values) {
  const int64_t rows = ptr.numel() - 1, cols = xt.size(0), B = xt.size(1);
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int32_t* i = idx.data_ptr<int32_t>();
  const float* dy = dyt.data_ptr<float>();
  const float* x = xt.data_ptr<float>();
  const auto sddmm = active->sddmm_rows;
  const int64_t chunk = std::max<int64_t>(1, rows / (int64_t(at::get_num_threads()) * 8));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  std::atomic<int64_t> next{0}, slot{0};
  at::Tensor scratch;
  if (values == nullptr) {  // the scratch: the most kept weights of any chunk
    int64_t most = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) most = std::max(most, p[std::min(rows, r0 + chunk)] - p[r0]);
    scratch = at::empty({threads, std::max<int64_t>(most, 1)}, xt.options());
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    float* acc = values == nullptr ? scratch.data_ptr<float>() + slot.fetch_add(1) * scratch.size(1) : nullptr;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t r0 = c * chunk, r1 = std::min(rows, r0 + chunk);
      sddmm(p, i, dy, x, B, cols, g, values == nullptr ? acc : values + p[r0], r0, r1);
    }
  });
}

void check_sampled_args(const at::Tensor& dyt, const at::Tensor& xt, const at::Tensor& ptr,
                        const at::Tensor& idx, const char* op) {
  check_float(dyt, 2, "dyt", op);
  check_float(xt, 2, "xt", op);
  check_index(ptr, idx, xt.size(0), op);
  const int64_t rows = ptr.numel() - 1, B = xt.size(1);
  TORCH_CHECK(dyt.size(0) == rows && dyt.size(1) == B, op, ": dyt must be (rows, B) = (", rows,
              ", ", B, ")");
}

// g (rows, cols): dyt (rows, B) times xt (cols, B) transposed at the kept positions, 0 elsewhere.
at::Tensor sampled_mm_cpu(const at::Tensor& dyt, const at::Tensor& xt, const at::Tensor& ptr,
                          const at::Tensor& idx) {
  check_sampled_args(dyt, xt, ptr, idx, "dpf::sampled_mm");
  at::Tensor g = at::empty({ptr.numel() - 1, xt.size(0)}, xt.options());
  sampled_rows(dyt, xt, ptr, idx, g.data_ptr<float>(), nullptr);
  return g;
}

// The same products at the kept positions only: one value per kept weight, in the index's order.
at::Tensor sampled_values_cpu(const at::Tensor& dyt, const at::Tensor& xt, const at::Tensor& ptr,
                              const at::Tensor& idx) {
  check_sampled_args(dyt, xt, ptr, idx, "dpf::sampled_values");
  at::Tensor values = at::empty({idx.numel()}, xt.options());
  sampled_rows(dyt, xt, ptr, idx, nullptr, values.data_ptr<float>());
  return values;
}

// values[k] = weight[r, idx[k]] for the entries k of each row r of the CSR index: the kept
// values in the index's order, read row by row (int32 columns: half the index bytes of
// flat int64 offsets).
at::Tensor kept_values_cpu(const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx) {
  const char* op = "dpf::kept_values";
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.device().is_cpu(),
              op, ": weight must be a 2-D float32 CPU tensor");
  check_index(ptr, idx, weight.size(1), op);
  const int64_t rows = ptr.numel() - 1;
  TORCH_CHECK(rows == weight.size(0), op, ": the index has ", rows, " rows, the weight ", weight.size(0));
  at::Tensor values = at::empty({idx.numel()}, weight.options());
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int32_t* i = idx.data_ptr<int32_t>();
  const float* w = weight.data_ptr<float>();
  float* out = values.data_ptr<float>();
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  for_row_chunks(rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = w + r * s0;
      if (s1 == 1) {
        for (int64_t k = p[r]; k < p[r + 1]; ++k) out[k] = row[i[k]];
      } else {
        for (int64_t k = p[r]; k < p[r + 1]; ++k) out[k] = row[int64_t(i[k]) * s1];
      }
    }
  });
  return values;
}

// (xt, sums): x (B, cols; unit column stride) as the batch-major xt (cols, B), and the sum
// over the batch of each column when `sums` (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> batch_major_cpu(const at::Tensor& x, bool sums) {
  const char* op = "dpf::batch_major";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu() &&
                  (x.stride(1) == 1 || x.size(1) <= 1) && x.stride(0) >= 0,
              op, ": x must be a 2-D float32 CPU tensor with unit column stride");
  const int64_t B = x.size(0), cols = x.size(1);
  at::Tensor xt = at::empty({cols, B}, x.options());
  at::Tensor s = at::empty({sums ? cols : 0}, x.options());
  if (cols == 0) return {xt, s};
  if (B == 0) {
    s.zero_();
    return {xt, s};
  }
  const float* in = x.data_ptr<float>();
  float* out = xt.data_ptr<float>();
  float* sum = sums ? s.data_ptr<float>() : nullptr;
  const auto kernel = active->batch_major;
  const int64_t ld = B > 1 ? x.stride(0) : cols;
  for_row_chunks(cols, sparse::kBatchMajorCols, [&](int64_t c0, int64_t c1) { kernel(in, ld, B, out, sum, c0, c1); });
  return {xt, s};
}

// The checks of both convolution ops.
void check_conv(const at::Tensor& x, const at::Tensor& ptr, const at::Tensor& idx, int64_t kh,
                int64_t kw, const char* op) {
  check_float(x, 4, "x (N, C, H, W)", op);
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh % 2 == 1 && kw % 2 == 1, op,
              ": the kernel sizes must be odd (\"same\" padding), got ", kh, "x", kw);
  check_index(ptr, idx, x.size(1) * kh * kw, op);
}

// y (N, rows, H, W): the stride-1 "same" convolution of x (N, C, H, W) with the kept weights
// (CSR by output channel over the columns c * kh * kw + i * kw + j), plus bias.
at::Tensor sparse_conv_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& ptr,
                           const at::Tensor& idx, int64_t kh, int64_t kw,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "dpf::sparse_conv";
  check_conv(x, ptr, idx, kh, kw, op);
  check_float(values, 1, "values", op);
  TORCH_CHECK(values.numel() == idx.numel(), op, ": one value per index entry");
  const int64_t rows = ptr.numel() - 1, N = x.size(0), hw = x.size(2) * x.size(3);
  check_bias(bias, rows, op);
  at::Tensor y = at::empty({N, rows, x.size(2), x.size(3)}, x.options());
  if (y.numel() == 0) return y;
  const sparse::ConvGeometry geo = sparse::conv_geometry(idx.data_ptr<int32_t>(), idx.numel(), x.size(2),
                                                         x.size(3), kh, kw, active->lanes);
  const int64_t* p = ptr.data_ptr<int64_t>();
  const float* v = values.data_ptr<float>();
  const float* in = x.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  const auto conv = active->conv_planes;
  const int64_t items = N * rows;
  const int64_t chunk = std::max<int64_t>(1, items / (int64_t(at::get_num_threads()) * 8));
  for_row_chunks(items, chunk, [&](int64_t i0, int64_t i1) {
    conv(p, geo.off.data(), geo.tap.data(), v, in, x.size(1) * hw, rows, hw, geo.bits.data(),
         kh * kw, b, out, i0, i1);
  });
  return y;
}

// g (rows, C * kh * kw): the weight gradient of sparse_conv at the kept entries, zeros
// elsewhere, from the output gradient dy (N, rows, H, W).
at::Tensor sampled_conv_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& ptr,
                            const at::Tensor& idx, int64_t kh, int64_t kw) {
  const char* op = "dpf::sampled_conv";
  check_conv(x, ptr, idx, kh, kw, op);
  check_float(dy, 4, "dy (N, rows, H, W)", op);
  const int64_t rows = ptr.numel() - 1, N = x.size(0), cols = x.size(1) * kh * kw;
  TORCH_CHECK(dy.size(0) == N && dy.size(1) == rows && dy.size(2) == x.size(2) &&
                  dy.size(3) == x.size(3),
              op, ": dy must be (", N, ", ", rows, ", ", x.size(2), ", ", x.size(3), ")");
  at::Tensor g = at::empty({rows, cols}, x.options());
  if (g.numel() == 0) return g;
  if (N == 0 || x.size(2) * x.size(3) == 0) return g.zero_();
  const sparse::ConvGeometry geo = sparse::conv_geometry(idx.data_ptr<int32_t>(), idx.numel(), x.size(2),
                                                         x.size(3), kh, kw, active->lanes);
  const auto sampled = active->sampled_conv_planes;
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int32_t* i = idx.data_ptr<int32_t>();
  const int64_t hw = x.size(2) * x.size(3);
  for_row_chunks(rows, 1, [&](int64_t r0, int64_t r1) {
    sampled(p, i, geo.off.data(), geo.tap.data(), dy.data_ptr<float>(), x.data_ptr<float>(), N,
            x.size(1) * hw, rows, hw, geo.bits.data(), kh * kw, cols, g.data_ptr<float>(), r0, r1);
  });
  return g;
}

// Both CSR indices of the kept entries of a 2-D bool mask (see dpf_ext/ops/sparse.py): by row
// (ptr int64, idx int32 columns, pos int64 offsets r * s0 + c * s1) and by column (t_ptr,
// t_idx rows, t_perm: the row-major position k of each entry, whose value is values[k]), in two
// passes over the mask and one write per kept entry.
std::vector<at::Tensor> sparse_index_cpu(const at::Tensor& mask, int64_t s0, int64_t s1) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.device().is_cpu(),
              "dpf::sparse_index: mask must be a 2-D bool CPU tensor");
  const at::Tensor m = mask.contiguous();
  const int64_t rows = m.size(0), cols = m.size(1);
  TORCH_CHECK(rows < INT32_MAX && cols < INT32_MAX, "dpf::sparse_index: more than 2^31 rows or columns");
  const bool* bits = m.data_ptr<bool>();
  const auto i64 = m.options().dtype(at::kLong), i32 = m.options().dtype(at::kInt);
  at::Tensor ptr = at::zeros({rows + 1}, i64), t_ptr = at::zeros({cols + 1}, i64);
  int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* tp = t_ptr.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const bool* row = bits + r * cols;
    int64_t n = 0;
    for (int64_t c = 0; c < cols; ++c) {
      n += row[c];
      tp[c + 1] += row[c];
    }
    p[r + 1] = p[r] + n;
  }
  for (int64_t c = 0; c < cols; ++c) tp[c + 1] += tp[c];
  const int64_t nnz = p[rows];
  at::Tensor idx = at::empty({nnz}, i32), pos = at::empty({nnz}, i64);
  at::Tensor t_idx = at::empty({nnz}, i32), t_perm = at::empty({nnz}, i64);
  int32_t* ix = idx.data_ptr<int32_t>();
  int64_t* ps = pos.data_ptr<int64_t>();
  int32_t* tix = t_idx.data_ptr<int32_t>();
  int64_t* tpm = t_perm.data_ptr<int64_t>();
  std::vector<int64_t> cursor(tp, tp + cols);  // the next free entry of each column
  int64_t k = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const bool* row = bits + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      if (!row[c]) continue;
      const int64_t t = cursor[c]++;
      tix[t] = int32_t(r);
      tpm[t] = k;
      ix[k] = int32_t(c);
      ps[k++] = r * s0 + c * s1;
    }
  }
  return {ptr, idx, pos, t_ptr, t_idx, t_perm};
}

}  // namespace

// The instruction set the sparse kernels use: "auto" (the best this CPU has), "avx512",
// "avx2" or "scalar" selects it, "" only asks; returns the one in use before the call.
std::string sparse_simd(const std::string& isa) {
  const std::string previous = active->isa;
  if (!isa.empty()) {
    const sparse::Kernels* chosen = sparse::kernels(isa.c_str());
    TORCH_CHECK(chosen != nullptr, "dpf::sparse_simd: '", isa,
                "' is not available on this CPU (choose auto, avx512, avx2 or scalar)");
    active = chosen;
  }
  return previous;
}

TORCH_LIBRARY_IMPL(dpf, CPU, m) {
  m.impl("sparse_mm", &sparse_mm_cpu);
  m.impl("sampled_mm", &sampled_mm_cpu);
  m.impl("sampled_values", &sampled_values_cpu);
  m.impl("sparse_index", &sparse_index_cpu);
  m.impl("sparse_conv", &sparse_conv_cpu);
  m.impl("sampled_conv", &sampled_conv_cpu);
  m.impl("batch_major", &batch_major_cpu);
  m.impl("kept_values", &kept_values_cpu);
}

// The CPU's L1 data and L2 cache sizes in bytes, as the sparse kernels read them.
std::vector<int64_t> sparse_cache_bytes() { return {sparse::cache_bytes(1), sparse::cache_bytes(2)}; }

TORCH_LIBRARY_FRAGMENT(dpf, m) {
  m.def("sparse_simd(str isa) -> str", &sparse_simd);
  // the panel width in floats: positive fixes it, 0 derives it again, -1 only asks
  // (sparse_kernels.h: set_panel_lanes)
  m.def("sparse_panel(int lanes) -> int", &sparse::set_panel_lanes);
  m.def("sparse_cache_bytes() -> int[]", &sparse_cache_bytes);
}

}  // namespace dpf
