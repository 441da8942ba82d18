// The single-process training step of bn_cuda.BatchNormalization on the staged ops (ghost
// batches, batch renormalization, adjustment, masks), in C++.
//
// Forward, one op (keras_forward): batch_stats (each ghost's Welford state), keras_coeffs (one
// kernel: ghost averaging, renorm's clipped r and d, every moving variable, each (ghost, feature)'s
// invstd and the apply step's scale / shift composed from the adjustment, gamma / beta and r / d),
// normalize. Backward, one: keras_backward (ghost_backward then keras_grads; KerasStepNode). The
// Python step (bn_cuda/keras/synchronized.py, used by torch.compile, tracing modes and several
// processes) composes gather_stats, keras_finalize and tensor ops instead; both give the same
// results bit for bit (tests/test_variants.py), but for the parameters' gradients with ghost
// batches (keras_grads sums the ghosts in its own fixed order: equal to rounding). On a GPU the
// Python glue cost ~0.45 ms per layer call at batch 32 (several times the kernels); the first C++
// version of this step made ~20 op calls per forward, the second three, this one one.
//
// Autograd: one hand-written C++ node (KerasStepNode) for the normalization and the composition.
// Its backward is the batch-norm training backward per (ghost, feature) (keras_backward's
// ghost_backward: the sums and grad_input in one pass; with a mask grad_sums, then grad_input, then
// keras_grads) with the statistics constant
// in (r, d), as tf_keras's stop_gradient makes them, and
// the gradients of gamma, beta and the adjustment's outputs through the composition. Its backward
// ops have no derivative, so a double backward through this path raises, as the Python path's
// once_differentiable.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "bn_cuda/ops.h"
#include "nodes.h"

namespace bn_cuda {
namespace {

using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

using torch::autograd::SavedVariable;

// A tensor's dtype, none for an absent one.
std::optional<at::ScalarType> dtype_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::ScalarType>(t.scalar_type()) : std::nullopt;
}

// The dtype a composition of these factors had on the Python path (ATen's type promotion);
// absent factors (none) drop out.
at::ScalarType promoted(std::initializer_list<std::optional<at::ScalarType>> factors) {
  bool any = false;
  at::ScalarType t = at::kFloat;
  for (const auto& f : factors) {
    if (!f) continue;
    t = any ? at::promoteTypes(t, *f) : *f;
    any = true;
  }
  return t;
}

// What the step's backward needs: the input, the step's statistics and coefficients (no gradient
// flows to them: tf_keras's stop_gradient), the mask, the parameters the composition multiplies
// by, and beta's dtype and shape (its value does not enter any gradient).
struct StepSaved {
  at::Tensor input, mean, invstd, weight, count, r, d, mask, gamma, adj_s, adj_b;
  std::optional<at::ScalarType> beta_dtype;
  std::vector<int64_t> beta_shape;
};

// normalize()'s backward with the coefficients of keras_coeffs: the training backward of batch norm
// per (ghost, feature) with the statistics constant in renorm's (r, d) (tf_keras's stop_gradient),
// and the gradients of gamma, beta and the adjustment's (scale, bias) through tf_keras's composition
//   scale = r * S1, shift = d * S1 + O1,  S1 = adj_scale * gamma,  O1 = adj_bias * gamma + beta
// (absent factors drop out; without renorm scale = S1, shift = O1). Each gradient is computed as
// the Python path's autograd graph computes it (the same products, the same casts on every edge,
// the ghost sums in the same dtype), so both paths agree bit for bit, except the ghost sums of
// keras_grads (its own fixed order). need: which of (input, gamma, beta, adj_scale, adj_bias) to
// compute.
std::array<at::Tensor, 5> step_grads(const at::Tensor& grad_out, const StepSaved& s, const std::vector<int64_t>& axis,
                                     int64_t G, bool renorm, std::array<bool, 5> need) {
  std::array<at::Tensor, 5> out;
  if (!grad_out.defined() || !(need[0] || need[1] || need[2] || need[3] || need[4])) return out;
  // No graph: straight to the device kernels, below the ops' autograd key (whose fallback for ops
  // without an autograd kernel would box every argument and redispatch, several microseconds per call).
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowAutograd below;
  // gamma as the layer holds it ((C,), or rank-preserving with ghost batches: its gradient goes
  // back in that shape) and flat for the products below
  const at::Tensor gamma = s.gamma.defined() && s.gamma.dim() != 1 ? s.gamma.reshape({-1}) : s.gamma;
  const at::Tensor &adj_s = s.adj_s, &adj_b = s.adj_b;
  const bool params = need[1] || need[2] || need[3] || need[4];
  // Every factor in the accumulation dtype (the layer's float32 / float64 weights, renorm's r and
  // d, the flat adjustment): keras_grads composes the gradients, alone or in keras_backward.
  const at::ScalarType acc = s.invstd.scalar_type();
  const auto in_acc = [acc](const at::Tensor& t) { return !t.defined() || t.scalar_type() == acc; };
  const bool acc_factors = in_acc(gamma) && in_acc(adj_s) && in_acc(adj_b) && (!s.beta_dtype || *s.beta_dtype == acc) &&
                           (!renorm || (in_acc(s.r) && in_acc(s.d)));
  const auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  const auto shaped = [&](at::Tensor (&grads)[4]) {  // keras_grads' flat gradients in the layer's shapes
    if (need[1] && gamma.defined()) out[1] = grads[0].reshape(s.gamma.sizes());
    if (need[2] && s.beta_dtype) out[2] = grads[1].reshape(s.beta_shape);
    if (need[3] && adj_s.defined()) out[3] = grads[2].reshape(adj_s.sizes());
    if (need[4] && adj_b.defined()) out[4] = grads[3].reshape(adj_b.sizes());
  };
  if (!s.mask.defined() && params && acc_factors) {
    // One call (keras_backward: ghost_backward then keras_grads; on a GPU 3 kernels, as the plain
    // layer's backward, up to 16 ghosts), bitwise the two ops.
    at::Tensor grads[4];
    std::tie(out[0], grads[0], grads[1], grads[2], grads[3]) =
        ops::keras_backward(grad_out, s.input, s.mean, s.invstd, s.weight, axis, G, renorm ? opt(s.r) : OptTensor(),
                            renorm ? opt(s.d) : OptTensor(), opt(gamma), opt(adj_s), opt(adj_b),
                            s.beta_dtype.has_value(), {need[0], need[1], need[2], need[3], need[4]});
    if (!need[0]) out[0] = at::Tensor();
    shaped(grads);
    return out;
  }
  // Per (ghost, feature): d loss / d (the apply step's scale) before the ghost sum, sum_dy_xmu *
  // invstd, and d loss / d (its shift), sum_dy.
  at::Tensor d_scale_g, d_shift_g;
  if (!s.mask.defined()) {
    // One pass: the sums, grad_input's coefficients (the counts are batch_stats' unmasked ones) and
    // grad_input (3 kernels on a GPU, where grad_sums + grad_input launch 4 and the product is a
    // fifth), bitwise the same.
    std::tie(out[0], d_scale_g, d_shift_g) =
        ops::ghost_backward(grad_out, s.input, s.mean, s.invstd, s.weight, axis, G, {need[0], params, params});
    if (!need[0]) out[0] = at::Tensor();
  } else {
    at::Tensor sum_dy, sum_dy_xmu;
    std::tie(sum_dy, sum_dy_xmu) = ops::grad_sums(grad_out, s.input, s.mean, s.invstd, axis, G);
    if (need[0])
      out[0] = ops::grad_input(grad_out, s.input, s.mean, s.invstd, s.weight, sum_dy, sum_dy_xmu, s.count, axis,
                               OptTensor(s.mask), G);
    if (params) {
      d_scale_g = sum_dy_xmu * s.invstd;
      d_shift_g = sum_dy;
    }
  }
  if (!params) return out;
  // Every factor in the accumulation dtype (the layer's float32 / float64 weights, renorm's r and d,
  // the flat adjustment): the ghost sums and the composition's products in one kernel
  // (keras_grads), the same products rounded alike (the ghost sum in a fixed order of its own). A
  // factor in another dtype (e.g. float16 weights) takes ATen's ops below, whose type promotion
  // rounds each product as the Python path's autograd graph does.
  if (acc_factors) {
    at::Tensor grads[4];
    std::tie(grads[0], grads[1], grads[2], grads[3]) =
        ops::keras_grads(d_scale_g, d_shift_g, renorm ? opt(s.r) : OptTensor(), renorm ? opt(s.d) : OptTensor(),
                         opt(gamma), opt(adj_s), opt(adj_b), s.beta_dtype.has_value(), G,
                         {need[1], need[2], need[3], need[4]});
    shaped(grads);
    return out;
  }
  const std::optional<at::ScalarType> none, g_dt = dtype_of(gamma), as_dt = dtype_of(adj_s), ab_dt = dtype_of(adj_b),
                                      b_dt = s.beta_dtype;
  const std::optional<at::ScalarType> r_dt = renorm ? dtype_of(s.r) : none, d_dt = renorm ? dtype_of(s.d) : none;
  const at::ScalarType s1_dt = promoted({as_dt, g_dt});
  const at::ScalarType o1_dt = promoted({ab_dt, adj_b.defined() ? g_dt : none, b_dt});
  const bool has_s1 = adj_s.defined() || gamma.defined();
  const bool has_o1 = adj_b.defined() || b_dt.has_value();
  const at::ScalarType scale_dt = promoted({r_dt, as_dt, g_dt});
  const at::ScalarType shift_dt =
      promoted({d_dt, renorm ? as_dt : none, renorm ? g_dt : none, ab_dt, adj_b.defined() ? g_dt : none, b_dt});
  // d loss / d (per-ghost scale, shift), in the dtypes of those tensors, summed over ghosts.
  const auto ghost_sum = [&](at::Tensor t, at::ScalarType dt) {
    t = t.to(dt);
    return G > 1 ? t.view({G, -1}).sum(0) : t;
  };
  const at::Tensor d_scale = ghost_sum(d_scale_g, scale_dt);
  const at::Tensor d_shift = ghost_sum(d_shift_g, shift_dt);
  at::Tensor d_s1, d_o1;  // d loss / d S1, d O1
  if (renorm) {
    if (has_s1) d_s1 = (d_scale * s.r).to(s1_dt) + (d_shift * s.d).to(s1_dt);
    if (has_o1) d_o1 = d_shift.to(o1_dt);
  } else {
    d_s1 = d_scale;
    d_o1 = d_shift;
  }
  // O1 = adj_bias * gamma + beta: the add hands d O1 to each side in its own dtype.
  at::Tensor d_prod;  // d loss / d (adj_bias * gamma)
  if (adj_b.defined()) d_prod = gamma.defined() ? d_o1.to(promoted({ab_dt, g_dt})) : d_o1;
  if (need[1] && gamma.defined()) {
    at::Tensor term = adj_s.defined() ? (d_s1 * adj_s).to(gamma.scalar_type()) : d_s1.to(gamma.scalar_type());
    if (adj_b.defined()) term = term + (d_prod * adj_b).to(gamma.scalar_type());
    out[1] = term.reshape(s.gamma.sizes());
  }
  if (need[2] && b_dt) out[2] = d_o1.to(*b_dt).reshape(s.beta_shape);
  if (need[3] && adj_s.defined())
    out[3] = (gamma.defined() ? d_s1 * gamma : d_s1).to(adj_s.scalar_type()).reshape(adj_s.sizes());
  if (need[4] && adj_b.defined())
    out[4] = (gamma.defined() ? d_prod * gamma : d_prod).to(adj_b.scalar_type()).reshape(adj_b.sizes());
  return out;
}

// The step's autograd node, hand-written like the functional ops' (autograd.cpp: a
// torch::autograd::Function's per-call bookkeeping cost several microseconds, and functorch's
// torch.func.grad refuses C++ Functions). Edges: (input, gamma, beta, adj_scale, adj_bias), invalid
// for an absent one. Its backward has no derivative, so a double backward through it raises, as
// the Python path's once_differentiable.
struct KerasStepNode final : SavedArrayNode<KerasStepNode, 11> {
  // saved_: input, mean, invstd, weight, count, r, d, mask, gamma, adj_scale, adj_bias
  std::optional<at::ScalarType> beta_dtype_;
  std::vector<int64_t> beta_shape_;
  std::vector<int64_t> axis_;
  int64_t ghosts_ = 1;
  bool renorm_ = false;

  std::string name() const override { return "BnCudaKerasStepBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::array<at::Tensor, 11> t = unpack_all();
    // Once differentiable: computed without a graph. Under create_graph, when a second derivative
    // could flow (from the output's gradient, or from a saved input that needs one: stricter than
    // the Python path's once_differentiable, which looks at the former only), the results get a
    // node that raises if a second backward reaches it. (Under torch.func.grad the tensors are
    // functorch's wrappers, which that node cannot wrap; the forward admits only a single
    // transform level with nothing outside it that could differentiate: synchronized.train_step.)
    bool second = false;
    for (const at::Tensor* s : {&grads[0], &t[0], &t[8], &t[9], &t[10]})
      second = second || (s->defined() && s->requires_grad() &&
                          !s->key_set().has(c10::DispatchKey::FuncTorchGradWrapper));
    std::array<at::Tensor, 5> g = step_grads(grads[0], unpacked(t, beta_dtype_, beta_shape_), axis_, ghosts_, renorm_,
                                             needs<5>());
    if (at::GradMode::is_enabled() && second) {
      variable_list fake;
      for (const at::Tensor& r : g) {
        at::Tensor v = r.defined() ? r.detach() : r;
        if (v.defined()) v.set_requires_grad(true);
        fake.push_back(v);
      }
      variable_list wrapped = torch::autograd::DelayedError(
                                  "trying to differentiate twice bn_cuda's Keras training step (ghost batches, "
                                  "renorm, adjustment or masks): its backward is once differentiable",
                                  static_cast<int64_t>(fake.size()))
                                  .apply(std::move(fake));
      for (size_t k = 0; k < g.size(); ++k) g[k] = wrapped[k];
    }
    return variable_list(g.begin(), g.end());
  }

  void collect_constants(torch::dynamo::autograd::CompiledNodeArgs& args) const {
    args.collect(beta_dtype_.has_value());
    args.collect(beta_dtype_.value_or(at::kFloat));
    args.collect(beta_shape_);
    args.collect(axis_);
    args.collect(ghosts_);
    args.collect(renorm_);
  }

  // Packed as (the 11 saved tensors, axis, [ghosts, renorm, has_beta, beta dtype, need x 5], beta shape).
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    for (auto& sv : saved_) saved.before(sv);
    const auto n = needs<5>();
    std::vector<c10::IValue> args;
    args.reserve(saved_.size() + 3);
    for (const auto& sv : saved_) args.emplace_back(sv.unpack());
    args.emplace_back(axis_);
    args.emplace_back(std::vector<int64_t>{ghosts_, renorm_, beta_dtype_.has_value(),
                                           static_cast<int64_t>(beta_dtype_.value_or(at::kFloat)), n[0], n[1], n[2],
                                           n[3], n[4]});
    args.emplace_back(beta_shape_);
    variable_list results = call_opaque(name(), &apply_functional, args, inputs, next_edges(), saved);
    for (auto& sv : saved_) saved.after(sv);
    return results;
  }

 private:
  static StepSaved unpacked(const std::array<at::Tensor, 11>& t, std::optional<at::ScalarType> beta_dtype,
                            std::vector<int64_t> beta_shape) {
    return StepSaved{t[0], t[1], t[2],  t[3],       t[4],      t[5], t[6], t[7], t[8], t[9], t[10],
                     beta_dtype, std::move(beta_shape)};
  }

  static variable_list apply_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
    std::array<at::Tensor, 11> t;
    for (size_t k = 0; k < t.size(); ++k) t[k] = args[k].isTensor() ? args[k].toTensor() : at::Tensor();
    const std::vector<int64_t> c = args[12].toIntVector();
    const std::optional<at::ScalarType> beta_dtype =
        c[2] != 0 ? std::optional<at::ScalarType>(static_cast<at::ScalarType>(c[3])) : std::nullopt;
    const std::array<bool, 5> need{c[4] != 0, c[5] != 0, c[6] != 0, c[7] != 0, c[8] != 0};
    const StepSaved s = unpacked(t, beta_dtype, args[13].toIntVector());
    std::array<at::Tensor, 5> g = step_grads(grads[0], s, args[11].toIntVector(), c[0], c[1] != 0, need);
    // The compiled graph adds what it gets: zeros where an edge asked for a gradient and the maths
    // left none (an undefined output gradient), as autograd.cpp's nodes.
    const std::array<const at::Tensor*, 5> like{&s.input, &s.gamma, nullptr, &s.adj_s, &s.adj_b};
    for (size_t k = 0; k < g.size(); ++k) {
      if (!need[k] || g[k].defined()) continue;
      if (like[k] != nullptr && like[k]->defined()) {
        g[k] = at::zeros_like(*like[k]);
      } else if (k == 2 && beta_dtype) {
        g[k] = at::zeros(s.beta_shape, s.mean.options().dtype(*beta_dtype));
      }
    }
    return variable_list(g.begin(), g.end());
  }
};

// One training step; see BatchNormalization.forward / keras.synchronized.train_step. `ghosts` 0:
// no ghost batches (else the local ghost count, >= 1). The adjustment: flat per-feature tensors;
// gamma / beta / moving variables: flat, or in the layer's rank-preserving shapes ((1, 1, C) and the
// like; the moving variables contiguous: they are updated in place, through flat views). `weights`:
// the mask broadcastable to x, or None.
//
// One op, keras_forward: batch_stats (the ghosts' Welford states), keras_coeffs (ghost averaging,
// renorm's r and d, every moving variable, and the apply step's per-(ghost, feature) scale and
// shift composed from the adjustment, gamma / beta and r / d, in one kernel), normalize; the
// autograd node differentiates through the composition itself (KerasStepNode).
at::Tensor keras_train_step(const at::Tensor& x, std::vector<int64_t> axes, int64_t ghosts, const OptTensor& gamma,
                            const OptTensor& beta, const OptTensor& adj_scale, const OptTensor& adj_bias,
                            const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                            const OptTensor& moving_stddev, const OptTensor& renorm_mean,
                            const OptTensor& renorm_stddev, bool renorm, double momentum, double renorm_momentum,
                            double eps, std::optional<double> rmin, std::optional<double> rmax,
                            std::optional<double> dmax, const OptTensor& weights_in, bool always_update) {
  const int64_t G = ghosts > 0 ? ghosts : 1;
  // gamma / beta in the layer's own shape ((C,), or (1, 1, C, 1, 1) with ghost batches): the node's
  // edges go to them as they are, and its backward hands their gradients back in that shape (flat
  // views under autograd cost two ViewBackward nodes per step); keras_coeffs gets flat views.
  check_no_forward_ad(x, gamma, beta, adj_scale, adj_bias);
  const bool record = torch::autograd::compute_requires_grad(x, gamma, beta, adj_scale, adj_bias);
  if (record) {  // (before keras_coeffs updates the moving variables)
    check_savable(x, "input");
    check_savable(gamma, "gamma");
    check_savable(adj_scale, "adj_scale");
    check_savable(adj_bias, "adj_bias");
  }
  // (a mask made under inference mode: not a differentiable input, so a copy of its own is saved)
  const OptTensor weights =
      record && given(weights_in) && weights_in->is_inference() ? OptTensor(weights_in->clone()) : weights_in;
  at::Tensor out, mean, invstd, weight, count, r, d;
  {
    at::NoGradGuard no_grad;
    at::AutoDispatchBelowAutograd below;  // (as step_grads)
    const auto flat = [](const OptTensor& t) -> OptTensor {
      return (t.has_value() && t->defined() && t->dim() != 1) ? OptTensor(t->reshape({-1})) : t;
    };
    // The moving variables are updated in place: flat views of the contiguous ones (the layer
    // passes others as it made them, flat; anything else is refused by keras_forward's checks).
    const auto moving = [](const OptTensor& t) -> OptTensor {
      return (t.has_value() && t->defined() && t->dim() != 1 && t->is_contiguous()) ? OptTensor(t->view({-1})) : t;
    };
    std::tie(out, mean, invstd, weight, count, r, d) = ops::keras_forward(
        x, axes, weights, G, flat(gamma), flat(beta), adj_scale, adj_bias, *moving(moving_mean),
        *moving(moving_variance), renorm ? moving(moving_stddev) : OptTensor(),
        renorm ? moving(renorm_mean) : OptTensor(), renorm ? moving(renorm_stddev) : OptTensor(), momentum,
        renorm_momentum, eps, rmin, rmax, dmax, always_update);
  }
  if (!record) return out;
  auto node = new_node<KerasStepNode>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, gamma, beta, adj_scale, adj_bias));
  torch::autograd::set_history(out, node);
  const auto opt = [](const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); };
  const std::array<at::Tensor, 11> saved{x, mean, invstd, weight, count, r, d, opt(weights), opt(gamma),
                                         opt(adj_scale), opt(adj_bias)};
  for (size_t k = 0; k < saved.size(); ++k) node->saved_[k] = SavedVariable(saved[k], /*is_output=*/false);
  if (given(beta)) {
    node->beta_dtype_ = beta->scalar_type();
    node->beta_shape_ = beta->sizes().vec();
  }
  node->axis_ = axes;
  node->ghosts_ = G;
  node->renorm_ = renorm;
  return out;
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
