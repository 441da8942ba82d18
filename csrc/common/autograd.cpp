// Autograd kernels of bn_cuda::forward_train and bn_cuda::forward_infer, in C++.
//
// forward_train updates the running statistics in place, and torch.library.register_autograd
// refuses operators with mutable arguments; a Python torch.autograd.Function around the op costs
// 15-40 us of host time per call, more than the whole kernel on small tensors and as much as a
// GPU launch. This kernel (dispatch key Autograd, device-agnostic) records one C++ node whose
// backward calls the registered bn_cuda::backward op through the dispatcher (bn_cuda/ops.h, the
// header other extensions use), so double backward still goes through that op's own autograd
// (bn_cuda/ops.py) and torch.compile traces the backward op like any other.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bn_cuda/ops.h"
#include "canonical.h"

namespace bn_cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// A flat per-feature tensor shaped to broadcast against `input` (feature axes sorted).
at::Tensor bcast(const at::Tensor& t, const at::Tensor& input, const std::vector<int64_t>& axes) {
  std::vector<c10::SymInt> shape(static_cast<size_t>(input.dim()), c10::SymInt(1));
  for (int64_t a : axes) shape[static_cast<size_t>(a)] = input.sym_size(a);
  return t.reshape_symint(shape);
}

// What both forwards save of weight and bias: the weight itself (the backward needs it), and only
// the bias's shape and dtype.
void save_affine(AutogradContext* ctx, const OptTensor& weight, const OptTensor& bias, at::IntArrayRef axis) {
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  ctx->saved_data["axis"] = axis.vec();
  ctx->saved_data["has_w"] = has_w;
  ctx->saved_data["has_b"] = has_b;
  if (has_b) {
    ctx->saved_data["bias_shape"] = c10::IValue(bias->sym_sizes());  // symbolic under torch.compile
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
  }
}

// Which of (input, weight, bias) need a gradient. Edges exist only for the tensors given: input,
// [weight], [bias], [running stats].
std::array<bool, 3> grad_mask(AutogradContext* ctx) {
  const bool has_w = ctx->saved_data["has_w"].toBool();
  const bool has_b = ctx->saved_data["has_b"].toBool();
  const size_t w_edge = 1, b_edge = has_w ? 2 : 1;
  return {ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(w_edge), has_b && ctx->needs_input_grad(b_edge)};
}

// (grad_input, grad_weight, grad_bias) through bn_cuda::backward, weight / bias gradients in the
// parameters' own shapes and dtypes; undefined where not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> param_backward(AutogradContext* ctx, const at::Tensor& grad_out,
                                                             const at::Tensor& input, const at::Tensor& weight,
                                                             const at::Tensor& mean, const at::Tensor& invstd,
                                                             bool train, at::IntArrayRef axis,
                                                             std::array<bool, 3> mask) {
  at::Tensor gi, gw, gb;
  if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2])) return {gi, gw, gb};
  const OptTensor w = weight.defined() ? OptTensor(weight) : OptTensor();
  if (at::GradMode::is_enabled()) {  // create_graph: through the backward op's own autograd
    std::tie(gi, gw, gb) = ops::backward(grad_out, input, w, mean, invstd, train, axis, mask);
  } else {  // skip that (Python) autograd kernel: microseconds a call
    at::AutoDispatchBelowAutograd guard;
    std::tie(gi, gw, gb) = ops::backward(grad_out, input, w, mean, invstd, train, axis, mask);
  }
  if (!mask[0]) gi = at::Tensor();
  gw = mask[1] ? gw.reshape_symint(weight.sym_sizes()).to(weight.scalar_type()) : at::Tensor();
  if (mask[2]) {
    const auto shape = ctx->saved_data["bias_shape"].toSymIntVector();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    gb = gb.reshape_symint(shape).to(dtype);
  } else {
    gb = at::Tensor();
  }
  return {gi, gw, gb};
}

// Whether the autograd layer can be skipped: no gradient can flow from this call.
bool no_grad_needed(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  if (!at::GradMode::is_enabled()) return true;
  const auto req = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return !input.requires_grad() && !req(weight) && !req(bias);
}

struct ForwardTrain : public torch::autograd::Function<ForwardTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               double momentum, double eps, at::IntArrayRef axis, bool unbiased) {
    at::Tensor out, mean, invstd;
    {
      at::AutoDispatchBelowAutograd guard;
      std::tie(out, mean, invstd) =
          ops::forward_train(input, weight, bias, running_mean, running_var, momentum, eps, axis, unbiased);
    }
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean, invstd});
    save_affine(ctx, weight, bias, axis);
    ctx->set_materialize_grads(false);
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& mean = saved[2];
    const at::Tensor& invstd = saved[3];
    const std::vector<int64_t> axis = ctx->saved_data["axis"].toIntVector();
    const std::array<bool, 3> mask = grad_mask(ctx);
    at::Tensor gi, gw, gb;
    std::tie(gi, gw, gb) = param_backward(ctx, grads[0], input, weight, mean, invstd, /*train=*/true, axis, mask);
    const at::Tensor& grad_mean = grads[1];
    const at::Tensor& grad_invstd = grads[2];
    if (ctx->needs_input_grad(0) && (grad_mean.defined() || grad_invstd.defined())) {
      // Gradients reaching the returned statistics (double backward, or a caller using them):
      // d mean / dx = 1 / M, d invstd / dx = -invstd^3 (x - mean) / M.
      const std::vector<int64_t> axes = normalize_axes(axis, input.dim());
      // (sizes are symbolic under torch.compile; mean has >= 1 element whenever input does)
      const c10::SymInt features = mean.sym_numel();
      const c10::Scalar count((input.sym_numel() / features.max(c10::SymInt(1))).max(c10::SymInt(1)));
      const auto acc = mean.scalar_type();
      at::Tensor extra = at::zeros({}, input.options().dtype(acc));
      if (grad_mean.defined()) extra = extra + bcast(grad_mean.to(acc), input, axes) / count;
      if (grad_invstd.defined()) {
        const at::Tensor s = bcast(invstd, input, axes);
        extra = extra - bcast(grad_invstd.to(acc), input, axes) * s.pow(3) *
                            (input.to(acc) - bcast(mean, input, axes)) / count;
      }
      extra = extra.to(input.scalar_type()).expand_as(input);
      gi = gi.defined() ? gi + extra : extra;
    }
    // One entry per forward argument (non-tensors and running stats get none).
    return {gi, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Inference: the running statistics are constants (copied at the call, so a later in-place update
// of the buffers cannot change this step's gradient); grad_input = dy * invstd * weight.
struct ForwardInfer : public torch::autograd::Function<ForwardInfer> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, at::IntArrayRef axis) {
    at::Tensor out;
    {
      at::AutoDispatchBelowAutograd guard;
      out = ops::forward_infer(input, weight, bias, running_mean, running_var, eps, axis);
    }
    const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor mean = running_mean.detach().to(acc, false, /*copy=*/true).reshape(-1);
    const at::Tensor invstd = at::rsqrt(running_var.detach().to(acc, false, /*copy=*/true).reshape(-1) + eps);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean, invstd});
    save_affine(ctx, weight, bias, axis);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> axis = ctx->saved_data["axis"].toIntVector();
    at::Tensor gi, gw, gb;
    std::tie(gi, gw, gb) =
        param_backward(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], /*train=*/false, axis, grad_mask(ctx));
    return {gi, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor forward_infer_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                  const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                  at::IntArrayRef axis) {
  if (no_grad_needed(input, weight, bias)) {
    at::AutoDispatchBelowAutograd guard;
    return ops::forward_infer(input, weight, bias, running_mean, running_var, eps, axis);
  }
  return ForwardInfer::apply(input, weight, bias, running_mean, running_var, eps, axis)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_autograd(
    const at::Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, double momentum, double eps, at::IntArrayRef axis, bool unbiased) {
  if (no_grad_needed(input, weight, bias)) {
    at::AutoDispatchBelowAutograd guard;
    return ops::forward_train(input, weight, bias, running_mean, running_var, momentum, eps, axis, unbiased);
  }
  variable_list r =
      ForwardTrain::apply(input, weight, bias, running_mean, running_var, momentum, eps, axis, unbiased);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace bn_cuda

TORCH_LIBRARY_IMPL(bn_cuda, Autograd, m) {
  m.impl("forward_train", &bn_cuda::forward_train_autograd);
  m.impl("forward_infer", &bn_cuda::forward_infer_autograd);
}
