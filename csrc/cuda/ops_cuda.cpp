// CUDA bodies of the bn_cuda operators: device guard, current stream, planning, workspace from
// the caching allocator, and the torch-free launchers. No host synchronization anywhere, so the
// ops can be captured in CUDA graphs.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cusparse.h & co., which not every
// toolkit install has next to nvcc.
//
// BN_CUDA_EMULATE (setup.py): the same bodies over the host emulation of the kernels
// (csrc/emulate/), registered for CPU tensors, so that the test suite runs this file and the kernels
// where there is no GPU.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#ifdef BN_CUDA_EMULATE
#include "emulate/device.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/library.h>

#include <array>
#include <atomic>
#include <limits>
#include <tuple>

#include "common/glue.h"
#include "common/staged.h"
#include "cuda/launchers.h"

namespace bn_cuda {
namespace cuda {

#define BN_CUDA_DTYPE_SWITCH(t, FN, ...)                    \
  switch (t) {                                               \
    case DType::kFloat32:                                    \
      return FN<DType::kFloat32>(__VA_ARGS__);               \
    case DType::kFloat64:                                    \
      return FN<DType::kFloat64>(__VA_ARGS__);               \
    case DType::kFloat16:                                    \
      return FN<DType::kFloat16>(__VA_ARGS__);               \
    case DType::kBFloat16:                                   \
      return FN<DType::kBFloat16>(__VA_ARGS__);              \
  }                                                          \
  return cudaErrorInvalidValue;

inline cudaError_t forward_train(DType t, const ForwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, forward_train_t, p, s)
}
inline cudaError_t forward_infer(DType t, const ForwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, forward_infer_t, p, s)
}
inline cudaError_t backward(DType t, const BackwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, backward_t, p, s)
}
inline cudaError_t batch_stats(DType t, const ForwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, batch_stats_t, p, s)
}
inline cudaError_t apply_given(DType t, const ForwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, apply_given_t, p, s)
}
inline cudaError_t backward_apply(DType t, const BackwardParams& p, cudaStream_t s) {
  BN_CUDA_DTYPE_SWITCH(t, backward_apply_t, p, s)
}
#undef BN_CUDA_DTYPE_SWITCH

}  // namespace cuda

namespace {

#ifdef BN_CUDA_EMULATE
int sm_count() { return bn_emu::sm_count(); }
cudaStream_t current_stream() { return nullptr; }
#else
// Multiprocessors of the current device, queried once per device (an attribute read, no sync).
int sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= static_cast<int>(cache.size())) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

at::Tensor workspace(const at::Tensor& like, size_t bytes, DType t) {
  const at::ScalarType acc = t == DType::kFloat64 ? at::kDouble : at::kFloat;
  const int64_t n = static_cast<int64_t>(bytes / acc_size(t)) + 1;
#ifdef BN_CUDA_EMULATE
  // NaN, so that a kernel reading a workspace entry before any kernel wrote it shows in the results
  return at::full({n}, std::numeric_limits<double>::quiet_NaN(), like.options().dtype(acc));
#else
  return at::empty({n}, like.options().dtype(acc));
#endif
}

// The glue's batched per-feature conversion (convert_features / write_back): one launch on the
// current stream (the op bodies' device guard makes it the tensors' device).
void convert_on_device(ConvertParams& p) {
  p.sm_count = sm_count();
  C10_CUDA_CHECK(cuda::convert_features_t(p, current_stream()));
}

#ifdef BN_CUDA_EMULATE
const bool kConvertRegistered = (register_device_convert(c10::DeviceType::CPU, &convert_on_device), true);
#else
const bool kConvertRegistered = (register_device_convert(c10::DeviceType::CUDA, &convert_on_device), true);
#endif

// Testing hook (bn_cuda._C._set_single_cf): whether forward_train and backward may take the
// one-launch channels-first path (ForwardParams / BackwardParams::single_cf). Off, the same plan
// runs as three launches; tests/test_cuda.py holds the two to the same bits.
std::atomic<bool> g_single_cf{true};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, at::IntArrayRef axis, bool unbiased_running_var) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  ForwardCall call = prepare_forward(input, weight, bias, running_mean, running_var, /*training=*/true, momentum,
                                     eps, axis, unbiased_running_var);
  at::Tensor ws;
  if (!call.skip) {
    plan_forward_cuda(call.p, call.dtype, sm_count());
    if (!g_single_cf.load(std::memory_order_relaxed)) call.p.single_cf = false;
    ws = workspace(input, forward_workspace_bytes(call.p.v, call.p.partitions, acc_size(call.dtype)), call.dtype);
    call.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::forward_train(call.dtype, call.p, current_stream()));
  }
  finish_forward(call);
  return {call.out, call.save_mean, call.save_invstd};
}

at::Tensor forward_infer_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                              const at::Tensor& running_var, double eps, at::IntArrayRef axis) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  ForwardCall call =
      prepare_forward(input, weight, bias, running_mean, running_var, /*training=*/false, 0.0, eps, axis, true);
  at::Tensor ws;
  if (!call.skip) {
    plan_forward_cuda(call.p, call.dtype, sm_count());
    call.p.partitions = 0;  // no statistics: the workspace holds only the apply coefficients
    ws = workspace(input, forward_workspace_bytes(call.p.v, 0, acc_size(call.dtype)), call.dtype);
    call.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::forward_infer(call.dtype, call.p, current_stream()));
  }
  finish_forward(call);
  return call.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                                              bool train, at::IntArrayRef axis,
                                                              std::array<bool, 3> output_mask) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  BackwardCall call = prepare_backward(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask);
  at::Tensor ws;
  if (!call.skip) {
    plan_backward_cuda(call.p, call.dtype, sm_count());
    if (!g_single_cf.load(std::memory_order_relaxed)) call.p.single_cf = false;
    ws = workspace(input, backward_workspace_bytes(call.p.v, call.p.partitions, acc_size(call.dtype)), call.dtype);
    call.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::backward(call.dtype, call.p, current_stream()));
  }
  finish_backward(call);
  return {call.grad_input, call.grad_weight, call.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& input, at::IntArrayRef axis,
                                                                 const c10::optional<at::Tensor>& mask, int64_t ghosts) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  BatchStatsCall call = prepare_batch_stats(input, axis, mask, ghosts);
  at::Tensor ws;
  if (!call.skip) {
    plan_forward_cuda(call.p, call.dtype, sm_count());
    ws = workspace(input, forward_workspace_bytes(call.p.v, call.p.partitions, acc_size(call.dtype)), call.dtype);
    call.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::batch_stats(call.dtype, call.p, current_stream()));
  }
  return {call.mean, call.m2, call.count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_stats_cuda(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps, bool unbiased_running_var) {
  const at::OptionalDeviceGuard guard(at::device_of(mean));
  GatherCall call = prepare_gather(mean, m2, count, running_mean, running_var, momentum, eps, unbiased_running_var);
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(call.is_double ? cuda::gather_stats_t<DType::kFloat64>(call.g, stream)
                                : cuda::gather_stats_t<DType::kFloat32>(call.g, stream));
  finish_gather(call);
  return {call.out_mean, call.out_invstd, call.out_count};
}

// keras_finalize and keras_coeffs (its coefficient mode): one kernel on the current stream, then
// the moving variables copied back where they were converted.
void run_keras_finalize(KerasFinalizeCall& call) {
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(call.is_double ? cuda::keras_finalize_t<DType::kFloat64>(call.p, stream)
                                : cuda::keras_finalize_t<DType::kFloat32>(call.p, stream));
  finish_keras_finalize(call);
}

std::tuple<at::Tensor, at::Tensor> keras_finalize_cuda(
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count, const at::Tensor& moving_mean,
    const at::Tensor& moving_variance, const c10::optional<at::Tensor>& moving_stddev,
    const c10::optional<at::Tensor>& renorm_mean, const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts,
    double momentum, double renorm_momentum, double eps, c10::optional<double> rmin, c10::optional<double> rmax,
    c10::optional<double> dmax, bool always_update) {
  const at::OptionalDeviceGuard guard(at::device_of(mean));
  KerasFinalizeCall call = prepare_keras_finalize(mean, var, count, moving_mean, moving_variance, moving_stddev,
                                                  renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps,
                                                  rmin, rmax, dmax, always_update);
  run_keras_finalize(call);
  return {call.r, call.d};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_coeffs_cuda(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& adj_scale,
    const c10::optional<at::Tensor>& adj_bias, const at::Tensor& moving_mean, const at::Tensor& moving_variance,
    const c10::optional<at::Tensor>& moving_stddev, const c10::optional<at::Tensor>& renorm_mean,
    const c10::optional<at::Tensor>& renorm_stddev, int64_t ghosts, double momentum, double renorm_momentum,
    double eps, c10::optional<double> rmin, c10::optional<double> rmax, c10::optional<double> dmax,
    bool always_update) {
  const at::OptionalDeviceGuard guard(at::device_of(mean));
  KerasFinalizeCall call =
      prepare_keras_coeffs(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                           moving_stddev, renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin,
                           rmax, dmax, always_update);
  run_keras_finalize(call);  // the kernel in its coefficient mode (p.m2 / p.weight set)
  return {call.invstd, call.weight, call.bias, call.r, call.d};
}

at::Tensor normalize_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef axis, int64_t ghosts) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  NormalizeCall call = prepare_normalize(input, mean, invstd, weight, bias, axis, ghosts);
  ForwardCall& f = call.fwd;
  at::Tensor ws;
  if (!f.skip) {
    plan_forward_cuda(f.p, f.dtype, sm_count());
    f.p.partitions = 0;  // the workspace holds only the apply coefficients
    ws = workspace(input, forward_workspace_bytes(f.p.v, 0, acc_size(f.dtype)), f.dtype);
    f.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::apply_given(f.dtype, f.p, current_stream()));
  }
  finish_forward(f);
  return call.output();
}

std::tuple<at::Tensor, at::Tensor> grad_sums_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                  const at::Tensor& mean, const at::Tensor& invstd,
                                                  at::IntArrayRef axis, int64_t ghosts) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  GradSumsCall call = prepare_grad_sums(grad_out, input, mean, invstd, axis, ghosts);
  BackwardCall& b = call.bwd;
  at::Tensor ws;
  if (!b.skip) {
    plan_backward_cuda(b.p, b.dtype, sm_count());
    ws = workspace(input, backward_workspace_bytes(b.p.v, b.p.partitions, acc_size(b.dtype)), b.dtype);
    b.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::backward(b.dtype, b.p, current_stream()));
  }
  return {call.sum_dy, call.sum_dy_xmu};
}

at::Tensor grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                           const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                           const at::Tensor& sum_dy_xmu, const at::Tensor& count, at::IntArrayRef axis,
                           const c10::optional<at::Tensor>& mask, int64_t ghosts) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  GradInputCall call =
      prepare_grad_input(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis, mask, ghosts);
  BackwardCall& b = call.bwd;
  at::Tensor ws;
  if (!b.skip) {
    plan_backward_cuda(b.p, b.dtype, sm_count());
    b.p.partitions = 0;  // sums are given
    ws = workspace(input, backward_workspace_bytes(b.p.v, 0, acc_size(b.dtype)), b.dtype);
    b.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::backward_apply(b.dtype, b.p, current_stream()));
  }
  finish_backward(b);
  return call.output();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                                    const c10::optional<at::Tensor>& weight,
                                                                    at::IntArrayRef axis, int64_t ghosts,
                                                                    std::array<bool, 3> output_mask) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  GhostBackwardCall call = prepare_ghost_backward(grad_out, input, mean, invstd, weight, axis, ghosts, output_mask);
  BackwardCall& b = call.bwd;
  at::Tensor ws;
  if (!b.skip) {  // grad_sums, their finalize (sums and coefficients), grad_input: three kernels
    plan_backward_cuda(b.p, b.dtype, sm_count());
    ws = workspace(input, backward_workspace_bytes(b.p.v, b.p.partitions, acc_size(b.dtype)), b.dtype);
    b.p.workspace = ws.data_ptr();
    C10_CUDA_CHECK(cuda::backward(b.dtype, b.p, current_stream()));
  }
  finish_backward(b);
  return {call.grad_input(), b.grad_weight, b.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_grads_cuda(
    const at::Tensor& d_scale, const at::Tensor& d_shift, const c10::optional<at::Tensor>& r,
    const c10::optional<at::Tensor>& d, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& adj_scale, const c10::optional<at::Tensor>& adj_bias, bool beta, int64_t ghosts,
    std::array<bool, 4> output_mask) {
  const at::OptionalDeviceGuard guard(at::device_of(d_scale));
  KerasGradsCall call =
      prepare_keras_grads(d_scale, d_shift, r, d, gamma, adj_scale, adj_bias, beta, ghosts, output_mask);
  C10_CUDA_CHECK(call.is_double ? cuda::keras_grads_t<DType::kFloat64>(call.p, current_stream())
                                : cuda::keras_grads_t<DType::kFloat32>(call.p, current_stream()));
  return {call.grad_gamma, call.grad_beta, call.grad_adj_scale, call.grad_adj_bias};
}

// Whether a Keras epilogue of G ghosts x C features (accumulating in double or not) can run in the
// finalize kernel of a call on view v of dtype t: a block per feature (grid x <= 2^31 - 1), a warp
// per ghost, the same per-(ghost, feature) entries and accumulation type. The callers also check
// that the epilogue reads the very arrays the finalize writes.
bool keras_fusable(int64_t G, int64_t C, bool is_double, const View3& v, DType t) {
  return G <= kKerasFusedMaxGhosts && C <= 2147483647 && G * C == v.features() && is_double == (acc_size(t) == 8);
}

// keras_backward: ghost_backward's kernels (sums, finalize, grad_input) with keras_grads in the
// finalize kernel up to kKerasFusedMaxGhosts ghosts (3 kernels, as the plain training backward),
// else after it (4, as the two ops); bitwise the two ops' results either way. Its sums are always
// asked for, as on CPU (keras_grads checks its arguments even when no parameter gradient is wanted).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, at::IntArrayRef axis, int64_t ghosts, const c10::optional<at::Tensor>& r,
    const c10::optional<at::Tensor>& d, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& adj_scale, const c10::optional<at::Tensor>& adj_bias, bool beta,
    std::array<bool, 5> output_mask) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  GhostBackwardCall call = prepare_ghost_backward(grad_out, input, mean, invstd, weight, axis, ghosts,
                                                  {output_mask[0], true, true}, "keras_backward");
  BackwardCall& b = call.bwd;
  KerasGradsCall kc = prepare_keras_grads(b.grad_weight, b.grad_bias, r, d, gamma, adj_scale, adj_bias, beta, ghosts,
                                          {output_mask[1], output_mask[2], output_mask[3], output_mask[4]},
                                          "keras_backward");
  bool fused = false;
  at::Tensor ws;
  if (!b.skip) {
    plan_backward_cuda(b.p, b.dtype, sm_count());
    ws = workspace(input, backward_workspace_bytes(b.p.v, b.p.partitions, acc_size(b.dtype)), b.dtype);
    b.p.workspace = ws.data_ptr();
    // (keras_grads reads the sums the finalize writes: ghost_backward's outputs, in its order)
    fused = keras_fusable(kc.p.G, kc.p.C, kc.is_double, b.p.v, b.dtype) && kc.p.d_scale == b.p.grad_weight &&
            kc.p.d_shift == b.p.grad_bias;
    if (fused) b.p.keras_grads = &kc.p;
    C10_CUDA_CHECK(cuda::backward(b.dtype, b.p, current_stream()));
  }
  finish_backward(b);
  if (!fused) {
    C10_CUDA_CHECK(kc.is_double ? cuda::keras_grads_t<DType::kFloat64>(kc.p, current_stream())
                                : cuda::keras_grads_t<DType::kFloat32>(kc.p, current_stream()));
  }
  return {call.grad_input(), kc.grad_gamma, kc.grad_beta, kc.grad_adj_scale, kc.grad_adj_bias};
}

// keras_forward: batch_stats (statistics, their merge), keras_coeffs' kernel, which also writes
// normalize's apply coefficients, and the apply kernel alone. With at most kKerasFusedMaxGhosts
// ghosts the merge and keras_coeffs' kernel are one kernel (keras_stats_finalize_kernel): 3
// kernels, as the plain training forward launches, where the three ops launch 5; bitwise their
// results either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> keras_forward_cuda(
    const at::Tensor& input, at::IntArrayRef axis, const c10::optional<at::Tensor>& mask, int64_t ghosts,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
    const c10::optional<at::Tensor>& adj_scale, const c10::optional<at::Tensor>& adj_bias, const at::Tensor& moving_mean,
    const at::Tensor& moving_variance, const c10::optional<at::Tensor>& moving_stddev,
    const c10::optional<at::Tensor>& renorm_mean, const c10::optional<at::Tensor>& renorm_stddev, double momentum,
    double renorm_momentum, double eps, c10::optional<double> rmin, c10::optional<double> rmax,
    c10::optional<double> dmax, bool always_update) {
  const at::OptionalDeviceGuard guard(at::device_of(input));  // no-op for a CPU input: prepare_* names the mismatch
  BatchStatsCall bs = prepare_batch_stats(input, axis, mask, ghosts);
  const at::Tensor &mean = bs.mean, &m2 = bs.m2, &count = bs.count;
  KerasFinalizeCall kc =
      prepare_keras_coeffs(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                           moving_stddev, renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin,
                           rmax, dmax, always_update);
  const DType acc_t = kc.is_double ? DType::kFloat64 : DType::kFloat32;
  const at::Tensor coeffs = workspace(mean, 3 * static_cast<size_t>(mean.numel()) * acc_size(acc_t), acc_t);
  kc.p.apply = coeffs.data_ptr();
  bool fused = false;
  at::Tensor ws;
  if (!bs.skip) {
    plan_forward_cuda(bs.p, bs.dtype, sm_count());
    ws = workspace(input, forward_workspace_bytes(bs.p.v, bs.p.partitions, acc_size(bs.dtype)), bs.dtype);
    bs.p.workspace = ws.data_ptr();
    // (the epilogue reads the statistics the finalize writes: batch_stats' outputs, in its order)
    fused = keras_fusable(kc.p.G, kc.p.C, kc.is_double, bs.p.v, bs.dtype) && kc.p.mean == bs.p.stat_mean &&
            kc.p.m2 == bs.p.stat_m2 && kc.p.count == bs.p.stat_count;
    if (fused) bs.p.keras = &kc.p;
    C10_CUDA_CHECK(cuda::batch_stats(bs.dtype, bs.p, current_stream()));
  }
  if (fused) {
    finish_keras_finalize(kc);
  } else {
    run_keras_finalize(kc);
  }
  NormalizeCall nc = prepare_normalize(input, mean, kc.invstd, kc.weight, kc.bias, axis, ghosts);
  ForwardCall& f = nc.fwd;
  if (!f.skip) {
    plan_forward_cuda(f.p, f.dtype, sm_count());
    f.p.partitions = 0;  // the workspace holds only the apply coefficients: the kernel's
    // (feature_tensor reads flat, contiguous accumulation-dtype tensors through their data
    // pointers, so normalize's per-feature arrays are the kernel's, in the kernel's order)
    TORCH_INTERNAL_ASSERT(f.p.v.features() == mean.numel() && nc.mean.ptr() == mean.data_ptr() &&
                              nc.invstd.ptr() == kc.invstd.data_ptr() && f.p.weight == kc.weight.data_ptr() &&
                              f.p.bias == kc.bias.data_ptr(),
                          "bn_cuda.keras_forward: normalize does not read the epilogue kernel's tensors");
    f.p.workspace = coeffs.data_ptr();
    f.p.coeffs_given = true;
    C10_CUDA_CHECK(cuda::apply_given(f.dtype, f.p, current_stream()));
  }
  finish_forward(f);
  return {nc.output(), mean, kc.invstd, kc.weight, count, kc.r, kc.d};
}

}  // namespace

// (registered as bn_cuda._C._set_single_cf by ops.cpp) Returns the previous setting.
bool set_single_cf(bool on) { return g_single_cf.exchange(on); }
}  // namespace bn_cuda

#ifdef BN_CUDA_EMULATE
TORCH_LIBRARY_IMPL(bn_cuda, CPU, m) {
#else
TORCH_LIBRARY_IMPL(bn_cuda, CUDA, m) {
#endif
  m.impl("batch_stats", &bn_cuda::batch_stats_cuda);
  m.impl("gather_stats", &bn_cuda::gather_stats_cuda);
  m.impl("normalize", &bn_cuda::normalize_cuda);
  m.impl("grad_sums", &bn_cuda::grad_sums_cuda);
  m.impl("grad_input", &bn_cuda::grad_input_cuda);
  m.impl("ghost_backward", &bn_cuda::ghost_backward_cuda);
  m.impl("keras_finalize", &bn_cuda::keras_finalize_cuda);
  m.impl("keras_coeffs", &bn_cuda::keras_coeffs_cuda);
  m.impl("keras_grads", &bn_cuda::keras_grads_cuda);
  m.impl("keras_forward", &bn_cuda::keras_forward_cuda);
  m.impl("keras_backward", &bn_cuda::keras_backward_cuda);
  m.impl("forward_train", &bn_cuda::forward_train_cuda);
  m.impl("forward_infer", &bn_cuda::forward_infer_cuda);
  m.impl("backward", &bn_cuda::backward_cuda);
}
