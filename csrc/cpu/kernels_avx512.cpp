// AVX-512 copy of the CPU kernels (at::vec's 512-bit Vectorized: 16 float32 lanes), chosen at run
// time by cpu::capability() when PyTorch itself runs its AVX512 kernels; every symbol defined here
// lives in namespace ...::AVX512, as ATen does for its own kernels.
#if defined(__x86_64__) || defined(_M_X64)
// setup.py compiles this file alone with ATen's AVX512 flags (-mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mfma, plus -mf16c), as kernels_avx2.cpp with its own.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__FMA__)
#error "kernels_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma (setup.py's BuildExt does this)"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_entry.h"
#else
// Not x86: the AVX512 entry points forward to the portable ones (never selected anyway).
#include "forward_to_default.h"
BN_CUDA_FORWARD_TO_DEFAULT(AVX512)
#endif
