"""``bn_cuda.BatchNormalization``: TensorFlow/Keras's BatchNormalization layer as a ``torch.nn.Module``.

Numerics follow tf_keras 2.x (the oracle of the parity tests), including where tf_keras's own
code paths differ from each other. The decisions, in tf_keras's terms:

- *tf_keras's fused path* (``tf.compat.v1.nn.fused_batch_norm``) is what tf_keras takes for a 4D
  input with axis 1 or 3, or a 5D input with axis 1 or 4, unless ``fused=False``,
  ``synchronized=True``, renorm, ghost batches or an adjustment rule it out, or the compute dtype
  is float64. On that path the moving variance is fed the Bessel-corrected batch variance and a
  ``mask`` is ignored (with tf_keras's warning); everywhere else it is fed the biased variance and
  a mask gives weighted moments. TensorFlow 2.21 no longer floors epsilon there (the old
  ``1.001e-5`` floor is gone on CPU), so neither do we.
- ``fused`` chooses *our* implementation: ``None``/``True`` run bn_cuda's kernels — the fused
  training op for plain configurations, inference always, and the staged kernels (statistics,
  per-feature finalize, normalize; :mod:`bn_cuda.keras.synchronized`) for ghost batches, renorm and
  per-feature adjustments and boolean masks (weighted statistics). ``False`` runs
  :mod:`bn_cuda.keras.composite`, plain PyTorch ops that mirror tf_keras's non-fused maths step by
  step. What still runs only on the composite path: a non-boolean ``mask`` (arbitrary weights), an
  adjustment whose outputs vary over reduced dims, and a custom ``stats_hook``; ``fused=True`` with
  one of those raises a ValueError naming it.
- ``synchronized=True`` with an initialized group of several processes, in training: the staged
  kernels over the global batch, renorm, ghost batches, adjustments and boolean masks included;
  with ``fused=False`` or one of the composite-only cases above, the composite path with an
  all-reduce of the sums.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import distributed, ops
from .keras import checks, composite, constraints, initializers, regularizers
from .keras._serialization import to_numpy as _to_numpy
from .keras.layer_io import KerasLayerIO

__all__ = ["BatchNormalization", "register_constraints"]

_HALF = (torch.float16, torch.bfloat16)
_RENORM_VARS = ("moving_stddev", "renorm_mean", "renorm_stddev")
_names = itertools.count()
_MASK_WARNING = ("Masking is not supported with `fused=True`. You should either turn off fusing "
                 "(`fused=False`) or you should not pass a `mask` argument when calling the layer. "
                 "For the moment `mask` will be ignored for the normalization.")

InitializerLike = Union[str, Mapping[str, Any], Callable[..., Any], None]


def _default_name() -> str:
    n = next(_names)
    return "batch_normalization" if n == 0 else f"batch_normalization_{n}"


class BatchNormalization(KerasLayerIO, nn.Module):
    r"""Keras's BatchNormalization layer on bn_cuda's fused kernels, with tf_keras's exact numerics.

    Training normalizes with the batch statistics,
    ``gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta``, and updates
    ``moving = moving * momentum + batch_stat * (1 - momentum)``; inference uses the moving
    statistics. Weights are built on the first call (or by :meth:`build`, or at construction when
    ``input_shape`` & co. are given) and are float32 even for float16/bfloat16 inputs; without a
    ``dtype`` the output has the input's dtype.

    Parameters
    ----------
    axis : int or list of int
        Feature axis (axes). With several axes, or with ``virtual_batch_size``, the weights have
        the input's rank with 1 in the other dims (Keras's shapes), one value per element of the
        feature sub-tensor.
    momentum : float
        Decay of the moving statistics, in [0, 1].
    epsilon : float
        Added to the variance, > 0.
    center, scale : bool
        Create and use ``beta`` / ``gamma``.
    beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer
        Keras names (``"zeros"``, ``"ones"``, ``"constant"``, ``"random_normal"``,
        ``"random_uniform"``, ``"truncated_normal"``, ``"glorot_uniform"``, ``"he_normal"``, ...),
        Keras config dicts, or callables ``init(shape, dtype) -> array-like``.
    beta_regularizer, gamma_regularizer
        ``"l1"``, ``"l2"``, ``"l1_l2"``, a config dict, or a callable ``penalty(weight) -> Tensor``;
        :attr:`losses` returns the current penalties.
    beta_constraint, gamma_constraint
        ``"non_neg"``, ``"max_norm"``, ``"min_max_norm"``, ``"unit_norm"``, a config dict, or a
        callable ``project(weight) -> Tensor``; see :meth:`apply_constraints` and
        :func:`register_constraints`.
    renorm : bool
        Batch Renormalization (adds ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``).
    renorm_clipping : dict, optional
        Keys among ``"rmax"``, ``"rmin"``, ``"dmax"``; a missing key does not clip that side.
    renorm_momentum : float
        Decay of ``renorm_mean`` / ``renorm_stddev``, in [0, 1].
    fused : bool, optional
        ``None``/``True``: bn_cuda's kernels (fused, or staged for ghost batches / renorm /
        adjustment / boolean mask); ``False``: the composite reference path. ``True`` raises a
        ValueError for what only the composite path runs (a non-boolean mask, an adjustment varying
        over reduced dims, a ``stats_hook``).
    trainable : bool
        ``False`` freezes ``gamma``/``beta`` and forces inference mode (TF2 behaviour).
    virtual_batch_size : int, optional
        Ghost batch size; must divide the batch in training. Ghost ``j`` holds samples
        ``j, j + G, j + 2G, ...`` with ``G = batch // virtual_batch_size`` (tf_keras's reshape).
    adjustment : callable, optional
        ``adjustment(input_shape: torch.Size) -> (scale, bias)``, tensors broadcastable to the
        input, applied to the normalized values (after renorm, before gamma/beta) in training only.
    name : str, optional
        Layer name, as in Keras.
    synchronized : bool
        In training, statistics of the global batch over all processes of the default
        ``torch.distributed`` group (or of the attribute ``process_group``) when one is initialized
        with more than one process: the staged kernels exchange per-feature Welford states (one
        all-gather per step, one all-reduce in the backward; see :mod:`bn_cuda.keras.synchronized`
        for ghost batches and renorm); with ``fused=False`` or a composite-only case (a non-boolean
        mask, an adjustment varying over reduced dims), the composite path all-reduces (sum, sum of
        squares, count) as tf_keras does. Otherwise the layer behaves
        as unsynchronized (with tf_keras's ``synchronized=True`` variance formula on the composite
        path). As in tf_keras, a synchronized layer feeds the biased variance to ``moving_variance``.
    dtype : str, torch.dtype or Keras policy, optional
        Keras's dtype policy: ``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"``,
        ``"mixed_float16"``, ``"mixed_bfloat16"`` (or a dtype / ``Policy`` naming one). As in
        tf_keras, inputs are cast to its compute dtype (the output has that dtype) and the weights
        are float64 for ``"float64"``, float32 otherwise. None (the default, unlike Keras's
        ``"float32"``): no cast, torch style (e.g. under ``torch.autocast``).
    input_shape, batch_input_shape, batch_size, input_dim
        Keras's base-layer shape arguments: the layer is built at construction for that input
        shape (the batch dim may be None), so its weights exist before the first call.
    autocast, dynamic
        Accepted for Keras code; no effect (tf_keras's BatchNormalization casts its input itself).
    activity_regularizer
        As ``gamma_regularizer``, applied to each call's output: the penalty divided by the batch
        size is the first entry of :attr:`losses` until the next call (Keras's semantics).
    weights : list of arrays, optional
        Keras's initial weights, in :meth:`get_weights`'s order, set when the layer is built.

    Examples
    --------
    >>> bn = BatchNormalization(axis=1, momentum=0.9)
    >>> y = bn(torch.randn(8, 3, 5, 5), training=True)
    >>> bn.moving_mean.shape
    torch.Size([3])
    """

    def __init__(
        self,
        axis: Union[int, Sequence[int]] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: InitializerLike = "zeros",
        gamma_initializer: InitializerLike = "ones",
        moving_mean_initializer: InitializerLike = "zeros",
        moving_variance_initializer: InitializerLike = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: Optional[Mapping[str, float]] = None,
        renorm_momentum: float = 0.99,
        fused: Optional[bool] = None,
        trainable: bool = True,
        virtual_batch_size: Optional[int] = None,
        adjustment: Optional[Callable[[torch.Size], Tuple[Any, Any]]] = None,
        name: Optional[str] = None,
        synchronized: bool = False,
        *,
        dtype: Any = None,
        input_shape: Optional[Sequence[Optional[int]]] = None,
        batch_input_shape: Optional[Sequence[Optional[int]]] = None,
        batch_size: Optional[int] = None,
        input_dim: Optional[int] = None,
        autocast: bool = True,
        dynamic: bool = False,
        activity_regularizer: Any = None,
        weights: Optional[Sequence[Any]] = None,
    ) -> None:
        super().__init__()
        self.axis = checks.check_axis_arg(axis)
        self.momentum = checks.check_unit_interval("momentum", momentum)
        self.renorm_momentum = checks.check_unit_interval("renorm_momentum", renorm_momentum)
        self.epsilon = checks.check_epsilon(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.activity_regularizer = regularizers.get(activity_regularizer)
        self._activity_loss: Optional[Tensor] = None  # the last call's (differentiable) activity penalty
        self._initial_weights = None if weights is None else list(weights)  # Keras's `weights`: set at build
        self.renorm = bool(renorm)
        # Like Keras, clipping is only looked at (and validated) with renorm.
        self.renorm_clipping = checks.check_renorm_clipping(renorm_clipping) if self.renorm else renorm_clipping
        if adjustment is not None and not callable(adjustment):
            raise TypeError(f"`adjustment` must be a callable or None. Received: adjustment={adjustment!r}")
        self.adjustment = adjustment
        self.virtual_batch_size = checks.check_virtual_batch_size(virtual_batch_size, self.axis, adjustment)
        if fused not in (None, True, False):
            raise ValueError(f"`fused` must be None, True or False. Received: fused={fused!r}")
        self.fused = fused
        self.synchronized = bool(synchronized)
        self.dtype_policy: Optional[str] = checks.check_dtype(dtype)
        shape = checks.input_shape_arg(input_shape, batch_input_shape, batch_size, input_dim)
        self._batch_input_shape = None if shape is None else tuple(shape)  # (in the config, as Keras)
        self.stats_hook: Optional[composite.StatsHook] = None
        self.name = str(name) if name is not None else _default_name()
        # Synchronization: the group (None: the default group) and the cached feature-count check.
        self.process_group: Any = None
        self._feature_check: Any = None
        # _flat's views of multi-dim buffers: (buffer, its data_ptr, view) by name
        self._flat_views: Dict[str, Tuple[Tensor, int, Tensor]] = {}
        self._trainable = bool(trainable)
        self.built = False
        self._axes: List[int] = []
        self._build_shape: Optional[List[Optional[int]]] = None
        self._param_shape: Tuple[int, ...] = ()
        self.register_parameter("gamma", None)
        self.register_parameter("beta", None)
        self.register_buffer("moving_mean", None)
        self.register_buffer("moving_variance", None)
        if self.renorm:
            for var in _RENORM_VARS:
                self.register_buffer(var, None)
        # Follows .to()/.cuda() while unbuilt, so weights built from a state_dict land there.
        # Its dtype too: .double() / .half() / .to(dtype) while unbuilt set the dtype weights are built
        # in (as torch's lazy modules materialize in the dtype they were cast to).
        self.register_buffer("_device_anchor", torch.empty(0, dtype=self.variable_dtype), persistent=False)
        self._requires_grad: Optional[bool] = None  # requires_grad_() while unbuilt, applied at build
        if shape is not None:  # Keras's input_shape & co: built now, so an optimizer can take the weights
            self.build(shape)

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """The dtype inputs are cast to (the ``dtype`` policy's), or None: each input's own."""
        return None if self.dtype_policy is None else getattr(torch, checks.DTYPE_POLICIES[self.dtype_policy][0])

    @property
    def variable_dtype(self) -> torch.dtype:
        """The dtype the weights are built in: float64 with a float64 policy, else float32."""
        return torch.float32 if self.dtype_policy is None else getattr(torch, checks.DTYPE_POLICIES[self.dtype_policy][1])

    # ------------------------------------------------------------------------------------------
    # Weights

    @property
    def trainable(self) -> bool:
        """``False`` freezes ``gamma``/``beta`` (no gradient) and forces inference mode."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        self._requires_grad = None  # (the latest word on gamma / beta's requires_grad wins)
        for p in (self.gamma, self.beta):
            if p is not None:
                p.requires_grad_(self._trainable)

    def requires_grad_(self, requires_grad: bool = True) -> "BatchNormalization":
        """torch's ``requires_grad_``; on an unbuilt layer it applies to gamma / beta when they are
        built (torch's own would find no parameter and do nothing)."""
        if not self.built:
            self._requires_grad = bool(requires_grad)
        return super().requires_grad_(requires_grad)

    def build(self, input_shape: Sequence[Optional[int]], device: Optional[torch.device] = None) -> None:
        """Create the weights for inputs of this shape (``None`` allowed outside the feature axes)."""
        shape = [None if s is None else int(s) for s in input_shape]
        rank = len(shape)
        axes = checks.validate_axis(self.axis, rank)
        if self.virtual_batch_size is not None:
            checks.check_batch_axis(axes, rank)
        if any(shape[a] is None for a in axes):
            raise ValueError(f"Input has undefined `axis` dimension. Received input with shape {tuple(shape)} "
                             f"and axis={tuple(axes)}")
        spec = [shape[a] if a in axes else None for a in range(rank)]
        if self.built:
            if spec != self._build_shape:
                raise ValueError(f"Layer '{self.name}' was already built for inputs of shape {tuple(self._build_shape)}; "
                                 f"cannot rebuild it for {tuple(shape)}")
            return
        if len(axes) == 1 and self.virtual_batch_size is None:
            param_shape: List[int] = [shape[axes[0]]]
        else:
            param_shape = [shape[i] if i in axes else 1 for i in range(rank)]
            if self.virtual_batch_size is not None:
                param_shape.insert(1, 1)  # the ghost dim, as in tf_keras
        device = self._device_anchor.device if device is None else torch.device(device)

        dtype = self._device_anchor.dtype  # (the policy's variable dtype, or what .to() made it)

        def make(init) -> Tensor:
            return _materialize(init, param_shape, name=self.name, dtype=dtype).to(device)

        wanted = getattr(self, "_requires_grad", None)  # (a layer pickled before it existed has none)
        grad = self._trainable if wanted is None else wanted
        if self.scale:
            self.gamma = nn.Parameter(make(self.gamma_initializer), requires_grad=grad)
        if self.center:
            self.beta = nn.Parameter(make(self.beta_initializer), requires_grad=grad)
        self.moving_mean = make(self.moving_mean_initializer)
        self.moving_variance = make(self.moving_variance_initializer)
        if self.renorm:
            # Separate draws from the initializers, as tf_keras calls them once per variable.
            self.moving_stddev = make(self.moving_variance_initializer).sqrt()
            self.renorm_mean = make(self.moving_mean_initializer)
            self.renorm_stddev = make(self.moving_variance_initializer).sqrt()
        self._axes = sorted(axes)
        self._build_shape = spec
        self._param_shape = tuple(param_shape)
        self.built = True
        if self._initial_weights is not None:
            initial, self._initial_weights = self._initial_weights, None
            try:
                self.set_weights(initial)
            except ValueError:  # refused: back to unbuilt, so that the failing call changes nothing
                for n in ["gamma", "beta"] + self._variables():
                    setattr(self, n, None)
                self._axes, self._build_shape, self._param_shape, self.built = [], None, (), False
                self._initial_weights = initial
                raise

    def _keras_momenta(self) -> Tuple[float, float]:
        """``(momentum, renorm_momentum)`` as tf_keras applies them: its decay ``1 - momentum`` is a
        float32 tensor cast to the variable's dtype, so with a "float64" policy its float64
        variables move by ``float32(1 - momentum)``: then returned as the momenta whose ``1 - m`` is
        exactly that. (Variables made float64 torch style, by ``.double()``, move by the float64
        decay.)"""
        if self.dtype_policy != "float64" or self.moving_mean is None or self.moving_mean.dtype != torch.float64:
            return float(self.momentum), float(self.renorm_momentum)
        return _f32_decay(self.momentum), _f32_decay(self.renorm_momentum)

    def _variables(self) -> List[str]:
        return ["moving_mean", "moving_variance"] + (list(_RENORM_VARS) if self.renorm else [])

    @property
    def losses(self) -> List[Tensor]:
        """Current regularization penalties (differentiable); add them to the loss. With an
        ``activity_regularizer``, the last call's activity penalty comes first (Keras's order; each
        call replaces it)."""
        out = [] if self._activity_loss is None else [self._activity_loss]
        for reg, weight in ((self.gamma_regularizer, self.gamma), (self.beta_regularizer, self.beta)):
            if reg is not None and weight is not None:
                out.append(reg(weight))
        return out

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(super().__getstate__())
        state["_activity_loss"] = None  # (a non-leaf tensor: not copied or pickled, like Keras's call losses)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # A layer pickled by an earlier bn_cuda lacks the attributes added since: their defaults.
        for name in ("dtype_policy", "activity_regularizer", "_activity_loss", "_initial_weights", "_batch_input_shape"):
            self.__dict__.setdefault(name, None)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project ``gamma``/``beta`` with their constraints, in place (Keras does this after each
        optimizer step; :func:`register_constraints` installs that)."""
        for con, weight in ((self.gamma_constraint, self.gamma), (self.beta_constraint, self.beta)):
            if con is not None and weight is not None:
                weight.copy_(torch.as_tensor(con(weight), dtype=weight.dtype, device=weight.device))

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(self, inputs: Tensor, training: Optional[bool] = None, mask: Optional[Tensor] = None) -> Tensor:
        """Normalize ``inputs``.

        Parameters
        ----------
        inputs : Tensor
            Any rank; float16, bfloat16, float32 or float64.
        training : bool, optional
            Batch statistics (True) or moving statistics (False); None means ``self.training``.
            Forced to False when ``trainable`` is False.
        mask : Tensor, optional
            Boolean (or 0/1) tensor of shape ``inputs.shape[:-1]``: training statistics are the
            masked (weighted) moments. Ignored, with tf_keras's warning, where tf_keras takes its
            fused path. With ghost batches the mask is split into ghosts with the input (tf_keras
            itself cannot broadcast it there unless ``virtual_batch_size == 1``).
        """
        out = self._forward(inputs, training, mask)
        if self.activity_regularizer is not None:  # tf_keras: the penalty of the output over the batch size
            loss = self.activity_regularizer(out)
            self._activity_loss = loss / out.shape[0] if out.shape[0] else loss * 0
        return out

    def _forward(self, inputs: Tensor, training: Optional[bool], mask: Optional[Tensor]) -> Tensor:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"Inputs to layer '{self.name}' should be tensors. Got {type(inputs).__name__}")
        if not inputs.is_floating_point():
            raise TypeError(f"Layer '{self.name}' expects a floating-point input. Received dtype={inputs.dtype}")
        if self.dtype_policy is not None:  # tf_keras casts the input to the policy's compute dtype
            compute = self.compute_dtype
            if inputs.dtype != compute:
                inputs = inputs.to(compute)
        if not self.built:
            if torch.jit.is_tracing():  # (torch refuses a module whose state_dict changes while traced)
                raise RuntimeError(
                    f"Layer '{self.name}' is not built: a TorchScript trace (torch.jit.trace, torch.onnx.export with "
                    "dynamo=False) cannot create its weights. Call the layer once, or build(input_shape), first.")
            self.build(inputs.shape, device=inputs.device)
        self._check_input(inputs)
        if mask is not None:
            mask = self._check_mask(inputs, mask)
        training = bool(self.training if training is None else training) and self._trainable
        if not training:
            return self._inference(inputs)
        if ops._onnx_exporting():
            ops._onnx().refuse_training(f"bn_cuda.BatchNormalization '{self.name}'")

        keras_fused = self.keras_fused_path(inputs)
        if mask is not None and keras_fused:
            if not torch.compiler.is_compiling():  # (dynamo cannot trace warnings.warn: fullgraph would fail)
                warnings.warn(_MASK_WARNING, stacklevel=3)
            mask = None
        if self.virtual_batch_size is not None and inputs.shape[0] % self.virtual_batch_size != 0:
            raise ValueError(checks.vbs_message(self.virtual_batch_size,
                                                f" for an input of batch size {inputs.shape[0]}"))
        group, world_size = self._sync_group()
        adj_raw = None
        staged = self.fused is not False and self.stats_hook is None and (
            world_size > 1 or self.renorm or self.virtual_batch_size is not None or self.adjustment is not None
            or mask is not None) and (mask is None or mask.dtype == torch.bool)  # other dtypes: weights
        if staged:
            # Ghost batches, renorm, adjustment and cross-process statistics run on the staged
            # kernels (statistics, per-feature finalize, normalize). An adjustment whose outputs vary
            # over reduced dims cannot be folded into per-feature coefficients.
            from . import distributed
            from .keras import synchronized

            adjustment = None
            if self.adjustment is not None:  # called once per step, whichever path runs it
                adj_raw = self.adjustment(torch.Size(inputs.shape))
                adjustment = synchronized.flat_adjustment(self, inputs, adj_raw)
            if self.adjustment is None or adjustment is not None:
                if world_size == 1:
                    group = distributed.LOCAL
                return synchronized.train_step(self, inputs, group, world_size, adjustment, mask)
        hook = self._stats_hook(group, world_size)
        blocking = self._kernel_blockers(mask, hook, inputs, adj_raw)
        if self.fused is True and blocking:
            raise ValueError(f"`fused=True` is not supported with {blocking[0]}: bn_cuda's fused kernels cannot "
                             "run it yet. Pass `fused=None` (kernels where possible) or `fused=False`.")
        if self.fused is not False and not blocking:
            return self._train_kernels(inputs, unbiased=keras_fused)
        return self._train_composite(inputs, mask, hook, adj_raw)

    def keras_fused_path(self, inputs: Tensor) -> bool:
        """Whether tf_keras, with this configuration and input, takes its fused path (Bessel-corrected
        moving variance, mask ignored)."""
        if self.fused is False or self.synchronized or self.renorm:
            return False
        if self.virtual_batch_size is not None or self.adjustment is not None:
            return False
        raw = [self.axis] if isinstance(self.axis, int) else self.axis
        if len(raw) != 1 or raw[0] not in (-4, -3, -1, 1, 3, 4):
            return False
        if inputs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
        return (inputs.dim(), self._axes[0]) in ((4, 1), (4, 3), (5, 1), (5, 4))

    def _kernel_blockers(self, mask: Optional[Tensor], hook, inputs: Tensor, adj_raw=None) -> List[str]:
        found = []
        if self.adjustment is not None and adj_raw is not None:  # (evaluated: it did not fold per feature)
            shapes = [list(torch.as_tensor(t).shape) for t in adj_raw]
            found.append(f"an `adjustment` whose outputs vary over reduced dims (got scale shape {shapes[0]} and "
                         f"bias shape {shapes[1]} for an input of shape {list(inputs.shape)})")
        if mask is not None:
            found.append(f"a non-boolean `mask` (arbitrary weights; got dtype {mask.dtype})")
        if hook is not None:
            found.append("`synchronized=True` across processes (or a `stats_hook`)")
        return found

    def _sync_group(self) -> Tuple[Any, int]:
        """``(group, world_size)`` to synchronize over; world size 1 when not synchronizing."""
        if not (self.synchronized and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None, 1
        from . import distributed  # (loads the staged ops only when synchronizing)

        group, world_size = distributed.process_group_and_size(self.process_group)
        if world_size > 1 and self._feature_check is None:
            self._feature_check = distributed.FeatureCountCheck(f"bn_cuda.BatchNormalization '{self.name}'")
        return group, world_size

    def _stats_hook(self, group: Any, world_size: int) -> Optional[composite.StatsHook]:
        if self.stats_hook is not None:
            return self.stats_hook
        if world_size > 1:
            from .keras.synchronized import AllReduceStats

            # The stacked (sum, sum of squares, count) has the ghost dim at 2: (3, 1, ghosts, ...).
            return AllReduceStats(group, self._feature_check, 2 if self.virtual_batch_size is not None else None)
        return None

    def _check_input(self, x: Tensor) -> None:
        spec = self._build_shape
        if x.dim() != len(spec):
            raise checks.incompatible_input(self.name, f"expected ndim={len(spec)}, found ndim={x.dim()}. "
                                                       f"Full shape received: {tuple(x.shape)}")
        for a in self._axes:
            if x.shape[a] != spec[a]:
                shown = a - len(spec) if isinstance(self.axis, int) and self.axis < 0 else a
                raise checks.incompatible_input(
                    self.name, f"expected axis {shown} of input shape to have value {spec[a]}, but received "
                               f"input with shape {tuple(x.shape)}")

    def _check_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        mask = torch.as_tensor(mask, device=x.device)
        if mask.dim() != x.dim() - 1:
            raise ValueError("The mask provided should be one dimension less than the inputs. Received: "
                             f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(x.shape)}")
        if not ops.broadcasts_to(mask.shape, x.shape[:-1]):
            raise ValueError("The mask provided should have the shape of the inputs without their last axis. "
                             f"Received: mask.shape={tuple(mask.shape)}, inputs.shape={tuple(x.shape)}")
        return mask.expand(x.shape[:-1])

    def _flat(self, name: str) -> Optional[Tensor]:
        """A flat view of a weight; buffers are views so the kernels' in-place updates land in them."""
        t = self._raw(name)
        if t is not None and t.dim() == 1 and t.is_contiguous():
            return t  # already flat (the common case: one feature axis)
        if t is None or isinstance(t, nn.Parameter):
            return None if t is None else t.reshape(-1)
        # Buffers of ghost-batch layers (tf_keras's (1, 1, C, 1, 1) shapes): the view is cached
        # while the buffer is the same tensor on the same memory (a view costs ~5 us of host time,
        # several per step); .to() / load_state_dict(assign=True) / .data = ... all miss the cache.
        # Not while compiling or tracing: torch.jit.trace would record a cached view as a constant,
        # cut off from the buffer that a later load_state_dict / .to() replaces.
        # Nor for torch.func's wrapped tensors (functional_call's parameters and buffers), which
        # have no storage to take a data pointer of.
        compiling = (torch.compiler.is_compiling() or torch.jit.is_tracing()
                     or torch._C._functorch.is_functorch_wrapped_tensor(t))
        cached = None if compiling else self._flat_views.get(name)
        if cached is not None and cached[0] is t and cached[1] == t.data_ptr():
            return cached[2]
        if not t.is_contiguous():
            setattr(self, name, t.contiguous())
            t = getattr(self, name)
        v = t.view(-1)
        if not compiling:
            self._flat_views[name] = (t, t.data_ptr(), v)
        return v

    def _raw(self, name: str) -> Optional[Tensor]:
        """A weight as it is (any shape), or None (_flat's lookup; the C++ step flattens it itself)."""
        # (the module's dicts directly: nn.Module.__getattr__ costs microseconds per call)
        t = self._parameters[name] if name in self._parameters else self._buffers.get(name)
        return getattr(self, name, None) if t is None else t

    def _inference(self, x: Tensor) -> Tensor:
        if self.fused is not False:
            return ops.batch_norm_infer(x, self._flat("gamma"), self._flat("beta"), self._flat("moving_mean"),
                                        self._flat("moving_variance"), self.epsilon, self._axes)
        work = _upcast(x)
        shape = [x.shape[i] if i in self._axes else 1 for i in range(x.dim())]
        p = {n: None if getattr(self, n) is None else getattr(self, n).reshape(shape).to(work.dtype)
             for n in ("gamma", "beta", "moving_mean", "moving_variance")}
        out = composite.batch_normalization(work, p["moving_mean"], p["moving_variance"], p["beta"], p["gamma"],
                                            self.epsilon)
        return out.to(x.dtype)

    def _train_kernels(self, x: Tensor, unbiased: bool) -> Tensor:
        # TensorFlow's fused kernel applies Bessel's correction only when a feature has more than
        # one value (factor 1 otherwise); the biased variance is that value.
        count = x.numel() // max(1, ops.num_features(x.shape, self._axes))
        unbiased = unbiased and count > 1
        out, _, _ = ops.batch_norm_train(x, self._flat("gamma"), self._flat("beta"), self._flat("moving_mean"),
                                         self._flat("moving_variance"), 1.0 - self._keras_momenta()[0], self.epsilon,
                                         self._axes, unbiased_running_var=unbiased)
        return out

    def _train_composite(self, x: Tensor, mask: Optional[Tensor], hook, adj_raw=None) -> Tensor:
        """tf_keras's non-fused training step; all values computed first, variables committed last."""
        work = _upcast(x)
        axes = self._axes
        if self.virtual_batch_size is not None:
            work = composite.ghost_batches(work, self.virtual_batch_size)
            axes = [a + 1 for a in axes]
            if mask is not None:
                mask = composite.ghost_batches(mask, self.virtual_batch_size)
        reduce_dims = [i for i in range(work.dim()) if i not in axes and not (self.virtual_batch_size and i == 1)]
        stat_shape = [work.shape[i] if i in axes else 1 for i in range(work.dim())]

        def param(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.reshape(stat_shape).to(work.dtype)

        scale, offset = param(self.gamma), param(self.beta)
        if self.adjustment is not None:
            # (adj_raw: the outputs of this step's call, when the staged path already made it)
            adj_scale, adj_bias = adj_raw if adj_raw is not None else self.adjustment(torch.Size(work.shape))
            scale, offset = composite.compose_transforms(_as_work(adj_scale, work), _as_work(adj_bias, work),
                                                         scale, offset)
        weights = None if mask is None else mask.to(work.dtype).unsqueeze(-1)
        count = None
        if hook is not None:  # statistics from (all-reduced) sums; `count` guards empty global batches
            mean, var, count = composite.sum_moments(work, reduce_dims, mask_weights=weights, stats_hook=hook)
        else:
            mean, var = composite.moments(work, reduce_dims, mask_weights=weights, sum_of_squares=self.synchronized)
        # An empty batch (and, under synchronization, an empty global batch: `count` below) keeps
        # every moving variable; tf_keras would write NaN into them.
        local_empty = hook is None and work.numel() == 0
        if local_empty:  # finite statistics (the mean of nothing is NaN), no update below
            mean, var = torch.zeros_like(mean), torch.zeros_like(var)
        if self.virtual_batch_size is not None:
            # One moving-average update per step, from the average of the ghost statistics (under
            # synchronization: of every rank's ghosts; this rank's own come first).
            new_mean, new_var = mean.mean(1, keepdim=True), var.mean(1, keepdim=True)
            count = None if count is None else count.sum(1, keepdim=True)
            mean, var = mean[:, :work.shape[1]], var[:, :work.shape[1]]
        else:
            new_mean, new_var = mean, var
        new_mean, new_var = new_mean.detach(), new_var.detach()
        if local_empty:  # (the average over zero ghost batches is NaN too)
            new_mean, new_var = torch.zeros_like(new_mean), torch.zeros_like(new_var)
        has_data = None
        if count is not None:  # nothing anywhere: keep every moving statistic, and r / d finite
            has_data = count.detach() > 0
            new_mean = torch.where(has_data, new_mean, torch.zeros_like(new_mean))
            new_var = torch.where(has_data, new_var, torch.zeros_like(new_var))

        updates: Dict[str, Tensor] = {}
        moving = {n: param(getattr(self, n)) for n in self._variables()}
        momentum, renorm_momentum = self._keras_momenta()
        if self.renorm:
            r, d, stddev = composite.renorm_correction(new_mean, new_var, moving["renorm_mean"],
                                                       moving["renorm_stddev"], self.epsilon, self.renorm_clipping)
            scale, offset = composite.compose_transforms(r.detach(), d.detach(), scale, offset)
            updates["renorm_mean"] = composite.moving_average(moving["renorm_mean"], new_mean, renorm_momentum)
            updates["renorm_stddev"] = composite.moving_average(moving["renorm_stddev"], stddev, renorm_momentum)
            moving_stddev = composite.moving_average(moving["moving_stddev"], torch.sqrt(new_var + self.epsilon),
                                                     momentum)
            updates["moving_stddev"] = moving_stddev
            # tf_keras keeps the variance as the (relu'd) square of the moving stddev, minus epsilon.
            updates["moving_variance"] = torch.relu(moving_stddev * moving_stddev - self.epsilon)
        else:
            updates["moving_variance"] = composite.moving_average(moving["moving_variance"], new_var, momentum)
        updates["moving_mean"] = composite.moving_average(moving["moving_mean"], new_mean, momentum)

        # The moving variables move before the output is computed, as in the fused path: a
        # non-reentrant torch.utils.checkpoint stops its recomputation once the last tensor saved
        # for backward is rebuilt, and would skip an update that came after (one update instead of
        # the fused path's and torch's modules' two).
        # (the output's backward saves `work`: an inference tensor is refused before any update)
        distributed.check_savable(work, scale, offset, weight_name="gamma")
        if not local_empty:  # (an empty batch: no moving-variable update, see above)
            with torch.no_grad():
                for n, value in updates.items():
                    if has_data is not None:
                        value = torch.where(has_data, value, moving[n])
                    buf = getattr(self, n)
                    if torch._debug_has_internal_overlap(buf) == 1:  # (an expanded buffer: one of its own, as
                        setattr(self, n, buf.contiguous())  # _flat gives the fused path, rather than a copy_
                        buf = getattr(self, n)               # that raises after the other variables moved)
                    buf.copy_(value.reshape(buf.shape))
        out = composite.batch_normalization(work, mean, var, offset, scale, self.epsilon)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        parts = [f"axis={self.axis}", f"momentum={self.momentum}", f"epsilon={self.epsilon}"]
        if not self.center:
            parts.append("center=False")
        if not self.scale:
            parts.append("scale=False")
        if self.renorm:
            parts.append(f"renorm=True, renorm_clipping={self.renorm_clipping}, "
                         f"renorm_momentum={self.renorm_momentum}")
        if self.virtual_batch_size is not None:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        if self.adjustment is not None:
            parts.append("adjustment=...")
        if self.fused is not None:
            parts.append(f"fused={self.fused}")
        if self.dtype_policy is not None:
            parts.append(f"dtype={self.dtype_policy!r}")
        if not self._trainable:
            parts.append("trainable=False")
        if self.synchronized:
            parts.append("synchronized=True")
        if self.built:
            parts.append(f"param_shape={self._param_shape}")
        return f"name={self.name!r}, " + ", ".join(parts)


def register_constraints(optimizer: torch.optim.Optimizer, model: nn.Module):
    """After each ``optimizer.step()``, apply the constraints of every :class:`BatchNormalization`
    in ``model`` (Keras applies constraints after each update).

    Returns
    -------
    torch.utils.hooks.RemovableHandle
        ``handle.remove()`` uninstalls the hook.
    """
    layers = [m for m in model.modules() if isinstance(m, BatchNormalization)]

    def hook(opt, args, kwargs) -> None:
        for layer in layers:
            layer.apply_constraints()

    return optimizer.register_step_post_hook(hook)


# ----------------------------------------------------------------------------------------------


def _f32_decay(momentum: float) -> float:
    """The momentum m' with ``1 - m' == float32(1 - momentum)`` exactly (both subtractions exact).
    (Plain-Python rounding to float32's 24 bits, ties to even: torch.compile folds it.)"""
    decay = 1.0 - float(momentum)
    if decay == 0.0:
        return float(momentum)
    frac, exp = math.frexp(decay)
    return 1.0 - math.ldexp(round(frac * 16777216.0), exp - 24)


def _upcast(x: Tensor) -> Tensor:
    """tf_keras does all non-fused maths in float32 for 16-bit inputs."""
    return x.float() if x.dtype in _HALF else x


def _as_work(value: Any, work: Tensor) -> Optional[Tensor]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.to(device=work.device, dtype=work.dtype)
    return torch.as_tensor(_to_numpy(value), dtype=work.dtype, device=work.device)


def _materialize(init: Callable, shape: Sequence[int], name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    try:
        value = init(tuple(shape), dtype=dtype)
    except TypeError:  # a callable without a (torch) dtype argument, e.g. a Keras initializer
        value = init(tuple(shape))
    value = value if isinstance(value, Tensor) else torch.as_tensor(_to_numpy(value))
    value = value.detach().to(dtype)
    if tuple(value.shape) != tuple(shape):
        try:
            value = value.expand(tuple(shape))
        except RuntimeError:
            raise ValueError(f"An initializer of layer '{name}' returned shape {tuple(value.shape)}, "
                             f"expected {tuple(shape)}") from None
    return value.clone().contiguous()
