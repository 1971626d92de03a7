// CUDA kernels of the dpf ops (declared in kernels.h). Element-wise math from dpf_math.h.
#include "kernels.h"

#include <type_traits>

namespace dpf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kHistThreads = 1024;
// 16-bit counters take at most kChunk increments per chunk: flushed every this many chunks
// they stay below 2^16.
constexpr int kChunksPerFlush16 = 65535 / kChunk;

// The tensor holding chunk c: the last t with chunk_start[t] <= c.
__device__ __forceinline__ int find_tensor(const Table& tab, int64_t c) {
  int lo = 0, hi = tab.count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tab.chunk_start[mid] <= c) lo = mid; else hi = mid;
  }
  return lo;
}

struct Span {
  int t;
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ Span chunk_span(const Table& tab, int64_t c) {
  const int t = find_tensor(tab, c);
  const int64_t begin = (c - tab.chunk_start[t]) * kChunk;
  const int64_t end = begin + kChunk < tab.numel[t] ? begin + kChunk : tab.numel[t];
  return {t, begin, end};
}

// Sum of v over the block, valid in thread 0.
__device__ __forceinline__ unsigned long long block_sum(unsigned long long v) {
  __shared__ unsigned long long warp_sums[32];
  __syncthreads();  // warp_sums may still be read by a previous call
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x >> 5) ? warp_sums[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// 32-bit words of shared memory a block's histogram takes in the layout B.
template <Bins B>
constexpr int kSharedWords = B == Bins::kShared32 ? kHighBins : B == Bins::kShared16 ? kHighBins / 2 : 0;

// A block's histogram in the layout B (see Bins): `bins` is the dynamic shared memory
// (unused for kGlobal), `hist` the global histogram it is merged into.
template <Bins B>
struct BlockHistogram {
  unsigned int* bins;
  unsigned long long* hist;
  int chunks = 0;  // chunks counted since the last flush (kShared16)

  __device__ __forceinline__ void zero() {
    if constexpr (B != Bins::kGlobal) {
      for (int i = threadIdx.x; i < kSharedWords<B>; i += blockDim.x) bins[i] = 0;
      __syncthreads();
    }
  }

  __device__ __forceinline__ void add(uint32_t bin) {
    if constexpr (B == Bins::kShared32)
      atomicAdd(&bins[bin], 1u);
    else if constexpr (B == Bins::kShared16)
      atomicAdd(&bins[bin >> 1], 1u << ((bin & 1u) * 16));
    else
      atomicAdd(&hist[bin], 1ull);
  }

  // Adds the block's counts to `hist`; `reset` zeroes them for more counting.
  __device__ __forceinline__ void flush(bool reset) {
    if constexpr (B != Bins::kGlobal) {
      __syncthreads();
      for (int i = threadIdx.x; i < kSharedWords<B>; i += blockDim.x) {
        const unsigned int w = bins[i];
        if constexpr (B == Bins::kShared32) {
          if (w) atomicAdd(&hist[i], static_cast<unsigned long long>(w));
        } else {
          if (w & 0xFFFFu) atomicAdd(&hist[2 * i], static_cast<unsigned long long>(w & 0xFFFFu));
          if (w >> 16) atomicAdd(&hist[2 * i + 1], static_cast<unsigned long long>(w >> 16));
        }
        if (reset) bins[i] = 0;
      }
      if (reset) __syncthreads();
    }
  }

  // Called after each chunk (block-uniformly): keeps 16-bit counters from overflowing.
  __device__ __forceinline__ void chunk_done() {
    if constexpr (B == Bins::kShared16) {
      if (++chunks == kChunksPerFlush16) {
        chunks = 0;
        flush(true);
      }
    }
  }
};

// row_max[row of i] = max(it, row_key of element i). The plain read first skips the atomic
// for all but the few elements that raise a row's maximum.
__device__ __forceinline__ void max_row(const Rows& rows, int t, int64_t i, uint32_t mag) {
  const int64_t len = rows.length[t];
  const int64_t row = i / len;
  const long long key = row_key(mag, i - row * len);
  long long* slot = rows.max[t] + row;
  if (key > *reinterpret_cast<volatile long long*>(slot)) atomicMax(slot, key);
}

// The first pass of a block: the histogram of the elements' high bins in the layout B,
// each row's largest key into rows.max (if not null) and, with a window, its low bins and
// the histogram summarised around it (as the CPU's histogram_high): each thread counts the
// finite elements under and over the window in two registers, summed once per block.
template <Bins B>
struct FirstPass {
  BlockHistogram<B> h;
  Rows rows;
  Window win;
  int64_t win_start = 0;
  unsigned long long below = 0, above = 0;

  // Called once by every thread of the block before counting.
  __device__ __forceinline__ void begin() {
    if (win.counts) win_start = *win.start;
    h.zero();
  }

  // Element i of tensor t, of magnitude bits mag.
  __device__ __forceinline__ void add(int t, int64_t i, uint32_t mag) {
    if (rows.max) max_row(rows, t, i, mag);
    if (win.counts) {
      const int64_t slot = static_cast<int64_t>(high_bin(mag)) - win_start;
      const bool finite = mag < 0x7F800000u;
      if (finite && slot < 0) {
        ++below;
        return;
      }
      if (finite && slot >= win.width) {
        ++above;
        return;
      }
      if (slot >= 0 && slot < win.width) atomicAdd(&win.counts[slot * kLowBins + low_bin(mag)], 1ull);
    }
    h.add(high_bin(mag));
  }

  __device__ __forceinline__ void chunk_done() { h.chunk_done(); }

  // Called once by every thread of the block after counting.
  __device__ __forceinline__ void end() {
    h.flush(false);
    if (win.counts) {
      const unsigned long long under = block_sum(below), over = block_sum(above);
      if (threadIdx.x == 0 && under) atomicAdd(&h.hist[win_start - 1], under);
      if (threadIdx.x == 0 && over) atomicAdd(&h.hist[win_start + win.width], over);
    }
  }
};

// Pass 1: block-local histograms (in shared memory unless B is kGlobal), merged once per
// block.
template <typename T, Bins B>
__global__ void histogram_high_kernel(Table tab, Rows rows, unsigned long long* hist, Window win) {
  extern __shared__ unsigned int bins[];
  FirstPass<B> first{{bins, hist}, rows, win};
  first.begin();
  for (int64_t c = blockIdx.x; c < tab.chunks; c += gridDim.x) {
    const Span s = chunk_span(tab, c);
    const T* w = static_cast<const T*>(tab.data[s.t]);
    for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) first.add(s.t, i, magnitude_bits(w[i]));
    first.chunk_done();
  }
  first.end();
}

// Pass 2: only the elements of one high bin count, straight into global memory.
template <typename T>
__global__ void histogram_low_kernel(Table tab, const int64_t* prefix, unsigned long long* hist) {
  const uint32_t pre = static_cast<uint32_t>(*prefix);
  for (int64_t c = blockIdx.x; c < tab.chunks; c += gridDim.x) {
    const Span s = chunk_span(tab, c);
    const T* w = static_cast<const T*>(tab.data[s.t]);
    for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
      const uint32_t mag = magnitude_bits(w[i]);
      if (high_bin(mag) == pre) atomicAdd(&hist[low_bin(mag)], 1ull);
    }
  }
}

template <typename T>
__global__ void update_masks_kernel(Table tab, bool* const* masks, const float* taus,
                                    const int64_t* index, bool shrink_only, Rows rows,
                                    unsigned long long* stats) {
  const Span s = chunk_span(tab, blockIdx.x);
  const T* w = static_cast<const T*>(tab.data[s.t]);
  bool* m = masks[s.t];
  const int64_t k = index[s.t];
  const uint32_t tau = threshold_bits(taus[k]);
  const int64_t len = rows.max ? rows.length[s.t] : 1;
  unsigned long long kept = 0, back = 0;
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const bool old = m[i];
    bool now = keep(magnitude_bits(w[i]), tau) && (old || !shrink_only);
    if (rows.max) {
      const int64_t row = i / len;
      now = now || key_column(rows.max[s.t][row]) == i - row * len;
    }
    m[i] = now;
    kept += now;
    back += now && !old;
  }
  kept = block_sum(kept);
  back = block_sum(back);
  if (threadIdx.x == 0) {
    atomicAdd(&stats[2 * k], kept);
    atomicAdd(&stats[2 * k + 1], back);
  }
}

template <typename T>
__global__ void nm_masks_kernel(Table tab, bool* const* masks, const int64_t* index, int n, int m,
                                unsigned long long* stats) {
  const Span s = chunk_span(tab, blockIdx.x);
  const T* w = static_cast<const T*>(tab.data[s.t]);
  bool* mk = masks[s.t];
  const int64_t k = index[s.t];
  unsigned long long kept = 0, back = 0, bad = 0;
  for (int64_t g = s.begin + threadIdx.x; g < s.end; g += blockDim.x)
    nm_group(w + g * m, mk + g * m, n, m, kept, back, bad);
  kept = block_sum(kept);
  back = block_sum(back);
  bad = block_sum(bad);
  if (threadIdx.x == 0) {
    atomicAdd(&stats[3 * k], kept);
    atomicAdd(&stats[3 * k + 1], back);
    atomicAdd(&stats[3 * k + 2], bad);
  }
}

template <typename T>
__global__ void masked_weight_kernel(const T* w, const bool* mask, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(to_float(w[i]) * float(mask[i]));
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The fused SGD step. A thread updates V = 16 / sizeof(T) consecutive elements with 16-byte
// loads and stores of p, g and buf where the tensor's pointers allow it, else one at a time.
// With HIST, the histogram of the new |p| is counted in the layout B.
template <typename T, bool HIST, Bins B>
__global__ void sgd_kernel(Table tab, const void* const* grads, void* const* bufs,
                           const int64_t* fresh, const bool* const* masks, void* const* outs,
                           SgdParams hp, unsigned long long* hist, Rows rows, Window win) {
  extern __shared__ unsigned int bins[];
  FirstPass<B> first{{bins, hist}, rows, win};
  if (HIST) first.begin();
  constexpr int V = 16 / sizeof(T);
  for (int64_t c = blockIdx.x; c < tab.chunks; c += gridDim.x) {
    const Span s = chunk_span(tab, c);
    T* p = static_cast<T*>(const_cast<void*>(tab.data[s.t]));
    const T* g = static_cast<const T*>(grads[s.t]);
    T* b = bufs ? static_cast<T*>(bufs[s.t]) : nullptr;
    const bool is_fresh = fresh && fresh[s.t] != 0;
    const bool* m = masks ? masks[s.t] : nullptr;
    T* o = outs ? static_cast<T*>(outs[s.t]) : nullptr;

    auto update = [&](int64_t i, T& pi, T gi, T* bi) {
      float bf = (bi && !is_fresh) ? to_float(*bi) : 0.f;
      pi = from_float<T>(sgd_update(to_float(pi), to_float(gi), bf, is_fresh, hp));
      if (bi) *bi = from_float<T>(bf);
      if (o) o[i] = from_float<T>(to_float(pi) * float(m[i]));
      if (HIST) first.add(s.t, i, magnitude_bits(pi));
    };

    int64_t tail = s.begin;
    if (aligned16(p) && aligned16(g) && (!b || aligned16(b))) {
      const int64_t vectors = (s.end - s.begin) / V;
      for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
        const int64_t i = s.begin + v * V;
        uint4 pv = *reinterpret_cast<const uint4*>(p + i);
        const uint4 gv = *reinterpret_cast<const uint4*>(g + i);
        uint4 bv = b ? *reinterpret_cast<const uint4*>(b + i) : uint4{0, 0, 0, 0};
        T* pe = reinterpret_cast<T*>(&pv);
        const T* ge = reinterpret_cast<const T*>(&gv);
        T* be = reinterpret_cast<T*>(&bv);
#pragma unroll
        for (int j = 0; j < V; ++j) update(i + j, pe[j], ge[j], b ? be + j : nullptr);
        *reinterpret_cast<uint4*>(p + i) = pv;
        if (b) *reinterpret_cast<uint4*>(b + i) = bv;
      }
      tail = s.begin + vectors * V;
    }
    for (int64_t i = tail + threadIdx.x; i < s.end; i += blockDim.x)
      update(i, p[i], g[i], b ? b + i : nullptr);
    if (HIST) first.chunk_done();
  }
  if (HIST) first.end();
}

// The fused AdamW step, one element per thread and iteration. With HIST, the histogram of
// the new |p| is counted in the layout B.
template <typename T, bool HIST, Bins B>
__global__ void adamw_kernel(Table tab, const void* const* grads, void* const* exp_avgs,
                             void* const* exp_avg_sqs, void* const* max_exp_avg_sqs, AdamwParams hp,
                             unsigned long long* hist, Rows rows, Window win) {
  extern __shared__ unsigned int bins[];
  FirstPass<B> first{{bins, hist}, rows, win};
  if (HIST) first.begin();
  for (int64_t c = blockIdx.x; c < tab.chunks; c += gridDim.x) {
    const Span s = chunk_span(tab, c);
    T* p = static_cast<T*>(const_cast<void*>(tab.data[s.t]));
    const T* g = static_cast<const T*>(grads[s.t]);
    T* m = static_cast<T*>(exp_avgs[s.t]);
    T* v = static_cast<T*>(exp_avg_sqs[s.t]);
    T* vmax = hp.amsgrad ? static_cast<T*>(max_exp_avg_sqs[s.t]) : nullptr;
    for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
      const T np = adamw_element(p, g, m, v, vmax, i, hp);
      if (HIST) first.add(s.t, i, magnitude_bits(np));
    }
    if (HIST) first.chunk_done();
  }
  if (HIST) first.end();
}

// One thread per (batch lane, output row): threads along x take consecutive batch lanes, so
// each kept weight's row of xt is read coalesced; rows stride over the grid's y dimension.
__global__ void sparse_mm_kernel(const int64_t* ptr, const int32_t* idx, const float* val,
                                 const float* xt, int64_t B, const float* bias, float* y,
                                 int64_t rows) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += int64_t(gridDim.y) * blockDim.y) {
    float acc = bias ? bias[r] : 0.0f;
    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) acc += val[k] * xt[int64_t(idx[k]) * B + b];
    y[b * rows + r] = acc;
  }
}

// One block per output row (striding over rows): the row of g is zeroed, then each thread
// computes the batch dot products of some of the row's kept weights.
__global__ void sampled_mm_kernel(const int64_t* ptr, const int32_t* idx, const float* dyt,
                                  const float* xt, int64_t B, int64_t rows, int64_t cols,
                                  float* g) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* row = g + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) row[c] = 0.0f;
    __syncthreads();  // the zeros before the kept entries
    const float* dy = dyt + r * B;
    for (int64_t k = ptr[r] + threadIdx.x; k < ptr[r + 1]; k += blockDim.x) {
      const float* x = xt + int64_t(idx[k]) * B;
      float acc = 0.0f;
      for (int64_t j = 0; j < B; ++j) acc += dy[j] * x[j];
      row[idx[k]] = acc;
    }
    __syncthreads();  // the row done before the block's threads move on
  }
}

// One thread per kept weight: its batch dot product, written at its place in the index's order.
__global__ void sampled_values_kernel(const int64_t* ptr, const int32_t* idx, const float* dyt,
                                      const float* xt, int64_t B, int64_t rows, float* values) {
  const int64_t nnz = ptr[rows];
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < nnz;
       k += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = rows;  // the row of entry k: the last r with ptr[r] <= k
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (ptr[mid] <= k) lo = mid; else hi = mid;
    }
    const float* dy = dyt + lo * B;
    const float* x = xt + int64_t(idx[k]) * B;
    float sum = 0.0f;
    for (int64_t b = 0; b < B; ++b) sum += dy[b] * x[b];
    values[k] = sum;
  }
}

// The direct sparse convolution (stride 1, "same" padding; see csrc/cpu/sparse_kernels.h):
// one thread per output element of y (N, rows, H, W), consecutive threads on consecutive
// positions of a plane, so that each kept weight's shifted plane is read coalesced.
__global__ void sparse_conv_kernel(const int64_t* ptr, const int32_t* idx, const float* val,
                                   const float* x, int64_t N, int64_t C, int64_t H, int64_t W,
                                   int64_t kh, int64_t kw, const float* bias, float* y,
                                   int64_t rows) {
  const int64_t hw = H * W, taps = kh * kw, total = N * rows * hw;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / (rows * hw), r = i / hw % rows, h = i % hw / W, w = i % W;
    float acc = bias != nullptr ? bias[r] : 0.0f;
    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
      const int64_t c = idx[k] / taps, t = idx[k] % taps;
      const int64_t ih = h + t / kw - kh / 2, iw = w + t % kw - kw / 2;
      if (ih >= 0 && ih < H && iw >= 0 && iw < W) acc += val[k] * x[((n * C + c) * H + ih) * W + iw];
    }
    y[i] = acc;
  }
}

// Its weight gradient at the kept entries: one block per output channel (striding over
// them), the row of g zeroed, then each thread sums the products over the images and
// positions for some of the row's kept weights.
__global__ void sampled_conv_kernel(const int64_t* ptr, const int32_t* idx, const float* dy,
                                    const float* x, int64_t N, int64_t C, int64_t H, int64_t W,
                                    int64_t kh, int64_t kw, int64_t rows, float* g) {
  const int64_t taps = kh * kw, cols = C * taps;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* row = g + r * cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) row[j] = 0.0f;
    __syncthreads();  // the zeros before the kept entries
    for (int64_t k = ptr[r] + threadIdx.x; k < ptr[r + 1]; k += blockDim.x) {
      const int64_t c = idx[k] / taps, t = idx[k] % taps;
      const int64_t di = t / kw - kh / 2, dj = t % kw - kw / 2;
      float acc = 0.0f;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h) {
          if (h + di < 0 || h + di >= H) continue;
          for (int64_t w = 0; w < W; ++w)
            if (w + dj >= 0 && w + dj < W)
              acc += dy[((n * rows + r) * H + h) * W + w] * x[((n * C + c) * H + h + di) * W + w + dj];
        }
      row[idx[k]] = acc;
    }
    __syncthreads();  // the row done before the block's threads move on
  }
}

int grid_for(int64_t chunks, int cap) {
  return static_cast<int>(chunks < cap ? chunks : cap);
}

// fn(T{}) with T the storage type of dtype.
template <typename F>
cudaError_t with_dtype(DType dtype, const F& fn) {
  switch (dtype) {
    case DType::kFloat:
      return fn(float{});
    case DType::kHalf:
      return fn(Half{});
    case DType::kBFloat16:
      return fn(BFloat16{});
  }
  return cudaErrorInvalidValue;
}

size_t shared_bytes(Bins b) {
  return sizeof(unsigned int) * (b == Bins::kShared32   ? kSharedWords<Bins::kShared32>
                                 : b == Bins::kShared16 ? kSharedWords<Bins::kShared16>
                                                        : 0);
}

// Opts `kernel` in to the shared memory of layout b (once per kernel and process).
template <typename K>
cudaError_t allow_shared(K kernel, Bins b) {
  if (shared_bytes(b) <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(shared_bytes(b)));
}

// fn(std::integral_constant<Bins, b>{}) for the runtime layout b.
template <typename F>
cudaError_t with_bins(Bins b, const F& fn) {
  switch (b) {
    case Bins::kShared32:
      return fn(std::integral_constant<Bins, Bins::kShared32>{});
    case Bins::kShared16:
      return fn(std::integral_constant<Bins, Bins::kShared16>{});
    case Bins::kGlobal:
      return fn(std::integral_constant<Bins, Bins::kGlobal>{});
  }
  return cudaErrorInvalidValue;
}

// Blocks for a histogram pass: one per SM with shared-memory bins (each needs most of an
// SM's shared memory), more with global bins.
int hist_grid(int64_t chunks, const DeviceInfo& dev, Bins b) {
  return grid_for(chunks, b == Bins::kGlobal ? dev.num_sms * 8 : dev.num_sms);
}

}  // namespace

Bins bins_for(const DeviceInfo& dev) {
  if (dev.max_shared_optin >= int(shared_bytes(Bins::kShared32))) return Bins::kShared32;
  if (dev.max_shared_optin >= int(shared_bytes(Bins::kShared16))) return Bins::kShared16;
  return Bins::kGlobal;
}

cudaError_t magnitude_histogram(const Table& tab, DType dtype, const int64_t* prefix,
                                unsigned long long* hist, Rows rows, const DeviceInfo& dev,
                                cudaStream_t stream, Window window) {
  if (tab.chunks == 0) return cudaSuccess;
  const Bins b = bins_for(dev);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (prefix) {
      histogram_low_kernel<T><<<grid_for(tab.chunks, dev.num_sms * 8), kThreads, 0, stream>>>(tab, prefix, hist);
      return cudaGetLastError();
    }
    return with_bins(b, [&](auto layout) {
      constexpr Bins B = decltype(layout)::value;
      cudaError_t err = allow_shared(histogram_high_kernel<T, B>, B);
      if (err != cudaSuccess) return err;
      histogram_high_kernel<T, B><<<hist_grid(tab.chunks, dev, B), kHistThreads, shared_bytes(B), stream>>>(
          tab, rows, hist, window);
      return cudaGetLastError();
    });
  });
}

cudaError_t update_masks(const Table& tab, DType dtype, bool* const* masks, const float* taus,
                         const int64_t* index, bool shrink_only, Rows rows,
                         unsigned long long* stats, cudaStream_t stream) {
  if (tab.chunks == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    update_masks_kernel<T><<<static_cast<unsigned>(tab.chunks), kThreads, 0, stream>>>(
        tab, masks, taus, index, shrink_only, rows, stats);
    return cudaGetLastError();
  });
}

cudaError_t nm_masks(const Table& tab, DType dtype, bool* const* masks, const int64_t* index, int n,
                     int m, unsigned long long* stats, cudaStream_t stream) {
  if (tab.chunks == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    nm_masks_kernel<T><<<static_cast<unsigned>(tab.chunks), kThreads, 0, stream>>>(tab, masks, index, n, m, stats);
    return cudaGetLastError();
  });
}

cudaError_t masked_weight(const void* w, const bool* mask, void* out, int64_t n, DType dtype,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    masked_weight_kernel<T><<<grid_for(blocks, 65535), kThreads, 0, stream>>>(
        static_cast<const T*>(w), mask, static_cast<T*>(out), n);
    return cudaGetLastError();
  });
}

cudaError_t sgd_step(const Table& tab, DType dtype, const void* const* grads, void* const* bufs,
                     const int64_t* fresh, const bool* const* masks, void* const* outs,
                     const SgdParams& hp, unsigned long long* hist, Rows rows,
                     const DeviceInfo& dev, cudaStream_t stream, Window window) {
  if (tab.chunks == 0) return cudaSuccess;
  const Bins b = bins_for(dev);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!hist) {
      sgd_kernel<T, false, Bins::kGlobal><<<grid_for(tab.chunks, dev.num_sms * 8), kThreads, 0, stream>>>(
          tab, grads, bufs, fresh, masks, outs, hp, nullptr, Rows{nullptr, nullptr}, Window{nullptr, nullptr, 0});
      return cudaGetLastError();
    }
    return with_bins(b, [&](auto layout) {
      constexpr Bins B = decltype(layout)::value;
      cudaError_t err = allow_shared(sgd_kernel<T, true, B>, B);
      if (err != cudaSuccess) return err;
      sgd_kernel<T, true, B><<<hist_grid(tab.chunks, dev, B), kHistThreads, shared_bytes(B), stream>>>(
          tab, grads, bufs, fresh, masks, outs, hp, hist, rows, window);
      return cudaGetLastError();
    });
  });
}

cudaError_t adamw_step(const Table& tab, DType dtype, const void* const* grads, void* const* exp_avgs,
                       void* const* exp_avg_sqs, void* const* max_exp_avg_sqs, const AdamwParams& hp,
                       unsigned long long* hist, Rows rows, const DeviceInfo& dev, cudaStream_t stream,
                       Window window) {
  if (tab.chunks == 0) return cudaSuccess;
  const Bins b = bins_for(dev);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!hist) {
      adamw_kernel<T, false, Bins::kGlobal><<<grid_for(tab.chunks, dev.num_sms * 8), kThreads, 0, stream>>>(
          tab, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hp, nullptr, Rows{nullptr, nullptr},
          Window{nullptr, nullptr, 0});
      return cudaGetLastError();
    }
    return with_bins(b, [&](auto layout) {
      constexpr Bins B = decltype(layout)::value;
      cudaError_t err = allow_shared(adamw_kernel<T, true, B>, B);
      if (err != cudaSuccess) return err;
      adamw_kernel<T, true, B><<<hist_grid(tab.chunks, dev, B), kHistThreads, shared_bytes(B), stream>>>(
          tab, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hp, hist, rows, window);
      return cudaGetLastError();
    });
  });
}

cudaError_t sparse_mm(const int64_t* ptr, const int32_t* idx, const float* val, const float* xt,
                      int64_t B, const float* bias, float* y, int64_t rows, cudaStream_t stream) {
  if (B == 0 || rows == 0) return cudaSuccess;
  const dim3 block(32, 8);
  const int64_t row_groups = (rows + block.y - 1) / block.y;
  const dim3 grid(static_cast<unsigned>((B + block.x - 1) / block.x),
                  static_cast<unsigned>(row_groups < 65535 ? row_groups : 65535));
  sparse_mm_kernel<<<grid, block, 0, stream>>>(ptr, idx, val, xt, B, bias, y, rows);
  return cudaGetLastError();
}

cudaError_t sampled_mm(const int64_t* ptr, const int32_t* idx, const float* dyt, const float* xt,
                       int64_t B, int64_t rows, int64_t cols, float* g, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  sampled_mm_kernel<<<grid_for(rows, 65535), 128, 0, stream>>>(ptr, idx, dyt, xt, B, rows, cols, g);
  return cudaGetLastError();
}

cudaError_t sampled_values(const int64_t* ptr, const int32_t* idx, const float* dyt,
                           const float* xt, int64_t B, int64_t rows, int64_t nnz, float* values,
                           cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  sampled_values_kernel<<<grid_for((nnz + 127) / 128, 65535), 128, 0, stream>>>(ptr, idx, dyt, xt, B,
                                                                                rows, values);
  return cudaGetLastError();
}

cudaError_t sparse_conv(const int64_t* ptr, const int32_t* idx, const float* val, const float* x,
                        int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                        const float* bias, float* y, int64_t rows, cudaStream_t stream) {
  const int64_t total = N * rows * H * W;
  if (total == 0) return cudaSuccess;
  sparse_conv_kernel<<<grid_for((total + 255) / 256, 65535), 256, 0, stream>>>(
      ptr, idx, val, x, N, C, H, W, kh, kw, bias, y, rows);
  return cudaGetLastError();
}

cudaError_t sampled_conv(const int64_t* ptr, const int32_t* idx, const float* dy, const float* x,
                         int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                         int64_t rows, float* g, cudaStream_t stream) {
  if (rows == 0 || C * kh * kw == 0) return cudaSuccess;
  sampled_conv_kernel<<<grid_for(rows, 65535), 128, 0, stream>>>(ptr, idx, dy, x, N, C, H, W, kh,
                                                                 kw, rows, g);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dpf
