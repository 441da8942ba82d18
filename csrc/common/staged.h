// Argument checking and parameter filling for the staged operators (batch_stats, gather_stats,
// normalize, grad_sums, grad_input), shared by the CPU and CUDA bodies.
#pragma once

#include <ATen/core/Tensor.h>

#include "bn_cuda/epilogue.h"
#include "glue.h"

namespace bn_cuda {

// How `ghosts` ghost batches (sample n in ghost n % ghosts, tf_keras's virtual_batch_size) run:
// as ghost rows of a channels-last view (rows > 1: no copy), or by splitting the batch dim into
// (n / ghosts, ghosts) with the ghost dim as the first feature axis (always a view). Either way the
// per-feature arrays have ghosts * C entries, ghost-major. Errors name `ghosts` and the value.
struct GhostPlan {
  at::Tensor input;           // the input to plan with (the split view when split)
  DimVec axis;  // its feature axes
  int64_t rows = 1;           // ghost rows (View3::G), 1 when none or split
  bool split = false;
  std::vector<int64_t> split_shape;
  int64_t ghosts = 1;
  int64_t features = 1;       // C of the caller's input and axis
};
GhostPlan plan_ghosts(const at::Tensor& input, at::IntArrayRef axis, int64_t ghosts, bool masked);
at::Tensor ghost_view(const at::Tensor& t, const GhostPlan& g);  // the same split of a companion tensor
// With ghosts > 1: a per-(ghost, feature) tensor must hold ghosts * C entries. Checked against the
// caller's input and axis, so that the error does not speak of the split view's shape and axes.
void check_ghost_entries(const GhostPlan& g, const at::Tensor& input, at::IntArrayRef axis,
                         const c10::optional<at::Tensor>& t, const char* name);
// grad_out has the caller's input's shape (before its ghost view is taken).
void check_grad_out_shape(const at::Tensor& grad_out, const at::Tensor& input);

struct BatchStatsCall {
  Canonical canon;
  DType dtype = DType::kFloat32;
  Strided3 x, mask;
  at::Tensor mean, m2, count;  // outputs, (C,) acc type
  ForwardParams p;
  bool skip = false;
};
BatchStatsCall prepare_batch_stats(const at::Tensor& input, at::IntArrayRef axis,
                                   const c10::optional<at::Tensor>& mask, int64_t ghosts);

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
  std::vector<int64_t> input_shape;  // the caller's (fwd.out may have the ghost-split shape)
  at::Tensor output() const { return fwd.out.reshape(input_shape); }
};
NormalizeCall prepare_normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef axis, int64_t ghosts);

// grad_sums / grad_input: a BackwardCall with the staged fields filled.
struct GradSumsCall {
  BackwardCall bwd;
  at::Tensor sum_dy, sum_dy_xmu;  // outputs, (C,) acc type
};
GradSumsCall prepare_grad_sums(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& invstd, at::IntArrayRef axis, int64_t ghosts);

struct GradInputCall {
  BackwardCall bwd;
  FeatureTensor sum_dy, sum_dy_xmu, count;
  Strided3 mask;
  std::vector<int64_t> input_shape;
  at::Tensor output() const { return bwd.grad_input.reshape(input_shape); }
};
GradInputCall prepare_grad_input(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& count,
                                 at::IntArrayRef axis, const c10::optional<at::Tensor>& mask, int64_t ghosts);

// ghost_backward: grad_sums and grad_input of the local statistics in one BackwardCall (no
// exchange between them): the sums stay in the workspace and come out as grad_weight / grad_bias.
struct GhostBackwardCall {
  BackwardCall bwd;
  std::vector<int64_t> input_shape;
  bool input_grad = true;
  at::Tensor grad_input() const { return input_grad ? bwd.grad_input.reshape(input_shape) : bwd.grad_input; }
};
GhostBackwardCall prepare_ghost_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                         const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                         at::IntArrayRef axis, int64_t ghosts, std::array<bool, 3> output_mask,
                                         const char* op = "ghost_backward");  // op: the name errors give

// keras_finalize: tf_keras's ghost / renorm epilogue (epilogue.h).
struct KerasFinalizeCall {
  at::Tensor mean, var, count;  // G * C, acc type, contiguous (keras_coeffs: var holds m2)
  FeatureTensor moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev;
  at::Tensor r, d;
  // keras_coeffs only: read-only per-feature inputs and the (ghost, feature) outputs.
  FeatureTensor gamma, beta, adj_scale, adj_bias;
  at::Tensor invstd, weight, bias;
  KerasFinalizeParams p;
  bool is_double = false;
};
KerasFinalizeCall prepare_keras_finalize(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                         const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                                         const c10::optional<at::Tensor>& moving_stddev,
                                         const c10::optional<at::Tensor>& renorm_mean,
                                         const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts,
                                         double momentum, double renorm_momentum, double eps,
                                         c10::optional<double> rmin, c10::optional<double> rmax,
                                         c10::optional<double> dmax, bool always_update);
// keras_coeffs: keras_finalize from the ghosts' Welford states (mean, m2, count), which also
// writes each (ghost, feature)'s invstd and the apply step's scale / shift (epilogue.h).
KerasFinalizeCall prepare_keras_coeffs(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count,
                                       const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
                                       const c10::optional<at::Tensor>& adj_scale,
                                       const c10::optional<at::Tensor>& adj_bias, const at::Tensor& moving_mean,
                                       const at::Tensor& moving_variance,
                                       const c10::optional<at::Tensor>& moving_stddev,
                                       const c10::optional<at::Tensor>& renorm_mean,
                                       const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts,
                                       double momentum, double renorm_momentum, double eps,
                                       c10::optional<double> rmin, c10::optional<double> rmax,
                                       c10::optional<double> dmax, bool always_update);
void finish_keras_finalize(KerasFinalizeCall& call);

// keras_grads: the backward of keras_coeffs' composition (epilogue.h's KerasGradParams).
struct KerasGradsCall {
  at::Tensor d_scale, d_shift;  // G * C, acc type, contiguous
  FeatureTensor r, d, gamma, adj_scale, adj_bias;
  at::Tensor grad_gamma, grad_beta, grad_adj_scale, grad_adj_bias;  // C each, or empty
  KerasGradParams p;
  bool is_double = false;
};
KerasGradsCall prepare_keras_grads(const at::Tensor& d_scale, const at::Tensor& d_shift,
                                   const c10::optional<at::Tensor>& r, const c10::optional<at::Tensor>& d,
                                   const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& adj_scale,
                                   const c10::optional<at::Tensor>& adj_bias, bool beta, int64_t ghosts,
                                   std::array<bool, 4> output_mask,
                                   const char* op = "keras_grads");

}  // namespace bn_cuda
