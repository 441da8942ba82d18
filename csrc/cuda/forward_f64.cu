// Forward kernels (training, inference, staged statistics / apply) for DType::kFloat64.
// Torch-free: compiles in seconds.
#include "bn_cuda/cuda/launch.cuh"
#include "launchers.h"

namespace bn_cuda {
namespace cuda {

using Elem = typename ScalarOf<DType::kFloat64>::type;

template <>
cudaError_t forward_train_t<DType::kFloat64>(const ForwardParams& p, cudaStream_t stream) {
  return forward_train<Elem>(p, stream);
}

template <>
cudaError_t forward_infer_t<DType::kFloat64>(const ForwardParams& p, cudaStream_t stream) {
  return forward_infer<Elem>(p, stream);
}

template <>
cudaError_t batch_stats_t<DType::kFloat64>(const ForwardParams& p, cudaStream_t stream) {
  return batch_stats<Elem>(p, stream);
}

template <>
cudaError_t apply_given_t<DType::kFloat64>(const ForwardParams& p, cudaStream_t stream) {
  return apply_given<Elem>(p, stream);
}

template <>
cudaError_t gather_stats_t<DType::kFloat64>(const GatherParams& g, cudaStream_t stream) {
  return gather_stats<Elem>(g, stream);
}

template <>
cudaError_t keras_finalize_t<DType::kFloat64>(const KerasFinalizeParams& p, cudaStream_t stream) {
  return keras_finalize<Elem>(p, stream);
}

template <>
cudaError_t keras_grads_t<DType::kFloat64>(const KerasGradParams& p, cudaStream_t stream) {
  return keras_grads<Elem>(p, stream);
}

}  // namespace cuda
}  // namespace bn_cuda
