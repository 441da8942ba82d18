// bn_cuda.functional.batch_norm's common call in C++: the argument checks of its Python fast path
// and the op call through the dispatcher, without the Python glue and the boxed call of
// torch.ops (about 3-4 us of host time per call, as much as a small GPU call's launches). Also
// the op calls of bn_cuda.ops.batch_norm_train / batch_norm_infer (the Keras layer's plain path).
//
// It returns None whenever the Python function must decide: an argument of another type (a tensor
// subclass, an int momentum, a tuple of axes ...), a torch function mode, a TorchScript trace, an
// axis out of range, one value per feature in training, missing running statistics in evaluation.
// Everything else goes to the same op with the same arguments as the Python fast path (so the same
// results and, for bad tensors, the op's own errors). torch.compile and torch.export never reach it
// (the Python function asks first: a C++ call would break the graph).
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "bn_cuda/ops.h"

namespace bn_cuda {
namespace {

namespace py = pybind11;
using OptTensor = std::optional<at::Tensor>;

// A plain tensor (torch.Tensor or nn.Parameter, which have no __torch_function__ of their own).
bool plain_tensor(PyObject* o) { return THPVariable_CheckExact(o); }
// None or a plain tensor, into `out`.
bool optional_tensor(PyObject* o, OptTensor& out) {
  if (o == Py_None) return true;
  if (!plain_tensor(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}
bool is_bool(py::handle o) { return o.ptr() == Py_True || o.ptr() == Py_False; }
// Whether the call must be seen from Python: a torch function mode sees every call, and a
// TorchScript trace records torch operations instead (bn_cuda.onnx).
bool python_must_see() { return at::impl::torch_function_mode_enabled() || torch::jit::tracer::isTracing(); }
py::object wrap(at::Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

py::object batch_norm_fast(py::handle input, py::handle running_mean, py::handle running_var, py::handle weight,
                           py::handle bias, py::handle training, py::handle momentum, py::handle eps,
                           py::handle axis) {
  HANDLE_TH_ERRORS
  PyObject* x_obj = input.ptr();
  if (!plain_tensor(x_obj) || !is_bool(training) ||
      !PyFloat_CheckExact(momentum.ptr()) || !PyFloat_CheckExact(eps.ptr()) || !PyLong_CheckExact(axis.ptr()))
    return py::none();
  OptTensor rm, rv, w, b;
  if (!optional_tensor(running_mean.ptr(), rm) || !optional_tensor(running_var.ptr(), rv) ||
      !optional_tensor(weight.ptr(), w) || !optional_tensor(bias.ptr(), b))
    return py::none();
  if (python_must_see()) return py::none();
  int overflow = 0;
  const long long a_in = PyLong_AsLongLongAndOverflow(axis.ptr(), &overflow);
  const at::Tensor& x = THPVariable_Unpack(x_obj);
  const int64_t nd = x.dim();
  if (overflow || nd < 2 || a_in < -nd || a_in >= nd) return py::none();
  const int64_t a = a_in < 0 ? a_in + nd : a_in;
  const double mom = PyFloat_AS_DOUBLE(momentum.ptr()), ep = PyFloat_AS_DOUBLE(eps.ptr());
  at::Tensor out;
  if (training.ptr() == Py_True) {
    const int64_t n = x.numel();
    // (both running statistics or neither; more than one value per feature, or an empty batch)
    if (rm.has_value() != rv.has_value() || (n == x.size(a) && n != 0)) return py::none();
    py::gil_scoped_release no_gil;
    out = std::get<0>(ops::forward_train(x, w, b, rm, rv, mom, ep, {a}, true));
  } else {
    if (!rm.has_value() || !rv.has_value()) return py::none();
    py::gil_scoped_release no_gil;
    out = ops::forward_infer(x, w, b, *rm, *rv, ep, {a});
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

// A list of Python ints (exactly), into `out`.
bool int_list(PyObject* o, std::vector<int64_t>& out) {
  if (!PyList_CheckExact(o)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(o);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(o, i);
    if (!PyLong_CheckExact(item)) return false;
    int overflow = 0;
    out[static_cast<size_t>(i)] = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow) return false;
  }
  return true;
}

// Whether every given tensor is on x's device (bn_cuda.ops.check_same_device's test: its error
// message is the Python path's).
bool same_device(const at::Tensor& x, std::initializer_list<const OptTensor*> ts) {
  for (const OptTensor* t : ts)
    if (t->has_value() && (*t)->device() != x.device()) return false;
  return true;
}

// bn_cuda.ops.batch_norm_train / batch_norm_infer's op calls (the Keras layer's plain path) the
// same way: the op's outputs, or None (another argument type, tensors on several devices, a mode,
// a trace: the Python path).
py::object forward_train_fast(py::handle input, py::handle weight, py::handle bias, py::handle running_mean,
                              py::handle running_var, py::handle momentum, py::handle eps, py::handle axis,
                              py::handle unbiased) {
  HANDLE_TH_ERRORS
  OptTensor w, b, rm, rv;
  std::vector<int64_t> axes;
  if (!plain_tensor(input.ptr()) || !optional_tensor(weight.ptr(), w) || !optional_tensor(bias.ptr(), b) ||
      !optional_tensor(running_mean.ptr(), rm) || !optional_tensor(running_var.ptr(), rv) ||
      !PyFloat_CheckExact(momentum.ptr()) || !PyFloat_CheckExact(eps.ptr()) || !int_list(axis.ptr(), axes) ||
      !is_bool(unbiased) || python_must_see())
    return py::none();
  const at::Tensor& x = THPVariable_Unpack(input.ptr());
  if (!same_device(x, {&w, &b, &rm, &rv})) return py::none();
  const double mom = PyFloat_AS_DOUBLE(momentum.ptr()), ep = PyFloat_AS_DOUBLE(eps.ptr());
  const bool unb = unbiased.ptr() == Py_True;
  at::Tensor out, mean, invstd;
  {
    py::gil_scoped_release no_gil;
    std::tie(out, mean, invstd) = ops::forward_train(x, w, b, rm, rv, mom, ep, axes, unb);
  }
  return py::make_tuple(wrap(std::move(out)), wrap(std::move(mean)), wrap(std::move(invstd)));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object forward_infer_fast(py::handle input, py::handle weight, py::handle bias, py::handle running_mean,
                              py::handle running_var, py::handle eps, py::handle axis) {
  HANDLE_TH_ERRORS
  OptTensor w, b, rm, rv;
  std::vector<int64_t> axes;
  if (!plain_tensor(input.ptr()) || !optional_tensor(weight.ptr(), w) || !optional_tensor(bias.ptr(), b) ||
      !optional_tensor(running_mean.ptr(), rm) || !rm.has_value() || !optional_tensor(running_var.ptr(), rv) ||
      !rv.has_value() || !PyFloat_CheckExact(eps.ptr()) || !int_list(axis.ptr(), axes) || python_must_see())
    return py::none();
  const at::Tensor& x = THPVariable_Unpack(input.ptr());
  if (!same_device(x, {&w, &b, &rm, &rv})) return py::none();
  const double ep = PyFloat_AS_DOUBLE(eps.ptr());
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = ops::forward_infer(x, w, b, *rm, *rv, ep, axes);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

void register_functional_fast(py::module_& m) {
  m.def("_batch_norm_fast", &batch_norm_fast,
        "bn_cuda.functional.batch_norm's common call (one int axis, plain tensors, float momentum and eps): "
        "the output, or None where the Python function must decide.");
  m.def("_forward_train_fast", &forward_train_fast,
        "torch.ops.bn_cuda.forward_train for plain tensors, float momentum / eps and a list of int axes, "
        "called from C++: (output, mean, invstd), or None where the Python caller must call the op.");
  m.def("_forward_infer_fast", &forward_infer_fast,
        "torch.ops.bn_cuda.forward_infer likewise: the output, or None.");
}

}  // namespace bn_cuda
