// Torch-free kernels of the sparse products (see sparse_simd.inc for the layouts), with the
// instruction set chosen at run time: AVX-512, AVX2 + FMA, or portable scalar code.
#pragma once

#include <cstdint>
#include <vector>

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

// Direct sparse convolution (stride 1, "same" padding), in torch's own layout: x (N, C, H, W)
// and y (N, rows, H, W), planes of hw = H * W floats, image = C * hw. The kept weight k of
// output channel r (CSR row r) is at input channel c and tap t = i * kw + j: it reads the
// plane of c shifted by (i - ph, j - pw), from x + n * image + off[k] with off[k] = c * hw +
// (i - ph) * W + (j - pw), and tap[k] = t. bits holds, for every tap and then for the output
// plane itself (taps + 1 rows of ceil(hw / lanes) words, lanes: the instruction set's vector
// width, kernels().lanes), one bit per lane: whether that lane's input (or output) position
// is inside the plane. The items [begin, end) are the output planes n * rows + r.
using ConvPlanes = void (*)(const int64_t* ptr, const int64_t* off, const int32_t* tap,
                            const float* val, const float* x, int64_t image, int64_t rows,
                            int64_t hw, const uint32_t* bits, int64_t taps, const float* bias,
                            float* y, int64_t begin, int64_t end);
// Its weight gradient at the kept entries, rows [r_begin, r_end) of g (rows, cols), zeros
// elsewhere, from dy (N, rows, H, W) and x.
using SampledConvPlanes = void (*)(const int64_t* ptr, const int32_t* idx, const int64_t* off,
                                   const int32_t* tap, const float* dy, const float* x, int64_t N,
                                   int64_t image, int64_t rows, int64_t hw, const uint32_t* bits,
                                   int64_t taps, int64_t cols, float* g, int64_t r_begin,
                                   int64_t r_end);

// What the convolution kernels need besides the index, for planes of H x W: each kept weight's
// offset and tap (from its column idx[k] = c * kh * kw + t), and the lane masks (bits) of
// every tap's shifted plane and of the plane itself, for vectors of `lanes` floats.
struct ConvGeometry {
  std::vector<int64_t> off;
  std::vector<int32_t> tap;
  std::vector<uint32_t> bits;
};
ConvGeometry conv_geometry(const int32_t* idx, int64_t nnz, int64_t H, int64_t W, int64_t kh,
                           int64_t kw, int64_t lanes);

// xt (cols, B) = x (B, cols; rows ld_x floats apart) transposed, for the columns
// [c_begin, c_end); with sums, also the sum over the batch of each of those columns.
using BatchMajor = void (*)(const float* x, int64_t ld_x, int64_t B, float* xt, float* sums,
                            int64_t c_begin, int64_t c_end);

struct Kernels {
  const char* isa;
  SpmmRows spmm_rows;
  SddmmRows sddmm_rows;
  int64_t lanes;
  ConvPlanes conv_planes;
  SampledConvPlanes sampled_conv_planes;
  BatchMajor batch_major;
};

// The kernels for the instruction set `isa` ("avx512", "avx2", "scalar"), or for the best one
// this CPU has (`isa` null or "auto"). Null if that set is not built or not supported here.
const Kernels* kernels(const char* isa = nullptr);

}  // namespace sparse
}  // namespace dpf
