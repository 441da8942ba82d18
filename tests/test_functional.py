"""bn_cuda.functional.batch_norm against torch.nn.functional.batch_norm in float64 (outputs,
running statistics, every gradient) over ranks, feature axes, layouts and strides."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torch.overrides import TorchFunctionMode

import bn_cuda
from bn_cuda.functional import batch_norm
from conftest import (LAYOUTS, DispatchLog, apply_layout, assert_close_ref, coarser, feature_shape, hand_reference,
                      layout_ok, make_features, make_input, reference_batch_norm)

SHAPES = {2: (6, 5), 3: (4, 3, 7), 4: (3, 5, 4, 6), 5: (2, 3, 4, 3, 5)}


def run_case(x, axis=1, training=True, affine=True, dtype=None, device="cpu", momentum=0.1, eps=1e-5,
             stats=True, weight_shape=None, grad_layout=None, stats_dtype=None):
    """Run ours (with backward) and the float64 reference on the same data; compare everything."""
    dtype = dtype or x.dtype
    fshape = feature_shape(x.shape, axis)
    wshape = weight_shape if weight_shape is not None else fshape
    sdt = stats_dtype or (dtype if dtype == torch.float64 else torch.float32)
    w = make_features(wshape, sdt, device, "weight").requires_grad_() if affine else None
    b = make_features(wshape, sdt, device, "bias").requires_grad_() if affine else None
    rm = make_features(wshape, sdt, device, "mean") if stats or not training else None
    rv = make_features(wshape, sdt, device, "var") if stats or not training else None
    rm0 = None if rm is None else rm.clone()
    rv0 = None if rv is None else rv.clone()
    xr = x.detach().requires_grad_()

    y = batch_norm(xr, rm, rv, w, b, training, momentum, eps, axis=axis)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(device)
    if grad_layout is not None:
        g = apply_layout(g, grad_layout)
    y.backward(g)

    ref = reference_batch_norm(x, rm0, rv0, w, b, training, momentum, eps, axis=axis, grad_out=g)
    assert y.dtype == x.dtype and y.device == x.device and y.shape == x.shape
    assert_close_ref(y, ref["out"], dtype, "output")
    if rm is not None:
        assert rm.dtype == sdt and rm.shape == rm0.shape
        assert_close_ref(rm, ref["running_mean"], coarser(dtype, sdt), "running_mean")
        assert_close_ref(rv, ref["running_var"], coarser(dtype, sdt), "running_var")
        if training:
            assert not torch.equal(rm, rm0), "running_mean was not updated"
        else:
            assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "inference changed the running stats"
    assert_close_ref(xr.grad, ref["grad_input"], dtype, "grad_input", scale=ref["grad_input_scale"])
    if affine:
        assert w.grad.shape == w.shape and b.grad.shape == b.shape
        assert_close_ref(w.grad, ref["grad_weight"], coarser(dtype, sdt), "grad_weight")
        assert_close_ref(b.grad, ref["grad_bias"], coarser(dtype, sdt), "grad_bias")
    return y, xr.grad


RANK_LAYOUTS = [(r, l) for r in (2, 3, 4, 5) for l in LAYOUTS if layout_ok(l, r)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS, ids=[f"{r}d-{l}" for r, l in RANK_LAYOUTS])
def test_matches_torch_axis1(rank, layout, training, dtype, device):
    x = apply_layout(make_input(SHAPES[rank], 1, dtype, device), layout)
    run_case(x, 1, training, True, dtype, device)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d", "permuted", "transposed"])
def test_output_keeps_memory_format(layout, device):
    rank = 5 if layout == "channels_last_3d" else 4
    x = apply_layout(make_input(SHAPES[rank], 1, torch.float32, device), layout)
    w = make_features([x.shape[1]], device=device)
    rm = make_features([x.shape[1]], device=device, kind="mean")
    rv = make_features([x.shape[1]], device=device, kind="var")
    for training in (True, False):
        y = batch_norm(x, rm, rv, w, w, training)
        assert y.stride() == x.stride(), f"{layout}: output strides {y.stride()} != input {x.stride()}"
        assert y.is_contiguous() == x.is_contiguous()
        for fmt in (torch.channels_last, torch.channels_last_3d):
            if x.dim() == (4 if fmt is torch.channels_last else 5):
                assert y.is_contiguous(memory_format=fmt) == x.is_contiguous(memory_format=fmt)


def test_sliced_output_is_dense(device):
    x = apply_layout(make_input((3, 4, 5, 6), 1, torch.float32, device), "sliced")
    y = batch_norm(x, None, None, training=True)
    assert y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)


AXIS_CASES = [
    ((3, 4, 5, 6), 0),
    ((3, 4, 5, 6), 2),
    ((3, 4, 5, 6), -1),
    ((3, 4, 5, 6), 3),
    ((3, 4, 5, 6), -3),
    ((3, 4, 5, 6), (1, 2)),
    ((3, 4, 5, 6), (2, 3)),
    ((3, 4, 5, 6), (-1, 1)),
    ((3, 4, 5, 6), (0, 2)),
    ((3, 4, 5, 6), (1, 3)),
    ((3, 4, 5, 6), (0, 1, 3)),
    ((4, 6, 5), -1),
    ((4, 6, 5), (0, 2)),
    ((2, 3, 4, 3, 5), (1, 4)),
    ((2, 3, 4, 3, 5), -2),
    ((7, 9), 0),
    ((7, 9), -1),
]


AXIS_GRID = [(s, a, l) for s, a in AXIS_CASES
             for l in ("contiguous", "channels_last", "permuted", "sliced", "transposed") if layout_ok(l, len(s))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,axis,layout", AXIS_GRID,
                         ids=[f"{len(s)}d-axis{a}-{l}".replace(" ", "") for s, a, l in AXIS_GRID])
def test_axis_variants(shape, axis, layout, dtype, device):
    x = apply_layout(make_input(shape, axis, dtype, device), layout)
    for training in (True, False):
        run_case(x, axis, training, True, dtype, device)


@pytest.mark.parametrize("wshape", ["features", "flat", "keras"])
@pytest.mark.parametrize("axis", [(1, 2), (-1,), (1, 3)])
def test_per_feature_shapes(axis, wshape, device):
    shape = (3, 4, 5, 6)
    nd = len(shape)
    fshape = feature_shape(shape, axis)
    if wshape == "features":
        ws = fshape
    elif wshape == "flat":
        ws = [math.prod(fshape)]
    else:
        ws = [shape[d] if d in [a % nd for a in axis] else 1 for d in range(nd)]
    x = make_input(shape, axis, torch.float64, device)
    for training in (True, False):
        run_case(x, list(axis), training, True, torch.float64, device, weight_shape=ws)


def test_multi_axis_hand_reference(device):
    """Multi-axis statistics against a hand-written float64 reference (not through F.batch_norm)."""
    x = make_input((5, 3, 4, 6), (1, 3), torch.float64, device)
    w = make_features([3, 6], torch.float64, device, "weight")
    b = make_features([3, 6], torch.float64, device, "bias")
    y = batch_norm(x, None, None, w, b, training=True, eps=1e-3, axis=(3, 1))
    assert_close_ref(y, hand_reference(x, w, b, eps=1e-3, axis=(1, 3)), torch.float64, "output")


@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_optional_weight_bias(affine, training, device):
    x = make_input((4, 3, 5), 1, torch.float64, device).requires_grad_()
    w = make_features([3], torch.float64, device, "weight").requires_grad_() if affine in ("weight", "both") else None
    b = make_features([3], torch.float64, device, "bias").requires_grad_() if affine in ("bias", "both") else None
    rm = make_features([3], torch.float64, device, "mean")
    rv = make_features([3], torch.float64, device, "var")
    g = torch.randn(x.shape, dtype=torch.float64)
    ref = reference_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, grad_out=g)
    y = batch_norm(x, rm, rv, w, b, training)
    y.backward(g.to(device))
    assert_close_ref(y, ref["out"], torch.float64, "output")
    assert_close_ref(x.grad, ref["grad_input"], torch.float64, "grad_input", scale=ref["grad_input_scale"])
    if w is not None:
        assert_close_ref(w.grad, ref["grad_weight"], torch.float64, "grad_weight")
    if b is not None:
        assert_close_ref(b.grad, ref["grad_bias"], torch.float64, "grad_bias")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bias_without_weight_keras_shape(training, device):
    """Only a bias, in the rank-preserving Keras shape: its gradient keeps that shape."""
    x = make_input((4, 3, 5), 1, torch.float32, device).requires_grad_()
    b = make_features([1, 3, 1], torch.float32, device, "bias").requires_grad_()
    rm = make_features([3], torch.float32, device, "mean")
    rv = make_features([3], torch.float32, device, "var")
    y = batch_norm(x, rm, rv, None, b, training)
    g = torch.randn(x.shape, device=device)
    y.backward(g)
    assert b.grad.shape == b.shape and b.grad.dtype == b.dtype
    assert_close_ref(b.grad, g.double().sum((0, 2), keepdim=True), torch.float32, "grad_bias")


@pytest.mark.parametrize("grad_layout", ["expanded", "channels_last", "sliced", "zero_strided_batch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grad_out_layouts(layout, grad_layout, device):
    x = apply_layout(make_input((3, 5, 4, 6), 1, torch.float64, device), layout).requires_grad_()
    w = make_features([5], torch.float64, device, "weight").requires_grad_()
    b = make_features([5], torch.float64, device, "bias").requires_grad_()
    if grad_layout == "expanded":
        g = torch.randn((), dtype=torch.float64, device=device).expand(x.shape)
    elif grad_layout == "zero_strided_batch":
        g = torch.randn((1, 5, 4, 6), dtype=torch.float64, device=device).expand(x.shape)
    else:
        g = apply_layout(torch.randn(x.shape, dtype=torch.float64, device=device), grad_layout)
    ref = reference_batch_norm(x, None, None, w, b, True, grad_out=g)
    y = batch_norm(x, None, None, w, b, training=True)
    y.backward(g)
    assert_close_ref(x.grad, ref["grad_input"], torch.float64, "grad_input", scale=ref["grad_input_scale"])
    assert_close_ref(w.grad, ref["grad_weight"], torch.float64, "grad_weight", scale=1.0)
    assert_close_ref(b.grad, ref["grad_bias"], torch.float64, "grad_bias")


def test_sum_backward_expanded_grad(device):
    """y.sum().backward() hands the op an all-zero-stride grad_out."""
    x = make_input((4, 3, 5, 5), 1, torch.float64, device).requires_grad_()
    w = make_features([3], torch.float64, device, "weight").requires_grad_()
    (batch_norm(x, None, None, w, None, training=True) * 1.0).sum().backward()
    # d(sum y)/dx is exactly zero in training (the normalized output sums to zero per feature).
    assert x.grad.abs().max() < 1e-10
    assert w.grad.abs().max() < 1e-10


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.7, 1.0])
def test_momentum(momentum, device):
    x = make_input((8, 4, 3), 1, torch.float64, device)
    rm = make_features([4], torch.float64, device, "mean")
    rv = make_features([4], torch.float64, device, "var")
    ref = reference_batch_norm(x, rm, rv, training=True, momentum=momentum)
    batch_norm(x, rm, rv, training=True, momentum=momentum)
    assert_close_ref(rm, ref["running_mean"], torch.float64, "running_mean")
    assert_close_ref(rv, ref["running_var"], torch.float64, "running_var")


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps(eps, training, device):
    x = make_input((8, 4, 3), 1, torch.float64, device, scale=0.01)
    rm = make_features([4], torch.float64, device, "mean")
    rv = make_features([4], torch.float64, device, "var") * 1e-4
    ref = reference_batch_norm(x, rm, rv, training=training, eps=eps)
    y = batch_norm(x, rm, rv, training=training, eps=eps)
    assert_close_ref(y, ref["out"], torch.float64, "output")


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64, "input"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_per_feature_dtypes(dtype, stats_dtype, device):
    """Weight / bias / running stats of fp32 or the input's dtype; running stats keep their dtype."""
    sdt = dtype if stats_dtype == "input" else stats_dtype
    if sdt == torch.float64 and dtype != torch.float64:
        sdt = torch.float32
    x = make_input((6, 4, 5), 1, dtype, device)
    for training in (True, False):
        run_case(x, 1, training, True, dtype, device, stats_dtype=sdt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_per_feature_dtypes(dtype, device):
    """Weight, bias and each running statistic of their own floating dtypes (float64 beside a
    float32 input, a half bias beside a float32 weight: more than torch accepts) give the float64
    reference's output and gradients within the coarsest dtype's tolerance, and each running
    statistic, updated in its own dtype, the reference's update within its dtype's."""
    x = make_input((6, 5, 7), 1, dtype, device)
    kinds = [torch.float64, torch.float16, torch.bfloat16, torch.float32]
    for shift in range(4):
        wd, bd, md, vd = (kinds[(i + shift) % 4] for i in range(4))
        w = make_features([5], wd, device, "weight")
        b = make_features([5], bd, device, "bias")
        rm, rv = make_features([5], md, device, "mean"), make_features([5], vd, device, "var")
        g = make_input((6, 5, 7), 1, dtype, device)
        ref = reference_batch_norm(x, rm, rv, w, b, training=True, grad_out=g)
        xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = batch_norm(xi, rm, rv, wi, bi, training=True)
        y.backward(g)
        assert y.dtype == dtype and wi.grad.dtype == wd and bi.grad.dtype == bd
        # (the reference sees the same stored values: only the results' own roundings differ)
        assert_close_ref(y, ref["out"], dtype, "output")
        assert_close_ref(xi.grad, ref["grad_input"], dtype, "grad_input", scale=ref["grad_input_scale"])
        assert_close_ref(wi.grad, ref["grad_weight"], coarser(dtype, wd, torch.float32), "grad_weight")
        assert_close_ref(bi.grad, ref["grad_bias"], coarser(dtype, bd, torch.float32), "grad_bias")
        assert rm.dtype == md and rv.dtype == vd
        assert_close_ref(rm, ref["running_mean"], coarser(md, torch.float32), "running_mean")
        assert_close_ref(rv, ref["running_var"], coarser(vd, torch.float32), "running_var")


@pytest.mark.parametrize("C, strided", [(1, False), (17, False), (1000, False), (17, True), (70000, False),
                                        (70001, True)],
                         ids=["C1", "C17", "C1000", "C17-strided", "C70000", "C70001-strided"])
@pytest.mark.parametrize("dtype, feat", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                         (torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                         (torch.float64, torch.float32)], ids=str)
def test_converted_per_feature_tensors_equal_explicit_conversion(dtype, feat, C, strided, device):
    """Per-feature tensors of another dtype than the accumulation type are converted by the op (on
    CPU into one shared buffer, by the CPU kernels' vector conversions when small and contiguous,
    else by copy_: here the contiguous C <= 1000 cases, and the strided or C >= 70000 ones): bitwise the
    results of passing them converted with .to(), the updated running statistics rounded back as
    .to() rounds, for the forward (training and evaluation) and the backward; and no version bump
    of the running statistics, as for float32 ones and torch's batch norm."""
    if (C > 1000 and device == "cpu" and bn_cuda.build_info()["emulated_cuda"]
            and (dtype, feat) != (torch.bfloat16, torch.bfloat16)):
        # In the emulated build (scripts/emulate.sh) "cpu" runs the CUDA kernels under the host
        # emulation, where a C >= 70000 case is 70000 blocks of 256 threads, a minute or more each.
        # There every C takes the same conversion path (the batched one, no size threshold), so
        # the large cases run for one dtype pair; all of them run in the CPU build and on a GPU.
        pytest.skip("emulated build: the large-C cases run for bfloat16 / bfloat16 only")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    N = 3 if C > 1000 else 6
    x = make_input((N, C, 2), 1, dtype, device, offset=3.0)
    g = make_input((N, C, 2), 1, dtype, device)

    def feats():
        torch.manual_seed(C)
        out = []
        for kind in ("weight", "bias", "mean", "var"):
            base = make_features([2 * C if strided else C], torch.float64, device, kind).to(feat)
            out.append(base[::2] if strided else base)
        return out

    w, b, rm, rv = feats()
    assert w.is_contiguous() is not strided
    w32, b32, rm32, rv32 = (t.to(acc) for t in (w, b, rm, rv))
    for training in (True, False):
        versions = (rm._version, rv._version)
        out = torch.ops.bn_cuda.forward_train(x, w, b, rm, rv, 0.1, 1e-5, [1], True) if training else (
            torch.ops.bn_cuda.forward_infer(x, w, b, rm, rv, 1e-5, [1]), None, None)
        ref = torch.ops.bn_cuda.forward_train(x, w32, b32, rm32, rv32, 0.1, 1e-5, [1], True) if training else (
            torch.ops.bn_cuda.forward_infer(x, w32, b32, rm32, rv32, 1e-5, [1]), None, None)
        assert torch.equal(out[0], ref[0]), f"output, training={training}"
        assert torch.equal(rm, rm32.to(feat)) and torch.equal(rv, rv32.to(feat)), f"running stats, training={training}"
        assert (rm._version, rv._version) == versions
        rm32, rv32 = rm.to(acc), rv.to(acc)  # (the next step starts from the rounded values, as the op's)
        if training:
            bwd = torch.ops.bn_cuda.backward
            mask = [True, True, True]
            mean_feat = out[1].to(feat)  # (saved statistics of another dtype: converted the same way)
            for got, want in ((bwd(g, x, w, out[1], out[2], True, [1], mask),
                               bwd(g, x, w32, out[1], out[2], True, [1], mask)),
                              (bwd(g, x, w, mean_feat, out[2], True, [1], mask),
                               bwd(g, x, w32, mean_feat.to(acc), out[2], True, [1], mask))):
                for a, r, name in zip(got, want, ("grad_input", "grad_weight", "grad_bias")):
                    assert torch.equal(a, r), name


@pytest.mark.parametrize("C", [1, 17, 1000, 70001], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype, feat", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                         (torch.float32, torch.bfloat16), (torch.float32, torch.float64),
                                         (torch.float64, torch.float32), (torch.float64, torch.float16)], ids=str)
@pytest.mark.parametrize("how", ["flat", "keras-shape", "create-graph", "dispatch-mode"])
def test_parameter_gradients_in_parameter_dtype_equal_explicit_conversion(dtype, feat, C, how, device):
    """The weight / bias gradients of parameters whose dtype is not the accumulation type: the
    backward op's (accumulation-typed) gradients converted as .to() converts, bitwise, in the
    parameters' shape, for a training and an evaluation forward; with create_graph (a graph through
    the cast) and under a dispatch mode, which sees the cast as an aten op. (bn_cuda converts plain
    small float32 CPU results with the CPU kernels' vector conversions, on a device with its batched
    conversion, and the rest, C = 70001 or float64 gradients, with .to(). Float64 input with
    float16 parameters is more than torch accepts; bn_cuda accepts it.)"""
    if C > 1000 and device == "cpu" and bn_cuda.build_info()["emulated_cuda"]:
        # (C = 70001 is about the CPU build's size threshold; the emulated build converts every C the
        # same way, and there each case is minutes of 70001 emulated blocks)
        pytest.skip("emulated build: C = 70001 runs in the CPU build and on a GPU")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input((3, C, 2), 1, dtype, device, offset=2.0)
    g = make_input((3, C, 2), 1, dtype, device)
    wshape = [1, C, 1] if how == "keras-shape" else [C]
    w0 = make_features(wshape, feat, device, "weight")
    b0 = make_features(wshape, feat, device, "bias")
    for training in (True, False):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = make_features([C], acc, device, "mean"), make_features([C], acc, device, "var")
        xr = x.clone().requires_grad_()
        y = batch_norm(xr, rm.clone(), rv.clone(), w, b, training)
        log = DispatchLog()
        if how == "dispatch-mode":
            with log:
                gx, gw, gb = torch.autograd.grad(y, (xr, w, b), g)
        else:
            gx, gw, gb = torch.autograd.grad(y, (xr, w, b), g, create_graph=how == "create-graph")
        if training:
            _, mean, invstd = torch.ops.bn_cuda.forward_train(x, w0, b0, None, None, 0.1, 1e-5, [1], True)
        else:
            mean, invstd = rm, torch.reciprocal(torch.sqrt(rv + 1e-5))  # (as the eval backward forms it)
        want = torch.ops.bn_cuda.backward(g, x, w0, mean, invstd, training, [1], [True, True, True])
        assert gw.dtype == feat and gb.dtype == feat and gw.shape == w0.shape and gb.shape == b0.shape
        assert torch.equal(gx, want[0]), f"grad_input, training={training}"
        assert torch.equal(gw, want[1].to(feat).reshape(wshape)), f"grad_weight, training={training}"
        assert torch.equal(gb, want[2].to(feat).reshape(wshape)), f"grad_bias, training={training}"
        assert_close_ref(gw, reference_batch_norm(x, rm, rv, w0, b0, training, grad_out=g)["grad_weight"],
                         coarser(dtype, feat), "grad_weight")
        if how == "create-graph":
            assert gw.requires_grad and gb.requires_grad
            (gx2,) = torch.autograd.grad((gw.to(acc) * torch.arange(1, C + 1, device=device).reshape(wshape)).sum(), xr)
            assert gx2.dtype == dtype and bool(gx2.ne(0).any())
        if how == "dispatch-mode":
            assert log.names.count("aten._to_copy.default") >= 2, log.names


@pytest.mark.parametrize("C", [5, 17, 40])
@pytest.mark.parametrize("dtype, feat", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                         (torch.float16, torch.float16), (torch.float64, torch.bfloat16),
                                         (torch.float64, torch.float16)], ids=str)
def test_converted_running_stats_keep_nan_encodings(dtype, feat, C, device):
    """A running statistic that holds NaN (a first element, a last one past the vector steps, an
    fp16 NaN with a payload) stays NaN where .to() gives NaN, every other element bitwise .to()'s.
    (The NaN encodings themselves are not compared: torch's own .to() encodes an fp16 NaN as
    0x7fffffff in float32 by its scalar loop and 0x7fc00000 by its vector loop, so they depend on
    where an element falls in torch's loop; bn_cuda converts every element of a small contiguous
    tensor with the vector conversions, on an AVX2 CPU, and the rest with copy_.)"""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input((4, C, 3), 1, dtype, device)
    rm = make_features([C], torch.float32, device, "mean").to(feat)
    rv = make_features([C], torch.float32, device, "var").to(feat)
    bits = rm.view(torch.int16)
    bits[0] = 0x7E01 if feat == torch.float16 else 0x7FC1  # (quiet NaNs with a payload)
    rm[C - 1] = float("nan")
    rv[C // 2] = float("nan")
    rm32, rv32 = rm.to(acc), rv.to(acc)
    torch.ops.bn_cuda.forward_train(x, None, None, rm, rv, 0.1, 1e-5, [1], True)
    torch.ops.bn_cuda.forward_train(x, None, None, rm32, rv32, 0.1, 1e-5, [1], True)
    for got, ref, name in ((rm, rm32, "running_mean"), (rv, rv32, "running_var")):
        want = ref.to(feat)
        assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) >= 1, name
        keep = ~want.isnan()
        assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16)), name


@pytest.mark.parametrize("feat", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_tensor_as_both_running_stats(feat, device):
    """One tensor passed as running_mean and running_var (torch's batch_norm allows it). A float32
    one is updated in place by the kernel, the mean first: as torch's (float64 reference). A
    converted one: both updates start from its values and the variance's is written back last,
    as copies of it would be (written back one tensor after the other, not in one launch)."""
    x = make_input((6, 17, 3), 1, torch.float16 if feat == torch.float16 else torch.float32, device, offset=2.0)
    t = make_features([17], torch.float32, device, "var").to(feat)
    if feat == torch.float32:
        r = t.double().cpu()
        F.batch_norm(x.double().cpu(), r, r, training=True, momentum=0.3)
        batch_norm(x, t, t, training=True, momentum=0.3)
        assert_close_ref(t, r, torch.float32, "running stats")
        return
    a, b = t.float(), t.float()
    batch_norm(x, t, t, training=True, momentum=0.3)
    batch_norm(x, a, b, training=True, momentum=0.3)
    assert not torch.equal(a, b)
    assert torch.equal(t, b.to(feat))


def test_non_contiguous_running_stats(device):
    """Running stats that are strided views are updated in place through the view."""
    x = make_input((8, 4, 3), 1, torch.float32, device)
    base_m = make_features([8], torch.float32, device, "mean")
    base_v = make_features([8], torch.float32, device, "var")
    rm, rv = base_m[::2], base_v[1::2]
    untouched_m, untouched_v = base_m[1::2].clone(), base_v[::2].clone()
    ref = reference_batch_norm(x, rm, rv, training=True)
    batch_norm(x, rm, rv, training=True)
    assert_close_ref(base_m[::2], ref["running_mean"], torch.float32, "running_mean")
    assert_close_ref(base_v[1::2], ref["running_var"], torch.float32, "running_var")
    assert torch.equal(base_m[1::2], untouched_m) and torch.equal(base_v[::2], untouched_v)


def test_training_without_running_stats(device):
    x = make_input((5, 3, 4), 1, torch.float64, device)
    y = batch_norm(x, None, None, training=True)
    ref = F.batch_norm(x.cpu(), None, None, training=True)
    assert_close_ref(y, ref, torch.float64, "output")


def test_drop_in_positional_and_keywords(device):
    """Same positional order and defaults as torch.nn.functional.batch_norm."""
    x = make_input((5, 3, 4), 1, torch.float64, device)
    rm = make_features([3], torch.float64, device, "mean")
    rv = make_features([3], torch.float64, device, "var")
    w = make_features([3], torch.float64, device, "weight")
    b = make_features([3], torch.float64, device, "bias")
    for args, kwargs in [((rm, rv), {}), ((rm, rv, w, b, False, 0.1, 1e-5), {}),
                         ((rm, rv), dict(weight=w, bias=b, training=False, momentum=0.2, eps=1e-3))]:
        ours = batch_norm(x, *args, **kwargs)
        theirs = F.batch_norm(x, *args, **kwargs)
        assert_close_ref(ours, theirs, torch.float64, "output")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_medium_shape_fp32(layout, device):
    """A medium shape: several partitions per feature on the CPU, several blocks on CUDA."""
    x = apply_layout(make_input((16, 24, 40, 40), 1, torch.float32, device), layout)
    run_case(x, 1, True, True, torch.float32, device)


def test_eval_gradient_saves_running_stats_like_torch():
    """In eval mode with a gradient, the running statistics are saved as torch saves them: the
    gradient matches torch's, and modifying them in place before the backward raises, as in torch."""
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(6, 3, 5, dtype=torch.float64)
    ours = torch.autograd.grad(batch_norm(x, rm, rv, w, None, False), [x, w], gy)
    ref = torch.autograd.grad(torch.nn.functional.batch_norm(x, rm, rv, w, None, False), [x, w], gy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for fn in (batch_norm, torch.nn.functional.batch_norm):
        y = fn(x, rm, rv, w, None, False)
        rv.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(gy)


# ---------------------------------------------------------------------------------------------
# The C++ fast path of batch_norm (csrc/common/functional_fast.cpp)


class _SeenFunctions(TorchFunctionMode):
    """Records the functions a torch function mode sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _direct(x, rm, rv, w, b, training, momentum, eps, axis):
    """The op the Python path calls, called directly."""
    a = axis % x.dim()
    if training:
        return torch.ops.bn_cuda.forward_train(x, w, b, rm, rv, momentum, eps, [a], True)[0]
    return torch.ops.bn_cuda.forward_infer(x, w, b, rm, rv, eps, [a])


@pytest.mark.parametrize("training,stats", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape,axis,layout", [((5, 3, 7, 7), 1, "channels_last"), ((6, 17), -1, "contiguous"),
                                               ((4, 7, 3), -2, "sliced"), ((0, 3, 2), 1, "contiguous")])
def test_fast_path_calls_the_op_with_the_same_arguments(training, stats, shape, axis, layout):
    """The common call (plain tensors, float momentum and eps, an int axis) is taken in C++; its
    output and running statistics are those of the op called directly, bit for bit, and the
    momentum, eps and axis reach the op (different values give different results)."""
    torch.manual_seed(3)
    x = apply_layout(make_input(shape, axis % len(shape), torch.float32, offset=1.5), layout)
    C = shape[axis]
    w, b = torch.randn(C), torch.randn(C)
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    outs = []
    for momentum, eps in [(0.1, 1e-5), (0.3, 0.5)]:
        rm1, rv1 = (rm0.clone(), rv0.clone()) if stats else (None, None)
        rm2, rv2 = (rm0.clone(), rv0.clone()) if stats else (None, None)
        y1 = batch_norm(x, rm1, rv1, torch.nn.Parameter(w), b, training, momentum, eps, axis=axis)
        y2 = _direct(x, rm2, rv2, w, b, training, momentum, eps, axis)
        assert y1.stride() == y2.stride() and torch.equal(y1, y2)
        if stats:
            assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
            if training and x.numel():
                assert not torch.equal(rm1, rm0)
        outs.append((y1, rm1))
    if x.numel():
        assert not torch.equal(outs[0][0], outs[1][0]) or (training and stats and not torch.equal(outs[0][1], outs[1][1]))


def test_fast_path_leaves_other_calls_to_python():
    """Tensor subclasses and torch function modes see the op call (the Python path), as before the
    C++ fast path; torch dispatch modes see it from either; arguments of other types (an int
    momentum, a tuple axis) give the same result through the Python path; bad arguments give its
    errors."""
    class Logged(torch.Tensor):
        seen: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    x = make_input((4, 3, 5), 1, torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    ref = batch_norm(x, rm.clone(), rv.clone(), training=True)
    with _SeenFunctions() as mode:
        y = batch_norm(x, rm.clone(), rv.clone(), training=True)
    assert "bn_cuda.forward_train.default" in mode.seen and torch.equal(y, ref)
    rmc, rvc = rm.clone(), rv.clone()
    with DispatchLog() as mode:
        y = batch_norm(x, rmc, rvc, training=True)
    assert mode.names == ["bn_cuda.forward_train.default"] and torch.equal(y, ref)
    y = batch_norm(x.as_subclass(Logged), rm.clone(), rv.clone(), training=True)
    assert "bn_cuda.forward_train.default" in Logged.seen and type(y) is Logged
    assert torch.equal(y.as_subclass(torch.Tensor), ref)
    # other argument types: the Python path, the same numbers
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y1 = batch_norm(x, rm1, rv1, training=True, momentum=1, eps=1)
    y2 = batch_norm(x, rm2, rv2, training=True, momentum=1.0, eps=1.0, axis=(1,))
    assert torch.equal(y1, y2) and torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    # errors: the Python path's, with no running statistic changed
    rm1, rv1 = rm.clone(), rv.clone()
    with pytest.raises(ValueError, match="axis"):
        batch_norm(x, rm1, rv1, training=True, axis=3)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        batch_norm(x, rm1, None, training=True)
    with pytest.raises(TypeError, match="training must be a bool"):
        batch_norm(x, rm1, rv1, training=1)
    with pytest.raises((ValueError, RuntimeError), match="weight"):
        batch_norm(x, rm1, rv1, torch.ones(4), training=True)
    with pytest.raises(ValueError, match="more than 1 value per"):
        batch_norm(torch.randn(1, 3), rm1, rv1, training=True)
    assert torch.equal(rm1, rm) and torch.equal(rv1, rv)


@pytest.mark.parametrize("unbiased", [True, False])
def test_ops_fast_calls_match_the_op(unbiased):
    """bn_cuda.ops.batch_norm_train / batch_norm_infer (the Keras layer's plain path) call the op from
    C++ for plain tensors: every output and running statistic is the op's, bit for bit, the
    arguments reach it (unbiased_running_var changes running_var), and a torch function mode still
    sees the op call."""
    from bn_cuda import ops

    torch.manual_seed(4)
    x = make_input((3, 5, 4, 17), 3, torch.float32, offset=2.0)
    w, b, rm0, rv0 = torch.randn(17), torch.randn(17), torch.randn(17), torch.rand(17) + 0.5
    rm1, rv1, rm2, rv2 = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    got = ops.batch_norm_train(x, w, b, rm1, rv1, 0.3, 0.5, [3], unbiased_running_var=unbiased)
    ref = torch.ops.bn_cuda.forward_train(x, w, b, rm2, rv2, 0.3, 0.5, [3], unbiased)
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    other = torch.ops.bn_cuda.forward_train(x, w, b, rm0.clone(), rv0.clone(), 0.3, 0.5, [3], not unbiased)[0]
    assert torch.equal(other, ref[0])
    rv3 = rv0.clone()
    torch.ops.bn_cuda.forward_train(x, w, b, rm0.clone(), rv3, 0.3, 0.5, [3], not unbiased)
    assert not torch.equal(rv3, rv1)
    got = ops.batch_norm_infer(x, w, b, rm0, rv0, 0.5, [-1])
    assert torch.equal(got, torch.ops.bn_cuda.forward_infer(x, w, b, rm0, rv0, 0.5, [3]))
    # tensors on two devices: the Python path's check and message (meta: a second device on any machine)
    rm4 = rm0.clone()
    with pytest.raises(RuntimeError, match="running_var is on meta but input is on cpu"):
        ops.batch_norm_train(x, w, b, rm4, rv0.to("meta"), 0.3, 0.5, [3])
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        ops.batch_norm_infer(x, w.to("meta"), b, rm0, rv0, 0.5, [3])
    assert torch.equal(rm4, rm0)
    with _SeenFunctions() as mode:
        ops.batch_norm_train(x, w, b, rm1, rv1, 0.3, 0.5, [3], unbiased_running_var=unbiased)
        ops.batch_norm_infer(x, w, b, rm0, rv0, 0.5, [3])
    assert mode.seen.count("bn_cuda.forward_train.default") == 1
    assert mode.seen.count("bn_cuda.forward_infer.default") == 1
