// Typed CUDA entry points, defined in the torch-free per-variant .cu files of this folder.
// Included by the torch glue, so it names element types only through bn_cuda::DType.
#pragma once

#include <cuda_runtime_api.h>

#include "bn_cuda/epilogue.h"
#include "bn_cuda/params.h"

namespace bn_cuda {
namespace cuda {

template <DType D>
cudaError_t forward_train_t(const ForwardParams& p, cudaStream_t stream);
template <DType D>
cudaError_t forward_infer_t(const ForwardParams& p, cudaStream_t stream);
template <DType D>
cudaError_t backward_t(const BackwardParams& p, cudaStream_t stream);
template <DType D>
cudaError_t batch_stats_t(const ForwardParams& p, cudaStream_t stream);
template <DType D>
cudaError_t apply_given_t(const ForwardParams& p, cudaStream_t stream);
template <DType D>
cudaError_t backward_apply_t(const BackwardParams& p, cudaStream_t stream);
// Accumulation types only: kFloat32 (float) and kFloat64 (double).
template <DType D>
cudaError_t gather_stats_t(const GatherParams& g, cudaStream_t stream);
// Any dtypes (see ConvertParams).
cudaError_t convert_features_t(const ConvertParams& p, cudaStream_t stream);
template <DType D>
cudaError_t keras_finalize_t(const KerasFinalizeParams& p, cudaStream_t stream);
template <DType D>
cudaError_t keras_grads_t(const KerasGradParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bn_cuda
