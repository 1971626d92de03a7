// CPU kernels over one contiguous range of one tensor. Torch-free: the ATen glue
// (ops.cpp) splits many tensors into ranges and runs these under at::parallel_for; the C++
// unit tests call them directly.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../dpf_math.h"

namespace dpf {
namespace cpu {

// *p = max(*p, v), atomically: ranges of one row may be handled by different threads.
inline void atomic_max(int64_t* p, int64_t v) {
  int64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// The second pass's histograms of `width` consecutive finite high bins from `start` (which
// may be negative; start + width <= the first non-finite bin), counted in the first pass:
// window[(high - start) * kLowBins + low] += 1, atomically (few elements fall in a window,
// so threads seldom meet). A null window counts nothing.
struct Window {
  int64_t* counts;
  int64_t start;
  uint32_t width;

  void add(uint32_t mag) const {
    const uint64_t slot = uint64_t(int64_t(high_bin(mag)) - start);  // wraps around below start
    if (counts && slot < width)
      __atomic_fetch_add(counts + int64_t(slot) * kLowBins + low_bin(mag), 1, __ATOMIC_RELAXED);
  }
};

// Four magnitudes (magnitude_bits, all below 2^31) in the lanes of a 16-byte vector, which
// GCC and Clang map to SSE2/NEON registers: the first pass's counting loops run four
// elements per instruction.
using Lanes = int32_t __attribute__((vector_size(16)));

template <typename T>
inline Lanes magnitudes4(const T* w) {
  Lanes v;
  for (int j = 0; j < 4; ++j) v[j] = int32_t(magnitude_bits(w[j]));
  return v;
}
template <>
inline Lanes magnitudes4<float>(const float* w) {
  Lanes v;
  std::memcpy(&v, w, sizeof(v));
  return v & 0x7FFFFFFF;
}

inline bool any_lane(Lanes v) {
  uint64_t halves[2];
  std::memcpy(halves, &v, sizeof(halves));
  return (halves[0] | halves[1]) != 0;
}

inline int64_t sum_lanes(Lanes v) { return int64_t(v[0]) + v[1] + v[2] + v[3]; }

// row_max[row] = max(it, the row's largest row_key over w[begin, end)), rows of row_len
// elements: each row's largest magnitude first, then the first column holding it; short
// rows key every element instead.
template <typename T>
void record_rows(const T* w, int64_t begin, int64_t end, int64_t* row_max, int64_t row_len) {
  if (row_len < 64) {
    for (int64_t row = begin / row_len; row * row_len < end; ++row) {
      const int64_t row_begin = row * row_len;
      const int64_t a = begin > row_begin ? begin : row_begin;
      const int64_t b = end < row_begin + row_len ? end : row_begin + row_len;
      int64_t best = 0;
      for (int64_t i = a; i < b; ++i) {
        const int64_t key = row_key(magnitude_bits(w[i]), i - row_begin);
        best = key > best ? key : best;
      }
      atomic_max(row_max + row, best);
    }
    return;
  }
  for (int64_t a = begin; a < end;) {
    const int64_t row = a / row_len, row_begin = row * row_len;
    const int64_t b = end < row_begin + row_len ? end : row_begin + row_len;
    Lanes lanes = {0, 0, 0, 0};
    int64_t i = a;
    for (; i + 4 <= b; i += 4) {
      const Lanes m = magnitudes4(w + i), larger = m > lanes;
      lanes = (m & larger) | (lanes & ~larger);
    }
    int32_t best = 0;
    for (int j = 0; j < 4; ++j) best = lanes[j] > best ? lanes[j] : best;
    for (; i < b; ++i) best = int32_t(magnitude_bits(w[i])) > best ? int32_t(magnitude_bits(w[i])) : best;
    int64_t first = a;
    while (first + 4 <= b && !any_lane(magnitudes4(w + first) == best)) first += 4;
    while (int32_t(magnitude_bits(w[first])) != best) ++first;
    atomic_max(row_max + row, row_key(uint32_t(best), first - row_begin));
    a = b;
  }
}

// The first pass over w[begin, end): hist[high_bin(|w|)] += 1 and the rows' keys into
// row_max (may be null; rows of row_len elements). With a window, its low bins, and the
// high histogram summarised around it: the finite elements below the window count in bin
// start - 1, those above in bin start + width, the others (the window's, the non-finite)
// in their own bins. Counting two numbers four lanes at a time instead of scattering every
// element into 32768 bins, the summarised pass is the cheap one.
template <typename T>
void histogram_high(const T* w, int64_t begin, int64_t end, int32_t* hist, int64_t* row_max,
                    int64_t row_len, const Window& window = {nullptr, 0, 0}) {
  if (row_max) record_rows(w, begin, end, row_max, row_len);
  if (!window.counts) {
    for (int64_t i = begin; i < end; ++i) ++hist[high_bin(magnitude_bits(w[i]))];
    return;
  }
  constexpr int32_t kInf = 0x7F800000;
  const int32_t lo = window.start > 0 ? int32_t(window.start << 16) : 0;
  const int32_t hi = int32_t((window.start + window.width) << 16);  // <= kInf
  auto count_one = [&](int32_t mag) {
    if (mag >= lo && (mag < hi || mag >= kInf)) {  // the window's, or non-finite
      ++hist[high_bin(uint32_t(mag))];
      window.add(uint32_t(mag));
    }
  };
  Lanes below = {0, 0, 0, 0}, above = {0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    Lanes rare = {0, 0, 0, 0};
    for (int j = 0; j < 16; j += 4) {
      const Lanes m = magnitudes4(w + i + j);
      const Lanes under = m < lo, over = (m >= hi) & (m < kInf);
      below -= under;  // comparisons give -1 for true
      above -= over;
      rare |= ~(under | over);
    }
    if (any_lane(rare))
      for (int j = 0; j < 16; ++j) count_one(int32_t(magnitude_bits(w[i + j])));
  }
  int64_t n_below = sum_lanes(below), n_above = sum_lanes(above);
  for (; i < end; ++i) {
    const int32_t mag = int32_t(magnitude_bits(w[i]));
    n_below += mag < lo;
    n_above += (mag >= hi) & (mag < kInf);
    count_one(mag);
  }
  if (n_below) hist[window.start - 1] += int32_t(n_below);
  if (n_above) hist[window.start + window.width] += int32_t(n_above);
}

// hist[low_bin(|w|)] += 1 over the elements of w[begin, end) whose high bin is `prefix`.
template <typename T>
void histogram_low(const T* w, int64_t begin, int64_t end, uint32_t prefix, int32_t* hist) {
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t mag = magnitude_bits(w[i]);
    if (high_bin(mag) == prefix) ++hist[low_bin(mag)];
  }
}

// Calls fn(i) for the element each row's key in row_max names inside [begin, end) (rows of
// row_len elements; a key of 0 names none).
template <typename F>
void for_each_forced(const int64_t* row_max, int64_t row_len, int64_t begin, int64_t end, const F& fn) {
  for (int64_t row = begin / row_len; row * row_len < end; ++row) {
    const int64_t column = key_column(row_max[row]);
    const int64_t i = row * row_len + column;
    if (column >= 0 && i >= begin && i < end) fn(i);
  }
}

// mask = |w| >= tau (and the old mask if shrink_only), or the element is its row's forced
// one (row_max may be null); over w[begin, end); counts kept and reactivated. The
// threshold's loop is branch-free (the compiler vectorises it); the few forced elements
// are set after it, from their old values saved before it.
template <typename T>
void update_mask(const T* w, int64_t begin, int64_t end, uint32_t tau_bits, bool shrink_only,
                 const int64_t* row_max, int64_t row_len, bool* mask, int64_t* kept,
                 int64_t* reactivated) {
  std::vector<std::pair<int64_t, uint8_t>> forced;  // (element, old mask)
  uint8_t* m = reinterpret_cast<uint8_t*>(mask);
  if (row_max && row_len > 0) for_each_forced(row_max, row_len, begin, end, [&](int64_t i) { forced.emplace_back(i, m[i]); });
  const uint8_t any_old = shrink_only ? 0 : 1;  // now = keep && (old || !shrink_only)
  uint32_t k = 0, r = 0;  // at most kChunk-sized ranges
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t mag = magnitude_bits(w[i]);
    const uint8_t old = m[i];
    const uint8_t now = uint8_t(keep(mag, tau_bits)) & (old | any_old);
    m[i] = now;
    k += now;
    r += now & (old ^ 1);
  }
  for (const auto& [i, old] : forced) {
    if (!m[i]) {
      m[i] = 1;
      ++k;
      r += old ^ 1;
    }
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
  for (int64_t g = g_begin; g < g_end; ++g) nm_group(w + g * m, mask + g * m, n, m, k, r, bad);
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
