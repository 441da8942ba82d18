"""The kernel paths of ghost batches, batch renormalization, adjustment and masks: float64
gradcheck through bn_cuda.BatchNormalization (fused=None), agreement with the composite path
(fused=False) over several steps, and bitwise determinism."""

import copy

import pytest
import torch
from torch.func import functional_call

import bn_cuda
from conftest import DispatchLog

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])

CONFIGS = {
    "ghost": dict(virtual_batch_size=2),
    "renorm": dict(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}, renorm_momentum=0.5),
    "ghost+renorm": dict(virtual_batch_size=3, renorm=True, renorm_clipping={"rmax": 1.2}),
    "adjustment": dict(adjustment=lambda shape: (torch.linspace(0.5, 1.5, shape[-1], dtype=torch.float64),
                                                 torch.linspace(-0.2, 0.3, shape[-1], dtype=torch.float64))),
    "mask": dict(),
    "ghost+mask": dict(virtual_batch_size=2),
}


def _input(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand(c, generator=g, dtype=torch.float64))
    return (x + 3.0 * torch.randn(c, generator=g, dtype=torch.float64)).to(device)


def _layer(name, fused, device, shape):
    layer = bn_cuda.BatchNormalization(fused=fused, momentum=0.8, **CONFIGS[name])
    layer.build(shape, device=torch.device(device))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (layer.gamma, layer.beta):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t is layer.gamma else 0.0))
        if layer.renorm:
            layer.renorm_mean.copy_(torch.randn(layer.renorm_mean.shape, generator=g))
            layer.renorm_stddev.copy_(torch.rand(layer.renorm_stddev.shape, generator=g) + 0.5)
    return layer.to(device)


def _mask(name, shape, device):
    if "mask" not in name:
        return None
    g = torch.Generator().manual_seed(2)
    m = torch.rand(shape[:-1], generator=g) > 0.3
    m.view(-1)[:2] = True
    return m.to(device)


# tf_keras stops the gradient through r and d; numerically they vary with x, so gradcheck sees the
# constant-r, d semantics only where clipping pins them: r = rmin = rmax, d = 0 (dmax = 0).
PINNED = {"renorm_clipping": {"rmin": 1.3, "rmax": 1.3, "dmax": 0.0}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradcheck_float64(device, name):
    shape = (6, 3, 4)
    layer = _layer(name, None, device, shape)
    if layer.renorm:
        layer.renorm_clipping = PINNED["renorm_clipping"]
    layer.double()
    mask = _mask(name, shape, device)
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    x = _input(shape, device).requires_grad_(True)
    gamma = layer.gamma.detach().clone().requires_grad_(True)
    beta = layer.beta.detach().clone().requires_grad_(True)

    def f(x, gamma, beta):
        # Fresh copies of the buffers each call: renorm's r, d come from the (pre-update) renorm
        # statistics, which a call updates.
        state = {"gamma": gamma, "beta": beta, **{k: v.clone() for k, v in buffers.items()}}
        return functional_call(layer, state, (x,), {"training": True, "mask": mask})

    assert torch.autograd.gradcheck(f, (x, gamma, beta), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_match_composite_over_steps(device, name, dtype):
    shape = (12, 5, 7) if "ghost" not in name else (12, 7, 5)
    fused, composite = _layer(name, None, device, shape), _layer(name, False, device, shape)
    mask = _mask(name, shape, device)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for step in range(3):
        x = _input(shape, device, seed=10 + step).to(dtype)
        xf, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yf = fused(xf, training=True, mask=mask)
        yc = composite(xc, training=True, mask=mask)
        gy = torch.randn(shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64).to(device, dtype)
        yf.backward(gy)
        yc.backward(gy)
        torch.testing.assert_close(yf.float(), yc.float(), **tol)
        torch.testing.assert_close(xf.grad.float(), xc.grad.float(), **tol)
        torch.testing.assert_close(fused.gamma.grad, composite.gamma.grad, **tol)
        torch.testing.assert_close(fused.beta.grad, composite.beta.grad, **tol)
        for (n, a), (_, b) in zip(fused.named_buffers(), composite.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: buffer {n} after step {step}")
        fused.zero_grad()
        composite.zero_grad()
    x = _input(shape, device, seed=99).to(dtype)
    torch.testing.assert_close(fused(x, training=False).float(), composite(x, training=False).float(), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bitwise_deterministic(device, name):
    shape = (12, 7, 5)
    layer = _layer(name, None, device, shape)
    mask = _mask(name, shape, device)
    x = _input(shape, device, seed=5).float()
    runs = []
    for _ in range(2):
        lay = copy.deepcopy(layer)
        xr = x.clone().requires_grad_(True)
        y = lay(xr, training=True, mask=mask)
        y.backward(torch.ones_like(y) * torch.arange(y.numel(), device=device).view_as(y) / y.numel())
        runs.append([y.detach(), xr.grad, lay.gamma.grad] + [b.clone() for b in lay.buffers()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("per_sample", [False, True])
def test_adjustment_called_once_per_training_step(fused, per_sample):
    """The adjustment runs once per training step on every path (a random adjustment draws once),
    and never in inference."""
    calls = []

    def adj(shape):
        calls.append(tuple(shape))
        scale = torch.rand(shape[0], 1, 1) + 0.5 if per_sample else torch.rand(shape[-1]) + 0.5
        return scale, torch.zeros(shape[-1])

    shape = (6, 4, 3)
    layer = bn_cuda.BatchNormalization(fused=fused, adjustment=adj)
    x = _input(shape, "cpu", seed=3).float()
    for step in range(3):
        layer(x, training=True)
        assert calls == [shape] * (step + 1)
    layer(x, training=False)
    assert len(calls) == 3


def test_masked_single_unmasked_value_is_exact():
    """A feature with one unmasked value whose first element is masked: its mean is that value
    exactly, so the output there is exactly the bias (variance 0)."""
    x = torch.tensor([[[-1.9252812, 0.5530972, -1.6053288], [-1.9697868, 1.1547437, 7.580402]]])
    m = torch.tensor([[False, True]])
    mean, m2, count = bn_cuda.staged.batch_stats(x, [2], m.unsqueeze(-1))
    assert torch.equal(mean, x[0, 1]) and torch.equal(m2, torch.zeros(3)) and torch.equal(count, torch.ones(3))
    for fused in (None, False):
        layer = bn_cuda.BatchNormalization(fused=fused)
        y = layer(x, training=True, mask=m)
        assert torch.equal(y[0, 1], torch.zeros(3)), (fused, y[0, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,axis,layout", [((6, 40), -1, None), ((64, 256), -1, None), ((6, 1, 1, 40), -1, None),
                                               ((6, 40, 1, 1), 1, None), ((6, 40, 1, 1), 1, "cl"),
                                               ((7, 1000), -1, None), ((5, 3, 1), 1, "t")])
def test_one_value_per_ghost_feature_gives_exact_zero_input_gradient(device, dtype, shape, axis, layout):
    """virtual_batch_size=1 with nothing else reduced: every (ghost, feature) holds one value, so
    x - mean and dy - mean(dy) are 0 and the input gradient is exactly 0, as tf_keras gives (the
    kernels' k_dy * dy + k_0 with a fused multiply-add used to leave ~1e-7 |k_dy dy|). The weight
    and bias gradients stay sum(dy * x_hat) = 0 and sum(dy)."""
    g = torch.Generator().manual_seed(sum(shape) * 10 + len(shape) + (layout == "cl") + 2 * (layout == "t"))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5).to(device=device, dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "t":
        x = x.transpose(0, 2).contiguous().transpose(0, 2)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    for fused in (None, False):
        layer = bn_cuda.BatchNormalization(axis=axis, virtual_batch_size=1, fused=fused)
        layer.build(shape, device=torch.device(device))
        with torch.no_grad():
            layer.gamma.copy_(torch.rand(layer.gamma.shape, generator=g) * 1.5 + 0.5)
        xr = x.detach().requires_grad_()
        y = layer(xr, training=True)
        (y.float() * dy.float()).sum().backward()
        assert torch.count_nonzero(xr.grad) == 0, (fused, xr.grad.abs().max())
        reduced = [d for d in range(dy.ndim) if d != axis % dy.ndim]
        torch.testing.assert_close(layer.beta.grad.double().reshape(-1), dy.double().sum(reduced), rtol=1e-5, atol=1e-4)
        assert torch.count_nonzero(layer.gamma.grad) == 0
    # the raw backward op on a (1, C, 1) input: one value per feature there too
    xo = x.reshape(1, -1, 1) if x.is_contiguous() else x.contiguous().reshape(1, -1, 1)
    mean = xo.float().reshape(-1)
    invstd = torch.full_like(mean, 1e-5 ** -0.5)
    w = torch.rand(mean.shape, device=device) + 0.5
    gx, _, _ = torch.ops.bn_cuda.backward(dy.reshape(1, -1, 1), xo, w, mean, invstd, True, [1], [True, True, True])
    assert torch.count_nonzero(gx) == 0


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_empty_batch_keeps_moving_variables(fused, name):
    """A training step on an empty batch: empty output, zero parameter gradients, and every moving
    variable unchanged on both paths (a deliberate difference from tf_keras, which writes NaN)."""
    shape = (12, 7, 5)
    layer = _layer(name, fused, "cpu", shape)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.zeros((0,) + shape[1:], requires_grad=True)
    mask = None if "mask" not in name else torch.zeros((0,) + shape[1:-1], dtype=torch.bool)
    y = layer(x, training=True, mask=mask)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(layer.gamma.grad, torch.zeros_like(layer.gamma))
    assert torch.equal(layer.beta.grad, torch.zeros_like(layer.beta))
    for n, b in layer.named_buffers():
        assert torch.equal(b, before[n]), (name, fused, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad", [float("inf"), float("nan"), 1e30])
@pytest.mark.parametrize("shape,axis", [((6, 5, 3), -1), ((9, 4), -1), ((5, 3, 7), 1)])
def test_masked_padding_does_not_leak(device, pad, shape, axis):
    """Masked-out elements never enter the statistics, even when the padding holds inf, NaN or huge
    values (the statistics shift is an unmasked element); with finite padding and a loss that
    ignores the padded outputs, the gradients are those of the unpadded input too. (Not 4-D:
    there tf_keras's fused path ignores masks.)"""
    x = _input(shape, device, seed=7).float()
    mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(8)).to(device) > 0.4
    mask.view(-1)[0] = False  # the first element is padding
    mask.view(-1)[1] = True
    padded = x.masked_fill(~mask.unsqueeze(-1), pad)
    gy = _input(shape, device, seed=9).float()
    results = []
    for inp in (x, padded):
        layer = bn_cuda.BatchNormalization(axis=axis, fused=None).to(device)
        xi = inp.clone().requires_grad_(True)
        y = layer(xi, training=True, mask=mask)
        keep = mask.unsqueeze(-1).expand_as(y)
        got = [y[keep], layer.moving_mean, layer.moving_variance]
        if pad == 1e30:
            (y * gy).masked_fill(~keep, 0).sum().backward()
            got += [xi.grad[keep], layer.gamma.grad, layer.beta.grad]
        results.append(got)
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_masked_stats_all_masked_feature(device, layout):
    """batch_stats of a feature with no unmasked element: count 0, mean 0, m2 0, whatever the
    padding holds (NaN here); the other features are unaffected."""
    from bn_cuda import staged

    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3, 5, generator=g).double()
    mask = torch.rand(40, 3, 5, generator=g) > 0.3
    mask[:, 1, :] = False  # feature 1 has no data
    axis = [1]
    if layout == "cl":  # features last: (40, 5, 3)
        x, mask, axis = x.transpose(1, 2).contiguous(), mask.transpose(1, 2).contiguous(), [2]
    x = x.masked_fill(~mask, float("nan"))
    mean, m2, count = staged.batch_stats(x.to(device), axis, mask.to(device))
    mean, m2, count = mean.cpu(), m2.cpu(), count.cpu()
    assert count[1].item() == 0 and mean[1].item() == 0 and m2[1].item() == 0
    xf, mf = x.movedim(axis[0], 0).reshape(3, -1), mask.movedim(axis[0], 0).reshape(3, -1)
    for c in (0, 2):
        vals = xf[c][mf[c]]
        assert count[c].item() == vals.numel()
        torch.testing.assert_close(mean[c], vals.mean())
        torch.testing.assert_close(m2[c], ((vals - vals.mean()) ** 2).sum())


_ADJ_PARAM = {}


def _grad_adjustment(shape):
    """An adjustment whose outputs depend on a tensor that requires grad (its gradient must flow)."""
    a = _ADJ_PARAM["a"]
    return a * 0.5 + 1.0, a * 0.1


NATIVE_CONFIGS = {
    **CONFIGS,
    "renorm+adjustment": dict(renorm=True, adjustment=CONFIGS["adjustment"]["adjustment"]),
    "renorm+grad-adjustment": dict(renorm=True, renorm_clipping={"rmax": 1.2}, adjustment=_grad_adjustment),
    "renorm+mask": dict(renorm=True, renorm_clipping={"rmax": 1.1, "dmax": 0.2}),
    "ghost-nchw": dict(virtual_batch_size=4, axis=1, renorm=True),
    "ghost-two-axes": dict(virtual_batch_size=2, axis=[1, 3]),
    # weights and moving variables in bfloat16 (module.to(torch.bfloat16)): not the accumulation
    # dtype, so the step composes the gradients with ATen's type promotion, as the Python path does
    "ghost+renorm-bf16-weights": dict(virtual_batch_size=3, renorm=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(NATIVE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_step_is_bitwise_the_python_step(monkeypatch, device, name, dtype):
    """The C++ single-process step (csrc/common/keras_step.cpp) runs the staged ops of the Python
    step (keras/synchronized.py) in the same order: outputs, every gradient and every moving
    variable are bitwise the same, over two steps, on odd shapes and a channels-last input. The one
    exception: with ghost batches, the parameters' gradients sum the ghosts in keras_grads' fixed
    order, not torch.sum's (the Python path's autograd), so there they agree to rounding."""
    from bn_cuda.keras import synchronized

    kwargs = NATIVE_CONFIGS[name]
    shape = {"ghost-nchw": (8, 3, 5, 7), "ghost-two-axes": (6, 3, 5, 4)}.get(name, (12, 7, 5))
    results = {}
    step = bn_cuda._C.keras_train_step
    for native in (True, False):
        monkeypatch.setattr(synchronized, "_native_ok", lambda x, native=native: native)
        _ADJ_PARAM["a"] = torch.linspace(-0.3, 0.4, shape[-1], dtype=torch.float64, device=device).requires_grad_()
        layer = bn_cuda.BatchNormalization(momentum=0.7, **kwargs)
        layer.build(shape, device=torch.device(device))
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for t in (layer.gamma, layer.beta):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t is layer.gamma else 0.0))
        if name.endswith("-bf16-weights"):
            layer.to(torch.bfloat16)
        calls = []
        monkeypatch.setattr(bn_cuda._C, "keras_train_step",
                            lambda *a, calls=calls, **k: calls.append(1) or step(*a, **k))
        outs = []
        for i in range(2):
            x = _input(shape, device, seed=20 + i).to(dtype)
            if name == "ghost-nchw":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            mask = _mask(name, shape, device)
            y = layer(x, training=True, mask=mask)
            gy = torch.randn(shape, generator=torch.Generator().manual_seed(40 + i), dtype=torch.float64)
            y.backward(gy.to(device, dtype))
            outs += [y.detach(), x.grad]
        outs += [layer.gamma.grad, layer.beta.grad] + [b.clone() for _, b in sorted(layer.named_buffers())]
        if "grad-adjustment" in name:
            outs.append(_ADJ_PARAM["a"].grad)
        assert bool(calls) == native
        results[native] = outs
    assert len(results[True]) == len(results[False])
    params = {id(t) for t in results[True][4:6]} | ({id(results[True][-1])} if "grad-adjustment" in name else set())
    ghosts = "virtual_batch_size" in kwargs and not name.endswith("-bf16-weights")  # (those: ATen's sums)
    for a, b in zip(results[True], results[False]):
        assert a.dtype == b.dtype and a.shape == b.shape
        if ghosts and id(a) in params:
            tol = 1e-13 if a.dtype == torch.float64 else 2e-6
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
        else:
            assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["ghost", "renorm", "ghost+renorm", "adjustment", "mask", "ghost+mask"])
def test_native_step_backward_ops(device, name):
    """The C++ step's backward without a mask is one op (keras_backward: ghost_backward's sums,
    grad_input's coefficients and grad_input, then keras_grads' ghost sums and composition); a
    mask's is grad_sums + grad_input, then the parameters' gradients (keras_grads). The node's edges
    go straight to gamma / beta (no ViewBackward of a flat view), whose gradients come back in the
    layer's shape."""
    shape = (12, 5, 7)
    layer = _layer(name, None, device, shape)
    x = _input(shape, device).float().requires_grad_(True)
    y = layer(x, training=True, mask=_mask(name, shape, device))
    assert y.grad_fn.name() == "BnCudaKerasStepBackward"
    edges = [f.name() for f, _ in y.grad_fn.next_functions if f is not None]
    assert edges == ["torch::autograd::AccumulateGrad"] * 3, edges  # input, gamma, beta
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    with DispatchLog() as log:
        y.backward(gy)
    staged = [o for o in log.names if o.startswith("bn_cuda.")]
    if "mask" in name:
        assert staged == ["bn_cuda.grad_sums.default", "bn_cuda.grad_input.default", "bn_cuda.keras_grads.default"]
    else:
        assert staged == ["bn_cuda.keras_backward.default"], staged
    # (float32 weights: the parameter gradients come from keras_grads alone, no arithmetic ATen op
    # but a mask's sum_dy_xmu * invstd; the reshapes are gamma's and the gradients' layer shapes
    # (below the autograd key they reach the mode as reshapes, not views), the detaches AccumulateGrad's)
    arithmetic = [o for o in log.names if not o.startswith("bn_cuda.") and o not in ("aten.view.default",
                                                                                   "aten.reshape.default",
                                                                                   "aten.detach.default")]
    assert arithmetic == (["aten.mul.Tensor"] if "mask" in name else []), log.names
    for p in (layer.gamma, layer.beta):
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name", ["ghost", "renorm", "mask"])
def test_double_backward_raises(monkeypatch, native, name):
    """The staged training step is once differentiable on both paths: a second backward through it
    raises instead of silently dropping its contribution; a first backward with create_graph works."""
    from bn_cuda.keras import synchronized

    monkeypatch.setattr(synchronized, "_native_ok", lambda x: native)
    shape = (6, 3, 4)
    layer = _layer(name, None, "cpu", shape)
    x = _input(shape, "cpu").float().requires_grad_(True)
    y = layer(x, training=True, mask=_mask(name, shape, "cpu"))
    (g,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    expected = torch.autograd.grad((layer(x, training=True, mask=_mask(name, shape, "cpu")) ** 3).sum(), x)[0]
    assert g.requires_grad and g.shape == x.shape and torch.isfinite(g).all()
    if not layer.renorm:  # (renorm's r, d depend on the renorm statistics, which the first call moved)
        torch.testing.assert_close(g.detach(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_double_backward_raises_when_only_the_input_needs_it():
    """A loss linear in the output (its gradient a constant) still has a second derivative through
    the input: the C++ step's first backward under create_graph marks its results so that a second
    backward raises, rather than dropping that term (the Python path's once_differentiable looks at
    the output's gradient only)."""
    shape = (6, 5, 3)
    layer = _layer("ghost", None, "cpu", shape)
    x = _input(shape, "cpu").float().requires_grad_(True)
    y = layer(x, training=True)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (g * x).sum().backward()


def _func_grad_case(name, shape, mode, seed):
    """Gradients of a loss through the layer in training mode, w.r.t. the input and the layer's
    parameters, by torch.func.grad over functional_call ("func") or by eager autograd ("eager",
    "composite": fused=False); with the moving variables after the step."""
    layer = _layer(name, False if mode == "composite" else None, "cpu", shape)
    x = _input(shape, "cpu", seed=seed)
    m = _mask(name, shape, "cpu")
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    params = {k: v.detach().clone().requires_grad_(mode != "func") for k, v in layer.named_parameters()}

    def loss(p, x):
        y = functional_call(layer, p, (x,), dict(training=True, mask=m))
        return (y * gy).sum() + (y ** 2).sum()

    if mode == "func":
        gp, gx = torch.func.grad(loss, argnums=(0, 1))(params, x)
    else:
        x.requires_grad_(True)
        gs = torch.autograd.grad(loss(params, x), [x] + list(params.values()))
        gx, gp = gs[0], dict(zip(params, gs[1:]))
    return [gx] + [gp[k] for k in sorted(gp)] + [b.clone() for _, b in sorted(layer.named_buffers())]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_func_grad_through_the_fused_step(monkeypatch, name):
    """torch.func.grad through the C++ training step (its hand-written autograd node): the
    gradients of the input and of every parameter, and the moving variables, equal eager autograd's
    on the same path bit for bit, and the composite path's (fused=False) in float64."""
    calls = []
    step = bn_cuda._C.keras_train_step
    monkeypatch.setattr(bn_cuda._C, "keras_train_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    shape = (6, 5, 3)
    got = _func_grad_case(name, shape, "func", seed=31)
    assert calls, "torch.func.grad did not take the C++ step"
    eager = _func_grad_case(name, shape, "eager", seed=31)
    composite = _func_grad_case(name, shape, "composite", seed=31)
    assert len(got) == len(eager) == len(composite) >= 3 and got[0].dtype == torch.float64
    for a, b, c in zip(got, eager, composite):
        assert torch.equal(a, b), (a - b).abs().max()
        tight = a.dtype == torch.float64  # (the layer's variables are float32)
        torch.testing.assert_close(a, c, rtol=1e-10 if tight else 1e-5, atol=1e-12 if tight else 1e-6)


@pytest.mark.parametrize("name", ["ghost", "renorm", "adjustment", "ghost+mask"])
def test_torch_func_grad_refuses_what_it_cannot_differentiate(name):
    """The C++ step is once differentiable: nested torch.func.grad, and autograd outside the
    transform through a wrapped input, raise a clear NotImplementedError (they would get a silent
    zero for the second derivative); torch.func.jvp raises (forward-mode AD is not supported by
    the ops), and torch.vmap (no batching rule for the step's ops). A refused call changes no
    moving variable. (First-order torch.func.grad: above.)"""
    shape = (6, 5, 3)
    layer = _layer(name, None, "cpu", shape)
    x = _input(shape, "cpu", seed=7)
    m = _mask(name, shape, "cpu")
    before = [b.clone() for b in layer.buffers()]

    def inner(x):
        return torch.func.grad(lambda x: (layer(x, training=True, mask=m) ** 3).sum())(x)

    with pytest.raises(NotImplementedError, match="got 2 nested torch.func transform levels"):
        torch.func.grad(lambda x: inner(x).pow(2).sum())(x)
    with pytest.raises(NotImplementedError, match="autograd outside the transform differentiates"):
        inner(x.clone().requires_grad_(True))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: layer(x, training=True, mask=m), (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="got torch.vmap"):
        torch.vmap(lambda x: layer(x, training=True, mask=m))(x.unsqueeze(0).expand(2, *shape))
    assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))


# Odd sizes and layouts for the fused variants: (shape, axis, how the input is laid out, ghost size).
ODD_CASES = {
    "C1-spatial49-channels_last": ((4, 1, 7, 7), 1, "channels_last", 2),
    "C17-spatial49": ((6, 49, 17), -1, "contiguous", 3),
    "C1000-spatial1": ((8, 1000), -1, "contiguous", 4),
    "C3-non-contiguous": ((6, 7, 3), -1, "transposed", 2),
    "C17-nchw-offset": ((6, 17, 5, 3), 1, "offset", 3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(ODD_CASES))
@pytest.mark.parametrize("name", ["ghost", "renorm", "ghost+renorm", "adjustment", "mask"])
def test_fused_variants_on_odd_shapes_and_layouts(device, case, name):
    """The fused path against the composite one, both in float64, on C = 1, 3, 17, 1000, spatial 1,
    7 and 49, channels-last, transposed (non-contiguous) and large-offset (1e4) inputs: outputs,
    every gradient and every moving variable after two steps."""
    shape, axis, layout, vbs = ODD_CASES[case]
    if name == "mask" and len(shape) == 4:
        pytest.skip("tf_keras's own fused path (4-D) ignores masks")
    c = shape[axis]
    kwargs = dict(CONFIGS[name])
    if "virtual_batch_size" in kwargs:
        kwargs["virtual_batch_size"] = vbs
    if name == "adjustment":
        bshape = [1] * len(shape)
        bshape[axis] = c
        kwargs["adjustment"] = lambda s: (torch.linspace(0.5, 1.5, c, dtype=torch.float64).view(bshape).to(device),
                                          torch.linspace(-0.2, 0.3, c, dtype=torch.float64).view(bshape).to(device))
    layers = []
    for fused in (None, False):
        layer = bn_cuda.BatchNormalization(axis=axis, momentum=0.8, fused=fused, **kwargs)
        layer.build(shape, device=torch.device(device))
        layer.double()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            layer.gamma.copy_(torch.randn(layer.gamma.shape, generator=g, dtype=torch.float64) * 0.5 + 1)
            layer.beta.copy_(torch.randn(layer.beta.shape, generator=g, dtype=torch.float64) * 0.5)
        layers.append(layer)
    mask = None
    if name == "mask":
        mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2)) > 0.3
        mask.view(-1)[:2] = True
        mask = mask.to(device)
    for step in range(2):
        g = torch.Generator().manual_seed(30 + step)
        bshape = [1] * len(shape)
        bshape[axis] = c
        base = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(c, generator=g, dtype=torch.float64)
                                                                        + 0.5).view(bshape)
        base = base + torch.randn(c, generator=g, dtype=torch.float64).view(bshape) * 3
        if layout == "offset":
            base = base + 1e4
        gy = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
        outs = []
        for layer in layers:
            x = base.to(device)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "transposed":  # same values, non-contiguous strides
                x = x.transpose(1, 2).contiguous().transpose(1, 2)
                assert not x.is_contiguous()
            x.requires_grad_(True)
            y = layer(x, training=True, mask=mask)
            y.backward(gy)
            outs.append((y.detach(), x.grad, layer.gamma.grad.clone(), layer.beta.grad.clone()))
            layer.zero_grad()
        for a, b, what in zip(outs[0], outs[1], ("output", "grad input", "grad gamma", "grad beta")):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"{what} after step {step}")
        for (n, a), (_, b) in zip(layers[0].named_buffers(), layers[1].named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"buffer {n} after step {step}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["renorm", "ghost+renorm"])
@pytest.mark.parametrize("poisoned", ["renorm_stddev", "moving_stddev", "input"])
def test_renorm_propagates_nan_like_the_composite(device, name, poisoned):
    """A NaN in renorm's statistics (or in one feature's data) propagates as tf_keras's
    tf.maximum / relu propagate it, on the kernels as on the composite path: a NaN renorm_stddev
    gives a NaN output and renorm statistics, not the sqrt(eps) floor's finite values, and a NaN
    moving_stddev a NaN moving_variance, not 0. The other features are untouched by it."""
    shape = (12, 7, 5)
    layers = [_layer(name, fused, device, shape) for fused in (None, False)]
    x = _input(shape, device, seed=5).float()
    if poisoned == "input":
        x[3, 2, 1] = float("nan")
    else:
        for layer in layers:
            with torch.no_grad():
                getattr(layer, poisoned).view(-1)[1] = float("nan")
    outs = [layer(x, training=True) for layer in layers]
    # (moving_stddev feeds only moving_variance; renorm_stddev only r, d and itself)
    assert outs[0][..., 1].isnan().all() == (poisoned != "moving_stddev")
    assert layers[0].moving_variance.view(-1)[1].isnan() == (poisoned != "renorm_stddev")
    assert not outs[0][..., 0].isnan().any() and not layers[0].moving_variance.view(-1)[0].isnan()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5, equal_nan=True)
    for (n, a), (_, b) in zip(layers[0].named_buffers(), layers[1].named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"buffer {n}")
    y = [layer(x, training=False) for layer in layers]
    torch.testing.assert_close(y[0], y[1], rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [16, 17, 40])
@pytest.mark.parametrize("training", [True, False])
def test_ghost_bf16_wide_rows_match_float64(device, C, training):
    """Ghost batches over channels-last bfloat16 rows of whole vector blocks and a tail (C = 16, 17,
    40; the AVX2 copy permutes each ghost's coefficients to its lane order there): output and input
    gradient as the float64 layer's on the same bfloat16-rounded input, to bfloat16 rounding, each
    ghost with its own statistics (ghost means 0 .. 6 apart: a ghost given another's coefficients
    is off by O(1))."""
    shape = (8, 5, 3, C)
    g = torch.Generator().manual_seed(C)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    x64 += torch.arange(8, dtype=torch.float64).view(8, 1, 1, 1) * 0.8  # (ghosts of 2 samples)
    x64 = x64.to(torch.bfloat16).double().to(device)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(torch.bfloat16).double().to(device)
    outs = {}
    for dtype in (torch.float64, torch.bfloat16):
        layer = bn_cuda.BatchNormalization(virtual_batch_size=2, momentum=0.5)
        layer.build(shape, device=torch.device(device))
        with torch.no_grad():
            layer.gamma.copy_(torch.linspace(0.5, 1.5, C))
            layer.beta.copy_(torch.linspace(-1, 1, C))
            layer.moving_mean.copy_(torch.linspace(-0.2, 0.3, C))
            layer.moving_variance.copy_(torch.linspace(0.5, 2, C))
        x = x64.to(dtype).requires_grad_(training)
        y = layer(x, training=training)
        gx = torch.autograd.grad(y, x, gy.to(dtype))[0].double() if training else None
        outs[dtype] = (y.double(), gx)
    (y64, g64), (y16, g16) = outs[torch.float64], outs[torch.bfloat16]
    torch.testing.assert_close(y16, y64, rtol=0, atol=8e-3 * y64.abs().max().item())
    if training:
        torch.testing.assert_close(g16, g64, rtol=0, atol=1.6e-2 * g64.abs().max().item())
