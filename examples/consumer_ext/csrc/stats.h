// The consumer's own per-channel statistics, written with bn_cuda's torch-free primitives.
#pragma once

#include <bn_cuda/welford.h>

#include <cstdint>

namespace consumer {

// Per-channel (mean, biased variance) of a contiguous (N, C, HW) float tensor, on the host.
inline void channel_stats_host(const float* x, int64_t N, int64_t C, int64_t HW, float* mean, float* var) {
  for (int64_t c = 0; c < C; ++c) {
    BN_CUDA_NAMESPACE::WelfordState<float> st = BN_CUDA_NAMESPACE::welford_empty<float>();
    for (int64_t n = 0; n < N; ++n) {
      const float* row = x + (n * C + c) * HW;
      for (int64_t i = 0; i < HW; ++i) {
        const BN_CUDA_NAMESPACE::WelfordState<float> one{row[i], 0.0f, 1.0f};
        st = BN_CUDA_NAMESPACE::welford_merge(st, one);
      }
    }
    mean[c] = st.mean;
    var[c] = st.n > 0 ? st.m2 / st.n : 0.0f;
  }
}

#if defined(CONSUMER_WITH_CUDA)
// Same on the GPU (stats.cu); returns the launch's cudaError_t as int.
int channel_stats_cuda(const float* x, int64_t N, int64_t C, int64_t HW, float* mean, float* var, void* stream);
#endif

}  // namespace consumer
