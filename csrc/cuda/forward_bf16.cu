// Forward kernels (training, inference, staged statistics / apply) for DType::kBFloat16.
// Torch-free: compiles in seconds.
#include "bn_cuda/cuda/launch.cuh"
#include "launchers.h"

namespace bn_cuda {
namespace cuda {

using Elem = typename ScalarOf<DType::kBFloat16>::type;

template <>
cudaError_t forward_train_t<DType::kBFloat16>(const ForwardParams& p, cudaStream_t stream) {
  return forward_train<Elem>(p, stream);
}

template <>
cudaError_t forward_infer_t<DType::kBFloat16>(const ForwardParams& p, cudaStream_t stream) {
  return forward_infer<Elem>(p, stream);
}

template <>
cudaError_t batch_stats_t<DType::kBFloat16>(const ForwardParams& p, cudaStream_t stream) {
  return batch_stats<Elem>(p, stream);
}

template <>
cudaError_t apply_given_t<DType::kBFloat16>(const ForwardParams& p, cudaStream_t stream) {
  return apply_given<Elem>(p, stream);
}

}  // namespace cuda
}  // namespace bn_cuda
