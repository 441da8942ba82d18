"""The implementations under comparison, behind one small interface, and how torch's backend is
identified.

Each :class:`Impl` owns its per-feature state (weight/bias leaves, running statistics, or a Keras
layer) so that implementations never share mutable state, and exposes ``train(x)``,
``infer(x)`` and ``params`` (the leaves besides x that receive gradients).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "Impl", "FunctionalImpl", "KerasImpl", "make_plain_impls", "make_keras_impls", "keras_layer_class",
    "observed_torch_backend", "predicted_torch_backend", "RENORM_CLIPPING", "ghost_batch_size",
]

MOMENTUM = 0.1   # torch's convention (bn_cuda.functional follows it)
EPS = 1e-5       # cuDNN's minimum; a smaller eps would silently move torch off cuDNN
RENORM_CLIPPING = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}


class Impl:
    """One implementation: ``train(x)`` (batch statistics, updates running state), ``infer(x)``
    (running statistics), ``params`` (gradient leaves besides x), ``param_names``, ``state()``."""

    name: str = ""
    params: List[Tensor]
    param_names: List[str]

    def train(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def infer(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def state(self) -> Dict[str, Tensor]:
        return {}


class FunctionalImpl(Impl):
    """A ``batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)``
    function with its own weight/bias leaves and running statistics.

    ``infer`` uses fixed inference statistics shared by every implementation of a case, so the
    inference check does not depend on the training updates.
    """

    def __init__(self, name: str, train_fn: Callable[..., Tensor], infer_fn: Callable[..., Tensor],
                 weight: Tensor, bias: Tensor, infer_stats: Tuple[Tensor, Tensor],
                 context: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.name = name
        self._train_fn, self._infer_fn, self._context = train_fn, infer_fn, context
        self.weight = weight.detach().clone().requires_grad_(True)
        self.bias = bias.detach().clone().requires_grad_(True)
        c = weight.numel()
        self.running_mean = torch.zeros(c, device=weight.device, dtype=weight.dtype)
        self.running_var = torch.ones(c, device=weight.device, dtype=weight.dtype)
        self.infer_mean, self.infer_var = infer_stats
        self.params = [self.weight, self.bias]
        self.param_names = ["weight", "bias"]

    def train(self, x: Tensor) -> Tensor:
        with self._context():
            return self._train_fn(x, self.running_mean, self.running_var, self.weight, self.bias, True, MOMENTUM, EPS)

    def infer(self, x: Tensor) -> Tensor:
        with self._context():
            return self._infer_fn(x, self.infer_mean, self.infer_var, self.weight, self.bias, False, MOMENTUM, EPS)

    def state(self) -> Dict[str, Tensor]:
        return {"running_mean": self.running_mean, "running_var": self.running_var}


def _bn_cuda_fn(x, rm, rv, w, b, training, momentum, eps):
    import bn_cuda.functional
    return bn_cuda.functional.batch_norm(x, rm, rv, w, b, training, momentum, eps, axis=1)


def _configure_dynamo() -> None:
    # Static shapes give inductor its best kernels; each case is a new specialization of the same
    # code object, so lift the recompile limits that would otherwise fall back to eager.
    cfg = torch._dynamo.config
    for attr, value in (("recompile_limit", 4096), ("cache_size_limit", 4096),
                        ("accumulated_recompile_limit", 65536), ("accumulated_cache_size_limit", 65536)):
        if hasattr(cfg, attr):
            setattr(cfg, attr, value)
    # Backward mode replays one graph with retain_graph=True, which AOTAutograd refuses when the
    # compiled backward may donate (reuse) saved buffers; turn donation off for the baseline.
    functorch_cfg = getattr(getattr(torch, "_functorch", None), "config", None)
    if functorch_cfg is not None and hasattr(functorch_cfg, "donated_buffer"):
        functorch_cfg.donated_buffer = False


def _compiled_fns() -> Tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    _configure_dynamo()

    def bn_train(x, rm, rv, w, b, training, momentum, eps):
        return F.batch_norm(x, rm, rv, w, b, True, momentum, eps)

    def bn_infer(x, rm, rv, w, b, training, momentum, eps):
        return F.batch_norm(x, rm, rv, w, b, False, momentum, eps)

    return torch.compile(bn_train, dynamic=False), torch.compile(bn_infer, dynamic=False)


def _no_cudnn():
    return torch.backends.cudnn.flags(enabled=False)


def make_plain_impls(weight: Tensor, bias: Tensor, infer_stats: Tuple[Tensor, Tensor], *,
                     with_nocudnn: bool, with_compile: bool) -> Dict[str, FunctionalImpl]:
    """bn_cuda and the torch baselines for a plain case, reference (``torch``) first."""
    impls = {
        "torch": FunctionalImpl("torch", F.batch_norm, F.batch_norm, weight, bias, infer_stats),
        "bn_cuda": FunctionalImpl("bn_cuda", _bn_cuda_fn, _bn_cuda_fn, weight, bias, infer_stats),
    }
    if with_nocudnn:
        impls["torch_nocudnn"] = FunctionalImpl("torch_nocudnn", F.batch_norm, F.batch_norm, weight, bias,
                                                infer_stats, context=_no_cudnn)
    if with_compile:
        train_fn, infer_fn = _compiled_fns()
        impls["torch_compile"] = FunctionalImpl("torch_compile", train_fn, infer_fn, weight, bias, infer_stats)
    return impls


# ----------------------------------------------------------------------------------------------
# Keras layer (ghost batches, renorm)


def keras_layer_class() -> Tuple[Optional[type], str]:
    """``bn_cuda.BatchNormalization`` (or ``bn_cuda.layers.BatchNormalization``), or None and why."""
    try:
        import bn_cuda
        cls = getattr(bn_cuda, "BatchNormalization", None)
        if cls is None:
            from bn_cuda.layers import BatchNormalization as cls  # type: ignore[no-redef]
        return cls, ""
    except Exception as exc:  # noqa: BLE001  (any import problem means: skip the Keras variants)
        return None, f"bn_cuda.BatchNormalization not importable ({type(exc).__name__}: {exc})"


def ghost_batch_size(n: int) -> Optional[int]:
    """Virtual batch size used for a batch of ``n``: 32 when ``n`` is a multiple of 32 of at least
    64 (batch 256 -> 8 ghost batches of 32), else a quarter of it (None when n < 8 or n % 4)."""
    if n >= 64 and n % 32 == 0:
        return 32
    return n // 4 if n >= 8 and n % 4 == 0 else None


class _Adjustment:
    """A fixed per-feature adjustment ``shape -> (scale, bias)`` for an ``axis=1`` layer: the same
    tensors every call (a random one would make the composite and fused outputs incomparable)."""

    def __init__(self, channels: int, ndim: int, seed: int) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed + 7)
        view = (1, channels) + (1,) * (ndim - 2)
        self.scale = (torch.rand(channels, generator=g) * 0.14 + 0.93).view(view)
        self.bias = (torch.rand(channels, generator=g) * 0.2 - 0.1).view(view)

    def __call__(self, shape: Any) -> Tuple[Tensor, Tensor]:
        return self.scale, self.bias

    def to(self, device: torch.device) -> "_Adjustment":
        self.scale, self.bias = self.scale.to(device), self.bias.to(device)
        return self


class KerasImpl(Impl):
    """``bn_cuda.BatchNormalization(axis=1, ...)`` called as ``layer(x, training=...)``."""

    def __init__(self, name: str, layer: Any) -> None:
        self.name = name
        self.layer = layer
        named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad] \
            if hasattr(layer, "named_parameters") else []
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]

    def train(self, x: Tensor) -> Tensor:
        return self.layer(x, training=True)

    def infer(self, x: Tensor) -> Tensor:
        return self.layer(x, training=False)

    def state(self) -> Dict[str, Tensor]:
        if not hasattr(self.layer, "named_buffers"):
            return {}
        return {n: b for n, b in self.layer.named_buffers() if b.is_floating_point()}


def make_keras_impls(variant: str, x: Tensor, seed: int) -> Tuple[Dict[str, KerasImpl], List[str]]:
    """The composite reference (``fused=False``) and the bn_cuda layer (``fused=None``), built on
    ``x`` and given the same random gamma/beta, plus notes. Raises on any failure (the caller
    skips the variant).

    The layer raises a ValueError for ``fused=True`` with an option its kernels cannot run yet;
    that is used to note when ``fused=None`` falls back to the composite path (speedup ~1).
    """
    cls, why = keras_layer_class()
    if cls is None:
        raise RuntimeError(why)
    kwargs: Dict[str, Any] = {"axis": 1}
    if variant not in ("layer", "ghost", "renorm", "ghost-renorm", "adjust"):
        raise ValueError(f"unknown Keras variant {variant!r}")
    if variant in ("ghost", "ghost-renorm"):
        vbs = ghost_batch_size(x.shape[0])
        if vbs is None:
            raise RuntimeError(f"ghost batches need a batch divisible by 4 and >= 8, got {x.shape[0]}")
        kwargs["virtual_batch_size"] = vbs
    if variant in ("renorm", "ghost-renorm"):
        kwargs.update(renorm=True, renorm_clipping=dict(RENORM_CLIPPING))
    if variant == "adjust":
        kwargs["adjustment"] = _Adjustment(x.shape[1], x.dim(), seed).to(x.device)
    notes = []
    try:
        cls(fused=True, **kwargs)
    except ValueError as exc:
        notes.append(f"no fused kernel for {variant} yet, fused=None runs the composite path "
                     f"({str(exc).split(':')[0]})")
    layers = {}
    for name, fused in (("composite", False), ("bn_cuda", None)):
        layer = cls(fused=fused, **kwargs)
        with torch.no_grad():
            layer(x.detach(), training=False)  # builds the variables
        if hasattr(layer, "to"):
            layer = layer.to(x.device)
        layers[name] = layer
    ref = layers["composite"]
    if hasattr(ref, "state_dict"):
        g = torch.Generator(device="cpu").manual_seed(seed)
        sd = {k: v.clone() if isinstance(v, Tensor) else v for k, v in ref.state_dict().items()}
        for k, v in sd.items():
            if not isinstance(v, Tensor):
                continue
            if v.is_floating_point() and v.numel() and any(t in k for t in ("gamma", "weight")):
                sd[k] = (torch.rand(v.shape, generator=g) + 0.5).to(v)
            elif v.is_floating_point() and v.numel() and any(t in k for t in ("beta", "bias")):
                sd[k] = (torch.rand(v.shape, generator=g) - 0.5).to(v)
        for layer in layers.values():
            layer.load_state_dict(sd)
    return {name: KerasImpl(name, layer) for name, layer in layers.items()}, notes


# ----------------------------------------------------------------------------------------------
# Which kernel torch runs


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def observed_torch_backend(out: Dict[str, str], key: str):
    """Record which batch-norm kernel torch dispatched to inside the block into ``out[key]``.

    How it is decided: ``F.batch_norm`` reaches ``at::_batch_norm_impl_index``, which calls
    ``_select_batch_norm_backend`` and then ``aten::cudnn_batch_norm``, ``aten::miopen_batch_norm``
    or ``aten::native_batch_norm``. A TorchDispatchMode sees the ATen op actually called (below
    autograd, so the backward's ``*_backward`` op too), which is torch's own decision rather than
    a re-implementation of its rules. :func:`predicted_torch_backend` restates the rules as a
    cross-check.
    """
    rec = _OpRecorder()
    with rec:
        yield
    names = " ".join(rec.ops)
    out[key] = "cudnn" if "cudnn_batch_norm" in names else "miopen" if "miopen_batch_norm" in names \
        else "native" if "native_batch_norm" in names or "batch_norm" in names else "unknown"


def predicted_torch_backend(x: Tensor, weight: Tensor, training: bool, eps: float = EPS) -> str:
    """What torch should pick, restating ``_select_batch_norm_backend`` (aten/src/ATen/native/
    Normalization.cpp): cuDNN for CUDA inputs of rank >= 3 that are not bf16, fp16 only with fp32
    weights, eps >= 1e-5, batch <= 880801 (training) / 65535 (eval), numel < 2^31 - 1, cuDNN
    enabled; otherwise the native kernel. Memory format does not matter (channels_last goes to
    cuDNN's NHWC path)."""
    if x.device.type != "cuda" or not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        return "native"
    if torch.bfloat16 in (x.dtype, weight.dtype) or (x.dtype == torch.float16 and weight.dtype != torch.float32):
        return "native"
    if x.dim() < 3 or eps < 1e-5 or x.numel() >= 2**31 - 1:
        return "native"
    if x.shape[0] > (880801 if training else 65535):
        return "native"
    return "cudnn"
