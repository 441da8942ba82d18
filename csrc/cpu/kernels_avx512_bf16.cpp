// AVX512_BF16 copy of the bfloat16 CPU kernels: the AVX512 copy with its bfloat16 stores on the
// AVX512_BF16 conversion instruction (narrow in kernels_impl.h: the same bits), chosen at run time
// by cpu::capability() when the AVX512 copy is and the CPU has AVX512_BF16 (Intel Cooper Lake,
// Sapphire Rapids and later; AMD Zen 4 and later). Other element types go to the AVX512 copy.
// Every symbol defined here lives in namespace ...::AVX512_BF16.
#if defined(__x86_64__) || defined(_M_X64)
// setup.py compiles this file alone with the AVX512 copy's flags plus -mavx512bf16.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__FMA__) || !defined(__AVX512BF16__)
#error "kernels_avx512_bf16.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mavx512bf16 (setup.py's BuildExt does this)"
#endif
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512  // (at::vec's 512-bit Vectorized, and the AVX512 copy's choices)
#define CPU_CAPABILITY_AVX512_BF16
#include "kernels_entry.h"
#else
// Not x86: the entry points forward to the portable ones (never selected anyway).
#include "forward_to_default.h"
BN_CUDA_FORWARD_TO_DEFAULT(AVX512_BF16)
#endif
