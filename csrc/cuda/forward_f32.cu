// Forward kernels (training and inference) for DType::kFloat32. Torch-free: compiles in seconds.
#include "bn_cuda/cuda/launch.cuh"
#include "launchers.h"

namespace bn_cuda {
namespace cuda {

using Elem = typename ScalarOf<DType::kFloat32>::type;

template <>
cudaError_t forward_train_t<DType::kFloat32>(const ForwardParams& p, cudaStream_t stream) {
  return forward_train<Elem>(p, stream);
}

template <>
cudaError_t forward_infer_t<DType::kFloat32>(const ForwardParams& p, cudaStream_t stream) {
  return forward_infer<Elem>(p, stream);
}

}  // namespace cuda
}  // namespace bn_cuda
