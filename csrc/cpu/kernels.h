// CPU kernels over one contiguous range of one tensor. Torch-free: the ATen glue
// (ops.cpp) splits many tensors into ranges and runs these under at::parallel_for; the C++
// unit tests call them directly.
#pragma once

#include <cstdint>

#include "../dpf_math.h"

namespace dpf {
namespace cpu {

// hist[high_bin(|w|)] += 1 over w[0, n).
template <typename T>
void histogram_high(const T* w, int64_t n, int32_t* hist) {
  for (int64_t i = 0; i < n; ++i) ++hist[high_bin(magnitude_bits(w[i]))];
}

// hist[low_bin(|w|)] += 1 over the elements of w[0, n) whose high bin is `prefix`.
template <typename T>
void histogram_low(const T* w, int64_t n, uint32_t prefix, int32_t* hist) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t mag = magnitude_bits(w[i]);
    if (high_bin(mag) == prefix) ++hist[low_bin(mag)];
  }
}

// mask = |w| >= tau (and the old mask if shrink_only); counts kept and reactivated.
template <typename T>
void update_mask(const T* w, int64_t n, uint32_t tau_bits, bool shrink_only, bool* mask,
                 int64_t* kept, int64_t* reactivated) {
  int64_t k = 0, r = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool old = mask[i];
    const bool now = keep(magnitude_bits(w[i]), tau_bits) && (old || !shrink_only);
    mask[i] = now;
    k += now;
    r += now && !old;
  }
  *kept += k;
  *reactivated += r;
}

// out = w * mask, as torch computes it (a pruned -x gives -0.0, a pruned NaN stays NaN).
template <typename T>
void masked_weight(const T* w, const bool* mask, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(to_float(w[i]) * float(mask[i]));
}

// The fused feedback SGD step over p[0, n): updates p (and buf when momentum != 0; `fresh`
// means buf is not initialised yet), then optionally writes out = p * mask and adds the
// high-bits histogram of the new |p| to hist.
template <typename T>
void sgd_step(T* p, const T* g, T* buf, bool fresh, int64_t n, const SgdParams& s,
              const bool* mask, T* masked_out, int32_t* hist) {
  for (int64_t i = 0; i < n; ++i) {
    float b = (buf && !fresh) ? to_float(buf[i]) : 0.f;
    const T np = from_float<T>(sgd_update(to_float(p[i]), to_float(g[i]), b, fresh, s));
    p[i] = np;
    if (buf) buf[i] = from_float<T>(b);
    if (masked_out) masked_out[i] = from_float<T>(to_float(np) * float(mask[i]));
    if (hist) ++hist[high_bin(magnitude_bits(np))];
  }
}

}  // namespace cpu
}  // namespace dpf
