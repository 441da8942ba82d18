// Typed entry points of one CPU capability; included by kernels_<capability>.cpp after
// CPU_CAPABILITY is defined.
#pragma once

#include "kernels_impl.h"

namespace bn_cuda {
namespace cpu {
inline namespace CPU_CAPABILITY {

#define BN_CUDA_CPU_DTYPE_SWITCH(t, FN, p)       \
  switch (t) {                                    \
    case DType::kFloat32:                         \
      FN<float>(p);                               \
      break;                                      \
    case DType::kFloat64:                         \
      FN<double>(p);                              \
      break;                                      \
    case DType::kFloat16:                         \
      FN<c10::Half>(p);                           \
      break;                                      \
    case DType::kBFloat16:                        \
      FN<c10::BFloat16>(p);                       \
      break;                                      \
  }

void forward_train(DType t, const ForwardParams& p) { BN_CUDA_CPU_DTYPE_SWITCH(t, forward_train, p) }
void forward_infer(DType t, const ForwardParams& p) { BN_CUDA_CPU_DTYPE_SWITCH(t, forward_infer, p) }
void backward(DType t, const BackwardParams& p) { BN_CUDA_CPU_DTYPE_SWITCH(t, backward, p) }

void to_float(DType t, const void* src, float* dst, int64_t n) {
  switch (t) {
    case DType::kFloat32: return cpu::to_float<float>(src, dst, n);
    case DType::kFloat64: return cpu::to_float<double>(src, dst, n);
    case DType::kFloat16: return cpu::to_float<c10::Half>(src, dst, n);
    case DType::kBFloat16: return cpu::to_float<c10::BFloat16>(src, dst, n);
  }
}
void from_float(DType t, const float* src, void* dst, int64_t n) {
  switch (t) {
    case DType::kFloat32: return cpu::from_float<float>(src, dst, n);
    case DType::kFloat64: return cpu::from_float<double>(src, dst, n);
    case DType::kFloat16: return cpu::from_float<c10::Half>(src, dst, n);
    case DType::kBFloat16: return cpu::from_float<c10::BFloat16>(src, dst, n);
  }
}

#undef BN_CUDA_CPU_DTYPE_SWITCH

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace bn_cuda
