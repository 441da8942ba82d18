"""tf_keras's ``BatchNormalization`` maths in plain PyTorch ops: the ``fused=False`` path.

Each function mirrors one step of tf_keras's non-fused ``call`` so that results agree to float32
rounding, gradients included (they come from autograd through these same expressions). The steps
are kept separate so that fused kernels can replace them one at a time:

- :func:`ghost_batches`: the ghost-batch view (tf_keras reshapes ``(B, ...)`` to
  ``(virtual_batch_size, B // virtual_batch_size, ...)``, so sample ``i`` is in ghost
  ``i % (B // virtual_batch_size)``: ghosts are strided, not contiguous).
- :func:`moments`: per-feature (per ghost) mean and biased variance, plain, masked (frequency
  weighted) or from sums of squares (tf_keras's synchronized formula), with a ``stats_hook``
  where the cross-process all-reduce of (sum, sum of squares, count) slots in.
- :func:`renorm_correction`: Batch Renormalization's ``r`` and ``d``.
- :func:`compose_transforms`, :func:`batch_normalization`, :func:`moving_average`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["StatsHook", "ghost_batches", "moments", "sum_moments", "renorm_correction", "compose_transforms",
           "batch_normalization", "moving_average"]

StatsHook = Callable[[Tensor], Tensor]
"""Maps the stacked local ``(sum, sum_of_squares, count)`` (shape ``(3, *stat_shape)``) to the
global one; for synchronized statistics this is a (differentiable) all-reduce-sum."""


def ghost_batches(x: Tensor, virtual_batch_size: int) -> Tensor:
    """``(B, ...) -> (virtual_batch_size, B // virtual_batch_size, ...)``, tf_keras's ghost view.

    Statistics are then reduced over dim 0 (and the non-feature dims), one set per index of dim 1.
    """
    return x.reshape(virtual_batch_size, -1, *x.shape[1:])


def _div_no_nan(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den == 0`` (tf.math.div_no_nan), with finite gradients."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def moments(x: Tensor, reduce_dims: Sequence[int], *, mask_weights: Optional[Tensor] = None,
            sum_of_squares: bool = False, stats_hook: Optional[StatsHook] = None) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``reduce_dims`` (kept as size-1 dims).

    Parameters
    ----------
    x : Tensor
        Float32 or float64 input (16-bit inputs are upcast by the caller, as tf_keras does).
    reduce_dims : sequence of int
        Dims to reduce.
    mask_weights : Tensor, optional
        Frequency weights broadcastable to ``x`` (the boolean mask with a trailing size-1 dim):
        ``mean = sum(w x) / sum(w)``, ``var = sum(w (x - mean)^2) / sum(w)``, 0 where ``sum(w) == 0``
        (``tf.nn.weighted_moments``).
    sum_of_squares : bool
        Use tf_keras's synchronized formula ``var = max(E[x^2] - E[x]^2, 0)`` (which tf_keras also
        runs, in a single process, for ``synchronized=True``) instead of the two-pass one.
    stats_hook : callable, optional
        Applied to the stacked local (sum, sum of squares, count); implies ``sum_of_squares``.
    """
    dims = list(reduce_dims)
    if sum_of_squares or stats_hook is not None:
        mean, var, _ = sum_moments(x, dims, mask_weights=mask_weights, stats_hook=stats_hook)
        return mean, var
    if mask_weights is None:
        mean = x.mean(dims, keepdim=True)
        # tf.nn.moments stops the gradient through the mean inside the variance.
        return mean, (x - mean.detach()).square().mean(dims, keepdim=True)
    sum_w = (mask_weights + torch.zeros_like(x)).sum(dims, keepdim=True)
    mean = _div_no_nan((mask_weights * x).sum(dims, keepdim=True), sum_w)
    var = _div_no_nan((mask_weights * (x - mean).square()).sum(dims, keepdim=True), sum_w)
    return mean, var


def sum_moments(x: Tensor, reduce_dims: Sequence[int], *, mask_weights: Optional[Tensor] = None,
                stats_hook: Optional[StatsHook] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """tf_keras's synchronized moments: ``(mean, max(E[x^2] - E[x]^2, 0), count)`` from the
    (optionally ``stats_hook``-reduced) sums, 0 where the count is 0. Arguments as :func:`moments`."""
    dims = list(reduce_dims)
    if mask_weights is not None:
        y = x * mask_weights
        count = (mask_weights + torch.zeros_like(x)).sum(dims, keepdim=True)
    else:
        y = x
        count = torch.ones_like(x).sum(dims, keepdim=True)
    local = torch.stack([y.sum(dims, keepdim=True), y.square().sum(dims, keepdim=True), count])
    total, total_sq, count = (stats_hook(local) if stats_hook is not None else local).unbind(0)
    mean = _div_no_nan(total, count)
    return mean, torch.clamp_min(_div_no_nan(total_sq, count) - mean.square(), 0.0), count


def renorm_correction(mean: Tensor, variance: Tensor, renorm_mean: Tensor, renorm_stddev: Tensor,
                      epsilon: float, clipping: Mapping[str, float]) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch Renormalization's correction, from the *pre-update* renorm statistics.

    Returns ``(r, d, stddev)`` with ``stddev = sqrt(variance + epsilon)`` (the value the renorm and
    inference moving stddevs are updated towards), ``r = stddev / max(renorm_stddev, sqrt(epsilon))``
    clipped to ``[rmin, rmax]`` and ``d = (mean - renorm_mean) / max(renorm_stddev, sqrt(epsilon))``
    clipped to ``[-dmax, dmax]``; a missing key means no clip on that side. ``r`` and ``d`` carry
    gradients here; the caller stops them, as tf_keras does.
    """
    stddev = torch.sqrt(variance + epsilon)
    # (a fill, not torch.tensor(): no host-to-device copy, so the step stays CUDA-graph capturable)
    floor = torch.sqrt(torch.full((), epsilon, dtype=renorm_stddev.dtype, device=renorm_stddev.device))
    renorm_stddev = torch.maximum(renorm_stddev, floor)
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
    if rmin is not None:
        r = torch.clamp_min(r, float(rmin))
    if rmax is not None:
        r = torch.clamp_max(r, float(rmax))
    if dmax is not None:
        d = torch.clamp(d, -float(dmax), float(dmax))
    return r, d, stddev


def compose_transforms(scale: Optional[Tensor], offset: Optional[Tensor], then_scale: Optional[Tensor],
                       then_offset: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``y -> (y * scale + offset) * then_scale + then_offset`` as one (scale, offset) pair."""
    if then_scale is not None:
        scale = scale * then_scale if scale is not None else then_scale
        offset = offset * then_scale if offset is not None else None
    if then_offset is not None:
        offset = offset + then_offset if offset is not None else then_offset
    return scale, offset


def batch_normalization(x: Tensor, mean: Tensor, variance: Tensor, offset: Optional[Tensor],
                        scale: Optional[Tensor], epsilon: float) -> Tensor:
    """``tf.nn.batch_normalization``, in its exact order of operations."""
    inv = torch.rsqrt(variance + epsilon)
    if scale is not None:
        inv = inv * scale
    shift = offset - mean * inv if offset is not None else -mean * inv
    return x * inv.to(x.dtype) + shift.to(x.dtype)


def moving_average(variable: Tensor, value: Tensor, momentum: float) -> Tensor:
    """tf_keras's ``variable - (variable - value) * (1 - momentum)`` (the new value, not in place)."""
    return variable - (variable - value.to(variable.dtype)) * (1.0 - momentum)
