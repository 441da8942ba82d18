// bn_cuda.functional.batch_norm's common call in C++: the argument checks of its Python fast path
// and the op call through the dispatcher, without the Python glue and the boxed call of
// torch.ops (about 3-4 us of host time per call, as much as a small GPU call's launches).
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

#include <optional>

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

py::object batch_norm_fast(py::handle input, py::handle running_mean, py::handle running_var, py::handle weight,
                           py::handle bias, py::handle training, py::handle momentum, py::handle eps,
                           py::handle axis) {
  HANDLE_TH_ERRORS
  PyObject* x_obj = input.ptr();
  if (!plain_tensor(x_obj) || (training.ptr() != Py_True && training.ptr() != Py_False) ||
      !PyFloat_CheckExact(momentum.ptr()) || !PyFloat_CheckExact(eps.ptr()) || !PyLong_CheckExact(axis.ptr()))
    return py::none();
  OptTensor rm, rv, w, b;
  if (!optional_tensor(running_mean.ptr(), rm) || !optional_tensor(running_var.ptr(), rv) ||
      !optional_tensor(weight.ptr(), w) || !optional_tensor(bias.ptr(), b))
    return py::none();
  // (modes see every call, and traces record torch operations instead: bn_cuda.onnx)
  if (at::impl::torch_function_mode_enabled() || torch::jit::tracer::isTracing()) return py::none();
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
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

void register_functional_fast(py::module_& m) {
  m.def("_batch_norm_fast", &batch_norm_fast,
        "bn_cuda.functional.batch_norm's common call (one int axis, plain tensors, float momentum and eps): "
        "the output, or None where the Python function must decide.");
}

}  // namespace bn_cuda
