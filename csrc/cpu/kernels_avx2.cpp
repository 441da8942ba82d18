// AVX2 + FMA + F16C copy of the CPU kernels, chosen at run time by cpu::use_avx2(). The target
// pragma (instead of a per-file -mavx2) keeps the build a single setuptools extension; every
// symbol defined here lives in namespace ...::AVX2, as ATen does for its own kernels.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")
// The target pragma enables the instructions but not the feature macros that ATen's and SLEEF's
// headers test to declare their AVX2 code; define them for this translation unit only.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
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
}  // namespace AVX2
}  // namespace cpu
}  // namespace bn_cuda
#endif
