// Backward kernels (header-only, torch-free): per-feature partial sums of dy and dy * (x - mean),
// their fixed-order finalize (grad_weight, grad_bias, grad-input coefficients), and grad_input.
//
// Workspace layout (acc type A): [0, PC) partial sum(dy), [PC, 2PC) partial sum(dy * (x - mean)),
// then 4F coefficients (F = G * C, ghost-major): mean, k_dy, k_xmu, k_0 (see epilogue.h). Partials
// are indexed as in forward.cuh.
#pragma once

#include "../epilogue.h"
#include "common.cuh"

namespace BN_CUDA_NAMESPACE {
namespace cuda {

// Channels-first gradient sums: block (c, q) sums partition q of feature c. (The block's work,
// for grad_sums_cf_kernel and backward_single_cf_kernel: every thread calls it.)
template <typename T, int V, int BLOCK>
__device__ __forceinline__ void grad_sums_cf_block(const BackwardParams& p, int64_t c, int64_t q) {
  using A = acc_t<T>;
  // Packs per thread per step: 16 elements for 1- and 2-element packs (rows of odd or
  // 2-mod-4 length, e.g. 7 x 7 = 49), so that each thread has 16 loads in flight rather than 4.
  constexpr int U = V >= 4 ? 2 : (V * sizeof(T) >= 16 ? 4 : 16 / V);
  const int64_t C = p.v.C, P = p.partitions;
  const int64_t Iv = p.v.I / V;
  const int64_t nvec = p.v.O * Iv;
  const int64_t per = ceil_div(nvec, P);
  const int64_t begin = q * per;
  const int64_t end = begin + per < nvec ? begin + per : nvec;
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  const T* dy = static_cast<const T*>(p.dy) + c * p.dy_sc;
  const A mean = static_cast<const A*>(p.mean)[c];

  SumPair<A> s{A(0), A(0)};
  int64_t k = begin + threadIdx.x;
  if (k < end) {
    RowCursor cur;
    cur.init(k, BLOCK, Iv);
    for (; k < end; k += static_cast<int64_t>(BLOCK) * U) {
      A gv[U][V], xv[U][V];
      int valid = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (k + static_cast<int64_t>(u) * BLOCK < end) {
          load_pack<T, V>(dy + cur.o * p.dy_so + cur.iv * V, gv[u]);
          load_pack<T, V>(x + cur.o * p.x_so + cur.iv * V, xv[u]);
          ++valid;
          cur.advance();
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < valid) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            s.a += gv[u][e];
            s.b += gv[u][e] * (xv[u][e] - mean);
          }
        }
      }
    }
  }
  s = block_sum<BLOCK>(s);
  if (threadIdx.x == 0) {
    A* ws = static_cast<A*>(p.workspace);
    const int64_t idx = c * P + q;
    ws[idx] = s.a;
    ws[P * C + idx] = s.b;
  }
}

template <typename T, int V, int BLOCK>
__global__ void __launch_bounds__(BLOCK) grad_sums_cf_kernel(const BackwardParams p) {
  const int64_t q = block_partition();
  if (q >= p.partitions) return;  // block-uniform, before any barrier
  grad_sums_cf_block<T, V, BLOCK>(p, blockIdx.x, q);
}

template <typename T, int V, int BX>
__global__ void __launch_bounds__(256) grad_sums_cl_kernel(const BackwardParams p) {
  constexpr int BY = 256 / BX;
  using A = acc_t<T>;
  constexpr int U = 4;
  const int64_t C = p.v.C, P = p.partitions;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * BX + tx) * V;
  // Partition q: chunk j of ghost g's rows (see stats_cl_kernel).
  const int64_t q = block_partition();
  if (q >= P) return;  // block-uniform, before the barrier
  const int64_t per_ghost = P / p.v.G;
  const int64_t g = q / per_ghost, j = q % per_ghost;
  const int64_t R = p.v.ghost_rows();
  const int64_t per = ceil_div(R, per_ghost);
  const int64_t r0 = j * per < R ? j * per : R;
  const int64_t r1 = r0 + per < R ? r0 + per : R;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);

  A sa[V], sb[V], mean[V];
#pragma unroll
  for (int e = 0; e < V; ++e) sa[e] = sb[e] = A(0);
  if (c0 < C) {
#pragma unroll
    for (int e = 0; e < V; ++e) mean[e] = static_cast<const A*>(p.mean)[g * C + c0 + e];
    int64_t r = r0 + ty;  // ghost row
    RowWalk rows;  // rows.row: the physical row index
    rows.init(p.v, g, r < R ? r : 0, BY, 1);
    for (; r + BY * (U - 1) < r1; r += BY * U) {
      A gv[U][V], xv[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pr = rows.row;
        rows.advance();
        load_pack<T, V>(dy + pr * p.dy_so + c0, gv[u]);
        load_pack<T, V>(x + pr * p.x_so + c0, xv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int e = 0; e < V; ++e) {
          sa[e] += gv[u][e];
          sb[e] += gv[u][e] * (xv[u][e] - mean[e]);
        }
    }
    for (; r < r1; r += BY) {
      A gv[V], xv[V];
      const int64_t pr = rows.row;
      rows.advance();
      load_pack<T, V>(dy + pr * p.dy_so + c0, gv);
      load_pack<T, V>(x + pr * p.x_so + c0, xv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        sa[e] += gv[e];
        sb[e] += gv[e] * (xv[e] - mean[e]);
      }
    }
  }
  __shared__ A sh_a[BY][BX * V];
  __shared__ A sh_b[BY][BX * V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    sh_a[ty][tx * V + e] = sa[e];
    sh_b[ty][tx * V + e] = sb[e];
  }
  __syncthreads();
  const ColumnReduce<BX, V> col;  // every thread takes part (see common.cuh)
  const SumPair<A> s = col.sum(sh_a, sh_b);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (BX * V) + col.f;
  if (col.k == 0 && c < C) {
    A* ws = static_cast<A*>(p.workspace);
    ws[q * C + c] = s.a;
    ws[P * C + q * C + c] = s.b;
  }
}

// One warp per feature; P may be 0 (no local sums needed: inference grad_input, or given sums).
// Called by a whole warp for feature c (ghost-major) < F.
template <typename A>
__device__ __forceinline__ void finalize_backward_entry(const BackwardParams& p, int64_t c, int lane) {
  const int64_t C = p.v.C, P = p.partitions, F = p.v.features();
  const A* ws = static_cast<const A*>(p.workspace);
  SumPair<A> s{A(0), A(0)};
  const int64_t nparts = p.v.channels_last ? P / p.v.G : P;
  // Lane sums of q = lane, lane + 32, ... in that order, four loads ahead (finalize_forward_kernel).
  const int64_t base = partial_index(p.v, P, c, 0);
  const int64_t step = partial_index(p.v, P, c, 1) - base;
  int64_t q = lane;
  for (; q + 96 < nparts; q += 128) {
    A a[4], b[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t idx = base + (q + 32 * k) * step;
      a[k] = ws[idx];
      b[k] = ws[P * C + idx];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      s.a += a[k];
      s.b += b[k];
    }
  }
  for (; q < nparts; q += 32) {
    const int64_t idx = base + q * step;
    s.a += ws[idx];
    s.b += ws[P * C + idx];
  }
  s = warp_sum(s);
  if (lane != 0) return;
  // Staged fields, exactly as the CPU backward treats them: given sums and counts (e.g.
  // all-reduced) replace the local ones; out_sum_* receive the sums and the epilogue still runs,
  // so no combination of fields leaves the grad_input coefficients unwritten.
  A count = static_cast<A>(p.v.O * p.v.I / p.v.G);  // elements per (ghost, feature)
  if (p.given_sum_dy) {
    s.a = static_cast<const A*>(p.given_sum_dy)[c];
    s.b = static_cast<const A*>(p.given_sum_dy_xmu)[c];
    count = static_cast<const A*>(p.given_count)[c];
  }
  if (p.out_sum_dy) {
    static_cast<A*>(p.out_sum_dy)[c] = s.a;
    static_cast<A*>(p.out_sum_dy_xmu)[c] = s.b;
  }
  const A invstd = static_cast<const A*>(p.invstd)[c];
  const A mean = static_cast<const A*>(p.mean)[c];
  if (p.grad_weight) static_cast<A*>(p.grad_weight)[c] = s.b * invstd;
  if (p.grad_bias) static_cast<A*>(p.grad_bias)[c] = s.a;
  const A w = p.weight ? static_cast<const A*>(p.weight)[c] : A(1);
  const GradCoeffs<A> g = grad_coeffs(mean, invstd, w, s.a, s.b, count, p.train, p.mask != nullptr);
  A* coeff = static_cast<A*>(p.workspace) + 2 * P * C;
  coeff[c] = g.mean;
  coeff[F + c] = g.k_dy;
  coeff[2 * F + c] = g.k_xmu;
  coeff[3 * F + c] = g.k_0;
}

template <typename A>
__global__ void __launch_bounds__(256) finalize_backward_kernel(const BackwardParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);  // feature (ghost-major)
  if (c >= p.v.features()) return;  // warp-uniform
  finalize_backward_entry<A>(p, c, threadIdx.x & 31);
}

// keras_grads: one warp per feature; the lanes sum the ghosts g = lane, lane + 32, ... in order,
// then the warp's fixed shuffle tree (deterministic), then keras_grads_compose (epilogue.h).
// Called by a whole warp for feature c < C.
template <typename A>
__device__ __forceinline__ void keras_grads_entry(const KerasGradParams& p, int64_t c, int lane) {
  const A* ds = static_cast<const A*>(p.d_scale);
  const A* dh = static_cast<const A*>(p.d_shift);
  SumPair<A> s{A(0), A(0)};
  for (int64_t g = lane; g < p.G; g += 32) {
    s.a += ds[g * p.C + c];
    s.b += dh[g * p.C + c];
  }
  s = warp_sum(s);
  if (lane == 0) keras_grads_compose<A>(p, c, s.a, s.b);
}

template <typename A>
__global__ void __launch_bounds__(256) keras_grads_kernel(const KerasGradParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (c >= p.C) return;  // warp-uniform
  keras_grads_entry<A>(p, c, threadIdx.x & 31);
}

// keras_backward's finalize (G <= kKerasFusedMaxGhosts): block c, of 32 * G threads, is feature c.
// Warp g finalizes ghost g's sums exactly as finalize_backward_kernel does (its grad_weight /
// grad_bias are keras_grads' d_scale / d_shift), then warp 0 runs keras_grads_kernel's code for
// the feature: one kernel where ghost_backward + keras_grads launch two, bitwise their results.
template <typename A>
__global__ void __launch_bounds__(32 * kKerasFusedMaxGhosts) keras_backward_finalize_kernel(const BackwardParams p,
                                                                                           const KerasGradParams kp) {
  const int64_t c = blockIdx.x;
  const int64_t g = threadIdx.x >> 5;
  finalize_backward_entry<A>(p, g * kp.C + c, threadIdx.x & 31);
  __syncthreads();  // every ghost's d_scale / d_shift of the feature is visible to warp 0
  if (threadIdx.x < 32) keras_grads_entry<A>(kp, c, threadIdx.x);
}

// grad_input coefficients from caller-supplied sums and total counts (staged backward_apply).
template <typename A>
__global__ void __launch_bounds__(256) given_grad_coeffs_kernel(const BackwardParams p) {
  const int64_t C = p.v.C, F = p.v.features();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= F) return;
  const A w = p.weight ? static_cast<const A*>(p.weight)[c] : A(1);
  const GradCoeffs<A> g = grad_coeffs(static_cast<const A*>(p.mean)[c], static_cast<const A*>(p.invstd)[c], w,
                                      static_cast<const A*>(p.given_sum_dy)[c],
                                      static_cast<const A*>(p.given_sum_dy_xmu)[c],
                                      static_cast<const A*>(p.given_count)[c], p.train,
                                      p.mask != nullptr);
  A* coeff = static_cast<A*>(p.workspace) + 2 * p.partitions * C;
  coeff[c] = g.mean;
  coeff[F + c] = g.k_dy;
  coeff[2 * F + c] = g.k_xmu;
  coeff[3 * F + c] = g.k_0;
}

template <typename T, int V, int BLOCK>
__global__ void __launch_bounds__(BLOCK) grad_input_cf_kernel(const BackwardParams p) {
  using A = acc_t<T>;
  const int64_t C = p.v.C, Iv = p.v.I / V, F = C;  // channels-first: no ghosts
  const int64_t total = p.v.O * C * Iv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * BLOCK;
  int64_t k = static_cast<int64_t>(blockIdx.x) * BLOCK + threadIdx.x;
  if (k >= total) return;
  const A* coeff = static_cast<const A*>(p.workspace) + 2 * p.partitions * C;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  FlatCursor cur;
  cur.init(k, stride, C, Iv);
  for (; k < total; k += stride) {
    A gv[V], xv[V];
    load_pack<T, V>(dy + cur.o * p.dy_so + cur.c * p.dy_sc + cur.iv * V, gv);
    load_pack<T, V>(x + cur.o * p.x_so + cur.c * p.x_sc + cur.iv * V, xv);
    const GradCoeffs<A> g{coeff[cur.c], coeff[F + cur.c], coeff[2 * F + cur.c], coeff[3 * F + cur.c]};
#pragma unroll
    for (int e = 0; e < V; ++e) gv[e] = grad_one(gv[e], xv[e], g);
    store_pack<T, V>(dx + cur.o * p.dx_so + cur.c * p.dx_sc + cur.iv * V, gv);
    cur.advance();
  }
}

// The whole channels-first backward of a small input in one launch (BackwardParams::single_cf, see
// single_cf_ok), as forward_single_cf_kernel for the forward: block c is feature c, its one
// partition. The block sums as grad_sums_cf_kernel's block (c, 0) does, warp 0 finalizes as
// finalize_backward_kernel's warp does (grad_weight, grad_bias, the grad_input coefficients), and
// the block computes the feature's grad_input as grad_input_cf_kernel does: the same bits as those
// three launches, and x and dy, just read, come back from L1 / L2.
template <typename T, int V, int BLOCK>
__global__ void __launch_bounds__(BLOCK) backward_single_cf_kernel(const BackwardParams p) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.x;
  grad_sums_cf_block<T, V, BLOCK>(p, c, 0);
  __syncthreads();  // thread 0's sums (global memory) are visible to warp 0
  if (threadIdx.x < 32) finalize_backward_entry<A>(p, c, static_cast<int>(threadIdx.x));
  __syncthreads();  // and lane 0's coefficients to the block
  const int64_t C = p.v.C, F = C, Iv = p.v.I / V, nvec = p.v.O * Iv;
  const A* coeff = static_cast<const A*>(p.workspace) + 2 * p.partitions * C;
  const GradCoeffs<A> g{coeff[c], coeff[F + c], coeff[2 * F + c], coeff[3 * F + c]};
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  const T* dy = static_cast<const T*>(p.dy) + c * p.dy_sc;
  T* dx = static_cast<T*>(p.dx) + c * p.dx_sc;
  int64_t k = threadIdx.x;
  if (k >= nvec) return;
  RowCursor cur;
  cur.init(k, BLOCK, Iv);
  constexpr int U = 4;  // vectors per thread whose loads are issued together (single_cf_ok: <= 8 in all)
  for (; k < nvec; k += static_cast<int64_t>(BLOCK) * U) {
    A gv[U][V], xv[U][V];
    int64_t oo[U], io[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k + static_cast<int64_t>(u) * BLOCK < nvec) {
        oo[u] = cur.o;
        io[u] = cur.iv * V;
        load_pack<T, V>(dy + cur.o * p.dy_so + io[u], gv[u]);
        load_pack<T, V>(x + cur.o * p.x_so + io[u], xv[u]);
        cur.advance();
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k + static_cast<int64_t>(u) * BLOCK < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) gv[u][e] = grad_one(gv[u][e], xv[u][e], g);
        store_pack<T, V>(dx + oo[u] * p.dx_so + io[u], gv[u]);
      }
    }
  }
}

// grad_input over dense channels-first (O, C, I) data with rows that are not whole 16-byte
// vectors: one flat run of W-element packs, as apply_flat_cf_kernel (the same grad_one per
// element as grad_input_cf_kernel: the same bits).
template <typename T, int W, int BLOCK>
__global__ void __launch_bounds__(BLOCK) grad_input_flat_cf_kernel(const BackwardParams p) {
  using A = acc_t<T>;
  const int64_t C = p.v.C, F = C;  // channels-first: no ghosts
  const A* coeff = static_cast<const A*>(p.workspace) + 2 * p.partitions * C;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const auto coeffs = [&](int64_t c) {
    return GradCoeffs<A>{coeff[c], coeff[F + c], coeff[2 * F + c], coeff[3 * F + c]};
  };
  flat_cf_walk<W, BLOCK>(
      p.v,
      [&](int64_t k, int64_t c, int64_t b) {
        A gv[W], xv[W];
        load_pack<T, W>(dy + k * W, gv);
        load_pack<T, W>(x + k * W, xv);
        const GradCoeffs<A> g0 = coeffs(c);
        if (b >= W) {
#pragma unroll
          for (int e = 0; e < W; ++e) gv[e] = grad_one(gv[e], xv[e], g0);
        } else {
          const GradCoeffs<A> g1 = coeffs(c + 1 == C ? 0 : c + 1);
#pragma unroll
          for (int e = 0; e < W; ++e) gv[e] = grad_one(gv[e], xv[e], e < b ? g0 : g1);
        }
        store_pack<T, W>(dx + k * W, gv);
      },
      [&](int64_t j, int64_t c) { dx[j] = from_acc<T>(grad_one(to_acc(dy[j]), to_acc(x[j]), coeffs(c))); });
}

template <typename T, int V, int BX>
__global__ void __launch_bounds__(256) grad_input_cl_kernel(const BackwardParams p) {
  constexpr int BY = 256 / BX;
  using A = acc_t<T>;
  const int64_t C = p.v.C, O = p.v.O, F = p.v.features();
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * BX + threadIdx.x) * V;
  if (c0 >= C) return;
  const A* coeff = static_cast<const A*>(p.workspace) + 2 * p.partitions * C;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const int64_t step = static_cast<int64_t>(gridDim.y) * BY;
  const int64_t r_first = static_cast<int64_t>(blockIdx.y) * BY + threadIdx.y;
  if (p.v.G == 1) {  // one coefficient set: keep it in registers
    GradCoeffs<A> g[V];
#pragma unroll
    for (int e = 0; e < V; ++e)
      g[e] = GradCoeffs<A>{coeff[c0 + e], coeff[F + c0 + e], coeff[2 * F + c0 + e], coeff[3 * F + c0 + e]};
    constexpr int R = kClRowGroup;
    int64_t r = r_first;
    for (; r + (R - 1) * step < O; r += R * step) {  // R rows' loads issued together (see apply_cl_kernel)
      A gv[R][V], xv[R][V];
#pragma unroll
      for (int u = 0; u < R; ++u) {
        load_pack<T, V>(dy + (r + u * step) * p.dy_so + c0, gv[u]);
        load_pack<T, V>(x + (r + u * step) * p.x_so + c0, xv[u]);
      }
#pragma unroll
      for (int u = 0; u < R; ++u) {
#pragma unroll
        for (int e = 0; e < V; ++e) gv[u][e] = grad_one(gv[u][e], xv[u][e], g[e]);
        store_pack<T, V>(dx + (r + u * step) * p.dx_so + c0, gv[u]);
      }
    }
    for (; r < O; r += step) {
      A gv[V], xv[V];
      load_pack<T, V>(dy + r * p.dy_so + c0, gv);
      load_pack<T, V>(x + r * p.x_so + c0, xv);
#pragma unroll
      for (int e = 0; e < V; ++e) gv[e] = grad_one(gv[e], xv[e], g[e]);
      store_pack<T, V>(dx + r * p.dx_so + c0, gv);
    }
    return;
  }
  RowGhost rg;  // ghost batches: each row takes its ghost's coefficients
  rg.init(r_first, step, p.v.S, p.v.G);
  for (int64_t r = r_first; r < O; r += step) {
    const int64_t f = rg.g * C + c0;
    A gv[V], xv[V];
    load_pack<T, V>(dy + r * p.dy_so + c0, gv);
    load_pack<T, V>(x + r * p.x_so + c0, xv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const GradCoeffs<A> g{coeff[f + e], coeff[F + f + e], coeff[2 * F + f + e], coeff[3 * F + f + e]};
      gv[e] = grad_one(gv[e], xv[e], g);
    }
    store_pack<T, V>(dx + r * p.dx_so + c0, gv);
    rg.advance();
  }
}

}  // namespace cuda
}  // namespace BN_CUDA_NAMESPACE
