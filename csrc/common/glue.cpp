#include "glue.h"

#include "cpu/dispatch.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <typeinfo>

namespace bn_cuda {

namespace {

// The DType of one of the four supported scalar types; false for any other.
bool to_dtype(at::ScalarType s, DType& out) {
  switch (s) {
    case at::kFloat:
      out = DType::kFloat32;
      return true;
    case at::kDouble:
      out = DType::kFloat64;
      return true;
    case at::kHalf:
      out = DType::kFloat16;
      return true;
    case at::kBFloat16:
      out = DType::kBFloat16;
      return true;
    default:
      return false;
  }
}

}  // namespace

DType dtype_of(const at::Tensor& t, const char* name) {
  DType d = DType::kFloat32;
  // torch.<name> (torch.uint8, torch.int64) as Python users spell dtypes, not c10's "Byte".
  TORCH_CHECK_TYPE(to_dtype(t.scalar_type(), d), "bn_cuda: ", name,
                   " must be a floating-point tensor (float32, float64, float16 or bfloat16), got torch.",
                   c10::getDtypeNames(t.scalar_type()).first);
  return d;
}

at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_same_device(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "bn_cuda: ", name, " is on ", t.device(), " but input is on ",
              input.device(), "; move them to the same device");
}

void check_defined(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_TYPE(t.defined(), "bn_cuda", op ? "." : "", op ? op : "", ": ", name, " must be a tensor, got None");
}

namespace {

// The shapes a per-feature tensor may have: the feature dims' shape, flat (features,) or the input's
// rank with 1 elsewhere (Keras), and how an error describes the input. With ghost rows (View3::G > 1:
// ghost batches of a channels-last input, per-(ghost, feature) tensors) these are the forms of the
// split batch, (n / G, G, ...) with the ghost dim as the first feature axis, which the other layouts
// run as: (G, *feature dims), (G * C,) and (1, G, ...), all ghost-major.
struct FeatureForms {
  std::vector<int64_t> dims, keras, input_shape, axes;
  int64_t flat = 0;
};

FeatureForms feature_forms(const Canonical& c, const at::Tensor& input) {
  FeatureForms f;
  const int64_t nd = input.dim();
  const int64_t G = c.v.G;
  const int64_t r = G > 1 ? 1 : 0;  // (the ghost dim shifts every axis by one)
  f.flat = c.v.features();
  f.dims.assign(c.feature_shape.begin(), c.feature_shape.end());
  f.input_shape = input.sizes().vec();
  f.keras.assign(nd + r, 1);
  if (r) {
    f.dims.insert(f.dims.begin(), G);
    f.input_shape[0] /= G;
    f.input_shape.insert(f.input_shape.begin() + 1, G);
    f.keras[1] = G;
    f.axes.push_back(1);
  }
  for (size_t k = 0; k < c.axes.size(); ++k) {
    f.keras[c.axes[k] + r] = c.feature_shape[k];
    f.axes.push_back(c.axes[k] + r);
  }
  return f;
}

}  // namespace

// Validate a per-feature tensor and bring it to a flat acc-typed contiguous form.
FeatureTensor feature_tensor(const c10::optional<at::Tensor>& maybe, const char* name, const Canonical& c,
                             const at::Tensor& input, at::ScalarType acc, bool mutated, bool defer) {
  FeatureTensor f;
  if (!maybe.has_value() || !maybe->defined()) return f;
  const at::Tensor& t = *maybe;
  f.user = t;
  check_same_device(t, input, name);
  dtype_of(t, name);
  if (!(t.dim() == 1 && t.numel() == c.v.features())) {  // (the flat form, the usual one, builds no shapes)
    const FeatureForms forms = feature_forms(c, input);
    const std::vector<int64_t> shape = t.sizes().vec();
    TORCH_CHECK(shape == forms.dims || shape == forms.keras, "bn_cuda: ", name, " has shape ", shape_str(t.sizes()),
                " (", t.numel(), " elements) but the input of shape ", shape_str(forms.input_shape), " has ",
                forms.flat, " features along axis ", shape_str(forms.axes), "; expected shape ", shape_str(forms.dims),
                forms.dims.size() != 1 ? ", [" + std::to_string(forms.flat) + "]" : std::string(), " or ",
                shape_str(forms.keras));
  }
  // (an expanded tensor cannot take the update: refused before any kernel runs, naming it)
  TORCH_CHECK_VALUE(!mutated || at::has_internal_overlap(t) != at::MemOverlap::Yes, "bn_cuda: ", name,
                    " is updated in place, but its elements share memory (shape ", shape_str(t.sizes()), ", strides ",
                    shape_str(t.strides()), ", e.g. an expanded tensor); pass a tensor of its own (clone() it)");
  if (t.scalar_type() == acc && t.is_contiguous()) {
    f.acc = t;  // contiguous and already the acc type: used through its data pointer, no view
  } else {
    f.pending = true;
    f.copy_back = mutated;
    if (!defer) convert_features({&f}, acc);
  }
  return f;
}

namespace {

// Small contiguous CPU tensors with float32 accumulation, on an AVX2 or AVX-512 CPU: converted by
// the CPU kernels' vector conversions (cpu::to_float / from_float), which round and encode NaNs as
// Tensor::to's do; anything else (strided, larger than this, float64 accumulation, the portable
// kernels, whose scalar casts encode NaNs differently) through copy_, as before.
constexpr int64_t kHostConvertMax = 1 << 16;

bool host_convertible(const at::Tensor& t, at::ScalarType acc) {
  return acc == at::kFloat && t.is_cpu() && t.is_contiguous() && t.numel() <= kHostConvertMax && !t.is_neg() &&
         !t.is_conj() && cpu::use_vector_kernels();
}

// The registered batched conversion (constant-initialized, so registering from another file's
// static initializer is safe).
DeviceConvertFn g_device_convert = nullptr;
c10::DeviceType g_device_convert_type = c10::DeviceType::CPU;

DeviceConvertFn device_convert_for(const at::Tensor& t) {
  return g_device_convert != nullptr && t.device().type() == g_device_convert_type ? g_device_convert : nullptr;
}

// A tensor the batched conversion reads or writes through its data pointer.
bool batchable(const at::Tensor& t) { return t.is_contiguous() && !t.is_neg() && !t.is_conj(); }

// Queue one segment; false when the block is full (the caller falls back to copy_).
bool add_segment(ConvertParams& cp, const void* src, at::ScalarType src_t, void* dst, at::ScalarType dst_t,
                 int64_t n) {
  if (cp.count == ConvertParams::kMaxSegments) return false;
  ConvertSegment& g = cp.seg[cp.count];
  if (!to_dtype(src_t, g.src_t) || !to_dtype(dst_t, g.dst_t)) return false;
  g.src = src;
  g.dst = dst;
  g.n = n;
  ++cp.count;
  return true;
}

}  // namespace

void register_device_convert(c10::DeviceType type, DeviceConvertFn fn) {
  g_device_convert_type = type;
  g_device_convert = fn;
}

void convert_features(std::initializer_list<FeatureTensor*> fs, at::ScalarType acc) {
  int64_t total = 0;
  const at::Tensor* like = nullptr;
  for (FeatureTensor* f : fs) {
    if (!f->pending) continue;
    total += f->user.numel();
    like = &f->user;
  }
  if (like == nullptr) return;
  const DeviceConvertFn dev = device_convert_for(*like);
  const at::Tensor buf = at::empty({total}, like->options().dtype(acc));
  char* const base = static_cast<char*>(buf.data_ptr());
  ConvertParams cp;
  int64_t offset = 0;
  for (FeatureTensor* f : fs) {
    if (!f->pending) continue;
    f->acc = buf;
    f->offset = offset;
    f->pending = false;
    const int64_t n = f->user.numel();
    void* dst = base + offset * static_cast<int64_t>(buf.element_size());
    if (dev != nullptr && batchable(f->user) &&
        add_segment(cp, f->user.const_data_ptr(), f->user.scalar_type(), dst, acc, n)) {
    } else if (dev == nullptr && host_convertible(f->user, acc)) {
      cpu::to_float(dtype_of(f->user, "per-feature tensor"), f->user.const_data_ptr(), static_cast<float*>(dst), n);
    } else {
      buf.narrow(0, offset, n).copy_(f->user.reshape({-1}));
    }
    offset += n;
  }
  if (cp.count > 0) dev(cp);
}

void write_back(std::initializer_list<FeatureTensor*> fs) {
  DeviceConvertFn dev = nullptr;
  for (FeatureTensor* f : fs) {
    if (!f->copy_back) continue;
    dev = device_convert_for(f->user);
    // (tensors that share storage, e.g. running_mean and running_var passed as one tensor, are
    // written one after the other, in argument order, as copy_ did: not in one launch)
    for (FeatureTensor* g : fs) {
      if (g != f && g->copy_back && g->user.storage().is_alias_of(f->user.storage())) dev = nullptr;
    }
    if (dev == nullptr) break;
  }
  ConvertParams cp;
  for (FeatureTensor* f : fs) {
    if (!f->copy_back) continue;
    const int64_t n = f->user.numel();
    const void* src = static_cast<const char*>(f->acc.const_data_ptr()) + f->offset * static_cast<int64_t>(f->acc.element_size());
    if (dev != nullptr && batchable(f->user) &&
        add_segment(cp, src, f->acc.scalar_type(), f->user.mutable_data_ptr(), f->user.scalar_type(), n)) {
    } else if (dev == nullptr && f->acc.is_cpu() && host_convertible(f->user, f->acc.scalar_type())) {
      cpu::from_float(dtype_of(f->user, "per-feature tensor"), static_cast<const float*>(src), f->user.mutable_data_ptr(), n);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      f->user.copy_(f->acc.narrow(0, f->offset, n).view(f->user.sizes()));
    }
  }
  if (cp.count > 0) dev(cp);
}

namespace {

// A tensor whose data the conversions may touch directly: a plain TensorImpl (no functorch or
// functionalization wrapper, no sparse or nested layout), no Python key (fake tensors, subclasses),
// no dispatch mode that expects to see the cast, no graph to record.
bool plain_result(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return typeid(*impl) == typeid(c10::TensorImpl) && !impl->key_set().has(c10::DispatchKey::Python) &&
         t.layout() == at::kStrided && !t.requires_grad() && batchable(t) && !c10::impl::dispatch_mode_enabled();
}

}  // namespace

void cast_results(std::initializer_list<std::pair<at::Tensor*, at::ScalarType>> ts) {
  ConvertParams cp;
  DeviceConvertFn dev = nullptr;
  // The batched conversion's sources, alive until it ran (freed before, their memory could be
  // handed to the next result's allocation: the caching allocator reuses a block on its stream)
  std::array<at::Tensor, ConvertParams::kMaxSegments> sources;
  c10::OptionalDeviceGuard guard;
  for (const auto& [t, dst] : ts) {
    if (!t->defined() || t->scalar_type() == dst) continue;
    if (plain_result(*t)) {
      const DeviceConvertFn d = device_convert_for(*t);
      DType dst_t = DType::kFloat32;
      // (the batched kernel narrows to a 16-bit type from float32 only: convert.cuh; one launch
      // serves one device)
      if (d != nullptr && (t->scalar_type() == at::kFloat || dst == at::kFloat) &&
          (dev == nullptr || t->device() == sources[0].device())) {
        at::Tensor out = at::empty(t->sizes(), t->options().dtype(dst));
        if (add_segment(cp, t->const_data_ptr(), t->scalar_type(), out.mutable_data_ptr(), dst, t->numel())) {
          if (dev == nullptr) guard.reset_device(t->device());  // (the launch's stream: its device's current one)
          dev = d;
          sources[cp.count - 1] = std::move(*t);
          *t = std::move(out);
          continue;
        }
      } else if (d == nullptr && host_convertible(*t, t->scalar_type()) && to_dtype(dst, dst_t)) {
        at::Tensor out = at::empty(t->sizes(), t->options().dtype(dst));
        cpu::from_float(dst_t, t->const_data_ptr<float>(), out.mutable_data_ptr(), t->numel());
        *t = std::move(out);
        continue;
      }
    }
    *t = t->to(dst);
  }
  if (cp.count > 0) dev(cp);
}

ForwardCall prepare_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, bool training, double momentum,
                            double eps, at::IntArrayRef axis, bool unbiased_running_var, int64_t ghosts) {
  ForwardCall call;
  check_defined(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 2, "bn_cuda: input must have at least 2 dimensions (batch and features), got ",
                    input.dim(), "-D input of shape ", shape_str(input.sizes()));
  call.dtype = dtype_of(input, "input");
  TORCH_CHECK_VALUE(std::isfinite(eps), "bn_cuda: eps must be finite, got ", eps);
  if (training) {
    TORCH_CHECK_VALUE(eps > 0, "bn_cuda: eps must be > 0 in training, got ", eps);
    // (else a feature of equal values normalizes to 0 * inf = NaN)
    TORCH_CHECK_VALUE(input.scalar_type() == at::kDouble || static_cast<float>(eps) > 0, "bn_cuda: eps=", eps,
                      " rounds to 0 in float32, the accumulation type of ", input.scalar_type(), " input");
  } else {
    TORCH_CHECK_VALUE(eps >= 0, "bn_cuda: eps must be >= 0, got ", eps);  // (as torch's batch_norm)
  }
  call.canon = plan_canonical(input, axis);
  if (ghosts > 1) set_ghost_rows(call.canon, input, ghosts);
  const Canonical& c = call.canon;
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  call.weight = feature_tensor(weight, "weight", c, input, acc, false, /*defer=*/true);
  call.bias = feature_tensor(bias, "bias", c, input, acc, false, /*defer=*/true);
  // (updated in training only: in evaluation mode they are read, never written back)
  call.running_mean = feature_tensor(running_mean, "running_mean", c, input, acc, training, /*defer=*/true);
  call.running_var = feature_tensor(running_var, "running_var", c, input, acc, training, /*defer=*/true);
  if (!training) {
    TORCH_CHECK_VALUE(call.running_mean.user.defined() && call.running_var.user.defined(),
                      "bn_cuda: running_mean and running_var are required when training=False (got ",
                      call.running_mean.user.defined() ? "a tensor" : "None", " and ",
                      call.running_var.user.defined() ? "a tensor" : "None", ")");
  }

  call.out = at::empty_like(input);
  const at::TensorOptions acc_opts = input.options().dtype(acc);
  if (training) {
    call.save_mean = at::empty({c.v.features()}, acc_opts);
    call.save_invstd = at::empty({c.v.features()}, acc_opts);
  }
  call.skip = input.numel() == 0;
  if (call.skip) {
    if (training) {
      call.save_mean.zero_();
      call.save_invstd.zero_();
    }
    return call;
  }
  convert_features({&call.weight, &call.bias, &call.running_mean, &call.running_var}, acc);
  call.x = as_strided3(input, c);
  if (!try_strided3(call.out, c, call.y)) {
    call.y = as_strided3(dense_in_perm_order(input, c), c);
    call.y_scratch = true;
  }
  ForwardParams& p = call.p;
  p.v = c.v;
  p.x = call.x.data();
  p.x_so = call.x.so;
  p.x_sc = call.x.sc;
  p.y = call.y.mutable_data();
  p.y_so = call.y.so;
  p.y_sc = call.y.sc;
  p.weight = call.weight.ptr();
  p.bias = call.bias.ptr();
  p.running_mean = call.running_mean.ptr();
  p.running_var = call.running_var.ptr();
  p.save_mean = training ? call.save_mean.data_ptr() : nullptr;
  p.save_invstd = training ? call.save_invstd.data_ptr() : nullptr;
  p.momentum = momentum;
  p.eps = eps;
  p.unbiased_running_var = unbiased_running_var;
  return call;
}

void finish_forward(ForwardCall& call) {
  if (call.skip) return;
  if (call.y_scratch) call.out.copy_(call.y.t);
  write_back({&call.running_mean, &call.running_var});
}

BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& input,
                              const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                              const at::Tensor& save_invstd, bool train, at::IntArrayRef axis,
                              std::array<bool, 3> output_mask, int64_t ghosts, const char* mean_name,
                              const char* invstd_name) {
  BackwardCall call;
  check_defined(grad_out, "grad_out");
  check_defined(input, "input");
  check_defined(save_mean, mean_name);
  check_defined(save_invstd, invstd_name);
  TORCH_CHECK_VALUE(input.dim() >= 2, "bn_cuda: input must have at least 2 dimensions, got ", input.dim());
  call.dtype = dtype_of(input, "input");
  dtype_of(grad_out, "grad_out");
  check_same_device(grad_out, input, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bn_cuda: grad_out has shape ", shape_str(grad_out.sizes()),
              " but input has shape ", shape_str(input.sizes()));
  call.canon = plan_canonical(input, axis);
  if (ghosts > 1) set_ghost_rows(call.canon, input, ghosts);
  const Canonical& c = call.canon;
  const at::ScalarType acc = acc_scalar_type(input.scalar_type());
  call.weight = feature_tensor(weight, "weight", c, input, acc, false, /*defer=*/true);
  call.mean = feature_tensor(save_mean, mean_name, c, input, acc, false, /*defer=*/true);
  call.invstd = feature_tensor(save_invstd, invstd_name, c, input, acc, false, /*defer=*/true);

  const at::TensorOptions acc_opts = input.options().dtype(acc);
  call.grad_input = output_mask[0] ? at::empty_like(input) : at::empty({0}, input.options());
  call.grad_weight = output_mask[1] ? at::empty({c.v.features()}, acc_opts) : at::empty({0}, acc_opts);
  call.grad_bias = output_mask[2] ? at::empty({c.v.features()}, acc_opts) : at::empty({0}, acc_opts);
  call.skip = input.numel() == 0;
  if (call.skip) {
    call.grad_weight.zero_();
    call.grad_bias.zero_();
    return call;
  }
  convert_features({&call.weight, &call.mean, &call.invstd}, acc);
  at::Tensor dy_t = grad_out.scalar_type() == input.scalar_type() ? grad_out : grad_out.to(input.scalar_type());
  call.x = as_strided3(input, c);
  call.dy = as_strided3(dy_t, c);
  BackwardParams& p = call.p;
  p.v = c.v;
  p.x = call.x.data();
  p.x_so = call.x.so;
  p.x_sc = call.x.sc;
  p.dy = call.dy.data();
  p.dy_so = call.dy.so;
  p.dy_sc = call.dy.sc;
  if (output_mask[0]) {
    if (!try_strided3(call.grad_input, c, call.dx)) {
      call.dx = as_strided3(dense_in_perm_order(input, c), c);
      call.dx_scratch = true;
    }
    p.dx = call.dx.mutable_data();
    p.dx_so = call.dx.so;
    p.dx_sc = call.dx.sc;
  }
  p.weight = call.weight.ptr();
  p.mean = call.mean.ptr();
  p.invstd = call.invstd.ptr();
  p.grad_weight = output_mask[1] ? call.grad_weight.data_ptr() : nullptr;
  p.grad_bias = output_mask[2] ? call.grad_bias.data_ptr() : nullptr;
  p.train = train;
  return call;
}

void finish_backward(BackwardCall& call) {
  if (call.skip) return;
  if (call.dx_scratch) call.grad_input.copy_(call.dx.t);
}

}  // namespace bn_cuda
