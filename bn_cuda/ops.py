"""Fake kernels and autograd for the ``torch.ops.bn_cuda`` operators (schemas: csrc/ops.cpp).

Every op's autograd kernel is C++ (``csrc/common/autograd.cpp``, dispatch key Autograd):
``forward_train`` updates the running statistics in place (declared ``Tensor(a!)?`` in its schema)
and ``register_autograd`` refuses operators with mutable arguments; and a Python autograd layer
costs more host time per call than the kernel on small tensors (about 9-30 us even under no_grad).
The forwards' backward nodes call the registered ``backward`` op, whose own node gives double
backward; they work under ``torch.compile(fullgraph=True)`` (the mutation is functionalized).
"""

from __future__ import annotations

import operator
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C

__all__ = ["batch_norm_train", "batch_norm_infer", "check_same_device", "normalize_axes", "num_features", "as_float",
           "as_int", "as_axes"]

_ops = torch.ops.bn_cuda
# The op calls of batch_norm_train / batch_norm_infer from C++ (csrc/common/functional_fast.cpp).
_forward_train_fast = _C._forward_train_fast
_forward_infer_fast = _C._forward_infer_fast
_is_compiling = torch.compiler.is_compiling

_is_exporting = torch.compiler.is_exporting
_is_tracing = torch.jit.is_tracing


def _onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing the caller (either exporter: the default traces with
    torch.export, ``dynamo=False`` with a TorchScript trace); see bn_cuda.onnx."""
    if not (_is_exporting() or _is_tracing()):
        return False
    if torch.onnx.is_in_onnx_export():
        return True
    # The default exporter falls back to torch.export's strict mode, whose tracer folds
    # is_in_onnx_export() to False; the flag that function reads is still set.
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


def _onnx():
    from . import onnx  # (imports bn_cuda.ops: loaded at the first export)
    return onnx


def as_float(who: str, name: str, value) -> float:
    """``float(value)`` for a scalar argument, or a TypeError naming the function, the argument and
    the value (``float("a")`` alone says only "could not convert string to float")."""
    if type(value) is float:  # (the common case first: this runs on every functional call)
        return value
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{who}: {name} must be a float, got {value!r} ({type(value).__name__})")
    return float(value)


def as_int(who: str, name: str, value) -> int:
    """An int argument (anything with ``__index__`` but a bool), or a TypeError naming it. A
    symbolic int (torch.compile's dynamic shapes) is passed on as it is: ``__index__`` would
    specialize the graph on its value (and torch.compile traces a SymInt as an ``int``)."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return value  # (before hasattr: torch 2.11's dynamo cannot trace hasattr on a SymInt)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{who}: {name} must be an int, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def as_axes(who: str, axis) -> List[int]:
    """``axis`` (an int or a sequence of ints) as a list of ints, or a TypeError naming the value
    (``int()`` would take ``"1"`` or ``1.5``)."""
    items = list(axis) if isinstance(axis, (list, tuple, torch.Size)) else [axis]
    if any(isinstance(a, bool) or not hasattr(a, "__index__") for a in items):
        raise TypeError(f"{who}: axis must be an int or a sequence of ints, got {axis!r}")
    return [operator.index(a) for a in items]


def normalize_axes(axis: Sequence[int], ndim: int) -> List[int]:
    """Sorted non-negative feature axes; errors name the value received."""
    if len(axis) == 1 and type(axis[0]) is int and -ndim <= axis[0] < ndim:  # the common case, fast
        return [axis[0] % ndim]
    out = []
    for a in axis:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(
                f"bn_cuda: axis {a} is out of range for an input of rank {ndim} "
                f"(valid: {-ndim} .. {ndim - 1}); axis={list(axis)}"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"bn_cuda: axis contains a dimension more than once; axis={list(axis)}")
    if not out:
        raise ValueError("bn_cuda: axis must name at least one feature axis, got []")
    return sorted(out)


def num_features(shape: Sequence[int], axis: Sequence[int]) -> int:
    n = 1
    for a in normalize_axes(axis, len(shape)):  # (a plain loop: torch.compile traces it, not math.prod(genexpr))
        n *= int(shape[a])
    return n


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (each trailing dim 1 or equal).

    ``torch.broadcast_shapes(shape, target) == target`` says the same, at ~60 us a call in torch
    2.14 (its Python goes through the symbolic-shape machinery): more than a small step's kernels.
    """
    if len(shape) > len(target):
        return False
    off = len(target) - len(shape)
    return all(s == 1 or s == target[off + i] for i, s in enumerate(shape))


def check_same_device(input: Tensor, **tensors: Optional[Tensor]) -> None:
    """Every given tensor is on the input's device; the error names the tensor and both devices.

    Runs before dispatch: with tensors on two devices the dispatcher would pick one device's kernel
    (or the meta kernel) and the mismatch would surface there as an unrelated error, or not at all.
    """
    dev = input.device
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            raise RuntimeError(
                f"bn_cuda: {name} is on {t.device} but input is on {input.device}; move them to the same device"
            )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes, dtypes and strides exactly as the real kernels produce them, after
# the argument checks of the real ops' C++ preparation (csrc/common/glue.cpp prepare_forward /
# prepare_backward / feature_tensor; csrc/common/staged.cpp plan_ghosts / prepare_*): the same
# exception type (ValueError for TORCH_CHECK_VALUE, TypeError for TORCH_CHECK_TYPE, RuntimeError
# for TORCH_CHECK) and message, so that a call with meta tensors, or a traced graph, fails as the
# eager call does. Conditions on sizes go through torch._check*: a symbolic (dynamic) batch size or
# ghost count is guarded or asserted there, never specialized.

import math  # noqa: E402
import struct  # noqa: E402

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT64_MAX = 2 ** 63 - 1
# c10's ScalarType names, as `<< scalar_type()` prints them in the C++ messages.
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
              torch.complex32: "ComplexHalf"}


def _num(v) -> str:
    """A double as C++'s ``ostream <<`` prints it (``%g``: -1, 1e-05, inf, nan)."""
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _v(x) -> str:
    """An int, or a symbolic one by its value in the call being traced where torch knows it
    (``SymInt.hint`` in recent torch, the node's hint before: torch 2.11 has no ``SymInt.hint``),
    else by its expression."""
    if isinstance(x, torch.SymInt):
        for hint in (lambda: x.hint, lambda: x.node.hint):
            try:
                value = hint()
            except Exception:  # noqa: BLE001  (an attribute this torch lacks, or no hint to give)
                continue
            if value is not None:
                return str(value)
    return str(x)


def _shape(s) -> str:
    return "[" + ", ".join(_v(x) for x in s) + "]"


def _all(*conds):
    """The conjunction of Python / symbolic bools, without guarding on a symbolic one (torch._check
    of the result guards once, or defers a runtime assert)."""
    out = True
    for c in conds:
        if c is False:
            return False
        if c is not True:
            out = c if out is True else out & c
    return out


def _any(*conds):
    out = False
    for c in conds:
        if c is True:
            return True
        if c is not False:
            out = c if out is False else out | c
    return out


def _finite(v) -> bool:
    return not isinstance(v, (int, float)) or math.isfinite(v)  # (a symbolic float: left to the op)


def _f32_is_zero(v: float) -> bool:
    """``static_cast<float>(v) == 0`` for a finite v > 0."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0] == 0
    except OverflowError:  # beyond float32: C++ rounds to inf
        return False


def _check_defined(t, name: str, op: Optional[str] = None) -> None:
    """check_defined: Python's None where the schema has a `Tensor` (not `Tensor?`)."""
    if t is None:
        raise TypeError(f"bn_cuda{'.' + op if op else ''}: {name} must be a tensor, got None")


def _check_floating(t: Tensor, name: str) -> None:
    """dtype_of: float32, float64, float16 or bfloat16."""
    if t.dtype not in _FLOATING:
        raise TypeError(f"bn_cuda: {name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
                        f"got {t.dtype}")


def _check_input_rank(input: Tensor, style: str) -> None:
    """input.dim() >= 2, with the message of prepare_forward ("forward"), prepare_backward
    ("backward") or plan_ghosts ("staged")."""
    if input.dim() >= 2:
        return
    if style == "forward":
        raise ValueError(f"bn_cuda: input must have at least 2 dimensions (batch and features), got {input.dim()}"
                         f"-D input of shape {_shape(input.shape)}")
    tail = "" if style == "backward" else f"-D input of shape {_shape(input.shape)}"
    raise ValueError(f"bn_cuda: input must have at least 2 dimensions, got {input.dim()}{tail}")


def _check_forward_eps(eps, training: bool, dtype: torch.dtype) -> None:
    """prepare_forward's eps: finite; > 0 and not 0 in float32 (unless fp64 input) in training;
    >= 0 in evaluation."""
    if not _finite(eps):
        raise ValueError(f"bn_cuda: eps must be finite, got {_num(eps)}")
    if training:
        if not eps > 0:
            raise ValueError(f"bn_cuda: eps must be > 0 in training, got {_num(eps)}")
        if dtype != torch.float64 and isinstance(eps, (int, float)) and _f32_is_zero(eps):
            raise ValueError(f"bn_cuda: eps={_num(eps)} rounds to 0 in float32, the accumulation type of "
                             f"{_C10_NAMES.get(dtype, dtype)} input")
    elif not eps >= 0:
        raise ValueError(f"bn_cuda: eps must be >= 0, got {_num(eps)}")


def _check_finite(op: str, name: str, v) -> None:
    if not _finite(v):
        raise ValueError(f"bn_cuda.{op}: {name} must be finite, got {_num(v)}")


def _check_staged_eps(op: str, eps, dtype: torch.dtype) -> None:
    """check_staged_eps (gather_stats, keras_finalize, keras_coeffs): finite and > 0, and not 0 in
    float32 unless the statistics (of dtype ``dtype``) are float64."""
    if not (_finite(eps) and eps > 0):
        raise ValueError(f"bn_cuda.{op}: eps must be finite and > 0, got {_num(eps)}")
    if dtype != torch.float64 and isinstance(eps, (int, float)) and _f32_is_zero(eps):
        raise ValueError(f"bn_cuda.{op}: eps={_num(eps)} rounds to 0 in float32, the accumulation type of "
                         f"{_C10_NAMES.get(dtype, dtype)} statistics")


class _Plan:
    """What feature_tensor checks a per-feature tensor against (C++'s Canonical): the planned
    input's shape and feature axes, the feature dims' sizes, View3's C, and the entry count of a
    flat per-feature tensor (features() = G * C: ghosts * C with ghost rows, else C)."""

    __slots__ = ("shape", "axes", "feature_shape", "C", "features")

    def __init__(self, shape, axes, ghost_rows=1, feature_shape=None):
        self.shape = list(shape)
        self.axes = list(axes)
        self.feature_shape = [self.shape[a] for a in self.axes] if feature_shape is None else feature_shape
        c = 1
        for s in self.feature_shape:  # (no int(): that would specialize a symbolic feature dim)
            c = c * s
        self.C = c
        self.features = ghost_rows * c  # (no comparison: ghost_rows may be a symbolic ghost count)


def _plan(input: Tensor, axis: Sequence[int]) -> _Plan:
    """plan_canonical's feature axes and sizes (errors on axis as normalize_axes)."""
    return _Plan(input.shape, normalize_axes(axis, input.dim()))


def _check_feature(t: Optional[Tensor], name: str, plan: _Plan, mutated: bool = False) -> None:
    """feature_tensor: floating, of shape the feature dims', flat (features,) or the input's rank
    with 1 elsewhere (Keras); one that is updated in place must not be expanded. (Its device:
    check_same_device, before.)"""
    if t is None:
        return
    _check_floating(t, name)
    fs, nd = plan.feature_shape, len(plan.shape)
    shape = t.shape
    conds = []
    if t.dim() == len(fs):
        conds.append(_all(*(shape[k] == fs[k] for k in range(len(fs)))))
    if t.dim() == 1:
        conds.append(t.numel() == plan.features)
    if t.dim() == nd:
        want = [1] * nd
        for k, a in enumerate(plan.axes):
            want[a] = fs[k]
        conds.append(_all(*(shape[d] == want[d] for d in range(nd))))

    def message():
        keras = [1] * nd
        for k, a in enumerate(plan.axes):
            keras[a] = fs[k]
        accepted = _shape(fs) + (f", [{_v(plan.C)}]" if len(fs) != 1 else "") + f" or {_shape(keras)}"
        return (f"bn_cuda: {name} has shape {_shape(shape)} ({_v(t.numel())} elements) but the input of shape "
                f"{_shape(plan.shape)} has {_v(plan.C)} features along axis {_shape(plan.axes)}; expected shape "
                f"{accepted}")

    torch._check(_any(*conds), message)
    if mutated and torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"bn_cuda: {name} is updated in place, but its elements share memory (shape "
                         f"{_shape(t.shape)}, strides {_shape(t.stride())}, e.g. an expanded tensor); pass a tensor "
                         "of its own (clone() it)")


def _check_flat(t: Optional[Tensor], name: str, op: str, c, source: str, mutated: bool = False) -> None:
    """FlatFeatures: a per-feature tensor of C entries that belongs to no input (running / moving
    statistics, the Keras coefficients' factors): C entries, at most 2-D, named in the op's terms
    (`source`: where C comes from), then feature_tensor's checks against a (1, C) stand-in."""
    if t is None:
        return
    torch._check(t.dim() <= 2 and t.numel() == c, lambda: f"bn_cuda.{op}: {name} has shape {_shape(t.shape)} but "
                                                         f"{source}: expected shape [{_v(c)}]")
    _check_feature(t, name, _Plan((1, c), (1,)), mutated)


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """at::get_overlap_status(a, b) is Full or Partial."""
    if a is b:
        return True
    if a.numel() == 0 or b.numel() == 0:
        return False
    from torch._prims_common import is_non_overlapping_and_dense_or_false as dense
    if not (dense(a) and dense(b)):
        return False  # (TooHard: not refused)
    try:
        if a.untyped_storage()._cdata != b.untyped_storage()._cdata:
            return False
    except (RuntimeError, NotImplementedError):
        return False
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    return (a0 == b0 and a1 == b1) or (a0 < b1 and b0 < a1)


def _check_disjoint(op: str, **updated: Optional[Tensor]) -> None:
    """check_disjoint: the tensors an op updates in place share no memory."""
    named = [(n, t) for n, t in updated.items() if t is not None]
    for i, (an, a) in enumerate(named):
        for bn, b in named[i + 1:]:
            if _overlaps(a, b):
                raise ValueError(f"bn_cuda.{op}: {an} and {bn} are updated in place but share memory; pass separate "
                                 "tensors")


def _check_grad_out(grad_out: Tensor, input: Tensor) -> None:
    """check_grad_out_shape / prepare_backward: grad_out has the input's shape."""
    same = grad_out.dim() == input.dim() and _all(*(g == s for g, s in zip(grad_out.shape, input.shape)))
    torch._check(same, lambda: f"bn_cuda: grad_out has shape {_shape(grad_out.shape)} but input has shape "
                               f"{_shape(input.shape)}")


def _check_mask(mask: Optional[Tensor], input: Tensor, name: str = "mask") -> None:
    """expand_mask: bool or uint8, broadcastable to the input (its device: check_same_device)."""
    if mask is None:
        return
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"bn_cuda: {name} must be a bool (or uint8 0/1) tensor, got "
                        f"{_C10_NAMES.get(mask.dtype, mask.dtype)}")
    m, n = mask.shape, input.shape
    ok = len(m) <= len(n) and _all(*(_any(s == 1, s == n[len(n) - len(m) + i]) for i, s in enumerate(m)))
    torch._check(ok, lambda: f"bn_cuda: {name} of shape {_shape(m)} does not broadcast to the input shape "
                             f"{_shape(n)}")


def _check_ghost_entries(ghosts, c, input: Tensor, axis, name: str, t: Optional[Tensor]) -> None:
    """check_ghost_entries: with ghosts > 1 a per-(ghost, feature) tensor has ghosts * C entries."""
    if t is None or (type(ghosts) is int and ghosts == 1):
        return
    torch._check(t.numel() == ghosts * c, lambda: (
        f"bn_cuda: {name} has shape {_shape(t.shape)} ({_v(t.numel())} elements) but the input of shape "
        f"{_shape(input.shape)} has {_v(c)} features along axis {_shape(axis)} and ghosts={_v(ghosts)}: expected "
        f"ghosts * C = {_v(ghosts * c)} entries, ghost-major (shape [{_v(ghosts * c)}])"))


def _plan_ghosts(input: Tensor, axis: Sequence[int], ghosts,
                 per_feature: Sequence[Optional[Tensor]] = ()) -> Tuple[_Plan, object]:
    """plan_ghosts: the input checks, then the ghost count's (>= 1, ghosts * C an int64, dividing
    the batch, the batch dim no feature axis). Returns the plan per-feature tensors are checked
    against (the ghost-split input's, or ghost rows') and C of the caller's input."""
    _check_input_rank(input, "staged")
    plan = _plan(input, axis)
    c = plan.C
    if type(ghosts) is int and ghosts == 1:
        return plan, c
    torch._check_value(ghosts >= 1, lambda: f"bn_cuda: ghosts must be >= 1, got {_v(ghosts)}")
    torch._check_value(ghosts <= _INT64_MAX // torch.sym_max(c, 1),
                       lambda: f"bn_cuda: ghosts={_v(ghosts)} times the {_v(c)} features overflows int64")
    n = input.shape[0]
    torch._check_value(n % ghosts == 0,
                       lambda: f"bn_cuda: ghosts={_v(ghosts)} must divide the batch size, got a batch of {_v(n)}")
    if 0 in plan.axes:
        torch._check_value(ghosts == 1, lambda: f"bn_cuda: with ghost batches the batch dim 0 cannot be a feature "
                                                f"axis; axis={_shape(axis)}")
    if all(t is None or t.dim() == 1 for t in per_feature):
        # Flat per-feature tensors: ghosts * C entries with ghost rows and split alike.
        return _Plan(plan.shape, plan.axes, ghosts, plan.feature_shape), c
    if ghosts == 1:  # (a symbolic ghost count and a non-flat per-feature tensor: guarded)
        return plan, c
    # A non-flat per-(ghost, feature) tensor: checked against the split batch's plan, whose shapes
    # ((ghosts, *feature dims) and that rank-preserving one) the op accepts in every layout (with
    # ghost rows, channels-last, too: feature_forms), with the same message.
    split = [n // ghosts, ghosts] + list(input.shape[1:])
    return _Plan(split, [1] + [a + 1 for a in plan.axes]), c


def _check_stat_triple(op: str, a: Tensor, an: str, b: Tensor, bn: str, c: Tensor) -> None:
    """stat_triple: (mean, m2 | var, count) defined, of one shape, floating."""
    for t, name in ((a, an), (b, bn), (c, "count")):
        _check_defined(t, name, op)
    same = (a.dim() == b.dim() == c.dim()
            and _all(*(p == q for p, q in zip(a.shape, b.shape)), *(p == q for p, q in zip(a.shape, c.shape))))
    torch._check(same, lambda: f"bn_cuda.{op}: {an}, {bn} and count must have the same shape, got "
                               f"{_shape(a.shape)}, {_shape(b.shape)} and {_shape(c.shape)}")
    for t, name in ((a, an), (b, bn), (c, "count")):
        _check_floating(t, name)


def _check_forward(input: Tensor, weight, bias, running_mean, running_var, training: bool, eps, axis,
                   plan: Optional[_Plan] = None) -> _Plan:
    """prepare_forward's checks; `plan`: the staged ops' ghost plan (the input's rank checked)."""
    if plan is None:
        _check_input_rank(input, "forward")
    _check_floating(input, "input")
    _check_forward_eps(eps, training, input.dtype)
    if plan is None:
        plan = _plan(input, axis)
    _check_feature(weight, "weight", plan)
    _check_feature(bias, "bias", plan)
    # (updated in training only: in evaluation mode they are read, never written back)
    _check_feature(running_mean, "running_mean", plan, mutated=training)
    _check_feature(running_var, "running_var", plan, mutated=training)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("bn_cuda: running_mean and running_var are required when training=False (got "
                         f"{'None' if running_mean is None else 'a tensor'} and "
                         f"{'None' if running_var is None else 'a tensor'})")
    return plan


def _check_backward(grad_out: Tensor, input: Tensor, weight, mean, invstd, axis, plan: Optional[_Plan] = None,
                    mean_name: str = "save_mean", invstd_name: str = "save_invstd") -> _Plan:
    """prepare_backward's checks (its required tensors' presence: by the caller, before its device
    check); `plan`: the staged ops' ghost plan (the input's rank checked)."""
    if plan is None:
        _check_input_rank(input, "backward")
    _check_floating(input, "input")
    _check_floating(grad_out, "grad_out")
    _check_grad_out(grad_out, input)
    if plan is None:
        plan = _plan(input, axis)
    _check_feature(weight, "weight", plan)
    _check_feature(mean, mean_name, plan)
    _check_feature(invstd, invstd_name, plan)
    return plan


@torch.library.register_fake("bn_cuda::forward_train")
def _forward_train_fake(input, weight, bias, running_mean, running_var, momentum, eps, axis,
                        unbiased_running_var=True):
    _check_defined(input, "input")
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    c = _check_forward(input, weight, bias, running_mean, running_var, True, eps, axis).features
    acc = _acc_dtype(input.dtype)
    return (torch.empty_like(input), input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc))


@torch.library.register_fake("bn_cuda::forward_infer")
def _forward_infer_fake(input, weight, bias, running_mean, running_var, eps, axis):
    _check_defined(input, "input")
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _check_forward(input, weight, bias, running_mean, running_var, False, eps, axis)
    return torch.empty_like(input)


@torch.library.register_fake("bn_cuda::backward")
def _backward_fake(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask):
    for t, name in ((grad_out, "grad_out"), (input, "input"), (save_mean, "save_mean"), (save_invstd, "save_invstd")):
        _check_defined(t, name)
    check_same_device(input, grad_out=grad_out, weight=weight, save_mean=save_mean, save_invstd=save_invstd)
    c = _check_backward(grad_out, input, weight, save_mean, save_invstd, axis).features
    acc = _acc_dtype(input.dtype)
    gi = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
    gw = input.new_empty((c if output_mask[1] else 0,), dtype=acc)
    gb = input.new_empty((c if output_mask[2] else 0,), dtype=acc)
    return gi, gw, gb


# ---------------------------------------------------------------------------------------------
# Batching rules (torch.vmap, torch.func): each vmapped sample is its own batch norm, i.e. one
# call with the vmapped dim as one more feature axis. Per-feature tensors (weight, bias, statistics)
# become (B * C,) flat, expanded when they are not batched; the batch statistics come back (B, C).


def _batched(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """``t`` with its vmapped dim first, or expanded to ``size`` there when it has none."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)


def _per_sample_features(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """A per-feature tensor (any of its accepted shapes) as flat (size * C,)."""
    t = _batched(t, dim, size)
    return None if t is None else t.reshape(-1)


def _vmap_axes(axis: Sequence[int], sample_dim: int) -> List[int]:
    """The feature axes of a batched input: the vmapped dim, then the sample's own, shifted by one."""
    return [0] + [a + 1 for a in normalize_axes(list(axis), sample_dim)]


@torch.library.register_vmap("bn_cuda::forward_train")
def _forward_train_vmap(info, in_dims, input, weight, bias, running_mean, running_var, momentum, eps, axis,
                        unbiased_running_var=True):
    size = info.batch_size
    running = []
    for name, t, dim in (("running_mean", running_mean, in_dims[3]), ("running_var", running_var, in_dims[4])):
        if t is not None and dim is None:
            raise RuntimeError(
                f"bn_cuda: vmap over a training-mode batch norm would update the unbatched {name} (shape "
                f"{list(t.shape)}) once per vmapped sample; pass {name} batched (one per sample, e.g. with "
                "in_dims) or None, as for torch's batch norm under vmap")
        running.append(None if t is None else t.movedim(dim, 0))
    x = _batched(input, in_dims[0], size)
    # The running statistics are updated in place: through a flat view where their layout allows it,
    # else through a contiguous copy written back.
    flat = [None if r is None else (r.view(-1) if r.is_contiguous() else r.contiguous().view(-1)) for r in running]
    out, mean, invstd = _ops.forward_train(x, _per_sample_features(weight, in_dims[1], size),
                                           _per_sample_features(bias, in_dims[2], size), flat[0], flat[1], momentum,
                                           eps, _vmap_axes(axis, x.dim() - 1), unbiased_running_var)
    for r, f in zip(running, flat):
        if r is not None and not r.is_contiguous():
            r.copy_(f.view(r.shape))
    return (out, mean.view(size, -1), invstd.view(size, -1)), (0, 0, 0)


@torch.library.register_vmap("bn_cuda::forward_infer")
def _forward_infer_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps, axis):
    size = info.batch_size
    x = _batched(input, in_dims[0], size)
    out = _ops.forward_infer(x, *(_per_sample_features(t, d, size) for t, d in
                                  zip((weight, bias, running_mean, running_var), in_dims[1:5])),
                             eps, _vmap_axes(axis, x.dim() - 1))
    return out, 0


@torch.library.register_vmap("bn_cuda::backward")
def _backward_vmap(info, in_dims, grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask):
    size = info.batch_size
    x = _batched(input, in_dims[1], size)
    gi, gw, gb = _ops.backward(_batched(grad_out, in_dims[0], size), x,
                               *(_per_sample_features(t, d, size) for t, d in
                                 zip((weight, save_mean, save_invstd), in_dims[2:5])),
                               train, _vmap_axes(axis, x.dim() - 1), output_mask)
    # (per-sample parameter gradients (B, C); outputs not asked for are empty and unbatched)
    return ((gi, gw.view(size, -1) if output_mask[1] else gw, gb.view(size, -1) if output_mask[2] else gb),
            (0 if output_mask[0] else None, 0 if output_mask[1] else None, 0 if output_mask[2] else None))


def batch_norm_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                     eps: float, axis: Sequence[int], unbiased_running_var: bool = True
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """Differentiable training forward. Returns (output, batch mean, batch inverse std).

    Running statistics, when given, are updated in place in the same pass:
    ``running = (1 - momentum) * running + momentum * batch_stat``.
    """
    who = "bn_cuda.batch_norm_train"
    if _onnx_exporting():  # (batch statistics with nothing to update: torch operations, bn_cuda.onnx)
        if running_mean is not None or running_var is not None:
            _onnx().refuse_training(who)
        return _onnx().batch_norm_batch_stats(input, weight, bias, eps, axis)
    if not _is_compiling():
        # Plain tensors on one device, float scalars, a list of int axes: the op called from C++.
        out = _forward_train_fast(input, weight, bias, running_mean, running_var, momentum, eps, axis,
                                  bool(unbiased_running_var))
        if out is not None:
            return out
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    args = (input, weight, bias, running_mean, running_var, as_float(who, "momentum", momentum),
            as_float(who, "eps", eps), as_axes(who, axis), bool(unbiased_running_var))
    # The op's autograd kernel is C++ (csrc/common/autograd.cpp): no Python layer to skip.
    return _ops.forward_train.default(*args)


def batch_norm_infer(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Tensor, running_var: Tensor, eps: float, axis: Sequence[int]) -> Tensor:
    """Differentiable inference forward with the running statistics."""
    if _onnx_exporting():  # (torch operations that ONNX translates: bn_cuda.onnx)
        return _onnx().batch_norm_infer(input, weight, bias, running_mean, running_var, eps, axis)
    if not _is_compiling():  # (as batch_norm_train)
        out = _forward_infer_fast(input, weight, bias, running_mean, running_var, eps, axis)
        if out is not None:
            return out
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    who = "bn_cuda.batch_norm_infer"
    if _is_compiling() and input.is_cuda and not _is_exporting():
        return infer_for_inductor(input, weight, bias, running_mean, running_var, as_float(who, "eps", eps),
                                  as_axes(who, axis))
    return _ops.forward_infer.default(input, weight, bias, running_mean, running_var, as_float(who, "eps", eps),
                                      as_axes(who, axis))


def infer_for_inductor(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                       running_var: Tensor, eps: float, axis: Sequence[int]) -> Tensor:
    """The inference forward of CUDA tensors under ``torch.compile`` (not ``torch.export``, whose
    programs keep ``bn_cuda::forward_infer`` for deployment and ONNX): the kernel's arithmetic as
    torch operations, ``(x - mean) * (weight * (1 / sqrt(var + eps))) + bias`` in the accumulation
    dtype (epilogue.h's ``apply_coeffs`` / ``apply_one``), after the operator's checks.

    Inference is one elementwise pass, which Inductor's Triton code runs at the memory-bandwidth
    floor too; as torch operations it fuses with its neighbours (a ReLU, a residual add: one pass
    over the activation instead of two) and with ``freezing`` folds into a preceding convolution,
    as torch's batch norm does. The opaque operator blocks both. (Not on CPU: there Inductor's C++
    code for a batch norm alone ran 1.2-2.8x slower than our kernel, and with a ReLU after it our
    operator was as fast or faster, on a 2-core AMD EPYC; see docs/cpu-kernels.md.)"""
    # (_check_forward's message closures stop Dynamo's trace: its plain checks instead, as under
    # torch.export's strict trace, bn_cuda.onnx)
    _check_input_rank(input, "forward")
    for name, t in (("input", input), ("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None:
            _check_floating(t, name)
    _check_forward_eps(eps, False, input.dtype)
    onnx = _onnx()
    onnx._check(input, weight, bias, running_mean, running_var, False, eps, axis)
    return onnx.affine(input, weight, bias, running_mean, running_var, eps, normalize_axes(axis, input.dim()))
