"""Bitwise determinism: repeated calls give identical outputs, statistics and gradients, and on
the CPU the result does not depend on the number of threads (the partition of the reductions is
fixed by the shape)."""

from __future__ import annotations

import pytest
import torch

import bn_cuda  # noqa: F401
from bn_cuda.functional import batch_norm
from conftest import apply_layout, make_features, make_input

# Shapes with several partial reductions per feature on the CPU (more than 2**15 values per
# feature, channels-first and channels-last) and several blocks per feature on CUDA.
CASES = [
    ((8, 4, 96, 96), 1, "contiguous", torch.float32),
    ((64, 16, 24, 24), 1, "channels_last", torch.float32),
    ((40000, 12), 1, "contiguous", torch.float32),
    ((8, 4, 96, 96), 1, "contiguous", torch.float16),
    ((32, 8, 20, 20), 1, "channels_last", torch.bfloat16),
    ((6, 5, 80, 80), (1, 2), "contiguous", torch.float64),
    ((2, 3, 150, 150), 1, "contiguous", torch.float32),  # rows longer than one CPU chunk
]
IDS = [f"{s}-{a}-{l}-{str(d)[6:]}".replace(" ", "") for s, a, l, d in CASES]


def _run(x, w, b, axis, g):
    """Forward (training) + backward + an inference forward; everything that comes out."""
    c = w.numel()
    rm = torch.zeros(w.shape, dtype=w.dtype, device=x.device)
    rv = torch.ones(w.shape, dtype=w.dtype, device=x.device)
    xr, wr, br = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    y = batch_norm(xr, rm, rv, wr, br, training=True, momentum=0.3, axis=axis)
    y.backward(g)
    axes = [axis] if isinstance(axis, int) else list(axis)
    _, mean, invstd = torch.ops.bn_cuda.forward_train(x, w, b, None, None, 0.1, 1e-5, axes)
    y_eval = batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    assert mean.numel() == c
    return [y, mean, invstd, rm, rv, xr.grad, wr.grad, br.grad, y_eval]


def _inputs(shape, axis, layout, dtype, device):
    x = apply_layout(make_input(shape, axis, dtype, device, offset=3.0), layout)
    axes = [axis] if isinstance(axis, int) else list(axis)
    fs = [shape[a] for a in axes]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = make_features(fs, sdt, device, "weight")
    b = make_features(fs, sdt, device, "bias")
    g = apply_layout(torch.randn(shape, dtype=torch.float64).to(dtype).to(device), layout)
    return x, w, b, g


def _assert_bitwise(a_list, b_list, what):
    names = ["output", "save_mean", "save_invstd", "running_mean", "running_var", "grad_input",
             "grad_weight", "grad_bias", "eval_output"]
    for name, a, b in zip(names, a_list, b_list):
        assert a.dtype == b.dtype and a.shape == b.shape
        # Compare bit patterns (NaN-safe, and -0.0 != 0.0).
        ai = a.detach().contiguous().view(torch.int16 if a.element_size() == 2 else
                                          (torch.int32 if a.element_size() == 4 else torch.int64))
        bi = b.detach().contiguous().view(ai.dtype)
        assert torch.equal(ai, bi), f"{what}: {name} differs bitwise"


@pytest.mark.parametrize("shape,axis,layout,dtype", CASES, ids=IDS)
def test_repeated_calls_bitwise(shape, axis, layout, dtype, device):
    x, w, b, g = _inputs(shape, axis, layout, dtype, device)
    first = _run(x, w, b, axis, g)
    for _ in range(2):
        _assert_bitwise(first, _run(x, w, b, axis, g), "repeated call")


@pytest.mark.parametrize("shape,axis,layout,dtype", CASES, ids=IDS)
def test_thread_count_independent(shape, axis, layout, dtype):
    x, w, b, g = _inputs(shape, axis, layout, dtype, "cpu")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(x, w, b, axis, g)
        torch.set_num_threads(2)
        two = _run(x, w, b, axis, g)
        torch.set_num_threads(4)
        four = _run(x, w, b, axis, g)
    finally:
        torch.set_num_threads(old)
    _assert_bitwise(one, two, "1 vs 2 threads")
    _assert_bitwise(one, four, "1 vs 4 threads")


def test_copy_of_input_gives_same_bits():
    """CPU: the result depends on the values and the layout only, not on the alignment of the
    allocation. (CUDA picks its vector width from the alignment, so this is a CPU property.)"""
    device = "cpu"
    x, w, b, g = _inputs((16, 8, 33, 31), 1, "contiguous", torch.float32, device)
    a = _run(x, w, b, 1, g)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    x2 = storage[1:].view(x.shape)
    x2.copy_(x)
    _assert_bitwise(a, _run(x2, w, b, 1, g), "shifted allocation")
