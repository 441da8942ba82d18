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

}  // namespace ops
}  // namespace BN_CUDA_NAMESPACE
