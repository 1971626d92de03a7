// The sparse-product kernels, compiled once per instruction set from sparse_simd.inc. The
// file itself is built for baseline x86-64 (or any other target): only the functions inside
// the target regions use AVX-512 or AVX2, and kernels() picks them only where the CPU has them.
#include "sparse_kernels.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DPF_SPARSE_X86 1
#endif

namespace dpf {
namespace sparse {

namespace {
// The size of this CPU's level-`level` data (or unified) cache in bytes: sysconf where the C
// library knows it, else /sys/devices/system/cpu/cpu0/cache, else `fallback`.
int64_t read_cache_bytes(int level, int64_t fallback) {
#ifdef _SC_LEVEL1_DCACHE_SIZE
  const long from_libc = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
  if (from_libc > 0) return from_libc;
#endif
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lvl(dir + "level"), type(dir + "type"), size(dir + "size");
    int l = 0;
    std::string t, text;
    if (!(lvl >> l) || !(type >> t) || !(size >> text) || l != level || t == "Instruction") continue;
    int64_t n = std::atoll(text.c_str());
    if (text.back() == 'K') n <<= 10;
    if (text.back() == 'M') n <<= 20;
    if (n > 0) return n;
  }
  return fallback;
}
}  // namespace

namespace scalar {
struct Vec1 {
  float v;
};
#define VEC Vec1
#define LANES 1
#define VBLOCK 4
#define VZERO() Vec1{0.0f}
#define VSET1(s) Vec1{(s)}
#define VLOAD(p) Vec1{*(p)}
#define VSTORE(p, a) (*(p) = (a).v)
#define VFMA(a, b, c) Vec1{(a).v * (b).v + (c).v}
#define VADD(a, b) Vec1{(a).v + (b).v}
#define VSUM(a) ((a).v)
#define VMASK uint32_t
#define VMASK_BITS(b) (b)
#define VLOADM(m, p) Vec1{((m) & 1u) ? *(p) : 0.0f}
#define VSTOREM(m, p, a) (((m) & 1u) ? (void)(*(p) = (a).v) : (void)0)
#include "sparse_simd.inc"
}  // namespace scalar

#ifdef DPF_SPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#define VEC __m256
#define LANES 8
#define VBLOCK 8
#define VZERO() _mm256_setzero_ps()
#define VSET1(s) _mm256_set1_ps(s)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, a) _mm256_storeu_ps((p), (a))
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VADD(a, b) _mm256_add_ps((a), (b))
#define VSUM(a) hsum256(a)
static inline __m256i mask_of_bits(uint32_t b) {
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(b)), lane), lane);
}
// d[c * ldd + r] = s[r * lds + c] for an 8 x 8 block.
static inline void transpose8x8(const float* s, int64_t lds, float* d, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#define TRANSPOSE_N 8
#define TRANSPOSE transpose8x8
#define VMASK __m256i
#define VMASK_BITS(b) mask_of_bits(b)
#define VLOADM(m, p) _mm256_maskload_ps((p), (m))
#define VSTOREM(m, p, a) _mm256_maskstore_ps((p), (m), (a))
#include "sparse_simd.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
// d[c * ldd + r] = s[r * lds + c] for a 16 x 16 block.
static inline void transpose16x16(const float* s, int64_t lds, float* d, int64_t ldd) {
  // the zero-masked forms with every lane set: the same instructions, without the undefined
  // source operand that GCC 12's -Wuninitialized reports in the unmasked intrinsics
  const __mmask16 all = 0xFFFF;
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(s + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_ps(all, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_ps(all, r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_maskz_shuffle_ps(all, t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_maskz_shuffle_ps(all, t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_maskz_shuffle_ps(all, t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_maskz_shuffle_ps(all, t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_maskz_shuffle_f32x4(all, r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_maskz_shuffle_f32x4(all, r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(d + j * ldd, _mm512_maskz_shuffle_f32x4(all, t[j], t[j + 8], 0x88));
    _mm512_storeu_ps(d + (j + 8) * ldd, _mm512_maskz_shuffle_f32x4(all, t[j], t[j + 8], 0xdd));
  }
}
#define VEC __m512
#define LANES 16
#define VBLOCK 4
#define VZERO() _mm512_setzero_ps()
#define VSET1(s) _mm512_set1_ps(s)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, a) _mm512_storeu_ps((p), (a))
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VADD(a, b) _mm512_add_ps((a), (b))
#define VSUM(a) _mm512_reduce_add_ps(a)
#define TRANSPOSE_N 16
#define TRANSPOSE transpose16x16
#define VMASK __mmask16
#define VMASK_BITS(b) __mmask16(b)
#define VLOADM(m, p) _mm512_maskz_loadu_ps((m), (p))
#define VSTOREM(m, p, a) _mm512_mask_storeu_ps((p), (m), (a))
#include "sparse_simd.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

ConvGeometry conv_geometry(const int32_t* idx, int64_t nnz, int64_t H, int64_t W, int64_t kh,
                           int64_t kw, int64_t lanes) {
  const int64_t hw = H * W, taps = kh * kw, ph = kh / 2, pw = kw / 2;
  const int64_t nvec = (hw + lanes - 1) / lanes;
  ConvGeometry geo;
  geo.off.resize(nnz);
  geo.tap.resize(nnz);
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t c = idx[k] / taps, t = idx[k] % taps;
    geo.off[k] = c * hw + (t / kw - ph) * W + (t % kw - pw);
    geo.tap[k] = int32_t(t);
  }
  geo.bits.assign((taps + 1) * nvec, 0u);
  for (int64_t t = 0; t <= taps; ++t) {  // the last row: the plane itself
    const int64_t di = t < taps ? t / kw - ph : 0, dj = t < taps ? t % kw - pw : 0;
    for (int64_t p = 0; p < hw; ++p) {
      const int64_t h = p / W + di, w = p % W + dj;
      if (h >= 0 && h < H && w >= 0 && w < W) geo.bits[t * nvec + p / lanes] |= 1u << (p % lanes);
    }
  }
  return geo;
}

int64_t cache_bytes(int level) {
  static const int64_t sizes[2] = {read_cache_bytes(1, 32 << 10), read_cache_bytes(2, 1 << 20)};
  return sizes[level == 1 ? 0 : 1];
}

namespace {
std::atomic<int64_t> fixed_panel_lanes{0};
}

int64_t set_panel_lanes(int64_t lanes) {
  return lanes < 0 ? fixed_panel_lanes.load() : fixed_panel_lanes.exchange(lanes);
}

int64_t panel_vectors(const Kernels* k, int64_t cols, int64_t B) {
  if (const int64_t lanes = fixed_panel_lanes.load()) {
    int64_t vb = 1;
    while (vb * 2 <= k->max_panel_vectors && vb * 2 * k->lanes <= lanes) vb *= 2;
    return vb;
  }
  // the panel (cols x vb * lanes floats) in half of L2, the rest for the index, the values and
  // the output tile; no wider than the batch needs
  const int64_t budget = cache_bytes(2) / 2;
  int64_t vb = k->max_panel_vectors;
  while (vb > 1 && (cols * vb * k->lanes * int64_t(sizeof(float)) > budget ||
                    (vb / 2) * k->lanes >= B))
    vb /= 2;
  return vb;
}

void spmm(const Kernels* k, const int64_t* ptr, const int32_t* idx, const float* val,
          const float* xt, int64_t B, int64_t cols, const float* bias, float* y, int64_t rows) {
  const int64_t vb = panel_vectors(k, cols, B), P = vb * k->lanes;
  if (P == B) return k->spmm_panel(ptr, idx, val, xt, vb, bias, y, rows, 0, B, 0, rows);
  std::vector<float> panel(std::max<int64_t>(cols * P, 1));
  for (int64_t b0 = 0; b0 < B; b0 += P) {
    const int64_t w = std::min(P, B - b0);
    k->pack_panel(xt, B, b0, w, P, panel.data(), 0, cols);
    k->spmm_panel(ptr, idx, val, panel.data(), vb, bias, y, rows, b0, w, 0, rows);
  }
}

const Kernels* kernels(const char* isa) {
  static const Kernels scalar_kernels{"scalar", scalar::pack_panel, scalar::spmm_panel, scalar::kMaxPanelVectors, scalar::sddmm_rows,
                                          1, scalar::conv_planes, scalar::sampled_conv_planes,
                                          scalar::batch_major};
#ifdef DPF_SPARSE_X86
  static const Kernels avx2_kernels{"avx2", avx2::pack_panel, avx2::spmm_panel, avx2::kMaxPanelVectors, avx2::sddmm_rows,
                                          8, avx2::conv_planes, avx2::sampled_conv_planes,
                                          avx2::batch_major};
  static const Kernels avx512_kernels{"avx512", avx512::pack_panel, avx512::spmm_panel, avx512::kMaxPanelVectors, avx512::sddmm_rows,
                                          16, avx512::conv_planes, avx512::sampled_conv_planes,
                                          avx512::batch_major};
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == nullptr || std::strcmp(isa, "auto") == 0)
    return has512 ? &avx512_kernels : has2 ? &avx2_kernels : &scalar_kernels;
  if (std::strcmp(isa, "avx512") == 0) return has512 ? &avx512_kernels : nullptr;
  if (std::strcmp(isa, "avx2") == 0) return has2 ? &avx2_kernels : nullptr;
#else
  if (isa == nullptr || std::strcmp(isa, "auto") == 0) return &scalar_kernels;
#endif
  if (std::strcmp(isa, "scalar") == 0) return &scalar_kernels;
  return nullptr;
}

}  // namespace sparse
}  // namespace dpf
