"""Torch-style functional API."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _C, ops

_ops = torch.ops.bn_cuda

__all__ = ["batch_norm"]

# The C++ callables behind the two OpOverloads the fast path below calls: the same dispatcher
# entry (autograd, Python dispatch modes and fake tensors included) without OpOverload.__call__'s
# Python frame, 2-5 us a call on a 2-core AVX2 VM, a quarter of a small CPU batch norm's time.
# Under torch.compile the fast path calls the OpOverloads, which dynamo traces.
_forward_train = getattr(_ops.forward_train.default, "_op", _ops.forward_train.default)
_forward_infer = getattr(_ops.forward_infer.default, "_op", _ops.forward_infer.default)
# The common eager call whole in C++ (csrc/common/functional_fast.cpp): these checks and the op call
# through the dispatcher, without this function's Python or the boxed call; None where the code
# below must decide (another argument type, a torch function mode, a trace, an argument error).
_batch_norm_fast = _C._batch_norm_fast
_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting
_C_is_tracing = torch._C._is_tracing


_WHO = "bn_cuda.functional.batch_norm"


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: Union[int, Sequence[int]] = 1,
) -> Tensor:
    """Batch normalization on bn_cuda's fused kernels; a drop-in for
    :func:`torch.nn.functional.batch_norm`.

    Parameters
    ----------
    input : Tensor
        Any rank >= 2, any strides (contiguous, channels_last, channels_last_3d, sliced), dtype
        float32, float64, float16 or bfloat16.
    running_mean, running_var : Tensor or None
        Per-feature running statistics, updated in place when ``training`` is True:
        ``running = (1 - momentum) * running + momentum * batch_stat`` with the unbiased batch
        variance. Both or neither (as torch); required when ``training`` is False. (The raw
        ``torch.ops.bn_cuda.forward_train`` op, like ATen's, updates whichever is given.)
    weight, bias : Tensor or None
        Per-feature scale and shift.
    training : bool
        Normalize with batch statistics (True) or with the running statistics (False).
    momentum : float
        Running-statistics update factor (torch's convention).
    eps : float
        Added to the variance.
    axis : int or sequence of int
        Feature axes (negative allowed). With several axes there is one statistic per element of
        the feature sub-tensor; per-feature tensors then have the feature dims' shape (e.g.
        ``(A, B)`` for ``axis=(1, 2)``), a flat ``(A*B,)`` shape, or the rank-preserving Keras shape
        with 1s in the reduced dims.

    Returns
    -------
    Tensor
        Same shape, dtype and memory format as ``input``.
    """
    if not _is_compiling():
        out = _batch_norm_fast(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
        if out is not None:
            return out
    if type(training) is not bool:  # (as torch's batch_norm: not a truthy value, which "no" would be)
        raise TypeError(f"bn_cuda.functional.batch_norm: training must be a bool, got {training!r} "
                        f"({type(training).__name__})")
    if training and (running_mean is None) is not (running_var is None):  # (as torch's batch_norm)
        raise ValueError(
            "bn_cuda.functional.batch_norm: running_mean and running_var must both be tensors or both be None, got "
            f"{'a tensor' if running_mean is not None else 'None'} and {'a tensor' if running_var is not None else 'None'}")
    # Fast path for the common call (one int axis, valid arguments): straight to the op, whose C++
    # (and fake) kernels check devices, shapes and dtypes with the messages of the checks below.
    # Python glue costs as much host time as a small GPU call's launches.
    # (Not under torch.export or a TorchScript trace: the calls below are where ONNX export takes
    # torch operations instead, bn_cuda.onnx. torch._C._is_tracing, cheaper than torch.jit.is_tracing,
    # is asked only outside torch.compile, which cannot trace it.)
    compiling = _is_compiling()
    if type(axis) is int and isinstance(input, Tensor) and momentum is not None and not (
            _is_exporting() if compiling else _C_is_tracing()):
        nd = input.dim()
        if nd >= 2 and -nd <= axis < nd:
            a = axis % nd
            if training:
                n = input.numel()
                if n != input.shape[a] or n == 0:  # (one value per feature: the error below)
                    fn = _ops.forward_train.default if compiling else _forward_train
                    return fn(input, weight, bias, running_mean, running_var, ops.as_float(_WHO, "momentum", momentum),
                              ops.as_float(_WHO, "eps", eps), [a], True)[0]
            elif running_mean is not None and running_var is not None:
                ops.as_float(_WHO, "momentum", momentum)  # (unused in evaluation, but checked as torch does)
                # (compiling: ops.batch_norm_infer picks the operator or, for CUDA tensors, torch
                # operations that Inductor fuses)
                fn = ops.batch_norm_infer if compiling else _forward_infer
                return fn(input, weight, bias, running_mean, running_var, ops.as_float(_WHO, "eps", eps), [a])
    if not isinstance(input, Tensor):
        raise TypeError(f"bn_cuda.functional.batch_norm: input must be a Tensor, got {type(input).__name__}")
    axes = [axis] if type(axis) is int else ops.as_axes(_WHO, axis)  # (fast path for the common int)
    if input.dim() < 2:
        raise ValueError(
            f"bn_cuda.functional.batch_norm: input must have at least 2 dimensions, got {input.dim()}-D "
            f"input of shape {list(input.shape)}"
        )
    norm_axes = ops.normalize_axes(axes, input.dim())
    if momentum is None:
        raise ValueError("bn_cuda.functional.batch_norm: momentum must be a float, got None "
                         "(cumulative averaging is handled by the nn modules)")
    momentum, eps = ops.as_float(_WHO, "momentum", momentum), ops.as_float(_WHO, "eps", eps)
    if training:
        features = 1
        for a in norm_axes:  # (a plain loop: dynamo cannot trace math.prod over a generator)
            features *= input.shape[a]
        per_feature = input.numel() // max(1, features)
        if per_feature == 1:
            raise ValueError(
                f"bn_cuda.functional.batch_norm: expected more than 1 value per feature when training, "
                f"got input of shape {list(input.shape)} with feature axes {norm_axes}"
            )
        out, _, _ = ops.batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps, axes)
        return out
    if running_mean is None or running_var is None:
        raise ValueError(
            "bn_cuda.functional.batch_norm: running_mean and running_var are required when training=False "
            f"(got {'a tensor' if running_mean is not None else 'None'} and "
            f"{'a tensor' if running_var is not None else 'None'})"
        )
    return ops.batch_norm_infer(input, weight, bias, running_mean, running_var, eps, axes)
