"""bn_cuda.BatchNormalization's API: errors, configs, state, Keras import, regularizers, constraints,
training modes, initializers, masks, synchronized hooks, devices."""

from __future__ import annotations

import copy
import io
import os
import warnings

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
from bn_cuda import BatchNormalization
from bn_cuda.keras import constraints, initializers, regularizers

_VARS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def _tf():
    tf_keras = pytest.importorskip("tf_keras", exc_type=ImportError)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(2)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    return tf, tf_keras


def _data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    return torch.randn(*shape, generator=g) * torch.linspace(0.5, 2.0, c) + torch.linspace(-1.0, 1.0, c)


def _snapshot(layer):
    return {n: getattr(layer, n).clone() for n in _VARS if getattr(layer, n, None) is not None}


def _assert_unchanged(layer, before):
    for n, v in before.items():
        assert torch.equal(getattr(layer, n), v), f"{n} changed on a failing call"


# ----------------------------------------------------------------------------------------------
# Errors, worded as Keras words them and naming the value


@pytest.mark.parametrize("kwargs, match", [
    ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "foo": 1}},
     r"Received invalid keys for `renorm_clipping` argument: \{'rmax': 2.0, 'foo': 1\}\. Supported values: "
     r"\['rmax', 'rmin', 'dmax'\]"),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}},
     r"rmax should be greater than rmin in the `renorm_clipping` argument\. Received: rmax=1\.0, rmin=2\.0"),
    ({"renorm": True, "renorm_clipping": {"dmax": -0.5}},
     r"dmax should be non-negative in the `renorm_clipping` argument\. Received: dmax=-0\.5"),
    ({"momentum": 1.5}, r"`momentum` must be a float between \[0, 1\]\. Received: momentum=1\.5"),
    ({"momentum": -0.1}, r"Received: momentum=-0\.1"),
    ({"renorm_momentum": 2}, r"`renorm_momentum` must be a float between \[0, 1\]\. Received: renorm_momentum=2"),
    ({"epsilon": 0.0}, r"`epsilon` must be a positive float\. Received: epsilon=0\.0"),
    ({"epsilon": -1e-3}, r"Received: epsilon=-0\.001"),
    ({"epsilon": float("inf")}, r"`epsilon` must be finite\. Received: epsilon=inf"),
    ({"renorm": True, "renorm_clipping": {"rmax": float("nan")}},
     r"`renorm_clipping\['rmax'\]` must be a number\. Received: rmax=nan"),
    ({"virtual_batch_size": 0}, r"`virtual_batch_size` must be a positive integer that divides the true batch "
                                r"size of the input tensor\. Received: virtual_batch_size=0"),
    ({"virtual_batch_size": -4}, r"Received: virtual_batch_size=-4"),
    ({"virtual_batch_size": 2, "adjustment": lambda s: (1.0, 0.0)},
     r"When using `virtual_batch_size`, adjustment cannot be specified\. Received: virtual_batch_size=2"),
    ({"virtual_batch_size": 2, "axis": [0, 1]},
     r"When using `virtual_batch_size`, the batch dimension must be 0 and thus axis cannot include 0\. "
     r"Received axis=\[0, 1\]"),
    ({"fused": "yes"}, r"`fused` must be None, True or False\. Received: fused='yes'"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchNormalization(**kwargs)


@pytest.mark.parametrize("axis", ["a", 1.5, [1, "b"], True])
def test_axis_type_error(axis):
    with pytest.raises(TypeError, match=r"Expected an int or a list/tuple of ints for the argument 'axis', "
                                         r"but received: "):
        BatchNormalization(axis=axis)


def test_clipping_unchecked_without_renorm():
    BatchNormalization(renorm_clipping={"foo": 1})  # Keras only looks at it with renorm


@pytest.mark.parametrize("axis, shape, match", [
    (2, (4, 3), r"Invalid value for `axis` argument\. Expected 0 <= axis < inputs\.rank \(with inputs\.rank=2\)\. "
                r"Received: axis=\(2,\)"),
    (-3, (4, 3), r"Received: axis=\(-1,\)"),
    ([1, -1], (4, 3), r"Duplicate axis: \(1, 1\)"),
])
def test_invalid_axes(axis, shape, match):
    layer = BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(*shape))
    with pytest.raises(ValueError, match=match):
        BatchNormalization(axis=axis).build(shape)


def test_batch_axis_with_virtual_batch_size_at_build():
    layer = BatchNormalization(axis=-3, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"axis cannot include 0\. Received axis=\[0\]"):
        layer.build((4, 3, 5))


@pytest.mark.parametrize("fused", [None, False])
def test_incompatible_input(fused):
    layer = BatchNormalization(fused=fused, name="bn")
    layer(_data(4, 3), training=True)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=r"Input 0 of layer 'bn' is incompatible with the layer: expected axis -1 "
                                         r"of input shape to have value 3, but received input with shape \(4, 5\)"):
        layer(_data(4, 5), training=True)
    with pytest.raises(ValueError, match=r"expected ndim=2, found ndim=3\. Full shape received: \(4, 2, 3\)"):
        layer(_data(4, 2, 3), training=True)
    _assert_unchanged(layer, before)
    multi = BatchNormalization(axis=[1, 2], name="bn2")
    multi.build((None, 3, 5))
    with pytest.raises(ValueError, match=r"expected axis 2 of input shape to have value 5"):
        multi(_data(4, 3, 4))


@pytest.mark.parametrize("fused", [None, False])
def test_virtual_batch_size_must_divide_batch_in_training(fused):
    layer = BatchNormalization(virtual_batch_size=3, fused=fused, renorm=True)
    layer(_data(6, 4), training=True)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=r"`virtual_batch_size` must be a positive integer that divides the true "
                                         r"batch size of the input tensor\. Received: virtual_batch_size=3 for an "
                                         r"input of batch size 7"):
        layer(_data(7, 4), training=True)
    _assert_unchanged(layer, before)
    assert layer(_data(7, 4), training=False).shape == (7, 4)  # inference: any batch size


@pytest.mark.parametrize("fused", [None, False])
def test_failing_calls_change_no_moving_variable(fused):
    calls = {"n": 0}

    def bad_adjustment(shape):
        calls["n"] += 1
        if calls["n"] > 1:
            return torch.ones(7), torch.zeros(7)  # does not broadcast against 4 features
        return torch.ones(4), torch.zeros(4)

    layer = BatchNormalization(fused=fused, renorm=True, adjustment=bad_adjustment)
    layer(_data(6, 4), training=True)
    before = _snapshot(layer)
    with pytest.raises(RuntimeError):
        layer(_data(6, 4), training=True)
    _assert_unchanged(layer, before)

    masked = BatchNormalization(fused=fused)
    masked(_data(6, 4), training=True)
    before = _snapshot(masked)
    with pytest.raises(ValueError, match=r"The mask provided should be one dimension less than the inputs\. "
                                         r"Received: mask\.shape=\(6, 4\), inputs\.shape=\(6, 4\)"):
        masked(_data(6, 4), training=True, mask=torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask\.shape=\(5,\), inputs\.shape=\(6, 4\)"):
        masked(_data(6, 4), training=True, mask=torch.ones(5, dtype=torch.bool))
    _assert_unchanged(masked, before)


def test_fused_true_with_mask():
    """Boolean masks run on the kernels (masked statistics); other dtypes are arbitrary weights,
    which only the composite path computes, so fused=True refuses them without touching state."""
    x = _data(6, 4)
    mask = torch.tensor([True, False, True, True, False, True])
    fused, composite = BatchNormalization(fused=True), BatchNormalization(fused=False)
    y = fused(x, training=True, mask=mask)
    torch.testing.assert_close(y, composite(x, training=True, mask=mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.moving_mean, composite.moving_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.moving_variance, composite.moving_variance, rtol=1e-6, atol=1e-7)
    before = _snapshot(fused)
    with pytest.raises(ValueError, match=r"`fused=True` is not supported with a non-boolean `mask` "
                                         r"\(arbitrary weights; got dtype torch.float32\)"):
        fused(x, training=True, mask=mask.float())
    _assert_unchanged(fused, before)
    per_sample = BatchNormalization(fused=True, adjustment=lambda s: (torch.rand(s[0], 1) + 0.5, torch.zeros(s[-1])))
    per_sample.build(x.shape)
    before = _snapshot(per_sample)
    with pytest.raises(ValueError, match=r"`adjustment` whose outputs vary over reduced dims \(got scale shape "
                                         r"\[6, 1\] and bias shape \[4\] for an input of shape \[6, 4\]\)"):
        per_sample(x, training=True)
    _assert_unchanged(per_sample, before)
    fused(x, training=False, mask=mask.float())  # inference ignores masks
    # A per-feature adjustment folds into the kernels: with a non-boolean mask the error names the mask.
    per_feature = BatchNormalization(fused=True, adjustment=lambda s: (torch.ones(s[-1]), torch.zeros(s[-1])))
    per_feature(x, training=True)
    with pytest.raises(ValueError, match=r"`fused=True` is not supported with a non-boolean `mask`"):
        per_feature(x, training=True, mask=mask.float())


def test_mask_ignored_on_keras_fused_path():
    """tf_keras's fused path (4D, axis 1 or 3) ignores the mask with a warning; elsewhere it counts."""
    x = _data(3, 5, 5, 4)
    mask = torch.rand(3, 5, 5) > 0.5
    plain, ignored, honoured = (BatchNormalization(momentum=0.0, fused=f) for f in (None, None, False))
    plain(x, training=True)
    with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`"):
        ignored(x, training=True, mask=mask)
    honoured(x, training=True, mask=mask)
    torch.testing.assert_close(ignored.moving_mean, plain.moving_mean)
    expected = x[mask].mean(0)
    torch.testing.assert_close(honoured.moving_mean, expected)


@pytest.mark.parametrize("kwargs, shape, mask, kernels", [
    ({}, (6, 4), False, True),
    ({"fused": True}, (6, 4), False, True),
    ({"fused": False}, (6, 4), False, False),
    ({"renorm": True}, (6, 4), False, True),
    ({"fused": True, "renorm": True, "renorm_clipping": {"rmax": 1.5}}, (6, 4), False, True),
    ({"virtual_batch_size": 2}, (6, 4), False, True),
    ({"fused": True, "virtual_batch_size": 3, "axis": 1}, (6, 4, 3, 3), False, True),
    ({"adjustment": lambda s: (torch.ones(s[-1:]), torch.zeros(s[-1:]))}, (6, 4), False, True),
    # an adjustment varying over the batch cannot be folded per feature: composite
    ({"adjustment": lambda s: (torch.rand(s[0], 1), torch.zeros(s[-1:]))}, (6, 4), False, False),
    ({"renorm": True}, (6, 4), True, True),  # boolean masks: masked statistics on the kernels
    ({}, (6, 4), True, True),
    ({}, (3, 5, 5, 4), True, True),  # tf_keras's fused path ignores the mask: kernels
    ({"synchronized": True}, (6, 4), False, True),
])
def test_kernel_routing(monkeypatch, kwargs, shape, mask, kernels):
    """fused=None/True run the kernels (fused, or staged for ghost batches / renorm / adjustment) for
    what they can run; inference always uses them."""
    calls = []
    train, infer = bn_cuda.ops.batch_norm_train, bn_cuda.ops.batch_norm_infer
    stats = bn_cuda.staged.batch_stats
    monkeypatch.setattr(bn_cuda.ops, "batch_norm_train", lambda *a, **k: calls.append("train") or train(*a, **k))
    monkeypatch.setattr(bn_cuda.staged, "batch_stats", lambda *a, **k: calls.append("train") or stats(*a, **k))
    step = bn_cuda._C.keras_train_step  # the staged ops' single-process step in C++
    monkeypatch.setattr(bn_cuda._C, "keras_train_step", lambda *a, **k: calls.append("train") or step(*a, **k))
    monkeypatch.setattr(bn_cuda.ops, "batch_norm_infer", lambda *a, **k: calls.append("infer") or infer(*a, **k))
    layer = BatchNormalization(**kwargs)
    x = _data(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(x, training=True, mask=torch.rand(shape[:-1]) > 0.5 if mask else None)
    assert ("train" in calls) == kernels
    layer(x, training=False)
    assert ("infer" in calls) == (kwargs.get("fused") is not False)


# ----------------------------------------------------------------------------------------------
# Building, weights, dtypes


def test_lazy_build_and_shapes():
    layer = BatchNormalization()
    assert layer.gamma is None and layer.moving_mean is None and not layer.built
    layer.build((None, 5))
    assert layer.built and layer.gamma.shape == (5,) and layer.moving_variance.shape == (5,)
    assert [n for n, _ in layer.named_parameters()] == ["gamma", "beta"]
    multi = BatchNormalization(axis=[1, 3])
    multi(_data(2, 3, 4, 5))
    assert multi.gamma.shape == (1, 3, 1, 5)
    ghost = BatchNormalization(axis=1, virtual_batch_size=2)
    ghost(torch.randn(4, 3, 5))
    assert ghost.moving_mean.shape == (1, 1, 3, 1)
    renorm = BatchNormalization(renorm=True, scale=False, center=False)
    renorm(_data(4, 3))
    assert renorm.gamma is None and renorm.beta is None
    assert {n for n, _ in renorm.named_buffers()} >= set(_VARS)
    assert not hasattr(BatchNormalization(), "moving_stddev")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [None, False])
def test_half_inputs_keep_float32_weights(dtype, fused):
    layer = BatchNormalization(fused=fused, renorm=fused is False)
    x = _data(8, 3).to(dtype).requires_grad_(True)
    y = layer(x, training=True)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype
    for t in list(layer.parameters()) + list(layer.buffers()):
        assert t.dtype == torch.float32 or t.numel() == 0


@pytest.mark.parametrize("kwargs", [{}, {"axis": 1}, {"renorm": True}])
def test_float64_inputs(kwargs):
    """float64 inputs compute in float64 (tf_keras's non-fused numerics) with float32 weights."""
    x = _data(6, 3, 5).transpose(1, 2).contiguous().double() if kwargs.get("axis") == 1 else _data(6, 5).double()
    outs = []
    for fused in (None, False):
        layer = BatchNormalization(fused=fused, momentum=0.5, **kwargs)
        outs.append((layer(x, training=True), layer.moving_variance.clone()))
        assert outs[-1][0].dtype == torch.float64 and layer.moving_variance.dtype == torch.float32
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1])  # biased variance: no fused path for float64


@pytest.mark.parametrize("kwargs", [{}, {"virtual_batch_size": 3}, {"renorm": True},
                                    {"adjustment": lambda s: (torch.full((5,), 1.5), torch.full((5,), 0.25))}],
                         ids=["plain", "ghost", "renorm", "adjustment"])
def test_epsilon_rounding_to_zero_in_float32(kwargs):
    """An epsilon that float32 rounds to 0 would normalize a feature of equal values to NaN (tf_keras
    gives NaN there): every fused configuration refuses it for float32 statistics, naming the value,
    and moves no variable; float64 input keeps it and matches the composite path."""
    x = _data(6, 5)
    x[:, 2] = 3.0  # a feature of equal values
    layer = BatchNormalization(epsilon=1e-50, momentum=0.5, **kwargs)
    layer.build(x.shape)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=r"eps=1e-50 rounds to 0 in float32"):
        layer(x, training=True)
    _assert_unchanged(layer, before)
    outs = []
    for fused, eps in ((None, 1e-50), (False, 1e-50), (False, 1e-3)):
        layer = BatchNormalization(fused=fused, epsilon=eps, momentum=0.5, **kwargs)
        outs.append((layer(x.double(), training=True), _snapshot(layer)))
    (got, got_vars), (want, want_vars), (tame, _) = outs
    varied = [0, 1, 3, 4]
    torch.testing.assert_close(got[:, varied], want[:, varied], rtol=1e-9, atol=1e-9)
    # The equal feature: the composite path's x * a + b (tf_keras's formula) cancels every digit at
    # a = 1e25 and gives 0; the fused (x - mean) * a + b gives the exact value, which any sane eps
    # gives too (the adjustment's bias, else 0).
    torch.testing.assert_close(got[:, 2], tame[:, 2], rtol=0, atol=1e-9)
    for n, v in want_vars.items():
        torch.testing.assert_close(got_vars[n], v, rtol=1e-6, atol=1e-6, msg=n)


def test_names():
    a, b = BatchNormalization(), BatchNormalization()
    assert a.name.startswith("batch_normalization") and a.name != b.name
    assert BatchNormalization(name="bn_3").name == "bn_3"


# ----------------------------------------------------------------------------------------------
# training=None and trainable=False


@pytest.mark.parametrize("fused", [None, False])
def test_training_none_follows_module_mode(fused):
    x = _data(6, 3)
    layer = BatchNormalization(fused=fused)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x, training=False))
    assert torch.equal(layer.moving_mean, torch.zeros(3))
    layer.train()
    ref = BatchNormalization(fused=fused)
    torch.testing.assert_close(layer(x), ref(x, training=True))
    torch.testing.assert_close(layer.moving_mean, ref.moving_mean)


@pytest.mark.parametrize("fused", [None, False])
def test_trainable_false_is_frozen_inference(fused):
    x = _data(6, 3).requires_grad_(True)
    layer = BatchNormalization(fused=fused, trainable=False)
    y = layer(x, training=True)
    torch.testing.assert_close(y, BatchNormalization(fused=fused)(x, training=False))
    assert torch.equal(layer.moving_mean, torch.zeros(3))
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    y.sum().backward()
    assert layer.gamma.grad is None and x.grad is not None
    layer.trainable = True
    assert layer.gamma.requires_grad
    layer(x, training=True)
    assert not torch.equal(layer.moving_mean, torch.zeros(3))


@pytest.mark.tf
def test_training_none_matches_tf_keras_default():
    tf, tf_keras = _tf()
    x = _data(6, 3).numpy()
    theirs = tf_keras.layers.BatchNormalization(moving_mean_initializer="ones")
    ours = BatchNormalization(moving_mean_initializer="ones").eval()
    np.testing.assert_allclose(ours(torch.from_numpy(x)).detach().numpy(), theirs(x).numpy(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Initializers, regularizers, constraints


@pytest.mark.parametrize("name, check", [
    ("zeros", lambda t: torch.equal(t, torch.zeros_like(t))),
    ("ones", lambda t: torch.equal(t, torch.ones_like(t))),
    ("constant", lambda t: torch.equal(t, torch.zeros_like(t))),
    ("random_normal", lambda t: 0.03 < t.std() < 0.07),
    ("random_uniform", lambda t: t.abs().max() <= 0.05 and t.std() > 0.02),
    ("truncated_normal", lambda t: t.abs().max() <= 0.1 and t.std() > 0.02),
    ("glorot_uniform", lambda t: t.abs().max() <= (3.0 / 4000) ** 0.5),
    ("glorot_normal", lambda t: t.abs().max() <= 2 * (1.0 / 4000) ** 0.5 / 0.8796 + 1e-6),
    ("he_normal", lambda t: 0.8 < t.std() / (2.0 / 4000) ** 0.5 < 1.2),
    ("he_uniform", lambda t: t.abs().max() <= (6.0 / 4000) ** 0.5),
    ("lecun_normal", lambda t: 0.8 < t.std() / (1.0 / 4000) ** 0.5 < 1.2),
    ("lecun_uniform", lambda t: t.abs().max() <= (3.0 / 4000) ** 0.5),
])
def test_initializer_names(name, check):
    layer = BatchNormalization(gamma_initializer=name)
    layer.build((None, 4000))
    assert layer.gamma.dtype == torch.float32 and check(layer.gamma.detach())


def test_initializer_forms():
    layer = BatchNormalization(
        beta_initializer={"class_name": "Constant", "config": {"value": 0.5}},
        gamma_initializer=initializers.RandomNormal(mean=1.0, stddev=0.1, seed=7),
        moving_mean_initializer=lambda shape, dtype=None: np.arange(np.prod(shape)).reshape(shape),
        moving_variance_initializer="Ones",
    )
    layer.build((None, 3))
    assert torch.equal(layer.beta.detach(), torch.full((3,), 0.5))
    assert torch.equal(layer.moving_mean, torch.arange(3.0))
    again = BatchNormalization(gamma_initializer=initializers.RandomNormal(mean=1.0, stddev=0.1, seed=7))
    again.build((None, 3))
    assert torch.equal(again.gamma, layer.gamma)  # seeded
    with pytest.raises(ValueError, match=r"Could not interpret initializer identifier: 'glorot_sideways'"):
        BatchNormalization(gamma_initializer="glorot_sideways")
    with pytest.raises(ValueError, match=r"unknown class_name 'Orthogonal'"):
        BatchNormalization(gamma_initializer={"class_name": "Orthogonal", "config": {}})


def test_renorm_stddev_initialized_as_sqrt_of_variance_initializer():
    layer = BatchNormalization(renorm=True, moving_variance_initializer={"class_name": "Constant",
                                                                         "config": {"value": 4.0}})
    layer.build((None, 3))
    assert torch.equal(layer.moving_stddev, torch.full((3,), 2.0))
    assert torch.equal(layer.renorm_stddev, torch.full((3,), 2.0))


def test_regularizer_losses():
    layer = BatchNormalization(gamma_regularizer="l2", beta_regularizer=regularizers.L1(0.5),
                               gamma_initializer={"class_name": "Constant", "config": {"value": 2.0}},
                               beta_initializer={"class_name": "Constant", "config": {"value": -1.0}})
    layer.build((None, 3))
    l2, l1 = layer.losses
    torch.testing.assert_close(l2, torch.tensor(0.01 * 4 * 3))
    torch.testing.assert_close(l1, torch.tensor(0.5 * 3))
    sum(layer.losses).backward()
    torch.testing.assert_close(layer.gamma.grad, torch.full((3,), 0.04))
    torch.testing.assert_close(layer.beta.grad, torch.full((3,), -0.5))
    both = BatchNormalization(gamma_regularizer="l1_l2", beta_regularizer=lambda w: w.sum() * 0)
    both.build((None, 2))
    torch.testing.assert_close(both.losses[0], torch.tensor(0.01 * 2 + 0.01 * 2))
    assert BatchNormalization(center=False, beta_regularizer="l2").losses == []


@pytest.mark.tf
@pytest.mark.parametrize("reg", ["l2", "l1", {"class_name": "L1L2", "config": {"l1": 0.003, "l2": 0.02}}])
def test_activity_regularizer_matches_tf_keras(reg):
    """Keras's ``activity_regularizer``: after each call (training, then inference) ``losses`` ends
    with the penalty of that call's output over the batch size, as tf_keras's; the input and gamma
    gradients of output + penalty match tf.GradientTape's."""
    tf, tf_keras = _tf()
    theirs = tf_keras.layers.BatchNormalization(activity_regularizer=reg, gamma_regularizer="l2", momentum=0.5)
    ours = BatchNormalization(activity_regularizer=reg, gamma_regularizer="l2", momentum=0.5)
    rs = np.random.RandomState(3)
    for training in (True, False, True):
        x = (rs.randn(5, 4, 3) * rs.rand(3) * 3 + rs.randn(3)).astype(np.float32)
        dy = rs.randn(5, 4, 3).astype(np.float32)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y_tf = theirs(xt, training=training)
            loss_tf = tf.reduce_sum(y_tf * dy) + tf.add_n(theirs.losses)
        g_tf = tape.gradient(loss_tf, [xt, theirs.gamma])
        xo = torch.from_numpy(x).requires_grad_(True)
        ours.zero_grad(set_to_none=True)
        y = ours(xo, training=training)
        assert len(ours.losses) == len(theirs.losses) == 2
        for a, b in zip(ours.losses, theirs.losses):  # (the activity penalty first, as Keras orders them)
            np.testing.assert_allclose(a.detach().numpy(), b.numpy(), rtol=1e-5)
        (torch.sum(y * torch.from_numpy(dy)) + sum(ours.losses)).backward()
        np.testing.assert_allclose(xo.grad.numpy(), g_tf[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours.gamma.grad.numpy(), g_tf[1].numpy(), rtol=1e-4, atol=1e-5)


def test_activity_regularizer_state():
    """The activity penalty is the last call's only; a layer holding one deep-copies and pickles
    (without it, as Keras drops call losses), an empty batch gives a zero penalty, and without an
    activity_regularizer nothing is kept."""
    layer = BatchNormalization(activity_regularizer="l2", axis=1)
    y = layer(torch.randn(4, 3, 5), training=True)
    torch.testing.assert_close(layer.losses[0], 0.01 * y.detach().square().sum() / 4)
    y = layer(torch.randn(6, 3, 5) + 2, training=False)
    assert len(layer.losses) == 1
    torch.testing.assert_close(layer.losses[0], 0.01 * y.detach().square().sum() / 6)
    for clone in (copy.deepcopy(layer), torch.load(_saved(layer), weights_only=False)):
        assert clone.losses == [] and clone.activity_regularizer == layer.activity_regularizer
    layer(torch.randn(0, 3, 5), training=True)
    assert layer.losses[0].item() == 0.0
    plain = BatchNormalization()
    plain(torch.randn(4, 3), training=True)
    assert plain.losses == [] and plain._activity_loss is None


def test_layer_pickled_before_the_keras_base_arguments_loads():
    """A layer pickled by a bn_cuda without dtype / activity_regularizer / weights (its state lacks
    those attributes) loads and runs as a layer without them."""
    layer = BatchNormalization(axis=1, momentum=0.5)
    x = torch.randn(4, 3, 5)
    layer(x, training=True)
    state = layer.__getstate__()
    for name in ("dtype_policy", "activity_regularizer", "_activity_loss", "_initial_weights", "_batch_input_shape"):
        del state[name]
    old = BatchNormalization.__new__(BatchNormalization)
    old.__setstate__(state)
    torch.testing.assert_close(old(x, training=False), layer(x, training=False))
    assert old.losses == [] and old.dtype_policy is None and old.get_config() == layer.get_config()


def _saved(module) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf


@pytest.mark.tf
def test_regularizer_losses_match_tf_keras():
    tf, tf_keras = _tf()
    kwargs = dict(gamma_regularizer="l1_l2", beta_regularizer="l2",
                  gamma_initializer={"class_name": "RandomNormal", "config": {"seed": 1}},
                  beta_initializer="random_uniform")
    theirs = tf_keras.layers.BatchNormalization(**kwargs)
    theirs.build((None, 5))
    ours = BatchNormalization.from_keras(theirs)
    np.testing.assert_allclose([t.item() for t in ours.losses], [float(t) for t in theirs.losses], rtol=1e-6)


def test_constraints_apply():
    layer = BatchNormalization(gamma_constraint="non_neg", beta_constraint=constraints.MaxNorm(1.0))
    layer.build((None, 4))
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([-1.0, 2.0, -3.0, 4.0]))
        layer.beta.copy_(torch.tensor([3.0, 0.0, 4.0, 0.0]))
    layer.apply_constraints()
    assert torch.equal(layer.gamma.detach(), torch.tensor([0.0, 2.0, 0.0, 4.0]))
    torch.testing.assert_close(layer.beta.detach(), torch.tensor([0.6, 0.0, 0.8, 0.0]))
    unit = constraints.get("unit_norm")(torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(unit, torch.tensor([0.6, 0.8]))
    mm = constraints.get({"class_name": "MinMaxNorm", "config": {"min_value": 10.0, "max_value": 20.0}})
    torch.testing.assert_close(mm(torch.tensor([3.0, 4.0])), torch.tensor([6.0, 8.0]))


def test_register_constraints_after_optimizer_step():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), BatchNormalization(gamma_constraint="non_neg"),
                                torch.nn.Sequential(BatchNormalization(beta_constraint=constraints.MaxNorm(0.1))))
    x = _data(8, 3)
    model[1].train()
    model(x)  # build
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    handle = bn_cuda.register_constraints(opt, model)
    loss = model(x).mul(torch.linspace(-1, 1, 4)).pow(3).sum()
    loss.backward()
    opt.step()
    assert (model[1].gamma >= 0).all() and (model[1].gamma == 0).any()
    assert model[2][0].beta.norm() <= 0.1 + 1e-6
    handle.remove()
    with torch.no_grad():
        model[1].gamma.fill_(-1.0)
    opt.zero_grad()
    opt.step()
    assert (model[1].gamma < 0).all()  # hook removed


@pytest.mark.tf
def test_constraints_match_tf_keras():
    tf, tf_keras = _tf()
    w = np.array([[-1.0, 2.0, 3.0], [0.5, -4.0, 1.0]], dtype=np.float32)
    for name in ("non_neg", "max_norm", "unit_norm", "min_max_norm"):
        ours = constraints.get(name)(torch.from_numpy(w)).numpy()
        theirs = tf_keras.constraints.get(name)(tf.constant(w)).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Config and state


def _config_kwargs():
    return dict(axis=[1, 2], momentum=0.9, epsilon=1e-4, center=False,
                gamma_initializer=initializers.Constant(1.5), moving_variance_initializer="he_normal",
                gamma_regularizer=regularizers.L1L2(l1=0.1, l2=0.2), gamma_constraint="max_norm",
                renorm=True, renorm_clipping={"rmax": 3.0}, renorm_momentum=0.5, fused=False,
                trainable=False, virtual_batch_size=2, name="bn_cfg", synchronized=True)


def test_config_round_trip():
    layer = BatchNormalization(**_config_kwargs())
    config = layer.get_config()
    assert config["axis"] == [1, 2] and config["virtual_batch_size"] == 2 and config["renorm_clipping"] == {"rmax": 3.0}
    assert config["gamma_initializer"] == {"module": "keras.initializers", "class_name": "Constant",
                                           "config": {"value": 1.5}, "registered_name": None}
    clone = BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert clone.gamma_regularizer == layer.gamma_regularizer and not clone.trainable
    plain = BatchNormalization()
    assert "renorm" not in plain.get_config() and "virtual_batch_size" not in plain.get_config()
    assert BatchNormalization.from_config(plain.get_config()).get_config() == plain.get_config()


@pytest.mark.parametrize("given, name", [
    ("float64", "float64"), (torch.float64, "float64"), (np.dtype("float16"), "float16"), (np.float32, "float32"),
    ("mixed_bfloat16", "mixed_bfloat16"),
    ({"module": "keras.mixed_precision", "class_name": "Policy", "config": {"name": "mixed_float16"}}, "mixed_float16"),
])
def test_dtype_policy_forms(given, name):
    """Keras's ``dtype`` argument in each form Keras code writes it; the layer builds its weights in
    the policy's variable dtype, casts inputs to its compute dtype (the gradient returns in the
    input's dtype) and keeps the policy through get_config / from_config."""
    layer = BatchNormalization(axis=1, dtype=given, momentum=0.5)
    assert layer.dtype_policy == name
    compute, variable = {"float64": (torch.float64, torch.float64), "float16": (torch.float16, torch.float32),
                         "float32": (torch.float32, torch.float32), "mixed_bfloat16": (torch.bfloat16, torch.float32),
                         "mixed_float16": (torch.float16, torch.float32)}[name]
    assert layer.compute_dtype == compute and layer.variable_dtype == variable
    assert f"dtype={name!r}" in repr(layer) and "dtype" not in repr(BatchNormalization())
    x = (torch.randn(6, 3, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1) + 2).float()
    x.requires_grad_(True)
    y = layer(x, training=True)
    assert y.dtype == compute and layer.gamma.dtype == variable and layer.moving_mean.dtype == variable
    y.double().square().sum().backward()
    assert x.grad.dtype == torch.float32
    # Against float64 F.batch_norm on the input as cast (biased variance for normalizing).
    xc = x.detach().to(compute).double()
    want = torch.nn.functional.batch_norm(xc, None, None, training=True, eps=1e-3)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[compute]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * 4)
    clone = BatchNormalization.from_config(layer.get_config())
    assert clone.dtype_policy == name and layer.get_config()["dtype"] == name
    assert "dtype" not in BatchNormalization().get_config()  # (none given: no policy, as before)


@pytest.mark.parametrize("bad", ["int32", "float8", 5, torch.int64, {"config": {"name": "nope"}}])
def test_dtype_policy_refused(bad):
    with pytest.raises(ValueError, match=r"`dtype` must be None, a floating dtype or a Keras dtype policy .*"
                                         r"Received: dtype="):
        BatchNormalization(dtype=bad)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(input_shape=(5, 3)), (None, 5, 3)),
    (dict(input_shape=[7], batch_size=4), (4, 7)),
    (dict(batch_input_shape=(None, 3, 4, 4), axis=1), (None, 3, 4, 4)),
    (dict(input_dim=6), (None, 6)),
])
def test_input_shape_arguments_build_at_construction(kwargs, shape):
    """Keras's base-layer shape arguments build the layer at construction, so that an optimizer
    can be created before the first call and trains the weights the calls use."""
    layer = BatchNormalization(**kwargs)
    assert layer.built and layer.gamma is not None
    assert layer.get_config()["batch_input_shape"] == shape
    assert BatchNormalization.from_config(layer.get_config()).built
    features = shape[1] if kwargs.get("axis") == 1 else shape[-1]
    assert layer.gamma.shape == (features,) and layer.moving_mean.shape == (features,)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(*[4 if d is None else d for d in shape]) * 2 + 1
    layer(x, training=True).mul(torch.linspace(0.1, 1.0, shape[-1])).sum().backward()
    before = layer.beta.detach().clone()
    opt.step()
    assert not torch.equal(layer.beta, before)
    with pytest.raises(ValueError, match="incompatible with the layer"):
        layer(torch.randn(*[4 if d is None else d + 1 for d in shape]), training=True)


@pytest.mark.parametrize("kwargs, name", [
    (dict(input_shape=5), "input_shape"), (dict(input_shape=(5, "a")), "input_shape"),
    (dict(batch_input_shape=(None, -2)), "batch_input_shape"), (dict(input_dim=2.5), "input_dim"),
    (dict(input_shape=(3,), batch_size=True), "batch_size"),
])
def test_input_shape_arguments_refused(kwargs, name):
    with pytest.raises(TypeError, match=f"`{name}` must"):
        BatchNormalization(**kwargs)


def test_float64_variables_fused_and_composite_agree():
    """With float64 variables (a "float64" policy) every fused variant and the composite path agree
    to float64 rounding over several steps (renorm included, which tf_keras itself cannot run in
    float64), moving variables and gradients too."""
    for config in ({}, {"virtual_batch_size": 2}, {"renorm": True, "renorm_clipping": {"rmax": 1.1, "dmax": 0.2}},
                   {"renorm": True, "virtual_batch_size": 3}):
        layers = [BatchNormalization(dtype="float64", momentum=0.6, renorm_momentum=0.7, fused=f, **config)
                  for f in (None, False)]
        g = torch.Generator().manual_seed(7)
        for step in range(3):
            x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 2.0, 4.0]) + step
            grads = []
            for layer in layers:
                xi = x.clone().requires_grad_(True)
                y = layer(xi, training=True)
                (y * torch.linspace(-1, 1, 3, dtype=torch.float64)).sum().backward()
                grads.append((y.detach(), xi.grad))
            torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)
        for (n, a), (_, b) in zip(layers[0].named_buffers(), layers[1].named_buffers()):
            if n == "_device_anchor":
                continue
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{config} {n}")


def test_config_omits_adjustment_with_warning():
    layer = BatchNormalization(adjustment=lambda s: (1.0, 0.0))
    with pytest.warns(UserWarning, match="`adjustment` function .* cannot be serialized"):
        config = layer.get_config()
    assert "adjustment" not in config and BatchNormalization.from_config(config).adjustment is None


@pytest.mark.tf
def test_config_interchange_with_tf_keras():
    tf, tf_keras = _tf()
    config = BatchNormalization(**dict(_config_kwargs(), trainable=True)).get_config()
    theirs = tf_keras.layers.BatchNormalization.from_config(config)
    theirs_config = theirs.get_config()
    for key in ("axis", "momentum", "epsilon", "center", "renorm_clipping", "virtual_batch_size"):
        assert theirs_config[key] == config[key], key
    back = BatchNormalization.from_config(theirs_config)
    assert back.gamma_regularizer == regularizers.L1L2(l1=theirs.gamma_regularizer.l1, l2=theirs.gamma_regularizer.l2)
    assert back.gamma_constraint == constraints.MaxNorm(2, 0)


@pytest.mark.tf
@pytest.mark.parametrize("kwargs", [{"renorm": True}, {"virtual_batch_size": 2}, {"axis": [1, 2]}])
def test_config_with_fused_true_that_tf_keras_cannot_fuse(kwargs):
    """What the README says of the config's exception: tf_keras refuses fused=True where it has no
    fused kernel (bn_cuda's kernels run these); the same config with fused=None loads in both."""
    tf, tf_keras = _tf()
    with pytest.raises((ValueError, TypeError), match="`fused=True`"):  # (a TypeError wrapping it, or not)
        tf_keras.layers.BatchNormalization.from_config(BatchNormalization(fused=True, **kwargs).get_config())
    config = BatchNormalization(fused=None, **kwargs).get_config()
    assert tf_keras.layers.BatchNormalization.from_config(config).get_config().get("fused") is None


@pytest.mark.parametrize("fused", [None, False])
def test_state_dict_round_trip(fused):
    layer = BatchNormalization(axis=1, renorm=fused is False, fused=fused)
    for s in range(3):
        layer(_data(6, 5, 3, seed=s).transpose(1, 2).contiguous(), training=True)
    sd = layer.state_dict()
    assert set(sd) >= {"gamma", "beta", "moving_mean", "moving_variance"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = BatchNormalization(axis=1, renorm=fused is False, fused=fused)
    fresh.load_state_dict(loaded)  # unbuilt: builds from the saved input spec
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.state_dict()[k], v), k
    x = _data(4, 3, 5, seed=9)
    torch.testing.assert_close(fresh(x, training=False), layer(x, training=False), rtol=0, atol=0)
    built = BatchNormalization(axis=1, renorm=fused is False, fused=fused)
    built.build((None, 3, 5))
    built.load_state_dict(sd)
    torch.testing.assert_close(built(x, training=False), layer(x, training=False), rtol=0, atol=0)
    wrong = BatchNormalization(axis=1, renorm=fused is False)
    wrong.build((None, 4, 5))
    with pytest.raises(Exception):
        wrong.load_state_dict(sd)


def test_state_dict_values_are_tensors_and_old_dict_extra_state_loads():
    """The build shape is saved as an int64 tensor (tools such as safetensors and torch's
    TorchScript ONNX exporter take only tensors); the dict of earlier releases still loads."""
    unbuilt = BatchNormalization(axis=[1, 3], virtual_batch_size=2)
    assert all(isinstance(v, torch.Tensor) for v in unbuilt.state_dict().values())
    layer = BatchNormalization(axis=[1, 3], virtual_batch_size=2)
    x = _data(4, 3, 5, 2, seed=1)
    layer(x, training=True)
    sd = layer.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values()), {k: type(v) for k, v in sd.items()}
    assert sd["_extra_state"].tolist() == [-1, 3, -1, 2]
    old = dict(sd, _extra_state={"input_shape": [None, 3, None, 2]})
    for state in (sd, old):
        fresh = BatchNormalization(axis=[1, 3], virtual_batch_size=2)
        fresh.load_state_dict(state)  # unbuilt: builds from the saved spec
        assert fresh._build_shape == [None, 3, None, 2]
        torch.testing.assert_close(fresh(x, training=False), layer(x, training=False), rtol=0, atol=0)
    wrong = BatchNormalization(axis=[1, 3], virtual_batch_size=2)
    wrong.build((None, 4, None, 2))
    with pytest.raises(ValueError, match="already built"):
        wrong.load_state_dict(sd)
    empty = BatchNormalization(axis=[1, 3], virtual_batch_size=2)
    empty.load_state_dict(unbuilt.state_dict())  # an unbuilt layer's state: nothing to build
    assert not empty.built


# ----------------------------------------------------------------------------------------------
# Keras import


def _trained_tf_layer(tf, tf_keras, shape, steps=3, **kwargs):
    layer = tf_keras.layers.BatchNormalization(**kwargs)
    rs = np.random.RandomState(0)
    layer.build(shape)
    for w in layer.weights:
        w.assign((0.5 + rs.rand(*w.shape)).astype(np.float32))
    for _ in range(steps):
        layer((rs.randn(*shape) * 2 + 1).astype(np.float32), training=True)
    return layer


@pytest.mark.tf
@pytest.mark.parametrize("kwargs, shape", [
    ({}, (4, 3)),
    ({"axis": 1, "momentum": 0.9, "epsilon": 1e-4}, (4, 3, 5, 5)),
    ({"axis": [1, 2], "center": False}, (4, 3, 5)),
    ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}, "renorm_momentum": 0.5}, (6, 3)),
    ({"axis": 1, "virtual_batch_size": 2, "renorm": True}, (4, 3, 5)),
    ({"gamma_regularizer": "l2", "beta_constraint": "non_neg", "scale": False}, (4, 3)),
])
def test_from_keras(kwargs, shape):
    tf, tf_keras = _tf()
    theirs = _trained_tf_layer(tf, tf_keras, shape, **kwargs)
    ours = BatchNormalization.from_keras(theirs)
    assert ours.name == theirs.name
    for name in ("gamma", "beta") + _VARS:
        tv = getattr(theirs, name, None)
        if tv is not None:
            np.testing.assert_array_equal(getattr(ours, name).detach().numpy(), tv.numpy(), err_msg=name)
    x = (np.random.RandomState(1).randn(*shape) * 2 + 1).astype(np.float32)
    np.testing.assert_allclose(ours(torch.from_numpy(x), training=False).detach().numpy(),
                               theirs(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    if "virtual_batch_size" not in kwargs:
        np.testing.assert_allclose(ours(torch.from_numpy(x), training=True).detach().numpy(),
                                   theirs(x, training=True).numpy(), rtol=1e-5, atol=1e-5)
    unbuilt = BatchNormalization.from_keras(tf_keras.layers.BatchNormalization(**kwargs), fused=False)
    assert not unbuilt.built and unbuilt.fused is False


@pytest.mark.tf
@pytest.mark.parametrize("policy", ["float64", "mixed_float16", "float32"])
def test_from_keras_keeps_the_dtype_policy(policy):
    """A tf_keras layer with a dtype policy and an input shape ports with them: the policy's
    weight dtype (a float64 layer's weights bit for bit, not rounded to float32), its input cast
    and output dtype, and the config's batch_input_shape builds the layer."""
    tf, tf_keras = _tf()
    theirs = tf_keras.layers.BatchNormalization(dtype=policy, input_shape=(5, 3), momentum=0.7)
    x = (np.random.RandomState(2).randn(4, 5, 3) * 2 + 1).astype(np.float32)
    theirs(x, training=True)
    ours = BatchNormalization.from_keras(theirs)
    assert ours.dtype_policy == policy and ours.built
    back = tf_keras.layers.BatchNormalization.from_config(ours.get_config())  # (policy and shape go back too)
    assert back.get_config()["dtype"] == theirs.get_config()["dtype"]
    assert tuple(back.get_config()["batch_input_shape"]) == (None, 5, 3)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        value = getattr(theirs, name).numpy()
        assert str(getattr(ours, name).dtype) == f"torch.{value.dtype}", name
        np.testing.assert_array_equal(getattr(ours, name).detach().numpy(), value, err_msg=name)
    y, y_tf = ours(torch.from_numpy(x), training=False), theirs(x, training=False)
    assert str(y.dtype) == f"torch.{y_tf.dtype.name}"
    tol = {"float64": 1e-12, "mixed_float16": 1e-3, "float32": 1e-5}[policy]
    np.testing.assert_allclose(y.detach().double().numpy(), y_tf.numpy().astype(np.float64), rtol=tol, atol=tol)


@pytest.mark.tf
def test_from_keras_adjustment_is_not_ported():
    tf, tf_keras = _tf()
    theirs = tf_keras.layers.BatchNormalization(adjustment=lambda s: (tf.ones(s[-1:]), tf.zeros(s[-1:])))
    theirs.build((None, 3))
    with pytest.warns(UserWarning, match="cannot be ported"):
        ours = BatchNormalization.from_keras(theirs)
    assert ours.adjustment is None
    ported = BatchNormalization.from_keras(theirs, adjustment=lambda s: (torch.ones(s[-1:]), torch.zeros(s[-1:])))
    assert ported.adjustment is not None


@pytest.mark.tf
def test_from_keras3_layer():
    _tf()
    keras = pytest.importorskip("keras")
    if not hasattr(keras, "version") or not keras.version().startswith("3"):
        pytest.skip("Keras 3 not installed")
    theirs = keras.layers.BatchNormalization(axis=1, momentum=0.8, renorm=True)
    theirs.build((None, 3, 4))
    rs = np.random.RandomState(0)
    for w in theirs.weights:
        w.assign((0.5 + rs.rand(*w.shape)).astype(np.float32))
    ours = BatchNormalization.from_keras(theirs)
    x = rs.randn(2, 3, 4).astype(np.float32)
    np.testing.assert_allclose(ours(torch.from_numpy(x), training=False).detach().numpy(),
                               np.asarray(theirs(x, training=False)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Ghost batches, synchronized hooks


def test_ghost_membership_is_strided():
    """tf_keras's reshape puts sample i in ghost i % (batch // virtual_batch_size)."""
    x = _data(6, 2)
    layer = BatchNormalization(virtual_batch_size=3, center=False, scale=False, epsilon=1e-12)
    y = layer(x, training=True)
    ghost = x[[1, 3, 5]]
    torch.testing.assert_close(y[[1, 3, 5]], (ghost - ghost.mean(0)) / ghost.std(0, unbiased=False))


def test_ghost_batches_with_mask():
    x = _data(8, 2)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    layer = BatchNormalization(virtual_batch_size=4, momentum=0.0)
    layer(x, training=True, mask=mask)
    ghosts = [[i for i in range(j, 8, 2) if mask[i]] for j in range(2)]
    expected = torch.stack([x[g].mean(0) for g in ghosts]).mean(0)
    torch.testing.assert_close(layer.moving_mean, expected.reshape(1, 1, 2))


@pytest.mark.parametrize("fused", [None, False])
def test_synchronized_without_process_group_is_unsynchronized(fused):
    x = _data(9, 3)
    a = BatchNormalization(synchronized=True, fused=fused, momentum=0.5)
    b = BatchNormalization(fused=fused, momentum=0.5)
    torch.testing.assert_close(a(x, training=True), b(x, training=True))
    torch.testing.assert_close(a.moving_variance, b.moving_variance)  # biased, as tf_keras's sync path


def test_stats_hook_sees_local_sums():
    seen = []

    def hook(stats):
        seen.append(stats.detach().clone())
        return stats * 2  # as if a second process had the same batch

    x = _data(5, 3)
    layer = BatchNormalization(synchronized=True, momentum=0.0)
    layer.stats_hook = hook
    y = layer(x, training=True)
    assert len(seen) == 1 and seen[0].shape == (3, 1, 3)
    torch.testing.assert_close(seen[0][0, 0], x.sum(0))
    torch.testing.assert_close(seen[0][2, 0], torch.full((3,), 5.0))
    torch.testing.assert_close(y, BatchNormalization(momentum=0.0)(x, training=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.moving_mean, x.mean(0))
    layer.fused = True
    with pytest.raises(ValueError, match=r"`fused=True` is not supported with `synchronized=True` across processes"):
        layer(x, training=True)


def test_synchronized_with_single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = _data(7, 3).requires_grad_(True)
        a, b = BatchNormalization(synchronized=True), BatchNormalization()
        ya, yb = a(x, training=True), b(x, training=True)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(a.moving_variance, b.moving_variance)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Devices


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kwargs, shape", [
    ({}, (7, 3)),
    ({"axis": 1}, (3, 17, 7, 7)),
    ({"axis": [1, 3]}, (3, 3, 7, 5)),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}}, (9, 5)),
    ({"virtual_batch_size": 3, "axis": 1}, (6, 3, 7)),
])
@pytest.mark.parametrize("fused", [None, False])
def test_cuda_matches_cpu(kwargs, shape, dtype, fused):
    """The layer on CUDA (weights built on the input's device) matches the same layer on CPU."""
    torch.manual_seed(0)
    ref = BatchNormalization(fused=fused, **kwargs)
    dev = BatchNormalization(fused=fused, **kwargs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for step in range(3):
        x = (torch.randn(*shape) * 2 + 0.5).to(dtype)
        xc = x.cuda().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        yc, yr = dev(xc, training=True), ref(xr, training=True)
        assert dev.gamma.is_cuda and dev.moving_mean.is_cuda and yc.dtype == dtype
        g = torch.randn(*shape).to(dtype)
        yc.backward(g.cuda())
        yr.backward(g)
        torch.testing.assert_close(yc.cpu().float(), yr.float(), **tol)
        torch.testing.assert_close(xc.grad.cpu().float(), xr.grad.float(), **tol)
        torch.testing.assert_close(dev.gamma.grad.cpu(), ref.gamma.grad, **tol)
        for n in _VARS:
            if getattr(ref, n, None) is not None:
                torch.testing.assert_close(getattr(dev, n).cpu(), getattr(ref, n), rtol=1e-5, atol=1e-5)
    x = (torch.randn(*shape) * 2 + 0.5).to(dtype)
    torch.testing.assert_close(dev(x.cuda(), training=False).cpu().float(), ref(x, training=False).float(), **tol)


def test_broadcasts_to_agrees_with_torch():
    """bn_cuda.ops.broadcasts_to (the adjustment / mask shape checks) says what
    torch.broadcast_shapes(a, b) == b says, over random shapes with 0, 1 and mismatched dims."""
    import random

    rng = random.Random(0)
    for _ in range(2000):
        target = tuple(rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 4)))
        shape = tuple(rng.choice([0, 1, 2, 3, 5]) if rng.random() < 0.3 else (target[i] if i < len(target) else 1)
                      for i in range(rng.randint(0, 5)))
        shape = shape[-len(target):] if target and rng.random() < 0.5 and len(shape) > len(target) else shape
        try:
            want = torch.broadcast_shapes(shape, target) == torch.Size(target)
        except RuntimeError:
            want = False
        assert bn_cuda.ops.broadcasts_to(shape, target) == want, (shape, target)


@pytest.mark.parametrize("name, kwargs", [
    ("plain", dict()),
    ("plain-two-axes", dict(axis=[1, 2])),
    ("ghost", dict(virtual_batch_size=2)),
    ("renorm", dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})),
    ("ghost+renorm", dict(virtual_batch_size=4, renorm=True)),
    ("adjustment", dict(adjustment=lambda s: (torch.full(s[-1:], 1.1), torch.full(s[-1:], 0.1)))),
    ("mask", dict()),
])
def test_fused_variants_under_torch_compile_fullgraph(name, kwargs):
    """torch.compile(fullgraph=True) traces a training step of the layer, plain (the fused op) and
    with every fused variant (the Python composition of the staged ops, whose fake kernels it
    uses), with the eager step's results: loss, input / gamma / beta gradients, moving variables."""
    layers = [BatchNormalization(momentum=0.7, **kwargs) for _ in range(2)]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, 6, generator=g) * 2 + 1
    mask = (torch.rand(8, 5, generator=g) > 0.3) if name == "mask" else None
    for layer in layers:
        layer.build(x.shape)

    def step(layer, x):
        y = layer(x, training=True, mask=mask)
        return (y * y * torch.linspace(0.5, 1.5, 6)).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    losses, xgrads = [], []
    for layer, fn in zip(layers, (compiled, step)):
        xi = x.clone().requires_grad_(True)
        losses.append(fn(layer, xi))
        losses[-1].backward()
        xgrads.append(xi.grad)
    a, b = layers
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xgrads[0], xgrads[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.gamma.grad, b.gamma.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.beta.grad, b.beta.grad, rtol=1e-5, atol=1e-6)
    for (n, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("ghost", dict(virtual_batch_size=4), (5, 3)),
    ("ghost-nhwc", dict(virtual_batch_size=2), (3, 7, 5)),
    ("ghost-nchw", dict(axis=1, virtual_batch_size=4), (3, 7, 5)),
    ("ghost-two-axes", dict(axis=[1, 2], virtual_batch_size=2), (5, 3)),
    ("ghost+renorm", dict(virtual_batch_size=4, renorm=True,
                          renorm_clipping={"rmin": 0.7, "rmax": 1.5, "dmax": 0.3}), (3, 7, 5)),
    ("ghost+mask", dict(virtual_batch_size=4), (6, 5)),
])
def test_ghost_batches_compile_one_dynamic_graph_for_every_batch_size(name, kwargs, shape):
    """The ghost count ``batch // virtual_batch_size`` is a SymInt of the staged ops' schemas: after
    torch.compile's usual static first graph, one dynamic graph serves every later batch size (an
    int there specialized the graph on it: one graph per batch size), with the eager step's results
    (output, input / gamma / beta gradients, moving variables) at every size."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    layers = [BatchNormalization(momentum=0.6, **kwargs) for _ in range(2)]
    for layer in layers:
        layer.build((8,) + shape)
    masked = name.endswith("mask")

    def step(layer, x, mask):
        return layer(x, training=True, mask=mask)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(13)
    for n in (8, 12, 20, 16, 28):
        x = torch.randn((n,) + shape, generator=g) * torch.linspace(0.5, 3.0, shape[-1]) + 2
        mask = (torch.rand((n,) + shape[:-1], generator=g) > 0.3) if masked else None
        gy = torch.randn((n,) + shape, generator=g)
        grads = []
        for layer, fn in zip(layers, (compiled, step)):
            xi = x.clone().requires_grad_(True)
            y = fn(layer, xi, mask)
            (y * gy).sum().backward()
            grads.append((y.detach(), xi.grad))
        (y0, gx0), (y1, gx1) = grads
        torch.testing.assert_close(y0, y1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx0, gx1, rtol=1e-5, atol=1e-6)
        a, b = layers
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
        for (buf, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7, msg=f"{buf} after batch {n}")
    assert counter.frame_count == 2, f"{counter.frame_count} graphs for 5 batch sizes"


def test_ghost_layer_buffers_replaced_between_steps():
    """Ghost-batch layers keep their (1, 1, C, 1, 1) moving variables as cached flat views between
    steps: a buffer whose memory is swapped (``.data = ...``), replaced (``load_state_dict``,
    ``.to(dtype)``, a non-contiguous tensor) or updated in place must be the one the next step
    reads and updates. Each step
    is checked against a fresh layer given the same state (which cannot have a stale view)."""
    torch.manual_seed(5)
    x = torch.randn(16, 3, 5, 5, dtype=torch.float64).float()
    layer = BatchNormalization(axis=1, virtual_batch_size=4, renorm=True, momentum=0.5)
    layer(x, training=True)

    def check_step():
        fresh = BatchNormalization(axis=1, virtual_batch_size=4, renorm=True, momentum=0.5)
        fresh(x, training=True)
        fresh.to(layer.moving_mean.dtype)
        fresh.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()})
        y, y_ref = layer(x, training=True), fresh(x, training=True)
        assert torch.equal(y, y_ref)
        for (name, a), (_, b) in zip(layer.named_buffers(), fresh.named_buffers()):
            assert torch.equal(a, b), name

    check_step()
    layer.moving_mean.data = torch.full_like(layer.moving_mean, 0.25)  # new memory, same tensor object
    check_step()
    assert not torch.equal(layer.moving_mean, torch.full_like(layer.moving_mean, 0.25))  # the step moved it
    layer.load_state_dict({k: v + 1.0 if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in layer.state_dict().items()})
    check_step()
    with torch.no_grad():
        layer.moving_variance.mul_(3.0)  # in place: the cached view sees it
    check_step()
    with torch.no_grad():  # a non-contiguous buffer (every other element of a longer one)
        strided = torch.empty(2 * layer.moving_mean.numel(), dtype=layer.moving_mean.dtype)[::2]
        strided = strided.view(layer.moving_mean.shape).copy_(layer.moving_mean)
    layer.moving_mean = strided
    assert not layer.moving_mean.is_contiguous()
    check_step()  # (the step makes it contiguous, then updates it)
    layer.to(torch.float64)
    x = x.double()
    check_step()
    assert layer.moving_mean.dtype == torch.float64


@pytest.mark.parametrize("kwargs", [{"virtual_batch_size": 4}, {"axis": [1, 2]},
                                    {"virtual_batch_size": 2, "renorm": True}])
def test_jit_trace_reads_the_moving_statistics(kwargs):
    """torch.jit.trace of a layer whose buffers are not flat (ghost batches, several axes) reads the
    moving statistics from the module, also after an eager call warmed the layer's cached flat views
    (a view recorded as a constant would be cut off from the buffer once saved and loaded)."""
    torch.manual_seed(0)
    layer = BatchNormalization(**kwargs)
    x = torch.randn(8, 3, 5) * torch.rand(1, 3, 5) + torch.randn(1, 3, 5)
    layer(x, training=True)  # builds and moves the statistics away from 0 / 1
    layer.eval()
    want = layer(x)  # eager: warms the cache
    traced = torch.jit.trace(layer, (x,))  # (its check runs the trace twice: the graphs must agree)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    assert torch.equal(loaded(x), want)
    with torch.no_grad():
        loaded.moving_mean.add_(0.5)
        layer.moving_mean.add_(0.5)
    got = loaded(x)
    assert torch.equal(got, layer(x)) and not torch.equal(got, want)


@pytest.mark.parametrize("kwargs", [{"axis": -1, "virtual_batch_size": 2}, {"axis": [1, 2]},
                                    {"axis": -1, "virtual_batch_size": 4, "renorm": True}])
def test_torch_func_grad_with_buffers_passed_in(kwargs):
    """torch.func's recipe passes parameters AND buffers through functional_call (wrapped tensors
    without storage): layers whose buffers are not flat (ghost batches, several axes) take them
    (their flat views are not cached then) and give eager autograd's gradients."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6) * 2 + 1
    layer = BatchNormalization(**kwargs)
    layer.build(x.shape)
    ref = copy.deepcopy(layer)
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def loss(p, b, xx):
        return torch.func.functional_call(layer, {**p, **b}, (xx,), {"training": True}).pow(2).sum()

    got = torch.func.grad(loss, argnums=(0, 2))(params, buffers, x)
    xr = x.clone().requires_grad_(True)
    ref(xr, training=True).pow(2).sum().backward()
    torch.testing.assert_close(got[1], xr.grad, rtol=1e-5, atol=1e-5)
    for k, p in ref.named_parameters():
        torch.testing.assert_close(got[0][k], p.grad, rtol=1e-5, atol=1e-5, msg=k)
    for k, b in ref.named_buffers():  # (the buffers passed in took the step's update, as the layer's own)
        torch.testing.assert_close(buffers[k], b, rtol=1e-6, atol=1e-6, msg=k)


def test_compile_fullgraph_with_a_mask_on_the_keras_fused_path():
    """On tf_keras's fused path (4-D, axis 3) the mask is ignored with a warning; traced, the warning
    (which dynamo cannot trace) is left out, so fullgraph=True compiles the step."""
    torch.manual_seed(0)
    layer = BatchNormalization(axis=-1)
    x, mask = torch.randn(8, 4, 5, 6), torch.rand(8, 4, 5) > 0.3
    layer.build(x.shape)
    ref = copy.deepcopy(layer)
    step = torch.compile(lambda x, m: layer(x, training=True, mask=m), backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`"):
        want = ref(x, training=True, mask=mask)
    torch.testing.assert_close(step(x, mask), want)
    torch.testing.assert_close(layer.moving_variance, ref.moving_variance)


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"center": False, "axis": [1, 2]}, {"virtual_batch_size": 2}])
def test_get_and_set_weights_in_keras_order(kwargs):
    """get_weights / set_weights in Keras's order (gamma, beta, moving_mean, moving_variance, then
    renorm's moving_stddev, renorm_mean, renorm_stddev), and Keras's ``weights=`` argument set at
    build (lazily at the first call, or at construction with input_shape); a wrong list is refused
    naming the lengths or shapes and writes nothing (a lazy build it fails is undone)."""
    shape = (4, 3, 5)
    layer = BatchNormalization(**kwargs)
    layer.build(shape)
    names = [n for n in ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
                         "renorm_stddev") if getattr(layer, n, None) is not None]
    rs = np.random.RandomState(5)
    values = [rs.rand(*getattr(layer, n).shape) + 0.5 for n in names]
    layer.set_weights(values)
    for n, v, got in zip(names, values, layer.get_weights()):
        np.testing.assert_array_equal(got, v.astype(np.float32), err_msg=n)
        assert torch.equal(getattr(layer, n), torch.from_numpy(v).float()), n
    before = [w.copy() for w in layer.get_weights()]
    with pytest.raises(ValueError, match=f"weight list of length {len(values) - 1}, but the layer was expecting "
                                         f"{len(values)} weights"):
        layer.set_weights(values[:-1])
    bad = values[:-1] + [np.ones(7)]
    with pytest.raises(ValueError, match=r"weight shape .* is not compatible with provided weight shape \(7,\)"):
        layer.set_weights(bad)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    lazy = BatchNormalization(weights=values, **kwargs)
    assert not lazy.built
    x = torch.randn(*shape)
    torch.testing.assert_close(lazy(x, training=False), layer(x, training=False))
    eager = BatchNormalization(weights=values, input_shape=shape[1:], **kwargs)
    assert eager.built and all(np.array_equal(a, b) for a, b in zip(eager.get_weights(), layer.get_weights()))
    wrong = BatchNormalization(weights=values[:-1], **kwargs)
    with pytest.raises(ValueError, match="expecting"):
        wrong(x, training=True)
    assert not wrong.built and wrong.gamma is None and wrong.moving_mean is None


@pytest.mark.tf
def test_set_weights_from_tf_keras_get_weights():
    tf, tf_keras = _tf()
    theirs = _trained_tf_layer(tf, tf_keras, (6, 3), renorm=True)
    ours = BatchNormalization(renorm=True, input_shape=(3,))
    ours.set_weights(theirs.get_weights())
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.RandomState(6).randn(6, 3).astype(np.float32)
    np.testing.assert_allclose(ours(torch.from_numpy(x), training=False).detach().numpy(),
                               theirs(x, training=False).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.tf
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"center": False}, {"trainable": False, "renorm": True}])
def test_weight_lists_match_tf_keras(kwargs):
    """weights / trainable_weights / non_trainable_weights name the same variables in the same
    order as tf_keras's, count_params counts the same, compute_output_shape returns the input's."""
    tf, tf_keras = _tf()
    theirs = tf_keras.layers.BatchNormalization(**kwargs)
    theirs.build((4, 5, 3))
    ours = BatchNormalization(input_shape=(5, 3), **kwargs)
    by_id = {id(getattr(ours, n)): n for n in ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev",
                                                 "renorm_mean", "renorm_stddev") if getattr(ours, n, None) is not None}
    for attr in ("weights", "trainable_weights", "non_trainable_weights"):
        assert [by_id[id(t)] for t in getattr(ours, attr)] == [w.name.split(":")[0] for w in getattr(theirs, attr)], attr
    assert ours.count_params() == theirs.count_params()
    assert tuple(ours.compute_output_shape((None, 5, 3))) == tuple(theirs.compute_output_shape((None, 5, 3)))
    with pytest.raises(ValueError, match="isn't built"):
        BatchNormalization().count_params()


@pytest.mark.parametrize("cast,dtype", [(lambda m: m.double(), torch.float64), (lambda m: m.half(), torch.float16),
                                        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                                        (lambda m: m, torch.float32)])
@pytest.mark.parametrize("kwargs", [{}, {"virtual_batch_size": 2, "renorm": True}])
def test_cast_before_build_sets_the_weights_dtype(cast, dtype, kwargs):
    """.double() / .half() / .to(dtype) on a layer that is not built yet: the weights are built in
    that dtype, as on a built layer and as torch's lazy modules materialize."""
    x = torch.randn(8, 3, 4, dtype=dtype if dtype != torch.float16 else torch.float32)
    lazy = cast(BatchNormalization(axis=1, **kwargs))
    lazy(x, training=True)
    built = cast(BatchNormalization(axis=1, input_shape=(3, 4), **kwargs))
    built(x, training=True)
    for name in ["gamma", "beta"] + lazy._variables():
        assert getattr(lazy, name).dtype == dtype == getattr(built, name).dtype, name
        torch.testing.assert_close(getattr(lazy, name), getattr(built, name), rtol=0, atol=0)
    # a float64 state_dict loads into an unbuilt .double() layer without rounding
    src = BatchNormalization(axis=1, dtype="float64")
    src.build((8, 3, 4))
    with torch.no_grad():
        src.moving_mean.fill_(1 / 3)
    dst = BatchNormalization(axis=1).double()
    dst.load_state_dict(src.state_dict())
    assert dst.moving_mean.dtype == torch.float64 and dst.moving_mean[0].item() == 1 / 3


def test_requires_grad_before_build():
    layer = BatchNormalization(axis=1).requires_grad_(False)
    layer(torch.randn(4, 3), training=True)
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    layer = BatchNormalization(axis=1).requires_grad_(False)
    layer.trainable = True  # the latest word wins
    layer(torch.randn(4, 3), training=True)
    assert layer.gamma.requires_grad


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_checkpoint_recomputation_updates_like_torch(fused, kwargs):
    """Under non-reentrant torch.utils.checkpoint the forward runs twice, and so do the moving
    averages, as for torch's own batch norm modules, on both the fused and the composite path
    (the composite one used to update after the last saved tensor, which the recomputation skips)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(4)
    x = torch.randn(8, 4) * 2 + 1
    layer, twice = BatchNormalization(fused=fused, **kwargs), BatchNormalization(fused=fused, **kwargs)
    twice(x, training=True)
    twice(x, training=True)
    xr = x.clone().requires_grad_()
    checkpoint(lambda t: layer(t, training=True), xr, use_reentrant=False).sum().backward()
    for name in layer._variables():
        torch.testing.assert_close(getattr(layer, name), getattr(twice, name), rtol=0, atol=0)
    # torch's module, for the record of what "as torch" means here
    bn, bn2 = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    bn2(x)
    bn2(x)
    checkpoint(bn, x.clone().requires_grad_(), use_reentrant=False).sum().backward()
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
