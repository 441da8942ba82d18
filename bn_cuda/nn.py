"""Torch-style modules on bn_cuda's kernels: :class:`BatchNorm1d`, :class:`BatchNorm2d`,
:class:`BatchNorm3d`, their lazy forms (drop-ins for torch's), :class:`SyncBatchNorm`, and
:func:`convert_batchnorm`, which swaps torch's batch-norm layers of a model for these."""

from __future__ import annotations

import inspect
from typing import Any, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from . import distributed, functional, ops

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
           "SyncBatchNorm", "convert_batchnorm", "batch_norm_module", "fuser_method_mapping"]


# torch.nn's batch norms take `bias=` (a weight without a bias) only in recent releases.
_TORCH_BN_HAS_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def _bias_kwargs(bias: bool) -> dict:
    return {"bias": bias} if _TORCH_BN_HAS_BIAS else {}


def _running_args(training: bool, track_running_stats: bool, momentum: Optional[float],
                  num_batches_tracked: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor]
                  ) -> Tuple[float, bool, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """torch's ``_BatchNorm.forward`` bookkeeping: ``(factor, bn_training, running_mean, running_var,
    count)``, ``count`` being the ``num_batches_tracked`` this call increments (None if none).

    ``num_batches_tracked`` is not incremented here but by :func:`_counted_call`; with
    ``momentum=None`` the factor is read from the count this step will have, on the host, as torch
    does.
    """
    count = num_batches_tracked if training and track_running_stats else None
    factor = 0.0 if momentum is None else momentum
    if count is not None and momentum is None:
        factor = 1.0 / float(count.item() + 1)  # cumulative moving average
    bn_training = bool(training) or (running_mean is None and running_var is None)
    # Buffers are updated only when tracked and training; in eval mode they normalize if present.
    tracked = not training or track_running_stats
    return factor, bn_training, running_mean if tracked else None, running_var if tracked else None, count


try:  # non-reentrant activation checkpointing ends its recomputation by raising this from a
    # saved-tensor hook, inside the call once the tensors it needs are rebuilt
    from torch.utils.checkpoint import _StopRecomputationError as _RecomputationStop
except ImportError:  # pragma: no cover (a torch without it)
    class _RecomputationStop(Exception):  # type: ignore[no-redef]
        pass


def _counted_call(count: Optional[Tensor], fn: Any, *args: Any, **kwargs: Any) -> Tensor:
    """``fn(*args, **kwargs)`` with the batch counted in ``count`` (the ``num_batches_tracked`` of a
    layer that counts this call, else None) before the call, as torch counts it (so a recomputation
    under activation checkpointing counts as torch's does), and the count taken back if the call
    fails (a failing call changes no buffer)."""
    if count is not None:
        count.add_(1)
    try:
        return fn(*args, **kwargs)
    except _RecomputationStop:
        raise  # (control flow after the kernel ran, not a failure: the count stands, as torch's)
    except BaseException:
        if count is not None:
            count.sub_(1)
        raise


def _check_dims(input: Tensor, input_dims: Tuple[int, ...]) -> None:
    """torch's ``_check_input_dim`` of the layer whose accepted ranks are ``input_dims``."""
    if input.dim() not in input_dims:
        raise ValueError(f"expected {' or '.join(f'{d}D' for d in input_dims)} input (got {input.dim()}D input)")


def batch_norm_module(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor], training: bool, track_running_stats: bool,
                      momentum: Optional[float], eps: float, input_dims: Tuple[int, ...]) -> Tensor:
    """The forward of :class:`BatchNorm1d` / ``2d`` / ``3d`` as a function of the layer's tensors and
    settings (torch's ``_BatchNorm.forward``: input rank check, ``num_batches_tracked``, momentum or
    cumulative average, batch statistics where there are no running ones).

    ``torch.fx.symbolic_trace`` records it as one call (``torch.fx.wrap``) with the layer's parameters
    and buffers as ``get_attr`` nodes, rather than tracing into its rank checks, which it cannot; the
    layer's training mode is then fixed at the one it had when traced (torch's own batch norms stay
    ``call_module`` nodes).
    """
    _check_dims(input, input_dims)
    factor, bn_training, mean, var, count = _running_args(training, track_running_stats, momentum,
                                                          num_batches_tracked, running_mean, running_var)
    return _counted_call(count, functional.batch_norm, input, mean, var, weight, bias, bn_training, factor, eps)


torch.fx.wrap("batch_norm_module")

_is_scripting = torch.jit.is_scripting


# torch.compiler.disable imports torch._dynamo, and with it triton, at once; torch._disable_dynamo
# (torch's own lazy form, in every release we support) waits for the first call: after
# `import tensorflow` triton must not load at `import bn_cuda` (see _load_triton_before_tensorflow).
_disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)


@_disable_dynamo
def _cumulative_batch_norm_module(*args: Any) -> Tensor:
    """:func:`batch_norm_module` of a training layer with ``momentum=None``, whose factor
    ``1 / (count + 1)`` is read on the host, as torch reads it: under torch.compile this call runs
    eagerly (one graph break) rather than recompiling the graph for every new factor."""
    return batch_norm_module(*args)


def _refuse_onnx_training(layer: _BatchNorm) -> None:
    """A layer that would update running statistics refuses ONNX export (bn_cuda.onnx), naming
    itself, before any bookkeeping (``momentum=None`` reads its count on the host)."""
    if layer.training and ops._onnx_exporting() and layer.track_running_stats and layer.running_mean is not None:
        ops._onnx().refuse_training(f"bn_cuda.nn.{type(layer).__name__}")


class _BatchNormNd(_BatchNorm):
    """torch's ``_BatchNorm`` with the forward on :func:`bn_cuda.functional.batch_norm`."""

    _input_dims: Tuple[int, ...] = ()
    # (read as TorchScript constants by _scripted_forward)
    __constants__ = [*_BatchNorm.__constants__, "_input_dims"]

    def _check_input_dim(self, input: Tensor) -> None:
        _check_dims(input, self._input_dims)

    def forward(self, input: Tensor) -> Tensor:
        if _is_scripting():  # (a static True for torch.jit.script, which compiles only this branch)
            return self._scripted_forward(input)
        _refuse_onnx_training(self)
        fn = (_cumulative_batch_norm_module if self.momentum is None and self.training and self.track_running_stats
              else batch_norm_module)
        return fn(input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
                  self.training, self.track_running_stats, self.momentum, self.eps, self._input_dims)

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """The forward under ``torch.jit.script`` (torch's batch norms are scriptable, so these
        drop-ins are too): :func:`batch_norm_module`'s bookkeeping in TorchScript, the kernels called
        through the dispatcher (``torch.ops.bn_cuda``, whose autograd is registered in C++). A saved
        script module needs ``import bn_cuda`` in the process that loads it.

        ``num_batches_tracked`` is counted after the kernel ran (TorchScript has no ``try``), so a
        call that raises still changes no buffer."""
        rank_ok = False
        ranks = ""  # (_check_dims' message)
        for rank in self._input_dims:
            rank_ok = rank_ok or input.dim() == rank
            ranks = ranks + (" or " if ranks != "" else "") + str(rank) + "D"
        if not rank_ok:
            raise ValueError("expected " + ranks + " input (got " + str(input.dim()) + "D input)")
        count = self.num_batches_tracked
        counted = self.training and self.track_running_stats and count is not None
        momentum = self.momentum
        factor = 0.0
        if momentum is not None:
            factor = momentum
        elif counted and count is not None:
            factor = 1.0 / (float(count.item()) + 1.0)  # cumulative moving average, as torch's
        mean = self.running_mean
        var = self.running_var
        bn_training = self.training or (mean is None and var is None)
        if self.training and not self.track_running_stats:
            mean = None
            var = None
        if bn_training:
            if input.numel() == input.size(1) and input.numel() != 0:
                raise ValueError("bn_cuda.functional.batch_norm: expected more than 1 value per feature when "
                                 "training, got input of shape " + str(input.shape) + " with feature axes [1]")
            out = torch.ops.bn_cuda.forward_train(input, self.weight, self.bias, mean, var, factor, self.eps, [1],
                                                  True)[0]
        else:
            assert mean is not None and var is not None
            out = torch.ops.bn_cuda.forward_infer(input, self.weight, self.bias, mean, var, self.eps, [1])
        if counted and count is not None:
            count.add_(1)
        return out


class BatchNorm1d(_BatchNormNd):
    r"""A drop-in for :class:`torch.nn.BatchNorm1d` on bn_cuda's kernels: ``(N, C)`` or ``(N, C, L)``.

    Same arguments, parameters, buffers, state_dict keys and semantics as torch's module (unbiased
    running variance, ``momentum=None`` for a cumulative average, ``track_running_stats``,
    ``affine``); any strides, fp32 / fp64 / fp16 / bf16 with fp32 statistics. A call that raises
    leaves every buffer, ``num_batches_tracked`` included, unchanged.
    """

    _input_dims = (2, 3)


class BatchNorm2d(_BatchNormNd):
    r"""A drop-in for :class:`torch.nn.BatchNorm2d` on bn_cuda's kernels: ``(N, C, H, W)``, contiguous
    or ``channels_last`` (the output keeps the input's memory format). See :class:`BatchNorm1d`."""

    _input_dims = (4,)


class BatchNorm3d(_BatchNormNd):
    r"""A drop-in for :class:`torch.nn.BatchNorm3d` on bn_cuda's kernels: ``(N, C, D, H, W)``, contiguous
    or ``channels_last_3d``. See :class:`BatchNorm1d`."""

    _input_dims = (5,)


class _LazyBatchNormNd(_LazyNormBase):
    """torch's ``_LazyNormBase`` whose first input's rank is checked before ``input.size(1)`` is taken
    as ``num_features`` (torch's lazy layers raise an IndexError for a 1-D input there and
    materialize on any other wrong rank)."""

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if self.has_uninitialized_params():
            self._check_input_dim(input)
        super().initialize_parameters(input)


class LazyBatchNorm1d(_LazyBatchNormNd, BatchNorm1d):
    r"""A drop-in for :class:`torch.nn.LazyBatchNorm1d`: a :class:`BatchNorm1d` whose ``num_features``
    (and parameter / buffer sizes) come from the first input's ``input.size(1)``, after which it
    becomes a :class:`BatchNorm1d`. Same arguments as torch's, without ``num_features``."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(_LazyBatchNormNd, BatchNorm2d):
    r"""A drop-in for :class:`torch.nn.LazyBatchNorm2d`; becomes a :class:`BatchNorm2d`. See
    :class:`LazyBatchNorm1d`."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(_LazyBatchNormNd, BatchNorm3d):
    r"""A drop-in for :class:`torch.nn.LazyBatchNorm3d`; becomes a :class:`BatchNorm3d`. See
    :class:`LazyBatchNorm1d`."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]


_DROP_INS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_LAZY_DROP_INS = {nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
                  nn.LazyBatchNorm3d: LazyBatchNorm3d}


def _share_state(new: _BatchNorm, old: _BatchNorm) -> _BatchNorm:
    """``new`` takes ``old``'s parameters and buffers (the same tensors), training mode and qconfig."""
    if old.affine:
        new.weight = old.weight
        new.bias = old.bias
    new.running_mean = old.running_mean
    new.running_var = old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def convert_batchnorm(module: nn.Module) -> nn.Module:
    r"""Replace torch's batch-norm layers in ``module`` by bn_cuda's, in place.

    ``torch.nn.BatchNorm1d/2d/3d`` become :class:`BatchNorm1d/2d/3d` and ``torch.nn.SyncBatchNorm``
    becomes :class:`SyncBatchNorm` (same process group), each sharing the old layer's parameters and
    buffers (the same tensors: optimizers built before the conversion keep working), training mode
    and ``qconfig``. torch's lazy layers that have not seen an input yet become
    :class:`LazyBatchNorm1d/2d/3d`, sharing their uninitialized parameters and buffers (those that
    have become ``BatchNorm1d/2d/3d`` are converted as such). Subclasses of torch's layers (which may
    override ``forward``) and anything else are left as they are.

    Returns
    -------
    nn.Module
        ``module`` with its batch-norm layers replaced, or the new layer if ``module`` is one.
    """
    def drop_in(m: nn.Module) -> nn.Module:
        kind = type(m)
        if kind in _DROP_INS:
            return _share_state(_DROP_INS[kind](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                                **_bias_kwargs(m.bias is not None)), m)
        if kind in _LAZY_DROP_INS and m.has_uninitialized_params():
            return _share_state(_LAZY_DROP_INS[kind](m.eps, m.momentum, m.affine, m.track_running_stats,
                                                     **_bias_kwargs(m.bias is not None)), m)
        if kind is nn.SyncBatchNorm:
            return _share_state(SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                              m.process_group, bias=m.bias is not None), m)
        return m

    return _convert_tree(module, drop_in, {})


def fuser_method_mapping() -> dict:
    r"""Fuser methods for ``torch.ao.quantization.fuse_modules`` / ``fuse_modules_qat`` on the
    patterns of torch's own table that hold a batch norm, with bn_cuda's :class:`BatchNorm1d/2d/3d`
    in place of torch's: ``(Conv2d, BatchNorm2d)``, ``(Conv2d, BatchNorm2d, ReLU)``,
    ``(Linear, BatchNorm1d)``, ``(ConvTranspose2d, BatchNorm2d)``, ``(BatchNorm2d, ReLU)``, ... in
    1, 2 and 3 dimensions. ``fuse_modules`` looks fusers up by exact type, so without it a converted
    model cannot be fused::

        fuse_modules(model.eval(), [["conv", "bn", "relu"]],
                     fuse_custom_config_dict={"additional_fuser_method_mapping": bn_cuda.nn.fuser_method_mapping()})

    Each method hands torch's fuser a ``torch.nn.BatchNorm*d`` sharing the layer's parameters and
    buffers (the same tensors), so the fused modules are torch's, as quantization expects: evaluation
    fusion folds the statistics into the convolution or linear layer; quantization-aware training
    gets torch's ``ConvBn2d`` and friends, whose batch norm trains on torch's kernels.
    """
    from torch.ao.quantization import fuser_method_mappings as torch_fusers

    table = getattr(torch_fusers, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # pragma: no cover (a torch that renamed its table)
        raise RuntimeError("bn_cuda.nn.fuser_method_mapping: this torch has no "
                           "torch.ao.quantization.fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD table; "
                           "fuse with torch.nn.utils.fusion.fuse_conv_bn_eval instead")
    ours = {torch_cls: our_cls for torch_cls, our_cls in _DROP_INS.items()}
    return {tuple(ours.get(t, t) for t in key): _on_torch_layers(method)
            for key, method in table.items() if any(t in ours for t in key)}


def _on_torch_layers(method: Any) -> Any:
    """``method(is_qat, *modules)`` with bn_cuda's batch norms among ``modules`` given as torch's."""
    def fuse(is_qat: bool, *modules: nn.Module) -> nn.Module:
        return method(is_qat, *(_as_torch_layer(m) for m in modules))

    return fuse


def _as_torch_layer(module: nn.Module) -> nn.Module:
    """A :class:`BatchNorm1d/2d/3d` as torch's, sharing its parameters and buffers; anything else as it is."""
    for torch_cls, our_cls in _DROP_INS.items():
        if type(module) is our_cls:
            layer = torch_cls(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, **_bias_kwargs(module.bias is not None))
            return _share_state(layer, module)
    return module


def _convert_tree(module: nn.Module, convert: Any, memo: dict) -> nn.Module:
    """``convert`` applied to ``module`` and every module under it, in place. A module registered
    more than once (a layer used twice) becomes one new module registered in each place (memo:
    converted modules by id; ``named_children`` would visit it only once)."""
    if id(module) in memo:
        return memo[id(module)]
    out = memo[id(module)] = convert(module)
    for name, child in list(module._modules.items()):
        if child is not None:
            out.add_module(name, _convert_tree(child, convert, memo))
    return out


class SyncBatchNorm(_BatchNorm):
    r"""A drop-in for :class:`torch.nn.SyncBatchNorm` on bn_cuda's kernels, for CPU (gloo) and GPU (NCCL).

    Same arguments, parameters, buffers (``running_mean``, ``running_var``, ``num_batches_tracked``),
    state_dict keys and semantics as torch's module: in training mode the batch statistics are those
    of the global batch over every process of ``process_group`` (default: the whole world), the
    running statistics get the unbiased global variance, ``momentum=None`` is a cumulative average,
    and outside training (or with one process, or no initialized group) it runs the plain fused
    kernels with no collective. Per-rank batch sizes may differ and may be 0; an all-empty global
    batch leaves the running statistics unchanged.

    Unlike torch's module it also runs on CPU tensors (over gloo). The forward exchanges one packed
    ``(3, C)`` Welford state per rank; the backward all-reduces one packed ``(2, C)`` tensor.

    Parameters
    ----------
    num_features : int
        ``C`` of an ``(N, C, *)`` input.
    eps : float
        Added to the variance.
    momentum : float or None
        Running-statistics factor (torch's convention); ``None`` for a cumulative average (which,
        as in torch, reads ``num_batches_tracked`` on the host).
    affine : bool
        Learnable ``weight`` and ``bias``.
    track_running_stats : bool
        Keep running statistics (else batch statistics are used in eval mode too).
    process_group : ProcessGroup, optional
        Group over which statistics are synchronized.
    device, dtype, bias
        As in torch (``bias=False``: no learnable bias).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **_bias_kwargs(bias))
        if not bias and not _TORCH_BN_HAS_BIAS:
            self.register_parameter("bias", None)
        self.process_group = process_group
        self._feature_check = distributed.FeatureCountCheck("bn_cuda.nn.SyncBatchNorm")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        _refuse_onnx_training(self)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor, bn_training, running_mean, running_var, count = _running_args(
            self.training, self.track_running_stats, self.momentum, self.num_batches_tracked, self.running_mean,
            self.running_var)
        # Statistics are synchronized only in training mode (as torch: not in eval mode even
        # without running statistics).
        group, world_size = (distributed.process_group_and_size(self.process_group)
                             if bn_training and self.training else (None, 1))
        if world_size > 1 and input.size(1) != self.num_features and (self.weight is not None
                                                                       or running_mean is not None):
            # Caught here, before any collective: the feature-count check is cached per count.
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels in dim 1, got input of "
                             f"shape {tuple(input.shape)}")
        if world_size <= 1:
            return _counted_call(count, functional.batch_norm, input, running_mean, running_var, self.weight,
                                 self.bias, bn_training, factor, self.eps)
        return _counted_call(count, distributed.sync_batch_norm, input, running_mean, running_var, self.weight,
                             self.bias, factor, self.eps, axis=1, process_group=group,
                             feature_check=self._feature_check)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        r"""Replace every batch-norm layer in ``module`` by a synchronized one.

        torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (any ``_BatchNorm``, this class
        included) become :class:`bn_cuda.nn.SyncBatchNorm` sharing their parameters and buffers
        (weights, running statistics, ``num_batches_tracked``, ``requires_grad``, training mode,
        ``qconfig``); a lazy layer that has not seen an input is refused (ValueError).
        :class:`bn_cuda.BatchNormalization` layers are kept, switched to
        ``synchronized=True`` over ``process_group`` (their Keras semantics are unchanged
        otherwise; like tf_keras's synchronized layer they then feed the biased variance to the
        moving variance).

        Returns
        -------
        nn.Module
            ``module`` with its batch-norm layers replaced, or the new layer if ``module`` is one.
        """
        from .layers import BatchNormalization

        for name, m in module.named_modules():  # (before anything is replaced)
            if isinstance(m, _LazyNormBase) and m.has_uninitialized_params():
                raise ValueError(f"convert_sync_batchnorm: {type(m).__name__} {name or '(the root)'} has not seen an "
                                 "input yet, so its number of features is unknown and SyncBatchNorm has no lazy form: "
                                 "run one forward pass (a dry run) before converting")

        def synchronized(m: nn.Module) -> nn.Module:
            if isinstance(m, _BatchNorm):
                return _share_state(cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                        process_group, bias=m.bias is not None), m)
            if isinstance(m, BatchNormalization):
                m.synchronized = True
                m.process_group = process_group
            return m

        return _convert_tree(module, synchronized, {})
