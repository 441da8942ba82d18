// Forward kernels (header-only, torch-free): per-feature Welford partials, their Chan-merge
// finalize (saved statistics, running statistics, apply coefficients), and the apply step.
//
// Workspace layout (acc type A, P partitions, C features, F = G * C per-feature entries):
//   [0, PC) partial means, [PC, 2PC) partial M2, [2PC, 3PC) partial counts,
//   [3PC, 3PC + 3F) apply coefficients: mean, scale, shift (F each, ghost-major).
// Partial (feature c, partition q) sits at c * P + q (channels-first) or q * C + c (channels-last,
// where partition q = g * (P / G) + j is chunk j of ghost g's rows; see partial_index).
#pragma once

#include "../epilogue.h"
#include "common.cuh"

namespace BN_CUDA_NAMESPACE {
namespace cuda {

// Every partial state of a feature is taken of (x - shift), shift being the feature's first
// element (feature_shift): partial means then stay near zero, so the deltas of Chan's merges are
// exact even when |mean| >> std (fp32 means rounded at an offset of 1e6 are off by up to 0.06,
// which a merge would square into the variance). finalize adds the shift back once.
template <typename T>
__device__ __forceinline__ acc_t<T> feature_shift(const ForwardParams& p, int64_t f) {
  const T* x = static_cast<const T*>(p.x);
  if (!p.v.channels_last) return to_acc(x[f * p.x_sc]);
  return to_acc(x[(f / p.v.C) * p.v.S * p.x_so + f % p.v.C]);  // ghost g's first row is g * S
}

// Partial state `idx` of the workspace (layout above): written by every statistics kernel (masked
// ones included), read by finalize_forward_kernel.
template <typename A>
__device__ __forceinline__ void store_partial(const ForwardParams& p, int64_t idx, const WelfordState<A>& st) {
  A* ws = static_cast<A*>(p.workspace);
  const int64_t PC = p.partitions * p.v.C;
  ws[idx] = st.mean;
  ws[PC + idx] = st.m2;
  ws[2 * PC + idx] = st.n;
}

template <typename A>
__device__ __forceinline__ WelfordState<A> load_partial(const ForwardParams& p, int64_t idx) {
  const A* ws = static_cast<const A*>(p.workspace);
  const int64_t PC = p.partitions * p.v.C;
  return WelfordState<A>{ws[idx], ws[PC + idx], ws[2 * PC + idx]};
}


// Channels-first statistics: block (c, q) reduces partition q of feature c. Each thread gathers
// U vectors of V elements, takes their exact two-pass moments in registers, and Chan-merges the
// group into its running state; the block then merges its threads in a fixed tree.
// (The block's work, for stats_cf_kernel and forward_single_cf_kernel: every thread calls it.)
template <typename T, int V, int BLOCK>
__device__ __forceinline__ void stats_cf_block(const ForwardParams& p, int64_t c, int64_t q) {
  using A = acc_t<T>;
  // Packs per thread per step: 16 elements for 1- and 2-element packs (rows of odd or
  // 2-mod-4 length, e.g. 7 x 7 = 49), so that each thread has 16 loads in flight rather than 4.
  constexpr int U = V >= 4 ? 2 : (V * sizeof(T) >= 16 ? 4 : 16 / V);
  const int64_t P = p.partitions;
  const int64_t Iv = p.v.I / V;
  const int64_t nvec = p.v.O * Iv;
  const int64_t per = ceil_div(nvec, P);
  const int64_t begin = q * per;
  const int64_t end = begin + per < nvec ? begin + per : nvec;
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  const A shift = to_acc(x[0]);  // see feature_shift

  WelfordState<A> st = welford_empty<A>();
  int64_t k = begin + threadIdx.x;
  if (k < end) {
    RowCursor cur;
    cur.init(k, BLOCK, Iv);
    for (; k < end; k += static_cast<int64_t>(BLOCK) * U) {
      A vals[U * V];
      int valid = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (k + static_cast<int64_t>(u) * BLOCK < end) {
          A v[V];
          load_pack<T, V>(x + cur.o * p.x_so + cur.iv * V, v);
#pragma unroll
          for (int e = 0; e < V; ++e) vals[u * V + e] = v[e] - shift;
          ++valid;
          cur.advance();
        }
      }
      if (valid == U) {
        st = welford_merge(st, welford_of_values<U * V>(vals));
      } else {
        for (int u = 0; u < valid; ++u) {
          A v[V];
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] = vals[u * V + e];
          st = welford_merge(st, welford_of_values<V>(v));
        }
      }
    }
  }
  st = block_merge<BLOCK>(st);
  if (threadIdx.x == 0) store_partial(p, c * P + q, st);
}

template <typename T, int V, int BLOCK>
__global__ void __launch_bounds__(BLOCK) stats_cf_kernel(const ForwardParams p) {
  const int64_t q = block_partition();
  if (q >= p.partitions) return;  // block-uniform, before any barrier
  stats_cf_block<T, V, BLOCK>(p, blockIdx.x, q);
}

// The next U rows of the walk for V features (x: feature c0 of row 0): their loads issued
// together and held as raw packs, then Chan-merged into the thread's running state, shifted by
// `shift`: per feature the group's exact two-pass moments (welford_of_values), one division for
// the group's merge.
template <typename T, int V, int U>
__device__ __forceinline__ void cl_merge_rows(const T* x, RowWalk& w, const Pack<T, V>& shift, acc_t<T> (&mean)[V],
                                              acc_t<T> (&m2)[V], acc_t<T>& n) {
  using A = acc_t<T>;
  Pack<T, V> raw[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    raw[u] = load_raw<T, V>(x + w.row);
    w.advance();
  }
  const A n_new = n + A(U);
  const A f = A(U) / n_new;
  const A wt = n * f;  // na * nb / n
#pragma unroll
  for (int e = 0; e < V; ++e) {
    A v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = to_acc(raw[u].v[e]) - to_acc(shift.v[e]);
    const WelfordState<A> grp = welford_of_values<U>(v);
    const A delta = grp.mean - mean[e];
    mean[e] += delta * f;
    m2[e] += grp.m2 + delta * delta * wt;
  }
  n = n_new;
}

// Channels-last statistics: a block of BX x BY threads (BX * BY = 256) covers BX * V features of
// partition q's rows. Threads walk rows BY apart, 8 rows at a time while 8 remain (then 4, then
// one): the group's loads are issued together and held as raw packs, then merged with one Chan
// merge (its division shared by the V features of the thread). The BY row-groups are then merged
// through shared memory in a fixed order. (Until 2026-12-05 the groups were 4 rows held as
// converted values with a multiplying row cursor: 16-bit inputs then had 64 bytes of loads in
// flight per thread, 32 KB per multiprocessor at 2 blocks; now 128 bytes and 64 KB, still 2
// blocks, at 102 (fp16) / 128 (bf16) registers on sm_90.)
template <typename T, int V, int BX>
__global__ void __launch_bounds__(256) stats_cl_kernel(const ForwardParams p) {
  constexpr int BY = 256 / BX;
  using A = acc_t<T>;
  const int64_t C = p.v.C, P = p.partitions;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * BX + tx) * V;
  // Partition q: chunk j of ghost g's rows (one ghost, G = 1, without ghost batches).
  const int64_t q = block_partition();
  if (q >= P) return;  // block-uniform, before the barrier
  const int64_t per_ghost = P / p.v.G;
  const int64_t g = q / per_ghost, j = q % per_ghost;
  const int64_t R = p.v.ghost_rows();
  const int64_t per = ceil_div(R, per_ghost);
  const int64_t r0 = j * per < R ? j * per : R;
  const int64_t r1 = r0 + per < R ? r0 + per : R;
  const T* x = static_cast<const T*>(p.x) + c0;
  const int64_t so = p.x_so;

  A mean[V], m2[V];
#pragma unroll
  for (int e = 0; e < V; ++e) mean[e] = m2[e] = A(0);
  A n = A(0);
  if (c0 < C) {
    const Pack<T, V> shift = load_raw<T, V>(x + g * p.v.S * so);  // see feature_shift
    int64_t r = r0 + ty;  // ghost row
    RowWalk w;  // w.row: the row's element offset
    w.init(p.v, g, r < R ? r : 0, BY, so);
    for (; r + BY * 7 < r1; r += BY * 8) cl_merge_rows<T, V, 8>(x, w, shift, mean, m2, n);
    if (r + BY * 3 < r1) {
      cl_merge_rows<T, V, 4>(x, w, shift, mean, m2, n);
      r += BY * 4;
    }
    for (; r < r1; r += BY) {
      A v[V];
      load_pack<T, V>(x + w.row, v);
      w.advance();
      n += A(1);
      const A inv = A(1) / n;
#pragma unroll
      for (int e = 0; e < V; ++e) welford_step(mean[e], m2[e], v[e] - to_acc(shift.v[e]), inv);
    }
  }
  __shared__ A sh_mean[BY][BX * V];
  __shared__ A sh_m2[BY][BX * V];
  __shared__ A sh_n[BY][BX];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    sh_mean[ty][tx * V + e] = mean[e];
    sh_m2[ty][tx * V + e] = m2[e];
  }
  sh_n[ty][tx] = n;
  __syncthreads();
  const ColumnReduce<BX, V> col;
  const WelfordState<A> st = col.merge(sh_mean, sh_m2, sh_n);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (BX * V) + col.f;
  if (col.k == 0 && c < C) store_partial(p, q * C + c, st);
}

// One warp per feature: Chan-merge the P partials (lanes stride over partitions, then a fixed
// shuffle tree), then write saved statistics, running statistics and apply coefficients (or, for
// batch_stats, the merged state). Called by a whole warp for feature c (ghost-major) < F.
template <typename T>
__device__ __forceinline__ void finalize_entry(const ForwardParams& p, int64_t c, int lane) {
  using A = acc_t<T>;
  const int64_t C = p.v.C, P = p.partitions, F = p.v.features();
  const A* ws = static_cast<const A*>(p.workspace);
  WelfordState<A> st = welford_empty<A>();
  const int64_t nparts = p.v.channels_last ? P / p.v.G : P;
  // Partial q of this feature sits at base + q * step (partial_index). Each lane merges its
  // partials q = lane, lane + 32, ... in that order, loading four ahead: a merge branches and
  // divides, so without the batch each load waited for the previous merge (channels-last inputs
  // have up to 1024 partitions: 32 dependent L2 round trips per lane).
  const int64_t base = partial_index(p.v, P, c, 0);
  const int64_t step = partial_index(p.v, P, c, 1) - base;
  int64_t q = lane;
  for (; q + 96 < nparts; q += 128) {
    WelfordState<A> b[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) b[k] = load_partial<A>(p, base + (q + 32 * k) * step);
#pragma unroll
    for (int k = 0; k < 4; ++k) st = welford_merge(st, b[k]);
  }
  for (; q < nparts; q += 32) st = welford_merge(st, load_partial<A>(p, base + q * step));
  st = warp_merge(st);
  if (lane != 0) return;
  // (masked statistics: the shift the masked_shift kernels stored; batch_stats returns below,
  // before anything overwrites that region)
  // (a feature with no unmasked element gets mean 0, not its padding)
  st.mean = p.mask ? (st.n > A(0) ? ws[3 * P * C + c] + st.mean : A(0)) : feature_shift<T>(p, c) + st.mean;
  if (p.stat_mean) {  // batch_stats: hand the merged local state to the caller
    static_cast<A*>(p.stat_mean)[c] = st.mean;
    static_cast<A*>(p.stat_m2)[c] = st.m2;
    static_cast<A*>(p.stat_count)[c] = st.n;
    return;
  }
  const A var = biased_var(st);
  const A invstd = invstd_of(var, static_cast<A>(p.eps));
  static_cast<A*>(p.save_mean)[c] = st.mean;
  static_cast<A*>(p.save_invstd)[c] = invstd;
  const A mom = static_cast<A>(p.momentum);
  if (p.running_mean) {
    A* rm = static_cast<A*>(p.running_mean);
    rm[c] = running_update(rm[c], st.mean, mom);
  }
  if (p.running_var) {
    A* rv = static_cast<A*>(p.running_var);
    rv[c] = running_update(rv[c], p.unbiased_running_var ? unbiased_var(st) : var, mom);
  }
  const ApplyCoeffs<A> k =
      apply_coeffs(st.mean, invstd, static_cast<const A*>(p.weight), static_cast<const A*>(p.bias), c);
  A* coeff = static_cast<A*>(p.workspace) + 3 * P * C;
  coeff[c] = k.mean;
  coeff[F + c] = k.scale;
  coeff[2 * F + c] = k.shift;
}

template <typename T>
__global__ void __launch_bounds__(256) finalize_forward_kernel(const ForwardParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);  // feature (ghost-major)
  if (c >= p.v.features()) return;  // warp-uniform
  finalize_entry<T>(p, c, threadIdx.x & 31);
}

// keras_forward's finalize (batch_stats mode, G <= kKerasFusedMaxGhosts): block c, of 32 * G
// threads, is feature c. Warp g merges ghost g's partials exactly as finalize_forward_kernel does
// (the same code, so the statistics are bitwise batch_stats'), then thread 0 runs tf_keras's
// epilogue of the feature (keras_finalize_feature, as keras_finalize_kernel runs it) on them: one
// kernel where batch_stats + keras_coeffs launch two.
template <typename T>
__global__ void __launch_bounds__(32 * kKerasFusedMaxGhosts) keras_stats_finalize_kernel(const ForwardParams p,
                                                                                        const KerasFinalizeParams kp) {
  const int64_t c = blockIdx.x;
  const int64_t g = threadIdx.x >> 5;
  finalize_entry<T>(p, g * kp.C + c, threadIdx.x & 31);
  __syncthreads();  // the ghosts' states, written by each warp's lane 0, are visible to thread 0
  if (threadIdx.x == 0) keras_finalize_feature<acc_t<T>>(kp, c);
}

// Inference: apply coefficients from the running statistics, or from given_* when set (as the
// CPU forward_infer does; running_* may then be null).
template <typename A>
__global__ void __launch_bounds__(256) infer_coeffs_kernel(const ForwardParams p) {
  const int64_t C = p.v.C, F = p.v.features();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= F) return;
  const A* gm = static_cast<const A*>(p.given_mean);
  const A mean = gm ? gm[c] : static_cast<const A*>(p.running_mean)[c];
  const A invstd = gm ? static_cast<const A*>(p.given_invstd)[c]
                      : invstd_of(static_cast<const A*>(p.running_var)[c], static_cast<A>(p.eps));
  const ApplyCoeffs<A> k =
      apply_coeffs(mean, invstd, static_cast<const A*>(p.weight), static_cast<const A*>(p.bias), c);
  A* coeff = static_cast<A*>(p.workspace) + 3 * p.partitions * C;
  coeff[c] = k.mean;
  coeff[F + c] = k.scale;
  coeff[2 * F + c] = k.shift;
}

// Apply coefficients from caller-supplied statistics (staged apply op).
template <typename A>
__global__ void __launch_bounds__(256) given_coeffs_kernel(const ForwardParams p) {
  const int64_t C = p.v.C, F = p.v.features();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= F) return;
  const ApplyCoeffs<A> k =
      apply_coeffs(static_cast<const A*>(p.given_mean)[c], static_cast<const A*>(p.given_invstd)[c],
                   static_cast<const A*>(p.weight), static_cast<const A*>(p.bias), c);
  A* coeff = static_cast<A*>(p.workspace) + 3 * p.partitions * C;
  coeff[c] = k.mean;
  coeff[F + c] = k.scale;
  coeff[2 * F + c] = k.shift;
}

// Merge W per-source states per feature (one warp per feature, sources in a fixed order), then
// the statistics epilogue and the running-statistics update.
template <typename A>
__global__ void __launch_bounds__(256) gather_stats_kernel(const GatherParams g) {
  const int64_t C = g.C, W = g.W;
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (c >= C) return;  // warp-uniform
  const A* mean = static_cast<const A*>(g.mean);
  const A* m2 = static_cast<const A*>(g.m2);
  const A* cnt = static_cast<const A*>(g.count);
  WelfordState<A> st = welford_empty<A>();
  for (int64_t w = lane; w < W; w += 32) st = welford_merge(st, WelfordState<A>{mean[w * C + c], m2[w * C + c], cnt[w * C + c]});
  st = warp_merge(st);
  if (lane != 0) return;
  A* rm = g.running_mean ? static_cast<A*>(g.running_mean) + c : nullptr;
  A* rv = g.running_var ? static_cast<A*>(g.running_var) + c : nullptr;
  const GatheredStats<A> r =
      gather_finalize(st, static_cast<A>(g.eps), static_cast<A>(g.momentum), g.unbiased_running_var, rm, rv);
  static_cast<A*>(g.out_mean)[c] = r.mean;
  static_cast<A*>(g.out_invstd)[c] = r.invstd;
  static_cast<A*>(g.out_count)[c] = r.count;
}

// tf_keras's ghost / renorm epilogue (keras_finalize_feature), one thread per feature.
template <typename A>
__global__ void __launch_bounds__(256) keras_finalize_kernel(const KerasFinalizeParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  keras_finalize_feature<A>(p, c);
}

// Channels-first apply: a grid-stride walk over all (o, c, vector) positions.
template <typename T, int V, int BLOCK>
__global__ void __launch_bounds__(BLOCK) apply_cf_kernel(const ForwardParams p) {
  using A = acc_t<T>;
  const int64_t C = p.v.C, Iv = p.v.I / V, F = C;  // channels-first: no ghosts
  const int64_t total = p.v.O * C * Iv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * BLOCK;
  int64_t k = static_cast<int64_t>(blockIdx.x) * BLOCK + threadIdx.x;
  if (k >= total) return;
  const A* coeff = static_cast<const A*>(p.workspace) + 3 * p.partitions * C;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  FlatCursor cur;
  cur.init(k, stride, C, Iv);
  for (; k < total; k += stride) {
    A v[V];
    load_pack<T, V>(x + cur.o * p.x_so + cur.c * p.x_sc + cur.iv * V, v);
    const ApplyCoeffs<A> kc{coeff[cur.c], coeff[F + cur.c], coeff[2 * F + cur.c]};
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = apply_one(v[e], kc);
    store_pack<T, V>(y + cur.o * p.y_so + cur.c * p.y_sc + cur.iv * V, v);
    cur.advance();
  }
}

// The whole channels-first training forward of a small input in one launch (ForwardParams::
// single_cf, see single_cf_ok): block c is feature c, its one partition. The block takes the
// statistics as stats_cf_kernel's block (c, 0) does, warp 0 finalizes them as
// finalize_forward_kernel's warp does (saved and running statistics, apply coefficients), and the
// block applies them to the feature's rows as apply_cf_kernel does: the same code in the same
// order, so the same bits as those three launches (tests/test_cuda.py holds the two paths to it),
// and the feature's elements, just read, come back from L1 / L2. Two launches fewer is what
// counts on such inputs: in the H200 run of 0e7c4e4 (graph replay), 2x320x4x4x4 NCDHW fp16
// took 12.7 us to cuDNN's 7.4, 32x512x7x7 NCHW 23.9 us to 11.2.
template <typename T, int V, int BLOCK>
__global__ void __launch_bounds__(BLOCK) forward_single_cf_kernel(const ForwardParams p) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.x;
  stats_cf_block<T, V, BLOCK>(p, c, 0);
  __syncthreads();  // thread 0's partial (global memory) is visible to warp 0
  if (threadIdx.x < 32) finalize_entry<T>(p, c, static_cast<int>(threadIdx.x));
  __syncthreads();  // and lane 0's coefficients to the block
  const int64_t C = p.v.C, F = C, Iv = p.v.I / V, nvec = p.v.O * Iv;
  const A* coeff = static_cast<const A*>(p.workspace) + 3 * p.partitions * C;
  const ApplyCoeffs<A> kc{coeff[c], coeff[F + c], coeff[2 * F + c]};
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  T* y = static_cast<T*>(p.y) + c * p.y_sc;
  int64_t k = threadIdx.x;
  if (k >= nvec) return;
  RowCursor cur;
  cur.init(k, BLOCK, Iv);
  constexpr int U = 4;  // vectors per thread whose loads are issued together (single_cf_ok: <= 8 in all)
  for (; k < nvec; k += static_cast<int64_t>(BLOCK) * U) {
    A v[U][V];
    int64_t xo[U], yo[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k + static_cast<int64_t>(u) * BLOCK < nvec) {
        xo[u] = cur.o * p.x_so + cur.iv * V;
        yo[u] = cur.o * p.y_so + cur.iv * V;
        load_pack<T, V>(x + xo[u], v[u]);
        cur.advance();
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k + static_cast<int64_t>(u) * BLOCK < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) v[u][e] = apply_one(v[u][e], kc);
        store_pack<T, V>(y + yo[u], v[u]);
      }
    }
  }
}

// Channels-first apply over dense (O, C, I) data whose rows are not whole 16-byte vectors
// (I % W != 0, e.g. 7 x 7 = 49, where apply_cf_kernel moves 2-byte elements one by one): the
// tensor as one flat run of W-element packs, a pack spanning at most two features (I >= W, see
// flat_cf_ok), then the last n % W elements one each. Per element the same apply_one as
// apply_cf_kernel: the same bits.
template <typename T, int W, int BLOCK>
__global__ void __launch_bounds__(BLOCK) apply_flat_cf_kernel(const ForwardParams p) {
  using A = acc_t<T>;
  const int64_t C = p.v.C, F = C;  // channels-first: no ghosts
  const A* coeff = static_cast<const A*>(p.workspace) + 3 * p.partitions * C;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const auto coeffs = [&](int64_t c) { return ApplyCoeffs<A>{coeff[c], coeff[F + c], coeff[2 * F + c]}; };
  flat_cf_walk<W, BLOCK>(
      p.v,
      [&](int64_t k, int64_t c, int64_t b) {
        A v[W];
        load_pack<T, W>(x + k * W, v);
        const ApplyCoeffs<A> k0 = coeffs(c);
        if (b >= W) {
#pragma unroll
          for (int e = 0; e < W; ++e) v[e] = apply_one(v[e], k0);
        } else {
          const ApplyCoeffs<A> k1 = coeffs(c + 1 == C ? 0 : c + 1);
#pragma unroll
          for (int e = 0; e < W; ++e) v[e] = apply_one(v[e], e < b ? k0 : k1);
        }
        store_pack<T, W>(y + k * W, v);
      },
      [&](int64_t j, int64_t c) { y[j] = from_acc<T>(apply_one(to_acc(x[j]), coeffs(c))); });
}

// Channels-last apply: BX x BY threads; each thread keeps the coefficients of its V features in
// registers and walks rows.
template <typename T, int V, int BX>
__global__ void __launch_bounds__(256) apply_cl_kernel(const ForwardParams p) {
  constexpr int BY = 256 / BX;
  using A = acc_t<T>;
  const int64_t C = p.v.C, O = p.v.O, F = p.v.features();
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * BX + threadIdx.x) * V;
  if (c0 >= C) return;
  const A* coeff = static_cast<const A*>(p.workspace) + 3 * p.partitions * C;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t step = static_cast<int64_t>(gridDim.y) * BY;
  const int64_t r_first = static_cast<int64_t>(blockIdx.y) * BY + threadIdx.y;
  if (p.v.G == 1) {  // one coefficient set: keep it in registers
    ApplyCoeffs<A> kc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) kc[e] = ApplyCoeffs<A>{coeff[c0 + e], coeff[F + c0 + e], coeff[2 * F + c0 + e]};
    constexpr int R = kClRowGroup;
    int64_t r = r_first;
    for (; r + (R - 1) * step < O; r += R * step) {  // R rows' loads issued together
      A v[R][V];
#pragma unroll
      for (int u = 0; u < R; ++u) load_pack<T, V>(x + (r + u * step) * p.x_so + c0, v[u]);
#pragma unroll
      for (int u = 0; u < R; ++u) {
#pragma unroll
        for (int e = 0; e < V; ++e) v[u][e] = apply_one(v[u][e], kc[e]);
        store_pack<T, V>(y + (r + u * step) * p.y_so + c0, v[u]);
      }
    }
    for (; r < O; r += step) {
      A v[V];
      load_pack<T, V>(x + r * p.x_so + c0, v);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = apply_one(v[e], kc[e]);
      store_pack<T, V>(y + r * p.y_so + c0, v);
    }
    return;
  }
  RowGhost rg;  // ghost batches: each row takes its ghost's coefficients
  rg.init(r_first, step, p.v.S, p.v.G);
  for (int64_t r = r_first; r < O; r += step) {
    const int64_t f = rg.g * C + c0;
    A v[V];
    load_pack<T, V>(x + r * p.x_so + c0, v);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const ApplyCoeffs<A> kc{coeff[f + e], coeff[F + f + e], coeff[2 * F + f + e]};
      v[e] = apply_one(v[e], kc);
    }
    store_pack<T, V>(y + r * p.y_so + c0, v);
    rg.advance();
  }
}

}  // namespace cuda
}  // namespace BN_CUDA_NAMESPACE
