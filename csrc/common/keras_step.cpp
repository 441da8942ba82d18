// The single-process training step of bn_cuda.BatchNormalization on the staged ops (ghost
// batches, batch renormalization, adjustment, masks), in C++.
//
// Three ops: batch_stats (each ghost's Welford state), keras_coeffs (one kernel: ghost averaging,
// renorm's clipped r and d, every moving variable, each (ghost, feature)'s invstd and the apply
// step's scale / shift composed from the adjustment, gamma / beta and r / d), normalize. The
// Python step (bn_cuda/keras/synchronized.py, used by torch.compile, tracing modes and several
// processes) composes gather_stats, keras_finalize and tensor ops instead; both give the same
// results bit for bit (tests/test_variants.py). On a GPU the Python glue cost ~0.45 ms per layer
// call at batch 32 (several times the kernels); the first C++ version of this step still made ~20
// op calls per forward, this one makes three.
//
// Autograd: one C++ node (KerasNormalize) for the normalization and the composition. Its backward
// is the batch-norm training backward per (ghost, feature) (grad_sums, then grad_input) with the
// statistics constant in (r, d), as tf_keras's stop_gradient makes them, and the gradients of gamma,
// beta and the adjustment's outputs through the composition. Its backward ops have no derivative,
// so a double backward through this path raises, as the Python path's once_differentiable.
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

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The dtype a composition of these factors had on the Python path (ATen's type promotion).
at::ScalarType promoted(std::initializer_list<const at::Tensor*> factors) {
  bool any = false;
  at::ScalarType t = at::kFloat;
  for (const at::Tensor* f : factors) {
    if (f == nullptr || !f->defined()) continue;
    t = any ? at::promoteTypes(t, f->scalar_type()) : f->scalar_type();
    any = true;
  }
  return t;
}

// normalize() with the coefficients of keras_coeffs: the training backward of batch norm per
// (ghost, feature) with the statistics constant in renorm's (r, d) (tf_keras's stop_gradient), and
// the gradients of gamma, beta and the adjustment's (scale, bias) through tf_keras's composition
//   scale = r * S1, shift = d * S1 + O1,  S1 = adj_scale * gamma,  O1 = adj_bias * gamma + beta
// (absent factors drop out; without renorm scale = S1, shift = O1). Each gradient is computed as
// the Python path's autograd graph computes it (the same products, the same casts on every edge,
// the ghost sums in the same dtype), so both paths agree bit for bit.
// The step's statistics and coefficients (no gradient flows to them: tf_keras's stop_gradient) and
// the mask, handed to Function::apply in a holder it does not look into: as tensor arguments each
// would cost the node an input record and an edge lookup per call.
struct StepTensors {
  const at::Tensor& mean;
  const at::Tensor& invstd;
  const at::Tensor& weight;
  const at::Tensor& bias;
  const at::Tensor& count;
  const at::Tensor& r;
  const at::Tensor& d;
  const OptTensor& mask;
};

struct KerasNormalize : public torch::autograd::Function<KerasNormalize> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& gamma,
                            const OptTensor& beta, const OptTensor& adj_scale, const OptTensor& adj_bias,
                            StepTensors st, const std::vector<int64_t>& axis, int64_t ghosts, bool renorm) {
    const auto opt = [](const OptTensor& t) { return given(t) ? *t : at::Tensor(); };
    ctx->save_for_backward({input, st.mean, st.invstd, st.weight, st.count, st.r, st.d, opt(st.mask), opt(gamma),
                            opt(beta), opt(adj_scale), opt(adj_bias)});
    // One saved_data entry (each is a hash-map insert and an IValue per call): [ghosts, renorm, axis...].
    std::vector<int64_t> meta{ghosts, renorm};
    meta.insert(meta.end(), axis.begin(), axis.end());
    ctx->saved_data["meta"] = std::move(meta);
    ctx->set_materialize_grads(false);
    return ops::normalize(input, st.mean, st.invstd, st.weight, st.bias, axis, ghosts);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& mean = saved[1];
    const at::Tensor& invstd = saved[2];
    const at::Tensor& weight = saved[3];
    const at::Tensor& count = saved[4];
    const at::Tensor& r = saved[5];
    const at::Tensor& d = saved[6];
    const OptTensor mask = saved[7].defined() ? OptTensor(saved[7]) : OptTensor();
    const at::Tensor& gamma = saved[8];
    const at::Tensor& beta = saved[9];
    const at::Tensor& adj_s = saved[10];
    const at::Tensor& adj_b = saved[11];
    const std::vector<int64_t> meta = ctx->saved_data["meta"].toIntVector();
    const int64_t G = meta[0];
    const bool renorm = meta[1] != 0;
    const std::vector<int64_t> axis(meta.begin() + 2, meta.end());
    const at::Tensor& grad_out = grads[0];
    // Edges exist only for the tensors given: input, [gamma], [beta], [adj_scale], [adj_bias].
    size_t edge = 1;
    const auto needs = [&](const at::Tensor& t) { return t.defined() && ctx->needs_input_grad(edge++); };
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_g = needs(gamma), need_b = needs(beta), need_as = needs(adj_s), need_ab = needs(adj_b);
    // once_differentiable, as the Python path: computed without a graph; under create_graph the
    // results get a node that raises if a second backward reaches it.
    const bool wrap = at::GradMode::is_enabled() && grad_out.defined() && grad_out.requires_grad();
    at::NoGradGuard no_grad;
    at::Tensor gi, gg, gb, gas, gab;
    if (grad_out.defined() && (need_x || need_g || need_b || need_as || need_ab)) {
      at::Tensor sum_dy, sum_dy_xmu;
      std::tie(sum_dy, sum_dy_xmu) = ops::grad_sums(grad_out, input, mean, invstd, axis, G);
      if (need_x)
        gi = ops::grad_input(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis, mask, G);
      if (need_g || need_b || need_as || need_ab) {
        const at::Tensor* none = nullptr;
        const at::Tensor* rr = renorm ? &r : none;
        const at::Tensor* dd = renorm ? &d : none;
        const at::ScalarType s1_dt = promoted({&adj_s, &gamma});
        const at::ScalarType o1_dt = promoted({&adj_b, adj_b.defined() ? &gamma : none, &beta});
        const bool has_s1 = adj_s.defined() || gamma.defined();
        const bool has_o1 = adj_b.defined() || beta.defined();
        const at::ScalarType scale_dt = promoted({rr, &adj_s, &gamma});
        const at::ScalarType shift_dt =
            promoted({dd, renorm ? &adj_s : none, renorm ? &gamma : none, &adj_b, adj_b.defined() ? &gamma : none,
                      &beta});
        // d loss / d (per-ghost scale, shift), in the dtypes of those tensors, summed over ghosts.
        const auto ghost_sum = [&](at::Tensor t, at::ScalarType dt) {
          t = t.to(dt);
          return G > 1 ? t.view({G, -1}).sum(0) : t;
        };
        const at::Tensor d_scale = ghost_sum(sum_dy_xmu * invstd, scale_dt);
        const at::Tensor d_shift = ghost_sum(sum_dy, shift_dt);
        at::Tensor d_s1, d_o1;  // d loss / d S1, d O1
        if (renorm) {
          if (has_s1) d_s1 = (d_scale * r).to(s1_dt) + (d_shift * d).to(s1_dt);
          if (has_o1) d_o1 = d_shift.to(o1_dt);
        } else {
          d_s1 = d_scale;
          d_o1 = d_shift;
        }
        // O1 = adj_bias * gamma + beta: the add hands d O1 to each side in its own dtype.
        at::Tensor d_prod;  // d loss / d (adj_bias * gamma)
        if (adj_b.defined()) d_prod = gamma.defined() ? d_o1.to(promoted({&adj_b, &gamma})) : d_o1;
        if (need_g) {
          at::Tensor term = adj_s.defined() ? (d_s1 * adj_s).to(gamma.scalar_type()) : d_s1.to(gamma.scalar_type());
          if (adj_b.defined()) term = term + (d_prod * adj_b).to(gamma.scalar_type());
          gg = term.reshape(gamma.sizes());
        }
        if (need_b) gb = d_o1.to(beta.scalar_type()).reshape(beta.sizes());
        if (need_as) gas = (gamma.defined() ? d_s1 * gamma : d_s1).to(adj_s.scalar_type()).reshape(adj_s.sizes());
        if (need_ab)
          gab = (gamma.defined() ? d_prod * gamma : d_prod).to(adj_b.scalar_type()).reshape(adj_b.sizes());
      }
    }
    if (wrap) {
      at::AutoGradMode enable(true);
      variable_list fake;
      for (const at::Tensor& t : {gi, gg, gb, gas, gab}) {
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
      gg = wrapped[1];
      gb = wrapped[2];
      gas = wrapped[3];
      gab = wrapped[4];
    }
    variable_list out(9);  // one per forward argument
    out[0] = gi;
    out[1] = gg;
    out[2] = gb;
    out[3] = gas;
    out[4] = gab;
    return out;
  }
};

// One training step; see BatchNormalization.forward / keras.synchronized.train_step. `ghosts` 0:
// no ghost batches (else the local ghost count, >= 1). gamma / beta / adjustment / moving variables:
// flat per-feature tensors (the moving variables are updated in place). `weights`: the mask
// broadcastable to x, or None.
//
// Three ops: batch_stats (the ghosts' Welford states), keras_coeffs (ghost averaging, renorm's r
// and d, every moving variable, and the apply step's per-(ghost, feature) scale and shift composed
// from the adjustment, gamma / beta and r / d, in one kernel), normalize; the autograd node
// differentiates through the composition itself (KerasNormalize).
at::Tensor keras_train_step(const at::Tensor& x, std::vector<int64_t> axes, int64_t ghosts, const OptTensor& gamma_in,
                            const OptTensor& beta_in, const OptTensor& adj_scale, const OptTensor& adj_bias,
                            const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                            const OptTensor& moving_stddev, const OptTensor& renorm_mean,
                            const OptTensor& renorm_stddev, bool renorm, double momentum, double renorm_momentum,
                            double eps, std::optional<double> rmin, std::optional<double> rmax,
                            std::optional<double> dmax, const OptTensor& weights, bool always_update) {
  const int64_t G = ghosts > 0 ? ghosts : 1;
  // gamma / beta in the layer's own shape ((C,), or (1, 1, C, 1, 1) with ghost batches): flat views
  // here, under autograd, so their gradients reach the parameters in that shape.
  const auto flat = [](const OptTensor& t) -> OptTensor {
    return (t.has_value() && t->defined() && t->dim() != 1) ? OptTensor(t->reshape({-1})) : t;
  };
  const OptTensor gamma = flat(gamma_in), beta = flat(beta_in);
  at::Tensor mean, m2, count, invstd, weight, bias, r, d;
  {
    at::NoGradGuard no_grad;
    std::tie(mean, m2, count) = ops::batch_stats(x, axes, weights, G);
    std::tie(invstd, weight, bias, r, d) =
        ops::keras_coeffs(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                          renorm ? moving_stddev : OptTensor(), renorm ? renorm_mean : OptTensor(),
                          renorm ? renorm_stddev : OptTensor(), G, momentum, renorm_momentum, eps, rmin, rmax, dmax,
                          always_update);
  }
  return KerasNormalize::apply(x, gamma, beta, adj_scale, adj_bias,
                               StepTensors{mean, invstd, weight, bias, count, r, d, weights}, axes, G, renorm);
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
