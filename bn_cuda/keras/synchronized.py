"""``BatchNormalization(synchronized=True)`` across processes: the training step on bn_cuda's staged
kernels, and the all-reduce hook of the composite (``fused=False``) path.

Statistics are those of the global batch over every process of the group, computed as by
:mod:`bn_cuda.distributed` (one all-gather of per-feature Welford states, Chan's merge on the
device). tf_keras's synchronized layer takes its non-fused path, so the moving variance is fed the
*biased* global variance.

- Ghost batches: rank ``r`` splits its batch into ``G_r = B_r // virtual_batch_size`` ghosts as
  tf_keras does (sample ``i`` in ghost ``i % G_r``). Global ghost ``g`` is the union of every rank's
  ghost ``g``: each rank sends one state per (ghost, feature), padded with empty states up to the
  largest ``G_r``, and the states are merged per ghost. With equal batch sizes this is
  single-process ghost batching of the concatenated batch with ``virtual_batch_size * W``. The
  moving statistics get the average over the global ghosts (one update per step, as tf_keras).
  Ghost counts depend on each rank's batch, so they are exchanged on every call (one small
  all-gather read on the host: this path cannot be captured in a CUDA graph).
- Renorm: ``r`` and ``d`` come from the global statistics, so every rank applies the same
  correction and keeps the same renorm statistics.
- A global batch with no values leaves every moving statistic unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _C, distributed, ops, staged
from . import composite

if TYPE_CHECKING:
    from ..layers import BatchNormalization

__all__ = ["train_step", "AllReduceStats"]


def _native_ok(x: Tensor) -> bool:
    """Whether the C++ step may run: eager mode on a plain tensor (torch.compile, tracing modes and
    tensor subclasses take the Python path, which they can see through)."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled())


def _functorch_blocks(x: Tensor, tensors: Tuple[Optional[Tensor], ...]) -> Optional[str]:
    """Inside a torch.func transform, why the C++ step must not run, or None. Its node is once
    differentiable and serves a single ``torch.func.grad`` level with nothing outside it that could
    differentiate its result: nested transforms, and wrapped inputs that autograd outside the
    transform tracks, would get a silent zero for the second derivative. ``tensors``: the other
    differentiable inputs (gamma, beta, the adjustment's outputs)."""
    functorch = torch._C._functorch
    depth = functorch.get_dynamic_layer_stack_depth()
    if depth == 0:
        return None
    if depth > 1:
        return f"{depth} nested torch.func transform levels"
    kind = functorch.peek_interpreter_stack().key()
    if kind == functorch.TransformType.Vmap:
        return "torch.vmap (the step's ops have no batching rule)"
    if kind != functorch.TransformType.Grad:
        return None  # (jvp: the step refuses forward-mode AD itself)
    for t in (x,) + tensors:
        if t is not None and functorch.is_gradtrackingtensor(t):
            inner = functorch.get_unwrapped(t)
            if functorch.is_functorch_wrapped_tensor(inner) or inner.requires_grad:
                return ("inputs of torch.func.grad that autograd outside the transform differentiates (they "
                        "require grad there: pass them detached, e.g. {k: v.detach() for k, v in "
                        "model.named_parameters()}, unless a gradient through the transform is wanted)")
    return None


def _opt_float(v: Any) -> Optional[float]:
    return None if v is None else float(v)


def _per_ghost(t: Optional[Tensor], ghosts: int) -> Optional[Tensor]:
    """A flat per-feature tensor repeated for each ghost (ghost-major, as the ghost view's features)."""
    return None if t is None else t.reshape(1, -1).expand(ghosts, -1).reshape(-1)


def train_step(layer: "BatchNormalization", x: Tensor, group: Any, world_size: int,
               adjustment: Optional[Tuple[Tensor, Tensor]] = None, mask: Optional[Tensor] = None) -> Tensor:
    """One training step of ``layer`` on its part ``x`` of the global batch, on the staged kernels.

    ``group=distributed.LOCAL`` with ``world_size=1`` is the single-process fused path of ghost
    batches, renorm and adjustment (no collective). ``adjustment``: the adjustment callable's
    ``(scale, bias)`` as flat per-feature tensors (see ``flat_adjustment``). ``mask``: tf_keras's
    mask (``x.shape[:-1]``); the statistics are then the masked (weighted) moments and, as in
    tf_keras, the moving statistics move towards them even for a feature with no unmasked value.
    """
    axes: List[int] = list(layer._axes)
    native = world_size == 1 and _native_ok(x)
    features = 0 if native else ops.num_features(x.shape, axes)  # (the C++ step counts them itself)
    check = layer._feature_check
    ghosts, global_ghosts = None, 1
    if layer.virtual_batch_size is None:
        if world_size > 1:
            check(features, group, x.device)
    else:
        local = x.shape[0] // layer.virtual_batch_size
        global_ghosts = check.ghosts(features, local, group, x.device) if world_size > 1 else local
        if global_ghosts > 0:  # (all-empty: the per-feature path below; its counts are 0)
            # Sample i in ghost i % ghosts (tf_keras's reshape), run by the staged ops; an empty
            # local batch runs as one (empty) ghost, padded like the others.
            ghosts = max(local, 1)
    weights = None if mask is None else mask.unsqueeze(-1)  # broadcast over the last (feature) axis
    eps = layer.epsilon
    if native:
        # The same staged ops in C++ (keras_step.cpp): bitwise the same, without this glue's host time.
        # (gamma / beta and the contiguous moving variables as they are: the C++ step flattens
        # them, cheaper than a Python reshape, or than _flat's cached view of a ghost layer's
        # (1, 1, C)-shaped buffers; a non-contiguous one is made contiguous by _flat first.)
        moving = {}
        for n in layer._variables():
            t = layer._raw(n)
            moving[n] = t if t.is_contiguous() else layer._flat(n)
        clip = layer.renorm_clipping or {}
        adj_s, adj_b = adjustment if adjustment is not None else (None, None)
        if torch._C._functorch.get_dynamic_layer_stack_depth():
            blocked = _functorch_blocks(x, (layer._raw("gamma"), layer._raw("beta"), adj_s, adj_b))
            if blocked:
                raise NotImplementedError(
                    "bn_cuda.BatchNormalization's training step with ghost batches, renorm, an adjustment or a "
                    "mask supports one torch.func transform, first-order torch.func.grad, with no autograd outside "
                    f"it through its inputs (its backward is once differentiable); got {blocked}")
        return _C.keras_train_step(
            x, axes, ghosts or 0, layer._raw("gamma"), layer._raw("beta"), adj_s, adj_b, moving["moving_mean"],
            moving["moving_variance"],
            moving.get("moving_stddev"), moving.get("renorm_mean"), moving.get("renorm_stddev"), bool(layer.renorm),
            *layer._keras_momenta(), float(eps), _opt_float(clip.get("rmin")),
            _opt_float(clip.get("rmax")), _opt_float(clip.get("dmax")), weights,
            weights is not None and x.numel() > 0)
    gamma, beta = layer._flat("gamma"), layer._flat("beta")
    distributed.check_savable(x, gamma, beta, *(adjustment or ()), weight_name="gamma")
    if adjustment is not None:  # tf_keras: adjustment first, then gamma / beta
        gamma, beta = composite.compose_transforms(adjustment[0], adjustment[1], gamma, beta)

    if ghosts is None and not layer.renorm and weights is None and adjustment is None:
        # The plain case: the running statistics are updated inside gather_stats. (An adjustment
        # goes through keras_finalize below: tf_keras's moving-average formula, as the C++ step.)
        mean, invstd, count = distributed.sync_batch_stats(
            x, axes, layer._flat("moving_mean"), layer._flat("moving_variance"), 1.0 - layer._keras_momenta()[0],
            eps, group, world_size, unbiased_running_var=False)
        return distributed.SyncNormalize.apply(x, gamma, beta, mean, invstd, count, axes, group)

    pad = None if ghosts is None else global_ghosts * features
    mean, var, invstd, count = distributed.sync_moments(x, axes, eps, group, world_size, pad_to=pad,
                                                        mask=weights, ghosts=ghosts or 1)
    # Ghost averaging, renorm's r and d and every moving-variable update: one device step.
    moving = {n: layer._flat(n) for n in layer._variables()}
    clip = layer.renorm_clipping or {}
    r, d = staged.keras_finalize(
        mean, var, count, moving["moving_mean"], moving["moving_variance"], moving.get("moving_stddev"),
        moving.get("renorm_mean"), moving.get("renorm_stddev"), global_ghosts if ghosts is not None else 1,
        *layer._keras_momenta(), eps, clip.get("rmin"), clip.get("rmax"), clip.get("dmax"),
        always_update=weights is not None and x.numel() > 0)  # tf_keras moves masked features towards 0 too
    if ghosts is not None:  # this rank's ghosts are the first ones of the global list
        mean, invstd, count = (t[: ghosts * features] for t in (mean, invstd, count))
    scale, offset = gamma, beta
    if layer.renorm:
        scale, offset = composite.compose_transforms(r, d, scale, offset)  # r, d: no gradient
    if ghosts is not None:
        scale, offset = _per_ghost(scale, ghosts), _per_ghost(offset, ghosts)
    return distributed.SyncNormalize.apply(x, scale, offset, mean, invstd, count, axes, group, pad,
                                           weights, ghosts or 1)


def flat_adjustment(layer: "BatchNormalization", x: Tensor, raw: Tuple[Any, Any]) -> Optional[Tuple[Tensor, Tensor]]:
    """The adjustment's outputs ``raw = (scale, bias)`` (of ``layer.adjustment(x.shape)``) as flat
    per-feature tensors, or None when they vary over reduced dims too (then only the composite path
    can apply them)."""
    adj_scale, adj_bias = raw
    stat_shape = tuple(x.shape[i] if i in layer._axes else 1 for i in range(x.dim()))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = []
    for t in (adj_scale, adj_bias):
        t = torch.as_tensor(t, device=x.device)
        if not ops.broadcasts_to(t.shape, stat_shape):
            return None
        flat.append(torch.broadcast_to(t.to(acc), stat_shape).reshape(-1))
    return flat[0], flat[1]


class AllReduceStats:
    """``stats_hook`` of the composite path under synchronization: the all-reduce-sum of the
    stacked local ``(sum, sum of squares, count)``, differentiable (the gradient is all-reduced).

    With ghost batches (``ghost_dim``: the ghost dim of the stacked tensor) the local ghosts are
    padded with zeros up to the largest ghost count of the group; the result then holds every
    global ghost, this rank's first.
    """

    def __init__(self, group: Any, check: distributed.FeatureCountCheck, ghost_dim: Optional[int] = None) -> None:
        self.group, self.check, self.ghost_dim = group, check, ghost_dim

    def __call__(self, local: Tensor) -> Tensor:
        if self.ghost_dim is None:
            self.check(local[0].numel(), self.group, local.device)
            return distributed.all_reduce_sum(local, self.group)
        ghosts = local.shape[self.ghost_dim]
        features = math.prod(s for d, s in enumerate(local.shape) if d not in (0, self.ghost_dim))
        most = self.check.ghosts(features, ghosts, self.group, local.device)
        if most > ghosts:
            pad = [0, 0] * (local.dim() - 1 - self.ghost_dim) + [0, most - ghosts]
            local = torch.nn.functional.pad(local, pad)
        return distributed.all_reduce_sum(local, self.group)
