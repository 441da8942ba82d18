#include "staged.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

namespace bn_cuda {

GhostPlan plan_ghosts(const at::Tensor& input, at::IntArrayRef axis, int64_t ghosts, bool masked) {
  check_defined(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 2, "bn_cuda: input must have at least 2 dimensions, got ", input.dim(),
                    "-D input of shape ", shape_str(input.sizes()));
  GhostPlan g;
  g.input = input;
  g.axis = normalize_axes(axis, input.dim());
  if (ghosts == 1) return g;
  const int64_t n = input.size(0);
  TORCH_CHECK_VALUE(ghosts >= 1, "bn_cuda: ghosts must be >= 1, got ", ghosts);
  g.ghosts = ghosts;
  for (int64_t a : g.axis) g.features *= input.size(a);
  // (an empty batch takes any ghost count; ghosts * C entries per statistic must still be a size)
  TORCH_CHECK_VALUE(ghosts <= std::numeric_limits<int64_t>::max() / std::max<int64_t>(g.features, 1),
                    "bn_cuda: ghosts=", ghosts, " times the ", g.features, " features overflows int64");
  TORCH_CHECK_VALUE(n % ghosts == 0, "bn_cuda: ghosts=", ghosts, " must divide the batch size, got a batch of ", n);
  for (int64_t a : g.axis)
    TORCH_CHECK_VALUE(a != 0, "bn_cuda: with ghost batches the batch dim 0 cannot be a feature axis; axis=",
                      shape_str(axis));
  if (!masked && ghost_rows_apply(plan_canonical(input, g.axis), input)) {
    g.rows = ghosts;  // channels-last: ghost rows, no copy
    return g;
  }
  // Elsewhere: split the batch dim into (n / ghosts, ghosts), always a view, with the ghost dim as
  // the first feature axis (per-feature order: ghost-major, as with ghost rows).
  g.split = true;
  g.split_shape = {n / ghosts, ghosts};
  for (int64_t d = 1; d < input.dim(); ++d) g.split_shape.push_back(input.size(d));
  g.input = input.view(g.split_shape);
  DimVec axes = {1};
  for (int64_t a : g.axis) axes.push_back(a + 1);
  g.axis = axes;
  return g;
}

void check_ghost_entries(const GhostPlan& g, const at::Tensor& input, at::IntArrayRef axis,
                         const c10::optional<at::Tensor>& t, const char* name) {
  if (g.ghosts == 1 || !t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == g.ghosts * g.features, "bn_cuda: ", name, " has shape ", shape_str(t->sizes()), " (",
              t->numel(), " elements) but the input of shape ", shape_str(input.sizes()), " has ", g.features,
              " features along axis ", shape_str(axis), " and ghosts=", g.ghosts, ": expected ghosts * C = ",
              g.ghosts * g.features, " entries, ghost-major (shape [", g.ghosts * g.features, "])");
}

void check_grad_out_shape(const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bn_cuda: grad_out has shape ", shape_str(grad_out.sizes()),
              " but input has shape ", shape_str(input.sizes()));
}

at::Tensor ghost_view(const at::Tensor& t, const GhostPlan& g) {
  if (!g.split) return t;
  TORCH_CHECK(t.dim() + 1 == static_cast<int64_t>(g.split_shape.size()), "bn_cuda: expected a tensor of the input's rank ",
              g.split_shape.size() - 1, ", got shape ", shape_str(t.sizes()));
  return t.view(g.split_shape);
}

// plan_ghosts for an op that may take a mask; `mask` receives the checked mask, expanded to the
// input and split like it (masked ghost batches always split: the masked kernels have no ghost rows).
GhostPlan plan_masked_ghosts(const at::Tensor& input, at::IntArrayRef axis, const c10::optional<at::Tensor>& mask_in,
                             int64_t ghosts, c10::optional<at::Tensor>& mask) {
  const bool masked = mask_in.has_value() && mask_in->defined();
  GhostPlan gp = plan_ghosts(input, axis, ghosts, masked);
  if (masked) mask = ghost_view(expand_mask(*mask_in, input, "mask"), gp);
  return gp;
}

BatchStatsCall prepare_batch_stats(const at::Tensor& input_, at::IntArrayRef axis_,
                                   const c10::optional<at::Tensor>& mask_, int64_t ghosts) {
  BatchStatsCall call;
  c10::optional<at::Tensor> mask;
  const GhostPlan gp = plan_masked_ghosts(input_, axis_, mask_, ghosts, mask);
  const at::Tensor& input = gp.input;
  const at::IntArrayRef axis(gp.axis);
  call.dtype = dtype_of(input, "input");
  call.canon = plan_canonical(input, axis);
  if (gp.rows > 1) set_ghost_rows(call.canon, input, gp.rows);
  const at::TensorOptions acc = input.options().dtype(acc_scalar_type(input.scalar_type()));
  const int64_t C = call.canon.v.features();
  call.mean = at::empty({C}, acc);
  call.m2 = at::empty({C}, acc);
  call.count = at::empty({C}, acc);
  if (mask.has_value() && mask->defined()) call.mask = mask_strided3(*mask, input, call.canon, "mask");
  call.skip = input.numel() == 0;
  if (call.skip) {  // an empty local batch: the empty state (merging it changes nothing)
    call.mean.zero_();
    call.m2.zero_();
    call.count.zero_();
    return call;
  }
  call.x = as_strided3(input, call.canon);
  ForwardParams& p = call.p;
  p.v = call.canon.v;
  p.x = call.x.data();
  p.x_so = call.x.so;
  p.x_sc = call.x.sc;
  if (call.mask.t.defined()) {
    p.mask = static_cast<const uint8_t*>(call.mask.data());
    p.m_so = call.mask.so;
    p.m_sc = call.mask.sc;
  }
  p.stat_mean = call.mean.data_ptr();
  p.stat_m2 = call.m2.data_ptr();
  p.stat_count = call.count.data_ptr();
  return call;
}

namespace {

// Validated (mean, m2|var, count) per-feature triples: same shape, same device, one floating dtype,
// converted to the accumulation type (fp32; fp64 for fp64). Errors are prefixed with `op`.
struct StatTriple {
  at::Tensor a, b, c;
  at::ScalarType acc;
};
StatTriple stat_triple(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                       const at::Tensor& c) {
  check_defined(a, an, op);
  check_defined(b, bn, op);
  check_defined(c, "count", op);
  TORCH_CHECK(b.sizes() == a.sizes() && c.sizes() == a.sizes(), "bn_cuda.", op, ": ", an, ", ", bn, " and count ",
              "must have the same shape, got ", shape_str(a.sizes()), ", ", shape_str(b.sizes()), " and ",
              shape_str(c.sizes()));
  dtype_of(a, an);
  dtype_of(b, bn);  // (a complex or integer statistic would be cast silently)
  dtype_of(c, "count");
  check_same_device(b, a, bn);
  check_same_device(c, a, "count");
  StatTriple t;
  t.acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  t.a = a.to(t.acc).contiguous();
  t.b = b.to(t.acc).contiguous();
  t.c = c.to(t.acc).contiguous();
  return t;
}

// eps of an op that normalizes (gather_stats, keras_finalize, keras_coeffs): finite and > 0, and not 0
// once rounded to float32 statistics (else a feature of equal values normalizes to 0 * inf = NaN),
// as prepare_forward's training check. `given`: the dtype of the statistics passed; `acc`: theirs
// in the kernels.
void check_staged_eps(const char* op, double eps, at::ScalarType given, at::ScalarType acc) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "bn_cuda.", op, ": eps must be finite and > 0, got ", eps);
  TORCH_CHECK_VALUE(acc == at::kDouble || static_cast<float>(eps) > 0, "bn_cuda.", op, ": eps=", eps,
                    " rounds to 0 in float32, the accumulation type of ", given, " statistics");
}

// A per-feature tensor of C entries that belongs to no input (running / moving statistics of the
// staged ops): the shape / device / dtype checks of feature_tensor against a (1, C) stand-in.
// A size mismatch is named in the op's own terms (source(): where C comes from, built only for the
// error), not the stand-in's. ghosts == 0: gather_stats's (W, C) or (C,) mean; else the keras ops'
// ghosts * C entries.
struct FlatFeatures {
  Canonical flat;
  at::Tensor like;
  at::ScalarType acc;
  const char* op;
  const at::Tensor& mean;
  int64_t ghosts;
  const char* mean_name;  // the op's name of `mean` (keras_grads: d_scale)
  FlatFeatures(const char* op_, const at::Tensor& mean_, int64_t ghosts_, int64_t C, at::ScalarType acc_,
               const char* mean_name_ = "mean")
      : acc(acc_), op(op_), mean(mean_), ghosts(ghosts_), mean_name(mean_name_) {
    flat.axes = {1};
    flat.feature_shape = {C};
    flat.v.C = C;
    like = at::empty({1, C}, mean.options().dtype(acc));
  }
  // (validated only: the caller converts them together, by convert(), once every check passed)
  FeatureTensor operator()(const c10::optional<at::Tensor>& t, const char* name) const {
    check_size(t, name);
    return feature_tensor(t, name, flat, like, acc, /*mutated=*/true, /*defer=*/true);
  }
  FeatureTensor read(const c10::optional<at::Tensor>& t, const char* name) const {
    check_size(t, name);
    return feature_tensor(t, name, flat, like, acc, /*mutated=*/false, /*defer=*/true);
  }
  void convert(std::initializer_list<FeatureTensor*> fs) const { convert_features(fs, acc); }
  void check_size(const c10::optional<at::Tensor>& t, const char* name) const {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->numel() == flat.v.C && t->dim() <= 2, "bn_cuda.", op, ": ", name, " has shape ",
                shape_str(t->sizes()), " but ", source(), ": expected shape [", flat.v.C, "]");
  }
  std::string source() const {
    const std::string name = mean_name;
    if (ghosts == 0) return name + " of shape " + shape_str(mean.sizes()) + " has C = " + std::to_string(flat.v.C) + " features";
    return name + " has ghosts * C = " + std::to_string(mean.numel()) + " entries with ghosts=" +
           std::to_string(ghosts) + ", so C = " + std::to_string(mean.numel() / ghosts);
  }
};

// The tensors an op updates in place must not share memory (one update would overwrite the other's,
// in an order that depends on the kernel): refused, naming both.
void check_disjoint(const char* op, std::initializer_list<std::pair<const FeatureTensor*, const char*>> updated) {
  for (auto a = updated.begin(); a != updated.end(); ++a) {
    for (auto b = a + 1; b != updated.end(); ++b) {
      if (!a->first->user.defined() || !b->first->user.defined()) continue;
      const at::MemOverlapStatus st = at::get_overlap_status(a->first->user, b->first->user);
      TORCH_CHECK_VALUE(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, "bn_cuda.", op, ": ",
                        a->second, " and ", b->second, " are updated in place but share memory; pass separate tensors");
    }
  }
}

// A scalar argument that must be finite (the momenta).
void check_finite(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v), "bn_cuda.", op, ": ", name, " must be finite, got ", v);
}

}  // namespace

GatherCall prepare_gather(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count,
                          const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                          double momentum, double eps, bool unbiased_running_var) {
  GatherCall call;
  TORCH_CHECK_VALUE(mean.dim() == 1 || mean.dim() == 2, "bn_cuda.gather_stats: mean must be (C,) or (W, C), got shape ",
                    shape_str(mean.sizes()));
  const StatTriple t = stat_triple("gather_stats", mean, "mean", m2, "m2", count);
  check_staged_eps("gather_stats", eps, mean.scalar_type(), t.acc);
  const at::ScalarType acc = t.acc;
  call.is_double = acc == at::kDouble;
  const int64_t W = mean.dim() == 2 ? mean.size(0) : 1;
  const int64_t C = mean.size(-1);
  call.mean = t.a;
  call.m2 = t.b;
  call.count = t.c;
  const FlatFeatures features("gather_stats", mean, /*ghosts=*/0, C, acc);
  call.running_mean = features(running_mean, "running_mean");
  call.running_var = features(running_var, "running_var");
  check_disjoint("gather_stats", {{&call.running_mean, "running_mean"}, {&call.running_var, "running_var"}});
  features.convert({&call.running_mean, &call.running_var});
  call.out_mean = at::empty({C}, mean.options().dtype(acc));
  call.out_invstd = at::empty({C}, mean.options().dtype(acc));
  call.out_count = at::empty({C}, mean.options().dtype(acc));
  GatherParams& g = call.g;
  g.W = W;
  g.C = C;
  g.mean = call.mean.data_ptr();
  g.m2 = call.m2.data_ptr();
  g.count = call.count.data_ptr();
  g.running_mean = call.running_mean.ptr();
  g.running_var = call.running_var.ptr();
  g.out_mean = call.out_mean.data_ptr();
  g.out_invstd = call.out_invstd.data_ptr();
  g.out_count = call.out_count.data_ptr();
  g.momentum = momentum;
  g.eps = eps;
  g.unbiased_running_var = unbiased_running_var;
  return call;
}

void finish_gather(GatherCall& call) {
  write_back({&call.running_mean, &call.running_var});
}

NormalizeCall prepare_normalize(const at::Tensor& input_, const at::Tensor& mean, const at::Tensor& invstd,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef axis_, int64_t ghosts) {
  NormalizeCall call;
  check_defined(mean, "mean", "normalize");
  check_defined(invstd, "invstd", "normalize");
  const GhostPlan gp = plan_ghosts(input_, axis_, ghosts, false);
  check_ghost_entries(gp, input_, axis_, mean, "mean");
  check_ghost_entries(gp, input_, axis_, invstd, "invstd");
  check_ghost_entries(gp, input_, axis_, weight, "weight");
  check_ghost_entries(gp, input_, axis_, bias, "bias");
  const at::Tensor& input = gp.input;
  const at::IntArrayRef axis(gp.axis);
  call.input_shape = input_.sizes().vec();
  // The training preparation (no running statistics needed); eps is unused by normalize.
  call.fwd = prepare_forward(input, weight, bias, c10::nullopt, c10::nullopt, /*training=*/true, 0.0, 1.0, axis, true,
                             gp.rows);
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  call.mean = feature_tensor(mean, "mean", call.fwd.canon, input, acc, false);
  call.invstd = feature_tensor(invstd, "invstd", call.fwd.canon, input, acc, false);
  ForwardParams& p = call.fwd.p;
  p.save_mean = nullptr;
  p.save_invstd = nullptr;
  p.given_mean = call.mean.ptr();
  p.given_invstd = call.invstd.ptr();
  return call;
}

namespace {

// The training backward of local statistics, unmasked (grad_sums, ghost_backward): their checks,
// in the caller's terms, then prepare_backward on the ghost view.
BackwardCall prepare_local_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                    const at::Tensor& mean, const at::Tensor& invstd,
                                    const c10::optional<at::Tensor>& weight, at::IntArrayRef axis, int64_t ghosts,
                                    std::array<bool, 3> output_mask) {
  check_defined(grad_out, "grad_out", op);
  check_defined(mean, "mean", op);
  check_defined(invstd, "invstd", op);
  const GhostPlan gp = plan_ghosts(input, axis, ghosts, false);
  check_grad_out_shape(grad_out, input);
  check_ghost_entries(gp, input, axis, mean, "mean");
  check_ghost_entries(gp, input, axis, invstd, "invstd");
  check_ghost_entries(gp, input, axis, weight, "weight");
  return prepare_backward(ghost_view(grad_out, gp), gp.input, weight, mean, invstd, true, gp.axis, output_mask,
                          gp.rows, "mean", "invstd");
}

}  // namespace

GradSumsCall prepare_grad_sums(const at::Tensor& grad_out, const at::Tensor& input_, const at::Tensor& mean,
                               const at::Tensor& invstd, at::IntArrayRef axis_, int64_t ghosts) {
  GradSumsCall call;
  call.bwd = prepare_local_backward("grad_sums", grad_out, input_, mean, invstd, c10::nullopt, axis_, ghosts,
                                    {false, false, false});
  const at::TensorOptions acc = input_.options().dtype(acc_scalar_type(input_.scalar_type()));
  call.sum_dy = at::empty({call.bwd.canon.v.features()}, acc);
  call.sum_dy_xmu = at::empty({call.bwd.canon.v.features()}, acc);
  if (call.bwd.skip) {
    call.sum_dy.zero_();
    call.sum_dy_xmu.zero_();
    return call;
  }
  call.bwd.p.out_sum_dy = call.sum_dy.data_ptr();
  call.bwd.p.out_sum_dy_xmu = call.sum_dy_xmu.data_ptr();
  return call;
}

GradInputCall prepare_grad_input(const at::Tensor& grad_out, const at::Tensor& input_, const at::Tensor& mean,
                                 const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& count,
                                 at::IntArrayRef axis_, const c10::optional<at::Tensor>& mask_, int64_t ghosts) {
  GradInputCall call;
  check_defined(grad_out, "grad_out", "grad_input");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&mean, "mean"}, {&invstd, "invstd"},
                                {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}, {&count, "count"}})
    check_defined(*t, name, "grad_input");
  c10::optional<at::Tensor> mask;
  const GhostPlan gp = plan_masked_ghosts(input_, axis_, mask_, ghosts, mask);
  check_grad_out_shape(grad_out, input_);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&mean, "mean"}, {&invstd, "invstd"},
                                {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}, {&count, "count"}})
    check_ghost_entries(gp, input_, axis_, *t, name);
  check_ghost_entries(gp, input_, axis_, weight, "weight");
  const at::Tensor& input = gp.input;
  const at::IntArrayRef axis(gp.axis);
  call.input_shape = input_.sizes().vec();
  call.bwd = prepare_backward(ghost_view(grad_out, gp), input, weight, mean, invstd, true, axis, {true, false, false},
                              gp.rows, "mean", "invstd");
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  if (mask.has_value() && mask->defined()) {
    call.mask = mask_strided3(*mask, input, call.bwd.canon, "mask");
    call.bwd.p.mask = static_cast<const uint8_t*>(call.mask.data());
    call.bwd.p.m_so = call.mask.so;
    call.bwd.p.m_sc = call.mask.sc;
  }
  call.sum_dy = feature_tensor(sum_dy, "sum_dy", call.bwd.canon, input, acc, false);
  call.sum_dy_xmu = feature_tensor(sum_dy_xmu, "sum_dy_xmu", call.bwd.canon, input, acc, false);
  call.count = feature_tensor(count, "count", call.bwd.canon, input, acc, false);
  BackwardParams& p = call.bwd.p;
  p.given_sum_dy = call.sum_dy.ptr();
  p.given_sum_dy_xmu = call.sum_dy_xmu.ptr();
  p.given_count = call.count.ptr();
  return call;
}

GhostBackwardCall prepare_ghost_backward(const at::Tensor& grad_out, const at::Tensor& input_, const at::Tensor& mean,
                                         const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                         at::IntArrayRef axis_, int64_t ghosts, std::array<bool, 3> output_mask,
                                         const char* op) {
  GhostBackwardCall call;
  // The training backward of the local statistics: the same sums as grad_sums (the same planned
  // partitions: dx is dense, so it leaves the vector width alone), and grad_input's coefficients
  // from them with count = the elements per (ghost, feature), as batch_stats counts them unmasked.
  call.bwd = prepare_local_backward(op, grad_out, input_, mean, invstd, weight, axis_, ghosts,
                                    output_mask);
  call.input_shape = input_.sizes().vec();
  call.input_grad = output_mask[0];
  return call;
}

namespace {

// keras_finalize (second statistic: var) and keras_coeffs (second statistic: m2) share the checks
// and the parameter block.
KerasFinalizeCall prepare_keras_epilogue(const char* op, const at::Tensor& mean, const at::Tensor& second,
                                         const char* second_name, const at::Tensor& count,
                                         const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                                         const c10::optional<at::Tensor>& moving_stddev,
                                         const c10::optional<at::Tensor>& renorm_mean,
                                         const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts,
                                         double momentum, double renorm_momentum, double eps,
                                         c10::optional<double> rmin, c10::optional<double> rmax,
                                         c10::optional<double> dmax, bool always_update) {
  KerasFinalizeCall call;
  check_defined(mean, "mean", op);
  check_defined(moving_mean, "moving_mean", op);
  check_defined(moving_variance, "moving_variance", op);
  TORCH_CHECK_VALUE(ghosts >= 1, "bn_cuda.", op, ": ghosts must be >= 1, got ", ghosts);
  TORCH_CHECK_VALUE(mean.dim() == 1 && mean.numel() % ghosts == 0, "bn_cuda.", op, ": mean must be flat with ",
                    "ghosts * C entries, got shape ", shape_str(mean.sizes()), " for ghosts=", ghosts);
  const StatTriple t = stat_triple(op, mean, "mean", second, second_name, count);
  check_staged_eps(op, eps, mean.scalar_type(), t.acc);
  check_finite(op, "momentum", momentum);
  check_finite(op, "renorm_momentum", renorm_momentum);
  TORCH_CHECK_VALUE(!rmin || !std::isnan(*rmin), "bn_cuda.", op, ": rmin must be a number, got nan");
  TORCH_CHECK_VALUE(!rmax || !std::isnan(*rmax), "bn_cuda.", op, ": rmax must be a number, got nan");
  TORCH_CHECK_VALUE(!dmax || *dmax >= 0, "bn_cuda.", op, ": dmax must be >= 0, got ", *dmax);
  TORCH_CHECK_VALUE(!(rmin && rmax) || *rmin <= *rmax, "bn_cuda.", op, ": rmin must be <= rmax, got rmin=", *rmin,
                    ", rmax=", *rmax);
  const bool renorm = moving_stddev.has_value() && moving_stddev->defined();
  TORCH_CHECK_VALUE(renorm == (renorm_mean.has_value() && renorm_mean->defined()) &&
                        renorm == (renorm_stddev.has_value() && renorm_stddev->defined()),
                    "bn_cuda.", op, ": moving_stddev, renorm_mean and renorm_stddev go together (renorm)");
  const at::ScalarType acc = t.acc;
  call.is_double = acc == at::kDouble;
  const int64_t C = mean.numel() / ghosts;
  call.mean = t.a;
  call.var = t.b;
  call.count = t.c;
  const FlatFeatures features(op, mean, ghosts, C, acc);
  call.moving_mean = features(moving_mean, "moving_mean");
  call.moving_variance = features(moving_variance, "moving_variance");
  call.moving_stddev = features(moving_stddev, "moving_stddev");
  call.renorm_mean = features(renorm_mean, "renorm_mean");
  call.renorm_stddev = features(renorm_stddev, "renorm_stddev");
  check_disjoint(op, {{&call.moving_mean, "moving_mean"}, {&call.moving_variance, "moving_variance"},
                      {&call.moving_stddev, "moving_stddev"}, {&call.renorm_mean, "renorm_mean"},
                      {&call.renorm_stddev, "renorm_stddev"}});
  features.convert({&call.moving_mean, &call.moving_variance, &call.moving_stddev, &call.renorm_mean,
                    &call.renorm_stddev});
  call.r = at::empty({C}, mean.options().dtype(acc));
  call.d = at::empty({C}, mean.options().dtype(acc));
  KerasFinalizeParams& p = call.p;
  p.G = ghosts;
  p.C = C;
  p.mean = call.mean.data_ptr();
  p.var = call.var.data_ptr();
  p.count = call.count.data_ptr();
  p.moving_mean = call.moving_mean.ptr();
  p.moving_variance = call.moving_variance.ptr();
  p.moving_stddev = call.moving_stddev.ptr();
  p.renorm_mean = call.renorm_mean.ptr();
  p.renorm_stddev = call.renorm_stddev.ptr();
  p.r = call.r.data_ptr();
  p.d = call.d.data_ptr();
  p.momentum = momentum;
  p.renorm_momentum = renorm_momentum;
  p.eps = eps;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  p.rmin = rmin.value_or(nan);
  p.rmax = rmax.value_or(nan);
  p.dmax = dmax.value_or(nan);
  p.always_update = always_update;
  return call;
}

}  // namespace

KerasFinalizeCall prepare_keras_finalize(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                         const at::Tensor& moving_mean, const at::Tensor& moving_variance,
                                         const c10::optional<at::Tensor>& moving_stddev,
                                         const c10::optional<at::Tensor>& renorm_mean,
                                         const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts,
                                         double momentum, double renorm_momentum, double eps,
                                         c10::optional<double> rmin, c10::optional<double> rmax,
                                         c10::optional<double> dmax, bool always_update) {
  return prepare_keras_epilogue("keras_finalize", mean, var, "var", count, moving_mean, moving_variance,
                                moving_stddev, renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps,
                                rmin, rmax, dmax, always_update);
}

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
                                       c10::optional<double> dmax, bool always_update) {
  KerasFinalizeCall call = prepare_keras_epilogue("keras_coeffs", mean, m2, "m2", count, moving_mean,
                                                  moving_variance, moving_stddev, renorm_mean, renorm_stddev, ghosts,
                                                  momentum, renorm_momentum, eps, rmin, rmax, dmax, always_update);
  KerasFinalizeParams& p = call.p;
  const at::ScalarType acc = call.mean.scalar_type();
  const FlatFeatures features("keras_coeffs", mean, ghosts, p.C, acc);
  call.gamma = features.read(gamma, "gamma");
  call.beta = features.read(beta, "beta");
  call.adj_scale = features.read(adj_scale, "adj_scale");
  call.adj_bias = features.read(adj_bias, "adj_bias");
  features.convert({&call.gamma, &call.beta, &call.adj_scale, &call.adj_bias});
  call.invstd = at::empty({p.G * p.C}, mean.options().dtype(acc));
  call.weight = at::empty({p.G * p.C}, mean.options().dtype(acc));
  call.bias = at::empty({p.G * p.C}, mean.options().dtype(acc));
  p.m2 = p.var;  // prepare_keras_epilogue filled `var` with the second statistic
  p.var = nullptr;
  p.invstd = call.invstd.data_ptr();
  p.gamma = call.gamma.ptr();
  p.beta = call.beta.ptr();
  p.adj_scale = call.adj_scale.ptr();
  p.adj_bias = call.adj_bias.ptr();
  p.weight = call.weight.data_ptr();
  p.bias = call.bias.data_ptr();
  return call;
}

KerasGradsCall prepare_keras_grads(const at::Tensor& d_scale, const at::Tensor& d_shift,
                                   const c10::optional<at::Tensor>& r, const c10::optional<at::Tensor>& d,
                                   const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& adj_scale,
                                   const c10::optional<at::Tensor>& adj_bias, bool beta, int64_t ghosts,
                                   std::array<bool, 4> output_mask, const char* op) {
  KerasGradsCall call;
  check_defined(d_scale, "d_scale", op);
  check_defined(d_shift, "d_shift", op);
  TORCH_CHECK_VALUE(ghosts >= 1, "bn_cuda.", op, ": ghosts must be >= 1, got ", ghosts);
  TORCH_CHECK_VALUE(d_scale.dim() == 1 && d_scale.numel() % ghosts == 0, "bn_cuda.", op,
                    ": d_scale must be flat with ghosts * C entries, got shape ", shape_str(d_scale.sizes()),
                    " for ghosts=", ghosts);
  TORCH_CHECK(d_shift.sizes() == d_scale.sizes(), "bn_cuda.", op, ": d_scale and d_shift must have the same shape, got ",
              shape_str(d_scale.sizes()), " and ", shape_str(d_shift.sizes()));
  dtype_of(d_scale, "d_scale");
  dtype_of(d_shift, "d_shift");
  check_same_device(d_shift, d_scale, "d_shift");
  for (const auto& [t, name] : {std::pair<const c10::optional<at::Tensor>*, const char*>{&r, "r"}, {&d, "d"},
                                {&gamma, "gamma"}, {&adj_scale, "adj_scale"}, {&adj_bias, "adj_bias"}})
    if (t->has_value() && (*t)->defined()) check_same_device(**t, d_scale, name);
  const bool has_r = r.has_value() && r->defined(), has_d = d.has_value() && d->defined();
  TORCH_CHECK_VALUE(has_r == has_d, "bn_cuda.", op, ": r and d go together (renorm)");
  const at::ScalarType acc = d_scale.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  call.is_double = acc == at::kDouble;
  call.d_scale = d_scale.to(acc).contiguous();
  call.d_shift = d_shift.to(acc).contiguous();
  const int64_t C = d_scale.numel() / ghosts;
  const FlatFeatures features(op, d_scale, ghosts, C, acc, "d_scale");
  call.r = features.read(r, "r");
  call.d = features.read(d, "d");
  call.gamma = features.read(gamma, "gamma");
  call.adj_scale = features.read(adj_scale, "adj_scale");
  call.adj_bias = features.read(adj_bias, "adj_bias");
  features.convert({&call.r, &call.d, &call.gamma, &call.adj_scale, &call.adj_bias});
  const at::TensorOptions opts = d_scale.options().dtype(acc);
  const auto out = [&](bool wanted) { return at::empty({wanted ? C : 0}, opts); };
  call.grad_gamma = out(output_mask[0] && call.gamma.ptr() != nullptr);
  call.grad_beta = out(output_mask[1] && beta);
  call.grad_adj_scale = out(output_mask[2] && call.adj_scale.ptr() != nullptr);
  call.grad_adj_bias = out(output_mask[3] && call.adj_bias.ptr() != nullptr);
  KerasGradParams& p = call.p;
  p.G = ghosts;
  p.C = C;
  p.d_scale = call.d_scale.data_ptr();
  p.d_shift = call.d_shift.data_ptr();
  p.r = call.r.ptr();
  p.d = call.d.ptr();
  p.gamma = call.gamma.ptr();
  p.adj_scale = call.adj_scale.ptr();
  p.adj_bias = call.adj_bias.ptr();
  const auto ptr = [](at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; };
  p.grad_gamma = ptr(call.grad_gamma);
  p.grad_beta = ptr(call.grad_beta);
  p.grad_adj_scale = ptr(call.grad_adj_scale);
  p.grad_adj_bias = ptr(call.grad_adj_bias);
  return call;
}

void finish_keras_finalize(KerasFinalizeCall& call) {
  write_back({&call.moving_mean, &call.moving_variance, &call.moving_stddev, &call.renorm_mean, &call.renorm_stddev});
}

}  // namespace bn_cuda
