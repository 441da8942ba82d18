"""Running one case: inputs, the correctness check against the reference, then the timings of
every mode for every implementation that passed, as result rows."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .bytes_model import gbps, min_bytes, pct_of_copy
from .impls import Impl, make_keras_impls, make_plain_impls, observed_torch_backend, predicted_torch_backend
from .presets import Case
from .timing import Timing, TimingConfig, measure, rotation_count

__all__ = ["TOLERANCE", "IMPLS", "BASELINES", "RunEnv", "run_case", "skipped_rows"]

#: Largest accepted error, max|impl - reference| / max|reference|, per activation dtype.
TOLERANCE = {"fp32": 2e-4, "fp16": 1e-2, "bf16": 4e-2}
#: Column order; bn_cuda is the implementation under test, the rest are baselines.
IMPLS = ("bn_cuda", "torch", "torch_nocudnn", "torch_compile", "composite")
BASELINES = IMPLS[1:]


@dataclass
class RunEnv:
    """What every case shares: the device, timer settings, seed, and a progress callback."""

    device: torch.device
    timing: TimingConfig
    seed: int = 0
    on_mode_done: Callable[[], None] = lambda: None
    params: str = "fp32"  # a key of PARAMS


PARAMS: Dict[str, str] = {
    "fp32": "float32",
    "input": "the input's dtype (a model converted with .half() / .bfloat16())",
}


def _layout(t: Tensor, layout: str) -> Tensor:
    if layout == "nhwc" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "nhwc" and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


def _inputs(case: Case, env: RunEnv) -> Dict[str, Any]:
    dev, c = env.device, case.shape[1]
    g = torch.Generator(device=dev).manual_seed(env.seed + zlib.crc32(case.label.encode()))
    bshape = [1, c] + [1] * (len(case.shape) - 2)
    # Per-channel scale and offset, so mean and variance differ across channels.
    scale = torch.rand(bshape, generator=g, device=dev) * 1.5 + 0.5
    shift = torch.randn(bshape, generator=g, device=dev)
    x = (torch.randn(case.shape, generator=g, device=dev) * scale + shift).to(case.torch_dtype)
    dy = torch.randn(case.shape, generator=g, device=dev).to(case.torch_dtype)
    pdt = case.torch_dtype if env.params == "input" else torch.float32  # (running statistics too: impls)
    return {
        "x": _layout(x, case.layout), "dy": _layout(dy, case.layout),
        "weight": (torch.rand(c, generator=g, device=dev) + 0.5).to(pdt),
        "bias": (torch.rand(c, generator=g, device=dev) - 0.5).to(pdt),
        "infer_stats": ((shift.reshape(c) + 0.1 * torch.randn(c, generator=g, device=dev)).to(pdt),
                        ((scale.reshape(c) ** 2) * (torch.rand(c, generator=g, device=dev) + 0.5)).to(pdt)),
    }


def _outputs(impl: Impl, x: Tensor, dy: Tensor, backend: Optional[Dict[str, str]] = None) -> Dict[str, Tensor]:
    """Forward (training), gradients, running state after one step, and inference output."""
    record = (lambda k: observed_torch_backend(backend, k)) if backend is not None else None
    xr = x.detach().requires_grad_(True)
    if record:
        with record("train"):
            y = impl.train(xr)
            grads = torch.autograd.grad(y, [xr, *impl.params], dy, allow_unused=True)
    else:
        y = impl.train(xr)
        grads = torch.autograd.grad(y, [xr, *impl.params], dy, allow_unused=True)
    out = {"y": y.detach(), "dx": grads[0]}
    out.update({f"d{n}": gr for n, gr in zip(impl.param_names, grads[1:]) if gr is not None})
    out.update({f"state.{k}": v.detach().clone() for k, v in impl.state().items()})
    with torch.no_grad():
        if record:
            with record("infer"):
                out["y_infer"] = impl.infer(x)
        else:
            out["y_infer"] = impl.infer(x)
    return out


def _rel_err(a: Tensor, b: Tensor) -> float:
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    a, b = a.detach().float(), b.detach().float()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) if a.numel() else 0.0


def _compare(got: Dict[str, Tensor], ref: Dict[str, Tensor]) -> Tuple[float, str, List[str]]:
    """Worst relative error over the reference's outputs, which output it was, and notes."""
    worst, where, notes = 0.0, "", []
    for k, r in ref.items():
        if k not in got:
            notes.append(f"no {k}")
            continue
        e = _rel_err(got[k], r)
        if e > worst or not where:
            worst, where = e, k
    if got["y"].stride() != ref["y"].stride():
        notes.append(f"output strides {got['y'].stride()} differ from the reference's {ref['y'].stride()}")
    return worst, where, notes


def _mode_callable(impl: Impl, mode: str, sets: List[Tuple[Tensor, Tensor]]) -> Tuple[Callable[[], Any], list]:
    """A zero-argument call running ``mode`` on the next input set; plus objects to keep alive."""
    state = {"i": 0}
    k = len(sets)

    def nxt() -> int:
        i = state["i"]
        state["i"] = (i + 1) % k
        return i

    if mode == "fwd-train":
        return (lambda: impl.train(sets[nxt()][0])), []
    if mode == "inference":
        def infer() -> Any:
            with torch.no_grad():
                return impl.infer(sets[nxt()][0])
        return infer, []
    if mode == "fwd+bwd":
        def step() -> Any:
            x, dy = sets[nxt()]
            return torch.autograd.grad(impl.train(x), [x, *impl.params], dy)
        return step, []
    if mode == "backward":
        graphs = [(impl.train(x), dy, [x, *impl.params]) for x, dy in sets]

        def bwd() -> Any:
            y, dy, inputs = graphs[nxt()]
            return torch.autograd.grad(y, inputs, dy, retain_graph=True)
        return bwd, graphs
    raise ValueError(f"unknown mode {mode!r}")


def _copy_callable(nbytes: int, device: torch.device) -> Tuple[Callable[[], Any], list]:
    """A same-device copy moving ``nbytes`` (nbytes/2 read, nbytes/2 written into a fresh tensor
    from the caching allocator, as the implementations' outputs are), over rotated sources."""
    n = max(1, nbytes // 8)  # float32 elements read (and written)
    k = rotation_count(4 * n, device)
    srcs = [torch.ones(n, device=device) for _ in range(k)]
    state = {"i": 0}

    def copy() -> Tensor:
        i = state["i"]
        state["i"] = (i + 1) % k
        return srcs[i].clone()
    return copy, srcs


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:160] if msg else ''}"


def _row(case: Case, mode: str, env: RunEnv) -> Dict[str, Any]:
    return {"group": case.group, "shape": case.shape_str, "layout": case.layout_label, "dtype": case.dtype,
            "variant": case.variant, "mode": mode, "bytes": min_bytes(case.shape, case.torch_dtype, mode),
            "impls": {}, "torch_backend": None, "check_ok": None, "check_max_err": None, "check_worst": None,
            "check_tol": TOLERANCE[case.dtype], "notes": []}


def skipped_rows(case: Case, env: RunEnv, reason: str) -> List[Dict[str, Any]]:
    """Rows for a case that was not run (time budget, missing layer, ...)."""
    rows = []
    for mode in case.modes:
        r = _row(case, mode, env)
        r["notes"].append(f"skipped: {reason}")
        rows.append(r)
    return rows


def run_case(case: Case, env: RunEnv) -> List[Dict[str, Any]]:
    """Check, then time, one case in each of its modes. Never raises for a failing implementation."""
    inp = _inputs(case, env)
    x, dy = inp["x"], inp["dy"]
    notes: List[str] = []
    if case.variant == "plain":
        try:
            impls: Dict[str, Impl] = make_plain_impls(
                inp["weight"], inp["bias"], inp["infer_stats"], with_nocudnn=env.device.type == "cuda",
                with_compile=case.compile)
        except Exception as exc:  # noqa: BLE001
            return skipped_rows(case, env, f"setup failed ({_short(exc)})")
        ref_name = "torch"
    else:
        try:
            impls, layer_notes = make_keras_impls(case.variant, x, env.seed)
            notes += layer_notes
        except Exception as exc:  # noqa: BLE001  (layer missing or variant unsupported: skip, say why)
            return skipped_rows(case, env, f"{case.variant} variant unavailable ({_short(exc)})")
        ref_name = "composite"

    # Correctness: every implementation against the reference, before anything is timed.
    status: Dict[str, str] = {}
    backend: Dict[str, str] = {}
    try:
        ref_out = _outputs(impls[ref_name], x, dy, backend if ref_name == "torch" else None)
        status[ref_name] = "ok"
    except Exception as exc:  # noqa: BLE001
        return skipped_rows(case, env, f"reference {ref_name} failed ({_short(exc)})")
    check = {"ok": None, "err": None, "worst": None}
    for name, impl in impls.items():
        if name == ref_name:
            continue
        t0 = time.perf_counter()
        try:
            got = _outputs(impl, x, dy)
        except Exception as exc:  # noqa: BLE001
            status[name] = f"error ({_short(exc)})"
            if name == "bn_cuda":
                check.update(ok=False, worst=status[name])
            continue
        if name == "torch_compile":
            notes.append(f"torch.compile: first call (compile) {time.perf_counter() - t0:.1f} s")
        err, worst, cmp_notes = _compare(got, ref_out)
        del got
        ok = err <= TOLERANCE[case.dtype]
        status[name] = "ok" if ok else f"check failed ({worst} err {err:.2e})"
        notes += [f"{name}: {n}" for n in cmp_notes]
        if name == "bn_cuda":
            check.update(ok=ok, err=err, worst=worst)
    del ref_out
    if "torch_nocudnn" in impls and set(backend.values()) <= {"native"}:
        status["torch_nocudnn"] = "same as torch (torch picked its native kernel)"
    if backend:
        for key, train in (("train", True), ("infer", False)):
            expected = predicted_torch_backend(x, inp["weight"], train)
            if backend.get(key) not in (None, expected):
                notes.append(f"torch {key} backend observed {backend.get(key)}, rules predict {expected}")

    # Timing.
    set_bytes = 2 * x.numel() * x.element_size()
    sets = [(x.clone().requires_grad_(True), dy.clone()) for _ in range(rotation_count(set_bytes, env.device))]
    rows = []
    for mode in case.modes:
        row = _row(case, mode, env)
        row["notes"] += notes
        row.update(check_ok=check["ok"], check_max_err=check["err"], check_worst=check["worst"])
        if backend:
            row["torch_backend"] = backend.get("infer" if mode == "inference" else "train")
        fns: Dict[str, Callable[[], Any]] = {}
        keep: List[Any] = []
        for name in IMPLS:
            if name not in impls:
                continue
            row["impls"][name] = {"status": status.get(name, "not run")}
            # A bn_cuda that failed its check is still timed (the row says FAIL); an erroring one is not.
            if status.get(name) == "ok" or (name == "bn_cuda" and "check failed" in status.get(name, "")):
                try:
                    fns[name], k = _mode_callable(impls[name], mode, sets)
                    keep.append(k)
                except Exception as exc:  # noqa: BLE001
                    row["impls"][name]["status"] = f"error ({_short(exc)})"
        fns["copy"], k = _copy_callable(row["bytes"], env.device)
        keep.append(k)
        timings = measure(fns, env.device, env.timing)
        del fns, keep
        copy = timings.pop("copy")
        copy = copy if isinstance(copy, Timing) else None
        row["copy_ms"] = copy.median_s * 1e3 if copy else None
        row["copy_gbs"] = gbps(row["bytes"], copy.median_s) if copy else None
        for name, t in timings.items():
            entry = row["impls"][name]
            if isinstance(t, Timing):
                if t.note:
                    row["notes"].append(f"{name}: {t.note}")
                entry.update(ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, runs=t.runs, graphed=t.graphed,
                             gbs=gbps(row["bytes"], t.median_s),
                             pct_copy=pct_of_copy(t.median_s, copy.median_s) if copy else None)
            else:
                entry["status"] = f"error ({_short(t)})"
        if "error" in row["impls"].get("bn_cuda", {}).get("status", ""):
            row["check_ok"] = False
        bn = row["impls"].get("bn_cuda", {}).get("ms")
        row["speedup"] = {b: row["impls"][b]["ms"] / bn for b in BASELINES
                          if bn and row["impls"].get(b, {}).get("ms")}
        rows.append(row)
        env.on_mode_done()
    return rows
