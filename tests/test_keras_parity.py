"""Parity of bn_cuda.BatchNormalization with the real tf_keras layer.

For each configuration both layers get the same random weights and moving variables, then run
several training steps (outputs, input/gamma/beta gradients via tf.GradientTape, every moving
variable after each step) and one inference call, for ``fused=None`` and ``fused=False`` (passed
to both layers, so tf_keras's own fused/non-fused differences are covered too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import torch

import bn_cuda

# triton's libtriton and TensorFlow both bundle LLVM: loading triton *after* TensorFlow segfaults
# (torch.optim / torch.compile import it through torch._dynamo). Load it first.
try:
    import torch._dynamo  # noqa: F401
except Exception:  # pragma: no cover
    pass

pytestmark = pytest.mark.tf

tf_keras = pytest.importorskip("tf_keras", exc_type=ImportError)
import tensorflow as tf  # noqa: E402  (present whenever tf_keras is)

try:
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # TF already initialized by another test module
    pass

_VARIABLES = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


@dataclass
class Case:
    id: str
    shape: Tuple[int, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    infer_shape: Optional[Tuple[int, ...]] = None
    mask: bool = False
    adjustment: bool = False
    dtype: str = "float32"
    x_scale: float = 1.0
    shift: float = 1.0
    steps: int = 3


CLIP_FULL = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}

CASES = [
    # ranks and axes
    Case("2d", (7, 3)),
    Case("2d_c1", (9, 1)),
    Case("2d_c17", (5, 17)),
    Case("3d_last", (5, 7, 3)),
    Case("3d_axis1", (5, 3, 7), {"axis": 1}),
    Case("4d_nhwc", (3, 7, 7, 3)),
    Case("4d_nchw", (4, 17, 1, 7), {"axis": 1}),
    Case("4d_axis_neg3", (3, 3, 7, 1), {"axis": -3}),
    Case("4d_axis2", (3, 7, 3, 1), {"axis": 2}),
    Case("4d_axis_list_one", (3, 7, 1, 3), {"axis": [3]}),
    Case("5d_last", (2, 1, 7, 3, 3)),
    Case("5d_axis1", (2, 3, 7, 1, 7), {"axis": 1}),
    Case("5d_axis_neg3", (2, 3, 5, 1, 3), {"axis": -3}),
    Case("3d_axis_list", (5, 3, 7), {"axis": [-1, 1]}),
    # one value per feature: tf_keras's fused kernel then skips Bessel's correction
    Case("4d_one_value_per_feature", (1, 1, 1, 3)),
    Case("2d_batch_1", (1, 3)),
    Case("4d_axis_list", (3, 3, 7, 5), {"axis": [1, 3]}),
    # center / scale, momentum / epsilon
    Case("no_center", (7, 3), {"center": False}),
    Case("no_scale_nchw", (3, 3, 7, 1), {"axis": 1, "scale": False}),
    Case("no_center_no_scale", (5, 7, 3), {"center": False, "scale": False}),
    Case("momentum_epsilon_4d", (3, 7, 7, 3), {"momentum": 0.5, "epsilon": 1e-5}),
    Case("momentum_epsilon_2d", (7, 3), {"momentum": 0.7, "epsilon": 0.1}),
    Case("momentum_1", (7, 3), {"momentum": 1.0}),
    # tiny variance + tiny epsilon: would expose an epsilon floor on either side
    Case("tiny_epsilon_4d", (3, 3, 7, 7), {"axis": 1, "momentum": 0.0, "epsilon": 1e-8}, x_scale=1e-3),
    Case("tiny_epsilon_2d", (9, 3), {"momentum": 0.0, "epsilon": 1e-8}, x_scale=1e-3),
    # renorm
    Case("renorm_full", (9, 17), {"renorm": True, "renorm_clipping": CLIP_FULL, "renorm_momentum": 0.9,
                                  "momentum": 0.8}),
    Case("renorm_rmax_only_nchw", (3, 5, 7, 1), {"axis": 1, "renorm": True, "renorm_clipping": {"rmax": 1.25}}),
    Case("renorm_dmax_only", (5, 7, 5), {"renorm": True, "renorm_clipping": {"dmax": 0.3}}),
    Case("renorm_no_clipping", (5, 7, 3), {"renorm": True, "renorm_momentum": 0.5}),
    Case("renorm_4d_nhwc", (3, 7, 1, 5), {"renorm": True, "renorm_clipping": CLIP_FULL}),
    # decays 1 - momentum are rounded from double, as tf_keras does (1e-4 here is where a float32
    # subtraction is off by 1.7e-4 relative)
    Case("renorm_momentum_9999", (9, 5), {"renorm": True, "momentum": 0.9999, "renorm_momentum": 0.9999},
         shift=5.0),
    # ghost batches
    Case("vbs_2d", (12, 3), {"virtual_batch_size": 3}, infer_shape=(7, 3)),
    Case("vbs_nchw", (6, 3, 7, 1), {"axis": 1, "virtual_batch_size": 2}, infer_shape=(5, 3, 7, 1)),
    Case("vbs_3d", (8, 7, 3), {"virtual_batch_size": 4, "momentum": 0.5}),
    Case("vbs_1", (4, 7, 3), {"virtual_batch_size": 1}),
    # one value per (ghost, feature): output beta, input gradient exactly 0 (tests/test_variants.py)
    Case("vbs_1_one_value", (6, 40), {"virtual_batch_size": 1}),
    Case("vbs_1_one_value_nchw", (5, 17, 1, 1), {"axis": 1, "virtual_batch_size": 1}),
    Case("vbs_momentum_9999", (8, 5), {"virtual_batch_size": 2, "momentum": 0.9999}, shift=5.0),
    Case("vbs_whole_batch", (6, 5), {"virtual_batch_size": 6}),
    Case("vbs_axis_list", (6, 3, 7), {"axis": [1, 2], "virtual_batch_size": 3}),
    Case("vbs_renorm", (12, 5), {"virtual_batch_size": 4, "renorm": True, "renorm_clipping": CLIP_FULL},
         infer_shape=(5, 5)),
    # adjustment
    Case("adjustment_2d", (7, 3), adjustment=True),
    Case("adjustment_nchw", (3, 3, 7, 1), {"axis": 1}, adjustment=True),
    Case("adjustment_renorm", (9, 5), {"renorm": True, "renorm_clipping": CLIP_FULL}, adjustment=True),
    Case("adjustment_no_scale", (7, 3), {"scale": False}, adjustment=True),
    # masks (tf_keras ignores the mask where it takes its fused path)
    Case("mask_2d", (9, 3), mask=True),
    Case("mask_3d", (5, 7, 3), mask=True),
    Case("mask_3d_axis1", (5, 3, 7), {"axis": 1}, mask=True),
    Case("mask_4d_nhwc", (3, 7, 7, 3), mask=True),
    Case("mask_renorm", (5, 7, 3), {"renorm": True, "renorm_clipping": CLIP_FULL}, mask=True),
    # ghost batches of one sample: some features of a ghost have a single unmasked value
    Case("mask_vbs1", (4, 6, 3), {"virtual_batch_size": 1}, mask=True),
    Case("mask_momentum_9999", (5, 7, 3), {"momentum": 0.9999}, mask=True, shift=5.0),
    # 16-bit inputs (mixed precision policy on the tf side)
    Case("fp16_2d", (7, 3), dtype="float16"),
    Case("fp16_4d_nhwc", (3, 7, 7, 3), dtype="float16"),
    Case("fp16_4d_nchw", (3, 17, 1, 7), {"axis": 1}, dtype="float16"),
    Case("fp16_renorm", (9, 5), {"renorm": True, "renorm_clipping": CLIP_FULL}, dtype="float16"),
    Case("fp16_mask", (5, 7, 3), mask=True, dtype="float16"),
    Case("fp16_vbs", (6, 7, 3), {"virtual_batch_size": 2}, dtype="float16"),
    Case("bf16_4d_nhwc", (3, 7, 7, 3), dtype="bfloat16"),
    Case("bf16_2d", (7, 3), dtype="bfloat16"),
    # frozen layers run in inference mode
    Case("trainable_false_2d", (7, 3), {"trainable": False}),
    Case("trainable_false_nchw", (3, 3, 7, 1), {"axis": 1, "trainable": False}),
    # synchronized=True in a single process. tf_keras then computes var = E[x^2] - E[x]^2 in
    # float32, whose rounding grows with mean^2 / var; smaller feature shifts keep that rounding at
    # float32 level (the composite path uses the same formula; the kernels are more accurate).
    Case("synchronized_2d", (7, 3), {"synchronized": True}, shift=0.25),
    Case("synchronized_4d", (3, 7, 7, 3), {"synchronized": True}, shift=0.25),
    Case("synchronized_mask", (5, 7, 3), {"synchronized": True}, mask=True, shift=0.25),
]

_TF_DTYPE = {"float32": None, "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _to_np_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """Round to the case's dtype (bf16 via torch), returned as the array fed to both frameworks."""
    if dtype == "float32":
        return a.astype(np.float32)
    if dtype == "float16":
        return a.astype(np.float16)
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).float().numpy()


def _feature_axes(case: Case):
    axis = case.kwargs.get("axis", -1)
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % len(case.shape) for a in axes)


def _make_input(rs: np.random.RandomState, shape, case: Case, feat_scale, feat_shift) -> np.ndarray:
    x = rs.randn(*shape) * feat_scale + feat_shift
    return _to_np_dtype(x * case.x_scale, case.dtype)


def _initial_value(rs: np.random.RandomState, case: Case, name: str, shape) -> np.ndarray:
    """The random float32 start value of weight / moving variable ``name`` given to both layers."""
    if name in ("moving_variance", "moving_stddev", "renorm_stddev", "gamma"):
        value = 0.5 + rs.rand(*shape)
    else:
        value = 0.5 * rs.randn(*shape)
    if case.x_scale != 1.0 and name in ("moving_mean", "moving_variance", "moving_stddev"):
        value = value * case.x_scale
    return value.astype(np.float32)


def _feature_pattern(rs: np.random.RandomState, case: Case):
    """Per-feature scales spread over 0.3 .. 3.3 and shifts over -2 .. 2 (times case.shift), in a
    random order, shaped to broadcast against the input."""
    axes = _feature_axes(case)
    feat_shape = [case.shape[i] if i in axes else 1 for i in range(len(case.shape))]
    n_feat = int(np.prod(feat_shape))
    feat_scale = np.exp(np.linspace(-1.2, 1.2, n_feat))[rs.permutation(n_feat)].reshape(feat_shape)
    feat_shift = case.shift * np.linspace(-2.0, 2.0, n_feat)[rs.permutation(n_feat)].reshape(feat_shape)
    return feat_scale, feat_shift


def _step_draws(rs: np.random.RandomState, case: Case, shape):
    """One call's upstream gradient (exact in every dtype) and mask (None without one)."""
    dy = rs.randn(*shape).astype(np.float16).astype(np.float32)
    mask_np = rs.rand(*shape[:-1]) > 0.35 if case.mask else None
    return dy, mask_np


def _adjustment_pair(case: Case):
    """The same adjustment rule (depending on the input shape it receives) for both frameworks."""
    axes = _feature_axes(case)
    rank = len(case.shape)

    def values(batch: int, feat_shape):
        n = int(np.prod(feat_shape))
        scale = (1.0 + 0.2 * np.cos(np.arange(n) + batch)).astype(np.float32).reshape(feat_shape)
        bias = (0.3 * np.sin(np.arange(n) * 1.7 + batch)).astype(np.float32).reshape(feat_shape)
        return scale, bias

    def bshape(shape):
        return [int(shape[i]) if i in axes else 1 for i in range(rank)][min(axes):]

    def torch_adj(shape):
        assert isinstance(shape, torch.Size)
        s, b = values(shape[0], bshape(shape))
        return torch.from_numpy(s), torch.from_numpy(b)

    def tf_adj(shape):
        s, b = values(int(shape[0]), bshape(shape))
        return tf.constant(s), tf.constant(b)

    return torch_adj, tf_adj


def _tolerance(dtype: str) -> float:
    return {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}[dtype]


def _close(ours, theirs, what: str, tol: float) -> None:
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != tf_keras {theirs.shape}"
    scale = max(1.0, float(np.abs(theirs).max()) if theirs.size else 1.0)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * scale, err_msg=what)


def _assert_clipping_binds(case: Case, x_np: np.ndarray, layer) -> None:
    """Every bound of the case's renorm_clipping is active for some feature in the first step."""
    x = np.asarray(x_np, dtype=np.float64)
    axes = _feature_axes(case)
    vbs = case.kwargs.get("virtual_batch_size")
    if vbs:
        x = x.reshape(vbs, -1, *x.shape[1:])
        axes = [a + 1 for a in axes]
    red = tuple(i for i in range(x.ndim) if i not in axes and not (vbs and i == 1))
    mean, var = x.mean(red, keepdims=True), x.var(red, keepdims=True)
    if vbs:
        mean, var = mean.mean(1, keepdims=True), var.mean(1, keepdims=True)
    eps = case.kwargs.get("epsilon", 1e-3)
    renorm_stddev = np.maximum(layer.renorm_stddev.double().numpy().reshape(mean.shape), np.sqrt(eps))
    r = np.sqrt(var + eps) / renorm_stddev
    d = (mean - layer.renorm_mean.double().numpy().reshape(mean.shape)) / renorm_stddev
    clip = case.kwargs["renorm_clipping"]
    if "rmax" in clip:
        assert (r > clip["rmax"]).any(), f"rmax={clip['rmax']} never binds: r={r.ravel()}"
    if "rmin" in clip:
        assert (r < clip["rmin"]).any(), f"rmin={clip['rmin']} never binds: r={r.ravel()}"
    if "dmax" in clip:
        assert (np.abs(d) > clip["dmax"]).any(), f"dmax={clip['dmax']} never binds: d={d.ravel()}"


def _run_parity(case: Case, fused, tol_factor: float = 1.0, check_clipping: bool = True) -> None:
    """(tol_factor scales every tolerance; check_clipping=False skips the check that the case's
    clipping bounds bind: scripts/crosscheck_keras.py's random bounds need not.)"""
    rs = np.random.RandomState(zlib.crc32(case.id.encode()))
    kwargs = dict(case.kwargs)
    torch_adj = tf_adj = None
    if case.adjustment:
        torch_adj, tf_adj = _adjustment_pair(case)
    tf_layer = tf_keras.layers.BatchNormalization(fused=fused, adjustment=tf_adj, dtype=_TF_DTYPE[case.dtype],
                                                  **kwargs)
    ours = bn_cuda.BatchNormalization(fused=fused, adjustment=torch_adj, **kwargs)
    tf_layer.build(case.shape)
    ours.build(case.shape)

    # Random non-trivial weights and moving variables, copied into both.
    for name in ("gamma", "beta") + _VARIABLES:
        tv = getattr(tf_layer, name, None)
        ov = getattr(ours, name, None)
        assert (tv is None) == (ov is None), f"{name}: present in one layer only"
        if tv is None:
            continue
        assert tuple(ov.shape) == tuple(tv.shape), f"{name}: shape {tuple(ov.shape)} != tf_keras {tuple(tv.shape)}"
        value = _initial_value(rs, case, name, tv.shape)
        tv.assign(value)
        with torch.no_grad():
            ov.copy_(torch.from_numpy(value))

    feat_scale, feat_shift = _feature_pattern(rs, case)
    tol = _tolerance(case.dtype) * tol_factor
    tdtype = _TORCH_DTYPE[case.dtype]

    def step(x_np, training: bool, tag: str) -> None:
        dy, mask_np = _step_draws(rs, case, x_np.shape)
        xt = tf.constant(x_np)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y_tf = tf_layer(xt, training=training, mask=None if mask_np is None else tf.constant(mask_np))
            loss = tf.reduce_sum(tf.cast(y_tf, tf.float32) * dy)
        wrt = [xt] + [v for v in (tf_layer.gamma, tf_layer.beta) if v is not None]
        g_tf = tape.gradient(loss, wrt)

        x_t = torch.from_numpy(np.asarray(x_np, dtype=np.float32)).to(tdtype).requires_grad_(True)
        for p in ours.parameters():
            p.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = ours(x_t, training=training, mask=None if mask_np is None else torch.from_numpy(mask_np))
        assert y.dtype == tdtype, f"{tag}: output dtype {y.dtype}"
        (y.float() * torch.from_numpy(dy)).sum().backward()

        _close(y.detach().float(), tf.cast(y_tf, tf.float32).numpy(), f"{tag}: output", tol)
        _close(x_t.grad.float(), tf.cast(g_tf[0], tf.float32).numpy(), f"{tag}: input gradient", tol)
        for k, name in enumerate(n for n in ("gamma", "beta") if getattr(tf_layer, n) is not None):
            ours_g = getattr(ours, name).grad
            theirs_g = g_tf[1 + k]
            if not ours.trainable:
                # Frozen: no gradient. (tf.GradientTape still differentiates the variable, which
                # stays a trainable tf.Variable; Keras just leaves it out of trainable_weights.)
                assert ours_g is None, f"{tag}: {name} of a frozen layer has a gradient"
                continue
            assert theirs_g is not None, f"{tag}: tf_keras gives no {name} gradient"
            assert ours_g is not None, f"{tag}: no {name} gradient"
            _close(ours_g, theirs_g.numpy(), f"{tag}: {name} gradient", tol)
        for name in _VARIABLES:
            tv = getattr(tf_layer, name, None)
            if tv is not None:
                _close(getattr(ours, name), tv.numpy(), f"{tag}: {name}", 2e-5 * tol_factor)

    for k in range(case.steps):
        x_np = _make_input(rs, case.shape, case, feat_scale, feat_shift)
        if k == 0 and check_clipping and kwargs.get("renorm_clipping") and not case.mask:
            _assert_clipping_binds(case, x_np, ours)
        step(x_np, True, f"{case.id}, fused={fused}, training step {k}")
    infer_shape = case.infer_shape or case.shape
    x_np = _make_input(rs, infer_shape, case, feat_scale, feat_shift)
    step(x_np, False, f"{case.id}, fused={fused}, inference")


@pytest.mark.parametrize("fused", [None, False], ids=["fused_none", "fused_false"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity(case: Case, fused) -> None:
    _run_parity(case, fused)


_POLICY_TOL = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


_POLICY_CASES = [(policy, x_dtype, name, config)
                 for policy, x_dtype in [("float32", "float16"), ("float64", "float32"), ("mixed_float16", "float32"),
                                         ("float16", "float32"), ("mixed_bfloat16", "float32")]
                 for name, config in [("plain", {}), ("ghost", {"virtual_batch_size": 2}),
                                      ("renorm", {"renorm": True, "renorm_clipping": {"rmax": 1.2}})]
                 # (tf_keras itself fails there: tf.maximum of its float64 stddev and a float32 epsilon)
                 if not (policy == "float64" and name == "renorm")]


@pytest.mark.parametrize("fused", [None, False], ids=["fused_none", "fused_false"])
@pytest.mark.parametrize("policy, x_dtype, name, config", _POLICY_CASES, ids=[f"{c[0]}-{c[2]}" for c in _POLICY_CASES])
def test_dtype_policy_parity(policy, x_dtype, name, config, fused) -> None:
    """Keras's ``dtype`` argument: both layers get the policy, the same weights and an input of
    another dtype; tf_keras casts it to the compute dtype. Output dtype and values, input / gamma /
    beta gradients and every moving variable after two training steps and an inference call agree,
    and the weights have tf_keras's dtypes (float64 with "float64", else float32; float64 moving
    variables move by tf_keras's float32 decay). The 4-D NHWC input takes tf_keras's fused path
    (its Bessel-corrected moving variance) where it can (not for float64)."""
    rs = np.random.RandomState(zlib.crc32(f"{policy}{x_dtype}{config}{fused}".encode()))
    shape = (6, 3, 5, 4)
    tf_layer = tf_keras.layers.BatchNormalization(fused=fused, dtype=policy, momentum=0.8, **config)
    ours = bn_cuda.BatchNormalization(fused=fused, dtype=policy, momentum=0.8, input_shape=shape[1:], **config)
    assert ours.built  # (from input_shape: no call needed)
    tf_layer.build(shape)
    compute = torch.float64 if policy == "float64" else {"float32": torch.float32, "float16": torch.float16,
                                                          "mixed_float16": torch.float16,
                                                          "mixed_bfloat16": torch.bfloat16}[policy]
    tol = _POLICY_TOL[str(compute).replace("torch.", "")]
    for name in ("gamma", "beta") + _VARIABLES:
        tv, ov = getattr(tf_layer, name, None), getattr(ours, name, None)
        assert (tv is None) == (ov is None), name
        if tv is None:
            continue
        assert str(ov.dtype).replace("torch.", "") == tv.dtype.name, f"{name}: {ov.dtype} vs tf_keras {tv.dtype.name}"
        value = (0.5 + rs.rand(*tv.shape)) if "var" in name or "stddev" in name or name == "gamma" else 0.5 * rs.randn(*tv.shape)
        tv.assign(value.astype(tv.dtype.name))
        with torch.no_grad():
            ov.copy_(torch.from_numpy(value).to(ov.dtype))
    np_dtype = np.float16 if x_dtype == "float16" else np.float32
    for step in range(3):
        training = step < 2
        x_np = (rs.randn(*shape) * (0.5 + rs.rand(shape[-1])) + rs.randn(shape[-1])).astype(np_dtype)
        dy = rs.randn(*shape).astype(np.float16).astype(np.float32)
        xt = tf.constant(x_np)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y_tf = tf_layer(xt, training=training)
            loss = tf.reduce_sum(tf.cast(y_tf, tf.float64) * dy.astype(np.float64))
        g_tf = tape.gradient(loss, [xt, tf_layer.gamma, tf_layer.beta])
        x_t = torch.from_numpy(x_np).requires_grad_(True)
        for p in ours.parameters():
            p.grad = None
        y = ours(x_t, training=training)
        assert str(y.dtype).replace("torch.", "") == y_tf.dtype.name, f"output dtype {y.dtype} vs {y_tf.dtype.name}"
        (y.double() * torch.from_numpy(dy).double()).sum().backward()
        tag = f"{policy}, step {step}"
        assert x_t.grad.dtype == x_t.dtype
        _close(y.detach().double(), tf.cast(y_tf, tf.float64).numpy(), f"{tag}: output", tol)
        _close(x_t.grad.double(), tf.cast(g_tf[0], tf.float64).numpy(), f"{tag}: input gradient", tol)
        _close(ours.gamma.grad.double(), g_tf[1].numpy(), f"{tag}: gamma gradient", tol)
        _close(ours.beta.grad.double(), g_tf[2].numpy(), f"{tag}: beta gradient", tol)
        for name in _VARIABLES:
            tv = getattr(tf_layer, name, None)
            if tv is not None:
                _close(getattr(ours, name).double(), tv.numpy(), f"{tag}: {name}", 1e-9 if policy == "float64" else 2e-5)


def test_crosscheck_script() -> None:
    """scripts/crosscheck_keras.py (the randomized cross-check; minutes long, so not in CI) on the
    first 300 configurations of seed 7, in a process of its own, as a user runs it: it runs, every path of its report is taken (agreement, tf_keras refusals, a float32 miss
    arbitrated by tf_keras in float64, misses without an arbiter) and nothing is unexplained."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, str(root / "scripts" / "crosscheck_keras.py"), "--seed", "7", "--count", "300",
                          "--minutes", "10"], capture_output=True, text=True, timeout=900, env=env)
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-4000:]
    assert "configurations: 300" in out and out.splitlines()[-1] == "0 unexplained", out
    for line in ("agree within the parity tolerance", "refused or failed inside tf_keras",
                 "float32 misses explained by rounding", "not arbitrated"):
        assert line in out, f"{line!r} missing from the report:\n{out}"
