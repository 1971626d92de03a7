// The CUDA runtime, as csrc/cuda/kernels.cu uses it, on the CPU: HIP-CPU (third_party/)
// runs the kernels; this header, first on the include path in place of CUDA's own, maps
// the runtime names and adds what HIP-CPU lacks or gets wrong for these kernels:
//
// - launches checked as a GPU checks them (block size, grid size, dynamic shared memory
//   against 48 KiB or the kernel's opt-in, the opt-in against the emulated GPU's limit),
//   failing with the error a GPU returns instead of running;
// - cudaFuncSetAttribute;
// - 32-lane warp shuffles whose barrier covers the calling warp only (HIP-CPU's are
//   64-lane and synchronise the whole block, which breaks shuffles under `if (warp == 0)`);
// - a 16-byte-aligned uint4 (HIP-CPU's is 4-byte aligned and would hide misaligned vector
//   loads);
// - dynamic shared memory filled with a poison pattern before each block, so that reading
//   counters nobody zeroed shows.
//
// emulate.py rewrites `k<<<...>>>(...)` and `extern __shared__` for g++; the test driver
// sets the emulated GPU's limits (dpf_emu::device()).
#pragma once

#include <hip/hip_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

// HIP-CPU marks kernels and device functions for OpenMP SIMD clones, which g++ cannot make
// for struct arguments (a warning per kernel); they are plain functions here.
#undef __global__
#define __global__
#undef __device__
#define __device__

using cudaError_t = hipError_t;
using cudaStream_t = hipStream_t;
constexpr cudaError_t cudaSuccess = hipSuccess;
constexpr cudaError_t cudaErrorInvalidValue = hipErrorInvalidValue;
constexpr cudaError_t cudaErrorInvalidConfiguration = hipErrorInvalidConfiguration;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace dpf_emu {

// The emulated GPU's limits; the driver sets them per GPU class.
struct Device {
  std::size_t shared_default = 48 * 1024;  // dynamic shared memory without opt-in
  std::size_t shared_optin = 227 * 1024;   // the most a kernel may opt in to
  unsigned max_threads = 1024;             // per block
};

inline Device& device() {
  static Device d;
  return d;
}

inline std::mutex& lock() {
  static std::mutex m;
  return m;
}

// Dynamic shared memory each kernel has opted in to (cudaFuncSetAttribute).
inline std::map<const void*, std::size_t>& opted_in() {
  static std::map<const void*, std::size_t> m;
  return m;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

inline unsigned& launches() {
  static unsigned n = 0;
  return n;
}

// Launch `kernel` as CUDA would: refused (last error set, nothing run) where a GPU with
// device()'s limits refuses it.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
            A&&... args) {
  std::size_t allowed;
  {
    const std::lock_guard<std::mutex> guard(lock());
    const auto it = opted_in().find(reinterpret_cast<const void*>(kernel));
    allowed = it == opted_in().end() ? device().shared_default : it->second;
    ++launches();
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > device().max_threads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > allowed) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  hipLaunchKernelGGL(kernel, grid, block, static_cast<std::uint32_t>(smem), stream, P(std::forward<A>(args))...);
}

// Fill the block's dynamic shared memory with a poison pattern; the first thread of a block
// runs first, before any other thread of the block has touched it.
template <typename T>
void poison_shared(T* p) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    const auto bytes = scratchpad_size(domain(::hip::detail::Tile::this_tile()));
    if (bytes) std::memset(static_cast<void*>(p), 0xA5, bytes);
  }
}

// The same for a fixed-size __shared__ array, each time its declaration is reached (the
// kernels declare them where every earlier use is complete).
template <typename T, std::size_t N>
void poison_static_shared(T (&a)[N]) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0)
    std::memset(static_cast<void*>(a), 0xA5, sizeof(a));
}

// A barrier over the calling warp (32 consecutive threads) only: the fibers of the warp
// pass control around their ring once.
inline void warp_barrier() {
  using ::hip::detail::Fiber;
  using ::hip::detail::Tile;
  const std::uint32_t n = count(Tile::this_tile().dimensions());
  if (n == 1) return;
  ::hip::detail::this_tile::has_barrier = true;
  const std::uint32_t f = id(Fiber::this_fiber());
  const std::uint32_t base = f / 32 * 32;
  const std::uint32_t width = n - base < 32 ? n - base : 32;
  Fiber::yield(Tile::fibers()[base + (f - base + 1) % width]);
}

// Values exchanged by a warp's shuffle, one slot per thread of the block.
inline std::uint64_t* shuffle_slots() {
  thread_local std::uint64_t slots[1024];
  return slots;
}

}  // namespace dpf_emu

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      std::size_t(value) > dpf_emu::device().shared_optin)
    return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> guard(dpf_emu::lock());
  dpf_emu::opted_in()[reinterpret_cast<const void*>(kernel)] = std::size_t(value);
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = dpf_emu::last_error();
  dpf_emu::last_error() = cudaSuccess;
  return e;
}

inline cudaError_t cudaDeviceSynchronize() { return hipDeviceSynchronize(); }

inline const char* cudaGetErrorString(cudaError_t e) { return hipGetErrorString(e); }

// __shfl_down_sync with CUDA's 32-lane warps (the mask must name the whole warp, as every
// use in the kernels does).
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  (void)mask;
  const std::uint32_t f = id(::hip::detail::Fiber::this_fiber());
  const std::uint32_t lane = f % 32;
  std::uint64_t* slots = dpf_emu::shuffle_slots();
  std::memcpy(&slots[f], &v, sizeof(T));
  dpf_emu::warp_barrier();
  const std::uint32_t src = lane % width + delta;
  T r = v;
  if (src < std::uint32_t(width)) std::memcpy(&r, &slots[f - lane % width + src], sizeof(T));
  dpf_emu::warp_barrier();
  return r;
}

// CUDA's uint4: 16-byte aligned, so that a misaligned vector access is misaligned here too.
struct alignas(16) dpf_emu_uint4 {
  unsigned int x, y, z, w;
};
#define uint4 dpf_emu_uint4
