// Typed entry points of one CPU capability; included by kernels_<capability>.cpp after
// CPU_CAPABILITY is defined.
#pragma once

#include "kernels_impl.h"

#if defined(CPU_CAPABILITY_AVX512)
namespace bn_cuda {
namespace cpu {
// (kernels_avx2.cpp and kernels_avx512.cpp; not dispatch.h, whose AVX512 namespace is not inline)
namespace AVX2 {
void forward_train(DType t, const ForwardParams& p);
void forward_infer(DType t, const ForwardParams& p);
void backward(DType t, const BackwardParams& p);
}  // namespace AVX2
#if defined(CPU_CAPABILITY_AVX512_BF16)
namespace AVX512 {
void forward_train(DType t, const ForwardParams& p);
void forward_infer(DType t, const ForwardParams& p);
void backward(DType t, const BackwardParams& p);
void to_float(DType t, const void* src, float* dst, int64_t n);
void from_float(DType t, const float* src, void* dst, int64_t n);
}  // namespace AVX512
#endif
}  // namespace cpu
}  // namespace bn_cuda
#endif

namespace bn_cuda {
namespace cpu {
inline namespace CPU_CAPABILITY {

// Calls FN<T>(args...) with T the element type named by t.
#define BN_CUDA_CPU_DTYPE_SWITCH(t, FN, ...)         \
  switch (t) {                                        \
    case DType::kFloat32:                             \
      return FN<float>(__VA_ARGS__);                  \
    case DType::kFloat64:                             \
      return FN<double>(__VA_ARGS__);                 \
    case DType::kFloat16:                             \
      return FN<c10::Half>(__VA_ARGS__);              \
    case DType::kBFloat16:                            \
      return FN<c10::BFloat16>(__VA_ARGS__);          \
  }

#if defined(CPU_CAPABILITY_AVX512_BF16)
// The AVX512_BF16 copy differs from the AVX512 one only in its bfloat16 stores (narrow), so it
// holds the bfloat16 kernels alone and hands every other type to the AVX512 copy.
#define BN_CUDA_OTHER_TYPES(t, FN, ...) \
  if ((t) != DType::kBFloat16) return ::bn_cuda::cpu::AVX512::FN(t, __VA_ARGS__);
#undef BN_CUDA_CPU_DTYPE_SWITCH
#define BN_CUDA_CPU_DTYPE_SWITCH(t, FN, ...) return FN<c10::BFloat16>(__VA_ARGS__);
#else
#define BN_CUDA_OTHER_TYPES(t, FN, ...)
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Dense channels-last rows whose periodic pattern (pattern_units) would hold more than 8 units of
// 16 lanes, i.e. odd feature counts from 9 to 31: there the AVX-512 copy's patterns are twice as
// long as the AVX2 copy's (in elements) and took 1.1x-1.8x its time (8x9x28x28 .. 8x17x28x28
// fp32 / fp16, training forward and backward, 2 threads), so the AVX2 copy runs them.
template <typename T>
inline bool long_pattern(const View3& v, bool dense) {
  return pattern_units<T>(v, dense) > 8;
}
inline bool avx2_runs(DType t, const View3& v, bool dense) {
  BN_CUDA_CPU_DTYPE_SWITCH(t, long_pattern, v, dense)
  return false;
}
#define BN_CUDA_AVX2_RUNS(t, v, dense, FN, ...) \
  if (avx2_runs(t, v, dense)) return ::bn_cuda::cpu::AVX2::FN(t, __VA_ARGS__);
#else
#define BN_CUDA_AVX2_RUNS(t, v, dense, FN, ...)
#endif

void forward_train(DType t, const ForwardParams& p) {
  BN_CUDA_OTHER_TYPES(t, forward_train, p)
  BN_CUDA_AVX2_RUNS(t, p.v, p.x_so == p.v.C && p.y_so == p.v.C, forward_train, p)
  BN_CUDA_CPU_DTYPE_SWITCH(t, forward_train, p)
}
void forward_infer(DType t, const ForwardParams& p) {
  BN_CUDA_OTHER_TYPES(t, forward_infer, p)
  BN_CUDA_AVX2_RUNS(t, p.v, p.x_so == p.v.C && p.y_so == p.v.C, forward_infer, p)
  BN_CUDA_CPU_DTYPE_SWITCH(t, forward_infer, p)
}
void backward(DType t, const BackwardParams& p) {
  BN_CUDA_OTHER_TYPES(t, backward, p)
  BN_CUDA_AVX2_RUNS(t, p.v, p.x_so == p.v.C && p.dy_so == p.v.C, backward, p)
  BN_CUDA_CPU_DTYPE_SWITCH(t, backward, p)
}
#undef BN_CUDA_AVX2_RUNS
void to_float(DType t, const void* src, float* dst, int64_t n) {
  BN_CUDA_OTHER_TYPES(t, to_float, src, dst, n)
  BN_CUDA_CPU_DTYPE_SWITCH(t, to_float, src, dst, n)
}
void from_float(DType t, const float* src, void* dst, int64_t n) {
  BN_CUDA_OTHER_TYPES(t, from_float, src, dst, n)
  BN_CUDA_CPU_DTYPE_SWITCH(t, from_float, src, dst, n)
}
#undef BN_CUDA_OTHER_TYPES

#undef BN_CUDA_CPU_DTYPE_SWITCH

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace bn_cuda
