"""ONNX export of models that use bn_cuda.

``torch.onnx.export(model.eval(), args)`` works as for torch's own batch norms, with no extra
argument: while either of torch's exporters traces a model (the default ``dynamo=True`` one and the
TorchScript one, ``dynamo=False``), bn_cuda's batch norm (functional API, torch-style modules, the
Keras layer) traces as plain torch operations instead of bn_cuda's operator, which ONNX does not
know:

- one feature axis at dim 1 with per-feature tensors of the input's dtype: ``F.batch_norm``, exported
  as ONNX ``BatchNormalization`` (which ONNX Runtime and TensorRT fold into a preceding Conv);
- anything else (a channels-last Keras axis, several axes, 16-bit input with float32 statistics):
  ``(x - running_mean) * scale + bias`` with the per-feature ``scale = weight / sqrt(running_var +
  eps)``, in float32 (float64 for float64 input), exported as ``Sub`` / ``Mul`` / ``Add`` (not the
  folded ``x * scale + shift``, which loses the digits of inputs whose mean is far larger than
  their spread, e.g. an offset of 1e4 in float32);
- batch statistics with no running statistics (``track_running_stats=False``, or the functional API
  given none): the same two forms with the batch's mean and biased variance.

A batch norm that would update running statistics (training mode) is refused while exporting, before
anything moves: an ONNX graph cannot update them, and torch's own exporter silently turns such a
batch norm into an evaluation-mode one.

A program already exported with :func:`torch.export.export` holds ``bn_cuda::forward_infer``
nodes; :func:`custom_translation_table` translates them::

    ep = torch.export.export(model.eval(), (x,))
    torch.onnx.export(ep, custom_translation_table=bn_cuda.onnx.custom_translation_table())
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from . import ops

__all__ = ["exporting", "custom_translation_table"]


def exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing the caller (either exporter).

    Cheap and constant under ``torch.compile``: ``torch.compiler.is_exporting()`` (the default
    exporter traces with ``torch.export``) or a TorchScript trace (the ``dynamo=False`` exporter)
    comes first, and only then ``torch.onnx.is_in_onnx_export()``.
    """
    return ops._onnx_exporting()


def refuse_training(who: str) -> None:
    """The error of a batch norm that would update running statistics, met while exporting to ONNX."""
    raise RuntimeError(
        f"{who}: torch.onnx.export traced a batch norm in training mode; bn_cuda exports evaluation mode only "
        "(an ONNX graph cannot update the running statistics, and would normalize with each batch's own "
        "statistics). Call model.eval() before exporting.")


def _check(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
           running_var: Optional[Tensor], training: bool, eps, axis: Sequence[int]) -> None:
    """The operator's argument checks, with its messages, wherever the exporter traces."""
    if torch.compiler.is_dynamo_compiling():
        # torch.export's strict mode (the default exporter's fallback when the non-strict trace
        # fails) cannot trace the checks' message closures: the per-feature shapes are checked
        # plainly here, so that a model the non-strict trace refused does not export through the
        # fallback (the exporter then reports the non-strict trace's error: bn_cuda's message)
        axes = ops.normalize_axes(axis, input.dim())
        fs = [input.shape[a] for a in axes]
        c = 1
        for d in fs:
            c = c * d
        keras = [input.shape[d] if d in axes else 1 for d in range(input.dim())]
        for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
            if t is not None and list(t.shape) not in (fs, [c], keras):
                raise ValueError(f"bn_cuda: {name} has shape {list(t.shape)} but the input of shape "
                                 f"{list(input.shape)} has {c} features along axis {axes}")
        return
    state = torch._C._get_tracing_state() if torch.jit.is_tracing() else None
    if state is not None:  # (the TorchScript exporter traces sizes as tensors: the checks read plain ints
        torch._C._set_tracing_state(None)  # with the trace paused, and record nothing)
    try:
        ops._check_defined(input, "input")
        ops.check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
        ops._check_forward(input, weight, bias, running_mean, running_var, training, eps, axis)
    finally:
        if state is not None:
            torch._C._set_tracing_state(state)


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def _normalize(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
               eps: float, axes: Sequence[int]) -> Tensor:
    """F.batch_norm (ONNX BatchNormalization) for one feature axis at dim 1 and per-feature tensors of
    the input's dtype; else ``(x - mean) * scale (+ bias)`` in the accumulation dtype."""
    params = (weight, bias, mean, var)
    if list(axes) == [1] and all(t is None or t.dtype == input.dtype for t in params):
        return torch.nn.functional.batch_norm(input, _flat(mean), _flat(var), _flat(weight), _flat(bias),
                                              False, 0.0, eps)
    return affine(input, weight, bias, mean, var, eps, axes)


def affine(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
           eps: float, axes: Sequence[int]) -> Tensor:
    """The kernels' apply step as torch operations (epilogue.h's ``apply_coeffs`` / ``apply_one``):
    ``(x - mean) * (weight / sqrt(var + eps)) (+ bias)`` in the accumulation dtype, per-feature
    tensors of any accepted shape broadcast along the feature axes ``axes`` (normalized). Also
    what CUDA tensors trace as under torch.compile (ops.infer_for_inductor)."""
    acc = ops._acc_dtype(input.dtype)
    shape = [input.shape[i] if i in axes else 1 for i in range(input.dim())]

    def per_feature(t: Tensor) -> Tensor:
        return t.to(acc).reshape(shape)

    scale = _invstd(per_feature(var), eps)
    if weight is not None:
        scale = scale * per_feature(weight)
    out = (input.to(acc) - per_feature(mean)) * scale
    return (out if bias is None else out + per_feature(bias)).to(input.dtype)


def _invstd(var: Tensor, eps: float) -> Tensor:
    """The kernels' ``1 / sqrt(var + eps)``, with eps a tensor constant of var's dtype, not a Python
    scalar: the default exporter writes those as float32 constants, 1e-10 off in float64."""
    return torch.reciprocal(torch.sqrt(var + torch.tensor(eps, dtype=var.dtype, device=var.device)))


def batch_norm_infer(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, eps: float, axis: Sequence[int]) -> Tensor:
    """``bn_cuda::forward_infer`` as torch operations that ONNX exporters translate (module docstring);
    the operator's checks first, with its messages."""
    _check(input, weight, bias, running_mean, running_var, False, eps, axis)
    return _normalize(input, weight, bias, running_mean, running_var, eps, ops.normalize_axes(axis, input.dim()))


def batch_norm_batch_stats(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                           axis: Sequence[int]):
    """``bn_cuda::forward_train`` without running statistics (nothing to update) as torch operations:
    the batch's mean and biased variance (in the accumulation dtype), normalized with as above;
    ``(output, batch mean, batch inverse std)`` as the operator returns them."""
    _check(input, weight, bias, None, None, True, eps, axis)
    axes = ops.normalize_axes(axis, input.dim())
    reduce = [i for i in range(input.dim()) if i not in axes]
    var, mean = torch.var_mean(input.to(ops._acc_dtype(input.dtype)), reduce, correction=0)
    out = _normalize(input, weight, bias, mean, var, eps, axes)
    return out, mean.reshape(-1), _invstd(var, eps).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Translations of bn_cuda's operators for programs already exported (custom_translation_table).


def _forward_infer_onnx(input, weight, bias, running_mean, running_var, eps: float, axis: Sequence[int]):
    """ONNX (onnxscript) translation of ``bn_cuda::forward_infer``: BatchNormalization or
    Sub / Mul / Add, as :func:`batch_norm_infer` chooses."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    rank = len(input.shape)
    axes = sorted(int(a) % rank for a in axis)
    dims = [input.shape[a] for a in axes]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(f"bn_cuda.onnx: the feature dims of bn_cuda::forward_infer must be static, got {dims} "
                         f"along axis {axes}")
    in_type = input.dtype
    c = int(np.prod(dims))
    same = all(t is None or t.dtype == in_type for t in (weight, bias, running_mean, running_var))
    if axes == [1] and same and in_type in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16):
        flat = op.Constant(value_ints=[c])

        def given(t, fill: float):
            if t is None:
                return op.Expand(op.CastLike(op.Constant(value_float=fill), input), flat)
            return op.Reshape(t, flat)
        return op.BatchNormalization(input, given(weight, 1.0), given(bias, 0.0), op.Reshape(running_mean, flat),
                                     op.Reshape(running_var, flat), epsilon=float(eps))
    shape = op.Constant(value_ints=[dims[axes.index(i)] if i in axes else 1 for i in range(rank)])
    acc = ir.DataType.DOUBLE if in_type == ir.DataType.DOUBLE else ir.DataType.FLOAT
    np_acc = np.float64 if acc == ir.DataType.DOUBLE else np.float32

    def per_feature(t):
        return op.Reshape(op.Cast(t, to=acc), shape)

    eps_c = op.Constant(value=ir.tensor(np.array(eps, dtype=np_acc)))
    one = op.Constant(value=ir.tensor(np.array(1.0, dtype=np_acc)))
    scale = op.Div(one, op.Sqrt(op.Add(per_feature(running_var), eps_c)))
    if weight is not None:
        scale = op.Mul(scale, per_feature(weight))
    out = op.Mul(op.Sub(op.Cast(input, to=acc), per_feature(running_mean)), scale)
    if bias is not None:
        out = op.Add(out, per_feature(bias))
    return op.Cast(out, to=in_type)


def custom_translation_table() -> Dict[Callable, Callable]:
    """``torch.onnx.export(..., custom_translation_table=...)`` entries for bn_cuda's operators in an
    already exported program (:func:`torch.export.export`): ``bn_cuda::forward_infer``, the
    evaluation-mode operator. (A program exported in training mode holds ``forward_train`` under
    torch's ``auto_functionalized_v2``, which torch 2.14's ONNX exporter fails to look up, with a
    ``KeyError``, whatever the table says.) Needs ``onnxscript`` (which torch's exporter needs too)."""
    return {torch.ops.bn_cuda.forward_infer.default: _forward_infer_onnx}
