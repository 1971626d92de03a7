// The element-wise math of dpf_ext, shared by every compiled backend.
//
// Plain C++ with no torch or CUDA headers: g++ compiles it for the CPU kernels and the C++
// unit tests, nvcc for the CUDA kernels (functions are __host__ __device__ there). The CPU
// tests therefore check the very arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DPF_HD __host__ __device__ __forceinline__
#else
#define DPF_HD inline
#endif

namespace dpf {

// First-pass histogram: the top 16 bits of a non-negative float32 (sign 0: 32768 values).
constexpr int kHighBins = 1 << 15;
// Second-pass histogram: the low 16 bits.
constexpr int kLowBins = 1 << 16;

// 16-bit storage types, layout-compatible with torch's at::Half and at::BFloat16.
struct Half {
  uint16_t x;
};
struct BFloat16 {
  uint16_t x;
};

DPF_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DPF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// IEEE binary16 -> binary32, exact (subnormals, infinities and NaN included).
DPF_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (man << 13));  // Inf, NaN
  if (exp == 0) {
    if (man == 0) return bits_float(sign);  // signed zero
    // subnormal: normalise the mantissa
    exp = 113;  // 127 - 15 + 1
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    man &= 0x3FFu;
    return bits_float(sign | (exp << 23) | (man << 13));
  }
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

// binary32 -> binary16, round to nearest even; overflow gives Inf, NaN stays NaN.
DPF_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: Inf
  if (abs < 0x38800000u) {                         // below half's smallest normal
    if (abs < 0x33000000u) return sign;            // below half of the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t man = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value = man * 2^(exp - 150) = (man >> shift) * 2^-24
    const uint32_t half_man = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t r = half_man;
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++r;
    return sign | uint16_t(r);
  }
  // normal: rebias the exponent, round the mantissa from 23 to 10 bits
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | uint16_t(h);
}

DPF_HD float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN stays NaN.
DPF_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

DPF_HD float to_float(float v) { return v; }
DPF_HD float to_float(Half v) { return half_to_float(v.x); }
DPF_HD float to_float(BFloat16 v) { return bf16_to_float(v.x); }

template <typename T>
DPF_HD T from_float(float f);
template <>
DPF_HD float from_float<float>(float f) {
  return f;
}
template <>
DPF_HD Half from_float<Half>(float f) {
  return Half{float_to_half(f)};
}
template <>
DPF_HD BFloat16 from_float<BFloat16>(float f) {
  return BFloat16{float_to_bf16(f)};
}

// Bit pattern of |x| widened to float32: monotone in |x| (NaN above +Inf).
template <typename T>
DPF_HD uint32_t magnitude_bits(T x) {
  return float_bits(to_float(x)) & 0x7FFFFFFFu;
}

DPF_HD uint32_t high_bin(uint32_t mag) { return mag >> 16; }
DPF_HD uint32_t low_bin(uint32_t mag) { return mag & 0xFFFFu; }

// The threshold as the bit pattern `keep` compares against: tau <= 0 (-0.0 included) keeps
// everything, a NaN tau keeps nothing.
DPF_HD uint32_t threshold_bits(float tau) {
  const uint32_t u = float_bits(tau);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFFFFFu;
  return (u & 0x80000000u) ? 0u : u;
}

// The mask decision |w| >= tau, on bit patterns (exact for subnormals); a NaN weight is
// never kept, as no comparison with NaN holds.
DPF_HD bool keep(uint32_t mag, uint32_t tau_bits) { return mag >= tau_bits && mag <= 0x7F800000u; }

// The channel floor's key of an element at `column` of its row: |w|'s bit pattern in the
// high 32 bits, kColumnMask - column in the low 32. The largest key of a row names its
// largest magnitude, the first column on ties; every key is positive, 0 means "no element".
constexpr int64_t kColumnMask = 0xFFFFFFFFll;

DPF_HD int64_t row_key(uint32_t mag, int64_t column) {
  return (int64_t(mag) << 32) | (kColumnMask - column);
}

// The column a row's key names, or -1 for the key 0 (an empty row).
DPF_HD int64_t key_column(int64_t key) { return key > 0 ? kColumnMask - (key & kColumnMask) : -1; }

// N:M patterns: the largest group size M a pattern may have.
constexpr int kMaxGroup = 16;

// Whether element j of a group of m magnitudes (bit patterns) is one of the group's n
// largest; of equal magnitudes the earlier one wins, so exactly n are kept.
DPF_HD bool nm_keep(const uint32_t* mags, int m, int j, int n) {
  int rank = 0;
  for (int k = 0; k < m; ++k) rank += mags[k] > mags[j] || (mags[k] == mags[j] && k < j);
  return rank < n;
}

// One N:M group, the m elements of w and their mask: keeps the n largest (nm_keep) and
// adds the kept, reactivated (mask was 0) and non-finite elements to the counts.
template <typename T, typename Count>
DPF_HD void nm_group(const T* w, bool* mask, int n, int m, Count& kept, Count& reactivated,
                     Count& nonfinite) {
  uint32_t mags[kMaxGroup];
  for (int j = 0; j < m; ++j) {
    mags[j] = magnitude_bits(w[j]);
    nonfinite += mags[j] >= 0x7F800000u;
  }
  for (int j = 0; j < m; ++j) {
    const bool old = mask[j];
    const bool now = nm_keep(mags, m, j, n);
    mask[j] = now;
    kept += now;
    reactivated += now && !old;
  }
}

// Hyper-parameters of the SGD step, as torch.optim.SGD names them.
struct SgdParams {
  float lr;
  float momentum;
  float dampening;
  float weight_decay;
  bool nesterov;
  bool maximize;
};

// One SGD update of one coordinate in float32, with torch.optim.SGD's semantics.
// `buf` is the momentum buffer (read unless `fresh`, always written when momentum != 0).
// Returns the new parameter value.
DPF_HD float sgd_update(float p, float g, float& buf, bool fresh, const SgdParams& s) {
  if (s.maximize) g = -g;
  if (s.weight_decay != 0.f) g = g + s.weight_decay * p;
  if (s.momentum != 0.f) {
    buf = fresh ? g : s.momentum * buf + (1.f - s.dampening) * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  return p - s.lr * g;
}

// One AdamW step's coefficients, derived on the host in double precision from
// torch.optim.AdamW's hyper-parameters and rounded to float32 once, as torch's own kernels
// receive them: decay = 1 - lr * weight_decay, one_minus_beta1/2 = 1 - beta1/2,
// step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t).
struct AdamwParams {
  float decay;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float step_size;
  float bias_correction2_sqrt;
  bool amsgrad;
  bool maximize;
};

// One AdamW update of one coordinate in float32, with torch.optim.AdamW's semantics
// (decoupled weight decay; exp_avg by lerp as torch computes it). `m`, `v` and, with
// amsgrad, `vmax` are the state, updated in place. Returns the new parameter value.
DPF_HD float adamw_update(float p, float g, float& m, float& v, float& vmax, const AdamwParams& a) {
  if (a.maximize) g = -g;
  p = p * a.decay;
  m = m + a.one_minus_beta1 * (g - m);
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
  float second = v;
  if (a.amsgrad) {
    vmax = vmax > v ? vmax : v;
    second = vmax;
  }
#if defined(__CUDA_ARCH__)
  const float denom = sqrtf(second) / a.bias_correction2_sqrt + a.eps;
#else
  const float denom = std::sqrt(second) / a.bias_correction2_sqrt + a.eps;
#endif
  return p + (-a.step_size) * (m / denom);
}

// adamw_update on element i of arrays in storage type T, state written back (vmax: null
// without amsgrad). Returns the new parameter value.
template <typename T>
DPF_HD T adamw_element(T* p, const T* g, T* m, T* v, T* vmax, int64_t i, const AdamwParams& a) {
  float mi = to_float(m[i]), vi = to_float(v[i]), vmaxi = vmax ? to_float(vmax[i]) : 0.f;
  const T np = from_float<T>(adamw_update(to_float(p[i]), to_float(g[i]), mi, vi, vmaxi, a));
  p[i] = np;
  m[i] = from_float<T>(mi);
  v[i] = from_float<T>(vi);
  if (vmax) vmax[i] = from_float<T>(vmaxi);
  return np;
}

}  // namespace dpf
