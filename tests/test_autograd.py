"""Autograd: gradcheck / gradgradcheck in float64, torch.library.opcheck on every op, and
torch.compile(fullgraph=True) training through the functional API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import bn_cuda  # noqa: F401
from bn_cuda.functional import batch_norm
from conftest import (DispatchLog, apply_layout, assert_close_ref, feature_shape, make_features, make_input,
                      reference_batch_norm)

ops = torch.ops.bn_cuda

GRAD_CASES = [
    ((3, 4), 1, "contiguous"),
    ((3, 2, 5), 1, "contiguous"),
    ((2, 3, 2, 3), 1, "channels_last"),
    ((2, 3, 2, 3), (1, 3), "contiguous"),
    ((3, 2, 4), -1, "sliced"),
]


def _leaves(shape, axis, layout, affine, device, stats=True):
    x = apply_layout(make_input(shape, axis, torch.float64, device), layout).requires_grad_()
    fs = feature_shape(shape, axis)
    w = make_features(fs, torch.float64, device, "weight").requires_grad_() if affine in ("weight", "both") else None
    b = make_features(fs, torch.float64, device, "bias").requires_grad_() if affine in ("bias", "both") else None
    rm = make_features(fs, torch.float64, device, "mean") if stats else None
    rv = make_features(fs, torch.float64, device, "var") if stats else None
    return x, w, b, rm, rv


def _fn(axis, training, rm, rv, with_w, with_b):
    def f(x, *wb):
        it = iter(wb)
        w = next(it) if with_w else None
        b = next(it) if with_b else None
        # Fresh copies of the running stats: gradcheck calls f many times.
        return batch_norm(x, None if rm is None else rm.clone(), None if rv is None else rv.clone(),
                          w, b, training, 0.1, 1e-3, axis=axis)
    return f


@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis,layout", GRAD_CASES, ids=[f"{s}-{a}-{l}".replace(" ", "") for s, a, l in GRAD_CASES])
def test_gradcheck(shape, axis, layout, training, affine, device):
    x, w, b, rm, rv = _leaves(shape, axis, layout, affine, device)
    f = _fn(axis, training, rm, rv, w is not None, b is not None)
    inputs = (x,) + tuple(t for t in (w, b) if t is not None)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("affine", ["none", "both", "weight"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis,layout", GRAD_CASES[:4], ids=[f"{s}-{a}-{l}".replace(" ", "") for s, a, l in GRAD_CASES[:4]])
def test_gradgradcheck(shape, axis, layout, training, affine, device):
    x, w, b, rm, rv = _leaves(shape, axis, layout, affine, device)
    f = _fn(axis, training, rm, rv, w is not None, b is not None)
    inputs = (x,) + tuple(t for t in (w, b) if t is not None)
    assert gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_saved_statistics(device):
    """The saved mean / invstd returned by the training op are differentiable too."""
    x = make_input((4, 3, 2), 1, torch.float64, device).requires_grad_()

    def f(x):
        _, mean, invstd = bn_cuda.ops.batch_norm_train(x, None, None, None, None, 0.1, 1e-3, [1])
        return mean, invstd

    assert gradcheck(f, (x,), eps=1e-6, atol=1e-6)
    assert gradgradcheck(f, (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_backward_op(device):
    """The registered backward op, differentiated directly (double backward of either forward)."""
    x = make_input((3, 2, 4), 1, torch.float64, device).requires_grad_()
    g = torch.randn(3, 2, 4, dtype=torch.float64, device=device).requires_grad_()
    w = make_features([2], torch.float64, device, "weight").requires_grad_()
    mean = x.detach().mean((0, 2)).requires_grad_()
    invstd = (x.detach().var((0, 2), unbiased=False) + 1e-3).rsqrt().requires_grad_()
    for train in (True, False):
        def f(g, x, w, mean, invstd):
            return ops.backward(g, x, w, mean, invstd, train, [1], [True, True, True])
        assert gradcheck(f, (g, x, w, mean, invstd), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# opcheck


def _opcheck_samples(device):
    """(op, args) samples covering layouts, axes, per-feature shapes, dtypes, optional tensors."""
    out = []
    f64 = torch.float64
    for shape, axis, layout, dtype in [
        ((4, 3, 5), [1], "contiguous", f64),
        ((2, 3, 4, 5), [1], "channels_last", torch.float32),
        ((2, 3, 4, 5), [1, 3], "contiguous", f64),
        ((6, 7), [-1], "sliced", torch.float16),
        ((3, 4, 5), [2], "permuted", torch.bfloat16),
        ((0, 3, 4), [1], "contiguous", torch.float32),
    ]:
        fs = feature_shape(shape, axis)
        sdt = f64 if dtype == f64 else torch.float32
        x = apply_layout(make_input(shape, axis, dtype, device), layout)
        w = make_features(fs, sdt, device, "weight")
        b = make_features(fs, sdt, device, "bias")
        rm = make_features(fs, sdt, device, "mean")
        rv = make_features(fs, sdt, device, "var")
        out.append((ops.forward_train.default, (x, w, b, rm, rv, 0.1, 1e-5, axis, True)))
        out.append((ops.forward_train.default, (x, None, None, None, None, 0.1, 1e-5, axis, False)))
        # Inputs that require grad: the C++ autograd kernel (opcheck's autograd-registration check).
        out.append((ops.forward_train.default, (x.detach().requires_grad_(), w.detach().requires_grad_(),
                                                b.detach().requires_grad_(), rm.clone(), rv.clone(), 0.1, 1e-5,
                                                axis, True)))
        out.append((ops.forward_train.default, (x.detach().requires_grad_(), None, b.detach().requires_grad_(),
                                                None, None, 0.1, 1e-5, axis, True)))
        out.append((ops.forward_infer.default, (x, w, b, rm, rv, 1e-5, axis)))
        out.append((ops.forward_infer.default, (x.detach().requires_grad_(), w.detach().requires_grad_(),
                                                b.detach().requires_grad_(), rm, rv, 1e-5, axis)))
        out.append((ops.forward_infer.default, (x, None, None, rm, rv, 1e-5, axis)))
        mean = torch.randn(rm.numel(), dtype=sdt, device=device)
        invstd = torch.rand(rm.numel(), dtype=sdt, device=device) + 0.5
        g = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            out.append((ops.backward.default, (g, x, w, mean, invstd, True, axis, mask)))
        out.append((ops.backward.default, (g, x, None, mean, invstd, False, axis, [True, False, True])))
        if dtype == f64:
            out.append((ops.backward.default, (g.detach().requires_grad_(), x.detach().requires_grad_(),
                                               w.detach().requires_grad_(), mean, invstd, True, axis,
                                               [True, True, True])))
    return out


def test_opcheck(device):
    samples = _opcheck_samples(device)
    seen = set()
    for op, args in samples:
        # Each opcheck runs schema, autograd-registration, fake-tensor and aot-dispatch checks.
        torch.library.opcheck(op, args)
        seen.add(op.name())
    assert seen == {"bn_cuda::forward_train", "bn_cuda::forward_infer", "bn_cuda::backward"}


def test_fake_kernels_match_real(device):
    """Fake kernels give the real outputs' shapes, dtypes and strides (channels_last included)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for op, args in _opcheck_samples(device):
        real = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fargs = [mode.from_tensor(a.detach()) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fargs)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype, op
            if r.numel() > 1:
                assert r.stride() == f.stride(), (op, r.stride(), f.stride())


def test_functional_fast_path_keeps_python_dispatch(device):
    """functional.batch_norm's eager fast path calls the C++ callables behind the ops (not
    OpOverload.__call__): fake tensors still get the fake kernels, and a TorchDispatchMode still
    sees bn_cuda's ops with the arguments the OpOverloads would get."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bn_cuda.functional import batch_norm

    x = torch.randn(3, 5, 4, 6, device=device).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5

    for training in (True, False):
        rm0 = rm.clone()
        with DispatchLog() as seen:
            out = batch_norm(x, rm, rv, w, b, training=training, axis=-3)
        names = [n for n, _ in seen.calls if n.startswith("bn_cuda.")]
        want = "bn_cuda.forward_train.default" if training else "bn_cuda.forward_infer.default"
        assert names == [want], seen.calls
        args = [a for n, a in seen.calls if n == want][0]
        assert list(args[7 if training else 6]) == [1]  # axis -3 normalized to 1
        ref = F.batch_norm(x.double(), rm0.double(), rv.double(), w.double(), b.double(), training=training)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert out.stride() == x.stride()

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx = mode.from_tensor(x)
            fout = batch_norm(fx, mode.from_tensor(rm), mode.from_tensor(rv), mode.from_tensor(w),
                              mode.from_tensor(b), training=training)
        assert type(fout).__name__ == "FakeTensor"
        assert fout.shape == x.shape and fout.stride() == x.stride() and fout.dtype == x.dtype


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_training(backend, device):
    torch._dynamo.reset()

    def loss_fn(x, w, b, rm, rv):
        y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-5)
        return (y * y.detach().sin()).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    x = make_input((4, 3, 5, 5), 1, torch.float64, device)
    w0 = make_features([3], torch.float64, device, "weight")
    b0 = make_features([3], torch.float64, device, "bias")
    runs = []
    for fn in (compiled, loss_fn):
        xr = x.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        b = b0.clone().requires_grad_()
        rm = torch.zeros(3, dtype=torch.float64, device=device)
        rv = torch.ones(3, dtype=torch.float64, device=device)
        loss = fn(xr, w, b, rm, rv)
        loss.backward()
        runs.append((loss.detach(), xr.grad, w.grad, b.grad, rm, rv))
    ref = reference_batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=0.2)
    compiled_run, eager_run = runs
    # Running statistics were updated in place through the compiled graph.
    assert_close_ref(compiled_run[4], ref["running_mean"], torch.float64, "running_mean")
    assert_close_ref(compiled_run[5], ref["running_var"], torch.float64, "running_var")
    for a, e, name in zip(compiled_run, eager_run, ["loss", "grad_input", "grad_weight", "grad_bias", "rm", "rv"]):
        assert_close_ref(a, e, torch.float64, name)


def test_compile_fullgraph_eval_and_multi_axis(device):
    torch._dynamo.reset()

    def f(x, w, rm, rv):
        return batch_norm(x, rm, rv, w, None, training=False, axis=(-1, 1)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = make_input((3, 4, 2, 5), (1, 3), torch.float64, device)
    w = make_features([4, 5], torch.float64, device, "weight")
    rm = make_features([4, 5], torch.float64, device, "mean")
    rv = make_features([4, 5], torch.float64, device, "var")
    grads = []
    for fn in (compiled, f):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xr, wr, rm, rv).backward()
        grads.append((xr.grad, wr.grad))
    for a, e in zip(*grads):
        assert_close_ref(a, e, torch.float64)


def test_compiled_autograd_traces_the_cpp_nodes(device):
    """torch._dynamo's compiled autograd over a graph recorded eagerly: it traces the backward of
    bn_cuda's C++ autograd nodes (the hand-written nodes of the training and inference forwards,
    through their own compiled_args / apply_with_saved, and the fused Keras step's node, for ghost
    batches + renorm and for a trainable adjustment + mask) and gives the eager gradients exactly,
    gradients reaching the returned batch statistics and a Keras-shaped bias included."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no torch._dynamo.compiled_autograd._enable")
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(8, 3, 5, generator=gen).to(device)
    layer = bn_cuda.BatchNormalization(axis=1, virtual_batch_size=4, renorm=True)
    layer(x0, training=True)  # builds the layer on x0's device
    state0 = copy.deepcopy(layer.state_dict())
    adj = torch.linspace(-0.3, 0.4, 5, device=device).requires_grad_()
    layer2 = bn_cuda.BatchNormalization(adjustment=lambda shape: (adj * 0.5 + 1.0, adj * 0.1))
    layer2(x0, training=True)
    state2 = copy.deepcopy(layer2.state_dict())
    mask = torch.rand(8, 3, generator=gen) > 0.3

    def gradients(compiled):
        layer.load_state_dict(state0)  # the same moving statistics (renorm's r, d) for both runs
        layer2.load_state_dict(state2)
        for p in [*layer.parameters(), *layer2.parameters(), adj]:
            p.grad = None
        x = x0.clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, 3, device=device).requires_grad_()
        b = torch.linspace(-1.0, 1.0, 3, device=device).requires_grad_()
        y, mean, invstd = bn_cuda.ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, [1])
        z = layer2(layer(y, training=True), training=True, mask=mask.to(device))
        # inference node: running statistics saved, a bias in the rank-preserving Keras shape
        rm = torch.linspace(-0.2, 0.3, 3, device=device)
        rv = torch.linspace(0.5, 2.0, 3, device=device)
        b2 = torch.linspace(0.1, 0.4, 3, device=device).reshape(1, 3, 1).requires_grad_()
        z = batch_norm(z, rm, rv, w, b2, training=False)
        loss = (z * z.detach().cos()).sum() + (mean * mean).sum() + invstd.sum()
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="aot_eager")):
                loss.backward()
        else:
            loss.backward()
        assert b2.grad.shape == b2.shape
        return [x.grad, w.grad, b.grad, b2.grad, adj.grad] + [p.grad for p in [*layer.parameters(),
                                                                                 *layer2.parameters()]]

    eager = gradients(False)
    got = gradients(True)
    assert counters["compiled_autograd"]["captures"] >= 1
    assert len(got) == 9
    for g, e in zip(got, eager):
        assert g is not None and torch.equal(g, e)


def test_node_frees_saved_tensors_and_guards_them(device):
    """The forwards' autograd nodes keep torch's contract for saved tensors: a second backward
    without retain_graph raises torch's error, retain_graph=True gives the same gradient twice,
    and an input modified in place between forward and backward makes the backward raise."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    gy = torch.randn(5, 3, 7, generator=gen, dtype=torch.float64).to(device)
    for training in (True, False):
        rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
        y = batch_norm(x, rm, rv, w, None, training)
        first = torch.autograd.grad(y, [x, w], gy, retain_graph=True)
        second = torch.autograd.grad(y, [x, w], gy)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            torch.autograd.grad(y, [x, w], gy)
        x2 = x.detach().clone().requires_grad_()
        h = x2 * 1.0  # a non-leaf input, modified in place after the forward saved it
        y = batch_norm(h, rm, rv, w, None, training)
        h.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(gy)


def test_gradient_of_a_subset_matches_the_full_gradient(device):
    """torch.autograd.grad over part of (input, weight, bias) gives what the full call gives for
    that part: the node computes only what the graph task asks for, and asks correctly."""
    gen = torch.Generator().manual_seed(12)
    x = (torch.randn(6, 17, 5, generator=gen, dtype=torch.float64) * 3 + 2).to(device).requires_grad_()
    w = (torch.rand(17, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = torch.randn(17, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    gy = torch.randn(6, 17, 5, generator=gen, dtype=torch.float64).to(device)
    for training in (True, False):
        rm = torch.randn(17, generator=gen, dtype=torch.float64).to(device)
        rv = (torch.rand(17, generator=gen, dtype=torch.float64) + 0.5).to(device)
        full = torch.autograd.grad(batch_norm(x, rm.clone(), rv.clone(), w, b, training), [x, w, b], gy)
        ref = torch.autograd.grad(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training), [x, w, b], gy)
        for got, want in zip(full, ref):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for pick in ([0], [1], [2], [1, 2], [0, 2]):
            inputs = [(x, w, b)[i] for i in pick]
            part = torch.autograd.grad(batch_norm(x, rm.clone(), rv.clone(), w, b, training), inputs, gy)
            for i, g in zip(pick, part):
                assert torch.equal(g, full[i]), (training, pick, i)


def _differentiable_reference(x, rm, rv, w, b, training, eps, axis):
    """F.batch_norm on the feature axes moved last and flattened: differentiable in every mode
    (forward and reverse), any feature axes; running statistics updated like ours."""
    axes = sorted(a % x.dim() for a in ([axis] if isinstance(axis, int) else axis))
    rest = [d for d in range(x.dim()) if d not in axes]
    perm = rest + axes
    c = 1
    for a in axes:
        c *= x.shape[a]
    xt = x.permute(perm).reshape(-1, c)
    flat = (lambda t: None if t is None else t.reshape(c))
    y = F.batch_norm(xt, rm, rv, flat(w), flat(b), training, 0.1, eps)
    return y.reshape([x.shape[d] for d in perm]).permute([perm.index(d) for d in range(x.dim())])


@pytest.mark.parametrize("shape,axis,layout", GRAD_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad(device, shape, axis, layout, training):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) through the functional op: the
    output's tangent for tangents on input, weight and bias together and each alone, against torch's
    own formulas in float64; the training statistics' tangents against d mean and d (var + eps)^-1/2;
    the running statistics updated once, as by a call without tangents."""
    x, w, b, rm, rv = _leaves(shape, axis, layout, "both", device)
    x, w, b = x.detach(), w.detach(), b.detach()
    gen = torch.Generator().manual_seed(15)
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device) for t in (x, w, b)]
    eps = 1e-3
    for pick in ([0, 1, 2], [0], [1], [2]):
        tan = [t if i in pick else torch.zeros_like(t) for i, t in enumerate(tangents)]
        rm_got, rv_got, rm_want, rv_want = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        y, ty = torch.func.jvp(lambda x, w, b: batch_norm(x, rm_got, rv_got, w, b, training, 0.1, eps, axis=axis),
                               (x, w, b), tuple(tan))
        y_ref, ty_ref = torch.func.jvp(
            lambda x, w, b: _differentiable_reference(x, rm_want.view(-1), rv_want.view(-1), w, b, training, eps, axis),
            (x, w, b), tuple(tan))
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ty, ty_ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(rm_got, rm_want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv_got, rv_want, rtol=1e-12, atol=1e-12)
    # the API of torch.autograd.forward_ad, a tangent on the input only
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = batch_norm(fwAD.make_dual(x, tangents[0]), rm.clone(), rv.clone(), w, b, training, 0.1, eps, axis=axis)
        got = fwAD.unpack_dual(out).tangent
    want = torch.func.jvp(lambda x: _differentiable_reference(x, rm.clone().view(-1), rv.clone().view(-1), w, b,
                                                              training, eps, axis), (x,), (tangents[0],))[1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    if training:
        axes = [a % x.dim() for a in ([axis] if isinstance(axis, int) else axis)]
        red = [d for d in range(x.dim()) if d not in axes]

        def stats(x):
            return ops.forward_train(x, None, None, None, None, 0.1, eps, axes, True)[1:]

        def stats_ref(x):
            mean = x.mean(red, keepdim=True)
            return mean.reshape(-1), ((x - mean).pow(2).mean(red) + eps).rsqrt().reshape(-1)

        got = torch.func.jvp(stats, (x,), (tangents[0],))[1]
        want = torch.func.jvp(stats_ref, (x,), (tangents[0],))[1]
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_hessians_and_hessian_vector_products(device, training):
    """Second order through forward mode: torch.func.hessian (forward-over-reverse) of a loss with
    respect to the input and to the weight, a Hessian-vector product by jvp of grad, and jacfwd,
    against F.batch_norm in float64. (Forward-over-reverse differentiates the backward op: its
    maths as ATen ops on the dual inputs.)"""
    gen = torch.Generator().manual_seed(16)
    x = (torch.randn(3, 2, 4, generator=gen, dtype=torch.float64) * 2 + 1).to(device)
    w = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(device)
    b = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
    rm = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
    rv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(device)

    def loss(fn):
        return lambda x, w: (fn(x, rm.clone(), rv.clone(), w, b, training) ** 3).sum()

    for arg in (0, 1):
        got = torch.func.hessian(loss(batch_norm), argnums=arg)(x, w)
        want = torch.func.hessian(loss(F.batch_norm), argnums=arg)(x, w)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    got = torch.func.jvp(lambda x: torch.func.grad(loss(batch_norm))(x, w), (x,), (v,))[1]
    want = torch.func.jvp(lambda x: torch.func.grad(loss(F.batch_norm))(x, w), (x,), (v,))[1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    got = torch.func.jacfwd(lambda w: batch_norm(x, rm.clone(), rv.clone(), w, b, training))(w)
    want = torch.func.jacfwd(lambda w: F.batch_norm(x, rm.clone(), rv.clone(), w, b, training))(w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_saved_tensor_hooks_see_the_nodes_saved_tensors(device):
    """torch.autograd.graph.saved_tensors_hooks (activation offloading, checkpointing tools) pack
    and unpack what the forwards' nodes save, and the gradients stay those of the unhooked call."""
    gen = torch.Generator().manual_seed(13)
    x = (torch.randn(4, 3, 6, generator=gen, dtype=torch.float64) * 2 - 1).to(device).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    gy = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64).to(device)
    for training in (True, False):
        rm = torch.randn(3, generator=gen, dtype=torch.float64).to(device)
        rv = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(device)
        plain = torch.autograd.grad(batch_norm(x, rm.clone(), rv.clone(), w, None, training), [x, w], gy)
        packed, unpacked = [], []

        def pack(t):
            packed.append(t.shape)
            return t.clone()

        def unpack(t):
            unpacked.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = batch_norm(x, rm.clone(), rv.clone(), w, None, training)
        hooked = torch.autograd.grad(y, [x, w], gy)
        # input, weight and the two statistics (batch mean / invstd, or the running ones)
        assert len(packed) == 4 and len(unpacked) == 4, (training, packed, unpacked)
        assert torch.Size([4, 3, 6]) in packed
        for a, b in zip(hooked, plain):
            assert torch.equal(a, b)


def test_torch_func_grad_first_and_second_order(device):
    """torch.func.grad (functorch transforms: MAML-style inner loops, gradient penalties) through
    the functional op in training and evaluation mode, first and second order, against
    F.batch_norm in float64. (torch.vmap: tests/test_vmap.py.)"""
    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(5, 3, 4, generator=gen, dtype=torch.float64) * 2 + 1).to(device)
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(device)
    gy = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64).to(device)
    for training in (True, False):
        rm = torch.randn(3, generator=gen, dtype=torch.float64).to(device)
        rv = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(device)

        def loss(fn):
            return lambda x, w: (fn(x, rm.clone(), rv.clone(), w, None, training) * gy).sum()

        got = torch.func.grad(loss(batch_norm), argnums=(0, 1))(x, w)
        want = torch.func.grad(loss(F.batch_norm), argnums=(0, 1))(x, w)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for arg in (0, 1):
            def penalty(fn):
                return lambda x, w: torch.func.grad(loss(fn), argnums=(0, 1))(x, w)[0].pow(2).sum()

            got2 = torch.func.grad(penalty(batch_norm), argnums=arg)(x, w)
            want2 = torch.func.grad(penalty(F.batch_norm), argnums=arg)(x, w)
            torch.testing.assert_close(got2, want2, rtol=1e-9, atol=1e-11)


def test_compiled_autograd_through_a_gradient_penalty(device):
    """Compiled autograd over a graph that contains the backward op's own node (a loss on gradients
    taken with create_graph=True, as in a gradient penalty) gives the eager gradients."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no torch._dynamo.compiled_autograd._enable")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(15)
    x0 = torch.randn(6, 3, 5, generator=gen).to(device)
    w0 = (torch.rand(3, generator=gen) + 0.5).to(device)

    def gradients(compiled):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        y = batch_norm(x, None, None, w, None, training=True)
        (gx,) = torch.autograd.grad((y * y.detach().sin()).sum(), [x], create_graph=True)
        loss = (gx * gx).sum()
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="aot_eager")):
                loss.backward()
        else:
            loss.backward()
        return x.grad, w.grad

    eager = gradients(False)
    got = gradients(True)
    for g, e in zip(got, eager):
        assert g is not None
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
