// Calls into bn_cuda's registered operators through the PyTorch dispatcher, for other C++/CUDA
// extensions. No link dependency on bn_cuda._C: the consumer only needs `import bn_cuda` to have
// run (it registers the ops) before these functions are called.
//
// Unlike the other headers in this folder, this one includes ATen (it is the torch-facing API).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

#include "config.h"

namespace BN_CUDA_NAMESPACE {
namespace ops {

using OptTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Training forward: (output, saved mean, saved inverse std); running stats updated in place.
inline Tensor3 forward_train(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& running_mean, const OptTensor& running_var, double momentum,
                             double eps, at::IntArrayRef axis, bool unbiased_running_var = true) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::forward_train", "")
                             .typed<Tensor3(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, double, double, at::IntArrayRef, bool)>();
  return op.call(input, weight, bias, running_mean, running_var, momentum, eps, axis, unbiased_running_var);
}

// Inference forward with the running statistics.
inline at::Tensor forward_infer(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                at::IntArrayRef axis) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bn_cuda::forward_infer", "")
          .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                            const at::Tensor&, double, at::IntArrayRef)>();
  return op.call(input, weight, bias, running_mean, running_var, eps, axis);
}

// Backward: (grad_input, grad_weight (C,), grad_bias (C,)); outputs not in output_mask are empty.
inline Tensor3 backward(const at::Tensor& grad_out, const at::Tensor& input, const OptTensor& weight,
                        const at::Tensor& save_mean, const at::Tensor& save_invstd, bool train, at::IntArrayRef axis,
                        std::array<bool, 3> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::backward", "")
                             .typed<Tensor3(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                            const at::Tensor&, bool, at::IntArrayRef, std::array<bool, 3>)>();
  return op.call(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask);
}

// ---------------------------------------------------------------------------------------------
// Staged operators: the steps of a batch norm, for compositions (synchronized statistics, custom
// normalizations). Per-feature tensors are flat (C,) in the accumulation dtype (fp32; fp64 for
// fp64 input). ghosts > 1: tf_keras's ghost batches (sample n in ghost n % ghosts); per-feature
// tensors then hold ghosts * C entries, ghost-major.

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;

// Local Welford state per feature: (mean, m2, count). With a bool / 0-1 uint8 mask broadcastable
// to the input: the weighted moments of the unmasked elements.
inline Tensor3 batch_stats(const at::Tensor& input, at::IntArrayRef axis, const OptTensor& mask = std::nullopt,
                           int64_t ghosts = 1) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::batch_stats", "")
                             .typed<Tensor3(const at::Tensor&, at::IntArrayRef, const OptTensor&, int64_t)>();
  return op.call(input, axis, mask, ghosts);
}

// Chan merge of W states ((W, C) each, rows in order) -> (mean, invstd, count); running stats
// updated in place (torch's momentum convention) except for features whose total count is 0.
inline Tensor3 gather_stats(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count,
                            const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
                            bool unbiased_running_var = true) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::gather_stats", "")
                             .typed<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                            const OptTensor&, double, double, bool)>();
  return op.call(mean, m2, count, running_mean, running_var, momentum, eps, unbiased_running_var);
}

// (input - mean) * invstd * weight + bias with caller-supplied statistics.
inline at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                            const OptTensor& weight, const OptTensor& bias, at::IntArrayRef axis, int64_t ghosts = 1) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::normalize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, at::IntArrayRef, int64_t)>();
  return op.call(input, mean, invstd, weight, bias, axis, ghosts);
}

// Local (sum(grad_out), sum(grad_out * (input - mean))) per feature.
inline Tensor2 grad_sums(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                         const at::Tensor& invstd, at::IntArrayRef axis, int64_t ghosts = 1) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::grad_sums", "")
                             .typed<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, at::IntArrayRef, int64_t)>();
  return op.call(grad_out, input, mean, invstd, axis, ghosts);
}

// Training grad_input from (e.g. all-reduced) sums and total per-feature counts.
inline at::Tensor grad_input(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                             const at::Tensor& invstd, const OptTensor& weight, const at::Tensor& sum_dy,
                             const at::Tensor& sum_dy_xmu, const at::Tensor& count, at::IntArrayRef axis,
                             const OptTensor& mask = std::nullopt, int64_t ghosts = 1) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bn_cuda::grad_input", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            at::IntArrayRef, const OptTensor&, int64_t)>();
  return op.call(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis, mask, ghosts);
}

// grad_sums and grad_input of the local (unmasked) statistics in one pass: (grad_input,
// grad_weight, grad_bias) per (ghost, feature), grad_weight = sum(grad_out * (input - mean)) *
// invstd and grad_bias = sum(grad_out); outputs not in output_mask are empty.
inline Tensor3 ghost_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptTensor& weight, at::IntArrayRef axis, int64_t ghosts = 1,
                              std::array<bool, 3> output_mask = {true, true, true}) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::ghost_backward", "")
                             .typed<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const OptTensor&, at::IntArrayRef, int64_t, std::array<bool, 3>)>();
  return op.call(grad_out, input, mean, invstd, weight, axis, ghosts, output_mask);
}

// tf_keras's training epilogue (ghost averaging, renorm's clipped r and d, every moving variable
// updated in place with tf_keras's decay); returns (r, d), 1 and 0 without renorm. A missing
// bound does not clip.
inline Tensor2 keras_finalize(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                              const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                              const OptTensor& moving_stddev, const OptTensor& renorm_mean,
                              const OptTensor& renorm_stddev, int64_t ghosts, double momentum, double renorm_momentum,
                              double eps, std::optional<double> rmin, std::optional<double> rmax,
                              std::optional<double> dmax, bool always_update) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bn_cuda::keras_finalize", "")
          .typed<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t, double,
                         double, double, std::optional<double>, std::optional<double>, std::optional<double>, bool)>();
  return op.call(mean, var, count, moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev, ghosts,
                 momentum, renorm_momentum, eps, rmin, rmax, dmax, always_update);
}

using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// keras_finalize from batch_stats' (mean, m2, count) with the apply step's coefficients: returns
// (invstd, weight, bias, r, d), the first three per (ghost, feature) for normalize().
inline Tensor5 keras_coeffs(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count,
                            const OptTensor& gamma, const OptTensor& beta, const OptTensor& adj_scale,
                            const OptTensor& adj_bias, const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                            const OptTensor& moving_stddev, const OptTensor& renorm_mean,
                            const OptTensor& renorm_stddev, int64_t ghosts, double momentum, double renorm_momentum,
                            double eps, std::optional<double> rmin, std::optional<double> rmax,
                            std::optional<double> dmax, bool always_update) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bn_cuda::keras_coeffs", "")
          .typed<Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, int64_t, double, double, double, std::optional<double>,
                         std::optional<double>, std::optional<double>, bool)>();
  return op.call(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance, moving_stddev,
                 renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax, dmax, always_update);
}

using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// batch_stats + keras_coeffs + normalize in one call: (output, mean, invstd, weight, count, r, d);
// the moving variables are updated in place.
inline Tensor7 keras_forward(const at::Tensor& input, at::IntArrayRef axis, const OptTensor& mask, int64_t ghosts,
                             const OptTensor& gamma, const OptTensor& beta, const OptTensor& adj_scale,
                             const OptTensor& adj_bias, const at::Tensor& moving_mean,
                             const at::Tensor& moving_variance, const OptTensor& moving_stddev,
                             const OptTensor& renorm_mean, const OptTensor& renorm_stddev, double momentum,
                             double renorm_momentum, double eps, std::optional<double> rmin,
                             std::optional<double> rmax, std::optional<double> dmax, bool always_update) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bn_cuda::keras_forward", "")
          .typed<Tensor7(const at::Tensor&, at::IntArrayRef, const OptTensor&, int64_t, const OptTensor&,
                         const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                         const OptTensor&, const OptTensor&, const OptTensor&, double, double, double,
                         std::optional<double>, std::optional<double>, std::optional<double>, bool)>();
  return op.call(input, axis, mask, ghosts, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                 moving_stddev, renorm_mean, renorm_stddev, momentum, renorm_momentum, eps, rmin, rmax, dmax,
                 always_update);
}

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward of keras_coeffs' composition: (grad_gamma, grad_beta, grad_adj_scale,
// grad_adj_bias) from d loss / d (scale, shift) per (ghost, feature), summed over the ghosts; r
// and d constant. Empty where not in output_mask or the factor is absent.
inline Tensor4 keras_grads(const at::Tensor& d_scale, const at::Tensor& d_shift, const OptTensor& r,
                           const OptTensor& d, const OptTensor& gamma, const OptTensor& adj_scale,
                           const OptTensor& adj_bias, bool beta, int64_t ghosts,
                           std::array<bool, 4> output_mask = {true, true, true, true}) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bn_cuda::keras_grads", "")
          .typed<Tensor4(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, bool, int64_t, std::array<bool, 4>)>();
  return op.call(d_scale, d_shift, r, d, gamma, adj_scale, adj_bias, beta, ghosts, output_mask);
}

// ghost_backward then keras_grads on its grad_weight / grad_bias, in one call: (grad_input,
// grad_gamma, grad_beta, grad_adj_scale, grad_adj_bias); output_mask: (input, gamma, beta,
// adj_scale, adj_bias).
inline Tensor5 keras_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptTensor& weight, at::IntArrayRef axis, int64_t ghosts,
                              const OptTensor& r, const OptTensor& d, const OptTensor& gamma,
                              const OptTensor& adj_scale, const OptTensor& adj_bias, bool beta,
                              std::array<bool, 5> output_mask = {true, true, true, true, true}) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bn_cuda::keras_backward", "")
          .typed<Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                         at::IntArrayRef, int64_t, const OptTensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, bool, std::array<bool, 5>)>();
  return op.call(grad_out, input, mean, invstd, weight, axis, ghosts, r, d, gamma, adj_scale, adj_bias, beta,
                 output_mask);
}

}  // namespace ops
}  // namespace BN_CUDA_NAMESPACE
