"""Torch-style modules on bn_cuda's kernels: :class:`SyncBatchNorm`."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed, functional

__all__ = ["SyncBatchNorm"]


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
                         bias=bias)
        self.process_group = process_group
        self._feature_check = distributed.FeatureCountCheck("bn_cuda.nn.SyncBatchNorm")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average (torch reads the count on the host too)
                factor = 1.0 / float(self.num_batches_tracked.item())
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are updated only when tracked and training; in eval mode they normalize if present.
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        # Statistics are synchronized only in training mode (as torch: not in eval mode even
        # without running statistics).
        group, world_size = (distributed.process_group_and_size(self.process_group)
                             if bn_training and self.training else (None, 1))
        if world_size <= 1:
            return functional.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                         factor, self.eps)
        if input.size(1) != self.num_features and (self.weight is not None or running_mean is not None):
            # Caught here, before any collective: the feature-count check is cached per count.
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels in dim 1, got input of shape "
                             f"{tuple(input.shape)}")
        return distributed.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor,
                                           self.eps, axis=1, process_group=group,
                                           feature_check=self._feature_check)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        r"""Replace every batch-norm layer in ``module`` by a synchronized one.

        torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (any ``_BatchNorm``, this class
        included) become :class:`bn_cuda.nn.SyncBatchNorm` sharing their parameters and buffers
        (weights, running statistics, ``num_batches_tracked``, ``requires_grad``, training mode,
        ``qconfig``). :class:`bn_cuda.BatchNormalization` layers are kept, switched to
        ``synchronized=True`` over ``process_group`` (their Keras semantics are unchanged
        otherwise; like tf_keras's synchronized layer they then feed the biased variance to the
        moving variance).

        Returns
        -------
        nn.Module
            ``module`` with its batch-norm layers replaced, or the new layer if ``module`` is one.
        """
        from .layers import BatchNormalization

        out = module
        if isinstance(module, _BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        elif isinstance(module, BatchNormalization):
            module.synchronized = True
            module.process_group = process_group
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
