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
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["batch_norm_train", "batch_norm_infer", "check_same_device", "normalize_axes", "num_features", "as_float",
           "as_int", "as_axes"]

_ops = torch.ops.bn_cuda


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
# Fake (meta) kernels: shapes, dtypes and strides exactly as the real kernels produce them.


@torch.library.register_fake("bn_cuda::forward_train")
def _forward_train_fake(input, weight, bias, running_mean, running_var, momentum, eps, axis,
                        unbiased_running_var=True):
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    c = num_features(input.shape, axis)
    acc = _acc_dtype(input.dtype)
    return (torch.empty_like(input), input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc))


@torch.library.register_fake("bn_cuda::forward_infer")
def _forward_infer_fake(input, weight, bias, running_mean, running_var, eps, axis):
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    num_features(input.shape, axis)  # validates axis
    return torch.empty_like(input)


@torch.library.register_fake("bn_cuda::backward")
def _backward_fake(grad_out, input, weight, save_mean, save_invstd, train, axis, output_mask):
    check_same_device(input, grad_out=grad_out, weight=weight, save_mean=save_mean, save_invstd=save_invstd)
    c = num_features(input.shape, axis)
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
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    who = "bn_cuda.batch_norm_train"
    args = (input, weight, bias, running_mean, running_var, as_float(who, "momentum", momentum),
            as_float(who, "eps", eps), as_axes(who, axis), bool(unbiased_running_var))
    # The op's autograd kernel is C++ (csrc/common/autograd.cpp): no Python layer to skip.
    return _ops.forward_train.default(*args)


def batch_norm_infer(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Tensor, running_var: Tensor, eps: float, axis: Sequence[int]) -> Tensor:
    """Differentiable inference forward with the running statistics."""
    check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    who = "bn_cuda.batch_norm_infer"
    return _ops.forward_infer.default(input, weight, bias, running_mean, running_var, as_float(who, "eps", eps),
                                      as_axes(who, axis))
