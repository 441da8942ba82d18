// Every operator schema of the bn_cuda library, and the pybind11 module for non-op helpers.
// CPU bodies: csrc/cpu/ops_cpu.cpp; CUDA bodies: csrc/cuda/ops_cuda.cpp.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/dispatch.h"

#ifndef BN_CUDA_VERSION_STR
#define BN_CUDA_VERSION_STR "0.0.0"
#endif
#ifndef BN_CUDA_TORCH_VERSION
#define BN_CUDA_TORCH_VERSION "unknown"
#endif
#ifndef BN_CUDA_CUDA_VERSION
#define BN_CUDA_CUDA_VERSION ""
#endif
#ifndef BN_CUDA_ARCHS
#define BN_CUDA_ARCHS ""
#endif
#ifndef BN_CUDA_WITH_CUDA
#define BN_CUDA_WITH_CUDA 0
#endif

TORCH_LIBRARY(bn_cuda, m) {
  // Training forward: output, per-feature saved mean and inverse std (fp32; fp64 for fp64 input).
  // Running statistics, when given, are updated in the same call:
  //   running = (1 - momentum) * running + momentum * batch_stat,
  // with the Bessel-corrected batch variance unless unbiased_running_var is False.
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, int[] axis, bool unbiased_running_var=True) "
      "-> (Tensor, Tensor, Tensor)");
  // Inference forward with the running statistics.
  m.def(
      "forward_infer(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
      "float eps, int[] axis) -> Tensor");
  // Backward: (grad_input, grad_weight, grad_bias). grad_weight / grad_bias are flat (C,) in the
  // accumulation dtype; outputs not asked for by output_mask are empty. train=False treats
  // mean / invstd as constants (backward of the inference forward).
  m.def(
      "backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "bool train, int[] axis, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Staged operators (synchronized batch norm and other compositions); per-feature tensors are
  // flat (C,) in the accumulation dtype. ghosts > 1: tf_keras's ghost batches (sample n in ghost
  // n % ghosts); per-feature tensors then hold ghosts * C entries, ghost-major.
  // Local Welford state per feature: (mean, m2, count); with a 0/1 mask broadcastable to the
  // input, the weighted moments (count = number of unmasked elements).
  m.def("batch_stats(Tensor input, int[] axis, Tensor? mask=None, SymInt ghosts=1) -> (Tensor, Tensor, Tensor)");
  // Chan merge of W states ((W, C) each, rows in order) -> (mean, invstd, count); running stats
  // are updated in place except for features whose total count is 0.
  m.def(
      "gather_stats(Tensor mean, Tensor m2, Tensor count, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps, bool unbiased_running_var=True) -> (Tensor, Tensor, Tensor)");
  // (input - mean) * invstd * weight + bias with caller-supplied statistics.
  m.def(
      "normalize(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, int[] axis, SymInt ghosts=1) "
      "-> Tensor");
  // Local (sum(grad_out), sum(grad_out * (input - mean))) per feature.
  m.def(
      "grad_sums(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, int[] axis, SymInt ghosts=1) "
      "-> (Tensor, Tensor)");
  // Training grad_input from (e.g. all-reduced) sums and total per-feature counts; with the mask
  // of masked statistics, the gradient of the weighted moments.
  m.def(
      "grad_input(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor sum_dy, "
      "Tensor sum_dy_xmu, Tensor count, int[] axis, Tensor? mask=None, SymInt ghosts=1) -> Tensor");
  // grad_sums and grad_input of the local statistics in one pass (nothing exchanged between them):
  // (grad_input, grad_weight, grad_bias) of normalize(input, mean, invstd, weight, bias, axis,
  // ghosts) with batch_stats' unmasked mean and its invstd, per (ghost, feature): grad_weight =
  // sum(grad_out * (input - mean)) * invstd and grad_bias = sum(grad_out), ghosts * C entries each;
  // outputs not in output_mask are empty.
  m.def(
      "ghost_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, int[] axis, "
      "SymInt ghosts, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // tf_keras's training epilogue of ghost batches / batch renormalization, on the device: average
  // the ghosts' (mean, biased var), renorm's clipped r and d from the pre-update renorm statistics
  // (a missing bound does not clip), every moving variable updated with tf_keras's decay
  // (features with no data keep theirs unless always_update). Returns (r, d): 1 and 0 without renorm.
  m.def(
      "keras_finalize(Tensor mean, Tensor var, Tensor count, Tensor(a!) moving_mean, Tensor(b!) moving_variance, "
      "Tensor(c!)? moving_stddev, Tensor(d!)? renorm_mean, Tensor(e!)? renorm_stddev, SymInt ghosts, float momentum, "
      "float renorm_momentum, float eps, float? rmin, float? rmax, float? dmax, bool always_update) "
      "-> (Tensor, Tensor)");
  // keras_finalize straight from the ghosts' Welford states (batch_stats' mean, m2, count; G * C
  // each), fused with the composition of the apply step: returns (invstd, weight, bias, r, d) with
  // invstd / weight / bias per (ghost, feature) for normalize(input, mean, invstd, weight, bias,
  // axis, ghosts), where weight / bias compose the adjustment's (adj_scale, adj_bias), (gamma,
  // beta) and renorm's (r, d) as tf_keras does. One kernel instead of gather_stats, keras_finalize
  // and half a dozen small tensor ops.
  m.def(
      "keras_coeffs(Tensor mean, Tensor m2, Tensor count, Tensor? gamma, Tensor? beta, Tensor? adj_scale, "
      "Tensor? adj_bias, Tensor(a!) moving_mean, Tensor(b!) moving_variance, Tensor(c!)? moving_stddev, "
      "Tensor(d!)? renorm_mean, Tensor(e!)? renorm_stddev, SymInt ghosts, float momentum, float renorm_momentum, "
      "float eps, float? rmin, float? rmax, float? dmax, bool always_update) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // batch_stats, keras_coeffs and normalize in one call, the Keras layer's training forward on the
  // staged kernels: (output, mean, invstd, weight, count, r, d) as those ops return them (mean /
  // count: batch_stats'; invstd / weight / r / d: keras_coeffs'), the moving variables updated in
  // place. On CUDA the epilogue kernel also writes the apply step's coefficients.
  m.def(
      "keras_forward(Tensor input, int[] axis, Tensor? mask, SymInt ghosts, Tensor? gamma, Tensor? beta, "
      "Tensor? adj_scale, Tensor? adj_bias, Tensor(a!) moving_mean, Tensor(b!) moving_variance, "
      "Tensor(c!)? moving_stddev, Tensor(d!)? renorm_mean, Tensor(e!)? renorm_stddev, float momentum, "
      "float renorm_momentum, float eps, float? rmin, float? rmax, float? dmax, bool always_update) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The backward of keras_coeffs' composition: from d loss / d (the apply step's scale, shift) per
  // (ghost, feature) (ghost_backward's grad_weight / grad_bias), summed over the ghosts, the
  // gradients of (gamma, beta, adj_scale, adj_bias) with r and d constant (tf_keras's
  // stop_gradient), C each in the accumulation dtype; one not in output_mask, or whose factor is
  // absent (beta: false), is empty. One kernel instead of the ghost sums and the products.
  m.def(
      "keras_grads(Tensor d_scale, Tensor d_shift, Tensor? r, Tensor? d, Tensor? gamma, Tensor? adj_scale, "
      "Tensor? adj_bias, bool beta, SymInt ghosts, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // ghost_backward then keras_grads on its per-(ghost, feature) grad_weight / grad_bias, the Keras
  // layer's fused training backward (no mask) in one call: (grad_input, grad_gamma, grad_beta,
  // grad_adj_scale, grad_adj_bias), bitwise what the two ops return; output_mask: (input, gamma,
  // beta, adj_scale, adj_bias). On CUDA with at most 16 ghosts the sums' finalize and keras_grads
  // are one kernel: 3 kernels, as the plain training backward.
  m.def(
      "keras_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, int[] axis, "
      "SymInt ghosts, Tensor? r, Tensor? d, Tensor? gamma, Tensor? adj_scale, Tensor? adj_bias, bool beta, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = BN_CUDA_VERSION_STR;
  d["torch"] = BN_CUDA_TORCH_VERSION;
  const std::string cuda = BN_CUDA_CUDA_VERSION;
  d["cuda"] = cuda.empty() ? pybind11::object(pybind11::none()) : pybind11::object(pybind11::str(cuda));
  d["cuda_archs"] = BN_CUDA_ARCHS;
  d["with_cuda"] = static_cast<bool>(BN_CUDA_WITH_CUDA);
#ifdef BN_CUDA_EMULATE
  d["emulated_cuda"] = true;  // the CPU ops are the CUDA kernels under the host emulation (csrc/emulate/)
#else
  d["emulated_cuda"] = false;
#endif
  d["cpu_capability"] = bn_cuda::cpu::capability_name();
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  return d;
}

}  // namespace

namespace bn_cuda {
void register_keras_step(pybind11::module_& m);  // common/keras_step.cpp
void register_functional_fast(pybind11::module_& m);  // common/functional_fast.cpp
#if BN_CUDA_WITH_CUDA || defined(BN_CUDA_EMULATE)
bool set_single_cf(bool on);  // cuda/ops_cuda.cpp
#endif
}
#ifdef BN_CUDA_EMULATE
namespace bn_emu {
uint64_t launch_count();  // emulate/runtime.cpp
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "bn_cuda native module: operators are registered under torch.ops.bn_cuda";
  m.def("build_info", &build_info, "How this extension was built (versions, CUDA archs, CPU capability).");
  m.def("cpu_capability", &bn_cuda::cpu::capability_name, "The CPU kernel variant in use (avx512_bf16, avx512, avx2 or default).");
  bn_cuda::register_keras_step(m);
  bn_cuda::register_functional_fast(m);
#if BN_CUDA_WITH_CUDA || defined(BN_CUDA_EMULATE)
  m.def("_set_single_cf", &bn_cuda::set_single_cf, pybind11::arg("on"),
        "Testing hook: let the CUDA training forward and backward of small channels-first inputs run as "
        "one launch each (default) or as three (the same bits); returns the previous setting.");
#endif
#ifdef BN_CUDA_EMULATE
  m.def("_emulated_launches", &bn_emu::launch_count,
        "Emulated build only: the number of CUDA kernels launched so far (tests count a call's kernels).");
#endif
}
