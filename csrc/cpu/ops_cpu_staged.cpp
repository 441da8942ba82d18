// CPU bodies of the staged operators (batch_stats, gather_stats, normalize, grad_sums,
// grad_input): the same capability-dispatched kernels as the fused ops, run in part.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "bn_cuda/epilogue.h"
#include "common/staged.h"
#include "cpu/dispatch.h"

namespace bn_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& input, at::IntArrayRef axis,
                                                                const c10::optional<at::Tensor>& mask, int64_t ghosts) {
  BatchStatsCall call = prepare_batch_stats(input, axis, mask, ghosts);
  if (!call.skip) {
    call.p.partitions = plan_partitions_cpu(call.p.v);
    c10::DataPtr ws = cpu_workspace(forward_workspace_bytes(call.p.v, call.p.partitions, acc_size(call.dtype)));
    call.p.workspace = ws.get();
    cpu::forward_train(call.dtype, call.p);
  }
  return {call.mean, call.m2, call.count};
}

template <typename A>
void gather_kernel(const GatherParams& g) {
  const A* mean = static_cast<const A*>(g.mean);
  const A* m2 = static_cast<const A*>(g.m2);
  const A* cnt = static_cast<const A*>(g.count);
  at::parallel_for(0, g.C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      WelfordState<A> st = welford_empty<A>();
      for (int64_t w = 0; w < g.W; ++w)
        st = welford_merge(st, WelfordState<A>{mean[w * g.C + c], m2[w * g.C + c], cnt[w * g.C + c]});
      A* rm = g.running_mean ? static_cast<A*>(g.running_mean) + c : nullptr;
      A* rv = g.running_var ? static_cast<A*>(g.running_var) + c : nullptr;
      const GatheredStats<A> r =
          gather_finalize(st, static_cast<A>(g.eps), static_cast<A>(g.momentum), g.unbiased_running_var, rm, rv);
      static_cast<A*>(g.out_mean)[c] = r.mean;
      static_cast<A*>(g.out_invstd)[c] = r.invstd;
      static_cast<A*>(g.out_count)[c] = r.count;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_stats_cpu(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps, bool unbiased_running_var) {
  GatherCall call = prepare_gather(mean, m2, count, running_mean, running_var, momentum, eps, unbiased_running_var);
  if (call.is_double) {
    gather_kernel<double>(call.g);
  } else {
    gather_kernel<float>(call.g);
  }
  finish_gather(call);
  return {call.out_mean, call.out_invstd, call.out_count};
}

// keras_finalize and keras_coeffs (its coefficient mode): the per-feature epilogue, then the
// moving variables copied back where they were converted.
void run_keras_finalize(KerasFinalizeCall& call) {
  for (int64_t c = 0; c < call.p.C; ++c) {
    if (call.is_double) {
      keras_finalize_feature<double>(call.p, c);
    } else {
      keras_finalize_feature<float>(call.p, c);
    }
  }
  finish_keras_finalize(call);
}

std::tuple<at::Tensor, at::Tensor> keras_finalize_cpu(
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count, const at::Tensor& moving_mean,
    const at::Tensor& moving_variance, const c10::optional<at::Tensor>& moving_stddev,
    const c10::optional<at::Tensor>& renorm_mean, const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts,
    double momentum, double renorm_momentum, double eps, c10::optional<double> rmin, c10::optional<double> rmax,
    c10::optional<double> dmax, bool always_update) {
  KerasFinalizeCall call = prepare_keras_finalize(mean, var, count, moving_mean, moving_variance, moving_stddev,
                                                  renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps,
                                                  rmin, rmax, dmax, always_update);
  run_keras_finalize(call);
  return {call.r, call.d};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_coeffs_cpu(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& adj_scale,
    const c10::optional<at::Tensor>& adj_bias, const at::Tensor& moving_mean, const at::Tensor& moving_variance,
    const c10::optional<at::Tensor>& moving_stddev, const c10::optional<at::Tensor>& renorm_mean,
    const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts, double momentum, double renorm_momentum,
    double eps, c10::optional<double> rmin, c10::optional<double> rmax, c10::optional<double> dmax,
    bool always_update) {
  KerasFinalizeCall call =
      prepare_keras_coeffs(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                           moving_stddev, renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin,
                           rmax, dmax, always_update);
  run_keras_finalize(call);
  return {call.invstd, call.weight, call.bias, call.r, call.d};
}

at::Tensor normalize_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                         const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef axis, int64_t ghosts) {
  NormalizeCall call = prepare_normalize(input, mean, invstd, weight, bias, axis, ghosts);
  ForwardCall& f = call.fwd;
  if (!f.skip) {
    f.p.partitions = 0;
    c10::DataPtr ws = cpu_workspace(forward_workspace_bytes(f.p.v, 0, acc_size(f.dtype)));
    f.p.workspace = ws.get();
    cpu::forward_infer(f.dtype, f.p);
  }
  finish_forward(f);
  return call.output();
}

void run_backward(BackwardCall& b) {
  if (b.skip) return;
  b.p.partitions = plan_partitions_cpu(b.p.v);
  c10::DataPtr ws = cpu_workspace(backward_workspace_bytes(b.p.v, b.p.partitions, acc_size(b.dtype)));
  b.p.workspace = ws.get();
  cpu::backward(b.dtype, b.p);
}

std::tuple<at::Tensor, at::Tensor> grad_sums_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                 const at::Tensor& mean, const at::Tensor& invstd, at::IntArrayRef axis,
                                                 int64_t ghosts) {
  GradSumsCall call = prepare_grad_sums(grad_out, input, mean, invstd, axis, ghosts);
  run_backward(call.bwd);
  return {call.sum_dy, call.sum_dy_xmu};
}

at::Tensor grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, const at::Tensor& count, at::IntArrayRef axis,
                          const c10::optional<at::Tensor>& mask, int64_t ghosts) {
  GradInputCall call =
      prepare_grad_input(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis, mask, ghosts);
  run_backward(call.bwd);
  finish_backward(call.bwd);
  return call.output();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                                   const at::Tensor& mean, const at::Tensor& invstd,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   at::IntArrayRef axis, int64_t ghosts,
                                                                   std::array<bool, 3> output_mask) {
  GhostBackwardCall call = prepare_ghost_backward(grad_out, input, mean, invstd, weight, axis, ghosts, output_mask);
  run_backward(call.bwd);
  finish_backward(call.bwd);
  return {call.grad_input(), call.bwd.grad_weight, call.bwd.grad_bias};
}

void run_keras_grads(const KerasGradsCall& call) {
  const KerasGradParams& p = call.p;
  at::parallel_for(0, p.C, 4096 / std::max<int64_t>(p.G, 1) + 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      if (call.is_double) {
        keras_grads_feature<double>(p, c);
      } else {
        keras_grads_feature<float>(p, c);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_grads_cpu(
    const at::Tensor& d_scale, const at::Tensor& d_shift, const c10::optional<at::Tensor>& r,
    const c10::optional<at::Tensor>& d, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& adj_scale, const c10::optional<at::Tensor>& adj_bias, bool beta, int64_t ghosts,
    std::array<bool, 4> output_mask) {
  KerasGradsCall call =
      prepare_keras_grads(d_scale, d_shift, r, d, gamma, adj_scale, adj_bias, beta, ghosts, output_mask);
  run_keras_grads(call);
  return {call.grad_gamma, call.grad_beta, call.grad_adj_scale, call.grad_adj_bias};
}

// keras_backward: ghost_backward (its sums always asked for: keras_grads checks its arguments
// even when no parameter gradient is wanted), then keras_grads on them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, at::IntArrayRef axis, int64_t ghosts, const c10::optional<at::Tensor>& r,
    const c10::optional<at::Tensor>& d, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& adj_scale, const c10::optional<at::Tensor>& adj_bias, bool beta,
    std::array<bool, 5> output_mask) {
  GhostBackwardCall call = prepare_ghost_backward(grad_out, input, mean, invstd, weight, axis, ghosts,
                                                  {output_mask[0], true, true}, "keras_backward");
  KerasGradsCall kc = prepare_keras_grads(call.bwd.grad_weight, call.bwd.grad_bias, r, d, gamma, adj_scale, adj_bias,
                                          beta, ghosts, {output_mask[1], output_mask[2], output_mask[3], output_mask[4]},
                                          "keras_backward");
  run_backward(call.bwd);
  finish_backward(call.bwd);
  run_keras_grads(kc);
  return {call.grad_input(), kc.grad_gamma, kc.grad_beta, kc.grad_adj_scale, kc.grad_adj_bias};
}

// keras_forward: batch_stats, keras_coeffs and normalize, one after the other (on CPU the apply
// coefficients cost nothing to recompute).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_forward_cpu(
    const at::Tensor& input, at::IntArrayRef axis, const c10::optional<at::Tensor>& mask, int64_t ghosts,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
    const c10::optional<at::Tensor>& adj_scale, const c10::optional<at::Tensor>& adj_bias, const at::Tensor& moving_mean,
    const at::Tensor& moving_variance, const c10::optional<at::Tensor>& moving_stddev,
    const c10::optional<at::Tensor>& renorm_mean, const c10::optional<at::Tensor>& renorm_stddev, double momentum,
    double renorm_momentum, double eps, c10::optional<double> rmin, c10::optional<double> rmax,
    c10::optional<double> dmax, bool always_update) {
  at::Tensor mean, m2, count, invstd, weight, bias, r, d;
  std::tie(mean, m2, count) = batch_stats_cpu(input, axis, mask, ghosts);
  std::tie(invstd, weight, bias, r, d) =
      keras_coeffs_cpu(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance, moving_stddev,
                       renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax, dmax,
                       always_update);
  return {normalize_cpu(input, mean, invstd, weight, bias, axis, ghosts), mean, invstd, weight, count, r, d};
}

}  // namespace
}  // namespace bn_cuda

#ifndef BN_CUDA_EMULATE  // that build runs the CUDA bodies (ops_cuda.cpp) on CPU tensors
TORCH_LIBRARY_IMPL(bn_cuda, CPU, m) {
  m.impl("batch_stats", &bn_cuda::batch_stats_cpu);
  m.impl("gather_stats", &bn_cuda::gather_stats_cpu);
  m.impl("normalize", &bn_cuda::normalize_cpu);
  m.impl("grad_sums", &bn_cuda::grad_sums_cpu);
  m.impl("grad_input", &bn_cuda::grad_input_cpu);
  m.impl("ghost_backward", &bn_cuda::ghost_backward_cpu);
  m.impl("keras_finalize", &bn_cuda::keras_finalize_cpu);
  m.impl("keras_coeffs", &bn_cuda::keras_coeffs_cpu);
  m.impl("keras_grads", &bn_cuda::keras_grads_cpu);
  m.impl("keras_forward", &bn_cuda::keras_forward_cpu);
  m.impl("keras_backward", &bn_cuda::keras_backward_cpu);
}
#endif
