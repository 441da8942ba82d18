// Plain-old-data parameter blocks passed from the torch glue to the torch-free kernels, and the
// host-side planning (vector width, number of partial reductions) shared by both devices.
//
// Every kernel sees its tensors through one canonical 3-D view (O, C, I):
//   O = product of the reduced dims before the features, C = product of the feature dims,
//   I = product of the reduced dims after the features.
// Two layouts reach the kernels (the glue copies anything else into one of them):
//   channels-first: inner stride 1, outer / feature strides arbitrary      (NCHW-like, I >= 1)
//   channels-last:  I == 1, feature stride 1, outer stride arbitrary       (NHWC-like)
// Outputs (y, dx) are always written densely as (O, C, I). Sizes and strides are int64.
#pragma once

#include <cstddef>
#include <cstdint>

#include "config.h"

namespace BN_CUDA_NAMESPACE {

// Element type of the input / output tensors (per-feature tensors use acc_t of it).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline size_t dtype_size(DType t) {
  return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2);
}
inline size_t acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

struct View3 {
  int64_t O = 0, C = 0, I = 1;
  bool channels_last = false;
  // Ghost batches on a channels-last view (tf_keras's virtual_batch_size): the O rows are
  // (vbs, G, S) in row-major order (S rows per sample, G ghosts, sample n in ghost n % G), and
  // every per-feature array (statistics, coefficients, weights) has G * C entries, ghost-major.
  // Partitions then come in G groups of partitions / G, group g covering ghost g's rows.
  int64_t G = 1, S = 1;
  BN_HD int64_t features() const { return G * C; }
  BN_HD int64_t ghost_rows() const { return O / G; }
};

struct KerasFinalizeParams;  // epilogue.h
struct KerasGradParams;      // epilogue.h

// keras_forward on CUDA runs tf_keras's epilogue (keras_finalize_feature) in the statistics'
// finalize kernel, a block per feature and a warp per ghost, when there are at most this many
// ghosts (more: its own kernel after the finalize, as the separate ops run it); keras_backward
// likewise runs keras_grads in the backward's finalize kernel.
constexpr int64_t kKerasFusedMaxGhosts = 16;

struct ForwardParams {
  View3 v;
  const void* x = nullptr;  // input, strides (x_so, x_sc, 1)
  int64_t x_so = 0, x_sc = 0;
  void* y = nullptr;  // output, strides (y_so, y_sc, 1)
  int64_t y_so = 0, y_sc = 0;
  // Per-feature tensors, all of the accumulation type (float, or double for fp64 input), C long.
  const void* weight = nullptr;  // may be null (scale 1)
  const void* bias = nullptr;    // may be null (shift 0)
  void* running_mean = nullptr;  // training: updated in place when given; inference: read
  void* running_var = nullptr;
  void* save_mean = nullptr;  // training: written
  void* save_invstd = nullptr;
  double momentum = 0.1;
  double eps = 1e-5;
  bool unbiased_running_var = true;  // Bessel-correct the variance fed to running_var
  // Staged use. batch_stats: the merged local Welford state of each feature is written here
  // (acc type, C each) and nothing else happens. apply: normalize with these caller-supplied
  // statistics (acc type, C each) instead of computing any.
  void* stat_mean = nullptr;
  void* stat_m2 = nullptr;
  void* stat_count = nullptr;
  const void* given_mean = nullptr;
  const void* given_invstd = nullptr;
  // apply with given statistics: the workspace already holds the apply coefficients (mean, scale,
  // shift per feature; keras_forward's epilogue kernel wrote them), so none are computed.
  bool coeffs_given = false;
  // Masked statistics (batch_stats): 0/1 weights per element as bytes, viewed like x with strides
  // (m_so, m_sc, 1) (channels-last: (m_so, m_sc)); statistics are the weighted moments.
  const uint8_t* mask = nullptr;
  int64_t m_so = 0, m_sc = 0;
  // batch_stats, host side only (the launcher passes the struct itself to the kernel): run this
  // tf_keras epilogue in the finalize kernel (keras_stats_finalize_kernel); null: finalize alone.
  // Its per-(ghost, feature) statistics must be stat_mean / stat_m2 / stat_count, G * C = features,
  // and G <= kKerasFusedMaxGhosts.
  const KerasFinalizeParams* keras = nullptr;
  // Scratch space, planned by plan_*; its size comes from forward_workspace_bytes.
  void* workspace = nullptr;
  int64_t partitions = 1;  // partial reductions per feature
  int vec = 1;             // elements per vector access
  int block_x = 32;        // CUDA channels-last tiles: threads across features (block_x * vec)
  int sm_count = 1;        // CUDA: multiprocessors, for grid sizing
  bool flat_cf = false;    // CUDA: the element-wise step as one flat run of 16-byte packs (flat_cf_ok)
  // CUDA forward_train: statistics, finalize and apply in one launch, a block per feature
  // (single_cf_ok; planned with one partition). The host may clear it (the same bits either way).
  bool single_cf = false;
};

struct BackwardParams {
  View3 v;
  const void* dy = nullptr;  // strides (dy_so, dy_sc, 1), same layout class as x
  int64_t dy_so = 0, dy_sc = 0;
  const void* x = nullptr;
  int64_t x_so = 0, x_sc = 0;
  void* dx = nullptr;  // strides (dx_so, dx_sc, 1); null: not wanted
  int64_t dx_so = 0, dx_sc = 0;
  const void* weight = nullptr;  // acc type, may be null
  const void* mean = nullptr;    // acc type, C
  const void* invstd = nullptr;  // acc type, C
  void* grad_weight = nullptr;   // acc type, C; null: not wanted
  void* grad_bias = nullptr;     // acc type, C; null: not wanted
  bool train = true;             // false: mean / invstd are constants (inference backward)
  // Staged use. backward_reduce: the per-feature sums are written here and nothing else happens.
  // backward_apply: grad_input from caller-supplied (e.g. all-reduced) sums and total counts.
  void* out_sum_dy = nullptr;
  void* out_sum_dy_xmu = nullptr;
  const void* given_sum_dy = nullptr;
  const void* given_sum_dy_xmu = nullptr;
  const void* given_count = nullptr;
  // Masked statistics (grad_input of weighted moments): dx = k_dy dy + w (k_xmu (x - mean) + k_0).
  const uint8_t* mask = nullptr;
  int64_t m_so = 0, m_sc = 0;
  // Host side only (the launcher passes the struct itself): run keras_grads on this call's
  // grad_weight / grad_bias in the finalize kernel (keras_backward_finalize_kernel); its d_scale /
  // d_shift must be grad_weight / grad_bias, G * C = features, G <= kKerasFusedMaxGhosts.
  const KerasGradParams* keras_grads = nullptr;
  void* workspace = nullptr;
  int64_t partitions = 1;
  int vec = 1;
  int block_x = 32;
  int sm_count = 1;
  bool flat_cf = false;
  bool single_cf = false;  // CUDA backward: sums, finalize and grad_input in one launch (as ForwardParams')
};

// Merge of per-feature Welford states from W sources (e.g. one row per process): rows of
// (mean, m2, count), each W x C, acc type, merged in row order.
struct GatherParams {
  int64_t W = 0, C = 0;
  const void* mean = nullptr;
  const void* m2 = nullptr;
  const void* count = nullptr;
  void* running_mean = nullptr;  // updated when given and the total count is > 0
  void* running_var = nullptr;
  void* out_mean = nullptr;  // C each
  void* out_invstd = nullptr;
  void* out_count = nullptr;
  double momentum = 0.1;
  double eps = 1e-5;
  bool unbiased_running_var = true;
};

// Per-feature tensors converted between their dtype and the accumulation type in one launch
// (convert_features_kernel): segment s moves n contiguous elements from src (src_t) to dst
// (dst_t); every segment is spread over the whole grid. The conversions are exact
// (float16 / bfloat16 / float32 to a wider type) or one rounding to nearest-even (float32 to
// float16 / bfloat16, float64 to float32), as Tensor::to's.
struct ConvertSegment {
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t n = 0;
  DType src_t = DType::kFloat32, dst_t = DType::kFloat32;
};

struct ConvertParams {
  static constexpr int kMaxSegments = 8;
  ConvertSegment seg[kMaxSegments];
  int count = 0;
  int sm_count = 1;
};

// ---------------------------------------------------------------------------------------------
// Planning.

inline bool aligned_to(const void* p, size_t bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Widest vector (16 bytes, or 1 element) such that every vector access of every listed tensor is
// aligned and never straddles a row.
inline int pick_vec(const View3& v, size_t elem_size, const void* const* ptrs, const int64_t* strides,
                    int n) {
  int vec = static_cast<int>(16 / elem_size);
  if (vec < 1) vec = 1;
  while (vec > 1) {
    bool ok = true;
    const int64_t run = v.channels_last ? v.C : v.I;  // contiguous run length
    if (run % vec != 0) ok = false;
    for (int k = 0; ok && k < n; ++k) {
      if (!aligned_to(ptrs[k], elem_size * vec)) ok = false;
      if (strides[2 * k] % vec != 0 || (!v.channels_last && strides[2 * k + 1] % vec != 0)) ok = false;
    }
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

BN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether the channels-first element-wise kernels walk the data as one flat run of 16-byte
// packs (apply_flat_cf_kernel, grad_input_flat_cf_kernel) instead of row by row: rows that are
// not whole 16-byte vectors (vec below the full width, e.g. 7 x 7 = 49 elements), at least one
// full pack long (a pack then spans at most two features), and every tensor dense in (O, C, I)
// order from a 16-byte aligned base. ptrs / strides as pick_vec's.
inline bool flat_cf_ok(const View3& v, int vec, size_t elem_size, const void* const* ptrs, const int64_t* strides,
                       int n) {
  const int64_t full = static_cast<int64_t>(16 / elem_size);
  if (v.channels_last || v.G != 1 || vec >= full || v.I < full) return false;
  for (int k = 0; k < n; ++k) {
    if (!aligned_to(ptrs[k], 16)) return false;
    if (v.O > 1 && strides[2 * k] != v.C * v.I) return false;
    if (v.C > 1 && strides[2 * k + 1] != v.I) return false;
  }
  return true;
}


// CUDA: enough blocks to fill the GPU a few times over, each with enough work to amortize its
// partial state. The split depends only on the shape and the SM count, so results are bitwise
// reproducible on a given GPU.
constexpr int kCudaBlock = 256;

inline int64_t plan_partitions_cuda(const View3& v, int vec, int block_x, int sm_count) {
  const int64_t target_blocks = static_cast<int64_t>(sm_count) * 4;
  int64_t parts, max_parts;
  if (!v.channels_last) {
    const int64_t per_feature = v.O * v.I / vec;  // vectors per feature
    max_parts = ceil_div(per_feature, kCudaBlock * 4);
    parts = ceil_div(target_blocks, v.C);
  } else {
    // At least 4 rows (one unrolled step of the stats loop) per thread of a partition, as the
    // channels-first split keeps at least 4 vectors per thread. (It was 16 rows: on the H200,
    // 2x64x112x112 NHWC then made 49 stats blocks for 132 SMs and 32x256x14x14 NHWC 49, and the
    // training forward of such mid-size NHWC inputs took 2-2.8x cuDNN's kernel time.)
    const int64_t block_y = kCudaBlock / block_x;
    const int64_t tiles = ceil_div(ceil_div(v.C, vec), block_x);
    max_parts = ceil_div(v.ghost_rows(), block_y * 4);
    parts = ceil_div(target_blocks, tiles * v.G);
  }
  if (parts > max_parts) parts = max_parts;
  // Prefer grids whose partitions fit gridDim.y (65535); with more ghosts than that, each ghost
  // still needs a partition and reduction_grid continues along gridDim.z.
  if (parts * v.G > 65535) parts = 65535 / v.G;
  if (parts > 1024) parts = 1024;
  return (parts < 1 ? 1 : parts) * (v.channels_last ? v.G : 1);
}

// Fill vec, flat_cf, block_x, partitions and sm_count of a CUDA call. `ptrs` / `strides` list
// every tensor the kernels touch with (outer, feature) element strides.
template <typename Params>
inline void plan_cuda(Params& p, DType t, int sm_count, const void* const* ptrs, const int64_t* strides, int n) {
  p.sm_count = sm_count;
  p.vec = pick_vec(p.v, dtype_size(t), ptrs, strides, n);
  p.flat_cf = flat_cf_ok(p.v, p.vec, dtype_size(t), ptrs, strides, n);
  const int64_t lanes = ceil_div(p.v.C, p.vec);
  p.block_x = lanes >= 32 ? 32 : 8;
  p.partitions = plan_partitions_cuda(p.v, p.vec, p.block_x, sm_count);
}

// Whether a channels-first training forward runs as one launch (forward_single_cf_kernel: a
// block of kCudaBlock threads per feature, its one partition): at most 4 of the feature's vectors
// per thread (plan_partitions_cuda gives such inputs one partition anyway), or, with at least a
// block per multiprocessor, 8 (e.g. 32x512x7x7 and 32x256x14x14: 1568 vectors; two partitions
// before). Past that, I estimate (not yet measured on a GPU) that one block's serial load rounds
// per feature cost more than the two launches saved. A function of the shape and the SM count
// only, as the partitions are.
inline bool single_cf_ok(const View3& v, int vec, int sm_count) {
  if (v.channels_last || v.G != 1 || v.C < 1 || v.I < 1) return false;
  const int64_t nvec = v.O * (v.I / vec);
  return nvec <= kCudaBlock * 4 || (v.C >= sm_count && nvec <= kCudaBlock * 8);
}

inline void plan_forward_cuda(ForwardParams& p, DType t, int sm_count) {
  const void* ptrs[2] = {p.x, p.y};
  const int64_t strides[4] = {p.x_so, p.x_sc, p.y_so, p.y_sc};
  plan_cuda(p, t, sm_count, ptrs, strides, 2);
  p.single_cf = single_cf_ok(p.v, p.vec, sm_count);
  if (p.single_cf) p.partitions = 1;
}

inline void plan_backward_cuda(BackwardParams& p, DType t, int sm_count) {
  const void* ptrs[3] = {p.x, p.dy, p.dx};
  const int64_t strides[6] = {p.x_so, p.x_sc, p.dy_so, p.dy_sc, p.dx ? p.dx_so : 0, p.dx ? p.dx_sc : 0};
  plan_cuda(p, t, sm_count, ptrs, strides, 3);
  // As the CPU backward: given sums replace the local ones for every output.
  const bool need_sums =
      p.given_sum_dy == nullptr && (p.grad_weight || p.grad_bias || p.out_sum_dy || (p.dx && p.train));
  if (!need_sums) p.partitions = 0;
  p.single_cf = need_sums && single_cf_ok(p.v, p.vec, sm_count);
  if (p.single_cf) p.partitions = 1;
}

// CPU: a fixed amount of work per partial (independent of the thread count), so the result does
// not depend on how many threads ran it.
constexpr int64_t kCpuChunkElems = 1 << 15;

inline int64_t plan_partitions_cpu(const View3& v) {
  if (!v.channels_last) {
    const int64_t rows_per_part = v.I >= kCpuChunkElems ? 1 : kCpuChunkElems / v.I;
    int64_t parts = ceil_div(v.O, rows_per_part);
    return parts < 1 ? 1 : parts;
  }
  const int64_t rows_per_part = v.C >= kCpuChunkElems ? 1 : kCpuChunkElems / v.C;
  int64_t parts = ceil_div(v.ghost_rows(), rows_per_part < 16 ? 16 : rows_per_part);
  // A multiple of 8 partitions (while each keeps >= 16 rows), so that 2, 4 or 8 threads get the
  // same number of rows: 8x256x14x14 made 13 partitions of 128 rows (the last of 32), 896 rows
  // for one of two threads and 672 for the other; as 16 partitions of 98 rows, in-cache on 2
  // AVX2 threads, the backward took 0.116 -> 0.092 ms and the forward 0.082 -> 0.077 ms. Still a
  // function of the shape only, so the result does not depend on the thread count.
  const int64_t rounded = ceil_div(parts, int64_t(8)) * 8;
  if (parts > 1 && ceil_div(v.ghost_rows(), rounded) >= 16) parts = rounded;
  return (parts < 1 ? 1 : parts) * v.G;  // G groups (one per ghost)
}

// Rows [begin, end) of the outer dim (channels-last) or of the per-feature flat range
// (channels-first, in vectors) handled by partition `part` of `parts`.
inline int64_t part_size(int64_t total, int64_t parts) { return ceil_div(total, parts); }

// Workspace: partial states (3 acc per feature per partition for the forward, 2 for the
// backward) followed by per-feature apply coefficients (3 for the forward, 4 for the backward).
inline size_t forward_workspace_bytes(const View3& v, int64_t partitions, size_t acc_size) {
  return acc_size * static_cast<size_t>(3 * partitions * v.C + 3 * v.features());
}
inline size_t backward_workspace_bytes(const View3& v, int64_t partitions, size_t acc_size) {
  return acc_size * static_cast<size_t>(2 * partitions * v.C + 4 * v.features());
}

}  // namespace BN_CUDA_NAMESPACE
