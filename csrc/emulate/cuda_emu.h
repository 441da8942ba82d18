// Host emulation of bn_cuda's CUDA kernels (the BN_CUDA_EMULATE=1 build, scripts/emulate.sh).
//
// With this header first, g++ compiles csrc/cuda/*.cu as C++; setup.py rewrites launch.cuh's
// `kernel<<<grid, block, smem, stream>>>(args);` into `bn_emu::launch(...)`. Each launch runs its
// blocks one after another on the calling thread, each block's threads as cooperative fibers that
// switch at __syncthreads() and at warp shuffles (runtime.cpp). What it checks: the kernels'
// indexing, planning, workspace layout and reductions, on CPU tensors, with the same host code
// (ops_cuda.cpp) as the CUDA build. What it cannot: the memory model, timing, hardware limits
// other than the launch-configuration ones, fast-math intrinsics. It is not a GPU run.
//
// Strict where CUDA is undefined: a __syncthreads() that not every live thread of the block
// reaches at the same call site, a thread that exits while others wait at one, and a full-mask
// shuffle that not all 32 lanes reach, fail the launch with a message instead of deadlocking.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for the host emulation; nvcc compiles the kernels for real"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory: one copy per kernel instantiation, reused by the blocks, which run one at a time.
#define __shared__ static

// The one runtime call the kernels' launch code makes, routed to the emulation (a macro, so that
// the real libcudart that torch loads cannot interpose).
#define cudaGetLastError ::bn_emu::get_last_error

// Built-in variables: set by the scheduler before it resumes a thread.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace bn_emu {

cudaError_t get_last_error();
// What the last failed launch failed on (block, thread, source line, or the configuration).
const char* last_message();

struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

// Runs body(ctx) once per thread of every block; records the launch's error for get_last_error.
void launch_impl(const Config& cfg, void (*body)(void*), void* ctx);
uint64_t launch_count();  // kernels launched so far (bn_cuda._C._emulated_launches)

template <typename F>
void launch(const Config& cfg, F&& f) {
  using Fn = std::remove_reference_t<F>;
  launch_impl(cfg, [](void* ctx) { (*static_cast<Fn*>(ctx))(); }, static_cast<void*>(&f));
}

// Block barrier; `site` tells one __syncthreads() call site from another.
void syncthreads(const char* site);
// Lane exchange of a __shfl_down_sync: every lane of the warp posts its 8 bytes, then reads
// lane + delta's (its own when that is past the warp). Whole warps only (mask 0xffffffff, width
// 32), as bn_cuda's kernels shuffle; anything else fails the launch with a message.
uint64_t shfl_down_bits(uint64_t bits, unsigned delta, unsigned mask, int width);

}  // namespace bn_emu

#define BN_EMU_STR2(x) #x
#define BN_EMU_STR(x) BN_EMU_STR2(x)
#define __syncthreads() ::bn_emu::syncthreads(__FILE__ ":" BN_EMU_STR(__LINE__))

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::bn_emu::shfl_down_bits(bits, delta, mask, width);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// Fibers switch only inside the runtime's calls, so a read-modify-write is atomic here.
inline int atomicMin(int* address, int val) {
  const int old = *address;
  if (val < old) *address = val;
  return old;
}

// Correctly rounded float / double operations that nvcc never contracts into an FMA: the
// emulation's sources are compiled with -ffp-contract=off, so plain operators do the same.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
