// Typed CUDA entry points, defined in the torch-free per-variant .cu files of this folder.
// Included by the torch glue, so it names element types only through bn_cuda::DType.
#pragma once

#include <cuda_runtime_api.h>

#include "bn_cuda/params.h"

namespace bn_cuda {
namespace cuda {

template <DType D>
cudaError_t forward_train_t(const ForwardParams& p, cudaStream_t stream);
template <DType D>
cudaError_t forward_infer_t(const ForwardParams& p, cudaStream_t stream);
template <DType D>
cudaError_t backward_t(const BackwardParams& p, cudaStream_t stream);

#define BN_CUDA_DTYPE_SWITCH(t, FN, ...)                    \
  switch (t) {                                               \
    case DType::kFloat32:                                    \
      return FN<DType::kFloat32>(__VA_ARGS__);               \
    case DType::kFloat64:                                    \
      return FN<DType::kFloat64>(__VA_ARGS__);               \
    case DType::kFloat16:                                    \
      return FN<DType::kFloat16>(__VA_ARGS__);               \
    case DType::kBFloat16:                                   \
      return FN<DType::kBFloat16>(__VA_ARGS__);              \
  }                                                          \
  return cudaErrorInvalidValue;

inline cudaError_t forward_train(DType t, const ForwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, forward_train_t, p, s)
}
inline cudaError_t forward_infer(DType t, const ForwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, forward_infer_t, p, s)
}
inline cudaError_t backward(DType t, const BackwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, backward_t, p, s)
}
#undef BN_CUDA_DTYPE_SWITCH

}  // namespace cuda
}  // namespace bn_cuda
