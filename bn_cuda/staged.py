"""Staged operators: the fused forward / backward split at the points where statistics cross a
process boundary (synchronized batch norm) or where a composition needs them.

Forward:  ``batch_stats`` (local Welford state per feature) -> exchange -> ``gather_stats``
(Chan merge of W states in a fixed order, running statistics update) -> ``normalize``.
Backward: ``grad_sums`` (local sum(dy), sum(dy * (x - mean))) -> all-reduce -> ``grad_input``.

All per-feature outputs are flat ``(C,)`` tensors in the accumulation dtype (fp32; fp64 for fp64
input). None of them synchronizes with the host.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .ops import _acc_dtype, num_features

__all__ = ["batch_stats", "gather_stats", "normalize", "grad_sums", "grad_input", "keras_finalize", "keras_coeffs"]

_ops = torch.ops.bn_cuda


@torch.library.register_fake("bn_cuda::batch_stats")
def _batch_stats_fake(input, axis, mask=None, ghosts=1):
    c = num_features(input.shape, axis) * ghosts
    acc = _acc_dtype(input.dtype)
    return tuple(input.new_empty((c,), dtype=acc) for _ in range(3))


@torch.library.register_fake("bn_cuda::gather_stats")
def _gather_stats_fake(mean, m2, count, running_mean, running_var, momentum, eps, unbiased_running_var=True):
    c = mean.shape[-1]
    return tuple(mean.new_empty((c,)) for _ in range(3))


@torch.library.register_fake("bn_cuda::normalize")
def _normalize_fake(input, mean, invstd, weight, bias, axis, ghosts=1):
    return torch.empty_like(input)


@torch.library.register_fake("bn_cuda::grad_sums")
def _grad_sums_fake(grad_out, input, mean, invstd, axis, ghosts=1):
    c = num_features(input.shape, axis) * ghosts
    acc = _acc_dtype(input.dtype)
    return input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc)


@torch.library.register_fake("bn_cuda::grad_input")
def _grad_input_fake(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis, mask=None,
                     ghosts=1):
    return torch.empty_like(input)


@torch.library.register_fake("bn_cuda::keras_finalize")
def _keras_finalize_fake(mean, var, count, moving_mean, moving_variance, moving_stddev, renorm_mean,
                         renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax, dmax, always_update):
    c = mean.shape[0] // ghosts
    return mean.new_empty((c,)), mean.new_empty((c,))


def keras_finalize(mean: Tensor, var: Tensor, count: Tensor, moving_mean: Tensor, moving_variance: Tensor,
                   moving_stddev: Optional[Tensor], renorm_mean: Optional[Tensor], renorm_stddev: Optional[Tensor],
                   ghosts: int, momentum: float, renorm_momentum: float, eps: float,
                   rmin: Optional[float] = None, rmax: Optional[float] = None, dmax: Optional[float] = None,
                   always_update: bool = False) -> Tuple[Tensor, Tensor]:
    """tf_keras's training epilogue of ghost batches / batch renormalization, in one device step.

    Averages the ``ghosts`` per-ghost ``(mean, var)`` (``ghosts * C`` each, ghost-major), takes
    renorm's ``r`` and ``d`` from the *pre-update* renorm statistics (clipped to ``[rmin, rmax]`` and
    ``[-dmax, dmax]``; ``None`` = no clip on that side), and updates the moving variables in place
    with tf_keras's decay ``v - (v - value) * (1 - momentum)``; with renorm, ``moving_variance`` is
    ``relu(moving_stddev^2 - eps)``. Features without data keep their moving variables unless
    ``always_update``. Returns ``(r, d)`` (1 and 0 without renorm), with no gradient.
    """
    return _ops.keras_finalize.default(mean, var, count, moving_mean, moving_variance, moving_stddev, renorm_mean,
                                       renorm_stddev, int(ghosts), float(momentum), float(renorm_momentum),
                                       float(eps), None if rmin is None else float(rmin),
                                       None if rmax is None else float(rmax), None if dmax is None else float(dmax),
                                       bool(always_update))


@torch.library.register_fake("bn_cuda::keras_coeffs")
def _keras_coeffs_fake(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                       moving_stddev, renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax,
                       dmax, always_update):
    acc = torch.float64 if mean.dtype == torch.float64 else torch.float32
    f = mean.shape[0]
    c = f // ghosts
    return (mean.new_empty((f,), dtype=acc), mean.new_empty((f,), dtype=acc), mean.new_empty((f,), dtype=acc),
            mean.new_empty((c,), dtype=acc), mean.new_empty((c,), dtype=acc))


def keras_coeffs(mean: Tensor, m2: Tensor, count: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                 adj_scale: Optional[Tensor], adj_bias: Optional[Tensor], moving_mean: Tensor,
                 moving_variance: Tensor, moving_stddev: Optional[Tensor], renorm_mean: Optional[Tensor],
                 renorm_stddev: Optional[Tensor], ghosts: int, momentum: float, renorm_momentum: float, eps: float,
                 rmin: Optional[float] = None, rmax: Optional[float] = None, dmax: Optional[float] = None,
                 always_update: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`keras_finalize` straight from :func:`batch_stats`' per-ghost Welford states, fused
    with the apply step's coefficients.

    ``mean``, ``m2``, ``count``: ``ghosts * C`` each (ghost-major). Every moving variable is updated
    in place exactly as :func:`keras_finalize` does with the ghosts' biased variances. Returns
    ``(invstd, weight, bias, r, d)``: ``invstd``, ``weight`` and ``bias`` per (ghost, feature), for
    ``normalize(input, mean, invstd, weight, bias, axis, ghosts)``, where ``weight`` / ``bias``
    compose, as tf_keras does, the adjustment's ``(adj_scale, adj_bias)`` with ``(gamma, beta)``
    and then renorm's ``(r, d)``: ``weight = r * adj_scale * gamma``, ``bias = d * adj_scale * gamma
    + adj_bias * gamma + beta`` (missing factors drop out). No gradient (the layer's autograd node
    differentiates through the composition).
    """
    return _ops.keras_coeffs.default(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                                     moving_stddev, renorm_mean, renorm_stddev, int(ghosts), float(momentum),
                                     float(renorm_momentum), float(eps), None if rmin is None else float(rmin),
                                     None if rmax is None else float(rmax), None if dmax is None else float(dmax),
                                     bool(always_update))


def batch_stats(input: Tensor, axis: Sequence[int], mask: Optional[Tensor] = None,
                ghosts: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """Local per-feature Welford state: ``(mean, m2, count)``, each ``(C,)``.

    ``mask``: a bool (or 0/1 uint8) tensor broadcastable to ``input``; the statistics are then the
    weighted moments of the unmasked elements (``count`` = their number per feature).
    ``ghosts``: tf_keras's ghost batches (sample ``n`` in ghost ``n % ghosts``); one state per
    (ghost, feature), ``ghosts * C`` entries, ghost-major. No copy of the input for channels-last
    layouts (ghost rows) nor for layouts where the batch dim can be split next to the features.
    """
    return _ops.batch_stats.default(input, [int(a) for a in axis], mask, int(ghosts))


def gather_stats(mean: Tensor, m2: Tensor, count: Tensor, running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], momentum: float, eps: float,
                 unbiased_running_var: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge ``W`` states (``(W, C)`` each; rows in order) into ``(mean, invstd, count)``.

    Running statistics, when given, are updated in place (torch's momentum convention), except
    for features whose total count is 0, which keep their running statistics.
    """
    return _ops.gather_stats.default(mean, m2, count, running_mean, running_var, float(momentum), float(eps),
                             bool(unbiased_running_var))


def normalize(input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              axis: Sequence[int], ghosts: int = 1) -> Tensor:
    """``(input - mean) * invstd * weight + bias`` with per-feature (per ghost and feature) statistics."""
    return _ops.normalize.default(input, mean, invstd, weight, bias, [int(a) for a in axis], int(ghosts))


def grad_sums(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
              axis: Sequence[int], ghosts: int = 1) -> Tuple[Tensor, Tensor]:
    """Local ``(sum(dy), sum(dy * (x - mean)))`` per feature (per ghost and feature)."""
    return _ops.grad_sums.default(grad_out, input, mean, invstd, [int(a) for a in axis], int(ghosts))


def grad_input(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
               sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor, axis: Sequence[int],
               mask: Optional[Tensor] = None, ghosts: int = 1) -> Tensor:
    """Training grad_input from (e.g. all-reduced) sums and total per-feature counts.

    With the ``mask`` ``m`` of masked statistics (and their counts): the gradient through the
    weighted moments, ``weight * invstd * (dy - m * (sum_dy + (x - mean) * invstd^2 * sum_dy_xmu) / count)``
    (the sums run over every element; only the unmasked ones moved the statistics).
    """
    return _ops.grad_input.default(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                           [int(a) for a in axis], mask, int(ghosts))

