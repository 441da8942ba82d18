// The consumer's torch glue: (a) per-channel statistics with bn_cuda's headers (host code here,
// device code in stats.cu), (b) bn_cuda's operators called through the dispatcher (bn_cuda/ops.h),
// with no link dependency on bn_cuda._C.
#include <torch/extension.h>

#include <bn_cuda/ops.h>

#include "stats.h"

#if defined(CONSUMER_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "consumer.channel_stats: input must have >= 2 dims, got ", input.dim());
  TORCH_CHECK(input.scalar_type() == at::kFloat, "consumer.channel_stats: float32 only, got ", input.scalar_type());
  const at::Tensor x = input.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = C ? x.numel() / std::max<int64_t>(1, N * C) : 0;
  at::Tensor mean = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  if (x.is_cuda()) {
#if defined(CONSUMER_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    const int err = consumer::channel_stats_cuda(x.data_ptr<float>(), N, C, HW, mean.data_ptr<float>(),
                                                 var.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
#else
    TORCH_CHECK(false, "consumer_ext was built without CUDA");
#endif
  } else {
    consumer::channel_stats_host(x.data_ptr<float>(), N, C, HW, mean.data_ptr<float>(), var.data_ptr<float>());
  }
  return {mean, var};
}

at::Tensor bn_train(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& running_mean, const at::Tensor& running_var, double momentum, double eps) {
  auto out = BN_CUDA_NAMESPACE::ops::forward_train(input, weight, bias, running_mean, running_var, momentum, eps, {1});
  return std::get<0>(out);
}

at::Tensor bn_infer(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  return BN_CUDA_NAMESPACE::ops::forward_infer(input, weight, bias, running_mean, running_var, eps, {1});
}

// A batch norm composed from the staged ops (local Welford state -> Chan merge -> normalize), as
// an extension building its own normalization on bn_cuda's statistics would write it.
at::Tensor bn_staged(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  namespace ops = BN_CUDA_NAMESPACE::ops;
  const auto [mean, m2, count] = ops::batch_stats(input, {1});
  const auto [gmean, invstd, gcount] = ops::gather_stats(mean.unsqueeze(0), m2.unsqueeze(0), count.unsqueeze(0),
                                                         std::nullopt, std::nullopt, 0.0, eps);
  return ops::normalize(input, gmean, invstd, weight, bias, {1});
}

// Masked per-channel Welford state (mean, m2, count) through the dispatcher.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_stats(const at::Tensor& input, const at::Tensor& mask) {
  return BN_CUDA_NAMESPACE::ops::batch_stats(input, {1}, mask);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("channel_stats", &channel_stats, "per-channel (mean, biased var) with bn_cuda's Welford headers");
  m.def("bn_train", &bn_train, "bn_cuda::forward_train called through the dispatcher");
  m.def("bn_infer", &bn_infer, "bn_cuda::forward_infer called through the dispatcher");
  m.def("bn_staged", &bn_staged, "batch_stats -> gather_stats -> normalize through the dispatcher");
  m.def("masked_stats", &masked_stats, "bn_cuda::batch_stats with a mask through the dispatcher");
}
