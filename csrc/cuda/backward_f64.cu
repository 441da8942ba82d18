// Backward kernels (fused, staged sums, staged grad_input) for DType::kFloat64.
// Torch-free: compiles in seconds.
#include "bn_cuda/cuda/launch.cuh"
#include "launchers.h"

namespace bn_cuda {
namespace cuda {

using Elem = typename ScalarOf<DType::kFloat64>::type;

template <>
cudaError_t backward_t<DType::kFloat64>(const BackwardParams& p, cudaStream_t stream) {
  return backward<Elem>(p, stream);
}

template <>
cudaError_t backward_apply_t<DType::kFloat64>(const BackwardParams& p, cudaStream_t stream) {
  return backward_apply<Elem>(p, stream);
}

}  // namespace cuda
}  // namespace bn_cuda
