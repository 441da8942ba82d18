"""Synchronized batch normalization over ``torch.distributed`` (NCCL between GPUs, gloo between CPUs).

Training forward, world size > 1::

    batch_stats  (local Welford state per feature: mean, M2, count)
    -> one all-gather of the packed (3, C) state        (uneven and empty batches: counts travel along)
    -> gather_stats (Chan merge of the W rows in rank order on the device; running statistics update)
    -> normalize

Backward: ``grad_sums`` (local sum(dy), sum(dy * (x - mean))) -> one all-reduce of the packed
(2, C) sums -> ``grad_input``. The weight / bias gradients are the *local* sums; DDP reduces them
across ranks like any other parameter gradient.

Nothing in that path reads a tensor on the host, so it can be captured in a CUDA graph. The one
exception is the feature-count check (:class:`FeatureCountCheck`), a one-integer all-gather that
runs on a layer's first call for each feature count and is cached afterwards: run one step before
capturing. (Keras ghost batches exchange their ghost counts on every call; see
:mod:`bn_cuda.keras.synchronized`.)
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops, staged

__all__ = ["FeatureCountCheck", "all_reduce_sum", "check_savable", "process_group_and_size", "sync_batch_norm",
           "sync_batch_stats", "sync_moments", "SyncNormalize"]

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group


LOCAL = "bn_cuda.local"
"""``group`` value meaning "this process only": the staged-kernel path with no collective (the
single-process fused path of ghost batches, renorm and adjustment)."""


def process_group_and_size(process_group: ProcessGroup = None) -> Tuple[ProcessGroup, int]:
    """``(group, world_size)``; world size 1 when torch.distributed is unavailable or uninitialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


def _all_gather_flat(output: Tensor, input: Tensor, group: ProcessGroup) -> None:
    """Concatenate every rank's ``input`` along dim 0 into ``output`` (rank order)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.x
    gather(output, input, group=group)


class FeatureCountCheck:
    """Checks that every process of a group normalizes the same number of features.

    Packing per-feature states of different lengths into one all-gather would abort the gloo
    process or, over NCCL, hang or read garbage, so the count is exchanged first: a one-integer
    all-gather, done once per (group, feature count) and cached. A layer keeps one instance.

    The cache is keyed by this rank's own count, so a rank whose count changes after the layer's
    first call, while the others' do not, is not caught (the exchange would pair with another
    rank's statistics all-gather), so layers with weights or running statistics check their input
    against their own feature count before any collective.

    With ghost batches the number of ghosts depends on each rank's batch size, so it is exchanged
    on every call (:meth:`ghosts`), together with the feature count.
    """

    def __init__(self, who: str = "bn_cuda") -> None:
        self.who = who
        self._group: ProcessGroup = None
        self._verified: Set[int] = set()

    def __getstate__(self):  # a pickled / deep-copied layer re-checks in its new processes
        return {"who": self.who}

    def __setstate__(self, state) -> None:
        self.__init__(state.get("who", "bn_cuda"))

    def _exchange(self, values: Sequence[int], group: ProcessGroup, device: torch.device) -> List[List[int]]:
        mine = torch.tensor([list(values)], dtype=torch.int64, device=device)
        world = dist.get_world_size(group)
        everyone = mine.new_empty((world, len(values)))
        _all_gather_flat(everyone, mine, group)
        return everyone.tolist()

    def _raise_if_differ(self, features: int, by_rank: List[int], group: ProcessGroup, what: str) -> None:
        if all(f == features for f in by_rank):
            return
        rank = dist.get_rank(group)
        other = next(r for r, f in enumerate(by_rank) if f != features)
        raise RuntimeError(
            f"{self.who}: the processes of the group normalize different numbers of {what}: this process "
            f"(rank {rank}) has {features}, rank {other} has {by_rank[other]} (by rank: {by_rank}). "
            "Every process must run the layer on inputs with the same feature dims.")

    def __call__(self, features: int, group: ProcessGroup, device: torch.device) -> None:
        """Raise a RuntimeError on every rank if the feature counts differ (cached once passed)."""
        if group is not self._group:
            self._group, self._verified = group, set()
        if features in self._verified:
            return
        by_rank = [row[0] for row in self._exchange([features], group, device)]
        self._raise_if_differ(features, by_rank, group, "features")
        self._verified.add(features)

    def ghosts(self, features: int, ghosts: int, group: ProcessGroup, device: torch.device) -> int:
        """Exchange (features, ghost count); raise if the features differ, else return the most ghosts."""
        rows = self._exchange([features, ghosts], group, device)
        self._raise_if_differ(features, [r[0] for r in rows], group, "features")
        return max(r[1] for r in rows)


def check_savable(input: Tensor, weight: Optional[Tensor], *others: Optional[Tensor], weight_name: str = "weight"
                  ) -> None:
    """:class:`SyncNormalize` saves ``input`` and ``weight`` for its backward, and torch refuses to
    save an inference tensor (made under ``torch.inference_mode()``), but only once the running
    statistics have moved: refused before that, naming the tensor (as the C++ ops do). ``others``:
    the call's other differentiable inputs (bias, an adjustment's tensors)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    if not any(t is not None and t.requires_grad for t in (input, weight, *others)):
        return
    for name, t in (("input", input), (weight_name, weight)):
        if t is not None and t.is_inference():
            raise RuntimeError(
                f"bn_cuda: {name} is an inference tensor (created under torch.inference_mode()), and inference "
                "tensors cannot be saved for backward, which this call needs (a tensor among its inputs requires "
                "grad); clone() it outside inference mode, or run the call under torch.inference_mode() or "
                "torch.no_grad(). Nothing was updated.")


@torch.no_grad()
def sync_batch_stats(input: Tensor, axis: Sequence[int], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], momentum: float, eps: float, group: ProcessGroup,
                     world_size: int, *, unbiased_running_var: bool = True, pad_to: Optional[int] = None,
                     mask: Optional[Tensor] = None, ghosts: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """Global ``(mean, invstd, count)`` per feature, each ``(C,)``; running statistics updated in place.

    ``pad_to`` (ghost batches): append empty states so that every rank sends ``pad_to`` features.
    """
    mean, m2, count = staged.batch_stats(input, axis, mask, ghosts)
    local = torch.stack((mean, m2, count))  # (3, C): one message per rank
    if pad_to is not None and pad_to > local.shape[1]:
        local = torch.nn.functional.pad(local, (0, pad_to - local.shape[1]))  # count 0: merged as nothing
    if world_size == 1:  # LOCAL: nothing to exchange
        gathered = local
    else:
        gathered = local.new_empty((world_size * 3, local.shape[1]))
        _all_gather_flat(gathered, local, group)
    means, m2s, counts = gathered.view(world_size, 3, -1).transpose(0, 1).contiguous().unbind(0)
    return staged.gather_stats(means, m2s, counts, running_mean, running_var, momentum, eps,
                               unbiased_running_var)


@torch.no_grad()
def sync_moments(input: Tensor, axis: Sequence[int], eps: float, group: ProcessGroup, world_size: int,
                 *, pad_to: Optional[int] = None, mask: Optional[Tensor] = None, ghosts: int = 1
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global ``(mean, biased variance, invstd, count)`` per feature, for callers that need the
    variance itself (renorm, ghost-batch moving averages). No running statistics are touched.

    ``gather_stats`` writes the variance only into running statistics; with zeroed scratch
    buffers and momentum 1 they receive ``0 * 0 + 1 * batch_stat``, the statistic itself, exactly
    (and stay 0 for features with no values).
    """
    c = pad_to if pad_to is not None else ops.num_features(input.shape, axis) * ghosts
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    mean_out = torch.zeros(c, dtype=acc, device=input.device)
    var_out = torch.zeros(c, dtype=acc, device=input.device)
    _, invstd, count = sync_batch_stats(input, axis, mean_out, var_out, 1.0, eps, group, world_size,
                                        unbiased_running_var=False, pad_to=pad_to, mask=mask, ghosts=ghosts)
    return mean_out, var_out, invstd, count


class SyncNormalize(torch.autograd.Function):
    """``normalize`` with global batch statistics computed from ``input``; its backward is the full
    batch-norm training backward over the global batch (one all-reduce).

    ``pad_to`` (ghost batches): the number of features every rank all-reduces; this rank's come first.
    ``mask``: the 0/1 mask of masked statistics (broadcastable to ``input``), for their gradient.
    ``ghosts``: ghost batches of the staged ops (per-feature tensors then hold ghosts * C entries).
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                invstd: Tensor, count: Tensor, axis: List[int], group: ProcessGroup,
                pad_to: Optional[int] = None, mask: Optional[Tensor] = None, ghosts: int = 1) -> Tensor:
        if mask is not None and not torch.compiler.is_compiling() and mask.is_inference():
            # (no differentiable input: a copy of its own is saved)
            mask = mask.clone()
        ctx.save_for_backward(input, weight, mean, invstd, count, mask)
        ctx.axis, ctx.group, ctx.pad_to, ctx.ghosts = axis, group, pad_to, ghosts
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return staged.normalize(input, mean, invstd, weight, bias, axis, ghosts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        input, weight, mean, invstd, count, mask = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu = staged.grad_sums(grad_out, input, mean, invstd, ctx.axis, ctx.ghosts)
        grad_input = grad_weight = grad_bias = None
        if need_weight:
            grad_weight = (sum_dy_xmu * invstd).reshape(weight.shape).to(weight.dtype)
        if need_bias:
            grad_bias = sum_dy.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
        if need_input:
            # Every rank needs the input gradient (same model), so every rank joins this all-reduce.
            local = sum_dy.numel()
            total = torch.stack((sum_dy, sum_dy_xmu))
            if ctx.pad_to is not None and ctx.pad_to > local:
                total = torch.nn.functional.pad(total, (0, ctx.pad_to - local))
            if ctx.group is not LOCAL:
                dist.all_reduce(total, group=ctx.group)
            grad_input = staged.grad_input(grad_out, input, mean, invstd, weight, total[0, :local],
                                           total[1, :local], count, ctx.axis, mask, ctx.ghosts)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, momentum: float = 0.1,
                    eps: float = 1e-5, *, axis: Union[int, Sequence[int]] = 1,
                    process_group: ProcessGroup = None, unbiased_running_var: bool = True,
                    feature_check: Optional[FeatureCountCheck] = None) -> Tensor:
    """Training-mode batch normalization with statistics over every process of ``process_group``.

    Parameters
    ----------
    input : Tensor
        This process's part of the global batch (it may be empty); any strides.
    running_mean, running_var : Tensor or None
        Flat ``(C,)`` running statistics, updated in place with the global statistics
        (``(1 - momentum) * running + momentum * stat``; unbiased variance unless
        ``unbiased_running_var=False``). Left unchanged when the global batch is empty.
    weight, bias : Tensor or None
        Flat ``(C,)`` affine parameters; their gradients are this process's share (DDP sums them).
    momentum, eps : float
        As in :func:`torch.nn.functional.batch_norm`.
    axis : int or sequence of int
        Feature axes.
    process_group : ProcessGroup, optional
        Default: the whole world. With no initialized group, or a group of one process, this is
        plain :func:`bn_cuda.ops.batch_norm_train` (no collective).
    feature_check : FeatureCountCheck, optional
        A layer's cached check; without one the feature count is exchanged on every call.
    """
    if ops._onnx_exporting():  # (no collective in an ONNX graph: refused with running statistics, else local)
        out, _, _ = ops.batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps,
                                         [axis] if isinstance(axis, int) else list(axis), unbiased_running_var)
        return out
    axes = ops.normalize_axes([axis] if isinstance(axis, int) else list(axis), input.dim())
    ops.check_same_device(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    group, world_size = process_group_and_size(process_group)
    if world_size <= 1:
        out, _, _ = ops.batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps, axes,
                                         unbiased_running_var)
        return out
    check_savable(input, weight, bias)
    features = ops.num_features(input.shape, axes)
    for name, t in (("weight", weight), ("bias", bias)):  # as normalize will check them, before any collective
        if t is not None and not (t.dim() == 1 and t.shape[0] == features and t.dtype in ops._FLOATING):
            ops._check_feature(t, name, ops._plan(input, axes))  # (the usual flat (C,) ones skip this)
    check = feature_check if feature_check is not None else FeatureCountCheck("bn_cuda.sync_batch_norm")
    check(features, group, input.device)
    mean, invstd, count = sync_batch_stats(input, axes, running_mean, running_var, momentum, eps, group,
                                           world_size, unbiased_running_var=unbiased_running_var)
    return SyncNormalize.apply(input, weight, bias, mean, invstd, count, axes, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # d(sum over ranks of each rank's loss) / d(this rank's summand): the summed gradients.
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Differentiable all-reduce-sum (the gradient is the all-reduce-sum of the gradients)."""
    return _AllReduceSum.apply(tensor, group)
