"""Staged operators: the fused forward / backward split at the points where statistics cross a
process boundary (synchronized batch norm) or where a composition needs them.

Forward:  ``batch_stats`` (local Welford state per feature) -> exchange -> ``gather_stats``
(Chan merge of W states in a fixed order, running statistics update) -> ``normalize``.
Backward: ``grad_sums`` (local sum(dy), sum(dy * (x - mean))) -> all-reduce -> ``grad_input``.

All per-feature outputs are flat ``(C,)`` tensors in the accumulation dtype (fp32; fp64 for fp64
input). None of them synchronizes with the host.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .ops import (_acc_dtype, _check_backward, _check_defined, _check_disjoint, _check_feature, _check_finite,
                  _check_flat, _check_floating, _check_forward, _check_ghost_entries, _check_grad_out, _check_mask,
                  _check_stat_triple, _check_staged_eps, _num, _plan_ghosts, _shape, _v, as_axes, as_float, as_int,
                  check_same_device)

__all__ = ["batch_stats", "gather_stats", "normalize", "grad_sums", "grad_input", "ghost_backward", "keras_finalize",
           "keras_coeffs", "keras_forward", "keras_grads", "keras_backward"]

_ops = torch.ops.bn_cuda


# Fake kernels: the real kernels' output shapes and dtypes (per-feature outputs in the accumulation
# dtype), after the argument checks of their C++ preparation (csrc/common/staged.cpp prepare_*), in
# its order, through the helpers of bn_cuda/ops.py: a meta tensor mixed with real ones, a call on
# meta tensors or a compiled graph fails as the eager call does.


@torch.library.register_fake("bn_cuda::batch_stats")
def _batch_stats_fake(input, axis, mask=None, ghosts=1):
    _check_defined(input, "input")
    check_same_device(input, mask=mask)
    _, c = _plan_ghosts(input, axis, ghosts)
    _check_mask(mask, input)
    _check_floating(input, "input")
    acc = _acc_dtype(input.dtype)
    return tuple(input.new_empty((c * ghosts,), dtype=acc) for _ in range(3))


@torch.library.register_fake("bn_cuda::gather_stats")
def _gather_stats_fake(mean, m2, count, running_mean, running_var, momentum, eps, unbiased_running_var=True):
    if mean is not None and mean.dim() not in (1, 2):
        raise ValueError(f"bn_cuda.gather_stats: mean must be (C,) or (W, C), got shape {_shape(mean.shape)}")
    _check_stat_triple("gather_stats", mean, "mean", m2, "m2", count)
    check_same_device(mean, m2=m2, count=count, running_mean=running_mean, running_var=running_var)
    _check_staged_eps("gather_stats", eps, mean.dtype)
    c = mean.shape[-1]
    source = f"mean of shape {_shape(mean.shape)} has C = {_v(c)} features"
    _check_flat(running_mean, "running_mean", "gather_stats", c, source, mutated=True)
    _check_flat(running_var, "running_var", "gather_stats", c, source, mutated=True)
    _check_disjoint("gather_stats", running_mean=running_mean, running_var=running_var)
    return tuple(mean.new_empty((c,), dtype=_acc_dtype(mean.dtype)) for _ in range(3))


@torch.library.register_fake("bn_cuda::normalize")
def _normalize_fake(input, mean, invstd, weight, bias, axis, ghosts=1):
    _check_defined(mean, "mean", "normalize")
    _check_defined(invstd, "invstd", "normalize")
    _check_defined(input, "input")
    check_same_device(input, mean=mean, invstd=invstd, weight=weight, bias=bias)
    plan, c = _plan_ghosts(input, axis, ghosts, per_feature=(mean, invstd, weight, bias))
    for name, t in (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias)):
        _check_ghost_entries(ghosts, c, input, axis, name, t)
    # (the training preparation without running statistics; eps is unused by normalize)
    _check_forward(input, weight, bias, None, None, True, 1.0, axis, plan=plan)
    _check_feature(mean, "mean", plan)
    _check_feature(invstd, "invstd", plan)
    return torch.empty_like(input)


def _check_local_backward(op: str, grad_out, input, mean, invstd, weight, axis, ghosts) -> int:
    """prepare_local_backward's checks (grad_sums, ghost_backward). Returns C."""
    for t, name in ((grad_out, "grad_out"), (mean, "mean"), (invstd, "invstd")):
        _check_defined(t, name, op)
    _check_defined(input, "input")
    check_same_device(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight)
    plan, c = _plan_ghosts(input, axis, ghosts, per_feature=(mean, invstd, weight))
    _check_grad_out(grad_out, input)
    for name, t in (("mean", mean), ("invstd", invstd), ("weight", weight)):
        _check_ghost_entries(ghosts, c, input, axis, name, t)
    _check_backward(grad_out, input, weight, mean, invstd, axis, plan=plan, mean_name="mean", invstd_name="invstd")
    return c


@torch.library.register_fake("bn_cuda::grad_sums")
def _grad_sums_fake(grad_out, input, mean, invstd, axis, ghosts=1):
    c = _check_local_backward("grad_sums", grad_out, input, mean, invstd, None, axis, ghosts)
    acc = _acc_dtype(input.dtype)
    return input.new_empty((c * ghosts,), dtype=acc), input.new_empty((c * ghosts,), dtype=acc)


@torch.library.register_fake("bn_cuda::grad_input")
def _grad_input_fake(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis, mask=None,
                     ghosts=1):
    stats = (("mean", mean), ("invstd", invstd), ("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu), ("count", count))
    _check_defined(grad_out, "grad_out", "grad_input")
    for name, t in stats:
        _check_defined(t, name, "grad_input")
    _check_defined(input, "input")
    check_same_device(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight, sum_dy=sum_dy,
                      sum_dy_xmu=sum_dy_xmu, count=count, mask=mask)
    plan, c = _plan_ghosts(input, axis, ghosts, per_feature=(mean, invstd, weight, sum_dy, sum_dy_xmu, count))
    _check_mask(mask, input)
    _check_grad_out(grad_out, input)
    for name, t in stats + (("weight", weight),):
        _check_ghost_entries(ghosts, c, input, axis, name, t)
    _check_backward(grad_out, input, weight, mean, invstd, axis, plan=plan, mean_name="mean", invstd_name="invstd")
    for name, t in stats[2:]:
        _check_feature(t, name, plan)
    return torch.empty_like(input)


def _check_keras_epilogue(op: str, mean, second, second_name: str, count, moving_mean, moving_variance,
                          moving_stddev, renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin,
                          rmax, dmax):
    """prepare_keras_epilogue's checks (keras_finalize: second = var; keras_coeffs: m2). Returns C."""
    for t, name in ((mean, "mean"), (moving_mean, "moving_mean"), (moving_variance, "moving_variance")):
        _check_defined(t, name, op)
    torch._check_value(ghosts >= 1, lambda: f"bn_cuda.{op}: ghosts must be >= 1, got {_v(ghosts)}")
    torch._check_value(mean.dim() == 1 and mean.shape[0] % ghosts == 0,
                       lambda: f"bn_cuda.{op}: mean must be flat with ghosts * C entries, got shape "
                               f"{_shape(mean.shape)} for ghosts={_v(ghosts)}")
    _check_stat_triple(op, mean, "mean", second, second_name, count)
    check_same_device(mean, **{second_name: second}, count=count, moving_mean=moving_mean,
                      moving_variance=moving_variance, moving_stddev=moving_stddev, renorm_mean=renorm_mean,
                      renorm_stddev=renorm_stddev)
    _check_staged_eps(op, eps, mean.dtype)
    _check_finite(op, "momentum", momentum)
    _check_finite(op, "renorm_momentum", renorm_momentum)
    for name, v in (("rmin", rmin), ("rmax", rmax)):
        if v is not None and v != v:  # (nan)
            raise ValueError(f"bn_cuda.{op}: {name} must be a number, got nan")
    if dmax is not None and not dmax >= 0:
        raise ValueError(f"bn_cuda.{op}: dmax must be >= 0, got {_num(dmax)}")
    if rmin is not None and rmax is not None and not rmin <= rmax:
        raise ValueError(f"bn_cuda.{op}: rmin must be <= rmax, got rmin={_num(rmin)}, rmax={_num(rmax)}")
    renorm = moving_stddev is not None
    if renorm != (renorm_mean is not None) or renorm != (renorm_stddev is not None):
        raise ValueError(f"bn_cuda.{op}: moving_stddev, renorm_mean and renorm_stddev go together (renorm)")
    c = mean.shape[0] // ghosts
    updated = {"moving_mean": moving_mean, "moving_variance": moving_variance, "moving_stddev": moving_stddev,
               "renorm_mean": renorm_mean, "renorm_stddev": renorm_stddev}
    source = _keras_source(mean, ghosts)
    for name, t in updated.items():
        _check_flat(t, name, op, c, source, mutated=True)
    _check_disjoint(op, **updated)
    return c


@torch.library.register_fake("bn_cuda::ghost_backward")
def _ghost_backward_fake(grad_out, input, mean, invstd, weight, axis, ghosts, output_mask, op="ghost_backward"):
    c = _check_local_backward(op, grad_out, input, mean, invstd, weight, axis, ghosts)
    acc = _acc_dtype(input.dtype)
    f = c * ghosts
    return (torch.empty_like(input) if output_mask[0] else input.new_empty((0,)),
            input.new_empty((f if output_mask[1] else 0,), dtype=acc),
            input.new_empty((f if output_mask[2] else 0,), dtype=acc))


def _keras_source(mean, ghosts, name: str = "mean") -> str:
    """FlatFeatures::source: where the Keras ops' C comes from, for their size errors."""
    return (f"{name} has ghosts * C = {_v(mean.numel())} entries with ghosts={_v(ghosts)}, so C = "
            f"{_v(mean.numel() // ghosts)}")


@torch.library.register_fake("bn_cuda::keras_finalize")
def _keras_finalize_fake(mean, var, count, moving_mean, moving_variance, moving_stddev, renorm_mean,
                         renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax, dmax, always_update):
    c = _check_keras_epilogue("keras_finalize", mean, var, "var", count, moving_mean, moving_variance, moving_stddev,
                              renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax, dmax)
    acc = _acc_dtype(mean.dtype)
    return mean.new_empty((c,), dtype=acc), mean.new_empty((c,), dtype=acc)


def _check_updated_need_no_grad(who: str, **updated: Optional[Tensor]) -> None:
    """Statistics updated in place that require grad (with grad mode on): refused by name, as the
    functional ops refuse them (the raw op's autograd fallback would say only "a leaf Variable that
    requires grad is being used in an in-place operation")."""
    if not torch.is_grad_enabled():
        return
    for name, t in updated.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{who}: {name} requires grad, but it is a statistic the op updates in place, not a "
                               f"differentiable input; pass {name}.detach() or a tensor that does not require grad")


def _keras_scalars(op: str, ghosts, momentum, renorm_momentum, eps, rmin, rmax, dmax) -> tuple:
    """The scalar arguments of keras_finalize / keras_coeffs, checked for type (the op checks values)."""
    who = f"bn_cuda.staged.{op}"
    opt = {n: None if v is None else as_float(who, n, v) for n, v in (("rmin", rmin), ("rmax", rmax), ("dmax", dmax))}
    return (as_int(who, "ghosts", ghosts), as_float(who, "momentum", momentum),
            as_float(who, "renorm_momentum", renorm_momentum), as_float(who, "eps", eps), opt["rmin"], opt["rmax"],
            opt["dmax"])


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
    _check_updated_need_no_grad("bn_cuda.staged.keras_finalize", moving_mean=moving_mean,
                                moving_variance=moving_variance, moving_stddev=moving_stddev, renorm_mean=renorm_mean,
                                renorm_stddev=renorm_stddev)
    return _ops.keras_finalize.default(mean, var, count, moving_mean, moving_variance, moving_stddev, renorm_mean,
                                       renorm_stddev, *_keras_scalars("keras_finalize", ghosts, momentum,
                                                                      renorm_momentum, eps, rmin, rmax, dmax),
                                       bool(always_update))


@torch.library.register_fake("bn_cuda::keras_coeffs")
def _keras_coeffs_fake(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                       moving_stddev, renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax,
                       dmax, always_update):
    c = _check_keras_epilogue("keras_coeffs", mean, m2, "m2", count, moving_mean, moving_variance, moving_stddev,
                              renorm_mean, renorm_stddev, ghosts, momentum, renorm_momentum, eps, rmin, rmax, dmax)
    check_same_device(mean, gamma=gamma, beta=beta, adj_scale=adj_scale, adj_bias=adj_bias)
    source = _keras_source(mean, ghosts)
    for name, t in (("gamma", gamma), ("beta", beta), ("adj_scale", adj_scale), ("adj_bias", adj_bias)):
        _check_flat(t, name, "keras_coeffs", c, source)
    acc = _acc_dtype(mean.dtype)
    f = mean.shape[0]
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
    _check_updated_need_no_grad("bn_cuda.staged.keras_coeffs", moving_mean=moving_mean,
                                moving_variance=moving_variance, moving_stddev=moving_stddev, renorm_mean=renorm_mean,
                                renorm_stddev=renorm_stddev)
    return _ops.keras_coeffs.default(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                                     moving_stddev, renorm_mean, renorm_stddev,
                                     *_keras_scalars("keras_coeffs", ghosts, momentum, renorm_momentum, eps, rmin, rmax,
                                                     dmax),
                                     bool(always_update))


@torch.library.register_fake("bn_cuda::keras_forward")
def _keras_forward_fake(input, axis, mask, ghosts, gamma, beta, adj_scale, adj_bias, moving_mean, moving_variance,
                        moving_stddev, renorm_mean, renorm_stddev, momentum, renorm_momentum, eps, rmin, rmax, dmax,
                        always_update):
    # (the three ops' checks in their order: keras_forward runs them one after the other)
    mean, m2, count = _batch_stats_fake(input, axis, mask, ghosts)
    invstd, weight, bias, r, d = _keras_coeffs_fake(mean, m2, count, gamma, beta, adj_scale, adj_bias, moving_mean,
                                                    moving_variance, moving_stddev, renorm_mean, renorm_stddev, ghosts,
                                                    momentum, renorm_momentum, eps, rmin, rmax, dmax, always_update)
    return _normalize_fake(input, mean, invstd, weight, bias, axis, ghosts), mean, invstd, weight, count, r, d


@torch.library.register_fake("bn_cuda::keras_grads")
def _keras_grads_fake(d_scale, d_shift, r, d, gamma, adj_scale, adj_bias, beta, ghosts, output_mask, op="keras_grads"):
    _check_defined(d_scale, "d_scale", op)
    _check_defined(d_shift, "d_shift", op)
    torch._check_value(ghosts >= 1, lambda: f"bn_cuda.{op}: ghosts must be >= 1, got {_v(ghosts)}")
    torch._check_value(d_scale.dim() == 1 and d_scale.shape[0] % ghosts == 0,
                       lambda: f"bn_cuda.{op}: d_scale must be flat with ghosts * C entries, got shape "
                               f"{_shape(d_scale.shape)} for ghosts={_v(ghosts)}")
    if d_shift.shape != d_scale.shape:
        raise RuntimeError(f"bn_cuda.{op}: d_scale and d_shift must have the same shape, got "
                           f"{_shape(d_scale.shape)} and {_shape(d_shift.shape)}")
    _check_floating(d_scale, "d_scale")
    _check_floating(d_shift, "d_shift")
    check_same_device(d_scale, d_shift=d_shift, r=r, d=d, gamma=gamma, adj_scale=adj_scale, adj_bias=adj_bias)
    if (r is None) != (d is None):
        raise ValueError(f"bn_cuda.{op}: r and d go together (renorm)")
    c = d_scale.shape[0] // ghosts
    source = _keras_source(d_scale, ghosts, "d_scale")
    for name, t in (("r", r), ("d", d), ("gamma", gamma), ("adj_scale", adj_scale), ("adj_bias", adj_bias)):
        _check_flat(t, name, op, c, source)
    acc = _acc_dtype(d_scale.dtype)
    wanted = (gamma is not None, bool(beta), adj_scale is not None, adj_bias is not None)
    return tuple(d_scale.new_empty((c if (m and w) else 0,), dtype=acc) for m, w in zip(output_mask, wanted))


@torch.library.register_fake("bn_cuda::keras_backward")
def _keras_backward_fake(grad_out, input, mean, invstd, weight, axis, ghosts, r, d, gamma, adj_scale, adj_bias, beta,
                         output_mask):
    # (the op's own order: ghost_backward's checks, then keras_grads' on its per-(ghost, feature) sums)
    op = "keras_backward"
    gi, ds, dh = _ghost_backward_fake(grad_out, input, mean, invstd, weight, axis, ghosts,
                                      (output_mask[0], True, True), op)
    return (gi,) + _keras_grads_fake(ds, dh, r, d, gamma, adj_scale, adj_bias, beta, ghosts, tuple(output_mask[1:]),
                                     op)


def keras_grads(d_scale: Tensor, d_shift: Tensor, r: Optional[Tensor], d: Optional[Tensor], gamma: Optional[Tensor],
                adj_scale: Optional[Tensor], adj_bias: Optional[Tensor], beta: bool, ghosts: int = 1,
                output_mask: Sequence[bool] = (True, True, True, True)) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`keras_coeffs`' composition of the apply step's scale and shift.

    ``d_scale``, ``d_shift``: d loss / d (scale, shift) per (ghost, feature), ``ghosts * C`` each
    (:func:`ghost_backward`'s ``grad_weight`` / ``grad_bias``). Returns the gradients of
    ``(gamma, beta, adj_scale, adj_bias)`` through ``scale = r * adj_scale * gamma``, ``shift = d *
    adj_scale * gamma + adj_bias * gamma + beta`` (missing factors drop out; ``r``, ``d``: renorm's,
    constant as tf_keras's ``stop_gradient`` makes them; ``beta``: whether there is one), summed over
    the ghosts, ``C`` each in the accumulation dtype. An output not in ``output_mask``, or whose
    factor is absent, is empty. Each product and sum is rounded on its own, as the same tensor ops
    would round them; the ghost sum runs in a fixed order (in sequence on CPU, a fixed warp tree on
    CUDA), not necessarily :func:`torch.sum`'s.
    """
    who = "bn_cuda.staged.keras_grads"
    mask = [bool(m) for m in output_mask]
    if len(mask) != 4:
        raise ValueError(f"{who}: output_mask must have 4 entries, got {len(mask)}")
    return _ops.keras_grads.default(d_scale, d_shift, r, d, gamma, adj_scale, adj_bias, bool(beta),
                                    as_int(who, "ghosts", ghosts), mask)


def keras_forward(input: Tensor, axis: Union[int, Sequence[int]], mask: Optional[Tensor], ghosts: int,
                  gamma: Optional[Tensor], beta: Optional[Tensor], adj_scale: Optional[Tensor],
                  adj_bias: Optional[Tensor], moving_mean: Tensor, moving_variance: Tensor,
                  moving_stddev: Optional[Tensor], renorm_mean: Optional[Tensor], renorm_stddev: Optional[Tensor],
                  momentum: float, renorm_momentum: float, eps: float, rmin: Optional[float] = None,
                  rmax: Optional[float] = None, dmax: Optional[float] = None,
                  always_update: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`batch_stats`, :func:`keras_coeffs` and :func:`normalize` in one call: the training
    forward of ``bn_cuda.BatchNormalization`` on the staged kernels (ghost batches, renorm, an
    adjustment, a mask). Returns ``(output, mean, invstd, weight, count, r, d)`` as those ops return
    them, bitwise; the moving variables are updated in place. On CUDA the epilogue kernel also
    writes the apply step's coefficients (four kernels instead of five). No gradient: the layer's
    autograd node differentiates through it (:func:`ghost_backward`, :func:`keras_grads`)."""
    who = "bn_cuda.staged.keras_forward"
    if not isinstance(input, Tensor):
        raise TypeError(f"{who}: input must be a tensor, got {type(input).__name__}")
    _check_updated_need_no_grad(who, moving_mean=moving_mean, moving_variance=moving_variance,
                                moving_stddev=moving_stddev, renorm_mean=renorm_mean, renorm_stddev=renorm_stddev)
    g, mom, rmom, e, lo, hi, dm = _keras_scalars("keras_forward", ghosts, momentum, renorm_momentum, eps, rmin, rmax,
                                                 dmax)
    return _ops.keras_forward.default(input, as_axes(who, axis), mask, g, gamma, beta, adj_scale, adj_bias,
                                      moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev, mom,
                                      rmom, e, lo, hi, dm, bool(always_update))


def batch_stats(input: Tensor, axis: Union[int, Sequence[int]], mask: Optional[Tensor] = None,
                ghosts: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """Local per-feature Welford state: ``(mean, m2, count)``, each ``(C,)``.

    ``mask``: a bool (or 0/1 uint8) tensor broadcastable to ``input``; the statistics are then the
    weighted moments of the unmasked elements (``count`` = their number per feature).
    ``ghosts``: tf_keras's ghost batches (sample ``n`` in ghost ``n % ghosts``); one state per
    (ghost, feature), ``ghosts * C`` entries, ghost-major. No copy of the input for channels-last
    layouts (ghost rows) nor for layouts where the batch dim can be split next to the features.
    """
    who = "bn_cuda.staged.batch_stats"
    if not isinstance(input, Tensor):  # (the op's only tensor: without it the dispatcher finds no kernel)
        raise TypeError(f"{who}: input must be a tensor, got {type(input).__name__}")
    return _ops.batch_stats.default(input, as_axes(who, axis), mask, as_int(who, "ghosts", ghosts))


def gather_stats(mean: Tensor, m2: Tensor, count: Tensor, running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], momentum: float, eps: float,
                 unbiased_running_var: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge ``W`` states (``(W, C)`` each; rows in order) into ``(mean, invstd, count)``.

    Running statistics, when given, are updated in place (torch's momentum convention), except
    for features whose total count is 0, which keep their running statistics.
    """
    who = "bn_cuda.staged.gather_stats"
    _check_updated_need_no_grad(who, running_mean=running_mean, running_var=running_var)
    return _ops.gather_stats.default(mean, m2, count, running_mean, running_var, as_float(who, "momentum", momentum),
                                     as_float(who, "eps", eps), bool(unbiased_running_var))


def normalize(input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              axis: Union[int, Sequence[int]], ghosts: int = 1) -> Tensor:
    """``(input - mean) * invstd * weight + bias`` with per-feature (per ghost and feature) statistics.

    With ``ghosts`` > 1 the per-(ghost, feature) tensors may be flat ``(ghosts * C,)``, ghost-major,
    ``(ghosts, *feature dims)`` or the rank-preserving ``(1, ghosts, ...)`` of the batch split as
    ``(n / ghosts, ghosts, ...)``, whatever the input's layout (the other staged ops alike)."""
    who = "bn_cuda.staged.normalize"
    return _ops.normalize.default(input, mean, invstd, weight, bias, as_axes(who, axis), as_int(who, "ghosts", ghosts))


def grad_sums(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
              axis: Union[int, Sequence[int]], ghosts: int = 1) -> Tuple[Tensor, Tensor]:
    """Local ``(sum(dy), sum(dy * (x - mean)))`` per feature (per ghost and feature)."""
    who = "bn_cuda.staged.grad_sums"
    return _ops.grad_sums.default(grad_out, input, mean, invstd, as_axes(who, axis), as_int(who, "ghosts", ghosts))


def grad_input(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
               sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor, axis: Union[int, Sequence[int]],
               mask: Optional[Tensor] = None, ghosts: int = 1) -> Tensor:
    """Training grad_input from (e.g. all-reduced) sums and total per-feature counts.

    With the ``mask`` ``m`` of masked statistics (and their counts): the gradient through the
    weighted moments, ``weight * invstd * (dy - m * (sum_dy + (x - mean) * invstd^2 * sum_dy_xmu) / count)``
    (the sums run over every element; only the unmasked ones moved the statistics).
    """
    who = "bn_cuda.staged.grad_input"
    return _ops.grad_input.default(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                                   as_axes(who, axis), mask, as_int(who, "ghosts", ghosts))


def ghost_backward(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                   axis: Union[int, Sequence[int]], ghosts: int = 1,
                   output_mask: Sequence[bool] = (True, True, True)) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`grad_sums` and :func:`grad_input` of the local statistics in one pass, when nothing is
    exchanged between them (one process; no mask).

    ``mean`` / ``invstd``: :func:`batch_stats`' unmasked statistics of ``input`` (per ghost and
    feature); ``weight``: normalize's. Returns ``(grad_input, grad_weight, grad_bias)`` with
    ``grad_weight = sum(grad_out * (input - mean)) * invstd`` and ``grad_bias = sum(grad_out)`` per
    (ghost, feature), ``ghosts * C`` entries each in the accumulation dtype: bitwise what
    ``grad_sums`` (then ``sum_dy_xmu * invstd``) and ``grad_input`` with batch_stats' counts give.
    Outputs not in ``output_mask`` are empty.
    """
    who = "bn_cuda.staged.ghost_backward"
    mask = [bool(m) for m in output_mask]
    if len(mask) != 3:
        raise ValueError(f"{who}: output_mask must have 3 entries, got {len(mask)}")
    return _ops.ghost_backward.default(grad_out, input, mean, invstd, weight, as_axes(who, axis),
                                       as_int(who, "ghosts", ghosts), mask)


def keras_backward(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                   axis: Union[int, Sequence[int]], ghosts: int, r: Optional[Tensor], d: Optional[Tensor],
                   gamma: Optional[Tensor], adj_scale: Optional[Tensor], adj_bias: Optional[Tensor], beta: bool,
                   output_mask: Sequence[bool] = (True, True, True, True, True)
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`ghost_backward` then :func:`keras_grads` on its per-(ghost, feature) ``grad_weight`` /
    ``grad_bias``, in one call: the fused Keras step's backward without a mask.

    Returns ``(grad_input, grad_gamma, grad_beta, grad_adj_scale, grad_adj_bias)``, bitwise what
    the two ops return; ``output_mask``: which of (input, gamma, beta, adj_scale, adj_bias) to
    compute (the others are empty). On CUDA, with at most 16 ghosts, the sums' finalize and
    keras_grads run as one kernel: three kernels in all, as the plain layer's backward in general
    (one for a small channels-first input, backward_single_cf_kernel).
    """
    who = "bn_cuda.staged.keras_backward"
    mask = [bool(m) for m in output_mask]
    if len(mask) != 5:
        raise ValueError(f"{who}: output_mask must have 5 entries, got {len(mask)}")
    return _ops.keras_backward.default(grad_out, input, mean, invstd, weight, as_axes(who, axis),
                                       as_int(who, "ghosts", ghosts), r, d, gamma, adj_scale, adj_bias, bool(beta),
                                       mask)

