// Masked (weighted) statistics and their input gradient, header-only and torch-free.
//
// A byte mask viewed like x (strides (m_so, m_sc, 1)) gives each element a weight w in {0, 1}:
// the statistics are the weighted moments mean = sum(w x) / sum(w), M2 = sum(w (x - mean)^2),
// and the input gradient of y = (x - mean) * invstd * gamma + beta (applied to every element) is
// dx = k_dy dy + w (k_xmu (x - mean) + k_0), the statistics terms scaled by the element's weight.
// One element per thread access (masks are off the hot path the vectorized kernels serve); the
// partials, finalize and workspace layout are the unmasked kernels' (see forward.cuh).
#pragma once

#include "backward.cuh"
#include "forward.cuh"

namespace BN_CUDA_NAMESPACE {
namespace cuda {

// Weighted Welford step: an element of weight 0 leaves the state untouched.
template <typename A>
__device__ __forceinline__ void masked_step(A& mean, A& m2, A& n, A v, bool w) {
  if (w) {
    n += A(1);
    const A d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
}

// Every masked partial of a feature is taken of (x - shift) with shift its first UNMASKED element
// (its first element when all are masked), found by the masked_shift kernels below and kept in
// the apply-coefficient region of the workspace (masked_shift_of), which batch_stats leaves
// unused. A masked-out shift would leave a feature with one unmasked value a mean one rounding
// away from that value (see masked_feature_shifts in csrc/cpu/kernels_impl.h).
template <typename A>
__device__ __forceinline__ A* masked_shift_of(const ForwardParams& p) {
  return static_cast<A*>(p.workspace) + 3 * p.partitions * p.v.C;
}

// Channels-first shift: block c scans feature c in element order, BLOCK elements at a time, and
// stops at the first chunk holding an unmasked element (the lowest such thread wins).
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) masked_shift_cf_kernel(const ForwardParams p) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.x;
  const int64_t I = p.v.I, total = p.v.O * I;
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  const uint8_t* m = p.mask + c * p.m_sc;
  __shared__ int first;
  if (threadIdx.x == 0) first = BLOCK;
  __syncthreads();
  int64_t found = -1;
  for (int64_t base = 0; base < total; base += BLOCK) {
    const int64_t k = base + threadIdx.x;
    if (k < total && m[(k / I) * p.m_so + k % I] != 0) atomicMin(&first, static_cast<int>(threadIdx.x));
    __syncthreads();
    const int f = first;
    __syncthreads();  // every thread has read `first` before any thread of the next chunk writes it
    if (f < BLOCK) {  // block-uniform
      found = base + f;
      break;
    }
  }
  if (threadIdx.x == 0)
    masked_shift_of<A>(p)[c] = to_acc(found < 0 ? x[0] : x[(found / I) * p.x_so + found % I]);
}

// Channels-last shift: one thread per feature walks the rows until one is unmasked, 16 rows per
// step (independent loads in flight, so a long masked prefix costs O / 16 round trips).
template <typename T>
__global__ void __launch_bounds__(256) masked_shift_cl_kernel(const ForwardParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (c >= p.v.C) return;
  const T* x = static_cast<const T*>(p.x);
  const int64_t O = p.v.O;
  int64_t hit = -1;
  for (int64_t r = 0; r < O && hit < 0; r += 16) {
#pragma unroll
    for (int j = 15; j >= 0; --j) {  // downwards: the lowest unmasked row of the step wins
      const int64_t rr = r + j;
      if (rr < O && p.mask[rr * p.m_so + c * p.m_sc] != 0) hit = rr;
    }
  }
  masked_shift_of<acc_t<T>>(p)[c] = to_acc(x[(hit < 0 ? 0 : hit) * p.x_so + c]);
}

// Channels-first: block (c, q) walks partition q of feature c's (O, I) elements.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) masked_stats_cf_kernel(const ForwardParams p) {
  using A = acc_t<T>;
  const int64_t P = p.partitions;
  const int64_t c = blockIdx.x, q = block_partition();
  if (q >= P) return;  // block-uniform, before any barrier
  const int64_t I = p.v.I;
  const int64_t total = p.v.O * I;
  const int64_t per = ceil_div(total, P);
  const int64_t begin = q * per;
  const int64_t end = begin + per < total ? begin + per : total;
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  const uint8_t* m = p.mask + c * p.m_sc;
  const A shift = masked_shift_of<A>(p)[c];
  A mean = A(0), m2 = A(0), n = A(0);
  int64_t k = begin + threadIdx.x;
  if (k < end) {
    RowCursor cur;
    cur.init(k, BLOCK, I);
    for (; k < end; k += BLOCK) {
      masked_step(mean, m2, n, to_acc(x[cur.o * p.x_so + cur.iv]) - shift, m[cur.o * p.m_so + cur.iv] != 0);
      cur.advance();
    }
  }
  const WelfordState<A> st = block_merge<BLOCK>(WelfordState<A>{mean, m2, n});
  if (threadIdx.x == 0) store_partial(p, c * P + q, st);
}

// Channels-last: BX x BY threads, one feature per thread column, rows BY apart; per-feature counts
// (a mask may differ between features of a row), merged through shared memory in a fixed order.
template <typename T, int BX>
__global__ void __launch_bounds__(256) masked_stats_cl_kernel(const ForwardParams p) {
  constexpr int BY = 256 / BX;
  using A = acc_t<T>;
  const int64_t C = p.v.C, O = p.v.O, P = p.partitions;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * BX + tx;
  const int64_t q = block_partition();
  if (q >= P) return;  // block-uniform, before the barrier
  const int64_t per = ceil_div(O, P);
  const int64_t r0 = q * per;
  const int64_t r1 = r0 + per < O ? r0 + per : O;
  const T* x = static_cast<const T*>(p.x);
  A mean = A(0), m2 = A(0), n = A(0);
  if (c < C) {
    const A shift = masked_shift_of<A>(p)[c];
    for (int64_t r = r0 + ty; r < r1; r += BY)
      masked_step(mean, m2, n, to_acc(x[r * p.x_so + c]) - shift, p.mask[r * p.m_so + c * p.m_sc] != 0);
  }
  __shared__ A sh_mean[BY][BX];
  __shared__ A sh_m2[BY][BX];
  __shared__ A sh_n[BY][BX];
  sh_mean[ty][tx] = mean;
  sh_m2[ty][tx] = m2;
  sh_n[ty][tx] = n;
  __syncthreads();
  const ColumnReduce<BX, 1> col;  // (a count per feature: V = 1)
  const WelfordState<A> st = col.merge(sh_mean, sh_m2, sh_n);
  const int64_t cc = static_cast<int64_t>(blockIdx.x) * BX + col.f;
  if (col.k == 0 && cc < C) store_partial(p, q * C + cc, st);
}

// grad_input of masked statistics, both layouts: a grid-stride walk over every (o, c, i).
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) masked_grad_input_kernel(const BackwardParams p) {
  using A = acc_t<T>;
  const int64_t C = p.v.C, I = p.v.I, F = C;  // masks come without ghost rows
  const int64_t total = p.v.O * C * I;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * BLOCK;
  int64_t k = static_cast<int64_t>(blockIdx.x) * BLOCK + threadIdx.x;
  if (k >= total) return;
  const A* coeff = static_cast<const A*>(p.workspace) + 2 * p.partitions * C;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  FlatCursor cur;
  cur.init(k, stride, C, I);
  for (; k < total; k += stride) {
    const A g = to_acc(dy[cur.o * p.dy_so + cur.c * p.dy_sc + cur.iv]);
    const A xm = to_acc(x[cur.o * p.x_so + cur.c * p.x_sc + cur.iv]) - coeff[cur.c];
    // (a select, not a product with the weight: masked-out padding may hold inf or NaN)
    const bool w = p.mask[cur.o * p.m_so + cur.c * p.m_sc + cur.iv] != 0;
    const A out = coeff[F + cur.c] * g + (w ? coeff[2 * F + cur.c] * xm + coeff[3 * F + cur.c] : A(0));
    dx[cur.o * p.dx_so + cur.c * p.dx_sc + cur.iv] = from_acc<T>(out);
    cur.advance();
  }
}

}  // namespace cuda
}  // namespace BN_CUDA_NAMESPACE
