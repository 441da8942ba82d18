// Self-test of the host emulation (tests/test_emulation.py compiles and runs it): what it computes
// right, what it refuses, and what a missing barrier does to a result. Torch-free.
//
//   selftest <case>   prints one line per result; exit code 0 unless the case itself broke.
#include "cuda_emu.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "bn_cuda/cuda/common.cuh"

using bn_cuda::WelfordState;

// A block of 256 threads merges per-thread Welford states of a strided slice (bn_cuda's own
// warp / block merge); thread 0 of each block writes its block's mean, M2 and count.
__global__ void __launch_bounds__(256) welford_blocks(const float* x, int64_t n, float* out) {
  WelfordState<float> s = bn_cuda::welford_empty<float>();
  const int64_t per = (n + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per, hi = lo + per < n ? lo + per : n;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const float v[1] = {x[i]};
    s = bn_cuda::welford_merge(s, bn_cuda::welford_of_values<1>(v));
  }
  s = bn_cuda::cuda::block_merge<256>(s);
  if (threadIdx.x == 0) {
    out[3 * blockIdx.x] = s.mean;
    out[3 * blockIdx.x + 1] = s.m2;
    out[3 * blockIdx.x + 2] = s.n;
  }
}

// Each thread records where it is: (block, thread) -> linear id, over a 3-D grid of 2-D blocks.
__global__ void where_am_i(int* out) {
  const unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * threadIdx.y;
  out[bx * blockDim.x * blockDim.y + t] = static_cast<int>(bx * 1000 + t);
}

// Neighbour exchange through shared memory, with or without the barrier between write and read.
template <bool kBarrier>
__global__ void __launch_bounds__(256) rotate(const int* in, int* out) {
  __shared__ int sh[256];
  sh[threadIdx.x] = in[threadIdx.x];
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = sh[(threadIdx.x + 1) % 256];
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_then_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle(int* out) {
  int v = static_cast<int>(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  out[threadIdx.x] = v;
}

__global__ void lane_zero_shuffles(int* out) {
  if ((threadIdx.x & 31) != 0) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}

static void report(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) {
    std::printf("%s ok\n", what);
  } else {
    std::printf("%s error %d: %s\n", what, static_cast<int>(e), bn_emu::last_message());
  }
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string c = argv[1];
  if (c == "welford") {
    const int64_t n = 100003;
    const unsigned blocks = 7;
    std::vector<float> x(n), out(3 * blocks);
    std::mt19937 gen(1);
    std::normal_distribution<float> d(1e4f, 3.f);  // a large offset: Welford's case
    for (auto& v : x) v = d(gen);
    ::bn_emu::launch(::bn_emu::Config(blocks, 256), [&] { welford_blocks(x.data(), n, out.data()); });
    report("welford");
    const int64_t per = (n + blocks - 1) / blocks;
    for (unsigned b = 0; b < blocks; ++b) {
      double mean = 0, m2 = 0;
      const int64_t lo = b * per, hi = std::min<int64_t>(lo + per, n);
      for (int64_t i = lo; i < hi; ++i) mean += x[i];
      mean /= double(hi - lo);
      for (int64_t i = lo; i < hi; ++i) m2 += (x[i] - mean) * (x[i] - mean);
      std::printf("block %u mean %.9g %.9g m2 %.9g %.9g n %.0f %lld\n", b, out[3 * b], mean, out[3 * b + 1], m2,
                  out[3 * b + 2], static_cast<long long>(hi - lo));
    }
  } else if (c == "where") {
    const dim3 grid(3, 2, 2), block(8, 4);
    std::vector<int> out(12 * 32, -1);
    ::bn_emu::launch(::bn_emu::Config(grid, block), [&] { where_am_i(out.data()); });
    report("where");
    int bad = 0;
    for (int i = 0; i < 12 * 32; ++i) bad += out[i] != (i / 32) * 1000 + i % 32;
    std::printf("mismatches %d\n", bad);
  } else if (c == "rotate" || c == "rotate_racy") {
    std::vector<int> in(256), out(256, -1);
    for (int i = 0; i < 256; ++i) in[i] = i * 7 + 3;
    if (c == "rotate") {
      ::bn_emu::launch(::bn_emu::Config(1, 256), [&] { rotate<true>(in.data(), out.data()); });
    } else {
      ::bn_emu::launch(::bn_emu::Config(1, 256), [&] { rotate<false>(in.data(), out.data()); });
    }
    report(c.c_str());
    int bad = 0;
    for (int i = 0; i < 256; ++i) bad += out[i] != in[(i + 1) % 256];
    std::printf("mismatches %d\n", bad);
  } else if (c == "divergent") {
    std::vector<int> out(256);
    ::bn_emu::launch(::bn_emu::Config(1, 256), [&] { divergent_barrier(out.data()); });
    report("divergent");
  } else if (c == "exit") {
    std::vector<int> out(256);
    ::bn_emu::launch(::bn_emu::Config(1, 256), [&] { exit_then_barrier(out.data()); });
    report("exit");
  } else if (c == "shuffle") {
    std::vector<int> out(64, -1);
    ::bn_emu::launch(::bn_emu::Config(1, 64), [&] { shuffle(out.data()); });
    report("shuffle");
    // lane l ends with the sum over lanes l, l+1, ... of its shuffle tree (lanes past 31 count as
    // the lane itself), the semantics of __shfl_down_sync
    int bad = 0;
    for (int w = 0; w < 2; ++w) {
      int v[32];
      for (int l = 0; l < 32; ++l) v[l] = 32 * w + l;
      for (int off = 16; off > 0; off >>= 1) {
        int nv[32];
        for (int l = 0; l < 32; ++l) nv[l] = v[l] + (l + off < 32 ? v[l + off] : v[l]);
        std::memcpy(v, nv, sizeof v);
      }
      for (int l = 0; l < 32; ++l) bad += out[32 * w + l] != v[l];
    }
    std::printf("mismatches %d\n", bad);
  } else if (c == "partial_warp") {
    std::vector<int> out(48);
    ::bn_emu::launch(::bn_emu::Config(1, 48), [&] { shuffle(out.data()); });
    report("partial_warp");
  } else if (c == "lane_exit") {
    std::vector<int> out(32);
    ::bn_emu::launch(::bn_emu::Config(1, 32), [&] { lane_zero_shuffles(out.data()); });
    report("lane_exit");
  } else if (c == "limits") {
    std::vector<int> out(1);
    ::bn_emu::launch(::bn_emu::Config(dim3(1, 70000), 32), [&] { where_am_i(out.data()); });
    report("grid_y");
    ::bn_emu::launch(::bn_emu::Config(1, 2048), [&] { where_am_i(out.data()); });
    report("block");
    ::bn_emu::launch(::bn_emu::Config(0, 32), [&] { where_am_i(out.data()); });
    report("empty_grid");
  } else {
    return 2;
  }
  return 0;
}
