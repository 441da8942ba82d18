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
BN_CUDA_DECLARE_CPU_KERNELS(AVX512)
BN_CUDA_DECLARE_CPU_KERNELS(AVX512_BF16)
#undef BN_CUDA_DECLARE_CPU_KERNELS

// Which copy runs, decided once per process: the one named by BN_CUDA_CPU_CAPABILITY (default /
// avx2 / avx512 / avx512_bf16), else the one matching the kernels PyTorch itself runs
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), at most what the CPU runs. On x86
// that is AVX512 (AVX-512 F / BW / VL / DQ), AVX2 (AVX2, FMA, F16C) or DEFAULT; PyTorch's AVX512
// becomes our AVX512_BF16 on CPUs with AVX512_BF16 (the AVX512 copy with native bfloat16 stores,
// the same bits; PyTorch has no such level). On other architectures always DEFAULT. (The AVX512
// copies hand a few input shapes to the AVX2 one: kernels_entry.h.)
enum class Capability { kDefault, kAvx2, kAvx512, kAvx512Bf16 };
Capability capability();
const char* capability_name();
// True when a vectorized x86 copy runs (AVX2, AVX512 or AVX512_BF16).
inline bool use_vector_kernels() { return capability() != Capability::kDefault; }

#define BN_CUDA_CPU_DISPATCH(FN, ...)                       \
  switch (capability()) {                                    \
    case Capability::kAvx512Bf16:                            \
      return AVX512_BF16::FN(__VA_ARGS__);                   \
    case Capability::kAvx512:                                \
      return AVX512::FN(__VA_ARGS__);                        \
    case Capability::kAvx2:                                  \
      return AVX2::FN(__VA_ARGS__);                          \
    default:                                                 \
      return DEFAULT::FN(__VA_ARGS__);                       \
  }

inline void forward_train(DType t, const ForwardParams& p) { BN_CUDA_CPU_DISPATCH(forward_train, t, p) }
inline void forward_infer(DType t, const ForwardParams& p) { BN_CUDA_CPU_DISPATCH(forward_infer, t, p) }
inline void backward(DType t, const BackwardParams& p) { BN_CUDA_CPU_DISPATCH(backward, t, p) }
// n elements of type t to / from float32 (per-feature tensors; see kernels_impl.h).
inline void to_float(DType t, const void* src, float* dst, int64_t n) {
  BN_CUDA_CPU_DISPATCH(to_float, t, src, dst, n)
}
inline void from_float(DType t, const float* src, void* dst, int64_t n) {
  BN_CUDA_CPU_DISPATCH(from_float, t, src, dst, n)
}
#undef BN_CUDA_CPU_DISPATCH

}  // namespace cpu
}  // namespace bn_cuda
