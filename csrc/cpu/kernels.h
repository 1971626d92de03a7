// CPU kernels over one contiguous range of one tensor. Torch-free: the ATen glue
// (ops.cpp) splits many tensors into ranges and runs these under at::parallel_for; the C++
// unit tests call them directly.
#pragma once

#include <cstdint>

#include "../dpf_math.h"

namespace dpf {
namespace cpu {

// *p = max(*p, v), atomically: ranges of one row may be handled by different threads.
inline void atomic_max(int64_t* p, int64_t v) {
  int64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// The largest row_key of each row of a tensor seen through consecutive element indices
// (rows of row_len elements), merged into row_max[row] once per row touched. A null
// row_max makes it a no-op.
class RowMax {
 public:
  RowMax(int64_t* row_max, int64_t row_len) : row_max_(row_max), row_len_(row_len) {}
  ~RowMax() { flush(); }

  // Element i of the tensor has magnitude bits mag; i increases between calls.
  void add(int64_t i, uint32_t mag) {
    if (!row_max_) return;
    if (i >= row_end_) {
      flush();
      row_ = i / row_len_;
      row_end_ = (row_ + 1) * row_len_;
    }
    const int64_t key = row_key(mag, i - (row_end_ - row_len_));
    if (key > best_) best_ = key;
  }

 private:
  void flush() {
    if (best_ > 0) atomic_max(row_max_ + row_, best_);
    best_ = 0;
  }
  int64_t* row_max_;
  int64_t row_len_;
  int64_t row_ = 0;
  int64_t row_end_ = 0;
  int64_t best_ = 0;
};

// The column of its row that the channel floor keeps for element i (rows of row_len
// elements, keys in row_max), or -1; a null row_max forces nothing.
class ForcedColumn {
 public:
  ForcedColumn(const int64_t* row_max, int64_t row_len) : row_max_(row_max), row_len_(row_len) {}

  // Whether element i is its row's forced one; i increases between calls.
  bool forced(int64_t i) {
    if (!row_max_) return false;
    if (i >= row_end_) {
      const int64_t row = i / row_len_;
      row_end_ = (row + 1) * row_len_;
      column_ = key_column(row_max_[row]);
    }
    return i - (row_end_ - row_len_) == column_;
  }

 private:
  const int64_t* row_max_;
  int64_t row_len_;
  int64_t row_end_ = 0;
  int64_t column_ = -1;
};

// The second pass's histograms of `width` consecutive high bins from `start`, counted in
// the first pass: window[(high - start) * kLowBins + low] += 1, atomically (few elements
// fall in a window, so threads seldom meet). A null window counts nothing.
struct Window {
  int64_t* counts;
  uint32_t start;
  uint32_t width;

  void add(uint32_t mag) const {
    const uint32_t slot = high_bin(mag) - start;  // wraps around below start
    if (counts && slot < width)
      __atomic_fetch_add(counts + int64_t(slot) * kLowBins + low_bin(mag), 1, __ATOMIC_RELAXED);
  }
};

// The first pass over w[begin, end): hist[high_bin(|w|)] += 1, the rows' keys into row_max
// (may be null; rows of row_len elements) and the window's low bins.
template <typename T>
void histogram_high(const T* w, int64_t begin, int64_t end, int32_t* hist, int64_t* row_max,
                    int64_t row_len, const Window& window = {nullptr, 0, 0}) {
  RowMax rows(row_max, row_len);
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t mag = magnitude_bits(w[i]);
    ++hist[high_bin(mag)];
    rows.add(i, mag);
    window.add(mag);
  }
}

// hist[low_bin(|w|)] += 1 over the elements of w[begin, end) whose high bin is `prefix`.
template <typename T>
void histogram_low(const T* w, int64_t begin, int64_t end, uint32_t prefix, int32_t* hist) {
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t mag = magnitude_bits(w[i]);
    if (high_bin(mag) == prefix) ++hist[low_bin(mag)];
  }
}

// mask = |w| >= tau (and the old mask if shrink_only), or the element is its row's forced
// one (row_max may be null); over w[begin, end); counts kept and reactivated.
template <typename T>
void update_mask(const T* w, int64_t begin, int64_t end, uint32_t tau_bits, bool shrink_only,
                 const int64_t* row_max, int64_t row_len, bool* mask, int64_t* kept,
                 int64_t* reactivated) {
  int64_t k = 0, r = 0;
  ForcedColumn forced(row_max, row_len);
  for (int64_t i = begin; i < end; ++i) {
    const bool old = mask[i];
    const bool now =
        (keep(magnitude_bits(w[i]), tau_bits) && (old || !shrink_only)) || forced.forced(i);
    mask[i] = now;
    k += now;
    r += now && !old;
  }
  *kept += k;
  *reactivated += r;
}

// N:M masks over the groups [g_begin, g_end) of m consecutive elements of w: each group
// keeps its n largest magnitudes; counts kept, reactivated and non-finite weights.
template <typename T>
void nm_mask(const T* w, int64_t g_begin, int64_t g_end, int n, int m, bool* mask, int64_t* kept,
             int64_t* reactivated, int64_t* nonfinite) {
  int64_t k = 0, r = 0, bad = 0;
  uint32_t mags[kMaxGroup];
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t base = g * m;
    for (int j = 0; j < m; ++j) {
      mags[j] = magnitude_bits(w[base + j]);
      bad += mags[j] >= 0x7F800000u;
    }
    for (int j = 0; j < m; ++j) {
      const bool old = mask[base + j];
      const bool now = nm_keep(mags, m, j, n);
      mask[base + j] = now;
      k += now;
      r += now && !old;
    }
  }
  *kept += k;
  *reactivated += r;
  *nonfinite += bad;
}

// out = w * mask, as torch computes it (a pruned -x gives -0.0, a pruned NaN stays NaN).
template <typename T>
void masked_weight(const T* w, const bool* mask, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(to_float(w[i]) * float(mask[i]));
}

// The fused feedback SGD step over p[begin, end): updates p (and buf when momentum != 0;
// `fresh` means buf is not initialised yet), then optionally writes out = p * mask and runs
// the first pass (histogram_high) over the new p while the range is in cache.
template <typename T>
void sgd_step(T* p, const T* g, T* buf, bool fresh, int64_t begin, int64_t end,
              const SgdParams& s, const bool* mask, T* masked_out, int32_t* hist,
              int64_t* row_max, int64_t row_len, const Window& window = {nullptr, 0, 0}) {
  if (buf && !fresh) {  // the common case, in a loop the compiler vectorises
    for (int64_t i = begin; i < end; ++i) {
      float b = to_float(buf[i]);
      p[i] = from_float<T>(sgd_update(to_float(p[i]), to_float(g[i]), b, false, s));
      buf[i] = from_float<T>(b);
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      float b = 0.f;
      p[i] = from_float<T>(sgd_update(to_float(p[i]), to_float(g[i]), b, fresh, s));
      if (buf) buf[i] = from_float<T>(b);
    }
  }
  if (masked_out) masked_weight(p + begin, mask + begin, end - begin, masked_out + begin);
  if (hist) histogram_high(p, begin, end, hist, row_max, row_len, window);
}

// The fused AdamW step over p[begin, end): updates p, m and v (and vmax with amsgrad; may
// be null otherwise), then optionally runs the first pass (histogram_high) over the new p.
template <typename T>
void adamw_step(T* p, const T* g, T* m, T* v, T* vmax, int64_t begin, int64_t end,
                const AdamwParams& a, int32_t* hist, int64_t* row_max, int64_t row_len,
                const Window& window = {nullptr, 0, 0}) {
  if (vmax) {
    for (int64_t i = begin; i < end; ++i) adamw_element(p, g, m, v, vmax, i, a);
  } else {  // the common case, in a loop the compiler vectorises
    for (int64_t i = begin; i < end; ++i) adamw_element<T>(p, g, m, v, nullptr, i, a);
  }
  if (hist) histogram_high(p, begin, end, hist, row_max, row_len, window);
}

}  // namespace cpu
}  // namespace dpf
