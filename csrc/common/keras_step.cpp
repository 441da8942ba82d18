// The single-process training step of bn_cuda.BatchNormalization on the staged ops (ghost
// batches, batch renormalization, adjustment, masks), in C++.
//
// The same staged ops in the same order as bn_cuda/keras/synchronized.py's train_step with
// world_size 1 (so the same results, bit for bit), without its Python glue: on a GPU that glue
// (about 25 op calls and their Python wrappers) cost ~0.45 ms per layer call, several times the
// kernels at batch 32. The Python path stays for torch.compile, tracing modes and several processes.
//
// Autograd: the composition of gamma / beta with the adjustment's (scale, bias) and renorm's (r, d)
// and the per-ghost expansion are ATen ops, recorded by autograd as usual; the normalization is one
// C++ node whose backward is the batch-norm training backward (grad_sums, then grad_input) with the
// statistics constant in (r, d) as tf_keras's stop_gradient makes them. Its backward ops have no
// derivative, so a double backward through this path raises, as the Python path's once_differentiable.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "bn_cuda/ops.h"

namespace bn_cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// normalize() with batch statistics computed from the input: the training backward (the Python
// path's SyncNormalize on one process).
struct LocalNormalize : public torch::autograd::Function<LocalNormalize> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                            const OptTensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                            const at::Tensor& count, std::vector<int64_t> axis, const OptTensor& mask,
                            int64_t ghosts) {
    const bool has_w = weight.has_value() && weight->defined();
    const bool has_b = bias.has_value() && bias->defined();
    ctx->save_for_backward({input, has_w ? *weight : at::Tensor(), mean, invstd, count,
                            mask.has_value() ? *mask : at::Tensor()});
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["ghosts"] = ghosts;
    ctx->saved_data["has_b"] = has_b;
    if (has_b) {
      ctx->saved_data["bias_shape"] = bias->sizes().vec();
      ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
    }
    ctx->set_materialize_grads(false);
    return ops::normalize(input, mean, invstd, weight, bias, axis, ghosts);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& mean = saved[2];
    const at::Tensor& invstd = saved[3];
    const at::Tensor& count = saved[4];
    const OptTensor mask = saved[5].defined() ? OptTensor(saved[5]) : OptTensor();
    const std::vector<int64_t> axis = ctx->saved_data["axis"].toIntVector();
    const int64_t ghosts = ctx->saved_data["ghosts"].toInt();
    const at::Tensor& grad_out = grads[0];
    const bool has_b = ctx->saved_data["has_b"].toBool();
    const bool need_input = ctx->needs_input_grad(0);
    // Edges exist only for the tensors given: input, [weight], [bias], ...
    const bool need_weight = weight.defined() && ctx->needs_input_grad(1);
    const bool need_bias = has_b && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    // once_differentiable, as the Python path: computed without a graph; under create_graph the
    // results get a node that raises if a second backward reaches it.
    const bool wrap = at::GradMode::is_enabled() && grad_out.defined() && grad_out.requires_grad();
    at::NoGradGuard no_grad;
    at::Tensor gi, gw, gb;
    if (grad_out.defined() && (need_input || need_weight || need_bias)) {
      at::Tensor sum_dy, sum_dy_xmu;
      std::tie(sum_dy, sum_dy_xmu) = ops::grad_sums(grad_out, input, mean, invstd, axis, ghosts);
      if (need_weight) gw = (sum_dy_xmu * invstd).reshape(weight.sizes()).to(weight.scalar_type());
      if (need_bias) {
        const auto shape = ctx->saved_data["bias_shape"].toIntVector();
        gb = sum_dy.reshape(shape).to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
      }
      if (need_input) {
        const OptTensor w = weight.defined() ? OptTensor(weight) : OptTensor();
        gi = ops::grad_input(grad_out, input, mean, invstd, w, sum_dy, sum_dy_xmu, count, axis, mask, ghosts);
      }
    }
    if (wrap) {
      at::AutoGradMode enable(true);
      variable_list fake;
      for (const at::Tensor& t : {gi, gw, gb}) {
        at::Tensor v = t.defined() ? t.detach() : t;
        if (v.defined()) v.set_requires_grad(true);
        fake.push_back(v);
      }
      variable_list wrapped = torch::autograd::DelayedError(
                                  "trying to differentiate twice bn_cuda's Keras training step (ghost batches, "
                                  "renorm, adjustment or masks): its backward is once differentiable",
                                  static_cast<int64_t>(fake.size()))
                                  .apply(std::move(fake));
      gi = wrapped[0];
      gw = wrapped[1];
      gb = wrapped[2];
    }
    return {gi, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// y -> (y * scale + offset) * then_scale + then_offset as one (scale, offset) pair (None = identity).
void compose(OptTensor& scale, OptTensor& offset, const OptTensor& then_scale, const OptTensor& then_offset) {
  if (then_scale.has_value()) {
    scale = scale.has_value() ? OptTensor(*scale * *then_scale) : then_scale;
    offset = offset.has_value() ? OptTensor(*offset * *then_scale) : OptTensor();
  }
  if (then_offset.has_value()) offset = offset.has_value() ? OptTensor(*offset + *then_offset) : then_offset;
}

OptTensor per_ghost(const OptTensor& t, int64_t ghosts) {
  if (!t.has_value()) return t;
  return t->reshape({1, -1}).expand({ghosts, -1}).reshape({-1});
}

// One training step; see BatchNormalization.forward / keras.synchronized.train_step. `ghosts` 0:
// no ghost batches (else the local ghost count, >= 1). gamma / beta / adjustment / moving variables:
// flat per-feature tensors (the moving variables are updated in place). `weights`: the mask
// broadcastable to x, or None.
at::Tensor keras_train_step(const at::Tensor& x, std::vector<int64_t> axes, int64_t ghosts, const OptTensor& gamma,
                            const OptTensor& beta, const OptTensor& adj_scale, const OptTensor& adj_bias,
                            const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                            const OptTensor& moving_stddev, const OptTensor& renorm_mean,
                            const OptTensor& renorm_stddev, bool renorm, double momentum, double renorm_momentum,
                            double eps, std::optional<double> rmin, std::optional<double> rmax,
                            std::optional<double> dmax, const OptTensor& weights, bool always_update) {
  OptTensor scale = gamma, offset = beta;
  if (adj_scale.has_value()) {  // tf_keras: the adjustment first, then gamma / beta
    OptTensor s = adj_scale, o = adj_bias;
    compose(s, o, gamma, beta);
    scale = s;
    offset = o;
  }
  const int64_t G = ghosts > 0 ? ghosts : 1;
  at::Tensor mean, m2, count;
  {
    at::NoGradGuard no_grad;
    std::tie(mean, m2, count) = ops::batch_stats(x, axes, weights, G);
  }
  if (ghosts == 0 && !renorm && !weights.has_value()) {
    // Plain statistics (an adjustment only): the moving statistics are updated inside gather_stats.
    at::Tensor invstd, total;
    {
      at::NoGradGuard no_grad;
      std::tie(mean, invstd, total) = ops::gather_stats(mean.unsqueeze(0), m2.unsqueeze(0), count.unsqueeze(0),
                                                        moving_mean, moving_variance, 1.0 - momentum, eps, false);
    }
    return LocalNormalize::apply(x, scale, offset, mean, invstd, total, axes, OptTensor(), 1);
  }
  // The statistic itself lands in zeroed scratch "running" buffers with momentum 1 (as sync_moments).
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor scratch = at::zeros({2, mean.numel()}, x.options().dtype(acc));  // one fill for both
  at::Tensor mean_out = scratch[0];
  at::Tensor var_out = scratch[1];
  at::Tensor invstd, total, r, d;
  {
    at::NoGradGuard no_grad;
    std::tie(std::ignore, invstd, total) = ops::gather_stats(mean.unsqueeze(0), m2.unsqueeze(0), count.unsqueeze(0),
                                                             mean_out, var_out, 1.0, eps, false);
    std::tie(r, d) = ops::keras_finalize(mean_out, var_out, total, moving_mean, moving_variance, moving_stddev,
                                         renorm_mean, renorm_stddev, G, momentum, renorm_momentum, eps, rmin, rmax,
                                         dmax, always_update);
  }
  if (renorm) {  // r, d: constants (tf_keras's stop_gradient)
    OptTensor s = r, o = d;
    compose(s, o, scale, offset);
    scale = s;
    offset = o;
  }
  if (ghosts > 0) {
    scale = per_ghost(scale, ghosts);
    offset = per_ghost(offset, ghosts);
  }
  return LocalNormalize::apply(x, scale, offset, mean_out, invstd, total, axes, weights, G);
}

}  // namespace

void register_keras_step(pybind11::module_& m) {
  m.def("keras_train_step", &keras_train_step,
        "One single-process training step of bn_cuda.BatchNormalization on the staged ops (ghost batches, "
        "renorm, adjustment, masks); the moving variables are updated in place.",
        pybind11::arg("x"), pybind11::arg("axes"), pybind11::arg("ghosts"), pybind11::arg("gamma"),
        pybind11::arg("beta"), pybind11::arg("adj_scale"), pybind11::arg("adj_bias"),
        pybind11::arg("moving_mean"), pybind11::arg("moving_variance"), pybind11::arg("moving_stddev"),
        pybind11::arg("renorm_mean"), pybind11::arg("renorm_stddev"), pybind11::arg("renorm"),
        pybind11::arg("momentum"), pybind11::arg("renorm_momentum"), pybind11::arg("eps"), pybind11::arg("rmin"),
        pybind11::arg("rmax"), pybind11::arg("dmax"), pybind11::arg("weights"), pybind11::arg("always_update"));
}

}  // namespace bn_cuda
