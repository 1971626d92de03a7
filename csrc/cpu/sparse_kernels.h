// Torch-free kernels of the sparse products (see sparse_simd.inc for the layouts), with the
// instruction set chosen at run time: AVX-512, AVX2 + FMA, or portable scalar code.
#pragma once

#include <cstdint>

namespace dpf {
namespace sparse {

constexpr int64_t kTileRows = 16;

// Y[b, r] = bias[r] + sum over the kept (r, c) of val * Xt[c, b], for rows [r_begin, r_end).
using SpmmRows = void (*)(const int64_t* ptr, const int32_t* idx, const float* val,
                          const float* xt, int64_t B, const float* bias, float* y, int64_t ldy,
                          int64_t r_begin, int64_t r_end);
// G[r, :] = 0, then G[r, c] = sum_b dYt[r, b] * Xt[c, b] at the kept (r, c), rows [r_begin, r_end);
// acc: scratch of one float per kept weight of those rows.
using SddmmRows = void (*)(const int64_t* ptr, const int32_t* idx, const float* dyt,
                           const float* xt, int64_t B, int64_t cols, float* g, float* acc,
                           int64_t r_begin, int64_t r_end);

struct Kernels {
  const char* isa;
  SpmmRows spmm_rows;
  SddmmRows sddmm_rows;
};

// The kernels for the instruction set `isa` ("avx512", "avx2", "scalar"), or for the best one
// this CPU has (`isa` null or "auto"). Null if that set is not built or not supported here.
const Kernels* kernels(const char* isa = nullptr);

}  // namespace sparse
}  // namespace dpf
