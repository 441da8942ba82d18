"""Every error of the issue: the exception type, a message naming the argument and the value
received, and no change to the running statistics when a call fails."""

from __future__ import annotations

import re

import pytest
import torch

import bn_cuda
from bn_cuda.functional import batch_norm
from conftest import HAS_CUDA, make_features, make_input

ops = torch.ops.bn_cuda


class Stats:
    """Running statistics and a snapshot of them, to check that a failing call changed nothing."""

    def __init__(self, c, device, dtype=torch.float32):
        self.rm = make_features([c], dtype, device, "mean")
        self.rv = make_features([c], dtype, device, "var")
        self._rm0, self._rv0 = self.rm.clone(), self.rv.clone()

    def assert_unchanged(self):
        assert torch.equal(self.rm, self._rm0), "a failing call changed running_mean"
        assert torch.equal(self.rv, self._rv0), "a failing call changed running_var"


def _raises(exc, *patterns):
    """pytest.raises whose message must contain every pattern (regex, case-insensitive)."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            r = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for p in patterns:
                assert re.search(p, msg, re.IGNORECASE), f"message {msg!r} does not mention {p!r}"
            return r
    return _Ctx()


@pytest.mark.parametrize("shape", [(5,), ()])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rank_below_two(shape, training, device):
    x = torch.randn(shape, device=device)
    s = Stats(5, device)
    with _raises(ValueError, "input", "at least 2 dimensions", rf"{len(shape)}-D"):
        batch_norm(x, s.rm, s.rv, training=training)
    s.assert_unchanged()
    with _raises(ValueError, "input", "at least 2 dimensions", rf"{len(shape)}-D"):
        ops.forward_train(x, None, None, s.rm, s.rv, 0.1, 1e-5, [0])
    s.assert_unchanged()


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("bad", [(4,), (2,), (3, 1), (1, 4, 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_feature_size_mismatch(name, bad, training, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    args = {"weight": make_features([3], device=device), "bias": make_features([3], device=device, kind="bias"),
            "running_mean": s.rm, "running_var": s.rv}
    args[name] = torch.ones(bad, device=device)
    with _raises(RuntimeError, name, re.escape(str(list(bad))), "3 features", r"\[4, 3, 5\]"):
        batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"], training)
    s.assert_unchanged()


def test_size_mismatch_multi_axis(device):
    x = make_input((2, 3, 4, 5), (1, 3), torch.float32, device)
    s = Stats(15, device)
    with _raises(RuntimeError, "weight", r"\[3, 4\]", "15 features", r"\[3, 5\]"):
        batch_norm(x, s.rm, s.rv, torch.ones(3, 4, device=device), None, True, axis=(1, 3))
    s.assert_unchanged()


def test_size_mismatch_second_stat_leaves_first_unchanged(device):
    """running_mean is fine, running_var is not: neither may change."""
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    with _raises(RuntimeError, "running_var", r"\[4\]"):
        batch_norm(x, s.rm, torch.ones(4, device=device), training=True)
    s.assert_unchanged()
    with _raises(RuntimeError, "running_var", r"\[4\]"):
        ops.forward_train(x, None, None, s.rm, torch.ones(4, device=device), 0.1, 1e-5, [1])
    s.assert_unchanged()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_floating_input(dtype, training, device):
    x = torch.ones(4, 3, 5, dtype=dtype, device=device)
    s = Stats(3, device)
    with _raises(TypeError, "input", "floating", re.escape(str(dtype))):
        batch_norm(x, s.rm, s.rv, training=training)
    s.assert_unchanged()


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_non_floating_per_feature(name, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    args = {"weight": None, "bias": None, "running_mean": s.rm, "running_var": s.rv}
    args[name] = torch.ones(3, dtype=torch.int32, device=device)
    with _raises(TypeError, name, "floating", r"torch\.int32"):
        batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"], True)
    s.assert_unchanged()


def _other_devices(device):
    out = ["meta"]
    if HAS_CUDA:
        out.append("cpu" if device == "cuda" else "cuda")
    return out


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var", "input"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_different_devices(name, training, device):
    for other in _other_devices(device):
        x = make_input((4, 3, 5), 1, torch.float32, device)
        s = Stats(3, device)
        args = {"input": x, "weight": make_features([3], device=device),
                "bias": make_features([3], device=device, kind="bias"), "running_mean": s.rm, "running_var": s.rv}
        args[name] = args[name].to(other)
        if name == "input":
            pattern = [f"is on {device}", f"input is on {other}"]
        else:
            pattern = [name, f"on {other}", f"input is on {device}"]
        with _raises(RuntimeError, *pattern):
            batch_norm(args["input"], args["running_mean"], args["running_var"], args["weight"], args["bias"], training)
        s.assert_unchanged()


def test_different_devices_ops(device):
    """The ops called directly (not through the functional API) check devices too."""
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    for other in _other_devices(device):
        w = torch.ones(3, device=other)
        with _raises(RuntimeError, "weight", f"on {other}"):
            ops.forward_train(x, w, None, s.rm, s.rv, 0.1, 1e-5, [1])
        with _raises(RuntimeError, "weight", f"on {other}"):
            ops.forward_infer(x, w, None, s.rm, s.rv, 1e-5, [1])
        with _raises(RuntimeError, "grad_out", f"on {other}"):
            ops.backward(x.to(other), x, None, s.rm, s.rv, True, [1], [True, True, True])
        s.assert_unchanged()


@pytest.mark.parametrize("eps", [0.0, -1e-5, -1.0])
def test_eps_not_positive_in_training(eps, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    with _raises(ValueError, "eps", re.escape(f"{eps:g}")):
        batch_norm(x, s.rm, s.rv, training=True, eps=eps)
    s.assert_unchanged()
    with _raises(ValueError, "eps"):
        ops.forward_train(x, None, None, s.rm, s.rv, 0.1, eps, [1])
    s.assert_unchanged()


@pytest.mark.parametrize("eps", [float("nan"), float("inf")])
def test_eps_not_finite(eps, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    for training in (True, False):
        with _raises(ValueError, "eps", str(eps)):
            batch_norm(x, s.rm, s.rv, training=training, eps=eps)
    s.assert_unchanged()


def test_eps_negative_in_eval(device):
    """Evaluation takes eps = 0 (as torch 2.14; 2.11 refuses it) but not eps < 0; the nn modules pass it through."""
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    with _raises(ValueError, "eps must be >= 0", "-1"):
        batch_norm(x, s.rm, s.rv, training=False, eps=-1.0)
    with _raises(ValueError, "eps must be >= 0", "-0.5"):
        ops.forward_infer(x, None, None, s.rm, s.rv, -0.5, [1])
    m = bn_cuda.nn.BatchNorm1d(3, eps=-1e-3).to(device).eval()
    with _raises(ValueError, "eps must be >= 0", "-0.001"):
        m(x)
    s.assert_unchanged()
    got = batch_norm(x, s.rm, s.rv, training=False, eps=0.0)
    want = (x.double() - s.rm.double().view(3, 1)) / s.rv.double().view(3, 1).sqrt()  # (torch 2.11 refuses eps=0)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eps_rounding_to_zero_in_training(dtype, device):
    """A positive eps that float32 (the accumulation type) rounds to 0 would normalize a feature of
    equal values to 0 * inf = NaN: refused, naming the value; float64 input keeps it."""
    x = torch.ones(4, 3, 5, dtype=dtype, device=device)
    s = Stats(3, device)
    with _raises(ValueError, "eps=1e-50", "rounds to 0 in float32"):
        batch_norm(x, s.rm, s.rv, training=True, eps=1e-50)
    s.assert_unchanged()
    y = batch_norm(x.double(), s.rm.double(), s.rv.double(), training=True, eps=1e-50)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_requiring_grad(name, training, device):
    """Running statistics that require grad are refused with grad mode on, as torch refuses them (no
    gradient could reach them, and training would update a leaf that requires grad in place); under
    no_grad both libraries take them and agree."""
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    stats = {"running_mean": s.rm, "running_var": s.rv}
    stats[name] = stats[name].clone().requires_grad_(True)
    before = stats[name].detach().clone()
    with _raises(RuntimeError, name, "requires grad", "detach"):
        batch_norm(x, stats["running_mean"], stats["running_var"], training=training)
    with torch.no_grad():
        s.assert_unchanged()
        assert torch.equal(stats[name], before)
        ref = {k: v.detach().clone() for k, v in stats.items()}
        got = batch_norm(x, stats["running_mean"], stats["running_var"], training=training)
        want = torch.nn.functional.batch_norm(x, ref["running_mean"], ref["running_var"], training=training)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[name].detach(), ref[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,value,training", [
    ("momentum", "a", True), ("momentum", [0.1], True), ("momentum", True, True),  # (unused in evaluation)
    ("eps", None, True), ("eps", "1e-5", True), ("eps", None, False), ("eps", "1e-5", False)])
def test_scalar_argument_wrong_type(name, value, training, device):
    """A momentum / eps that is not a number: a TypeError naming the argument and the value."""
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    for axis in (1, [1]):  # (the fast path and the general one)
        with _raises(TypeError, f"{name} must be a float", re.escape(repr(value))):
            batch_norm(x, s.rm, s.rv, training=training, axis=axis, **{name: value})
    s.assert_unchanged()


@pytest.mark.parametrize("shape,axis", [((1, 3), 1), ((1, 3, 1, 1), 1), ((4, 3, 5), (0, 1, 2)), ((5, 1), 0),
                                        ((1, 3, 1), -2)])
def test_one_value_per_feature_in_training(shape, axis, device):
    x = make_input(shape, axis, torch.float32, device)
    axes = [axis] if isinstance(axis, int) else list(axis)
    c = 1
    for a in axes:
        c *= shape[a]
    s = Stats(c, device)
    with _raises(ValueError, "more than 1 value per feature", re.escape(str(list(shape)))):
        batch_norm(x, s.rm, s.rv, training=True, axis=axis)
    s.assert_unchanged()
    # Inference with a single value per feature is fine (like torch).
    y = batch_norm(x, s.rm, s.rv, training=False, axis=axis)
    assert torch.isfinite(y).all()
    s.assert_unchanged()


@pytest.mark.parametrize("missing", ["both", "running_mean", "running_var"])
def test_eval_without_running_stats(missing, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    rm = None if missing in ("both", "running_mean") else s.rm
    rv = None if missing in ("both", "running_var") else s.rv
    with _raises(ValueError, "running_mean and running_var", "training=False", "None"):
        batch_norm(x, rm, rv, training=False)
    s.assert_unchanged()


@pytest.mark.parametrize("axis", [1, (1, 2)])
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_train_with_one_running_stat(given, axis, device):
    """Training with one running statistic and not the other is refused as torch refuses it (a
    ValueError naming both), on the fast path (one int axis) and the general one, and the given
    statistic is left as it was; the raw op, like ATen's, updates the one it is given."""
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3 if axis == 1 else 15, device)
    stat = s.rm if given == "running_mean" else s.rv
    stat = stat if axis == 1 else stat.view(3, 5)
    rm, rv = (stat, None) if given == "running_mean" else (None, stat)
    want = "a tensor and None" if given == "running_mean" else "None and a tensor"
    with _raises(ValueError, "running_mean and running_var", "both", want):
        batch_norm(x, rm, rv, training=True, axis=axis)
    s.assert_unchanged()
    if axis == 1:
        with pytest.raises(ValueError):  # (torch's own message)
            torch.nn.functional.batch_norm(x, rm, rv, training=True)
        before = stat.double().clone()
        ops.forward_train(x, None, None, rm, rv, 0.5, 1e-5, [1])
        x64 = x.double()
        batch = x64.mean((0, 2)) if rm is not None else x64.var((0, 2), unbiased=True)
        torch.testing.assert_close(stat.double(), 0.5 * before + 0.5 * batch)


@pytest.mark.parametrize("axis,patterns", [
    (3, ["axis", "3", "out of range", "rank 3"]),
    (-4, ["axis", "-4", "out of range"]),
    (17, ["axis", "17"]),
    ((1, 3), ["axis", "3", "out of range"]),
    ((1, 1), ["axis", "more than once", r"\[1, 1\]"]),
    ((1, -2), ["axis", "more than once", r"\[1, -2\]"]),
    ((), ["axis", "at least one"]),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_invalid_axis(axis, patterns, training, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    with _raises(ValueError, *patterns):
        batch_norm(x, s.rm, s.rv, training=training, axis=axis)
    s.assert_unchanged()


@pytest.mark.parametrize("axis", [(1, 1), (3,), ()])
def test_invalid_axis_ops(axis, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    with _raises(ValueError, "axis"):
        ops.forward_train(x, None, None, s.rm, s.rv, 0.1, 1e-5, list(axis))
    with _raises(ValueError, "axis"):
        ops.forward_infer(x, None, None, s.rm, s.rv, 1e-5, list(axis))
    s.assert_unchanged()


@pytest.mark.parametrize("axis", [1.0, "1", True, (1.5,), None])
def test_axis_wrong_type(axis, device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    with _raises(TypeError, "axis", re.escape(repr(axis))):
        batch_norm(x, s.rm, s.rv, training=True, axis=axis)
    s.assert_unchanged()


def test_input_not_a_tensor():
    with _raises(TypeError, "input", "list"):
        batch_norm([[1.0, 2.0], [3.0, 4.0]], None, None, training=True)


def test_backward_grad_out_mismatch(device):
    x = make_input((4, 3, 5), 1, torch.float32, device)
    m, v = torch.zeros(3, device=device), torch.ones(3, device=device)
    with _raises(RuntimeError, "grad_out", r"\[4, 3, 6\]", r"\[4, 3, 5\]"):
        ops.backward(torch.randn(4, 3, 6, device=device), x, None, m, v, True, [1], [True, True, True])
    with _raises(TypeError, "grad_out", "floating"):
        ops.backward(torch.ones(4, 3, 5, dtype=torch.int64, device=device), x, None, m, v, True, [1],
                     [True, True, True])


def test_failed_call_then_good_call(device):
    """A failing call leaves nothing half-done: the next good call matches a fresh one."""
    x = make_input((4, 3, 5), 1, torch.float32, device)
    s = Stats(3, device)
    with pytest.raises(RuntimeError):
        batch_norm(x, s.rm, s.rv, torch.ones(4, device=device), training=True)
    fresh_m, fresh_v = s.rm.clone(), s.rv.clone()
    batch_norm(x, s.rm, s.rv, training=True)
    batch_norm(x, fresh_m, fresh_v, training=True)
    assert torch.equal(s.rm, fresh_m) and torch.equal(s.rv, fresh_v)


def test_running_stat_with_shared_memory(device):
    """An expanded running statistic cannot take the training update (its elements share memory):
    a ValueError naming it and its strides, before anything is written (the other statistic stays
    as it was); in evaluation mode it is only read, and the result equals a contiguous one's."""
    x = make_input((6, 4, 5), 1, torch.float32, device)
    rm_shared = torch.full((1,), 0.5, device=device).expand(4)
    rv_own = make_features([4], torch.float32, device, "var")
    rv0 = rv_own.clone()
    with _raises(ValueError, "running_mean", "share memory", r"strides \[0\]", "clone"):
        batch_norm(x, rm_shared, rv_own, training=True)
    assert torch.equal(rv_own, rv0) and torch.equal(rm_shared, torch.full((4,), 0.5, device=device))
    with _raises(ValueError, "running_var", "share memory"):
        ops.forward_train(x, None, None, None, torch.ones(1, device=device).expand(4), 0.1, 1e-5, [1])
    got = batch_norm(x, rm_shared, torch.ones(1, device=device).expand(4), training=False)
    want = batch_norm(x, rm_shared.clone(), torch.ones(4, device=device), training=False)
    assert torch.equal(got, want)
