"""The staged operators (batch_stats -> gather_stats -> normalize; grad_sums -> grad_input) split
across several "ranks" must reproduce batch norm on the concatenated batch."""

import re

import pytest
import torch
import torch.nn.functional as F

from bn_cuda import staged

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(shape, dtype, device, seed=0, offset=1e3):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    b = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand(c, generator=g, dtype=torch.float64)).view(b)
    return (x + offset * torch.randn(c, generator=g, dtype=torch.float64).view(b)).to(device, dtype)


def _staged_step(x, splits, w, b, rm, rv, gy, momentum=0.1, eps=1e-5):
    parts = list(torch.split(x, splits))
    states = [staged.batch_stats(p, [1]) for p in parts]
    mean, m2, cnt = (torch.stack([s[k] for s in states]) for k in range(3))
    gm, ginv, gc = staged.gather_stats(mean, m2, cnt, rm, rv, momentum, eps)
    ys = [staged.normalize(p, gm, ginv, w, b, [1]) for p in parts]
    gys = list(torch.split(gy, splits))
    sums = [staged.grad_sums(g, p, gm, ginv, [1]) for g, p in zip(gys, parts)]
    sdy = sum(s[0] for s in sums)
    sdyx = sum(s[1] for s in sums)
    gis = [staged.grad_input(g, p, gm, ginv, w, sdy, sdyx, gc, [1]) for g, p in zip(gys, parts)]
    gw = sum(s[1] * ginv for s in sums)
    gb = sdy
    return torch.cat(ys), torch.cat(gis), gw, gb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits,shape", [([2, 3, 5], (10, 3, 7, 7)), ([0, 1, 4], (5, 17, 2, 3)),
                                          ([0, 0, 3], (3, 4, 5)), ([1, 1, 1], (3, 1000)), ([4], (4, 5, 1, 1))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_batches_match_concatenated(device, splits, shape, channels_last):
    x = _data(shape, torch.float64, device)
    if channels_last:
        if x.dim() != 4:
            pytest.skip("channels_last needs 4-D")
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64, device=device)
    b = torch.randn(c, dtype=torch.float64, device=device)
    rm, rv = torch.zeros(c, dtype=torch.float64, device=device), torch.ones(c, dtype=torch.float64, device=device)
    gy = torch.randn(shape, dtype=torch.float64, device=device)
    y, gi, gw, gb = _staged_step(x, splits, w, b, rm, rv, gy)
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    rrm, rrv = torch.zeros_like(rm), torch.ones_like(rv)
    yr = F.batch_norm(xr, rrm, rrv, wr, br, training=True)
    yr.backward(gy)
    for a, r in [(y, yr), (gi, xr.grad), (gw, wr.grad), (gb, br.grad), (rm, rrm), (rv, rrv)]:
        torch.testing.assert_close(a, r.detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_all_empty_keeps_running_stats(device):
    c = 6
    x = torch.empty(0, c, 3, device=device)
    mean, m2, cnt = staged.batch_stats(x, [1])
    assert torch.equal(cnt, torch.zeros(c, device=device)) and torch.equal(m2, torch.zeros(c, device=device))
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    _, _, total = staged.gather_stats(torch.stack([mean, mean]), torch.stack([m2, m2]), torch.stack([cnt, cnt]),
                                      rm, rv, 0.1, 1e-5)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.equal(total, torch.zeros(c, device=device))


def test_gather_stats_errors_name_arguments():
    m = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="same shape"):
        staged.gather_stats(m, torch.zeros(2, 4), m, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="running_mean"):
        staged.gather_stats(m, m, m, torch.zeros(5), None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        staged.gather_stats(m, m, m, None, None, 0.1, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_staged_ops(device):
    x = _data((4, 3, 5), torch.float32, device, offset=2.0)
    w, b = torch.randn(3, device=device), torch.randn(3, device=device)
    mean, m2, cnt = torch.ops.bn_cuda.batch_stats(x, [1])
    torch.library.opcheck(torch.ops.bn_cuda.batch_stats.default, (x, [1]))
    stack = (torch.stack([mean, mean]), torch.stack([m2, m2]), torch.stack([cnt, cnt]))
    torch.library.opcheck(torch.ops.bn_cuda.gather_stats.default,
                          (*stack, torch.zeros(3, device=device), torch.ones(3, device=device), 0.1, 1e-5, True))
    gm, ginv, gc = torch.ops.bn_cuda.gather_stats(*stack, None, None, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.bn_cuda.normalize.default, (x, gm, ginv, w, b, [1]))
    gy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.bn_cuda.grad_sums.default, (gy, x, gm, ginv, [1]))
    sdy, sdyx = torch.ops.bn_cuda.grad_sums(gy, x, gm, ginv, [1])
    torch.library.opcheck(torch.ops.bn_cuda.grad_input.default, (gy, x, gm, ginv, w, sdy, sdyx, gc, [1]))
    torch.library.opcheck(torch.ops.bn_cuda.ghost_backward.default, (gy, x, gm, ginv, w, [1], 1, [True, True, True]))
    vec = lambda n=3: torch.randn(n, device=device)  # noqa: E731
    for ghosts, mask in ((1, [True] * 4), (2, [True, False, True, True])):
        torch.library.opcheck(torch.ops.bn_cuda.keras_grads.default,
                              (vec(3 * ghosts), vec(3 * ghosts), vec(), vec(), vec(), vec(), vec(), True, ghosts, mask))
    torch.library.opcheck(torch.ops.bn_cuda.keras_grads.default,
                          (vec(), vec(), None, None, vec(), None, None, False, 1, [True] * 4))
    for ghosts, mask in ((1, [True] * 5), (2, [False, True, False, True, True])):
        xg = _data((4, 3, 2, 5), torch.float32, device, offset=2.0)
        mg, m2g, cg = staged.batch_stats(xg, [1], ghosts=ghosts)
        ig = torch.rsqrt(m2g / cg + 1e-3)
        torch.library.opcheck(torch.ops.bn_cuda.keras_backward.default,
                              (torch.randn_like(xg), xg, mg, ig, vec(3 * ghosts), [1], ghosts, vec(), vec(), vec(),
                               vec(), vec(), True, mask))
    rand = lambda n=3: torch.rand(n, device=device) + 0.5  # noqa: E731
    for ghosts, renorm in ((1, False), (2, True)):
        xx = _data((4, 3, 2, 5), torch.float32, device, offset=2.0)
        ren = (rand(), rand(), rand()) if renorm else (None, None, None)
        torch.library.opcheck(torch.ops.bn_cuda.keras_forward.default,
                              (xx, [1], None, ghosts, rand(), rand(), None, None, rand(), rand(), *ren, 0.9, 0.9,
                               1e-3, 0.5, 2.0, 1.0, False))
    x4 = _data((4, 3, 2, 5), torch.float32, device, offset=2.0)
    gy4 = torch.randn_like(x4)
    for xx, gg in ((x4, gy4), (x4.contiguous(memory_format=torch.channels_last), gy4)):
        m2g, _, _ = torch.ops.bn_cuda.batch_stats(xx, [1], None, 2)
        inv2 = torch.rand(6, device=device) + 0.5
        for mask in ([True, True, True], [False, True, False], [True, False, False]):
            torch.library.opcheck(torch.ops.bn_cuda.ghost_backward.default, (gg, xx, m2g, inv2, None, [1], 2, mask))


def _masked_reference(x, mask, w, b, eps, gy):
    """Weighted-moments batch norm in float64 with autograd (tf.nn.weighted_moments semantics)."""
    xr = x.detach().double().requires_grad_(True)
    wm = mask.double().expand_as(xr)
    dims = [d for d in range(x.dim()) if d != 1]
    cnt = wm.sum(dims, keepdim=True)
    mean = (wm * xr).sum(dims, keepdim=True) / cnt
    var = (wm * (xr - mean) ** 2).sum(dims, keepdim=True) / cnt
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (xr - mean) / torch.sqrt(var + eps) * w.double().view(shape) + b.double().view(shape)
    y.backward(gy.double())
    return y.detach(), xr.grad, mean.reshape(-1), var.reshape(-1), cnt.reshape(-1)


@pytest.mark.parametrize("shape,mask_shape,channels_last", [
    ((6, 5, 4, 3), (6, 1, 4, 3), False),   # per-position mask, channels-first
    ((6, 5, 4, 3), (6, 1, 4, 3), True),    # channels-last
    ((7, 17), (7, 1), False),              # 2-D, per-sample mask (Keras: mask[..., None])
    ((4, 9, 3), (4, 9, 1), False),         # Keras-style (batch, time) mask on a features-last input
    ((5, 3, 40000), (5, 1, 40000), False),  # rows longer than a CPU chunk
])
@pytest.mark.parametrize("device", DEVICES)
def test_masked_stats_and_grad_match_weighted_moments(shape, mask_shape, channels_last, device):
    g = torch.Generator().manual_seed(3)
    x = _data(shape, torch.float64, "cpu", seed=4, offset=50.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.rand(mask_shape, generator=g) > 0.4
    mask.view(-1)[0] = True  # at least one unmasked element per feature
    c = shape[1]
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    gy = torch.randn(shape, dtype=torch.float64)
    axis = [1]
    if len(shape) == 3 and shape[2] == 3:  # features last for the Keras-style case
        axis = [2]
        w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        xp, gp, mp = x.transpose(1, 2), gy.transpose(1, 2), mask.transpose(1, 2)
        ref_y, ref_gx, ref_mean, ref_var, ref_cnt = _masked_reference(xp, mp, w, b, 1e-3, gp)
        ref_y, ref_gx = ref_y.transpose(1, 2), ref_gx.transpose(1, 2)
    else:
        ref_y, ref_gx, ref_mean, ref_var, ref_cnt = _masked_reference(x, mask, w, b, 1e-3, gy)
    x, mask, w, b, gy = (t.to(device) for t in (x, mask, w, b, gy))
    ref_y, ref_gx, ref_mean, ref_var, ref_cnt = (t.to(device) for t in (ref_y, ref_gx, ref_mean, ref_var, ref_cnt))
    mean, m2, cnt = staged.batch_stats(x, axis, mask)
    torch.testing.assert_close(cnt, ref_cnt, rtol=0, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(m2 / cnt, ref_var, rtol=1e-10, atol=1e-12)
    gm, ginv, gc = staged.gather_stats(mean[None], m2[None], cnt[None], None, None, 0.1, 1e-3)
    y = staged.normalize(x, gm, ginv, w, b, axis)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    sdy, sdyx = staged.grad_sums(gy, x, gm, ginv, axis)
    gx = staged.grad_input(gy, x, gm, ginv, w, sdy, sdyx, gc, axis, mask)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-9, atol=1e-10)


def test_mask_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="mask"):
        staged.batch_stats(x, [1], torch.ones(4, 1))
    with pytest.raises(RuntimeError, match="mask of shape \\[5, 1\\] does not broadcast"):
        staged.batch_stats(x, [1], torch.ones(5, 1, dtype=torch.bool))


def _ghost_reference(x, axis, ghosts, w, b, eps, gy, mask=None, param_grads=False):
    """tf_keras's ghost batches in float64 with autograd: reshape (N, ...) -> (N / G, G, ...).
    ``param_grads``: also the gradients of the per-(ghost, feature) w and b."""
    xr = x.detach().double().requires_grad_(True)
    w, b = (t.detach().double().requires_grad_(True) for t in (w, b))
    xg = xr.reshape(x.shape[0] // ghosts, ghosts, *x.shape[1:])
    gaxes = [1] + [a % x.dim() + 1 for a in axis]
    dims = [d for d in range(xg.dim()) if d not in gaxes]
    shape = [xg.shape[d] if d in gaxes else 1 for d in range(xg.dim())]
    if mask is None:
        wm = torch.ones_like(xg)
    else:
        wm = mask.double().expand_as(xr).reshape(xg.shape)
    cnt = wm.sum(dims, keepdim=True)
    mean = (wm * xg).sum(dims, keepdim=True) / cnt
    var = (wm * (xg - mean) ** 2).sum(dims, keepdim=True) / cnt
    yg = (xg - mean) / torch.sqrt(var + eps) * w.double().reshape(shape) + b.double().reshape(shape)
    y = yg.reshape(x.shape)
    y.backward(gy.double())
    out = y.detach(), xr.grad, mean.reshape(-1).detach(), var.reshape(-1).detach()
    return out + (w.grad.reshape(-1), b.grad.reshape(-1)) if param_grads else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis,layout,ghosts", [
    ((8, 5, 6, 7), [1], "contiguous", 4),        # NCHW: split view, features (G, C) adjacent
    ((8, 5, 6, 7), [1], "channels_last", 2),     # NHWC memory: ghost rows
    ((8, 6, 7, 5), [-1], "contiguous", 4),       # (B, H, W, C): ghost rows
    ((12, 9, 17), [-1], "contiguous", 3),        # (B, T, C) sequences: ghost rows
    ((6, 17), [1], "contiguous", 3),             # 2-D
    ((16, 1000), [1], "contiguous", 2),
    ((8, 3, 4, 5), [1, 3], "contiguous", 2),     # two feature axes
])
@pytest.mark.parametrize("masked", [False, True])
def test_ghost_batches_match_reference(device, shape, axis, layout, ghosts, masked):
    g = torch.Generator().manual_seed(5)
    x = _data(shape, torch.float64, "cpu", seed=6, offset=20.0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = 1
    for a in axis:
        c *= shape[a]
    w = torch.randn(ghosts * c, dtype=torch.float64, generator=g)
    b = torch.randn(ghosts * c, dtype=torch.float64, generator=g)
    gy = torch.randn(shape, dtype=torch.float64, generator=g)
    mask = None
    if masked:
        mask = torch.rand(shape[:-1] + (1,), generator=g) > 0.3
        mask.view(-1)[: shape[0]] = True
    ref_y, ref_gx, ref_mean, ref_var = _ghost_reference(x, axis, ghosts, w, b, 1e-3, gy, mask)
    x, w, b, gy = (t.to(device) for t in (x, w, b, gy))
    if mask is not None:
        mask = mask.to(device)
    mean, m2, cnt = staged.batch_stats(x, axis, mask, ghosts=ghosts)
    assert mean.shape == (ghosts * c,)
    torch.testing.assert_close(mean.cpu(), ref_mean, rtol=1e-11, atol=1e-10)
    torch.testing.assert_close((m2 / cnt).cpu(), ref_var, rtol=1e-10, atol=1e-11)
    gm, ginv, gc = staged.gather_stats(mean[None], m2[None], cnt[None], None, None, 0.1, 1e-3)
    y = staged.normalize(x, gm, ginv, w, b, axis, ghosts=ghosts)
    assert y.shape == x.shape
    torch.testing.assert_close(y.cpu(), ref_y, rtol=1e-10, atol=1e-10)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    sdy, sdyx = staged.grad_sums(gy, x, gm, ginv, axis, ghosts=ghosts)
    gx = staged.grad_input(gy, x, gm, ginv, w, sdy, sdyx, gc, axis, mask, ghosts=ghosts)
    torch.testing.assert_close(gx.cpu(), ref_gx, rtol=1e-9, atol=1e-10)
    if not masked:  # the one-pass backward of local statistics
        _, _, _, _, ref_gw, ref_gb = _ghost_reference(x.cpu(), axis, ghosts, w.cpu(), b.cpu(), 1e-3, gy.cpu(),
                                                      param_grads=True)
        gx1, gw1, gb1 = staged.ghost_backward(gy, x, gm, ginv, w, axis, ghosts=ghosts)
        torch.testing.assert_close(gx1.cpu(), ref_gx, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gw1.cpu(), ref_gw, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gb1.cpu(), ref_gb, rtol=1e-9, atol=1e-10)
        assert gx1.stride() == gx.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis,layout", [
    ((8, 3, 4, 5), [1], "contiguous"),      # split batch
    ((8, 3, 4, 5), [1], "channels_last"),   # ghost rows
    ((6, 7, 17), [-1], "contiguous"),       # ghost rows, (B, T, C)
    ((8, 3, 4, 5), [1, 3], "contiguous"),   # two feature axes apart
    ((8, 5, 4, 3), [2, 3], "contiguous"),   # two feature axes innermost: ghost rows
])
def test_ghost_tensor_forms_agree_across_layouts(device, shape, axis, layout):
    """Every staged op that takes per-(ghost, feature) tensors takes them flat (G * C,), as
    (G, *feature dims), in the split batch's rank-preserving form and strided, in every layout
    (channels-last ghost rows too), with bitwise the results of the flat form."""
    ghosts = 2
    g = torch.Generator().manual_seed(11)
    x = _data(shape, torch.float32, "cpu", seed=12, offset=3.0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(shape, generator=g)
    fdims = [shape[a] for a in axis]
    n = ghosts
    for d in fdims:
        n *= d
    keras = [1, ghosts] + [1] * (len(shape) - 1)
    for a in axis:
        keras[a % len(shape) + 1] = shape[a]
    forms = {
        "dims": lambda t: t.view(ghosts, *fdims),
        "keras": lambda t: t.view(keras),
        "strided": lambda t: t.view(ghosts, -1).t().contiguous().t().view(ghosts, *fdims),
    }
    x, gy = x.to(device), gy.to(device)
    mean, m2, cnt = staged.batch_stats(x, axis, ghosts=ghosts)
    gm, ginv, gc = staged.gather_stats(mean[None], m2[None], cnt[None], None, None, 0.1, 1e-3)
    w = torch.randn(n, generator=g).to(device)
    b = torch.randn(n, generator=g).to(device)

    def run(f):
        y = staged.normalize(x, f(gm), f(ginv), f(w), f(b), axis, ghosts=ghosts)
        sdy, sdyx = staged.grad_sums(gy, x, f(gm), f(ginv), axis, ghosts=ghosts)
        gx = staged.grad_input(gy, x, f(gm), f(ginv), f(w), f(sdy), f(sdyx), f(gc), axis, ghosts=ghosts)
        return (y, sdy, sdyx, gx) + staged.ghost_backward(gy, x, f(gm), f(ginv), f(w), axis, ghosts=ghosts)

    want = run(lambda t: t)
    ref_y, ref_gx, _, _ = _ghost_reference(x.cpu(), axis, ghosts, w.cpu(), b.cpu(), 1e-3, gy.cpu())
    torch.testing.assert_close(want[0].cpu().double(), ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(want[3].cpu().double(), ref_gx, rtol=1e-4, atol=1e-4)
    assert not forms["strided"](gm).is_contiguous()
    # ghost_backward: bitwise grad_sums + grad_input
    assert torch.equal(want[4], want[3]) and torch.equal(want[5], want[2] * ginv)
    assert torch.equal(want[6], want[1])
    for name, f in forms.items():
        for got, ref, what in zip(run(f), want, ("output", "sum_dy", "sum_dy_xmu", "grad_input", "ghost_backward dx",
                                                 "ghost_backward grad_weight", "ghost_backward grad_bias")):
            assert torch.equal(got, ref), f"{name}: {what}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,axis,layout,ghosts", [
    ((6, 17, 7, 7), [1], "contiguous", 3),       # split batch
    ((6, 17, 7, 7), [1], "channels_last", 2),    # ghost rows
    ((4, 3, 96, 96), [1], "contiguous", 1),      # several CPU partitions per feature
    ((4, 3, 96, 96), [1], "channels_last", 2),
    ((64, 1000), [1], "contiguous", 8),          # 2-D, many features
    ((9, 1, 49), [1], "strided", 3),             # C = 1, a non-contiguous input
    ((10, 5, 1, 1), [1], "contiguous", 10),      # one sample per ghost: grad_input exactly 0
    ((8, 7, 3), [-1], "strided", 4),             # features last, non-contiguous: ghost rows or a copy
])
def test_ghost_backward_is_grad_sums_then_grad_input(device, dtype, shape, axis, layout, ghosts):
    """ghost_backward gives bitwise what grad_sums, sum_dy_xmu * invstd and grad_input with
    batch_stats' counts give (the Keras layer's C++ step and its Python twin rely on it), on data
    with large per-feature offsets, in every dtype and layout."""
    x = _data(shape, torch.float64, "cpu", seed=21, offset=1e4 if dtype == torch.float64 else 30.0).to(dtype)
    g = torch.Generator().manual_seed(22)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() == 3 else x
        gy = torch.cat([gy, gy], -1)[..., ::2]
        assert not gy.is_contiguous()
    x, gy = x.to(device), gy.to(device)
    mean, m2, cnt = staged.batch_stats(x, axis, ghosts=ghosts)
    acc = mean.dtype
    invstd = torch.rsqrt(m2 / cnt + 1e-3)
    c = mean.numel()
    w = (torch.rand(c, generator=g, dtype=acc) + 0.5).to(device)
    sdy, sdyx = staged.grad_sums(gy, x, mean, invstd, axis, ghosts=ghosts)
    want_gx = staged.grad_input(gy, x, mean, invstd, w, sdy, sdyx, cnt, axis, ghosts=ghosts)
    for weight in (w, None):
        want = staged.grad_input(gy, x, mean, invstd, weight, sdy, sdyx, cnt, axis, ghosts=ghosts)
        gx, gw, gb = staged.ghost_backward(gy, x, mean, invstd, weight, axis, ghosts=ghosts)
        assert gx.dtype == dtype and gx.shape == x.shape and gx.stride() == want.stride()
        assert gw.dtype == gb.dtype == acc and gw.shape == gb.shape == (c,)
        assert torch.equal(gx, want)
        assert torch.equal(gw, sdyx * invstd) and torch.equal(gb, sdy)
    if shape[0] == ghosts:
        assert torch.equal(want_gx, torch.zeros_like(want_gx))
    # output_mask: what is not asked for comes back empty, the rest unchanged
    gx, gw, gb = staged.ghost_backward(gy, x, mean, invstd, w, axis, ghosts=ghosts, output_mask=(False, True, True))
    assert gx.numel() == 0 and torch.equal(gw, sdyx * invstd) and torch.equal(gb, sdy)
    gx, gw, gb = staged.ghost_backward(gy, x, mean, invstd, w, axis, ghosts=ghosts, output_mask=(True, False, False))
    assert torch.equal(gx, want_gx) and gw.numel() == 0 and gb.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,axis,layout,ghosts", [
    ((12, 5, 3, 7), [1], "contiguous", 3),
    ((32, 3, 4, 4), [1], "channels_last", 16),   # CUDA: the fused finalize's largest ghost count
    ((34, 2, 5), [1], "contiguous", 17),         # CUDA: finalize, then keras_grads' own kernel
    ((8, 7, 3), [-1], "strided", 4),
    ((9, 1, 49), [1], "contiguous", 1),
])
@pytest.mark.parametrize("factors", ["all", "renorm-gamma", "adjust-beta", "none"])
def test_keras_backward_is_ghost_backward_then_keras_grads(device, dtype, shape, axis, layout, ghosts, factors):
    """keras_backward returns bitwise what ghost_backward and then keras_grads on its sums return,
    for every factor subset, ghost count (on CUDA: fused up to 16 ghosts, two kernels above) and
    output mask."""
    x = _data(shape, torch.float64, "cpu", seed=41, offset=25.0).to(dtype)
    g = torch.Generator().manual_seed(42)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        gy = torch.cat([gy, gy], -1)[..., ::2]
    x, gy = x.to(device), gy.to(device)
    mean, m2, cnt = staged.batch_stats(x, axis, ghosts=ghosts)
    acc = mean.dtype
    invstd = torch.rsqrt(m2 / cnt + 1e-3)
    c = mean.numel() // ghosts
    vec = lambda lo=0.5: (torch.rand(c, generator=g, dtype=torch.float64) + lo).to(device, acc)  # noqa: E731
    w = torch.cat([vec() for _ in range(ghosts)])
    r, d, gamma, adj_s, adj_b, beta = {
        "all": (vec(), vec(-1.0), vec(), vec(), vec(-0.5), True),
        "renorm-gamma": (vec(), vec(-1.0), vec(), None, None, False),
        "adjust-beta": (None, None, None, vec(), vec(-0.5), True),
        "none": (None, None, None, None, None, False),
    }[factors]
    for mask in ((True,) * 5, (False, True, False, True, False), (True, False, False, False, False)):
        got = staged.keras_backward(gy, x, mean, invstd, w, axis, ghosts, r, d, gamma, adj_s, adj_b, beta, mask)
        gx, ds, dh = staged.ghost_backward(gy, x, mean, invstd, w, axis, ghosts, (mask[0], True, True))
        want = (gx,) + tuple(staged.keras_grads(ds, dh, r, d, gamma, adj_s, adj_b, beta, ghosts, mask[1:]))
        for k, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.shape == b.shape, (mask, k)
            assert torch.equal(a, b), (mask, k)
    # its own checks name it; keras_grads' ones come through
    with pytest.raises(ValueError, match="keras_backward: output_mask must have 5 entries"):
        staged.keras_backward(gy, x, mean, invstd, w, axis, ghosts, r, d, gamma, adj_s, adj_b, beta, (True,) * 4)
    with pytest.raises(RuntimeError, match=r"gamma has shape \[%d\]" % (c + 1)):
        staged.keras_backward(gy, x, mean, invstd, w, axis, ghosts, r, d, torch.cat([vec(), vec()[:1]]), adj_s,
                              adj_b, beta)


@pytest.mark.skipif(not hasattr(__import__("bn_cuda")._C, "_emulated_launches"),
                    reason="counts kernels under the host emulation (the emulated build)")
@pytest.mark.parametrize("ghosts,kernels", [(1, 3), (8, 3), (16, 3), (17, 4)])
def test_keras_backward_kernel_count(ghosts, kernels):
    """keras_backward's CUDA body launches as many kernels as the plain training backward (sums,
    their finalize with keras_grads, grad_input) up to 16 ghosts; one more above."""
    import bn_cuda
    from bn_cuda.functional import batch_norm

    launches = bn_cuda._C._emulated_launches
    x = _data((2 * ghosts, 6, 3, 5), torch.float32, "cpu", seed=6, offset=3.0).contiguous(
        memory_format=torch.channels_last)
    mean, m2, cnt = staged.batch_stats(x, [1], ghosts=ghosts)
    invstd = torch.rsqrt(m2 / cnt + 1e-3)
    v = lambda n=6: torch.rand(n) + 0.5  # noqa: E731
    gy = torch.randn_like(x)
    before = launches()
    staged.keras_backward(gy, x, mean, invstd, v(6 * ghosts), [1], ghosts, v(), v(), v(), v(), v(), True)
    assert launches() - before == kernels
    xr = x.clone().requires_grad_(True)
    w, b = v().requires_grad_(True), v().requires_grad_(True)
    y = batch_norm(xr, torch.zeros(6), torch.ones(6), w, b, training=True)
    before = launches()
    torch.autograd.grad(y, [xr, w, b], gy)
    assert launches() - before == 3  # the plain layer's


@pytest.mark.parametrize("device", DEVICES)
def test_ghost_backward_empty_batch_and_errors(device):
    x = torch.empty(0, 4, 3, device=device)
    m = torch.zeros(8, device=device)
    gx, gw, gb = staged.ghost_backward(torch.empty_like(x), x, m, m + 1, None, 1, ghosts=2)
    assert gx.shape == x.shape and torch.equal(gw, m) and torch.equal(gb, m)
    x = torch.randn(6, 4, 3, device=device)
    with pytest.raises(ValueError, match="output_mask must have 3 entries, got 2"):
        staged.ghost_backward(x, x, m, m, None, 1, ghosts=2, output_mask=(True, True))
    with pytest.raises(ValueError, match="ghosts=4 must divide the batch size, got a batch of 6"):
        staged.ghost_backward(x, x, torch.zeros(16, device=device), torch.ones(16, device=device), None, 1, ghosts=4)


def _keras_grads_reference(ds, dh, ghosts, r, d, gamma, beta, adj_s, adj_b):
    """d/d(params) of sum(ds * scale + dh * shift) over every ghost, in float64 with autograd, for
    scale = r * S1, shift = d * S1 + O1, S1 = adj_s * gamma, O1 = adj_b * gamma + beta."""
    leaves = {k: (None if v is None else v.detach().double().requires_grad_(True))
              for k, v in (("gamma", gamma), ("beta", beta), ("adj_scale", adj_s), ("adj_bias", adj_b))}
    c = ds.numel() // ghosts
    one, zero = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    s1 = (one if adj_s is None else leaves["adj_scale"]) * (one if gamma is None else leaves["gamma"])
    o1 = (zero if adj_b is None else leaves["adj_bias"] * (one if gamma is None else leaves["gamma"]))
    o1 = o1 + (zero if beta is None else leaves["beta"])
    scale, shift = (s1, o1) if r is None else (r.double() * s1, d.double() * s1 + o1)
    loss = (ds.double().view(ghosts, c) * scale).sum() + (dh.double().view(ghosts, c) * shift).sum()
    wrt = [v for v in leaves.values() if v is not None]
    grads = torch.autograd.grad(loss, wrt) if wrt else ()
    it = iter(grads)
    return [None if v is None else next(it) for v in leaves.values()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ghosts", [1, 3, 70])
@pytest.mark.parametrize("factors", ["all", "renorm", "gamma-beta", "adjustment", "none", "adj-no-gamma"])
def test_keras_grads_matches_autograd_of_the_composition(device, dtype, ghosts, factors):
    """keras_grads against float64 autograd through the composition, per factor subset, ghost count
    (70: more ghosts than a warp has lanes) and dtype; with one ghost and float32, bitwise the same
    ATen products (the Python path's autograd graph)."""
    g = torch.Generator().manual_seed(ghosts)
    c = 17
    rnd = lambda n=c: (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(dtype)  # noqa: E731
    ds, dh = rnd(ghosts * c), rnd(ghosts * c)
    use = {"all": "rdgbsa", "renorm": "rdgb", "gamma-beta": "gb", "adjustment": "gbsa", "none": "", "adj-no-gamma": "rdsa"}
    u = use[factors]
    r, d = (rnd() if "r" in u else None), (rnd() if "d" in u else None)
    gamma, beta = (rnd() if "g" in u else None), (rnd() if "b" in u else None)
    adj_s, adj_b = (rnd() if "s" in u else None), (rnd() if "a" in u else None)
    ref = _keras_grads_reference(ds, dh, ghosts, r, d, gamma, beta, adj_s, adj_b)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    args = [dev(t) for t in (ds, dh, r, d, gamma, adj_s, adj_b)]
    got = staged.keras_grads(*args, beta is not None, ghosts)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, a, want in zip(("gamma", "beta", "adj_scale", "adj_bias"), got, ref):
        if want is None:
            assert a.numel() == 0, name
            continue
        assert a.dtype == dtype and a.shape == (c,), name
        torch.testing.assert_close(a.cpu().double(), want, rtol=tol, atol=tol * float(want.abs().max()), msg=name)
    if ghosts == 1 and dtype == torch.float32 and factors == "all":
        ds_, dh_, r_, d_, gamma_, adj_s_, adj_b_ = args
        d_s1 = ds_ * r_ + dh_ * d_
        for a, want in zip(got, (d_s1 * adj_s_ + dh_ * adj_b_, dh_, d_s1 * gamma_, dh_ * gamma_)):
            assert torch.equal(a, want)
    # output_mask: what is not asked for is empty, the rest unchanged
    part = staged.keras_grads(*args, beta is not None, ghosts, output_mask=(False, True, False, True))
    for k, (a, full) in enumerate(zip(part, got)):
        assert a.numel() == 0 if k in (0, 2) else torch.equal(a, full)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["nchw-ghosts", "nhwc-ghosts", "features-last-renorm", "two-axes", "permuted",
                                  "mask-renorm", "plain-adjustment", "empty", "nhwc-16-ghosts", "nchw-17-ghosts",
                                  "mask-ghosts"])
def test_keras_forward_is_the_three_ops(device, dtype, case):
    """keras_forward returns bitwise what batch_stats, keras_coeffs and normalize return, and moves
    the moving variables as they do (on CUDA its epilogue kernel writes the apply coefficients, or
    normalize computes its own when it reorders the features: both must agree)."""
    shape, axis, ghosts, renorm, masked, adjust, layout = {
        "nchw-ghosts": ((12, 5, 3, 7), [1], 3, False, False, False, None),
        "nhwc-ghosts": ((8, 17, 3, 3), [1], 4, True, False, True, "channels_last"),
        "features-last-renorm": ((6, 7, 19), [-1], 2, True, False, False, None),
        "two-axes": ((6, 3, 4, 5), [1, 3], 2, True, False, True, None),
        "permuted": ((6, 3, 4, 5), [3, 1], 3, False, False, False, "permuted"),
        "mask-renorm": ((9, 7, 6), [-1], 1, True, True, False, None),
        "plain-adjustment": ((5, 1, 49), [1], 1, False, False, True, None),
        "empty": ((0, 4, 3), [1], 1, True, False, False, None),
        # (CUDA: the statistics' merge and the epilogue are one kernel up to 16 ghosts, two above)
        "nhwc-16-ghosts": ((32, 5, 3, 3), [1], 16, True, False, True, "channels_last"),
        "nchw-17-ghosts": ((34, 3, 2, 5), [1], 17, True, False, False, None),
        "mask-ghosts": ((8, 6, 5), [1], 4, True, True, False, None),
    }[case]
    g = torch.Generator().manual_seed(31)
    x = _data(shape, torch.float64, "cpu", seed=32, offset=40.0).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    x = x.to(device)
    c = 1
    for a in axis:
        c *= shape[a]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vec = lambda lo=0.5: (torch.rand(c, generator=g, dtype=torch.float64) + lo).to(device, acc)  # noqa: E731
    gamma, beta = vec(), vec(-1.0)
    adj = (vec(), vec(-0.5)) if adjust else (None, None)
    mask = (torch.rand(shape[:-1] + (1,), generator=g) > 0.3).to(device) if masked else None
    if mask is not None:
        mask.view(-1)[:2] = True
    moving = [vec(), vec(), vec(), vec(), vec()]
    scalars = (0.9, 0.8, 1e-3, 0.7, 1.4, 0.5, masked)

    def run(fused):
        mv = [t.clone() for t in moving]
        ren = mv[2:] if renorm else [None] * 3
        if fused:
            outs = staged.keras_forward(x, axis, mask, ghosts, gamma, beta, *adj, mv[0], mv[1], *ren, *scalars)
        else:
            mean, m2, cnt = staged.batch_stats(x, axis, mask, ghosts)
            invstd, w, b, r, d = staged.keras_coeffs(mean, m2, cnt, gamma, beta, *adj, mv[0], mv[1], *ren, ghosts,
                                                     *scalars)
            outs = (staged.normalize(x, mean, invstd, w, b, axis, ghosts), mean, invstd, w, cnt, r, d)
        return list(outs) + mv

    fused, staged_ = run(True), run(False)
    names = ["output", "mean", "invstd", "weight", "count", "r", "d", "moving_mean", "moving_variance",
             "moving_stddev", "renorm_mean", "renorm_stddev"]
    for name, a, b in zip(names, fused, staged_):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
        assert torch.equal(a, b), name
    if case != "empty":
        assert not torch.equal(fused[7], moving[0])  # (the moving mean moved)
    # a failing call moves nothing
    mv = [t.clone() for t in moving]
    with pytest.raises(RuntimeError, match=rf"gamma has shape \[{2 * c}\]"):
        staged.keras_forward(x, axis, mask, ghosts, torch.cat([gamma, gamma]), beta, *adj, mv[0], mv[1], None, None,
                             None, *scalars)
    assert all(torch.equal(a, b) for a, b in zip(mv, moving))


@pytest.mark.skipif(not hasattr(__import__("bn_cuda")._C, "_emulated_launches"),
                    reason="counts kernels under the host emulation (the emulated build)")
@pytest.mark.parametrize("ghosts,layout,masked,kernels", [
    (1, None, False, 3), (4, "channels_last", False, 3), (16, None, False, 3), (17, "channels_last", False, 4),
    (4, None, True, 4)])
def test_keras_forward_kernel_count(ghosts, layout, masked, kernels):
    """keras_forward's CUDA body launches as many kernels as the plain training forward's general
    path (statistics, their merge with tf_keras's epilogue, apply) up to 16 ghosts; one more above
    (the epilogue's own kernel) and with a mask (its shift kernel). (The plain forward of these small
    channels-first inputs is one launch, forward_single_cf_kernel.)"""
    import bn_cuda

    launches = bn_cuda._C._emulated_launches
    x = _data((2 * ghosts, 6, 3, 5), torch.float32, "cpu", seed=5, offset=3.0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    vec = lambda: torch.rand(c) + 0.5  # noqa: E731
    mask = (torch.rand(x.shape[:-1] + (1,)) > 0.3) if masked else None
    if mask is not None:
        mask.view(-1)[:2] = True
    mv = [vec(), vec(), vec(), vec(), vec()]
    before = launches()
    staged.keras_forward(x, [1], mask, ghosts, vec(), vec(), None, None, *mv, 0.9, 0.8, 1e-3, 0.7, 1.4, 0.5, False)
    assert launches() - before == kernels
    from bn_cuda.functional import batch_norm

    rm, rv = torch.zeros(c), torch.ones(c)
    before = launches()
    batch_norm(x, rm, rv, vec(), vec(), training=True)
    assert launches() - before == (3 if layout == "channels_last" else 1)  # the plain layer's


def test_ghost_errors_name_the_value():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="ghosts=4 must divide the batch size, got a batch of 6"):
        staged.batch_stats(x, [1], ghosts=4)
    with pytest.raises(ValueError, match="batch dim 0 cannot be a feature axis"):
        staged.batch_stats(x, [0], ghosts=2)
    with pytest.raises(ValueError, match="ghosts must be >= 1, got 0"):
        staged.batch_stats(x, [1], ghosts=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "axis2"])
def test_ghost_tensor_sizes_are_checked_in_the_callers_terms(layout, device):
    """With ghosts, a per-(ghost, feature) tensor of the wrong size is refused naming it, the
    caller's input shape and axis, ghosts and the ghosts * C entries expected (not the shape or axes
    of the internal ghost view), for every staged op that takes one, on both ghost plans (split
    batch and channels-last ghost rows); grad_out of the wrong shape is named as such; the mean /
    invstd of grad_sums and grad_input are named as the ops name them."""
    if layout == "axis2":
        x, axis, c = torch.randn(8, 3, 5, device=device), [2], 5
    else:
        x, axis, c = torch.randn(8, 3, 4, 5, device=device), [1], 3
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(x)
    ops = {
        "normalize": (lambda a: staged.normalize(x, a["mean"], a["invstd"], a["weight"], a["bias"], axis, ghosts=2),
                      ["mean", "invstd", "weight", "bias"]),
        "grad_sums": (lambda a: staged.grad_sums(a["grad_out"], x, a["mean"], a["invstd"], axis, ghosts=2),
                      ["mean", "invstd"]),
        "grad_input": (lambda a: staged.grad_input(a["grad_out"], x, a["mean"], a["invstd"], a["weight"], a["sum_dy"],
                                                   a["sum_dy_xmu"], a["count"], axis, ghosts=2),
                       ["mean", "invstd", "weight", "sum_dy", "sum_dy_xmu", "count"]),
        "ghost_backward": (lambda a: staged.ghost_backward(a["grad_out"], x, a["mean"], a["invstd"], a["weight"], axis,
                                                           ghosts=2),
                           ["mean", "invstd", "weight"]),
    }
    names = ["mean", "invstd", "weight", "bias", "sum_dy", "sum_dy_xmu", "count"]
    good = {n: torch.rand(2 * c, device=device) + 0.5 for n in names}
    good["grad_out"] = gy
    bad = torch.rand(c, device=device) + 0.5
    for op, (call, takes) in ops.items():
        call(good)  # the right sizes pass
        for name in takes:
            want = (f"bn_cuda: {name} has shape [{c}] ({c} elements) but the input of shape {list(x.shape)} has {c} "
                    f"features along axis {axis} and ghosts=2: expected ghosts * C = {2 * c} entries")
            with pytest.raises(RuntimeError, match=re.escape(want)):
                call({**good, name: bad})
        if op != "normalize":
            want = f"bn_cuda: grad_out has shape {[4] + list(x.shape[1:])} but input has shape {list(x.shape)}"
            with pytest.raises(RuntimeError, match=re.escape(want)):
                call({**good, "grad_out": gy[:4]})
    # Without ghosts, grad_sums' and grad_input's statistics are named as the ops name them.
    with pytest.raises(RuntimeError, match=r"bn_cuda: mean has shape \[7\]"):
        staged.grad_sums(gy, x, torch.zeros(7, device=device), torch.ones(c, device=device), axis)
    with pytest.raises(RuntimeError, match=r"bn_cuda: invstd has shape \[7\]"):
        staged.grad_input(gy, x, torch.zeros(c, device=device), torch.ones(7, device=device), None,
                          *(torch.ones(c, device=device) for _ in range(3)), axis)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ghosts", [1, 3])
@pytest.mark.parametrize("renorm", [False, True])
def test_keras_finalize_matches_composite(device, ghosts, renorm):
    """The one-step device epilogue against bn_cuda.keras.composite (tf_keras's maths)."""
    from bn_cuda.keras import composite

    g = torch.Generator().manual_seed(7)
    c = 5
    mean = torch.randn(ghosts * c, generator=g, dtype=torch.float64)
    var = torch.rand(ghosts * c, generator=g, dtype=torch.float64) + 0.1
    count = torch.full((ghosts * c,), 4.0, dtype=torch.float64)
    count[:c] = 0 if ghosts > 1 else 4.0  # an empty ghost still counts in the average
    bufs = {n: torch.rand(c, generator=g, dtype=torch.float64) + 0.5
            for n in ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")}
    clip = {"rmin": 0.8, "rmax": 1.1, "dmax": 0.2}
    eps, mom, rmom = 1e-3, 0.9, 0.7
    ref = {n: t.clone() for n, t in bufs.items()}
    new_mean = mean.view(ghosts, c).mean(0)
    new_var = var.view(ghosts, c).mean(0)
    if renorm:
        r_ref, d_ref, stddev = composite.renorm_correction(new_mean, new_var, ref["renorm_mean"], ref["renorm_stddev"],
                                                           eps, clip)
        ref["renorm_mean"] = composite.moving_average(ref["renorm_mean"], new_mean, rmom)
        ref["renorm_stddev"] = composite.moving_average(ref["renorm_stddev"], stddev, rmom)
        ref["moving_stddev"] = composite.moving_average(ref["moving_stddev"], stddev, mom)
        ref["moving_variance"] = torch.relu(ref["moving_stddev"] ** 2 - eps)
    else:
        r_ref, d_ref = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        ref["moving_variance"] = composite.moving_average(ref["moving_variance"], new_var, mom)
    ref["moving_mean"] = composite.moving_average(ref["moving_mean"], new_mean, mom)
    t = {n: v.to(device) for n, v in bufs.items()}
    args = (mean.to(device), var.to(device), count.to(device), t["moving_mean"], t["moving_variance"],
            t["moving_stddev"] if renorm else None, t["renorm_mean"] if renorm else None,
            t["renorm_stddev"] if renorm else None, ghosts, mom, rmom, eps, clip["rmin"], clip["rmax"], clip["dmax"],
            False)
    r, d = staged.keras_finalize(*args)
    torch.testing.assert_close(r.cpu(), r_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.cpu(), d_ref, rtol=1e-12, atol=1e-12)
    for n in ("moving_mean", "moving_variance") + (("moving_stddev", "renorm_mean", "renorm_stddev") if renorm else ()):
        torch.testing.assert_close(t[n].cpu(), ref[n], rtol=1e-12, atol=1e-12, msg=n)
    fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.bn_cuda.keras_finalize.default, tuple(fresh))


def test_keras_finalize_keeps_empty_features():
    c = 3
    z = torch.zeros(c)
    mm, mv = torch.randn(c), torch.rand(c)
    mm0, mv0 = mm.clone(), mv.clone()
    staged.keras_finalize(z, z, z, mm, mv, None, None, None, 1, 0.9, 0.9, 1e-3)
    assert torch.equal(mm, mm0) and torch.equal(mv, mv0)
    staged.keras_finalize(z, z, z, mm, mv, None, None, None, 1, 0.9, 0.9, 1e-3, always_update=True)
    torch.testing.assert_close(mm, mm0 * 0.9)
    with pytest.raises(ValueError, match="moving_stddev, renorm_mean and renorm_stddev go together"):
        staged.keras_finalize(z, z, z, mm, mv, torch.ones(c), None, None, 1, 0.9, 0.9, 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ghosts", [1, 3])
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("factors", ["gamma,beta", "adj,gamma,beta", "adj", "adj,beta", "gamma", "beta", ""])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_keras_coeffs_is_keras_finalize_plus_composition(device, ghosts, renorm, factors, dtype):
    """keras_coeffs from batch_stats' Welford states = keras_finalize on the biased variances (same
    moving variables, r, d) plus the per-(ghost, feature) invstd and tf_keras's composition of the
    adjustment, gamma / beta and r / d, computed here independently in float64."""
    g = torch.Generator().manual_seed(11)
    c = 17
    x = (torch.randn(6 * ghosts, c, generator=g, dtype=torch.float64) * (torch.rand(c, generator=g) + 0.5)
         + torch.randn(c, generator=g) * 3).to(device, dtype)
    mean, m2, count = staged.batch_stats(x, [1], None, ghosts)
    f = factors.split(",")
    vec = {n: (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device) for n in ("gamma", "adj_s")}
    vec.update({n: (torch.rand(c, generator=g, dtype=torch.float64) - 0.5).to(device) for n in ("beta", "adj_b")})
    gamma = vec["gamma"].float() if "gamma" in f else None  # float32 weights, as the layer's
    beta = vec["beta"].float() if "beta" in f else None
    adj_s, adj_b = (vec["adj_s"].to(dtype), vec["adj_b"].to(dtype)) if "adj" in f else (None, None)
    bufs = {n: (torch.rand(c, generator=g) + 0.5).to(device)
            for n in ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")}
    ref_bufs = {n: t.clone() for n, t in bufs.items()}
    clip = (0.8, 1.1, 0.2)
    rn = ("moving_stddev", "renorm_mean", "renorm_stddev")
    tail = (ghosts, 0.9, 0.7, 1e-3, *clip, False)

    invstd, weight, bias, r, d = staged.keras_coeffs(
        mean, m2, count, gamma, beta, adj_s, adj_b, bufs["moving_mean"], bufs["moving_variance"],
        *((bufs[n] for n in rn) if renorm else (None, None, None)), *tail)
    r_ref, d_ref = staged.keras_finalize(
        mean, m2 / count, count, ref_bufs["moving_mean"], ref_bufs["moving_variance"],
        *((ref_bufs[n] for n in rn) if renorm else (None, None, None)), *tail)
    assert torch.equal(r, r_ref) and torch.equal(d, d_ref)
    for n in bufs:
        assert torch.equal(bufs[n], ref_bufs[n]), n
    assert torch.equal(invstd, torch.rsqrt(m2 / count + 1e-3)) or \
        torch.allclose(invstd, 1 / torch.sqrt(m2 / count + 1e-3), rtol=1e-6 if dtype == torch.float32 else 1e-14)

    # tf_keras's _compose_transforms chain in float64: (adj), then (gamma, beta), then (r, d)
    s, o = None, None
    if adj_s is not None:
        s, o = adj_s.double(), adj_b.double()
    if gamma is not None:
        s = gamma.double() if s is None else s * gamma.double()
        o = None if o is None else o * gamma.double()
    if beta is not None:
        o = beta.double() if o is None else o + beta.double()
    if renorm:  # scale = r * S1, shift = d * S1 + O1
        s, o = (r.double() if s is None else r.double() * s,
                (d.double() if s is None else d.double() * s) + (0 if o is None else o))
    s = torch.ones(c, dtype=torch.float64, device=device) if s is None else s
    o = torch.zeros(c, dtype=torch.float64, device=device) if o is None else o
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(weight.double(), s.repeat(ghosts), **tol)
    torch.testing.assert_close(bias.double(), o.repeat(ghosts), **tol)
    assert weight.shape == bias.shape == invstd.shape == (ghosts * c,)

    fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in (
        mean, m2, count, gamma, beta, adj_s, adj_b, bufs["moving_mean"], bufs["moving_variance"],
        *((bufs[n] for n in rn) if renorm else (None, None, None)), *tail)]
    torch.library.opcheck(torch.ops.bn_cuda.keras_coeffs.default, tuple(fresh))


def test_keras_coeffs_errors_name_arguments():
    c = 4
    mean, m2, count = torch.zeros(c), torch.ones(c), torch.full((c,), 2.0)
    mm, mv = torch.zeros(c), torch.ones(c)
    with pytest.raises((ValueError, RuntimeError), match="gamma"):
        staged.keras_coeffs(mean, m2, count, torch.ones(c + 1), None, None, None, mm, mv, None, None, None,
                            1, 0.9, 0.9, 1e-3)
    with pytest.raises(ValueError, match="keras_coeffs: eps must be finite and > 0, got -1"):
        staged.keras_coeffs(mean, m2, count, None, None, None, None, mm, mv, None, None, None, 1, 0.9, 0.9, -1.0)
    with pytest.raises(ValueError, match="keras_coeffs: ghosts must be >= 1, got 0"):
        staged.keras_coeffs(mean, m2, count, None, None, None, None, mm, mv, None, None, None, 0, 0.9, 0.9, 1e-3)
    assert torch.equal(mm, torch.zeros(c)) and torch.equal(mv, torch.ones(c))  # a failed call changes nothing


def _staged_calls(x, device):
    """Every staged op, called on ``x`` (a (6, 3, 5) input, maybe requiring grad), in data order."""
    c = 3
    w = torch.randn(c, device=device)
    mean, m2, cnt = staged.batch_stats(x, [1])
    gm, ginv, gc = staged.gather_stats(mean, m2, cnt, None, None, 0.1, 1e-5)
    y = staged.normalize(x, gm, ginv, w, None, [1])
    gy = torch.randn_like(x)
    sdy, sdyx = staged.grad_sums(gy, x, gm, ginv, [1])
    gi = staged.grad_input(gy, x, gm, ginv, w, sdy, sdyx, gc, [1])
    var = m2 / cnt
    mm, mv = torch.zeros(c, device=device), torch.ones(c, device=device)
    r, d = staged.keras_finalize(mean, var, cnt, mm, mv, None, None, None, 1, 0.9, 0.9, 1e-3)
    coeffs = staged.keras_coeffs(mean, m2, cnt, w, None, None, None, mm.clone(), mv.clone(), None, None, None,
                                 1, 0.9, 0.9, 1e-3)
    return {"batch_stats": mean, "gather_stats": ginv, "normalize": y, "grad_sums": sdyx, "grad_input": gi,
            "keras_finalize": r, "keras_coeffs": coeffs[0]}


@pytest.mark.parametrize("device", DEVICES)
def test_staged_ops_have_no_derivative(device):
    """The staged ops are building blocks that the layers and SyncNormalize differentiate as a whole:
    by themselves a backward through them raises, naming the op (torch's default autograd fallback
    only warned and left the input's gradient None). Without a gradient to track they run as before."""
    x = _data((6, 3, 5), torch.float32, device).requires_grad_(True)
    outs = _staged_calls(x, device)
    for op in ("batch_stats", "gather_stats", "normalize", "grad_sums", "grad_input"):
        assert outs[op].requires_grad, op
        with pytest.raises(RuntimeError, match=f"derivative for .*bn_cuda::{op}.* is not implemented"):
            torch.autograd.grad(outs[op].sum(), x, allow_unused=True)
    for op in ("keras_finalize", "keras_coeffs"):
        assert outs[op].requires_grad
        with pytest.raises(RuntimeError, match=f"bn_cuda::{op}"):
            torch.autograd.grad(outs[op].sum(), x, allow_unused=True)
    with torch.no_grad():
        plain = _staged_calls(x.detach(), device)
    assert not any(t.requires_grad for t in plain.values())


@pytest.mark.parametrize("device", DEVICES)
def test_staged_ops_refuse_meta_tensors_mixed_with_real_ones(device):
    """A meta tensor among real ones selects the fake kernels; they refuse it as the real kernels do,
    naming it, instead of returning uninitialized memory and skipping the running-statistics update."""
    x = _data((4, 3, 5), torch.float32, device)
    mean, m2, cnt = staged.batch_stats(x, [1])
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    cases = [
        ("mean", lambda: staged.normalize(x, mean.to("meta"), torch.ones(3, device=device), None, None, [1])),
        ("mask", lambda: staged.batch_stats(x, [1], torch.ones(4, 1, 5, dtype=torch.bool, device="meta"))),
        ("running_var", lambda: staged.gather_stats(mean[None], m2[None], cnt[None], rm, rv.to("meta"), 0.1, 1e-5)),
        ("input", lambda: staged.grad_sums(x, x.to("meta"), mean, mean, [1])),
        ("count", lambda: staged.grad_input(x, x, mean, mean, None, mean, mean, cnt.to("meta"), [1])),
        ("moving_variance", lambda: staged.keras_finalize(mean, m2, cnt, rm, rv.to("meta"), None, None, None,
                                                          1, 0.9, 0.9, 1e-3)),
        ("gamma", lambda: staged.keras_coeffs(mean, m2, cnt, torch.ones(3, device="meta"), None, None, None, rm,
                                              rv, None, None, None, 1, 0.9, 0.9, 1e-3)),
    ]
    for name, call in cases:
        with pytest.raises(RuntimeError, match=f"{name} is on (meta|{device})"):
            call()
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_staged_fake_kernels_match_real_dtypes(dtype, device):
    """Per-feature outputs come in the accumulation dtype (fp32; fp64 for fp64) whatever the dtype of
    the states passed in: the fake kernels say the same (opcheck's fake-tensor test), else a compiled
    graph fails at run time on the dtype."""
    x = _data((6, 3, 5), torch.float32, device)
    mean, m2, cnt = (t.to(dtype) for t in staged.batch_stats(x, [1]))
    var = m2 / cnt
    c = 3
    torch.library.opcheck(torch.ops.bn_cuda.gather_stats.default,
                          (mean[None], m2[None], cnt[None], None, None, 0.1, 1e-5, True))
    torch.library.opcheck(torch.ops.bn_cuda.keras_finalize.default,
                          (mean, var, cnt, torch.zeros(c, device=device), torch.ones(c, device=device), None, None,
                           None, 1, 0.9, 0.9, 1e-3, None, None, None, False))
    torch.library.opcheck(torch.ops.bn_cuda.keras_coeffs.default,
                          (mean, m2, cnt, None, None, None, None, torch.zeros(c, device=device),
                           torch.ones(c, device=device), None, None, None, 1, 0.9, 0.9, 1e-3, None, None, None,
                           False))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fn = torch.compile(lambda a, b, n: staged.gather_stats(a, b, n, None, None, 0.1, 1e-5)[1] * 2,
                       backend="inductor", fullgraph=True)
    got = fn(mean[None], m2[None], cnt[None])
    assert got.dtype == acc
    torch.testing.assert_close(got, staged.gather_stats(mean[None], m2[None], cnt[None], None, None, 0.1, 1e-5)[1] * 2)


def test_staged_fake_kernels_check_ghosts():
    """Under fake tensors the ghost count is checked as by the real kernels (no ZeroDivisionError, no
    shape the real kernel would refuse)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        mean = torch.zeros(3)
        for op in (staged.keras_finalize, staged.keras_coeffs):
            args = [mean, mean, mean] + ([None] * 4 if op is staged.keras_coeffs else []) + [mean, mean, None, None,
                                                                                              None]
            with pytest.raises(ValueError, match="ghosts must be >= 1, got 0"):
                op(*args, 0, 0.9, 0.9, 1e-3)
            with pytest.raises(ValueError, match=r"ghosts \* C entries, got shape \[3\] for ghosts=2"):
                op(*args, 2, 0.9, 0.9, 1e-3)
        with pytest.raises(ValueError, match="ghosts must be >= 1, got 0"):
            staged.batch_stats(torch.zeros(4, 3), [1], None, 0)


def test_staged_helpers_check_argument_types():
    """The Python helpers take an int axis as well as a list, and refuse values that int() / float()
    would have converted (a string, 1.5, 2.7 ghosts) or failed on without naming the argument."""
    x = _data((4, 3, 5), torch.float32, "cpu")
    a = staged.batch_stats(x, 1)
    b = staged.batch_stats(x, [1])
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    for bad in ("1", [1.5], ["1"]):
        with pytest.raises(TypeError, match="bn_cuda.staged.batch_stats: axis must be an int or a sequence of ints"):
            staged.batch_stats(x, bad)
    with pytest.raises(TypeError, match=r"bn_cuda.staged.normalize: ghosts must be an int, got 2.7"):
        staged.normalize(x, a[0], a[1], None, None, [1], 2.7)
    with pytest.raises(TypeError, match=r"bn_cuda.staged.gather_stats: momentum must be a float, got None"):
        staged.gather_stats(*a, None, None, None, 1e-5)
    with pytest.raises(TypeError, match=r"bn_cuda.staged.keras_finalize: rmax must be a float, got 'x'"):
        staged.keras_finalize(a[0], a[1], a[2], torch.zeros(3), torch.ones(3), None, None, None, 1, 0.9, 0.9, 1e-3,
                              rmax="x")


@pytest.mark.parametrize("op", ["keras_finalize", "keras_coeffs"])
def test_keras_epilogue_refuses_bad_values(op):
    """The raw Keras epilogue ops check what the layer's constructor checks (clipping bounds, finite
    momenta) and refuse moving variables that share memory; a refused call changes none of them."""
    c = 4
    mean, m2, count = torch.randn(c), torch.rand(c) + 0.5, torch.full((c,), 3.0)
    mm, mv, ms, rmn, rsd = torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c), torch.ones(c)
    snap = [t.clone() for t in (mm, mv, ms, rmn, rsd)]
    fn = getattr(staged, op)

    def call(moving=(mm, mv, ms, rmn, rsd), momentum=0.9, renorm_momentum=0.9, **clip):
        pre = (mean, m2, count) + ((None,) * 4 if op == "keras_coeffs" else ())
        return fn(*pre, *moving, 1, momentum, renorm_momentum, 1e-3, **clip)

    for clip, match in [({"rmin": 2.0, "rmax": 1.0}, "rmin must be <= rmax, got rmin=2, rmax=1"),
                        ({"dmax": -0.5}, "dmax must be >= 0, got -0.5"),
                        ({"rmax": float("nan")}, "rmax must be a number, got nan")]:
        with pytest.raises(ValueError, match=f"{op}: {match}"):
            call(**clip)
    for kw in ("momentum", "renorm_momentum"):
        with pytest.raises(ValueError, match=f"{op}: {kw} must be finite, got nan"):
            call(**{kw: float("nan")})
    with pytest.raises(ValueError, match=f"{op}: moving_mean and moving_variance are updated in place but share"):
        call(moving=(mm, mm, ms, rmn, rsd))
    with pytest.raises(ValueError, match=f"{op}: moving_stddev and renorm_stddev are updated in place but share"):
        call(moving=(mm, mv, ms, rmn, ms[:]))
    assert all(torch.equal(t, s) for t, s in zip((mm, mv, ms, rmn, rsd), snap))
    call(rmin=0.5, rmax=2.0, dmax=float("inf"))  # (an infinite bound is no bound)
    with pytest.raises(ValueError, match="gather_stats: running_mean and running_var are updated in place but share"):
        staged.gather_stats(mean[None], m2[None], count[None], mm, mm, 0.1, 1e-5)
