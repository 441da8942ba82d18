// Torch-free configuration shared by the CPU and CUDA code and by consumer extensions.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BN_HD __host__ __device__ __forceinline__
#define BN_DEVICE __device__ __forceinline__
#else
#define BN_HD inline
#define BN_DEVICE inline
#endif

// A consumer that vendors a copy of these headers defines BN_CUDA_NAMESPACE to its own name
// so that its symbols cannot clash with the ones inside bn_cuda._C.
#ifndef BN_CUDA_NAMESPACE
#define BN_CUDA_NAMESPACE bn_cuda
#endif

namespace BN_CUDA_NAMESPACE {

// Accumulation type: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

}  // namespace BN_CUDA_NAMESPACE
