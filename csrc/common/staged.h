// Argument checking and parameter filling for the staged operators (batch_stats, gather_stats,
// normalize, grad_sums, grad_input), shared by the CPU and CUDA bodies.
#pragma once

#include <ATen/core/Tensor.h>

#include "glue.h"

namespace bn_cuda {

struct BatchStatsCall {
  Canonical canon;
  DType dtype = DType::kFloat32;
  Strided3 x, mask;
  at::Tensor mean, m2, count;  // outputs, (C,) acc type
  ForwardParams p;
  bool skip = false;
};
BatchStatsCall prepare_batch_stats(const at::Tensor& input, at::IntArrayRef axis,
                                   const c10::optional<at::Tensor>& mask);

struct GatherCall {
  at::Tensor mean, m2, count;  // (W, C) acc type, contiguous
  FeatureTensor running_mean, running_var;
  at::Tensor out_mean, out_invstd, out_count;
  GatherParams g;
  bool is_double = false;
};
GatherCall prepare_gather(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count,
                          const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                          double momentum, double eps, bool unbiased_running_var);
void finish_gather(GatherCall& call);

// normalize: a ForwardCall whose kernels use caller-supplied statistics.
struct NormalizeCall {
  ForwardCall fwd;
  FeatureTensor mean, invstd;
};
NormalizeCall prepare_normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef axis);

// grad_sums / grad_input: a BackwardCall with the staged fields filled.
struct GradSumsCall {
  BackwardCall bwd;
  at::Tensor sum_dy, sum_dy_xmu;  // outputs, (C,) acc type
};
GradSumsCall prepare_grad_sums(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& invstd, at::IntArrayRef axis);

struct GradInputCall {
  BackwardCall bwd;
  FeatureTensor sum_dy, sum_dy_xmu, count;
  Strided3 mask;
};
GradInputCall prepare_grad_input(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& count,
                                 at::IntArrayRef axis, const c10::optional<at::Tensor>& mask);

}  // namespace bn_cuda
