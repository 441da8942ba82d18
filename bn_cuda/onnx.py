"""ONNX export of models that use bn_cuda.

``torch.onnx.export(model.eval(), args)`` works as for torch's own batch norms, with no extra
argument: while either of torch's exporters traces a model (the default ``dynamo=True`` one and the
TorchScript one, ``dynamo=False``), bn_cuda's evaluation-mode batch norm (functional API, torch-style
modules, the Keras layer) traces as plain torch operations instead of bn_cuda's operator, which ONNX
does not know:

- one feature axis at dim 1 with per-feature tensors of the input's dtype: ``F.batch_norm``, exported
  as ONNX ``BatchNormalization`` (which ONNX Runtime and TensorRT fold into a preceding Conv);
- anything else (a channels-last Keras axis, several axes, 16-bit input with float32 statistics):
  ``(x - running_mean) * scale + bias`` with the per-feature ``scale = weight / sqrt(running_var +
  eps)``, in float32 (float64 for float64 input), exported as ``Sub`` / ``Mul`` / ``Add`` (not the
  folded ``x * scale + shift``, which loses the digits of inputs whose mean is far larger than
  their spread, e.g. an offset of 1e4 in float32).

Training-mode batch norm is refused while exporting: an ONNX graph cannot update running statistics,
and torch's own exporter silently turns a training-mode batch norm into an evaluation-mode one.

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
    """The error of a training-mode batch norm met while exporting to ONNX."""
    raise RuntimeError(
        f"{who}: torch.onnx.export traced a batch norm in training mode; bn_cuda exports evaluation mode only "
        "(an ONNX graph cannot update the running statistics, and would normalize with each batch's own "
        "statistics). Call model.eval() before exporting.")


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def batch_norm_infer(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, eps: float, axis: Sequence[int]) -> Tensor:
    """``bn_cuda::forward_infer`` as torch operations that ONNX exporters translate (module docstring);
    the operator's checks first, with its messages."""
    ops._check_defined(input, "input")
    ops.check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if not torch.jit.is_tracing():  # (the TorchScript exporter traces sizes as tensors: its reshape checks)
        ops._check_forward(input, weight, bias, running_mean, running_var, False, eps, axis)
    axes = ops.normalize_axes(axis, input.dim())
    params = (weight, bias, running_mean, running_var)
    if axes == [1] and all(t is None or t.dtype == input.dtype for t in params):
        return torch.nn.functional.batch_norm(input, _flat(running_mean), _flat(running_var), _flat(weight),
                                              _flat(bias), False, 0.0, eps)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    shape = [input.shape[i] if i in axes else 1 for i in range(input.dim())]

    def per_feature(t: Tensor) -> Tensor:
        return t.to(acc).reshape(shape)

    scale = 1.0 / torch.sqrt(per_feature(running_var) + eps)  # (the kernels' invstd: 1 / sqrt, not rsqrt)
    if weight is not None:
        scale = scale * per_feature(weight)
    out = (input.to(acc) - per_feature(running_mean)) * scale
    return (out if bias is None else out + per_feature(bias)).to(input.dtype)


def _forward_infer_onnx(input, weight, bias, running_mean, running_var, eps: float, axis: Sequence[int]):
    """ONNX (onnxscript) translation of ``bn_cuda::forward_infer``: the Sub / Mul / Add form above."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    rank = len(input.shape)
    axes = sorted(int(a) % rank for a in axis)
    dims = [input.shape[a] for a in axes]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(f"bn_cuda.onnx: the feature dims of bn_cuda::forward_infer must be static, got {dims} "
                         f"along axis {axes}")
    shape = op.Constant(value_ints=[dims[axes.index(i)] if i in axes else 1 for i in range(rank)])
    in_type = input.dtype
    acc = ir.DataType.DOUBLE if in_type == ir.DataType.DOUBLE else ir.DataType.FLOAT

    def per_feature(t):
        return op.Reshape(op.Cast(t, to=acc), shape)

    eps_c = op.Cast(op.Constant(value_float=float(eps)), to=acc)
    one = op.Cast(op.Constant(value_float=1.0), to=acc)
    scale = op.Div(one, op.Sqrt(op.Add(per_feature(running_var), eps_c)))
    if weight is not None:
        scale = op.Mul(scale, per_feature(weight))
    out = op.Mul(op.Sub(op.Cast(input, to=acc), per_feature(running_mean)), scale)
    if bias is not None:
        out = op.Add(out, per_feature(bias))
    return op.Cast(out, to=in_type)


def custom_translation_table() -> Dict[Callable, Callable]:
    """``torch.onnx.export(..., custom_translation_table=...)`` entries for bn_cuda's operators in an
    already exported program (:func:`torch.export.export`): ``bn_cuda::forward_infer``. Needs
    ``onnxscript`` (which torch's exporter needs too)."""
    return {torch.ops.bn_cuda.forward_infer.default: _forward_infer_onnx}
