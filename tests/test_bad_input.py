"""Bad input found by fuzzing the public surfaces (fifteenth session): required tensors passed as
None, inference tensors in a call that records a gradient, non-finite eps and non-floating
statistics in the staged ops, ghost counts that overflow, the Keras layer's set_weights and
constructor arguments, the functional API's ``training`` / ``momentum`` types. Each case: the
exception type, a message naming the argument, and no change to any running statistic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bn_cuda
from bn_cuda import staged
from bn_cuda.functional import batch_norm

ops = torch.ops.bn_cuda


def _tensors(device):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 5, generator=g).to(device)
    dy = torch.randn(4, 3, 5, generator=g).to(device)
    mean = torch.randn(3, generator=g).to(device)
    invstd = torch.rand(3, generator=g).add(0.5).to(device)
    sums = torch.randn(3, generator=g).to(device)
    count = torch.full((3,), 20.0, device=device)
    return x, dy, mean, invstd, sums, count


# Every required Tensor argument of every op, replaced by None: the dispatcher hands the kernels an
# undefined tensor (a null data pointer; this segfaulted before the checks).
def _calls(device):
    x, dy, m, inv, s, c = _tensors(device)
    mv = lambda: torch.ones(3, device=device)  # noqa: E731
    return {
        # (with a weight: with no tensor at all the dispatcher itself refuses, NotImplementedError)
        "forward_train": (lambda a: ops.forward_train(*a), [x, mv(), None, None, None, 0.1, 1e-5, [1]], {0: "input"}),
        "forward_infer": (lambda a: ops.forward_infer(*a), [x, None, None, mv(), mv(), 1e-5, [1]], {0: "input"}),
        "backward": (lambda a: ops.backward(*a), [dy, x, None, m, inv, True, [1], [True, True, True]],
                     {0: "grad_out", 1: "input", 3: "save_mean", 4: "save_invstd"}),
        "batch_stats": (lambda a: staged.batch_stats(*a), [x, 1], {0: "input"}),
        "gather_stats": (lambda a: staged.gather_stats(*a), [m, inv, c, None, None, 0.1, 1e-5],
                         {0: "mean", 1: "m2", 2: "count"}),
        "normalize": (lambda a: staged.normalize(*a), [x, m, inv, None, None, 1], {0: "input", 1: "mean", 2: "invstd"}),
        "grad_sums": (lambda a: staged.grad_sums(*a), [dy, x, m, inv, 1],
                      {0: "grad_out", 1: "input", 2: "mean", 3: "invstd"}),
        "grad_input": (lambda a: staged.grad_input(*a), [dy, x, m, inv, None, s, s, c, 1],
                       {0: "grad_out", 1: "input", 2: "mean", 3: "invstd", 5: "sum_dy", 6: "sum_dy_xmu", 7: "count"}),
        "ghost_backward": (lambda a: staged.ghost_backward(*a), [dy, x, m, inv, None, 1],
                           {0: "grad_out", 1: "input", 2: "mean", 3: "invstd"}),
        "keras_grads": (lambda a: staged.keras_grads(*a), [s, s, None, None, None, None, None, True, 1],
                        {0: "d_scale", 1: "d_shift"}),
        "keras_backward": (lambda a: staged.keras_backward(*a), [dy, x, m, inv, None, 1, 1, None, None, None, None,
                                                                  None, True],
                           {0: "grad_out", 1: "input", 2: "mean", 3: "invstd"}),
        "keras_forward": (lambda a: staged.keras_forward(*a), [x, 1, None, 1, None, None, None, None, mv(), mv(),
                                                                None, None, None, 0.99, 0.99, 1e-3],
                          {0: "input", 8: "moving_mean", 9: "moving_variance"}),
        "keras_finalize": (lambda a: staged.keras_finalize(*a), [m, inv, c, mv(), mv(), None, None, None, 1, 0.99,
                                                                  0.99, 1e-3],
                           {0: "mean", 1: "var", 2: "count", 3: "moving_mean", 4: "moving_variance"}),
        "keras_coeffs": (lambda a: staged.keras_coeffs(*a), [m, inv, c, None, None, None, None, mv(), mv(), None,
                                                              None, None, 1, 0.99, 0.99, 1e-3],
                         {0: "mean", 1: "m2", 2: "count", 7: "moving_mean", 8: "moving_variance"}),
    }


_REQUIRED = [(op, pos, name) for op, (_, _, req) in _calls("cpu").items() for pos, name in req.items()]


@pytest.mark.parametrize("op,pos,name", _REQUIRED, ids=[f"{o}-{n}" for o, _, n in _REQUIRED])
def test_required_tensor_given_none(op, pos, name, device):
    fn, args, _ = _calls(device)[op]
    fn(list(args))  # the valid call runs
    fn, args, _ = _calls(device)[op]
    args = list(args)
    args[pos] = None
    before = {i: a.clone() for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    with pytest.raises(TypeError, match=rf"\b{name} must be a tensor, got None"):
        fn(args)
    assert all(torch.equal(args[i], b) for i, b in before.items()), "a failing call changed a tensor"


# -------------------------------------------------------------------------------------------------
# Inference tensors: torch refuses to save them for backward, but only when the node is built,
# after the kernel moved the running statistics; refused first now, naming the tensor.

def _inference(t):
    with torch.inference_mode():
        return t.clone()


def test_inference_input_functional(device):
    x = _inference(torch.randn(6, 3, 4, device=device))
    w = torch.rand(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="input is an inference tensor.*Nothing was updated"):
        batch_norm(x, rm, rv, w, None, training=True)
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    # The same call without anything to record runs, as in torch.
    with torch.no_grad():
        out = batch_norm(x, rm, rv, w, None, training=True)
    ref = torch.nn.functional.batch_norm(x.clone().double(), torch.zeros(3, device=device, dtype=torch.float64),
                                         torch.ones(3, device=device, dtype=torch.float64), w.detach().double(),
                                         None, training=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(rm, torch.zeros(3, device=device))


def test_inference_weight_functional(device):
    x = torch.randn(6, 3, 4, device=device, requires_grad=True)
    w = _inference(torch.rand(3, device=device))
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="weight is an inference tensor"):
        batch_norm(x, rm, rv, w, None, training=True)
    assert torch.equal(rm, torch.zeros(3, device=device))


def test_inference_input_module(device):
    bn = bn_cuda.nn.BatchNorm2d(3).to(device)
    x = _inference(torch.randn(4, 3, 5, 5, device=device))
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match="input is an inference tensor"):
        bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), f"a failing call changed {k}"


@pytest.mark.parametrize("kw", [{}, {"virtual_batch_size": 2}, {"renorm": True}, {"fused": False},
                                {"renorm": True, "fused": False}],
                         ids=["plain", "ghosts", "renorm", "composite", "renorm-composite"])
def test_inference_input_keras(kw, device):
    layer = bn_cuda.BatchNormalization(axis=1, **kw).to(device)
    layer.build((8, 3, 5))
    state = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        layer(_inference(torch.randn(8, 3, 5, device=device)), training=True)
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), f"a failing call changed {k}"


@pytest.mark.parametrize("kw", [{}, {"virtual_batch_size": 4}, {"fused": False}], ids=["plain", "ghosts", "composite"])
def test_inference_mask_keras(kw, device):
    """A mask made under inference mode is no differentiable input: every path takes it (the fused
    step saves a copy of its own) and gives the composite path's numbers."""
    torch.manual_seed(5)
    x = torch.randn(8, 3, 5, device=device)
    mask = torch.rand(8, 3, device=device) > 0.3
    outs = []
    for m in (mask, _inference(mask)):
        layer = bn_cuda.BatchNormalization(axis=1, **kw).to(device)
        xr = x.clone().requires_grad_()
        y = layer(xr, training=True, mask=m)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xr.grad, layer.moving_mean.clone(), layer.gamma.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------------------
# Staged ops: scalar and dtype checks


@pytest.mark.parametrize("eps", [math.inf, math.nan, 0.0, -1.0])
@pytest.mark.parametrize("op", ["gather_stats", "keras_finalize", "keras_coeffs"])
def test_staged_eps_must_be_finite_and_positive(op, eps, device):
    fn, args, _ = _calls(device)[op]
    eps_pos = {"gather_stats": 6, "keras_finalize": 11, "keras_coeffs": 15}[op]
    args = list(args)
    args[eps_pos] = eps
    moving = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(ValueError, match="eps must be finite and > 0, got"):
        fn(args)
    assert all(torch.equal(a, b) for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], moving))


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("which,name", [(1, "m2"), (2, "count")])
def test_gather_stats_statistics_must_be_floating(which, name, bad, device):
    fn, args, _ = _calls(device)["gather_stats"]
    args = list(args)
    args[which] = args[which].to(bad)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    args[3], args[4] = rm, rv
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor.*got torch\.{str(bad)[6:]}"):
        fn(args)
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))


@pytest.mark.parametrize("op", ["keras_finalize", "keras_coeffs"])
def test_keras_ops_moving_size_names_the_ghosts(op, device):
    """A moving variable of the wrong size: the message says where C comes from (ghosts * C)."""
    fn, args, _ = _calls(device)[op]
    args = list(args)
    args[{"keras_finalize": 8, "keras_coeffs": 12}[op]] = 3  # ghosts=3: C = 1, the moving variables have 3
    with pytest.raises(RuntimeError, match=r"moving_mean has shape \[3\] but mean has ghosts \* C = 3 entries with "
                                           r"ghosts=3, so C = 1: expected shape \[1\]"):
        fn(args)


def test_gather_stats_running_size_message(device):
    m = torch.zeros(2, 3, device=device)
    with pytest.raises(RuntimeError, match=r"running_var has shape \[4\] but mean of shape \[2, 3\] has C = 3"):
        staged.gather_stats(m, m, m + 1, torch.zeros(3, device=device), torch.ones(4, device=device), 0.1, 1e-5)


def test_ghost_count_overflow(device):
    x = torch.randn(0, 3, 5, device=device)
    with pytest.raises(ValueError, match=r"ghosts=4611686018427387904 times the 3 features overflows int64"):
        staged.batch_stats(x, 1, None, 2 ** 62)
    # an empty batch with a sane ghost count: empty states
    mean, m2, count = staged.batch_stats(x, 1, None, 4)
    assert mean.shape == (12,) and torch.equal(count, torch.zeros(12, device=device))


# -------------------------------------------------------------------------------------------------
# Python arguments


@pytest.mark.parametrize("training", [1, 0, "no", None, np.bool_(True), torch.tensor(True), 1.0])
def test_functional_training_must_be_bool(training):
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match=r"training must be a bool, got"):
        batch_norm(x, rm, rv, training=training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(TypeError):  # as torch
        torch.nn.functional.batch_norm(x, rm, rv, training=training)


@pytest.mark.parametrize("momentum", ["x", [0.1], 1 + 1j])
def test_functional_momentum_checked_in_evaluation(momentum):
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="momentum must be a float"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=False, momentum=momentum)
    with pytest.raises(TypeError):  # as torch
        torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, momentum=momentum)


def test_set_weights_checks_every_value_before_writing():
    layer = bn_cuda.BatchNormalization(axis=1)
    layer.build((4, 3, 5))
    before = layer.get_weights()
    for bad, exc, pattern in (
            ([np.full(3, 2.0), np.full(3, 3.0), np.full(3, 4.0), torch.ones(3, device="meta")], RuntimeError,
             "weight 'moving_variance'.*cannot be copied"),
            ([np.array(["a", "b", "c"])] + before[1:], TypeError, "weight 'gamma' is not a numeric array"),
            ([np.full(3, 1 + 1j)] + before[1:], TypeError, "weight 'gamma' has dtype torch.complex128")):
        with pytest.raises(exc, match=pattern):
            layer.set_weights(bad)
        for a, b in zip(layer.get_weights(), before):
            np.testing.assert_array_equal(a, b)
    layer.set_weights([np.full(3, 2.0), np.arange(3), torch.zeros(3, dtype=torch.float64), [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(layer.get_weights()[1], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(layer.get_weights()[3], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("clipping", ["abc", 5, [("rmax", 3.0)]])
def test_renorm_clipping_must_be_a_dict(clipping):
    with pytest.raises(TypeError, match=r"`renorm_clipping` must be a dict.*Received: "):
        bn_cuda.BatchNormalization(renorm=True, renorm_clipping=clipping)


def test_axis_as_a_0d_integer():
    assert bn_cuda.BatchNormalization(axis=torch.tensor(1)).axis == 1
    assert bn_cuda.BatchNormalization(axis=np.int64(-1)).axis == -1
    with pytest.raises(TypeError, match="for the argument 'axis', but received: tensor"):
        bn_cuda.BatchNormalization(axis=torch.tensor(1.0))


@pytest.mark.parametrize("renorm", [False, True])
def test_expanded_moving_buffer_fused_and_composite_alike(renorm, device):
    """A moving variable swapped for an expanded tensor (one element seen C times): both paths give
    the layer a buffer of its own and update every feature (before, the composite path wrote the
    variance and then raised on the mean, half-updated)."""
    torch.manual_seed(2)
    x = (torch.randn(4, 3, 5) + torch.arange(3.0).view(1, 3, 1)).to(device)
    results = []
    for fused in (None, False):
        layer = bn_cuda.BatchNormalization(axis=1, fused=fused, renorm=renorm).to(device)
        layer.build((4, 3, 5))
        layer.moving_mean = torch.zeros(1, device=device).expand(3)
        y = layer(x, training=True)
        assert layer.moving_mean.stride() == (1,)
        results.append((y, layer.moving_mean.clone(), layer.moving_variance.clone()))
    expected_mean = 0.01 * x.double().mean((0, 2))  # moving_mean: 0 -> 0 + (mean - 0) * (1 - 0.99)
    for y, mm, mv in results:
        torch.testing.assert_close(mm.double(), expected_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op,pos,name", [("gather_stats", 3, "running_mean"), ("keras_finalize", 4, "moving_variance"),
                                         ("keras_coeffs", 7, "moving_mean")])
def test_staged_updated_statistics_need_no_grad(op, pos, name, device):
    fn, args, _ = _calls(device)[op]
    args = list(args)
    if op == "gather_stats":
        args[4] = torch.ones(3, device=device)
    args[pos] = torch.ones(3, device=device, requires_grad=True)
    before = {i: a.detach().clone() for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    with pytest.raises(RuntimeError, match=rf"staged\.{op}: {name} requires grad, but it is a statistic"):
        fn(args)
    assert all(torch.equal(args[i].detach(), b) for i, b in before.items())
    with torch.no_grad():
        fn(args)  # (no gradient recorded: allowed, and updated)
    assert not torch.equal(args[pos].detach(), before[pos])
