"""Shared test machinery: device parametrization, seeds, input builders and a float64 reference.

Every test that takes the ``device`` fixture runs on "cpu" and, when a GPU is visible, on
"cuda" (marked ``cuda``). Results on any device are compared against a float64 reference
computed on the CPU with torch's own batch norm (features permuted into torch's ``(M, C)``
layout), so multi-axis and channels-last cases have an independent reference too.

Helpers are plain functions importable as ``from conftest import ...`` (pytest puts this
directory on ``sys.path``; ``tests/`` has no ``__init__.py``).
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

try:  # triton (pulled in by torch._dynamo / torch.optim) segfaults when imported after
    import torch._dynamo  # noqa: F401  tensorflow in one process (both bundle LLVM): load it first.
except Exception:  # pragma: no cover - a torch without dynamo
    pass

HAS_CUDA = torch.cuda.is_available()
DEVICES: List = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if HAS_CUDA else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# Hooks


def pytest_configure(config):
    # tf / cuda / slow are declared in pyproject.toml; repeat them so this conftest also works
    # when pytest runs with another ini file (-c) or from another rootdir.
    config.addinivalue_line("markers", "tf: parity tests that need tensorflow + tf_keras")
    config.addinivalue_line("markers", "onnx: ONNX export tests that need onnx, onnxscript + onnxruntime")
    config.addinivalue_line("markers", "cuda: tests that need a CUDA device")
    config.addinivalue_line("markers", "slow: slower tests")


def pytest_collection_modifyitems(config, items):
    # A test parametrized on a "cuda" device is a cuda test, whatever its file says.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


# BN_CUDA_REQUIRE_TF=1 (CI) requires the tests of both external oracles: tensorflow + tf_keras
# (marker tf) and onnx + onnxscript + onnxruntime (marker onnx).
_TF_WORDS = ("tensorflow", "tf_keras", "tf-keras", "keras", "onnx")


def _skipped_tf_tests(terminalreporter) -> List[str]:
    """Node ids of skipped tests marked ``tf`` or ``onnx``, and of test modules skipped at collection
    because tensorflow / tf_keras / onnx could not be imported (a module-level importorskip leaves no
    marker)."""
    out = []
    for rep in terminalreporter.stats.get("skipped", []):
        keywords = getattr(rep, "keywords", {})
        if "tf" in keywords or "onnx" in keywords:
            out.append(rep.nodeid)
        elif getattr(rep, "when", None) == "collect" or rep.__class__.__name__ == "CollectReport":
            text = str(getattr(rep, "longrepr", "")).lower()
            if any(w in text for w in _TF_WORDS):
                out.append(rep.nodeid)
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get("BN_CUDA_REQUIRE_TF") != "1":
        return
    skipped = _skipped_tf_tests(terminalreporter)
    if skipped:
        terminalreporter.section("BN_CUDA_REQUIRE_TF", sep="=", red=True, bold=True)
        terminalreporter.write_line(
            f"BN_CUDA_REQUIRE_TF=1 but {len(skipped)} test(s) marked 'tf' or 'onnx' were skipped "
            "(are tensorflow + tf_keras and onnx + onnxscript + onnxruntime installed?):", red=True)
        for nodeid in skipped[:20]:
            terminalreporter.write_line(f"  {nodeid}")
        if len(skipped) > 20:
            terminalreporter.write_line(f"  ... and {len(skipped) - 20} more")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("BN_CUDA_REQUIRE_TF") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and _skipped_tf_tests(reporter) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------
# Inputs


def feature_axes(axis, ndim: int) -> List[int]:
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % ndim for a in axes)


def feature_shape(shape: Sequence[int], axis) -> List[int]:
    return [shape[a] for a in feature_axes(axis, len(shape))]


def make_input(shape: Sequence[int], axis=1, dtype=torch.float32, device="cpu", offset: float = 0.0,
               scale: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random data with a different offset and scale per feature (never constant), contiguous.

    Built in float64 on the CPU and rounded once to ``dtype``.
    """
    axes = feature_axes(axis, len(shape))
    fshape = [1] * len(shape)
    for a in axes:
        fshape[a] = shape[a]
    nf = math.prod(fshape)
    feat_off = (torch.arange(nf, dtype=torch.float64).reshape(fshape) % 7 - 3) * 0.5
    feat_scale = 0.5 + (torch.arange(nf, dtype=torch.float64).reshape(fshape) % 5) * 0.375
    x = torch.randn(*shape, dtype=torch.float64, generator=generator) * feat_scale * scale + feat_off * scale
    x = x + offset
    return x.to(dtype).to(device)


def make_features(fshape: Sequence[int], dtype=torch.float32, device="cpu", kind: str = "weight") -> torch.Tensor:
    n = math.prod(fshape)
    if kind == "weight":
        t = 0.5 + torch.rand(n, dtype=torch.float64)
    elif kind == "bias":
        t = torch.randn(n, dtype=torch.float64)
    elif kind == "mean":
        t = torch.randn(n, dtype=torch.float64) * 0.5
    elif kind == "var":
        t = 0.5 + torch.rand(n, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return t.reshape(list(fshape)).to(dtype).to(device)


LAYOUTS = ["contiguous", "channels_last", "channels_last_3d", "sliced", "permuted", "transposed",
           "offset"]


def apply_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout (a view when the layout needs one)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        assert x.dim() == 4
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        assert x.dim() == 5
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "sliced":
        # Every other element of a twice-as-long last dim, plus a column slice: no inner stride 1.
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype, device=x.device)
        big.normal_()
        view = big[..., 1::2]
        view.copy_(x)
        return view
    if layout == "permuted":
        # Dense but in an unusual dim order: memory order reversed.
        perm = list(range(x.dim()))[::-1]
        inv = [perm.index(d) for d in range(x.dim())]
        return x.permute(perm).contiguous().permute(inv)
    if layout == "transposed":
        # The first two dims swapped in memory (features outermost for axis=1).
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "offset":
        # A view deep inside a large storage.
        pad = 1_000_003
        flat = torch.empty(pad + x.numel(), dtype=x.dtype, device=x.device)
        flat.normal_()
        view = flat[pad:].view(x.shape)
        view.copy_(x)
        return view
    raise ValueError(layout)


def layout_ok(layout: str, ndim: int) -> bool:
    return not ((layout == "channels_last" and ndim != 4) or (layout == "channels_last_3d" and ndim != 5))


# ---------------------------------------------------------------------------------------------
# Reference


def _to_torch_layout(t: torch.Tensor, axes: List[int]) -> Tuple[torch.Tensor, List[int]]:
    red = [d for d in range(t.dim()) if d not in axes]
    perm = red + axes
    m = math.prod(t.shape[d] for d in red)
    c = math.prod(t.shape[d] for d in axes)
    return t.permute(perm).reshape(m, c), perm


def _from_torch_layout(t2: torch.Tensor, shape: Sequence[int], perm: List[int]) -> torch.Tensor:
    pshape = [shape[d] for d in perm]
    inv = [perm.index(d) for d in range(len(shape))]
    return t2.reshape(pshape).permute(inv)


def reference_batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5, axis=1, grad_out=None) -> Dict[str, Optional[torch.Tensor]]:
    """float64 CPU reference through torch.nn.functional.batch_norm.

    Feature axes are moved last and flattened so torch sees an ``(M, C)`` input. Returns the
    output, the updated running statistics and, when ``grad_out`` is given, the gradients of
    input / weight / bias (each in the caller's shapes, float64, on the CPU).
    """
    axes = feature_axes(axis, x.dim())
    c = math.prod(x.shape[a] for a in axes)

    def prep(t, grad=False):
        if t is None:
            return None
        t = t.detach().to("cpu", torch.float64).reshape(c).clone()
        return t.requires_grad_(grad)

    x64 = x.detach().to("cpu", torch.float64).requires_grad_(grad_out is not None)
    w64 = prep(weight, grad_out is not None)
    b64 = prep(bias, grad_out is not None)
    rm = prep(running_mean)
    rv = prep(running_var)
    x2, perm = _to_torch_layout(x64, axes)
    y2 = F.batch_norm(x2, rm, rv, w64, b64, training, momentum, eps)
    y = _from_torch_layout(y2, x.shape, perm)
    res = {"out": y.detach(), "running_mean": rm, "running_var": rv, "grad_input": None,
           "grad_input_scale": None, "grad_weight": None, "grad_bias": None}
    if grad_out is not None:
        # The natural scale of grad_input: its terms are w * invstd * grad_out, and in training
        # they cancel (to ~0 with two values per feature), so its own magnitude can be far smaller.
        with torch.no_grad():
            var = x2.var(0, unbiased=False) if training else rv.detach().clone() if rv is not None else None
            invstd = (var + eps).rsqrt()
            wabs = w64.detach().abs() if w64 is not None else torch.ones_like(invstd)
            res_scale = float((wabs * invstd).max()) * float(grad_out.detach().abs().max()) if x.numel() else 1.0
        inputs = [x64] + [t for t in (w64, b64) if t is not None]
        grads = torch.autograd.grad(y, inputs, grad_out.detach().to("cpu", torch.float64))
        res["grad_input"] = grads[0]
        res["grad_input_scale"] = max(res_scale, float(grads[0].abs().max()) if grads[0].numel() else 0.0)
        k = 1
        if w64 is not None:
            res["grad_weight"] = grads[k].reshape(weight.shape)
            k += 1
        if b64 is not None:
            res["grad_bias"] = grads[k].reshape(bias.shape)
    if rm is not None:
        res["running_mean"] = rm.reshape(running_mean.shape)
    if rv is not None:
        res["running_var"] = rv.reshape(running_var.shape)
    return res


def hand_reference(x, weight=None, bias=None, eps=1e-5, axis=1):
    """Training output written out by hand in float64 (independent of F.batch_norm)."""
    axes = feature_axes(axis, x.dim())
    red = [d for d in range(x.dim()) if d not in axes]
    x64 = x.detach().to("cpu", torch.float64)
    mean = x64.mean(red, keepdim=True)
    var = ((x64 - mean) ** 2).mean(red, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps)
    bshape = [x.shape[d] if d in axes else 1 for d in range(x.dim())]
    if weight is not None:
        y = y * weight.detach().to("cpu", torch.float64).reshape(bshape)
    if bias is not None:
        y = y + bias.detach().to("cpu", torch.float64).reshape(bshape)
    return y


# Tolerances for a result of `dtype` against the float64 reference: (rtol, atol) applied to values
# normalized by the reference's largest magnitude (outputs of a batch norm are O(1)).
TOLS = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (1e-2, 4e-3),
    torch.bfloat16: (4e-2, 2e-2),
}


def coarser(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype with the loosest tolerance among ``dtypes``."""
    return max(dtypes, key=lambda d: TOLS[d][0])


def assert_close_ref(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "",
                     scale: Optional[float] = None):
    """``actual`` (any device / dtype) matches the float64 ``ref`` within ``dtype``'s tolerance.

    ``atol`` is relative to the reference's largest magnitude (``scale``), so gradients with
    large sums are judged like O(1) outputs.
    """
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all() == torch.isfinite(r).all(), f"{name}: non-finite values"
    if scale is None:
        scale = max(float(r.abs().max()) if r.numel() else 1.0, 1e-30)
    rtol, atol = TOLS[dtype]
    torch.testing.assert_close(a, r, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name} ({dtype}): {m}")


def max_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    return float((actual.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)).abs().max())


class DispatchLog(TorchDispatchMode):
    """A torch dispatch mode that records every operator it sees: ``calls`` holds (name, args),
    ``names`` the names alone."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def names(self) -> List[str]:
        return [n for n, _ in self.calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))
