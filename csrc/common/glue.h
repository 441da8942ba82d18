// Argument checking and parameter filling shared by the CPU and CUDA op bodies. Everything that
// can fail is checked here, before any kernel runs, so a failing call changes no running
// statistic.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>

#include "bn_cuda/params.h"
#include "canonical.h"

namespace bn_cuda {

DType dtype_of(const at::Tensor& t, const char* name);
at::ScalarType acc_scalar_type(at::ScalarType t);

// A per-feature tensor (weight, bias, running stats) as a flat, contiguous acc-typed tensor of C
// elements. `acc` aliases `user` when the caller's tensor already is one; otherwise it is a copy
// that finish_* writes back (running stats only).
struct FeatureTensor {
  at::Tensor user;
  at::Tensor acc;
  bool copy_back = false;
  void* ptr() const { return acc.defined() ? acc.data_ptr() : nullptr; }
};

void check_same_device(const at::Tensor& t, const at::Tensor& input, const char* name);

// A required tensor argument. Python's None reaches a `Tensor` (not `Tensor?`) parameter of an op
// as an undefined tensor, whose data pointer is null: refused, naming the argument (`op`: the
// op's name for the message prefix, or nullptr for the functional ops' plain "bn_cuda:").
void check_defined(const at::Tensor& t, const char* name, const char* op = nullptr);

// `ghosts` > 1 on prepare_*: the input's rows run as ghost rows (see View3); the caller checked
// with ghost_rows_apply that the planned view allows it.

// Validate a per-feature tensor of `input` (shape: the feature dims', flat (C,), or the
// rank-preserving Keras shape; same device; floating) and bring it to flat acc-typed form.
FeatureTensor feature_tensor(const c10::optional<at::Tensor>& maybe, const char* name, const Canonical& c,
                             const at::Tensor& input, at::ScalarType acc, bool mutated);

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

}  // namespace bn_cuda
