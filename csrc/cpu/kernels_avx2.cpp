// AVX2 + FMA + F16C copy of the CPU kernels, chosen at run time by cpu::capability(); every symbol
// defined here lives in namespace ...::AVX2, as ATen does for its own kernels.
#if defined(__x86_64__) || defined(_M_X64)
// setup.py compiles this file alone with -mavx2 -mfma -mf16c (a `#pragma GCC target` here broke
// GCC 13: libstdc++'s always_inline helpers cannot be inlined across the target switch).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (setup.py's BuildExt does this)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_entry.h"
#else
// Not x86: the AVX2 entry points forward to the portable ones (never selected anyway).
#include "dispatch.h"
namespace bn_cuda {
namespace cpu {
namespace AVX2 {
void forward_train(DType t, const ForwardParams& p) { DEFAULT::forward_train(t, p); }
void forward_infer(DType t, const ForwardParams& p) { DEFAULT::forward_infer(t, p); }
void backward(DType t, const BackwardParams& p) { DEFAULT::backward(t, p); }
void to_float(DType t, const void* src, float* dst, int64_t n) { DEFAULT::to_float(t, src, dst, n); }
void from_float(DType t, const float* src, void* dst, int64_t n) { DEFAULT::from_float(t, src, dst, n); }
}  // namespace AVX2
}  // namespace cpu
}  // namespace bn_cuda
#endif
