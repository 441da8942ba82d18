// CPU bodies of the bn_cuda operators: checks and canonicalization (common/glue), workspace, and
// the capability-dispatched kernels.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <tuple>

#include "common/glue.h"
#include "cpu/dispatch.h"

namespace bn_cuda {
namespace cpu {

Capability capability() {
  static const Capability c = [] {
#if defined(__x86_64__) || defined(_M_X64)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const bool avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    // BN_CUDA_CPU_CAPABILITY (default / avx2 / avx512 / avx512_bf16) picks ours alone, e.g. to
    // time our copies against the same torch; otherwise (unset or another value, as
    // ATEN_CPU_CAPABILITY treats one it does not know) PyTorch's choice ("DEFAULT", "AVX2" or
    // "AVX512" on x86; its AVX512 is our AVX512_BF16 where the CPU has it), so that
    // ATEN_CPU_CAPABILITY selects ours too. Either way at most what this CPU runs.
    auto lower = [](std::string v) {
      for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return v;
    };
    const char* own = std::getenv("BN_CUDA_CPU_CAPABILITY");
    std::string want = lower(own ? own : "");
    const bool named = want == "default" || want == "avx2" || want == "avx512" || want == "avx512_bf16";
    if (!named) {
      want = lower(at::get_cpu_capability());
      if (want == "avx512") want = "avx512_bf16";
    }
    if (want == "avx512_bf16" && avx512_bf16) return Capability::kAvx512Bf16;
    if ((want == "avx512_bf16" || want == "avx512") && avx512) return Capability::kAvx512;
    if ((want == "avx512_bf16" || want == "avx512" || want == "avx2") && avx2) return Capability::kAvx2;
#endif
    return Capability::kDefault;
  }();
  return c;
}

const char* capability_name() {
  switch (capability()) {
    case Capability::kAvx512Bf16:
      return "avx512_bf16";
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace cpu

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, at::IntArrayRef axis, bool unbiased_running_var) {
  ForwardCall call = prepare_forward(input, weight, bias, running_mean, running_var, /*training=*/true, momentum,
                                     eps, axis, unbiased_running_var);
  c10::DataPtr ws;
  if (!call.skip) {
    call.p.partitions = plan_partitions_cpu(call.p.v);
    ws = cpu_workspace(forward_workspace_bytes(call.p.v, call.p.partitions, acc_size(call.dtype)));
    call.p.workspace = ws.get();
    cpu::forward_train(call.dtype, call.p);
  }
  finish_forward(call);
  return {call.out, call.save_mean, call.save_invstd};
}

at::Tensor forward_infer_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                             const at::Tensor& running_var, double eps, at::IntArrayRef axis) {
  ForwardCall call =
      prepare_forward(input, weight, bias, running_mean, running_var, /*training=*/false, 0.0, eps, axis, true);
  c10::DataPtr ws;
  if (!call.skip) {
    call.p.partitions = 0;
    ws = cpu_workspace(forward_workspace_bytes(call.p.v, 0, acc_size(call.dtype)));
    call.p.workspace = ws.get();
    cpu::forward_infer(call.dtype, call.p);
  }
  finish_forward(call);
  return call.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                             const c10::optional<at::Tensor>& weight,
                                                             const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                                             bool train, at::IntArrayRef axis,
                                                             std::array<bool, 3> output_mask) {
  BackwardCall call = prepare_backward(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask);
  c10::DataPtr ws;
  if (!call.skip) {
    BackwardParams& p = call.p;
    p.partitions = plan_partitions_cpu(p.v);
    ws = cpu_workspace(backward_workspace_bytes(p.v, p.partitions, acc_size(call.dtype)));
    p.workspace = ws.get();
    cpu::backward(call.dtype, p);
  }
  finish_backward(call);
  return {call.grad_input, call.grad_weight, call.grad_bias};
}

}  // namespace
}  // namespace bn_cuda

#ifndef BN_CUDA_EMULATE  // that build runs the CUDA bodies (ops_cuda.cpp) on CPU tensors
TORCH_LIBRARY_IMPL(bn_cuda, CPU, m) {
  m.impl("forward_train", &bn_cuda::forward_train_cpu);
  m.impl("forward_infer", &bn_cuda::forward_infer_cpu);
  m.impl("backward", &bn_cuda::backward_cpu);
}
#endif
