"""Edge cases: empty batches, single features and spatial sizes of 1, odd sizes that hit every
vector tail, partial gradient requests, expanded inputs, and the agreement of the AVX-512, AVX2
and portable ("default") copies of the CPU kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import bn_cuda
from bn_cuda.functional import batch_norm
from conftest import apply_layout, assert_close_ref, make_features, make_input, reference_batch_norm

ops = torch.ops.bn_cuda


# ---------------------------------------------------------------------------------------------
# Empty inputs


EMPTY_CASES = [
    ((0, 3, 4), 1, "contiguous"),
    ((0, 3, 4, 5), 1, "channels_last"),
    ((0, 3), 1, "contiguous"),
    ((0, 3, 4, 5), (1, 3), "contiguous"),
    ((4, 3, 0), 1, "contiguous"),        # empty spatial dim: no value per feature either
    ((2, 3, 0, 5), -1, "contiguous"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis,layout", EMPTY_CASES, ids=[f"{s}-{a}-{l}".replace(" ", "") for s, a, l in EMPTY_CASES])
def test_empty_batch(shape, axis, layout, training, dtype, device):
    x = apply_layout(torch.empty(shape, dtype=dtype, device=device), layout).requires_grad_()
    axes = [axis] if isinstance(axis, int) else list(axis)
    fs = [shape[a] for a in axes]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = make_features(fs, sdt, device, "weight").requires_grad_()
    b = make_features(fs, sdt, device, "bias").requires_grad_()
    rm = make_features(fs, sdt, device, "mean")
    rv = make_features(fs, sdt, device, "var")
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, training, axis=axis)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "an empty batch changed the running statistics"
    y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape
    assert w.grad.shape == w.shape and b.grad.shape == b.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_empty_batch_ops(device):
    x = torch.empty(0, 5, 3, device=device)
    out, mean, invstd = ops.forward_train(x, None, None, None, None, 0.1, 1e-5, [1])
    assert out.shape == x.shape and mean.shape == (5,) and invstd.shape == (5,)
    assert torch.isfinite(mean).all() and torch.isfinite(invstd).all()
    gi, gw, gb = ops.backward(x, x, torch.ones(5, device=device), mean, invstd, True, [1], [True, True, True])
    assert gi.shape == x.shape
    assert torch.equal(gw, torch.zeros(5, device=device)) and torch.equal(gb, torch.zeros(5, device=device))


def test_zero_features(device):
    x = torch.randn(4, 0, 3, device=device)
    rm, rv = torch.zeros(0, device=device), torch.ones(0, device=device)
    for training in (True, False):
        y = batch_norm(x, rm, rv, torch.ones(0, device=device), torch.zeros(0, device=device), training)
        assert y.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Odd sizes


ODD = [(n, c, s, layout) for n in (2, 3) for c in (1, 3, 17, 1000) for s in (1, 7, 49)
       for layout in ("contiguous", "channels_last")]


@pytest.mark.parametrize("n,c,s,layout", ODD, ids=[f"N{n}-C{c}-S{s}-{l}" for n, c, s, l in ODD])
def test_odd_sizes(n, c, s, layout, device):
    # spatial s as (s, 1) for 4-D layouts, so channels_last applies; 49 also as 7 x 7.
    hw = (7, 7) if s == 49 else (s, 1)
    x = apply_layout(make_input((n, c) + hw, 1, torch.float32, device), layout)
    w = make_features([c], torch.float32, device, "weight").requires_grad_()
    b = make_features([c], torch.float32, device, "bias").requires_grad_()
    for training in (True, False):
        rm = make_features([c], torch.float32, device, "mean")
        rv = make_features([c], torch.float32, device, "var")
        rm0, rv0 = rm.clone(), rv.clone()
        xr = x.detach().requires_grad_()
        w.grad = b.grad = None
        y = batch_norm(xr, rm, rv, w, b, training)
        g = torch.randn(x.shape, device=device)
        y.backward(g)
        ref = reference_batch_norm(x, rm0, rv0, w, b, training, grad_out=g)
        assert_close_ref(y, ref["out"], torch.float32, "output")
        assert_close_ref(rm, ref["running_mean"], torch.float32, "running_mean")
        assert_close_ref(rv, ref["running_var"], torch.float32, "running_var")
        assert_close_ref(xr.grad, ref["grad_input"], torch.float32, "grad_input", scale=ref["grad_input_scale"])
        assert_close_ref(w.grad, ref["grad_weight"], torch.float32, "grad_weight")
        assert_close_ref(b.grad, ref["grad_bias"], torch.float32, "grad_bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("c", [1, 17])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_odd_sizes_other_dtypes(c, layout, dtype, device):
    x = apply_layout(make_input((3, c, 7, 1), 1, dtype, device), layout)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = make_features([c], sdt, device, "weight")
    rm = make_features([c], sdt, device, "mean")
    rv = make_features([c], sdt, device, "var")
    ref = reference_batch_norm(x, rm, rv, w, None, True)
    y = batch_norm(x, rm, rv, w, None, True)
    assert_close_ref(y, ref["out"], dtype, "output")
    assert_close_ref(rv, ref["running_var"], dtype if dtype == torch.float64 else torch.float32, "running_var")


@pytest.mark.parametrize("shape", [(2, 1), (3, 1, 1, 1), (2, 5, 1), (2, 1, 1, 9)])
def test_single_feature_or_spatial(shape, device):
    x = make_input(shape, 1, torch.float64, device).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64, device=device)
    ref = reference_batch_norm(x, None, None, None, None, True, grad_out=g)
    y = batch_norm(x, None, None, training=True)
    y.backward(g)
    assert_close_ref(y, ref["out"], torch.float64, "output")
    assert_close_ref(x.grad, ref["grad_input"], torch.float64, "grad_input", scale=ref["grad_input_scale"])


# ---------------------------------------------------------------------------------------------
# Partial gradients, unusual inputs


@pytest.mark.parametrize("want", ["input", "weight", "bias", "weight+bias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_partial_gradient_requests(want, training, device):
    x = make_input((4, 3, 5), 1, torch.float64, device)
    w = make_features([3], torch.float64, device, "weight")
    b = make_features([3], torch.float64, device, "bias")
    rm = make_features([3], torch.float64, device, "mean")
    rv = make_features([3], torch.float64, device, "var")
    g = torch.randn(x.shape, dtype=torch.float64, device=device)
    ref = reference_batch_norm(x, rm, rv, w, b, training, grad_out=g)
    x.requires_grad_("input" in want)
    w.requires_grad_("weight" in want)
    b.requires_grad_("bias" in want)
    batch_norm(x, rm, rv, w, b, training).backward(g)
    for t, key, name in ((x, "grad_input", "input"), (w, "grad_weight", "weight"), (b, "grad_bias", "bias")):
        if name in want:
            assert_close_ref(t.grad, ref[key], torch.float64, key)
        else:
            assert t.grad is None


def test_expanded_input(device):
    """An input with a stride-0 (expanded) batch dim."""
    base = make_input((1, 4, 6), 1, torch.float64, device)
    x = base.expand(5, 4, 6)
    ref = reference_batch_norm(x, None, None, None, None, True)
    assert_close_ref(batch_norm(x, None, None, training=True), ref["out"], torch.float64, "output")


def test_expanded_input_eval(device):
    x = make_input((1, 4), 1, torch.float64, device).expand(3, 4)
    rm = make_features([4], torch.float64, device, "mean")
    rv = make_features([4], torch.float64, device, "var")
    ref = reference_batch_norm(x, rm, rv, None, None, False)
    assert_close_ref(batch_norm(x, rm, rv, training=False), ref["out"], torch.float64, "output")


def test_running_stats_in_input_dtype_and_keras_shape(device):
    """fp16 running stats in the rank-preserving Keras shape are updated in place, in fp16."""
    x = make_input((6, 3, 4, 4), 1, torch.float16, device)
    rm = make_features([1, 3, 1, 1], torch.float16, device, "mean")
    rv = make_features([1, 3, 1, 1], torch.float16, device, "var")
    ref = reference_batch_norm(x, rm, rv, None, None, True)
    ptr_m, ptr_v = rm.data_ptr(), rv.data_ptr()
    batch_norm(x, rm, rv, training=True)
    assert rm.data_ptr() == ptr_m and rv.data_ptr() == ptr_v and rm.dtype == torch.float16
    assert_close_ref(rm, ref["running_mean"], torch.float16, "running_mean")
    assert_close_ref(rv, ref["running_var"], torch.float16, "running_var")


def test_unbiased_running_var_flag(device):
    x = make_input((5, 3, 4), 1, torch.float64, device)
    rv_u = torch.zeros(3, dtype=torch.float64, device=device)
    rv_b = torch.zeros(3, dtype=torch.float64, device=device)
    ops.forward_train(x, None, None, None, rv_u, 1.0, 1e-5, [1], True)
    ops.forward_train(x, None, None, None, rv_b, 1.0, 1e-5, [1], False)
    x64 = x.cpu()
    assert_close_ref(rv_u, x64.var((0, 2), unbiased=True), torch.float64, "unbiased")
    assert_close_ref(rv_b, x64.var((0, 2), unbiased=False), torch.float64, "biased")


# ---------------------------------------------------------------------------------------------
# AVX-512 and AVX2 vs portable CPU kernels


_SUBPROCESS = textwrap.dedent("""
    import sys, torch, bn_cuda
    from bn_cuda.functional import batch_norm
    cases = torch.load(sys.argv[1])
    out = {"capability": bn_cuda.build_info()["cpu_capability"], "results": []}
    for c in cases:
        x = c["x"].detach().requires_grad_()
        w = c["w"].detach().requires_grad_()
        b = c["b"].detach().requires_grad_()
        rm, rv = c["rm"].clone(), c["rv"].clone()
        y = batch_norm(x, rm, rv, w, b, c["training"], axis=c["axis"])
        y.backward(c["g"])
        out["results"].append([y, rm, rv, x.grad, w.grad, b.grad])
    torch.save(out, sys.argv[2])
""")


def _capability_cases():
    torch.manual_seed(0)
    cases = []
    all_dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for shape, axis, layout, dtypes in [((4, 19, 7, 5), 1, "contiguous", all_dtypes),
                                        ((4, 19, 7, 5), 1, "channels_last", all_dtypes),
                                        ((300, 37), 1, "contiguous", all_dtypes),
                                        ((3, 5, 4, 6), (1, 3), "contiguous", all_dtypes),
                                        ((2, 3, 190, 190), 1, "contiguous", (torch.float32,)),
                                        # rows of 49, 48 and 17 elements: AVX-512's half steps
                                        # (32 + 16 + 1, 32 + 16, 16 + 1), AVX2's 3 x 16 + 1 ...
                                        ((5, 19, 7, 7), 1, "contiguous", all_dtypes),
                                        ((3, 5, 6, 8), 1, "contiguous", all_dtypes),
                                        ((6, 4, 17), 1, "contiguous", all_dtypes)]:
        for dtype in dtypes:
            for training in (True, False):
                x = apply_layout(make_input(shape, axis, dtype, offset=2.0), layout)
                axes = [axis] if isinstance(axis, int) else list(axis)
                fs = [shape[a] for a in axes]
                sdt = torch.float64 if dtype == torch.float64 else torch.float32
                cases.append(dict(x=x, w=make_features(fs, sdt, kind="weight"), b=make_features(fs, sdt, kind="bias"),
                                  rm=make_features(fs, sdt, kind="mean"), rv=make_features(fs, sdt, kind="var"),
                                  g=apply_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout),
                                  training=training, axis=axis))
    return cases


def _run_capability(cases_path, out_path, capability, script=_SUBPROCESS):
    env = dict(os.environ)
    env.pop("BN_CUDA_CPU_CAPABILITY", None)
    if capability is None:
        env.pop("ATEN_CPU_CAPABILITY", None)
    elif capability in ("avx512_bf16", "avx512"):
        # (PyTorch has no avx512_bf16 level: ours alone tells the two AVX-512 copies apart)
        env["ATEN_CPU_CAPABILITY"] = "avx512"
        env["BN_CUDA_CPU_CAPABILITY"] = capability
    else:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-c", script, str(cases_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_path)


def _pinned_capability():
    """Whether the environment pins which copy runs here (then build_info's is not the CPU's best)."""
    return any(os.environ.get(k, "") for k in ("ATEN_CPU_CAPABILITY", "BN_CUDA_CPU_CAPABILITY"))


def _capabilities_to_compare():
    """The vectorized copies this CPU runs (by PyTorch's choice, which ours follows), each to be
    compared with the portable one: AVX2 on an AVX2 CPU; AVX-512 and AVX2 on an AVX-512 CPU, and
    AVX512_BF16 too where it has that."""
    if _pinned_capability():
        return []
    best = bn_cuda.build_info()["cpu_capability"]
    return {"avx512_bf16": ["avx512_bf16", "avx512", "avx2"], "avx512": ["avx512", "avx2"],
            "avx2": ["avx2"]}.get(best, [])


def test_vectorized_and_default_kernels_agree(tmp_path):
    caps = _capabilities_to_compare()
    if not caps:
        pytest.skip("this CPU (or the environment) runs only the portable kernels")
    cases = _capability_cases()
    torch.save(cases, tmp_path / "cases.pt")
    default = _run_capability(tmp_path / "cases.pt", tmp_path / "default.pt", "default")
    assert default["capability"] == "default"
    names = ["output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias"]
    for cap in caps:
        got = _run_capability(tmp_path / "cases.pt", tmp_path / f"{cap}.pt", cap)
        assert got["capability"] == cap
        for case, ra, rd in zip(cases, got["results"], default["results"]):
            dtype = case["x"].dtype
            for name, a, d in zip(names, ra, rd):
                assert a.dtype == d.dtype and a.stride() == d.stride(), name
                # The copies differ only by rounding (FMA contraction, vector width).
                tol_dtype = a.dtype if a.dtype in (torch.float64, torch.float16, torch.bfloat16) else dtype
                assert_close_ref(a, d.double(), tol_dtype if name in ("output", "grad_input") else
                                 (torch.float64 if a.dtype == torch.float64 else torch.float32),
                                 f"{cap}: {name} {dtype} {tuple(case['x'].shape)} axis={case['axis']} "
                                 f"training={case['training']}")


def test_own_capability_override():
    """BN_CUDA_CPU_CAPABILITY picks our copy alone (PyTorch keeps its own), at most what the CPU
    runs; a value it does not know leaves PyTorch's choice, as ATEN_CPU_CAPABILITY does."""
    if _pinned_capability():
        pytest.skip("the environment pins a copy of the kernels")
    best = bn_cuda.build_info()["cpu_capability"]
    order = ["default", "avx2", "avx512", "avx512_bf16"]
    code = ("import torch, bn_cuda; "
            "print(bn_cuda.build_info()['cpu_capability'], torch.backends.cpu.get_cpu_capability())")
    for want in ["default", "avx2", "avx512", "avx512_bf16", "sse9"]:
        env = dict(os.environ, BN_CUDA_CPU_CAPABILITY=want)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ours, torchs = proc.stdout.split()
        expected = best if want not in order else order[min(order.index(want), order.index(best))]
        assert ours == expected, (want, ours)
        assert torchs == torch.backends.cpu.get_cpu_capability(), (want, torchs)


_BF16_SUBPROCESS = textwrap.dedent("""
    import sys, torch, bn_cuda
    from bn_cuda.functional import batch_norm
    cases = torch.load(sys.argv[1])
    out = {"capability": bn_cuda.build_info()["cpu_capability"], "results": []}
    for c in cases:
        x = c["x"].detach().requires_grad_(c["training"])
        rm, rv = c["rm"].clone(), c["rv"].clone()
        y = batch_norm(x, rm, rv, c["w"], c["b"], c["training"], eps=c["eps"])
        res = [y, rm, rv]
        if c["training"]:
            res.append(torch.autograd.grad(y, x, c["g"])[0])
        # (bits: NaN != NaN for torch.equal on floats)
        out["results"].append([t.detach().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)
                               for t in res])
    torch.save(out, sys.argv[2])
""")


def _bf16_special_cases():
    """bfloat16 inputs whose outputs (and input gradients) round from every kind of float32: normal
    values spanning the exponent range, halfway cases, denormals (the AVX512_BF16 instruction
    flushes them, the emulation rounds them), signed zeros, infinities and NaN (the instruction
    keeps payloads, the emulation writes 0xffff), in every store loop: channels-first and
    channels-last, rows of whole and partial vectors, running statistics in bfloat16."""
    torch.manual_seed(5)
    cases = []
    for shape, layout in [((4, 7, 49), "contiguous"), ((6, 40, 3, 3), "channels_last"), ((300, 37), "contiguous"),
                          ((3, 5, 16, 16), "contiguous"), ((2, 64, 5, 5), "channels_last")]:
        C = shape[1]
        # per feature: magnitudes from 2^-140 (denormal results) to 2^120, some features NaN or inf
        wexp = torch.randint(-140, 121, (C,)).double()
        w = (torch.randn(C, dtype=torch.float64) * torch.exp2(wexp)).float()
        b = (torch.randn(C, dtype=torch.float64) * torch.exp2(wexp - 3)).float()
        b[::5] = 0.0
        w[1 % C] = float("nan") if C > 1 else w[0]
        b[2 % C] = float("inf") if C > 2 else b[0]
        x = torch.randn(shape, dtype=torch.float64) * torch.rand(C, *[1] * (len(shape) - 2), dtype=torch.float64) * 50
        x = x.to(torch.bfloat16)
        flat = x.view(-1)
        idx = torch.randperm(flat.numel())[:12]
        flat[idx[:3]] = float("inf")
        flat[idx[3:5]] = float("-inf")
        flat[idx[5:7]] = float("nan")
        flat[idx[7:9]] = 0.0
        flat[idx[9:]] = -0.0
        x = apply_layout(x, layout)
        g = apply_layout(torch.randn(shape, dtype=torch.float64).to(torch.bfloat16), layout)
        for training in (True, False):
            for sdt in (torch.float32, torch.bfloat16):
                rm = (torch.randn(C, dtype=torch.float64) * torch.exp2(wexp)).to(sdt)
                rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(sdt)
                cases.append(dict(x=x, w=w.to(sdt), b=b.to(sdt), rm=rm, rv=rv, g=g, training=training,
                                  eps=1e-3))
    # Halfway cases, exact: in inference with running_var + eps = 0.75 + 0.25 = 1 and mean 0,
    # y = x * 1 + b. Feature f holds x = 2^e (1 + k / 128), k = 0 .. 127 (bfloat16 values), and
    # b = 2^(e - 8), half a bfloat16 step: every y lies halfway between two bfloat16 values and
    # rounds to the even one, up for odd k, down for even k; at e = 127 the top ones overflow to inf.
    exps = [-125, -100, -17, -1, 0, 1, 30, 100, 126, 127]
    k = torch.arange(128, dtype=torch.float64)
    e = torch.tensor(exps, dtype=torch.float64)
    x = (torch.exp2(e)[None, :] * (1 + k[:, None] / 128))  # (128, features)
    x = torch.cat([x, -x]).to(torch.bfloat16)
    C = len(exps)
    b = torch.exp2(e - 8).float()
    for layout_x in (x, x.t().contiguous().t()):  # channels-last and channels-first rows
        expect = (layout_x.double() + b.double()).float().to(torch.bfloat16)
        cases.append(dict(x=layout_x, w=torch.ones(C), b=b, rm=torch.zeros(C), rv=torch.full((C,), 0.75),
                          g=None, training=False, eps=0.25, expect=expect.view(torch.int16)))
    return cases


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,layout", [((3, 5, 1), "contiguous"), ((3, 5, 7), "contiguous"),
                                          ((2, 3, 17), "contiguous"), ((2, 4, 49), "contiguous"),
                                          ((2, 3, 256), "contiguous"), ((2, 3, 16, 21), "contiguous"),
                                          ((5, 3, 4, 4), "channels_last"), ((3, 17, 5, 3), "channels_last"),
                                          ((2, 40, 3, 3), "channels_last"), ((2, 7, 9, 11), "sliced"),
                                          ((3, 6, 33), "transposed"), ((2, 5, 50), "offset")])
def test_half_outputs_round_to_nearest_even(shape, layout, dtype):
    """16-bit outputs are their float32 results rounded to nearest even, bit for bit, in every
    store loop of the copy this CPU runs (whole vectors, half steps, partial tails; channels-first
    rows of 1 to 336 elements, channels-last rows, strided and offset views): inference with mean 0 and
    running_var + eps = 0.75 + 0.25 = 1 computes y = x * 1 + b = float32(x + b), and x + b is exact
    in float64 (8 or 11 bits of x and 24 of b, exponents within 2^-12 .. 2^12), so the expected
    bits are torch's rounding of float64(x) + float64(b) to float32, then to the 16-bit type."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, dtype)).encode()))
    C = shape[1]
    mag = torch.exp2(torch.randint(-8, 9, shape, generator=g).double())
    x = apply_layout((torch.randn(shape, generator=g, dtype=torch.float64) * mag).to(dtype), layout)
    b = (torch.randn(C, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-8, 9, (C,), generator=g))).float()
    view = [1, C] + [1] * (len(shape) - 2)
    y32 = (x.double() + b.double().view(view)).float()
    expect = y32.to(dtype)
    y = batch_norm(x, torch.zeros(C), torch.full((C,), 0.75), torch.ones(C), b, training=False, eps=0.25)
    assert y.dtype == dtype and y.shape == x.shape
    bits = torch.int16
    changed = (expect.float() != y32).sum().item()
    assert changed > x.numel() // 4, changed  # (most outputs round: the check is not vacuous)
    assert torch.equal(y.view(bits), expect.view(bits)), (y.view(bits) != expect.view(bits)).sum().item()


def test_avx512_bf16_copy_matches_avx512_bitwise(tmp_path):
    """The AVX512_BF16 copy (native bfloat16 conversion) gives the AVX512 copy's bits for every
    bfloat16 output, gradient and running statistic, denormals, infinities and NaN included."""
    if _pinned_capability():
        pytest.skip("the environment pins a copy of the kernels")
    if bn_cuda.build_info()["cpu_capability"] != "avx512_bf16":
        pytest.skip("this CPU has no AVX512_BF16")
    cases = _bf16_special_cases()
    torch.save(cases, tmp_path / "cases.pt")
    ref = _run_capability(tmp_path / "cases.pt", tmp_path / "avx512.pt", "avx512", _BF16_SUBPROCESS)
    got = _run_capability(tmp_path / "cases.pt", tmp_path / "avx512_bf16.pt", "avx512_bf16", _BF16_SUBPROCESS)
    assert (ref["capability"], got["capability"]) == ("avx512", "avx512_bf16")
    kinds = {"denormal": 0, "nan": 0, "inf": 0}
    for i, (rr, rg) in enumerate(zip(ref["results"], got["results"])):
        for j, (a, b) in enumerate(zip(rr, rg)):
            assert a.dtype == b.dtype and a.stride() == b.stride(), (i, j)
            assert torch.equal(a, b), (i, j, (a != b).sum().item())
            if a.dtype == torch.int16:  # (the bfloat16 results: outputs, gradients, bfloat16 statistics)
                v = a.view(torch.bfloat16).float()
                kinds["nan"] += v.isnan().sum().item()
                kinds["inf"] += v.isinf().sum().item()
                kinds["denormal"] += ((v != 0) & (v.abs() < torch.finfo(torch.float32).tiny)).sum().item()
        if "expect" in cases[i]:  # (and those bits are right)
            kinds["halfway"] = kinds.get("halfway", 0) + cases[i]["expect"].numel()
            assert torch.equal(rg[0], cases[i]["expect"]), (i, (rg[0] != cases[i]["expect"]).sum().item())
    # the cases reach every special kind of output (else the comparison above proves little)
    assert all(n > 0 for n in kinds.values()), kinds
