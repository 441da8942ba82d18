// Conversion of a call's per-feature tensors (weight, bias, running statistics of another dtype
// than the accumulation type) to and from the accumulation type, all of them in one launch: one
// `.to()` / `copy_` each cost a launch and several microseconds of host time apiece.
#pragma once

#include "common.cuh"

namespace BN_CUDA_NAMESPACE {
namespace cuda {

// Widened to double: exact for every element type.
__device__ __forceinline__ double load_any(const void* p, DType t, int64_t k) {
  switch (t) {
    case DType::kFloat32:
      return to_acc(static_cast<const float*>(p)[k]);
    case DType::kFloat64:
      return to_acc(static_cast<const double*>(p)[k]);
    case DType::kFloat16:
      return to_acc(static_cast<const __half*>(p)[k]);
    case DType::kBFloat16:
      return to_acc(static_cast<const __nv_bfloat16*>(p)[k]);
  }
  return 0.0;
}

// One rounding to nearest-even where the target is narrower than the source: float64 to float32
// directly; to float16 / bfloat16 only from a float32 source (the value is a float32, so the
// cast to float is exact and the one rounding is from_acc's __float2half_rn / __float2bfloat16_rn).
__device__ __forceinline__ void store_any(void* p, DType t, int64_t k, double v) {
  switch (t) {
    case DType::kFloat32:
      static_cast<float*>(p)[k] = static_cast<float>(v);
      return;
    case DType::kFloat64:
      static_cast<double*>(p)[k] = v;
      return;
    case DType::kFloat16:
      static_cast<__half*>(p)[k] = from_acc<__half>(static_cast<float>(v));
      return;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[k] = from_acc<__nv_bfloat16>(static_cast<float>(v));
      return;
  }
}

// Every segment spread over the whole grid (static segment indices: the parameter block stays in
// the constant bank). kBlock: the launch's block size.
template <int kBlock>
__global__ void __launch_bounds__(kBlock) convert_features_kernel(const ConvertParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
#pragma unroll
  for (int s = 0; s < ConvertParams::kMaxSegments; ++s) {
    if (s < p.count) {
      const ConvertSegment& g = p.seg[s];
      for (int64_t k = t0; k < g.n; k += stride) store_any(g.dst, g.dst_t, k, load_any(g.src, g.src_t, k));
    }
  }
}

}  // namespace cuda
}  // namespace BN_CUDA_NAMESPACE
