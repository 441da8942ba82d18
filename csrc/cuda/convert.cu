// The per-feature conversions of a call (convert.cuh), for the glue's convert_features /
// write_back. Torch-free: compiles in seconds.
#include "bn_cuda/cuda/launch.cuh"
#include "launchers.h"

namespace bn_cuda {
namespace cuda {

cudaError_t convert_features_t(const ConvertParams& p, cudaStream_t stream) { return convert_features(p, stream); }

}  // namespace cuda
}  // namespace bn_cuda
