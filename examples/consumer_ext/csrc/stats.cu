// A torch-free .cu of the consumer: one block per channel, built on bn_cuda's Welford state,
// Chan merge and deterministic block reduction. Compiles in seconds (no torch headers).
#include <bn_cuda/cuda/common.cuh>

#include "stats.h"

namespace consumer {

namespace bn = BN_CUDA_NAMESPACE;

template <int BLOCK>
__global__ void channel_stats_kernel(const float* x, int64_t N, int64_t C, int64_t HW, float* mean, float* var) {
  const int64_t c = blockIdx.x;
  bn::WelfordState<float> st = bn::welford_empty<float>();
  for (int64_t k = threadIdx.x; k < N * HW; k += BLOCK) {
    const int64_t n = k / HW, i = k - n * HW;
    const float v[1] = {x[(n * C + c) * HW + i]};
    st = bn::welford_merge(st, bn::welford_of_values<1>(v));
  }
  st = bn::cuda::block_merge<BLOCK>(st);
  if (threadIdx.x == 0) {
    mean[c] = st.mean;
    var[c] = st.n > 0 ? st.m2 / st.n : 0.0f;
  }
}

int channel_stats_cuda(const float* x, int64_t N, int64_t C, int64_t HW, float* mean, float* var, void* stream) {
  if (C == 0) return 0;
  channel_stats_kernel<256><<<static_cast<unsigned>(C), 256, 0, static_cast<cudaStream_t>(stream)>>>(x, N, C, HW, mean, var);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace consumer
