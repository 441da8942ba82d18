// Autograd kernels of bn_cuda::forward_train, bn_cuda::forward_infer and bn_cuda::backward, in C++.
//
// forward_train updates the running statistics in place, and torch.library.register_autograd
// refuses operators with mutable arguments; a Python autograd layer around an op costs 10-40 us of
// host time per call (even under no_grad), more than the whole kernel on small tensors and as much
// as a GPU launch, and needs the GIL when another extension calls the op from C++. These kernels
// (dispatch key Autograd, device-agnostic) record one C++ node each. The forwards' nodes call the
// registered bn_cuda::backward op through the dispatcher (bn_cuda/ops.h, the header other
// extensions use), whose own node gives double backward; torch.compile traces the backward op like
// any other.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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

// What both forwards save of weight and bias: the weight itself (the backward needs it), and of
// the bias only whether it is there, its dtype and, unless flat, its shape. One saved_data entry
// per kind of value: each entry is a hash-map insert and an IValue allocation per call.
//   "meta": [has_w, has_b, bias_dtype, axis...]
void save_affine(AutogradContext* ctx, const OptTensor& weight, const OptTensor& bias, at::IntArrayRef axis) {
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  std::vector<int64_t> meta{has_w, has_b, has_b ? static_cast<int64_t>(bias->scalar_type()) : -1};
  meta.insert(meta.end(), axis.begin(), axis.end());
  ctx->saved_data["meta"] = std::move(meta);
  if (has_b && bias->dim() != 1)
    ctx->saved_data["bias_shape"] = c10::IValue(bias->sym_sizes());  // symbolic under torch.compile
}

struct Meta {
  bool has_w, has_b;
  int64_t bias_dtype;
  std::vector<int64_t> axis;
};

Meta load_meta(AutogradContext* ctx) {
  const std::vector<int64_t> m = ctx->saved_data["meta"].toIntVector();
  return {m[0] != 0, m[1] != 0, m[2], std::vector<int64_t>(m.begin() + 3, m.end())};
}

// Which of (input, weight, bias) need a gradient. Edges exist only for the tensors given: input,
// [weight], [bias].
std::array<bool, 3> grad_mask(AutogradContext* ctx, const Meta& meta) {
  const size_t w_edge = 1, b_edge = meta.has_w ? 2 : 1;
  return {ctx->needs_input_grad(0), meta.has_w && ctx->needs_input_grad(w_edge),
          meta.has_b && ctx->needs_input_grad(b_edge)};
}

// (grad_input, grad_weight, grad_bias) through bn_cuda::backward, weight / bias gradients in the
// parameters' own shapes and dtypes; undefined where not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> param_backward(AutogradContext* ctx, const Meta& meta,
                                                             const at::Tensor& grad_out, const at::Tensor& input,
                                                             const at::Tensor& weight, const at::Tensor& mean,
                                                             const at::Tensor& invstd, bool train,
                                                             std::array<bool, 3> mask) {
  at::Tensor gi, gw, gb;
  if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2])) return {gi, gw, gb};
  const OptTensor w = weight.defined() ? OptTensor(weight) : OptTensor();
  // Through the backward op's autograd kernel: a graph under create_graph, straight to the kernel
  // otherwise (backward_autograd below).
  std::tie(gi, gw, gb) = ops::backward(grad_out, input, w, mean, invstd, train, meta.axis, mask);
  if (!mask[0]) gi = at::Tensor();
  // The op's (C,) gradients in the parameters' shapes and dtypes; flat parameters of the acc dtype
  // (the usual case) take them as they are, without the cost of a view and a cast per call.
  if (!mask[1]) {
    gw = at::Tensor();
  } else if (weight.dim() != 1 || weight.scalar_type() != gw.scalar_type()) {
    gw = gw.reshape_symint(weight.sym_sizes()).to(weight.scalar_type());
  }
  if (!mask[2]) {
    gb = at::Tensor();
  } else {
    const auto dtype = static_cast<at::ScalarType>(meta.bias_dtype);
    const auto it = ctx->saved_data.find("bias_shape");
    if (it != ctx->saved_data.end()) gb = gb.reshape_symint(it->second.toSymIntVector());
    if (dtype != gb.scalar_type()) gb = gb.to(dtype);
  }
  return {gi, gw, gb};
}

// Whether the autograd layer can be skipped: no gradient can flow from this call.
bool no_grad_needed(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  if (!at::GradMode::is_enabled()) return true;
  const auto req = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return !input.requires_grad() && !req(weight) && !req(bias);
}

// The running statistics, handed to Function::apply in a holder it does not look into: they are
// not differentiable inputs (no gradient flows to them, as in torch), and as tensor arguments each
// would cost the node an input record and an edge lookup per call.
template <typename T>
struct Stats {
  const T& mean;
  const T& var;
};

struct ForwardTrain : public torch::autograd::Function<ForwardTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, Stats<OptTensor> running, double momentum, double eps,
                               at::IntArrayRef axis, bool unbiased) {
    at::Tensor out, mean, invstd;
    {
      at::AutoDispatchBelowAutograd guard;
      std::tie(out, mean, invstd) =
          ops::forward_train(input, weight, bias, running.mean, running.var, momentum, eps, axis, unbiased);
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
    const Meta meta = load_meta(ctx);
    at::Tensor gi, gw, gb;
    std::tie(gi, gw, gb) =
        param_backward(ctx, meta, grads[0], input, weight, mean, invstd, /*train=*/true, grad_mask(ctx, meta));
    const at::Tensor& grad_mean = grads[1];
    const at::Tensor& grad_invstd = grads[2];
    if (ctx->needs_input_grad(0) && (grad_mean.defined() || grad_invstd.defined())) {
      // Gradients reaching the returned statistics (double backward, or a caller using them):
      // d mean / dx = 1 / M, d invstd / dx = -invstd^3 (x - mean) / M.
      const std::vector<int64_t> axes = normalize_axes(meta.axis, input.dim());
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
    // One entry per forward argument (the non-tensors get none).
    return {gi, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Inference: the running statistics are constants; grad_input = dy * invstd * weight.
struct ForwardInfer : public torch::autograd::Function<ForwardInfer> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, Stats<at::Tensor> running, double eps,
                               at::IntArrayRef axis) {
    at::Tensor out;
    {
      at::AutoDispatchBelowAutograd guard;
      out = ops::forward_infer(input, weight, bias, running.mean, running.var, eps, axis);
    }
    // The running statistics are saved as they are (as torch's batch_norm does): modifying them in
    // place before the backward makes it raise, as in torch; the statistics of the backward are
    // derived from them there, which keeps the forward of a call that needs a gradient (frozen
    // batch norm in fine-tuning) free of extra ops.
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), running.mean, running.var});
    ctx->saved_data["eps"] = eps;
    save_affine(ctx, weight, bias, axis);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Meta meta = load_meta(ctx);
    const auto acc = saved[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor mean = saved[2].detach().to(acc).reshape(-1);
    const at::Tensor invstd = at::rsqrt(saved[3].detach().to(acc).reshape(-1) + ctx->saved_data["eps"].toDouble());
    at::Tensor gi, gw, gb;
    std::tie(gi, gw, gb) = param_backward(ctx, meta, grads[0], saved[0], saved[1], mean, invstd, /*train=*/false,
                                          grad_mask(ctx, meta));
    return {gi, gw, gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Backward of the backward op (double backward): the op's maths recomputed as differentiable ATen
// ops (all three outputs in the acc dtype), then differentiated by autograd with respect to the
// inputs that need it. Only higher-order gradients come here; the first-order path is the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_composite(const at::Tensor& grad_out, const at::Tensor& input,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& invstd, bool train,
                                                                   at::IntArrayRef axis) {
  const std::vector<int64_t> axes = normalize_axes(axis, input.dim());
  std::vector<int64_t> red;
  for (int64_t d = 0; d < input.dim(); ++d)
    if (std::find(axes.begin(), axes.end(), d) == axes.end()) red.push_back(d);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = input.to(acc);
  const at::Tensor g = grad_out.to(acc);
  const at::Tensor m = bcast(mean.to(acc), input, axes);
  const at::Tensor sd = bcast(invstd.to(acc), input, axes);
  const at::Tensor w = weight.defined() ? bcast(weight.to(acc), input, axes) : at::ones_like(sd);
  const at::Tensor xmu = x - m;
  const c10::SymInt features = mean.sym_numel().max(c10::SymInt(1));
  const c10::Scalar count((input.sym_numel() / features).max(c10::SymInt(1)));
  const at::Tensor sum_dy = g.sum(red, /*keepdim=*/true);
  const at::Tensor sum_dy_xmu = (g * xmu).sum(red, /*keepdim=*/true);
  at::Tensor gi = train ? w * sd * (g - sum_dy / count - xmu * sd * sd * sum_dy_xmu / count) : w * sd * g;
  return {gi.to(input.scalar_type()), (sum_dy_xmu * sd).reshape(-1), sum_dy.reshape(-1)};
}

struct Backward : public torch::autograd::Function<Backward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& input,
                               const OptTensor& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                               bool train, at::IntArrayRef axis, std::array<bool, 3> output_mask) {
    at::Tensor gi, gw, gb;
    {
      at::AutoDispatchBelowAutograd guard;
      std::tie(gi, gw, gb) = ops::backward(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask);
    }
    const bool has_w = weight.has_value() && weight->defined();
    ctx->save_for_backward({grad_out, input, has_w ? *weight : at::Tensor(), save_mean, save_invstd});
    ctx->saved_data["train"] = train;
    ctx->saved_data["axis"] = axis.vec();
    ctx->saved_data["mask"] = std::vector<bool>{output_mask[0], output_mask[1], output_mask[2]};
    ctx->set_materialize_grads(false);
    return {gi, gw, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_w = saved[2].defined();
    // Edges exist only for the tensors given: grad_out, input, [weight], save_mean, save_invstd.
    std::array<bool, 5> need{};
    for (size_t k = 0, edge = 0; k < 5; ++k) {
      if (k == 2 && !has_w) continue;
      need[k] = ctx->needs_input_grad(edge++);
    }
    variable_list result(8);
    if (!(need[0] || need[1] || need[2] || need[3] || need[4])) return result;
    const bool create_graph = at::GradMode::is_enabled();
    const auto mask = ctx->saved_data["mask"].toBoolList();
    const std::vector<int64_t> axis = ctx->saved_data["axis"].toIntVector();
    at::AutoGradMode enable(true);
    variable_list leaves(5), wrt;
    for (size_t k = 0; k < 5; ++k) {
      if (!saved[k].defined()) continue;
      leaves[k] = saved[k].detach().requires_grad_(need[k]);
      if (need[k]) wrt.push_back(leaves[k]);
    }
    const auto outs = backward_composite(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4],
                                         ctx->saved_data["train"].toBool(), axis);
    const std::array<at::Tensor, 3> out_list{std::get<0>(outs), std::get<1>(outs), std::get<2>(outs)};
    variable_list outputs, grad_outputs;
    for (size_t i = 0; i < 3; ++i) {
      if (mask.get(i) && grads[i].defined() && grads[i].sym_numel() > 0) {
        outputs.push_back(out_list[i]);
        grad_outputs.push_back(grads[i].to(out_list[i].scalar_type()));
      }
    }
    if (outputs.empty()) return result;
    const variable_list got = torch::autograd::grad(outputs, wrt, grad_outputs, /*retain_graph=*/create_graph,
                                                    create_graph, /*allow_unused=*/true);
    for (size_t k = 0, j = 0; k < 5; ++k)
      if (need[k]) result[k] = got[j++];
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_autograd(const at::Tensor& grad_out, const at::Tensor& input,
                                                                 const OptTensor& weight, const at::Tensor& save_mean,
                                                                 const at::Tensor& save_invstd, bool train,
                                                                 at::IntArrayRef axis, std::array<bool, 3> output_mask) {
  const auto req = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(req(grad_out) || req(input) || (weight.has_value() && req(*weight)) || req(save_mean) || req(save_invstd))) {
    at::AutoDispatchBelowAutograd guard;
    return ops::backward(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask);
  }
  variable_list r = Backward::apply(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask);
  return {r[0], r[1], r[2]};
}

at::Tensor forward_infer_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                  const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                  at::IntArrayRef axis) {
  if (no_grad_needed(input, weight, bias)) {
    at::AutoDispatchBelowAutograd guard;
    return ops::forward_infer(input, weight, bias, running_mean, running_var, eps, axis);
  }
  return ForwardInfer::apply(input, weight, bias, Stats<at::Tensor>{running_mean, running_var}, eps, axis)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_autograd(
    const at::Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, double momentum, double eps, at::IntArrayRef axis, bool unbiased) {
  if (no_grad_needed(input, weight, bias)) {
    at::AutoDispatchBelowAutograd guard;
    return ops::forward_train(input, weight, bias, running_mean, running_var, momentum, eps, axis, unbiased);
  }
  variable_list r =
      ForwardTrain::apply(input, weight, bias, Stats<OptTensor>{running_mean, running_var}, momentum, eps, axis, unbiased);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace bn_cuda

TORCH_LIBRARY_IMPL(bn_cuda, Autograd, m) {
  m.impl("forward_train", &bn_cuda::forward_train_autograd);
  m.impl("forward_infer", &bn_cuda::forward_infer_autograd);
  m.impl("backward", &bn_cuda::backward_autograd);
}
