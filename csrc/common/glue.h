// Argument checking and parameter filling shared by the CPU and CUDA op bodies. Everything that
// can fail is checked here, before any kernel runs, so a failing call changes no running
// statistic.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>

#include "bn_cuda/params.h"
#include "canonical.h"

namespace bn_cuda {

DType dtype_of(const at::Tensor& t, const char* name);
at::ScalarType acc_scalar_type(at::ScalarType t);

// A per-feature tensor (weight, bias, running stats) as a flat, contiguous acc-typed array of C
// elements: `acc` from `offset` (elements) on. `acc` aliases `user` when the caller's tensor already
// is one; otherwise it holds a converted copy (on CPU, one buffer shared by a call's converted
// tensors: convert_features) that write_back returns to `user` (running stats only).
struct FeatureTensor {
  at::Tensor user;
  at::Tensor acc;
  int64_t offset = 0;
  bool copy_back = false;
  bool pending = false;  // validated, not yet converted (feature_tensor(..., defer=true))
  void* ptr() const {
    TORCH_INTERNAL_ASSERT(!pending, "bn_cuda: a per-feature tensor was used before convert_features");
    return acc.defined() ? static_cast<char*>(acc.data_ptr()) + offset * static_cast<int64_t>(acc.element_size())
                         : nullptr;
  }
};

void check_same_device(const at::Tensor& t, const at::Tensor& input, const char* name);

// A required tensor argument. Python's None reaches a `Tensor` (not `Tensor?`) parameter of an op
// as an undefined tensor, whose data pointer is null: refused, naming the argument (`op`: the
// op's name for the message prefix, or nullptr for the functional ops' plain "bn_cuda:").
void check_defined(const at::Tensor& t, const char* name, const char* op = nullptr);

// `ghosts` > 1 on prepare_*: the input's rows run as ghost rows (see View3); the caller checked
// with ghost_rows_apply that the planned view allows it.

// Validate a per-feature tensor of `input` (shape: the feature dims', flat (C,), or the
// rank-preserving Keras shape; same device; floating) and bring it to flat acc-typed form (with
// `defer`, a tensor that needs converting is left `pending` for convert_features).
FeatureTensor feature_tensor(const c10::optional<at::Tensor>& maybe, const char* name, const Canonical& c,
                             const at::Tensor& input, at::ScalarType acc, bool mutated, bool defer = false);

// Convert the pending ones among `fs` to `acc`, into one buffer shared by them: one `.to()` per
// tensor cost about 1.5 us of host time each on CPU (several times the kernel of a small call) and
// a launch each on a GPU, for every model whose parameters are float16 / bfloat16 (or float64
// with float32 input). The contiguous ones are converted by the device's batched conversion when
// one is registered (CUDA: one launch for all of them), else on CPU by the CPU kernels' vector
// conversions when small; anything else by copy_.
void convert_features(std::initializer_list<FeatureTensor*> fs, at::ScalarType acc);

// Return the updated values of converted running statistics (`copy_back`) to the caller's tensors,
// rounding to their dtype as `copy_` does (batched as convert_features converts), without a
// version-counter bump (as when the kernel writes a float32 one in place, and as torch's batch
// norm).
void write_back(std::initializer_list<FeatureTensor*> fs);

// Replace each defined `*first` by a copy in dtype `second` where they differ: the ops' weight / bias
// gradients, which they return in the accumulation type, in the dtype of parameters of another one.
// Ordinary contiguous tensors that need no autograd graph and meet no dispatch mode are converted
// as write_back converts (one batched launch on a device that registered a conversion; on CPU the
// vector conversions); anything else (fake tensors under torch.compile, functorch wrappers,
// subclasses, create_graph) by Tensor::to. Two `.to()` calls cost ~11 us of host time on CPU, a
// seventh of a small backward.
void cast_results(std::initializer_list<std::pair<at::Tensor*, at::ScalarType>> ts);

// A device's batched conversion (ConvertParams: up to kMaxSegments contiguous tensors, each to or
// from the accumulation type, in one launch on the current stream; throws on a launch error).
// ops_cuda.cpp registers its kernel's for CUDA tensors (for CPU tensors in the host emulation
// build, whose CPU key runs the CUDA bodies).
using DeviceConvertFn = void (*)(ConvertParams& p);
void register_device_convert(c10::DeviceType type, DeviceConvertFn fn);

struct ForwardCall {
  Canonical canon;
  DType dtype = DType::kFloat32;
  Strided3 x;
  at::Tensor out;  // returned output, empty_like(input)
  Strided3 y;      // where the kernels write: `out` itself, or dense scratch copied into it
  bool y_scratch = false;
  FeatureTensor weight, bias, running_mean, running_var;
  at::Tensor save_mean, save_invstd;
  ForwardParams p;
  bool skip = false;  // no element to compute (empty batch or no features)
};

ForwardCall prepare_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, bool training, double momentum,
                            double eps, at::IntArrayRef axis, bool unbiased_running_var, int64_t ghosts = 1);
void finish_forward(ForwardCall& call);

struct BackwardCall {
  Canonical canon;
  DType dtype = DType::kFloat32;
  Strided3 x, dy;
  at::Tensor grad_input, grad_weight, grad_bias;  // returned
  Strided3 dx;
  bool dx_scratch = false;
  FeatureTensor weight, mean, invstd;
  BackwardParams p;
  bool skip = false;
};

BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& input,
                              const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                              const at::Tensor& save_invstd, bool train, at::IntArrayRef axis,
                              std::array<bool, 3> output_mask, int64_t ghosts = 1,
                              const char* mean_name = "save_mean", const char* invstd_name = "save_invstd");
void finish_backward(BackwardCall& call);

// Scratch memory for one CPU kernel call, straight from torch's CPU allocator (its alignment) rather
// than a tensor: no TensorImpl and no dispatch of at::empty (~0.2 us of host time a call). Never
// empty.
inline c10::DataPtr cpu_workspace(size_t bytes) { return c10::GetCPUAllocator()->allocate(bytes + 8); }

}  // namespace bn_cuda
