// CUDA kernels of the dpf ops: raw pointers and sizes only, no torch headers, so that nvcc
// compiles (and CI compile-checks) them on any machine. ops.cpp wraps them for torch.
//
// Many tensors go into one launch through a tensor table in device memory: an array of
// data pointers and the running count of CHUNK-element chunks per tensor (count + 1
// entries). A block finds the tensor of a chunk by binary search in that array.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dpf_math.h"

namespace dpf {
namespace cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// Elements per chunk: a chunk never spans two tensors.
constexpr int64_t kChunk = 4096;

// What the launchers need to know of the GPU; the caller queries it once per device.
struct DeviceInfo {
  int num_sms;           // streaming multiprocessors
  int max_shared_optin;  // bytes of dynamic shared memory a block may opt in to
};

// Where a block counts the 32768-bin histogram, chosen from DeviceInfo::max_shared_optin:
// 32-bit counters in 128 KiB of shared memory (sm_80, sm_90), 16-bit counters in 64 KiB
// flushed before they can overflow (sm_75, sm_86/89/120: 64-99 KiB), or straight into the
// global histogram (any GPU; the fallback under 64 KiB).
enum class Bins : int { kShared32 = 0, kShared16 = 1, kGlobal = 2 };
Bins bins_for(const DeviceInfo& dev);

struct Table {
  const void* const* data;       // device array: element pointer per tensor
  const int64_t* numel;          // device array: elements per tensor
  const int64_t* chunk_start;    // device array: first chunk per tensor, count + 1 entries
  int count;                     // tensors
  int64_t chunks;                // chunk_start[count], known on the host
};

// The channel floor's per-row keys (dpf_math.h's row_key) of every tensor of a table:
// device arrays of the row_max pointer and the row length per tensor. `max` null: none.
struct Rows {
  long long* const* max;
  const int64_t* length;
};

// The second pass's histograms of `width` consecutive finite high bins from the device
// value *start, counted in the first pass (counts: width * 65536, null for none).
struct Window {
  unsigned long long* counts;
  const int64_t* start;
  int width;
};

// hist (int64, 32768 bins) += top-16-bit histogram of |w| over the table, each row's
// largest key into rows.max and the window's low bins, the histogram then summarised
// around the window (the finite elements under it in bin *start - 1, those over it in bin
// *start + width; *start + width <= 0x7F80); or, with a non-null device pointer
// `prefix`, hist (65536 bins) += low-16-bit histogram of the elements whose top 16 bits
// equal *prefix. No host synchronisation.
cudaError_t magnitude_histogram(const Table& weights, DType dtype, const int64_t* prefix,
                                unsigned long long* hist, Rows rows, const DeviceInfo& dev,
                                cudaStream_t stream, Window window = {nullptr, nullptr, 0});

// For every tensor t of the table, with k = index[t] its position in the caller's list:
// mask = |w| >= taus[k] (and the old mask if shrink_only), or the element is the one its
// row's key in rows.max names; stats[2k] += kept, stats[2k + 1] += reactivated. `masks` is
// a device array of bool*.
cudaError_t update_masks(const Table& weights, DType dtype, bool* const* masks, const float* taus,
                         const int64_t* index, bool shrink_only, Rows rows,
                         unsigned long long* stats, cudaStream_t stream);

// N:M masks. The table counts groups of m consecutive elements (numel and chunk_start in
// groups): each group keeps its n largest magnitudes (dpf_math.h's nm_keep); for tensor t
// at position k = index[t], stats[3k..3k+2] += kept, reactivated, non-finite.
cudaError_t nm_masks(const Table& groups, DType dtype, bool* const* masks, const int64_t* index, int n,
                     int m, unsigned long long* stats, cudaStream_t stream);

// out = w * mask over n elements.
cudaError_t masked_weight(const void* w, const bool* mask, void* out, int64_t n, DType dtype,
                          cudaStream_t stream);

// One fused SGD step over the table of params (see dpf_math.h's sgd_update). Device arrays
// of per-tensor pointers: grads, bufs (null when momentum == 0), fresh flags (non-zero: the
// buffer is not initialised yet; null likewise), masks and outs (null unless the masked
// copy is wanted). hist (int64, 32768 bins, may be null) accumulates the histogram of the
// new |p|, and with hist only, rows.max each row's largest key and the window its low bins
// (as magnitude_histogram).
cudaError_t sgd_step(const Table& params, DType dtype, const void* const* grads,
                     void* const* bufs, const int64_t* fresh, const bool* const* masks,
                     void* const* outs, const SgdParams& hp, unsigned long long* hist,
                     Rows rows, const DeviceInfo& dev, cudaStream_t stream,
                     Window window = {nullptr, nullptr, 0});

// One fused AdamW step over the table of params (see dpf_math.h's adamw_update). Device
// arrays of per-tensor pointers: grads, exp_avgs, exp_avg_sqs and max_exp_avg_sqs (null
// without amsgrad). hist, rows and window as in sgd_step.
cudaError_t adamw_step(const Table& params, DType dtype, const void* const* grads,
                       void* const* exp_avgs, void* const* exp_avg_sqs, void* const* max_exp_avg_sqs,
                       const AdamwParams& hp, unsigned long long* hist, Rows rows,
                       const DeviceInfo& dev, cudaStream_t stream, Window window = {nullptr, nullptr, 0});

// The sparse products (see csrc/cpu/sparse_kernels.h for the layouts): y (B, rows) = bias +
// the CSR matrix (ptr int64, idx int32, val) times xt (cols, B); bias may be null.
cudaError_t sparse_mm(const int64_t* ptr, const int32_t* idx, const float* val, const float* xt,
                      int64_t B, const float* bias, float* y, int64_t rows, cudaStream_t stream);

// g (rows, cols): at the CSR's kept (r, c), the dot product over the batch of dyt[r] (rows, B)
// and xt[c] (cols, B); 0 elsewhere.
cudaError_t sampled_mm(const int64_t* ptr, const int32_t* idx, const float* dyt, const float* xt,
                       int64_t B, int64_t rows, int64_t cols, float* g, cudaStream_t stream);

// values (nnz): the same dot products at the kept entries only, in the index's order.
cudaError_t sampled_values(const int64_t* ptr, const int32_t* idx, const float* dyt,
                           const float* xt, int64_t B, int64_t rows, int64_t nnz, float* values,
                           cudaStream_t stream);

// The direct sparse convolution (stride 1, "same" padding, odd kh and kw): y (N, rows, H, W) =
// bias + the kept weights (CSR by output channel over the columns c * kh * kw + i * kw + j)
// convolved with x (N, C, H, W); bias may be null.
cudaError_t sparse_conv(const int64_t* ptr, const int32_t* idx, const float* val, const float* x,
                        int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                        const float* bias, float* y, int64_t rows, cudaStream_t stream);

// g (rows, C * kh * kw): its weight gradient at the kept entries from dy (N, rows, H, W), 0
// elsewhere.
cudaError_t sampled_conv(const int64_t* ptr, const int32_t* idx, const float* dy, const float* x,
                         int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                         int64_t rows, float* g, cudaStream_t stream);

}  // namespace cuda
}  // namespace dpf
