"""torch.vmap through the functional ops (bn_cuda::forward_train / forward_infer / backward have
batching rules): each vmapped sample is its own batch norm. Against a loop over the samples through
the float64 reference (torch's F.batch_norm), in evaluation and training mode, with batched and
unbatched parameters and running statistics, and per-sample gradients (vmap of torch.func.grad)."""

from __future__ import annotations

import pytest
import torch

from bn_cuda.functional import batch_norm
from conftest import feature_shape, make_features, make_input, reference_batch_norm

# (sample shape, feature axis, the vmapped dim of the input)
CASES = [
    ((5, 3, 7), 1, 0),
    ((6, 17), -1, 1),
    ((3, 1, 7, 7), 1, 0),
    ((4, 3, 2, 5), (1, 3), 2),
    ((2, 1000), 1, 0),
]
B = 3


def _batched_input(shape, axis, in_dim, device, gen):
    """B samples, each with its own per-feature offsets and scales, stacked at in_dim."""
    xs = [make_input(shape, axis, torch.float64, device, generator=gen) * (1.0 + i) + 2.0 * i for i in range(B)]
    return torch.stack(xs, in_dim)


def _sample(t, i, dim):
    return t if dim is None else t.select(dim, i)


@pytest.mark.parametrize("shape,axis,in_dim", CASES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("batched_params", [False, True])
def test_vmap_matches_a_loop_over_samples(device, shape, axis, in_dim, training, batched_params):
    gen = torch.Generator().manual_seed(21)
    x = _batched_input(shape, axis, in_dim, device, gen)
    fs = feature_shape(shape, axis)

    def per_feature(kind):
        if not batched_params:
            return make_features(fs, torch.float64, device, kind), None
        return torch.stack([make_features(fs, torch.float64, device, kind) for _ in range(B)], 0), 0

    (w, wd), (b, bd) = per_feature("weight"), per_feature("bias")
    # running statistics: batched (one per sample; vmapped at dim 1, so their slices are strided)
    # in training mode (an unbatched one would be updated once per sample: refused below)
    if training:
        rm = torch.stack([make_features(fs, torch.float64, device, "mean") for _ in range(B)], 1)
        rv = torch.stack([make_features(fs, torch.float64, device, "var") for _ in range(B)], 1)
        sd = 1
    else:
        (rm, sd), (rv, _) = per_feature("mean"), per_feature("var")
    rm0, rv0 = rm.clone(), rv.clone()
    y = torch.vmap(lambda x, w, b, rm, rv: batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4, axis=axis),
                   in_dims=(in_dim, wd, bd, sd, sd))(x, w, b, rm, rv)
    assert y.shape == (B,) + tuple(shape)
    for i in range(B):
        ref = reference_batch_norm(_sample(x, i, in_dim), _sample(rm0, i, sd), _sample(rv0, i, sd), _sample(w, i, wd),
                                   _sample(b, i, bd), training, 0.3, 1e-4, axis=axis)
        torch.testing.assert_close(y[i].cpu(), ref["out"], rtol=1e-10, atol=1e-10)
        if training:
            torch.testing.assert_close(_sample(rm, i, sd).cpu().reshape(-1), ref["running_mean"].reshape(-1), rtol=1e-12,
                                       atol=1e-12)
            torch.testing.assert_close(_sample(rv, i, sd).cpu().reshape(-1), ref["running_var"].reshape(-1), rtol=1e-12,
                                       atol=1e-12)


@pytest.mark.parametrize("shape,axis,in_dim", CASES[:4])
@pytest.mark.parametrize("training", [False, True])
def test_per_sample_gradients(device, shape, axis, in_dim, training):
    """vmap(grad(loss)): each sample's gradients of input, weight and bias, as a loop of backward
    passes through the float64 reference gives them."""
    gen = torch.Generator().manual_seed(22)
    x = _batched_input(shape, axis, in_dim, device, gen)
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
    fs = feature_shape(shape, axis)
    w = make_features(fs, torch.float64, device, "weight")
    b = make_features(fs, torch.float64, device, "bias")
    rm = make_features(fs, torch.float64, device, "mean")
    rv = make_features(fs, torch.float64, device, "var")

    def loss(w, b, x, gy):
        stats = (rm, rv) if not training else (None, None)
        return (batch_norm(x, *stats, w, b, training, axis=axis) * gy).sum()

    gw, gb, gx = torch.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(None, None, in_dim, in_dim))(w, b, x, gy)
    assert gw.shape == (B,) + w.shape and gx.shape == (B,) + tuple(shape)
    for i in range(B):
        ref = reference_batch_norm(_sample(x, i, in_dim), None if training else rm, None if training else rv, w, b,
                                   training, axis=axis, grad_out=_sample(gy, i, in_dim))
        scale = ref["grad_input_scale"]
        torch.testing.assert_close(gx[i].cpu(), ref["grad_input"], rtol=1e-9, atol=1e-12 * scale)
        torch.testing.assert_close(gw[i].cpu(), ref["grad_weight"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gb[i].cpu(), ref["grad_bias"], rtol=1e-9, atol=1e-9)


def test_grad_of_vmap_equals_the_sum_of_per_sample_gradients(device):
    """grad(vmap(f)): the transforms nest the other way round too."""
    gen = torch.Generator().manual_seed(23)
    x = _batched_input((5, 3, 4), 1, 0, device, gen)
    w = make_features([3], torch.float64, device, "weight")

    def f(w, x):
        return batch_norm(x, None, None, w, None, True).pow(3).sum()

    got = torch.func.grad(lambda w: torch.vmap(lambda x: f(w, x))(x).sum())(w)
    want = sum(torch.func.grad(f)(w, x[i]) for i in range(B))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_vmap_refuses_unbatched_running_statistics_in_training(device):
    """A training-mode call would update an unbatched running statistic once per sample: refused
    (as torch's batch norm does under vmap), naming it, before anything is updated."""
    gen = torch.Generator().manual_seed(24)
    x = _batched_input((5, 3), 1, 0, device, gen)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"unbatched running_mean \(shape \[3\]\)"):
        torch.vmap(lambda x: batch_norm(x, rm, rv, training=True))(x)
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))
    # without running statistics, or with batched ones, it runs
    torch.vmap(lambda x: batch_norm(x, None, None, training=True))(x)


def _cnn(bn, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn(4), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 5 * 5, 2)).double()


def test_per_sample_gradients_of_a_model_with_the_drop_in_module(device):
    """The torch.func recipe for per-sample gradients (replace_all_batch_norm_modules_, then
    vmap(grad) over functional_call) through bn_cuda.nn.BatchNorm2d gives torch.nn.BatchNorm2d's."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    from bn_cuda import nn as bnn

    gen = torch.Generator().manual_seed(25)
    x = torch.randn(5, 3, 7, 7, generator=gen, dtype=torch.float64).to(device)
    target = torch.randint(0, 2, (5,), generator=gen).to(device)
    grads = []
    for bn in (bnn.BatchNorm2d, torch.nn.BatchNorm2d):
        model = _cnn(bn, 3).to(device)
        replace_all_batch_norm_modules_(model)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, x, t, model=model):
            return torch.nn.functional.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), t.unsqueeze(0))

        grads.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target))
    assert grads[0]["1.weight"].shape == (5, 4)
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_model_ensembling_with_stacked_running_statistics(device, training):
    """torch.func.stack_module_state + vmap over functional_call: three models with their own
    parameters and running statistics (stacked buffers, updated in place in training) give what
    each model gives alone, outputs and running statistics, as torch's BatchNorm2d does."""
    from torch.func import functional_call, stack_module_state, vmap

    from bn_cuda import nn as bnn

    gen = torch.Generator().manual_seed(26)
    x = torch.randn(4, 3, 7, 7, generator=gen, dtype=torch.float64).to(device)
    models = [_cnn(bnn.BatchNorm2d, 10 + i).to(device).train(training) for i in range(3)]
    with torch.no_grad():
        for i, m in enumerate(models):  # distinct running statistics per model
            m[1].running_mean.uniform_(-1, 1, generator=gen.manual_seed(30 + i))
            m[1].running_var.uniform_(0.5, 2, generator=gen.manual_seed(40 + i))
    refs = [_cnn(torch.nn.BatchNorm2d, 10 + i).to(device).train(training) for i in range(3)]
    for r, m in zip(refs, models):
        r.load_state_dict(m.state_dict())
    params, buffers = stack_module_state(models)
    base = models[0]
    y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(params, buffers, x)
    for i, r in enumerate(refs):
        torch.testing.assert_close(y[i], r(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(buffers["1.running_mean"][i], r[1].running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(buffers["1.running_var"][i], r[1].running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_jacrev_and_reverse_over_reverse(device, training):
    """torch.func.jacrev vmaps the backward over a batch of cotangents (the batched grad_out
    meets unbatched saved tensors), jacrev of jacrev does the same through double backward: both
    against F.batch_norm's in float64, for the input, the weight and the bias."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(27)
    x = (torch.randn(3, 2, 4, generator=gen, dtype=torch.float64) * 2 + 1).to(device)
    w = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(device)
    b = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
    rm = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
    rv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(device)

    def f(fn):
        return lambda x, w, b: fn(x, rm.clone(), rv.clone(), w, b, training)

    got = torch.func.jacrev(f(batch_norm), argnums=(0, 1, 2))(x, w, b)
    want = torch.func.jacrev(f(F.batch_norm), argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)

    def loss(fn):
        return lambda x: (f(fn)(x, w, b) ** 3).sum()

    got = torch.func.jacrev(torch.func.jacrev(loss(batch_norm)))(x)
    want = torch.func.jacrev(torch.func.jacrev(loss(F.batch_norm)))(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.detach().abs().max()))
