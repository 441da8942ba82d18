// Entry points of a per-capability copy that forward to the portable ones, for builds where that
// copy cannot exist (kernels_avx2.cpp and kernels_avx512.cpp off x86; never selected there, since
// cpu::capability() is then always kDefault).
#pragma once

#include "dispatch.h"

#define BN_CUDA_FORWARD_TO_DEFAULT(NS)                                                                              \
  namespace bn_cuda {                                                                                               \
  namespace cpu {                                                                                                   \
  namespace NS {                                                                                                    \
  void forward_train(DType t, const ForwardParams& p) { DEFAULT::forward_train(t, p); }                             \
  void forward_infer(DType t, const ForwardParams& p) { DEFAULT::forward_infer(t, p); }                             \
  void backward(DType t, const BackwardParams& p) { DEFAULT::backward(t, p); }                                      \
  void to_float(DType t, const void* src, float* dst, int64_t n) { DEFAULT::to_float(t, src, dst, n); }             \
  void from_float(DType t, const float* src, void* dst, int64_t n) { DEFAULT::from_float(t, src, dst, n); }         \
  }                                                                                                                 \
  }                                                                                                                 \
  }
