// Device helpers for the header-only CUDA kernels: element types, vector access, and
// deterministic warp / block reductions (fixed shuffle trees, no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../config.h"
#include "../params.h"
#include "../welford.h"

namespace BN_CUDA_NAMESPACE {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Rows each thread of the channels-last element-wise kernels loads together (apply_cl_kernel,
// grad_input_cl_kernel), and the fewest rows per thread their grid gives (grid_cl).
constexpr int kClRowGroup = 4;

template <DType D>
struct ScalarOf;
template <>
struct ScalarOf<DType::kFloat32> {
  using type = float;
};
template <>
struct ScalarOf<DType::kFloat64> {
  using type = double;
};
template <>
struct ScalarOf<DType::kFloat16> {
  using type = __half;
};
template <>
struct ScalarOf<DType::kBFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V consecutive elements moved as one access (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, acc_t<T> (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_acc(pk.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const acc_t<T> (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// ---------------------------------------------------------------------------------------------
// Reductions. Lane 0 (warp) or thread 0 (block) ends with the result; the combination order is
// fixed, so the result is bitwise reproducible.

template <typename A>
__device__ __forceinline__ WelfordState<A> shfl_down(const WelfordState<A>& s, int off) {
  WelfordState<A> r;
  r.mean = __shfl_down_sync(kFullMask, s.mean, off);
  r.m2 = __shfl_down_sync(kFullMask, s.m2, off);
  r.n = __shfl_down_sync(kFullMask, s.n, off);
  return r;
}

template <typename A>
__device__ __forceinline__ WelfordState<A> warp_merge(WelfordState<A> s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s = welford_merge(s, shfl_down(s, off));
  return s;
}

template <typename A>
struct SumPair {
  A a;
  A b;
};

template <typename A>
__device__ __forceinline__ SumPair<A> warp_sum(SumPair<A> s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s.a += __shfl_down_sync(kFullMask, s.a, off);
    s.b += __shfl_down_sync(kFullMask, s.b, off);
  }
  return s;
}

// Block of BLOCK threads (1-D): merge every thread's state into thread 0.
template <int BLOCK, typename A>
__device__ __forceinline__ WelfordState<A> block_merge(WelfordState<A> s) {
  static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block size");
  __shared__ WelfordState<A> sh[BLOCK / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = warp_merge(s);
  if (lane == 0) sh[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < BLOCK / 32 ? sh[lane] : welford_empty<A>();
    s = warp_merge(s);
  }
  return s;
}

template <int BLOCK, typename A>
__device__ __forceinline__ SumPair<A> block_sum(SumPair<A> s) {
  static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block size");
  __shared__ SumPair<A> sh[BLOCK / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = warp_sum(s);
  if (lane == 0) sh[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < BLOCK / 32 ? sh[lane] : SumPair<A>{A(0), A(0)};
    s = warp_sum(s);
  }
  return s;
}

// Channels-last blocks of BX x BY threads (BX * BY = 256) end with BY row-group partials for each
// of their F = BX * V feature columns in shared memory: [BY][F] per moment, and for counts [BY][BX]
// (one per thread column: its V features share it). Column f is reduced by K = 256 / F consecutive
// lanes of one warp (threads t = f * K + k, t = threadIdx.y * BX + threadIdx.x): lane k takes row
// groups k * V .. k * V + V - 1 in order, then a shuffle tree over the K lanes leaves the column's
// result in lane k = 0. A fixed order, so bitwise reproducible. Every thread of the block calls it
// (the shuffles take whole warps). (Until 2026-12-06 one thread per column reduced all BY row
// groups: with BX = 8, i.e. up to 248 fp16 channels, 8 threads of the block did 32 Chan merges for
// each of 8 features, 256 dependent divisions while the other 248 threads waited.)
template <int BX, int V>
struct ColumnReduce {
  static constexpr int BY = 256 / BX;
  static constexpr int F = BX * V;
  static constexpr int K = 256 / F;
  static_assert(BX * BY == 256 && K >= 1 && K <= 32 && K * V == BY, "column reduction shape");
  int f;  // this thread's column
  int k;  // its rank among the column's K lanes
  __device__ __forceinline__ ColumnReduce() {
    const int t = static_cast<int>(threadIdx.y) * BX + static_cast<int>(threadIdx.x);
    f = t / K;
    k = t % K;
  }
  template <typename A>
  __device__ __forceinline__ WelfordState<A> merge(const A (&mean)[BY][F], const A (&m2)[BY][F],
                                                   const A (&n)[BY][BX]) const {
    WelfordState<A> st = welford_empty<A>();
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int j = k * V + i;
      st = welford_merge(st, WelfordState<A>{mean[j][f], m2[j][f], n[j][f / V]});
    }
#pragma unroll
    for (int off = 1; off < K; off <<= 1) st = welford_merge(st, shfl_down(st, off));
    return st;
  }
  template <typename A>
  __device__ __forceinline__ SumPair<A> sum(const A (&a)[BY][F], const A (&b)[BY][F]) const {
    SumPair<A> s{A(0), A(0)};
#pragma unroll
    for (int i = 0; i < V; ++i) {
      s.a += a[k * V + i][f];
      s.b += b[k * V + i][f];
    }
#pragma unroll
    for (int off = 1; off < K; off <<= 1) {
      s.a += __shfl_down_sync(kFullMask, s.a, off);
      s.b += __shfl_down_sync(kFullMask, s.b, off);
    }
    return s;
  }
};

// Position (o, c, iv) of a flat vector index over (O, C, I / V), advanced by a fixed stride
// without a division per step.
struct FlatCursor {
  int64_t o, c, iv;
  int64_t step_o, step_c, step_iv;
  int64_t C, Iv;

  __device__ __forceinline__ void init(int64_t flat, int64_t stride, int64_t C_, int64_t Iv_) {
    C = C_;
    Iv = Iv_;
    const int64_t row = flat / Iv;
    iv = flat - row * Iv;
    o = row / C;
    c = row - o * C;
    const int64_t srow = stride / Iv;
    step_iv = stride - srow * Iv;
    step_o = srow / C;
    step_c = srow - step_o * C;
  }
  __device__ __forceinline__ void advance() {
    iv += step_iv;
    int64_t carry = 0;
    if (iv >= Iv) {
      iv -= Iv;
      carry = 1;
    }
    c += step_c + carry;
    o += step_o;
    if (c >= C) {
      c -= C;
      ++o;
    }
  }
};

// This thread's W-element packs of a flat walk over dense channels-first (O, C, I) data with
// I >= W (see flat_cf_ok): pack(k, c, b) for pack k (elements [k * W, k * W + W)), whose first b
// elements are feature c's and the rest, where b < W, feature c + 1's (mod C); then
// tail(j, c) for each of the last n % W elements (the first threads of block 0).
template <int W, int BLOCK, typename PackFn, typename TailFn>
__device__ __forceinline__ void flat_cf_walk(const View3& v, PackFn&& pack, TailFn&& tail) {
  const int64_t n = v.O * v.C * v.I, packs = n / W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * BLOCK;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * BLOCK + threadIdx.x;
  if (first < packs) {
    FlatCursor cur;  // over elements: (o, c, position in the row)
    cur.init(first * W, stride * W, v.C, v.I);
    for (int64_t k = first; k < packs; k += stride) {
      pack(k, cur.c, v.I - cur.iv);
      cur.advance();
    }
  }
  if (first < n - packs * W) {
    const int64_t j = packs * W + first;
    tail(j, (j / v.I) % v.C);
  }
}

// Position (o, iv) inside one feature's (O, I / V) range, advanced by a fixed stride.
struct RowCursor {
  int64_t o, iv;
  int64_t step_o, step_iv, Iv;

  __device__ __forceinline__ void init(int64_t flat, int64_t stride, int64_t Iv_) {
    Iv = Iv_;
    o = flat / Iv;
    iv = flat - o * Iv;
    step_o = stride / Iv;
    step_iv = stride - step_o * Iv;
  }
  __device__ __forceinline__ void advance() {
    iv += step_iv;
    o += step_o;
    if (iv >= Iv) {
      iv -= Iv;
      ++o;
    }
  }
};

// The ghost (n / S) % G of a physical channels-last row r = n * S + s, advanced by a fixed row
// stride without a division per step.
struct RowGhost {
  int64_t s, g;
  int64_t step_s, step_g;
  int64_t S, G;
  __device__ __forceinline__ void init(int64_t r, int64_t stride, int64_t S_, int64_t G_) {
    S = S_;
    G = G_;
    const int64_t n = r / S;
    s = r - n * S;
    g = n % G;
    const int64_t step_n = stride / S;
    step_s = stride - step_n * S;
    step_g = step_n % G;
  }
  __device__ __forceinline__ void advance() {
    s += step_s;
    int64_t carry = 0;
    if (s >= S) {
      s -= S;
      carry = 1;
    }
    g += step_g + carry;
    if (g >= G) g -= G;
  }
};

// Partition handled by this block of a per-(feature, partition) reduction. Partitions run along
// gridDim.y and, past its limit of 65535 (channels-last ghost rows with more than 65535 ghosts:
// P >= G), along gridDim.z too (see reduction_grid); blocks past the last partition have no work.
__device__ __forceinline__ int64_t block_partition() {
  return static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
}

// Index of partial q (of the partials of feature f) in the workspace arrays. Channels-last
// partials are grouped by ghost: partition g * (P / G) + q holds ghost g's q-th chunk of rows.
__device__ __forceinline__ int64_t partial_index(const View3& v, int64_t P, int64_t f, int64_t q) {
  if (!v.channels_last) return f * P + q;
  return ((f / v.C) * (P / v.G) + q) * v.C + f % v.C;
}

// Row walk of the channels-last reductions (statistics, gradient sums): ghost row rho = k * S + s
// of ghost g is physical row (k * G + g) * S + s; the walk keeps the physical row itself,
// advanced by one of two fixed row offsets (d1 when s wraps past a sample into the next one of
// the ghost), so a step costs an add and a compare, no multiplication. Rows step from ghost row
// rho by `stride`: (k, s) -> (k + step_k, s + step_s), and on a wrap
// (k + step_k + 1, s + step_s - S), which moves the physical row (k * G + g) * S + s by
// step_k * G * S + step_s, plus (G - 1) * S on the wrap. Without ghost batches (G = S = 1) it is
// row += stride. `unit` scales row and offsets (a tensor's row stride: then row is the element
// offset of the row; 1: the row index).
struct RowWalk {
  int64_t row, s, step_s, S, d0, d1;
  __device__ __forceinline__ void init(const View3& v, int64_t ghost, int64_t rho, int64_t stride, int64_t unit) {
    S = v.S;
    const int64_t k = rho / S;
    s = rho - k * S;
    row = ((k * v.G + ghost) * S + s) * unit;
    const int64_t step_k = stride / S;
    step_s = stride - step_k * S;
    d0 = (step_k * v.G * S + step_s) * unit;
    d1 = d0 + (v.G - 1) * S * unit;
  }
  __device__ __forceinline__ void advance() {
    s += step_s;
    const bool wrap = s >= S;
    s = wrap ? s - S : s;
    row += wrap ? d1 : d0;
  }
};

// A pack's raw elements, loaded as one access and converted later (the channels-last reductions
// hold U rows in flight: raw 16-byte packs take half the registers of converted fp16 / bf16).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_raw(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

#define BN_CUDA_RETURN_IF_ERROR()               \
  do {                                          \
    const cudaError_t err_ = cudaGetLastError(); \
    if (err_ != cudaSuccess) return err_;       \
  } while (0)

}  // namespace cuda
}  // namespace BN_CUDA_NAMESPACE
