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
#include "forward_to_default.h"
BN_CUDA_FORWARD_TO_DEFAULT(AVX2)
#endif
