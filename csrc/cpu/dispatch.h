// Runtime choice between the per-capability copies of the CPU kernels.
#pragma once

#include "bn_cuda/params.h"

namespace bn_cuda {
namespace cpu {

#define BN_CUDA_DECLARE_CPU_KERNELS(NS)                 \
  namespace NS {                                        \
  void forward_train(DType t, const ForwardParams& p);  \
  void forward_infer(DType t, const ForwardParams& p);  \
  void backward(DType t, const BackwardParams& p);      \
  void to_float(DType t, const void* src, float* dst, int64_t n); \
  void from_float(DType t, const float* src, void* dst, int64_t n); \
  }
BN_CUDA_DECLARE_CPU_KERNELS(DEFAULT)
BN_CUDA_DECLARE_CPU_KERNELS(AVX2)
#undef BN_CUDA_DECLARE_CPU_KERNELS

// True when the AVX2 copy may run: the CPU has AVX2, FMA and F16C, and ATEN_CPU_CAPABILITY
// (PyTorch's own override) does not ask for "default".
bool use_avx2();
const char* capability_name();

inline void forward_train(DType t, const ForwardParams& p) {
  use_avx2() ? AVX2::forward_train(t, p) : DEFAULT::forward_train(t, p);
}
inline void forward_infer(DType t, const ForwardParams& p) {
  use_avx2() ? AVX2::forward_infer(t, p) : DEFAULT::forward_infer(t, p);
}
inline void backward(DType t, const BackwardParams& p) {
  use_avx2() ? AVX2::backward(t, p) : DEFAULT::backward(t, p);
}
// n elements of type t to / from float32 (per-feature tensors; see kernels_impl.h).
inline void to_float(DType t, const void* src, float* dst, int64_t n) {
  use_avx2() ? AVX2::to_float(t, src, dst, n) : DEFAULT::to_float(t, src, dst, n);
}
inline void from_float(DType t, const float* src, void* dst, int64_t n) {
  use_avx2() ? AVX2::from_float(t, src, dst, n) : DEFAULT::from_float(t, src, dst, n);
}

}  // namespace cpu
}  // namespace bn_cuda
