// Autograd kernels of bn_cuda::forward_train, bn_cuda::forward_infer and bn_cuda::backward, in C++.
//
// forward_train updates the running statistics in place, and torch.library.register_autograd
// refuses operators with mutable arguments; a Python autograd layer around an op costs 10-40 us of
// host time per call (even under no_grad), more than the whole kernel on small tensors and as much
// as a GPU launch, and needs the GIL when another extension calls the op from C++. These kernels
// (dispatch key Autograd, device-agnostic) record one hand-written C++ node each (BnNode for the
// forwards, BackwardNode for the backward op, which serves double backward), as light as torch's
// generated nodes. The forwards' nodes call the registered bn_cuda::backward op through the
// dispatcher (bn_cuda/ops.h, the header other extensions use); torch.compile traces the backward
// op like any other.
#include <Python.h>  // (first: it must precede the standard headers)

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "bn_cuda/ops.h"
#include "canonical.h"
#include "glue.h"
#include "nodes.h"

namespace bn_cuda {
namespace {

using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// Running statistics that require grad, with grad mode on, are refused as torch's batch norm refuses
// them: no gradient reaches them (they are not differentiable inputs), and in training a leaf that
// requires grad would be updated in place.
void check_stats_need_no_grad(const OptTensor& running_mean, const OptTensor& running_var) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [t, name] : {std::pair<const OptTensor&, const char*>(running_mean, "running_mean"),
                                std::pair<const OptTensor&, const char*>(running_var, "running_var")}) {
    TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad()), "bn_cuda: ", name,
                " requires grad, but batch norm is not differentiable with respect to its running statistics "
                "(torch's batch_norm refuses them too); pass ", name, ".detach() or a tensor that does not "
                "require grad");
  }
}

// A flat per-feature tensor shaped to broadcast against `input` (feature axes sorted).
at::Tensor bcast(const at::Tensor& t, const at::Tensor& input, at::IntArrayRef axes) {
  std::vector<c10::SymInt> shape(static_cast<size_t>(input.dim()), c10::SymInt(1));
  for (int64_t a : axes) shape[static_cast<size_t>(a)] = input.sym_size(a);
  return t.reshape_symint(shape);
}

// What a forward's node keeps of bias (and whether there is a weight): the shape and dtype its
// gradient takes. The weight itself is saved (the backward needs it).
struct AffineMeta {
  bool has_w = false, has_b = false;
  at::ScalarType bias_dtype = at::kFloat;
  std::vector<c10::SymInt> bias_shape;  // empty when the bias is flat (C,); symbolic under torch.compile
};

AffineMeta affine_meta(const OptTensor& weight, const OptTensor& bias) {
  AffineMeta m;
  m.has_w = weight.has_value() && weight->defined();
  m.has_b = bias.has_value() && bias->defined();
  if (m.has_b) {
    m.bias_dtype = bias->scalar_type();
    if (bias->dim() != 1) m.bias_shape = bias->sym_sizes().vec();
  }
  return m;
}

// (grad_input, grad_weight, grad_bias) through bn_cuda::backward, weight / bias gradients in the
// parameters' own shapes and dtypes; undefined where not needed (mask: input, weight, bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> param_backward(const AffineMeta& meta, at::IntArrayRef axis,
                                                             const at::Tensor& grad_out, const at::Tensor& input,
                                                             const at::Tensor& weight, const at::Tensor& mean,
                                                             const at::Tensor& invstd, bool train,
                                                             std::array<bool, 3> mask) {
  at::Tensor gi, gw, gb;
  mask[1] = mask[1] && meta.has_w;
  mask[2] = mask[2] && meta.has_b;
  if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2])) return {gi, gw, gb};
  const OptTensor w = weight.defined() ? OptTensor(weight) : OptTensor();
  // Under create_graph, through the backward op's autograd kernel (a graph for double backward);
  // otherwise straight below it, one dispatcher pass instead of two.
  if (at::GradMode::is_enabled()) {
    std::tie(gi, gw, gb) = ops::backward(grad_out, input, w, mean, invstd, train, axis, mask);
  } else {
    at::AutoDispatchBelowAutograd guard;
    std::tie(gi, gw, gb) = ops::backward(grad_out, input, w, mean, invstd, train, axis, mask);
  }
  if (!mask[0]) gi = at::Tensor();
  // The op's (C,) gradients in the parameters' shapes and dtypes; flat parameters take them without
  // the cost of a view, and parameters of the acc dtype (the usual case) without a cast.
  if (!mask[1]) {
    gw = at::Tensor();
  } else if (weight.dim() != 1) {
    gw = gw.reshape_symint(weight.sym_sizes());
  }
  if (!mask[2]) {
    gb = at::Tensor();
  } else if (!meta.bias_shape.empty()) {
    gb = gb.reshape_symint(meta.bias_shape);
  }
  cast_results({{&gw, mask[1] ? weight.scalar_type() : at::kFloat}, {&gb, meta.bias_dtype}});
  return {gi, gw, gb};
}

// Gradients of a training forward (input, weight, bias) from those of its three outputs (output,
// batch mean, batch inverse std); mask: which of (input, weight, bias) to compute.
variable_list train_grads(const variable_list& grads, const at::Tensor& input, const at::Tensor& weight,
                          const at::Tensor& mean, const at::Tensor& invstd, const AffineMeta& meta,
                          at::IntArrayRef axis, std::array<bool, 3> mask) {
  at::Tensor gi, gw, gb;
  std::tie(gi, gw, gb) = param_backward(meta, axis, grads[0], input, weight, mean, invstd, /*train=*/true, mask);
  const at::Tensor& grad_mean = grads[1];
  const at::Tensor& grad_invstd = grads[2];
  if (mask[0] && (grad_mean.defined() || grad_invstd.defined())) {
    // Gradients reaching the returned statistics (double backward, or a caller using them):
    // d mean / dx = 1 / M, d invstd / dx = -invstd^3 (x - mean) / M.
    const DimVec axes = normalize_axes(axis, input.dim());
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
  return {gi, gw, gb};
}

// Gradients of an inference forward: the running statistics are constants, grad_input = dy * invstd
// * weight. The statistics of the backward are derived here from the saved running statistics.
variable_list infer_grads(const variable_list& grads, const at::Tensor& input, const at::Tensor& weight,
                          const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                          const AffineMeta& meta, at::IntArrayRef axis, std::array<bool, 3> mask) {
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  const at::Tensor mean = running_mean.detach().to(acc).reshape(-1);
  // 1 / sqrt, both correctly rounded, as the forward's invstd_of: CUDA's rsqrt is up to 2 ulp off,
  // and the backward would then scale by another invstd than the forward applied.
  const at::Tensor invstd = at::reciprocal(at::sqrt(running_var.detach().to(acc).reshape(-1) + eps));
  at::Tensor gi, gw, gb;
  std::tie(gi, gw, gb) = param_backward(meta, axis, grads[0], input, weight, mean, invstd, /*train=*/false, mask);
  return {gi, gw, gb};
}

// The autograd nodes of the two forwards: written by hand, as torch's generated nodes are, rather
// than through torch::autograd::Function, whose generic bookkeeping (per-call input and output
// records with their shapes, a saved_data hash map of IValues, output wrapping) cost 5-15 us a
// call on a 2-core AVX2 VM: a tenth of a small CPU batch norm's forward and backward.
//
// Edges: (input, weight, bias), one per argument, invalid for an absent one. Inputs: the gradients
// of the forward's outputs.
struct BnNode final : torch::autograd::Node {
  explicit BnNode(bool train) : train_(train) {}

  bool train_;                                                       // forward_train or forward_infer
  torch::autograd::SavedVariable input_, weight_, stat0_, stat1_;  // stats: (mean, invstd) or running
  std::vector<int64_t> axis_;
  AffineMeta meta_;
  double eps_ = 0.0;  // inference: the invstd of the backward is derived from the running variance

  std::string name() const override {
    return train_ ? "BnCudaForwardTrainBackward" : "BnCudaForwardInferBackward";
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    // The training statistics are outputs of this node: unpacked with it, so that gradients
    // reaching them through a double backward come back here.
    const NodePtr self = train_ ? getptr() : NodePtr();
    return grads_of(train_, grads, input_.unpack(), weight_.unpack(), stat0_.unpack(self), stat1_.unpack(self), eps_,
                    meta_, axis_, mask());
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    stat0_.reset_data();
    stat1_.reset_data();
  }

  // (Both constnesses, no `override`: torch made Node::compiled_args const in 2025; whichever the
  // base declares is the one overridden.)
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) { std::as_const(*this).compiled_args(args); }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const {
    args.collect(train_);
    args.collect(input_, false);
    args.collect(weight_, false);
    args.collect(stat0_, train_);
    args.collect(stat1_, train_);
    args.collect(axis_);
    args.collect(meta_.has_w);
    args.collect(meta_.has_b);
    args.collect(meta_.bias_dtype);
    args.collect(meta_.bias_shape);
    args.collect(eps_);
  }

  // The backward as an opaque function of the (proxied) saved tensors and the node's constants,
  // packed as IValues: (input, weight, stat0, stat1, axis, [has_w, has_b, bias_dtype], bias shape,
  // mask, [train, eps]).
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(input_);
    saved.before(weight_);
    saved.before(stat0_);
    saved.before(stat1_);
    saved.before(meta_.bias_shape);
    const NodePtr self = train_ ? getptr() : NodePtr();
    const auto m = mask();
    std::vector<c10::IValue> args{input_.unpack(), weight_.unpack(), stat0_.unpack(self), stat1_.unpack(self),
                                  axis_,
                                  std::vector<int64_t>{meta_.has_w, meta_.has_b, static_cast<int64_t>(meta_.bias_dtype)},
                                  c10::IValue(c10::SymIntArrayRef(meta_.bias_shape)),
                                  std::vector<bool>{m[0], m[1], m[2]}, std::vector<double>{train_ ? 1.0 : 0.0, eps_}};
    variable_list results = call_opaque(name(), &apply_functional, args, inputs, next_edges(), saved);
    saved.after(input_);
    saved.after(weight_);
    saved.after(stat0_);
    saved.after(stat1_);
    saved.after(meta_.bias_shape);
    return results;
  }

 private:
  std::array<bool, 3> mask() {
    return {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2)};
  }

  static variable_list grads_of(bool train, const variable_list& grads, const at::Tensor& input,
                                const at::Tensor& weight, const at::Tensor& stat0, const at::Tensor& stat1, double eps,
                                const AffineMeta& meta, at::IntArrayRef axis, std::array<bool, 3> mask) {
    return train ? train_grads(grads, input, weight, stat0, stat1, meta, axis, mask)
                 : infer_grads(grads, input, weight, stat0, stat1, eps, meta, axis, mask);
  }

  static variable_list apply_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
    AffineMeta meta;
    const std::vector<int64_t> m = args[5].toIntVector();
    meta.has_w = m[0] != 0;
    meta.has_b = m[1] != 0;
    meta.bias_dtype = static_cast<at::ScalarType>(m[2]);
    meta.bias_shape = args[6].toSymIntVector();
    const auto mask = args[7].toBoolList();
    const std::vector<double> c = args[8].toDoubleVector();
    const at::Tensor input = args[0].toTensor();
    const at::Tensor weight = args[1].isTensor() ? args[1].toTensor() : at::Tensor();
    const at::Tensor stat0 = args[2].toTensor();
    variable_list r = grads_of(c[0] != 0.0, grads, input, weight, stat0, args[3].toTensor(), c[1], meta,
                               args[4].toIntVector(), {mask.get(0), mask.get(1), mask.get(2)});
    // The compiled graph adds what it gets; the eager engine skips an undefined gradient (zero)
    // that an edge asked for, the compiled graph needs the zeros.
    if (mask.get(0) && !r[0].defined()) r[0] = at::zeros_like(input);
    if (mask.get(1) && meta.has_w && !r[1].defined()) r[1] = at::zeros_like(weight);
    if (mask.get(2) && meta.has_b && !r[2].defined()) {
      r[2] = at::zeros({stat0.numel()}, stat0.options().dtype(meta.bias_dtype));
      if (!meta.bias_shape.empty()) r[2] = r[2].reshape_symint(meta.bias_shape);
    }
    return r;
  }
};

// A new node with edges to (input, weight, bias) and what both forwards keep of weight and bias.
auto make_node(bool train, const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
               at::IntArrayRef axis) {
  auto node = new_node<BnNode>(train);
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  node->axis_ = axis.vec();
  node->meta_ = affine_meta(weight, bias);
  node->input_ = torch::autograd::SavedVariable(input, /*is_output=*/false);
  node->weight_ = torch::autograd::SavedVariable(weight, /*is_output=*/false);
  return node;
}

// The reduced dims of `input` (those not among the feature axes).
std::vector<int64_t> reduced_dims(const at::Tensor& input, at::IntArrayRef axes) {
  std::vector<int64_t> red;
  for (int64_t d = 0; d < input.dim(); ++d)
    if (std::find(axes.begin(), axes.end(), d) == axes.end()) red.push_back(d);
  return red;
}

// Backward of the backward op (double backward): the op's maths recomputed as differentiable ATen
// ops (all three outputs in the acc dtype), then differentiated by autograd with respect to the
// inputs that need it. Only higher-order gradients come here; the first-order path is the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_composite(const at::Tensor& grad_out, const at::Tensor& input,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& invstd, bool train,
                                                                   at::IntArrayRef axis) {
  const DimVec axes = normalize_axes(axis, input.dim());
  const std::vector<int64_t> red = reduced_dims(input, axes);
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
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

// Gradients of bn_cuda::backward's inputs (grad_out, input, weight, save_mean, save_invstd) from
// those of its outputs: backward_composite's graph differentiated by autograd (with a graph of its
// own under create_graph: third order and up). need: which of the five to compute.
variable_list double_backward(const variable_list& grads, const std::array<at::Tensor, 5>& saved,
                              std::array<bool, 5> need, bool train, at::IntArrayRef axis, std::array<bool, 3> mask) {
  variable_list result(5);
  if (!(need[0] || need[1] || need[2] || need[3] || need[4])) return result;
  const bool create_graph = at::GradMode::is_enabled();
  at::AutoGradMode enable(true);
  variable_list leaves(5), wrt;
  for (size_t k = 0; k < 5; ++k) {
    need[k] = need[k] && saved[k].defined();
    if (!saved[k].defined()) continue;
    leaves[k] = saved[k].detach().requires_grad_(need[k]);
    if (need[k]) wrt.push_back(leaves[k]);
  }
  const auto outs = backward_composite(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], train, axis);
  const std::array<at::Tensor, 3> out_list{std::get<0>(outs), std::get<1>(outs), std::get<2>(outs)};
  variable_list outputs, grad_outputs;
  for (size_t i = 0; i < 3; ++i) {
    // (an output may not depend on what needs a gradient: in evaluation mode grad_input is
    // dy * invstd * weight, independent of the input)
    if (mask[i] && grads[i].defined() && grads[i].sym_numel() > 0 && out_list[i].requires_grad()) {
      outputs.push_back(out_list[i]);
      grad_outputs.push_back(grads[i].to(out_list[i].scalar_type()));
    }
  }
  if (outputs.empty() || wrt.empty()) return result;
  const variable_list got = torch::autograd::grad(outputs, wrt, grad_outputs, /*retain_graph=*/create_graph,
                                                  create_graph, /*allow_unused=*/true);
  for (size_t k = 0, j = 0; k < 5; ++k)
    if (need[k]) result[k] = got[j++];
  return result;
}

// The backward op's node (double backward), hand-written like the forwards'. Edges: (grad_out,
// input, weight, save_mean, save_invstd), invalid for an absent weight.
struct BackwardNode final : SavedArrayNode<BackwardNode, 5> {  // saved_: the op's five tensor arguments
  bool train_ = true;
  std::vector<int64_t> axis_;
  std::array<bool, 3> mask_{};  // the op's output_mask

  std::string name() const override { return "BnCudaBackwardBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return double_backward(grads, unpack_all(), needs(), train_, axis_, mask_);
  }

  void collect_constants(torch::dynamo::autograd::CompiledNodeArgs& args) const {
    args.collect(train_);
    args.collect(axis_);
    for (bool m : mask_) args.collect(m);
  }

  // Packed as (grad_out, input, weight, save_mean, save_invstd, axis, [mask, need], [train]).
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    for (auto& sv : saved_) saved.before(sv);
    const auto n = needs();
    std::vector<c10::IValue> args;
    args.reserve(8);
    for (const auto& sv : saved_) args.emplace_back(sv.unpack());
    args.emplace_back(axis_);
    args.emplace_back(std::vector<bool>{mask_[0], mask_[1], mask_[2], n[0], n[1], n[2], n[3], n[4]});
    args.emplace_back(train_);
    variable_list results = call_opaque(name(), &apply_functional, args, inputs, next_edges(), saved);
    for (auto& sv : saved_) saved.after(sv);
    return results;
  }

 private:
  static variable_list apply_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
    // Called from Python by compiled autograd, with the GIL held, which the autograd engine that
    // double_backward runs refuses: released for the call.
    struct ReleaseGil {
      PyThreadState* state = PyGILState_Check() ? PyEval_SaveThread() : nullptr;
      ~ReleaseGil() {
        if (state) PyEval_RestoreThread(state);
      }
    } release;
    std::array<at::Tensor, 5> t;
    for (size_t k = 0; k < 5; ++k) t[k] = args[k].isTensor() ? args[k].toTensor() : at::Tensor();
    const auto b = args[6].toBoolList();
    const std::array<bool, 5> need{b.get(3), b.get(4), b.get(5), b.get(6), b.get(7)};
    variable_list r = double_backward(grads, t, need, args[7].toBool(), args[5].toIntVector(),
                                      {b.get(0), b.get(1), b.get(2)});
    for (size_t k = 0; k < 5; ++k)  // (zeros where asked for: see BnNode::apply_functional)
      if (need[k] && t[k].defined() && !r[k].defined()) r[k] = at::zeros_like(t[k]);
    return r;
  }
};

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd / hessian): the outputs'
// tangents from the op's maths recomputed as ATen ops on the dual inputs, which carry the tangents
// (and, nested, tangents of tangents) through torch's own formulas. Only calls with a tangent pay
// for it; the kernel still computes the outputs and updates the running statistics.

// y = (x - mean) * invstd * weight + bias, in the acc dtype, from the given (broadcast) statistics.
at::Tensor affine_composite(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                            const OptTensor& weight, const OptTensor& bias, const at::Tensor& input,
                            at::IntArrayRef axes) {
  const auto acc = x.scalar_type();
  at::Tensor y = (x - mean) * invstd;
  if (weight.has_value() && weight->defined()) y = y * bcast(weight->to(acc).reshape(-1), input, axes);
  if (bias.has_value() && bias->defined()) y = y + bcast(bias->to(acc).reshape(-1), input, axes);
  return y.to(input.scalar_type());
}

void set_tangent(const at::Tensor& out, const at::Tensor& dual) {
  const at::Tensor t = dual._fw_grad(/*level=*/0);
  if (t.defined()) out._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
}

void train_tangents(const at::Tensor& out, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                    const at::Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps,
                    at::IntArrayRef axis) {
  if (input.numel() == 0) return;
  const DimVec axes = normalize_axes(axis, input.dim());
  const std::vector<int64_t> red = reduced_dims(input, axes);
  const at::Tensor x = input.to(acc_scalar_type(input.scalar_type()));
  const at::Tensor mean = x.mean(red, /*keepdim=*/true);
  const at::Tensor invstd = at::rsqrt((x - mean).pow(2).mean(red, /*keepdim=*/true) + eps);
  set_tangent(out, affine_composite(x, mean, invstd, weight, bias, input, axes));
  set_tangent(save_mean, mean.reshape(-1));
  set_tangent(save_invstd, invstd.reshape(-1));
}

void infer_tangents(const at::Tensor& out, const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const at::Tensor& running_mean, const at::Tensor& running_var, double eps, at::IntArrayRef axis) {
  if (input.numel() == 0) return;
  const DimVec axes = normalize_axes(axis, input.dim());
  const at::Tensor x = input.to(acc_scalar_type(input.scalar_type()));
  const auto acc = x.scalar_type();
  // (the running statistics are constants, as in torch: no tangent flows from them)
  const at::Tensor mean = bcast(running_mean.detach().to(acc).reshape(-1), input, axes);
  const at::Tensor invstd = at::reciprocal(at::sqrt(bcast(running_var.detach().to(acc).reshape(-1), input, axes) + eps));
  set_tangent(out, affine_composite(x, mean, invstd, weight, bias, input, axes));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_autograd(const at::Tensor& grad_out, const at::Tensor& input,
                                                                 const OptTensor& weight, const at::Tensor& save_mean,
                                                                 const at::Tensor& save_invstd, bool train,
                                                                 at::IntArrayRef axis, std::array<bool, 3> output_mask) {
  if (any_forward_grad(grad_out, input, weight, save_mean, save_invstd)) {
    // Forward-mode AD through the backward (forward-over-reverse: Hessian-vector products,
    // torch.func.hessian): the op's maths as ATen ops on the dual inputs, which carry the
    // tangents and record their own reverse-mode graph.
    at::Tensor gi, gw, gb;
    std::tie(gi, gw, gb) = backward_composite(grad_out, input, weight.has_value() ? *weight : at::Tensor(), save_mean,
                                              save_invstd, train, axis);
    const auto none = [&](at::ScalarType dt) { return at::empty({0}, input.options().dtype(dt)); };
    return {output_mask[0] ? gi : none(input.scalar_type()), output_mask[1] ? gw : none(gw.scalar_type()),
            output_mask[2] ? gb : none(gb.scalar_type())};
  }
  // (whether a gradient can flow from this call: grad mode on and a tensor requiring grad)
  const bool record = torch::autograd::compute_requires_grad(grad_out, input, weight, save_mean, save_invstd);
  at::AutoDispatchBelowAutograd guard;
  at::Tensor gi, gw, gb;
  std::tie(gi, gw, gb) = ops::backward(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask);
  if (!record) return {gi, gw, gb};
  auto node = new_node<BackwardNode>();
  node->set_next_edges(torch::autograd::collect_next_edges(grad_out, input, weight, save_mean, save_invstd));
  torch::autograd::set_history(gi, node);
  torch::autograd::set_history(gw, node);
  torch::autograd::set_history(gb, node);
  node->saved_[0] = torch::autograd::SavedVariable(grad_out, /*is_output=*/false);
  node->saved_[1] = torch::autograd::SavedVariable(input, /*is_output=*/false);
  node->saved_[2] = torch::autograd::SavedVariable(weight, /*is_output=*/false);
  node->saved_[3] = torch::autograd::SavedVariable(save_mean, /*is_output=*/false);
  node->saved_[4] = torch::autograd::SavedVariable(save_invstd, /*is_output=*/false);
  node->train_ = train;
  node->axis_ = axis.vec();
  node->mask_ = output_mask;
  return {gi, gw, gb};
}

at::Tensor forward_infer_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                  const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                  at::IntArrayRef axis) {
  check_stats_need_no_grad(running_mean, running_var);
  const bool record = torch::autograd::compute_requires_grad(input, weight, bias);
  at::Tensor out;
  {
    at::AutoDispatchBelowAutograd guard;
    out = ops::forward_infer(input, weight, bias, running_mean, running_var, eps, axis);
  }
  if (any_forward_grad(input, weight, bias)) infer_tangents(out, input, weight, bias, running_mean, running_var, eps, axis);
  if (!record) return out;
  auto node = make_node(/*train=*/false, input, weight, bias, axis);
  torch::autograd::set_history(out, node);
  // The running statistics are saved as they are (as torch's batch_norm does): modifying them in
  // place before the backward makes it raise, as in torch; the statistics of the backward are
  // derived from them there, which keeps the forward of a call that needs a gradient (frozen
  // batch norm in fine-tuning) free of extra ops.
  node->stat0_ = torch::autograd::SavedVariable(running_mean, /*is_output=*/false);
  node->stat1_ = torch::autograd::SavedVariable(running_var, /*is_output=*/false);
  node->eps_ = eps;
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_autograd(
    const at::Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, double momentum, double eps, at::IntArrayRef axis, bool unbiased) {
  check_stats_need_no_grad(running_mean, running_var);
  const bool record = torch::autograd::compute_requires_grad(input, weight, bias);
  if (record) {  // (before the kernel: it updates the running statistics)
    check_savable(input, "input");
    check_savable(weight, "weight");
  }
  at::Tensor out, mean, invstd;
  {
    at::AutoDispatchBelowAutograd guard;
    std::tie(out, mean, invstd) =
        ops::forward_train(input, weight, bias, running_mean, running_var, momentum, eps, axis, unbiased);
  }
  if (any_forward_grad(input, weight, bias)) train_tangents(out, mean, invstd, input, weight, bias, eps, axis);
  if (!record) return {out, mean, invstd};
  // The running statistics are not differentiable inputs: no gradient flows to them, as in torch.
  auto node = make_node(/*train=*/true, input, weight, bias, axis);
  torch::autograd::set_history(out, node);
  torch::autograd::set_history(mean, node);
  torch::autograd::set_history(invstd, node);
  node->stat0_ = torch::autograd::SavedVariable(mean, /*is_output=*/true);
  node->stat1_ = torch::autograd::SavedVariable(invstd, /*is_output=*/true);
  return {out, mean, invstd};
}

}  // namespace
}  // namespace bn_cuda

TORCH_LIBRARY_IMPL(bn_cuda, Autograd, m) {
  m.impl("forward_train", &bn_cuda::forward_train_autograd);
  m.impl("forward_infer", &bn_cuda::forward_infer_autograd);
  m.impl("backward", &bn_cuda::backward_autograd);
  // The staged ops are building blocks that the layers and SyncNormalize differentiate as a whole
  // (their calls run under no_grad or inside an autograd.Function); by themselves they have no
  // derivative. With an input that requires grad their outputs carry torch's NotImplemented node: a
  // backward through them raises "the derivative for 'bn_cuda::normalize' is not implemented"
  // (without a kernel here, torch's default fallback only warned and left the gradient None).
  for (const char* op : {"batch_stats", "gather_stats", "normalize", "grad_sums", "grad_input", "keras_finalize",
                         "keras_coeffs"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
