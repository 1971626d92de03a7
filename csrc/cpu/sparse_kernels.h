// Torch-free kernels of the sparse products (see sparse_simd.inc for the layouts), with the
// instruction set chosen at run time: AVX-512, AVX2 + FMA, or portable scalar code.
#pragma once

#include <cstdint>
#include <vector>

namespace dpf {
namespace sparse {

constexpr int64_t kTileRows = 16;
// batch_major walks this many columns at a time (a thread's chunk is a multiple of it)
constexpr int64_t kBatchMajorCols = 256;

// The product runs over panels of the batch: a panel holds the batch lanes [b0, b0 + w) of
// every input row c of xt (cols, B), P = vb * lanes floats per row (w <= P, zeros beyond w):
// panel[c * P + j] = xt[c * B + b0 + j], contiguous, so that the rows the kept weights read
// share no cache sets by a power-of-two stride and the whole panel stays in L2 while every
// row of the product reads it. pack_panel writes the rows [c_begin, c_end) of one.
using PackPanel = void (*)(const float* xt, int64_t B, int64_t b0, int64_t w, int64_t P,
                           float* panel, int64_t c_begin, int64_t c_end);
// Y[b, r] = bias[r] + sum over the kept (r, c) of val * Xt[c, b], for the batch rows
// [b0, b0 + w) of one panel of vb vectors (a power of two, at most max_panel_vectors) and the
// rows [r_begin, r_end); y is (B, ldy).
using SpmmPanel = void (*)(const int64_t* ptr, const int32_t* idx, const float* val,
                           const float* panel, int64_t vb, const float* bias, float* y,
                           int64_t ldy, int64_t b0, int64_t w, int64_t r_begin, int64_t r_end);
// G[r, :] = 0, then G[r, c] = sum_b dYt[r, b] * Xt[c, b] at the kept (r, c), rows [r_begin, r_end);
// acc: one float per kept weight of those rows (scratch; with g null, the result: the sums in
// the index's order). (Panels of the batch that fit L2
// were measured slower here: each panel costs every kept weight a horizontal sum.)
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
  PackPanel pack_panel;
  SpmmPanel spmm_panel;
  int64_t max_panel_vectors;
  SddmmRows sddmm_rows;
  int64_t lanes;
  ConvPlanes conv_planes;
  SampledConvPlanes sampled_conv_planes;
  BatchMajor batch_major;
};

// This CPU's L1 data (level 1) or L2 (level 2) cache size in bytes, read once (sysconf, else
// /sys/devices/system/cpu/cpu0/cache; 32 KiB and 1 MiB where neither says).
int64_t cache_bytes(int level);

// The panel width, in vectors of k's lanes, of a product over `cols` input rows and a batch
// of B: the widest (up to k->max_panel_vectors) whose panel fits half of L2 and that the
// batch fills; or the width set by set_panel_lanes.
int64_t panel_vectors(const Kernels* k, int64_t cols, int64_t B);

// Fix the panel width at `lanes` floats (rounded down to a power-of-two number of vectors, at
// least one, at most max_panel_vectors), or, with 0, derive it from the cache sizes again;
// a negative `lanes` only asks. Returns the setting before the call (0: derived). For tests
// and measurements.
int64_t set_panel_lanes(int64_t lanes);

// The whole product y (B, rows) = bias + xt (cols, B) times the CSR matrix, one thread, panel
// by panel (the ATen glue runs the same steps with threads).
void spmm(const Kernels* k, const int64_t* ptr, const int32_t* idx, const float* val,
          const float* xt, int64_t B, int64_t cols, const float* bias, float* y, int64_t rows);

// The kernels for the instruction set `isa` ("avx512", "avx2", "scalar"), or for the best one
// this CPU has (`isa` null or "auto"). Null if that set is not built or not supported here.
const Kernels* kernels(const char* isa = nullptr);

}  // namespace sparse
}  // namespace dpf
