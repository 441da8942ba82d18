// Typed entry points of one CPU capability; included by kernels_<capability>.cpp after
// CPU_CAPABILITY is defined.
#pragma once

#include "kernels_impl.h"

namespace bn_cuda {
namespace cpu {
inline namespace CPU_CAPABILITY {

// Calls FN<T>(args...) with T the element type named by t.
#define BN_CUDA_CPU_DTYPE_SWITCH(t, FN, ...)         \
  switch (t) {                                        \
    case DType::kFloat32:                             \
      return FN<float>(__VA_ARGS__);                  \
    case DType::kFloat64:                             \
      return FN<double>(__VA_ARGS__);                 \
    case DType::kFloat16:                             \
      return FN<c10::Half>(__VA_ARGS__);              \
    case DType::kBFloat16:                            \
      return FN<c10::BFloat16>(__VA_ARGS__);          \
  }

void forward_train(DType t, const ForwardParams& p) { BN_CUDA_CPU_DTYPE_SWITCH(t, forward_train, p) }
void forward_infer(DType t, const ForwardParams& p) { BN_CUDA_CPU_DTYPE_SWITCH(t, forward_infer, p) }
void backward(DType t, const BackwardParams& p) { BN_CUDA_CPU_DTYPE_SWITCH(t, backward, p) }
void to_float(DType t, const void* src, float* dst, int64_t n) { BN_CUDA_CPU_DTYPE_SWITCH(t, to_float, src, dst, n) }
void from_float(DType t, const float* src, void* dst, int64_t n) {
  BN_CUDA_CPU_DTYPE_SWITCH(t, from_float, src, dst, n)
}

#undef BN_CUDA_CPU_DTYPE_SWITCH

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace bn_cuda
