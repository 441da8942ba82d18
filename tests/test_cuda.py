"""CUDA-only behaviour: graph capture, streams, bitwise determinism, kernel-variant coverage and
int64 indexing. Run on a CUDA device (benchmarks/device_check.sh); in the emulated build
(scripts/emulate.sh, whose CPU ops are the CUDA kernels under a host emulation) the tests that need
no real device run on CPU tensors; skipped elsewhere."""

import contextlib

import pytest
import torch

import bn_cuda
from bn_cuda.functional import batch_norm

HAS_CUDA = torch.cuda.is_available()
EMULATED = bn_cuda.build_info()["emulated_cuda"]
DEV = "cuda" if HAS_CUDA else "cpu"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (HAS_CUDA or EMULATED), reason="needs a CUDA device (or the emulated build)"),
]
real_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: streams, graphs or GPU memory")


def _data(shape, dtype=torch.float32, seed=0, offset=5.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    bshape = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=g) * (0.5 + torch.rand(c, generator=g)).view(bshape)
    x = x + offset * torch.randn(c, generator=g).view(bshape)
    return x.to(DEV, dtype)


def _ref(x, w, b, eps=1e-5):
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(xd, dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (xd - mean) * torch.rsqrt(var + eps) * w.double().view(shape) + b.double().view(shape)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (64, 8, 64, 64), (256, 2048, 7, 7), (3, 17, 49), (4096, 64), (8, 5)])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_kernel_variants_match_float64(shape, fmt, dtype):
    if fmt == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4-D")
    x = _data(shape, dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif fmt == "misaligned":
        buf = torch.empty(x.numel() + 1, device=DEV, dtype=dtype)
        buf[1:] = x.reshape(-1)
        x = buf[1:].view(shape)
    c = shape[1]
    w = torch.randn(c, device=DEV)
    b = torch.randn(c, device=DEV)
    rm, rv = torch.zeros(c, device=DEV), torch.ones(c, device=DEV)
    y = batch_norm(x, rm, rv, w, b, training=True)
    ref = _ref(x, w, b)
    tol = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol * max(1.0, scale)
    # running stats against torch's own update (float64 reference of the batch stats)
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.double(), dims, unbiased=True)
    torch.testing.assert_close(rm.double(), 0.1 * mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)
    if fmt == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _single_cf(on):
    """The testing hook of the one-launch channels-first training forward and backward (on by default)."""
    prev = bn_cuda._C._set_single_cf(on)
    try:
        yield
    finally:
        bn_cuda._C._set_single_cf(prev)


@pytest.mark.parametrize("shape", [(2, 5, 4, 4, 4), (3, 17, 7, 7), (3, 1, 9), (4, 3, 16), (2, 40, 6, 6),
                                   (1, 3, 1024), (2, 9, 500), (3, 300, 500)])
@pytest.mark.parametrize("fmt", ["contiguous", "misaligned", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_single_launch_channels_first(shape, fmt, dtype):
    """A small channels-first input (a feature's vectors fit one step of a block; or 8 per thread,
    with a block per multiprocessor) takes its training forward and its backward in one launch
    each, forward_single_cf_kernel / backward_single_cf_kernel: a block per feature takes the
    statistics (the gradient sums), finalizes them (saved and running statistics; grad_weight,
    grad_bias) and applies them (grad_input). That is the three-launch path's code in the same
    order, so with the testing hook off (the same plan, three launches) every output must be the
    same bits; both match float64. The emulated build counts the launches: 1 against 3 each (it
    plans for 132 multiprocessors, or BN_CUDA_EMULATE_SMS)."""
    c = shape[1]
    if fmt == "padded":  # (O, C, I) with room between features and samples
        big = _data((shape[0], c + 3) + shape[2:], dtype, seed=12, offset=4.0)
        x = big[:, 1:c + 1]
    else:
        x = _data(shape, dtype, seed=12, offset=4.0)
        if fmt == "misaligned":
            buf = torch.empty(x.numel() + 1, device=DEV, dtype=dtype)
            buf[1:] = x.reshape(-1)
            x = buf[1:].view(shape)
    g = torch.Generator().manual_seed(13)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(c, generator=g) + 0.5).to(DEV, pd)
    b = torch.randn(c, generator=g).to(DEV, pd)
    gy = torch.randn(x.shape, generator=g).to(DEV, dtype)
    launches = getattr(bn_cuda._C, "_emulated_launches", None)
    results, counts = [], []
    for on in (True, False):
        rm = torch.randn(c, generator=torch.Generator().manual_seed(14)).to(DEV, pd)
        rv = (torch.rand(c, generator=torch.Generator().manual_seed(15)) + 0.5).to(DEV, pd)
        with _single_cf(on):
            n0 = launches() if launches else 0
            y, sm, si = torch.ops.bn_cuda.forward_train(x, w, b, rm, rv, 0.1, 1e-5, [1])
            n1 = launches() if launches else 0
            dx, dw, db = torch.ops.bn_cuda.backward(gy, x, w, sm, si, True, [1], [True, True, True])
            counts.append((n1 - n0, launches() - n1) if launches else None)
        results.append((y, sm, si, rm, rv, dx, dw, db))
    names = ["y", "save_mean", "save_invstd", "running_mean", "running_var", "dx", "dweight", "dbias"]
    for name, a, o in zip(names, *results):
        assert torch.equal(a, o), name
    if launches:  # (3, 300, 500) misaligned takes one launch with up to 300 multiprocessors (6 vectors a thread)
        assert counts == [(1, 1), (3, 3)]
    tol = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    y, sm, si, rm, rv, dx, dw, db = results[0]
    ref = _ref(x, w, b)
    assert (y.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.double(), dims, unbiased=False)
    torch.testing.assert_close(sm.double(), mean, rtol=1e-5, atol=1e-5 * max(1.0, mean.abs().max().item()))
    torch.testing.assert_close(si.double(), torch.rsqrt(var + 1e-5), rtol=1e-4, atol=0)
    rm0 = torch.randn(c, generator=torch.Generator().manual_seed(14)).double()
    rv0 = (torch.rand(c, generator=torch.Generator().manual_seed(15)) + 0.5).double()
    n = x.numel() // c
    torch.testing.assert_close(rm.double().cpu(), (0.9 * rm0 + 0.1 * mean.cpu()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.double().cpu(), (0.9 * rv0 + 0.1 * var.cpu() * n / (n - 1)), rtol=1e-4, atol=1e-5)
    # the backward against float64 autograd at the saved statistics' data
    xd = x.double().requires_grad_(True)
    wd = w.double().requires_grad_(True)
    bd = b.double().requires_grad_(True)
    shp = [1, c] + [1] * (x.dim() - 2)
    v64, m64 = torch.var_mean(xd, dims, unbiased=False, keepdim=True)
    ((xd - m64) * torch.rsqrt(v64 + 1e-5) * wd.view(shp) + bd.view(shp)).backward(gy.double())
    for got, want in ((dx, xd.grad), (dw, wd.grad), (db, bd.grad)):
        assert (got.double() - want).abs().max().item() <= 4 * tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (3, 17, 5, 3), (3, 1, 9), (6, 40, 11), (2, 5, 3, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_flat_channels_first_walk(shape, dtype):
    """Channels-first rows that are not whole 16-byte vectors (49, 15, 27, 11, 27 elements; C = 1
    merges (3, 1, 9) into one row) are
    normalized, and their input gradient computed, as one flat run of 16-byte packs, a pack
    spanning two features where a row ends (apply_flat_cf_kernel, grad_input_flat_cf_kernel), the
    last n % W elements one each. Odd rows take one-element statistics either way, so the same
    values at a misaligned address (the row-by-row kernels) must give the same bits; and both
    match float64."""
    x = _data(shape, dtype, seed=7, offset=3.0)
    buf = torch.empty(x.numel() + 1, device=DEV, dtype=dtype)
    buf[1:] = x.reshape(-1)
    x_odd = buf[1:].view(shape)  # misaligned: the row walk
    c = shape[1]
    g = torch.Generator().manual_seed(8)
    w = (torch.rand(c, generator=g) + 0.5).to(DEV).requires_grad_(True)
    b = torch.randn(c, generator=g).to(DEV).requires_grad_(True)
    gy = torch.randn(shape, generator=g).to(DEV, dtype)
    results = []
    for inp in (x, x_odd):
        xi = inp.detach().requires_grad_(True)
        w.grad = b.grad = None
        rm, rv = torch.zeros(c, device=DEV), torch.ones(c, device=DEV)
        with _single_cf(False):  # (these small inputs would take the one-launch forward and backward)
            y = batch_norm(xi, rm, rv, w, b, training=True)
            y.backward(gy)
        yi = batch_norm(xi.detach(), rm, rv, w.detach(), b.detach(), training=False)
        results.append((y.detach(), xi.grad, w.grad.clone(), b.grad.clone(), rm, rv, yi))
    for name, a, o in zip(["y", "dx", "dw", "db", "running_mean", "running_var", "y_eval"], *results):
        assert torch.equal(a, o), name
    tol = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    y, dx, _, _, rm, rv, yi = results[0]
    ref = _ref(x, w.detach(), b.detach())
    assert (y.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    dims = [0] + list(range(2, x.dim()))
    shp = [1, c] + [1] * (x.dim() - 2)
    yi_ref = ((x.double() - rm.double().view(shp)) * torch.rsqrt(rv.double().view(shp) + 1e-5)
              * w.detach().double().view(shp) + b.detach().double().view(shp))
    assert (yi.double() - yi_ref).abs().max().item() <= tol * max(1.0, yi_ref.abs().max().item())
    xd = x.double().requires_grad_(True)
    var, mean = torch.var_mean(xd, dims, unbiased=False, keepdim=True)
    ((xd - mean) * torch.rsqrt(var + 1e-5) * w.detach().double().view(shp)).backward(gy.double())
    assert (dx.double() - xd.grad).abs().max().item() <= 4 * tol * max(1.0, xd.grad.abs().max().item())


def test_bitwise_deterministic():
    x = _data((64, 96, 28, 28)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(96, device=DEV, requires_grad=True)
    b = torch.randn(96, device=DEV, requires_grad=True)
    gy = torch.randn_like(x)
    outs = []
    for _ in range(3):
        x.grad = w.grad = b.grad = None
        y = batch_norm(x, None, None, w, b, training=True)
        y.backward(gy)
        outs.append((y.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()))
    for other in outs[1:]:
        for a, o in zip(outs[0], other):
            assert torch.equal(a, o)


@real_gpu
def test_side_stream_and_graph_capture():
    x = _data((16, 32, 14, 14))
    w = torch.randn(32, device="cuda", requires_grad=True)
    b = torch.randn(32, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    static_x = x.clone().requires_grad_(True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream (also checks current-stream use)
        for _ in range(2):
            y = batch_norm(static_x, rm, rv, w, b, training=True)
            y.sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = w.grad = b.grad = None
    rm.zero_(), rv.fill_(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = batch_norm(static_x, rm, rv, w, b, training=True)
        (y * y).sum().backward()
    new = _data((16, 32, 14, 14), seed=3)
    rm.zero_(), rv.fill_(1)
    with torch.no_grad():
        static_x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    ref_x = new.clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    rrm, rrv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    ref_y = torch.nn.functional.batch_norm(ref_x, rrm, rrv, ref_w, b.detach(), training=True)
    (ref_y * ref_y).sum().backward()
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(static_x.grad, ref_x.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(rm, rrm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rrv, rtol=1e-5, atol=1e-6)


def test_opcheck_cuda():
    x = _data((4, 6, 5, 3))
    w = torch.randn(6, device=DEV)
    b = torch.randn(6, device=DEV)
    rm, rv = torch.zeros(6, device=DEV), torch.ones(6, device=DEV)
    torch.library.opcheck(torch.ops.bn_cuda.forward_train.default, (x, w, b, rm, rv, 0.1, 1e-5, [1], True))
    torch.library.opcheck(torch.ops.bn_cuda.forward_infer.default, (x, w, b, rm, rv, 1e-5, [1]))
    mean, invstd = torch.zeros(6, device=DEV), torch.ones(6, device=DEV)
    torch.library.opcheck(torch.ops.bn_cuda.backward.default,
                          (torch.randn_like(x), x, w, mean, invstd, True, [1], [True, True, True]))


@pytest.mark.slow
@real_gpu
def test_int64_indexing_beyond_2_pow_31():
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    n = 2**30 + 40  # 2 features x n > 2^31 elements; fp16 keeps it at ~4.3 GB per tensor
    x = torch.empty((1, 2, n), device="cuda", dtype=torch.float16)
    x[:, 0].normal_(3.0, 2.0)
    x[:, 1].normal_(-1.0, 0.5)
    y = batch_norm(x, None, None, training=True)
    for c in range(2):
        var, mean = torch.var_mean(x[0, c].float(), unbiased=False)
        tail = slice(n - 1000, n)  # past element 2^31 of the flat tensor for c = 1
        expect = (x[0, c, tail].float() - mean) * torch.rsqrt(var + 1e-5)
        torch.testing.assert_close(y[0, c, tail].float(), expect, rtol=2e-3, atol=2e-3)
    del y
    x = x.view(n, 2)  # channels-last view: rows past 2^30
    y = batch_norm(x, None, None, training=True, axis=1)
    var, mean = torch.var_mean(x.float(), 0, unbiased=False)
    expect = (x[-1000:].float() - mean) * torch.rsqrt(var + 1e-5)
    torch.testing.assert_close(y[-1000:].float(), expect, rtol=2e-3, atol=2e-3)


def test_more_ghosts_than_grid_y():
    """Channels-last ghost rows need a partition per ghost: more than 65535 ghosts run along
    gridDim.z too. Against float64 statistics and the composite (plain torch ops) Keras layer."""
    from bn_cuda import staged

    g = torch.Generator().manual_seed(11)
    x = torch.randn(70000, 8, generator=g) * 2 + torch.arange(8.0)
    mask = torch.rand(70000, 1, generator=g) > 0.3
    # one ghost per row: each row is its own statistics
    mean, m2, count = staged.batch_stats(x.to(DEV), [1], None, ghosts=70000)
    torch.testing.assert_close(mean.cpu(), x.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(m2.cpu(), torch.zeros(70000 * 8), rtol=0, atol=0)
    torch.testing.assert_close(count.cpu(), torch.ones(70000 * 8), rtol=0, atol=0)
    # masked, one ghost
    sel = x.double()[mask[:, 0]]
    mean, m2, count = staged.batch_stats(x.to(DEV), [1], mask.to(DEV), ghosts=1)
    torch.testing.assert_close(mean.cpu().double(), sel.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2.cpu().double(), ((sel - sel.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(count.cpu().double(), torch.full((8,), float(sel.shape[0]), dtype=torch.float64))
    # with ghosts: the whole batch in ghost rows, forward through the Keras layer
    layer = bn_cuda.BatchNormalization(virtual_batch_size=1)
    reference = bn_cuda.BatchNormalization(virtual_batch_size=1, fused=False)
    xs = x[:66000, :].reshape(66000, 1, 8)
    y = layer.to(DEV)(xs.to(DEV), training=True)
    torch.testing.assert_close(y.cpu(), reference(xs, training=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.moving_mean.cpu(), reference.moving_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance.cpu(), reference.moving_variance, rtol=1e-6, atol=1e-6)


_KERAS_CONFIGS = {
    "ghost": dict(virtual_batch_size=4),
    "renorm": dict(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}, renorm_momentum=0.5),
    "ghost+renorm": dict(virtual_batch_size=4, renorm=True, renorm_clipping={"rmax": 1.2}),
    "adjustment": "adjustment",
    "mask": dict(),
}


def _keras_layer(name, shape, fused=None):
    import bn_cuda

    cfg = _KERAS_CONFIGS[name]
    if cfg == "adjustment":
        g = torch.Generator().manual_seed(5)
        scale = (torch.rand(shape[-1], generator=g) + 0.5).cuda()
        bias = (torch.rand(shape[-1], generator=g) - 0.5).cuda()
        cfg = dict(adjustment=lambda s: (scale, bias))
    layer = bn_cuda.BatchNormalization(momentum=0.8, fused=fused, **cfg)
    layer.build(shape, device=torch.device("cuda"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.gamma.copy_(torch.randn(layer.gamma.shape, generator=g) * 0.5 + 1)
        layer.beta.copy_(torch.randn(layer.beta.shape, generator=g) * 0.5)
    return layer


def _keras_step(layer, x, gy, mask):
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    y = layer(x, training=True, mask=mask)
    y.backward(gy)
    return y


@real_gpu
@pytest.mark.parametrize("fused", [None, False], ids=["fused", "composite"])
@pytest.mark.parametrize("name", list(_KERAS_CONFIGS))
def test_keras_step_no_sync_and_graph_capture(name, fused):
    """The Keras training step (ghost batches, renorm's r and d, adjustment, masks) reads nothing
    back to the host and replays from a CUDA graph with the eager step's results, moving variables
    included, step after step: the fused kernels' step and the composite (fused=False) one, which
    once built renorm's sqrt(epsilon) floor with torch.tensor() (a host-to-device copy)."""
    shape = (16, 35, 24)  # rank 3: tf_keras's own fused path (which ignores masks) never applies
    mask = None
    if name == "mask":
        mask = (torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2)) > 0.3).cuda()
    datas = [(_data(shape, seed=s).requires_grad_(True), _data(shape, seed=50 + s, offset=0.0)) for s in range(4)]

    eager = _keras_layer(name, shape, fused)
    _keras_step(eager, *datas[0], mask)  # first call: anything lazy happens here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _keras_step(eager, *datas[1], mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graphed = _keras_layer(name, shape, fused)
    static_x = datas[0][0].detach().clone().requires_grad_(True)
    static_gy = datas[0][1].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _keras_step(graphed, static_x, static_gy, mask)
    torch.cuda.current_stream().wait_stream(s)
    start = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in graphed.state_dict().items()}
    for p in graphed.parameters():
        p.grad = None
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = graphed(static_x, training=True, mask=mask)
        y.backward(static_gy)

    reference = _keras_layer(name, shape, fused)
    reference.load_state_dict(start)
    graphed.load_state_dict(start)  # capture ran nothing; make sure of the starting point anyway
    for x, gy in datas[2:]:
        with torch.no_grad():
            static_x.copy_(x)
            static_gy.copy_(gy)
        graph.replay()
        torch.cuda.synchronize()
        want = _keras_step(reference, x, gy, mask)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(static_x.grad, x.grad, rtol=1e-6, atol=1e-6)
        for (pn, p), q in zip(graphed.named_parameters(), reference.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6, msg=pn)
        for (bn, b), c in zip(graphed.named_buffers(), reference.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6, msg=bn)
