// Host-side launchers of the header-only kernels. Each takes a planned params block (see
// plan_forward_cuda / plan_backward_cuda in params.h) and a stream, launches on that stream,
// checks every launch, never synchronizes, and returns the first CUDA error.
// Keep each launch on one line, `kernel<<<grid, block, smem, stream>>>(args);`: the host emulation
// build (setup.py, BN_CUDA_EMULATE=1) rewrites exactly that form.
#pragma once

#include "backward.cuh"
#include "convert.cuh"
#include "forward.cuh"
#include "masked.cuh"

namespace BN_CUDA_NAMESPACE {
namespace cuda {

namespace detail {

inline unsigned grid_1d(int64_t work_items, int64_t per_block, int sm_count, int waves) {
  int64_t blocks = ceil_div(work_items, per_block);
  const int64_t cap = static_cast<int64_t>(sm_count) * waves;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// Rows per block-column for the channels-last element-wise kernels. Without ghosts, blocks for
// kClRowGroup rows per thread (one group of loads issued together, see apply_cl_kernel), each
// thread's 3-4 coefficient loads per feature amortized over them (with one row per thread, e.g.
// 4096x1024 or 256x512x7x7 NHWC fp16 on the H200, the apply took 2.1-2.5x a same-size copy); with
// ghosts, whose rows load their own coefficients one row at a time, blocks for a row per thread.
inline dim3 grid_cl(const View3& v, int vec, int bx, int sm_count) {
  const int by = kCudaBlock / bx;
  const int64_t tiles = ceil_div(ceil_div(v.C, vec), bx);
  int64_t rows = ceil_div(v.O, static_cast<int64_t>(by) * (v.G == 1 ? kClRowGroup : 1));
  int64_t want = ceil_div(static_cast<int64_t>(sm_count) * 16, tiles);
  if (want < 1) want = 1;
  if (rows > want) rows = want;
  if (rows > 65535) rows = 65535;
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(rows < 1 ? 1 : rows));
}

// Grid of the per-(feature, partition) reductions: x = features (channels-first) or feature tiles
// (channels-last), y (and z) = partitions. gridDim.x is at most 2^31 - 1; casting a larger feature
// count to unsigned would silently drop features and leave their workspace partials unwritten, so
// such a shape is refused instead (it needs more than 4e9 elements). gridDim.y is at most 65535,
// but channels-last ghost rows need P >= G partitions (one group per ghost, and G can be the batch
// size, e.g. virtual_batch_size = 1): partitions past 65535 continue along z (block_partition),
// and the blocks of the last z-slice past P return at once.
inline bool reduction_grid(const View3& v, int vec, int bx, int64_t partitions, dim3& grid) {
  const int64_t gx = v.channels_last ? ceil_div(ceil_div(v.C, vec), bx) : v.C;
  if (gx < 1 || gx > 2147483647 || partitions < 1) return false;
  const int64_t gz = ceil_div(partitions, 65535);
  if (gz > 65535) return false;
  const int64_t gy = ceil_div(partitions, gz);
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  return true;
}

// The statistics' finalize: finalize_forward_kernel, or with p.keras the fused tf_keras
// epilogue (keras_stats_finalize_kernel).
template <typename T>
cudaError_t launch_forward_finalize(const ForwardParams& p, cudaStream_t stream) {
  if (p.keras != nullptr) {
    const KerasFinalizeParams& kp = *p.keras;
    if (!p.stat_mean || kp.G < 1 || kp.G > kKerasFusedMaxGhosts || kp.G * kp.C != p.v.features() ||
        kp.C > 2147483647)
      return cudaErrorInvalidValue;
    if (kp.C == 0) return cudaSuccess;
    keras_stats_finalize_kernel<T><<<static_cast<unsigned>(kp.C), static_cast<unsigned>(32 * kp.G), 0, stream>>>(p, kp);
  } else {
    finalize_forward_kernel<T><<<static_cast<unsigned>(ceil_div(p.v.features(), 8)), 256, 0, stream>>>(p);
  }
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

template <typename T, int V, int BX>
cudaError_t launch_apply(const ForwardParams& p, cudaStream_t stream) {
  const View3& v = p.v;
  if (p.flat_cf) {  // rows of 49 and the like: 16-byte packs
    constexpr int W = static_cast<int>(16 / sizeof(T));
    const unsigned grid = grid_1d(ceil_div(v.O * v.C * v.I, W), kCudaBlock, p.sm_count, 16);
    apply_flat_cf_kernel<T, W, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  } else if (!v.channels_last) {
    const unsigned grid = grid_1d(v.O * v.C * (v.I / V), kCudaBlock, p.sm_count, 16);
    apply_cf_kernel<T, V, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  } else {
    apply_cl_kernel<T, V, BX><<<grid_cl(v, V, BX, p.sm_count), dim3(BX, kCudaBlock / BX), 0, stream>>>(p);
  }
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

template <typename T, int V, int BX>
cudaError_t launch_stats(const ForwardParams& p, cudaStream_t stream) {
  const View3& v = p.v;
  dim3 grid;
  if (!reduction_grid(v, V, BX, p.partitions, grid)) return cudaErrorInvalidConfiguration;
  if (!v.channels_last) {
    stats_cf_kernel<T, V, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  } else {
    stats_cl_kernel<T, V, BX><<<grid, dim3(BX, kCudaBlock / BX), 0, stream>>>(p);
  }
  BN_CUDA_RETURN_IF_ERROR();
  return launch_forward_finalize<T>(p, stream);
}

// Staged: the merged local Welford state per feature (p.stat_*), nothing else.
template <typename T, int V, int BX>
cudaError_t batch_stats_v(const ForwardParams& p, cudaStream_t stream) {
  return launch_stats<T, V, BX>(p, stream);
}

// Staged: normalize with caller-supplied statistics (p.given_*).
template <typename T, int V, int BX>
cudaError_t apply_given_v(const ForwardParams& p, cudaStream_t stream) {
  if (!p.coeffs_given) {
    given_coeffs_kernel<acc_t<T>><<<static_cast<unsigned>(ceil_div(p.v.features(), 256)), 256, 0, stream>>>(p);
    BN_CUDA_RETURN_IF_ERROR();
  }
  return launch_apply<T, V, BX>(p, stream);
}

// Training forward: statistics, finalize (saved + running statistics, coefficients), apply.
template <typename T, int V, int BX>
cudaError_t forward_train_v(const ForwardParams& p, cudaStream_t stream) {
  if (p.single_cf && p.stat_mean == nullptr && p.keras == nullptr && p.mask == nullptr && p.y != nullptr &&
      p.partitions == 1 && !p.v.channels_last && p.v.G == 1) {  // small channels-first input: one launch
    if (p.v.C > 2147483647) return cudaErrorInvalidConfiguration;
    forward_single_cf_kernel<T, V, kCudaBlock><<<static_cast<unsigned>(p.v.C), kCudaBlock, 0, stream>>>(p);
    BN_CUDA_RETURN_IF_ERROR();
    return cudaSuccess;
  }
  const cudaError_t err = launch_stats<T, V, BX>(p, stream);
  // With stat_mean set, finalize hands over the merged state and writes no apply coefficients
  // (and y may be null): stop there, as the CPU forward_train does.
  if (err != cudaSuccess || p.stat_mean != nullptr) return err;
  return launch_apply<T, V, BX>(p, stream);
}

template <typename T, int V, int BX>
cudaError_t forward_infer_v(const ForwardParams& p, cudaStream_t stream) {
  infer_coeffs_kernel<acc_t<T>><<<static_cast<unsigned>(ceil_div(p.v.features(), 256)), 256, 0, stream>>>(p);
  BN_CUDA_RETURN_IF_ERROR();
  return launch_apply<T, V, BX>(p, stream);
}

template <typename T, int V, int BX>
cudaError_t launch_grad_input(const BackwardParams& p, cudaStream_t stream) {
  const View3& v = p.v;
  if (p.flat_cf) {  // rows of 49 and the like: 16-byte packs
    constexpr int W = static_cast<int>(16 / sizeof(T));
    const unsigned grid = grid_1d(ceil_div(v.O * v.C * v.I, W), kCudaBlock, p.sm_count, 16);
    grad_input_flat_cf_kernel<T, W, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  } else if (!v.channels_last) {
    const unsigned grid = grid_1d(v.O * v.C * (v.I / V), kCudaBlock, p.sm_count, 16);
    grad_input_cf_kernel<T, V, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  } else {
    grad_input_cl_kernel<T, V, BX><<<grid_cl(v, V, BX, p.sm_count), dim3(BX, kCudaBlock / BX), 0, stream>>>(p);
  }
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

// Staged: grad_input from caller-supplied sums and counts (p.given_*).
template <typename T, int V, int BX>
cudaError_t backward_apply_v(const BackwardParams& p, cudaStream_t stream) {
  given_grad_coeffs_kernel<acc_t<T>><<<static_cast<unsigned>(ceil_div(p.v.features(), 256)), 256, 0, stream>>>(p);
  BN_CUDA_RETURN_IF_ERROR();
  return launch_grad_input<T, V, BX>(p, stream);
}

template <typename T, int V, int BX>
cudaError_t backward_v(const BackwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const View3& v = p.v;
  if (p.single_cf && p.keras_grads == nullptr && p.mask == nullptr && p.given_sum_dy == nullptr &&
      p.dx != nullptr && p.partitions == 1 && !v.channels_last && v.G == 1) {  // small channels-first input: one launch
    if (v.C > 2147483647) return cudaErrorInvalidConfiguration;
    backward_single_cf_kernel<T, V, kCudaBlock><<<static_cast<unsigned>(v.C), kCudaBlock, 0, stream>>>(p);
    BN_CUDA_RETURN_IF_ERROR();
    return cudaSuccess;
  }
  if (p.partitions > 0) {
    dim3 grid;
    if (!reduction_grid(v, V, BX, p.partitions, grid)) return cudaErrorInvalidConfiguration;
    if (!v.channels_last) {
      grad_sums_cf_kernel<T, V, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
    } else {
      grad_sums_cl_kernel<T, V, BX><<<grid, dim3(BX, kCudaBlock / BX), 0, stream>>>(p);
    }
    BN_CUDA_RETURN_IF_ERROR();
  }
  if (p.keras_grads != nullptr) {  // keras_backward: keras_grads in the finalize kernel
    const KerasGradParams& kp = *p.keras_grads;
    if (kp.G < 1 || kp.G > kKerasFusedMaxGhosts || kp.G * kp.C != v.features() || kp.C > 2147483647 ||
        kp.d_scale != p.grad_weight || kp.d_shift != p.grad_bias)
      return cudaErrorInvalidValue;
    if (kp.C > 0) {
      keras_backward_finalize_kernel<A><<<static_cast<unsigned>(kp.C), static_cast<unsigned>(32 * kp.G), 0, stream>>>(p, kp);
    }
  } else {
    finalize_backward_kernel<A><<<static_cast<unsigned>(ceil_div(v.features(), 8)), 256, 0, stream>>>(p);
  }
  BN_CUDA_RETURN_IF_ERROR();
  return p.dx ? launch_grad_input<T, V, BX>(p, stream) : cudaSuccess;
}

// Compile-time vector width and tile shape from the planned run-time values.
template <typename T, template <typename, int, int> class Fn, typename Params>
cudaError_t by_shape(const Params& p, cudaStream_t stream) {
  constexpr int kMaxVec = static_cast<int>(16 / sizeof(T));
  const bool wide = p.block_x == 32;
  switch (p.vec) {
    case 1:
      return wide ? Fn<T, 1, 32>::run(p, stream) : Fn<T, 1, 8>::run(p, stream);
    case 2:
      return wide ? Fn<T, 2, 32>::run(p, stream) : Fn<T, 2, 8>::run(p, stream);
    case 4:
      if constexpr (kMaxVec >= 4) return wide ? Fn<T, 4, 32>::run(p, stream) : Fn<T, 4, 8>::run(p, stream);
      break;
    case 8:
      if constexpr (kMaxVec >= 8) return wide ? Fn<T, 8, 32>::run(p, stream) : Fn<T, 8, 8>::run(p, stream);
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

template <typename T, int V, int BX>
struct ForwardTrainFn {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return forward_train_v<T, V, BX>(p, s); }
};
template <typename T, int V, int BX>
struct ForwardInferFn {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return forward_infer_v<T, V, BX>(p, s); }
};
template <typename T, int V, int BX>
struct BackwardFn {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return backward_v<T, V, BX>(p, s); }
};
template <typename T, int V, int BX>
struct BatchStatsFn {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return batch_stats_v<T, V, BX>(p, s); }
};
template <typename T, int V, int BX>
struct ApplyGivenFn {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return apply_given_v<T, V, BX>(p, s); }
};
template <typename T, int V, int BX>
struct BackwardApplyFn {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return backward_apply_v<T, V, BX>(p, s); }
};

// Masked statistics (batch_stats / grad_input with p.mask): one element per access.
template <typename T>
cudaError_t masked_batch_stats(const ForwardParams& p, cudaStream_t stream) {
  const View3& v = p.v;
  const int bx = v.C >= 32 ? 32 : 8;  // channels-last tile width (one feature per thread column)
  dim3 grid;
  if (!reduction_grid(v, 1, bx, p.partitions, grid)) return cudaErrorInvalidConfiguration;
  if (!p.stat_mean) return cudaErrorInvalidValue;  // masked statistics run as batch_stats only
  if (!v.channels_last) {
    masked_shift_cf_kernel<T, kCudaBlock><<<grid.x, kCudaBlock, 0, stream>>>(p);
  } else {
    masked_shift_cl_kernel<T><<<static_cast<unsigned>(ceil_div(v.C, 256)), 256, 0, stream>>>(p);
  }
  BN_CUDA_RETURN_IF_ERROR();
  if (!v.channels_last) {
    masked_stats_cf_kernel<T, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  } else if (bx == 32) {
    masked_stats_cl_kernel<T, 32><<<grid, dim3(32, 8), 0, stream>>>(p);
  } else {
    masked_stats_cl_kernel<T, 8><<<grid, dim3(8, 32), 0, stream>>>(p);
  }
  BN_CUDA_RETURN_IF_ERROR();
  return launch_forward_finalize<T>(p, stream);
}

template <typename T>
cudaError_t masked_grad_input(const BackwardParams& p, cudaStream_t stream) {
  given_grad_coeffs_kernel<acc_t<T>><<<static_cast<unsigned>(ceil_div(p.v.features(), 256)), 256, 0, stream>>>(p);
  BN_CUDA_RETURN_IF_ERROR();
  const unsigned grid = grid_1d(p.v.O * p.v.C * p.v.I, kCudaBlock, p.sm_count, 16);
  masked_grad_input_kernel<T, kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

}  // namespace detail

// Forward training: statistics, finalize (saved + running statistics), apply. T is the element
// type (float, double, __half, __nv_bfloat16).
template <typename T>
cudaError_t forward_train(const ForwardParams& p, cudaStream_t stream) {
  return detail::by_shape<T, detail::ForwardTrainFn>(p, stream);
}

// Forward inference with the running statistics.
template <typename T>
cudaError_t forward_infer(const ForwardParams& p, cudaStream_t stream) {
  return detail::by_shape<T, detail::ForwardInferFn>(p, stream);
}

// Backward: sums, finalize (grad_weight / grad_bias / coefficients), grad_input.
template <typename T>
cudaError_t backward(const BackwardParams& p, cudaStream_t stream) {
  return detail::by_shape<T, detail::BackwardFn>(p, stream);
}

// Staged ops, for cross-process statistics and other compositions: local Welford state per
// feature; merge of W such states (+ running statistics); apply with given statistics; local
// backward sums (backward<T> with out_sum_* set); grad_input from given sums.
template <typename T>
cudaError_t batch_stats(const ForwardParams& p, cudaStream_t stream) {
  if (p.mask) return detail::masked_batch_stats<T>(p, stream);
  return detail::by_shape<T, detail::BatchStatsFn>(p, stream);
}

template <typename T>
cudaError_t apply_given(const ForwardParams& p, cudaStream_t stream) {
  return detail::by_shape<T, detail::ApplyGivenFn>(p, stream);
}

template <typename T>
cudaError_t backward_apply(const BackwardParams& p, cudaStream_t stream) {
  if (p.mask) return detail::masked_grad_input<T>(p, stream);
  return detail::by_shape<T, detail::BackwardApplyFn>(p, stream);
}

// tf_keras's per-feature epilogue of ghost batches / batch renormalization (epilogue.h).
template <typename A>
cudaError_t keras_finalize(const KerasFinalizeParams& p, cudaStream_t stream) {
  if (p.C == 0) return cudaSuccess;
  keras_finalize_kernel<A><<<static_cast<unsigned>(ceil_div(p.C, 256)), 256, 0, stream>>>(p);
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

// The gradients of keras_coeffs' composition (epilogue.h's keras_grads_compose).
template <typename A>
cudaError_t keras_grads(const KerasGradParams& p, cudaStream_t stream) {
  if (p.C == 0) return cudaSuccess;
  keras_grads_kernel<A><<<static_cast<unsigned>(ceil_div(p.C, 8)), 256, 0, stream>>>(p);
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

template <typename A>
cudaError_t gather_stats(const GatherParams& g, cudaStream_t stream) {
  if (g.C == 0) return cudaSuccess;
  gather_stats_kernel<A><<<static_cast<unsigned>(ceil_div(g.C, 8)), 256, 0, stream>>>(g);
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

// A call's per-feature conversions (convert.cuh): grid sized by the longest segment.
inline cudaError_t convert_features(const ConvertParams& p, cudaStream_t stream) {
  if (p.count < 0 || p.count > ConvertParams::kMaxSegments) return cudaErrorInvalidValue;
  int64_t longest = 0;
  for (int s = 0; s < p.count; ++s) longest = p.seg[s].n > longest ? p.seg[s].n : longest;
  if (longest == 0) return cudaSuccess;
  const unsigned grid = detail::grid_1d(longest, kCudaBlock, p.sm_count, 4);
  convert_features_kernel<kCudaBlock><<<grid, kCudaBlock, 0, stream>>>(p);
  BN_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace BN_CUDA_NAMESPACE
