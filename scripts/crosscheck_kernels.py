#!/usr/bin/env python3
"""Randomized cross-check of the fused kernels against float64 torch, on any build and device.

Draws random configurations (rank 2-5; the feature axis first, last, elsewhere or two of them;
odd sizes; every layout of tests/conftest.py plus a misaligned one; fp32 / fp64 / fp16 / bf16
input with float32 or input-dtype per-feature tensors, each present or not; momentum, epsilon,
offset data) and checks each through the functional API:

- the training forward (output, running statistics), the backward (input, weight and bias
  gradients) and the inference output against torch.nn.functional.batch_norm in float64, with
  tests/conftest.py's reference and tolerances;
- that a second call gives bitwise the same results;
- on CUDA and in the emulated build: that the three-launch channels-first path (the testing hook
  ``bn_cuda._C._set_single_cf(False)``) gives bitwise the results of the default plan.

Which kernels it reaches depends on the build: the CPU kernels in the CPU build, the CUDA kernels
under the host emulation in the emulated build (``scripts/emulate.sh`` builds one in
build/emulated: run this script with PYTHONPATH=build/emulated), the CUDA kernels with
``--device cuda``.

    python scripts/crosscheck_kernels.py --seed 1 --minutes 10 [--device cuda] [--max-numel N]
    python scripts/crosscheck_kernels.py --seed 1 --only 1234      # one configuration again

Exit status 1 when a configuration failed; each failure is printed with its index and
configuration. Not part of CI; run it after changing kernels or their planning.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

import torch  # noqa: E402

import bn_cuda  # noqa: E402
from bn_cuda.functional import batch_norm  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import (LAYOUTS, TOLS, _from_torch_layout, _to_torch_layout, apply_layout,  # noqa: E402
                      assert_close_ref, coarser, feature_axes, feature_shape, layout_ok, make_features,
                      make_input, max_err, reference_batch_norm)

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
N_CHOICES = [1, 2, 3, 4, 5, 8, 16, 32, 64]
C_CHOICES = [1, 2, 3, 4, 5, 7, 8, 16, 17, 32, 33, 64, 100, 128, 256, 1000]
S_CHOICES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 14, 16, 28, 49]


def random_case(seed: int, index: int, max_numel: int) -> dict:
    """One configuration, a function of (seed, index, max_numel) only."""
    r = random.Random(seed * 1_000_003 + index)
    rank = r.randint(2, 5)
    n, c = r.choice(N_CHOICES), r.choice(C_CHOICES)
    spatial = [r.choice(S_CHOICES) for _ in range(rank - 2)]
    kind = r.choices(["first", "last", "other", "two"], weights=[6, 2, 1, 1])[0]
    if kind == "last":
        shape, axis = [n] + spatial + [c], -1
    elif kind == "other":
        shape = [n, c] + spatial
        axis = r.randrange(rank)
    elif kind == "two" and rank >= 3:
        shape, axis = [n, c] + spatial, (1, 2)
    else:
        shape, axis = [n, c] + spatial, 1
    # Shrink to the size budget (emulated kernels are slow), keeping two values per feature.
    while math.prod(shape) > max_numel:
        big = [d for d in range(rank) if shape[d] > 1]
        d = r.choice(big)
        shape[d] = (shape[d] + 1) // 2
    axes = {a % rank for a in ([axis] if isinstance(axis, int) else axis)}
    reduced = math.prod(shape[d] for d in range(rank) if d not in axes)
    if reduced < 2:
        red = [d for d in range(rank) if d not in axes]
        shape[red[0]] = 2
    dtype = r.choices(list(DTYPES), weights=[4, 2, 3, 3])[0]
    layouts = [lay for lay in LAYOUTS if layout_ok(lay, rank)] + ["misaligned"]
    return dict(
        shape=shape, axis=axis, dtype=dtype,
        param_dtype=r.choice(["fp32", dtype]),
        layout=r.choice(layouts), grad_layout=r.choice(["contiguous", "same"]),
        weight=r.random() < 0.8, bias=r.random() < 0.8, running=r.random() < 0.8,
        momentum=r.choice([0.1, 0.01, 0.5, 1.0]), eps=r.choice([1e-5, 1e-3, 0.1]),
        offset=r.choice([0.0, 3.0] + ([30.0] if dtype in ("fp32", "fp64") else [])),
        seed=r.randrange(2**31),
    )


def lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "misaligned":  # one element into its storage: no 16-byte alignment
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = flat[1:].view(x.shape)
        view.copy_(x)
        return view
    return apply_layout(x, layout)


def torch_in_dtype(x, rm0, rv0, w, b, mom, eps, axis, g, training: bool, pdtype: torch.dtype) -> dict:
    """The arbiter: torch's own batch norm on the same values in the input's dtype (per-feature
    tensors in theirs when it is the input's, else in float32, or float64 for float64 input),
    features moved last as for the reference. A tolerance miss of bn_cuda counts only when it is
    also well beyond torch's own error (e.g. a float16 grad_bias past 65504: inf in both)."""
    axes = feature_axes(axis, x.dim())
    c = math.prod(x.shape[a] for a in axes)
    pd = pdtype if pdtype == x.dtype else torch.float64 if x.dtype == torch.float64 else torch.float32

    def prep(t, grad=False):
        return None if t is None else t.detach().to(pd).reshape(c).clone().requires_grad_(grad)

    x2, perm = _to_torch_layout(x.detach(), axes)
    x2 = x2.contiguous().requires_grad_(training)
    w2, b2, rm, rv = prep(w, training), prep(b, training), prep(rm0), prep(rv0)
    y2 = F.batch_norm(x2, rm, rv, w2, b2, training, mom, eps)
    out = {"out": _from_torch_layout(y2.detach(), x.shape, perm), "running_mean": rm, "running_var": rv}
    if training:
        g2 = _to_torch_layout(g, axes)[0].contiguous()
        leaves = [t for t in (x2, w2, b2) if t is not None]
        grads = torch.autograd.grad(y2, leaves, g2)
        out["grad_input"] = _from_torch_layout(grads[0], x.shape, perm)
        k = 1
        if w2 is not None:
            out["grad_weight"], k = grads[k].reshape(w.shape), k + 1
        if b2 is not None:
            out["grad_bias"] = grads[k].reshape(b.shape)
    if rm is not None:
        out["running_mean"], out["running_var"] = rm.reshape(rm0.shape), rv.reshape(rv0.shape)
    return out


ARBITRATED = Counter()
WORST = {}  # name -> the largest (bn_cuda's error / torch's) among the arbitrated misses
WORST_AT = {}  # name -> the configuration index of that miss (rerun it with --only INDEX)
CURRENT = [0]  # the configuration index being checked


def check(name: str, actual, ref, dtype, arbiter: dict, scale=None, factor: float = 4.0, slack: float = 0.0) -> None:
    """assert_close_ref, or on a miss: bn_cuda's error at most `factor` times torch's own error
    (in the input's dtype) plus the tolerance's absolute part plus `slack`."""
    try:
        assert_close_ref(actual, ref, dtype, name, scale=scale)
    except AssertionError:
        theirs = arbiter.get(name) if arbiter else None
        if theirs is None:
            raise
        sc = scale if scale is not None else max(float(ref.abs().max()) if ref.numel() else 1.0, 1e-30)
        e_ours, e_torch = max_err(actual, ref), max_err(theirs, ref)
        if not (e_ours <= factor * e_torch + TOLS[dtype][1] * sc + slack):
            raise AssertionError(f"{name} ({dtype}): error {e_ours:.3g} against float64, torch's own in the "
                                 f"input's dtype {e_torch:.3g} (scale {sc:.3g})") from None
        ARBITRATED[name] += 1
        ratio = 1.0 if e_ours == e_torch else e_ours / max(e_torch, 1e-300)  # (inf in both: 1)
        if ratio > WORST.get(name, 0.0):
            WORST[name], WORST_AT[name] = ratio, CURRENT[0]


@contextmanager
def single_cf(on: bool):
    prev = bn_cuda._C._set_single_cf(on)
    try:
        yield
    finally:
        bn_cuda._C._set_single_cf(prev)


def run_case(case: dict, device: str, hook: bool) -> None:
    """Raises AssertionError (or the op's error) when the configuration fails."""
    torch.manual_seed(case["seed"])
    dtype, pdtype = DTYPES[case["dtype"]], DTYPES[case["param_dtype"]]
    shape, axis = case["shape"], case["axis"]
    fshape = feature_shape(shape, axis)
    x = lay_out(make_input(shape, axis, dtype, device, offset=case["offset"]), case["layout"])
    g = make_input(shape, axis, dtype, device)
    if case["grad_layout"] == "same":
        g = lay_out(g, case["layout"])
    w = make_features(fshape, pdtype, device, "weight") if case["weight"] else None
    b = make_features(fshape, pdtype, device, "bias") if case["bias"] else None
    rm0 = make_features(fshape, pdtype, device, "mean") if case["running"] else None
    rv0 = make_features(fshape, pdtype, device, "var") if case["running"] else None
    mom, eps = case["momentum"], case["eps"]
    ref = reference_batch_norm(x, rm0, rv0, w, b, training=True, momentum=mom, eps=eps, axis=axis, grad_out=g)

    def train():
        xi = x.detach().requires_grad_(True)
        wi = w.detach().clone().requires_grad_(True) if w is not None else None
        bi = b.detach().clone().requires_grad_(True) if b is not None else None
        rm = rm0.clone() if rm0 is not None else None
        rv = rv0.clone() if rv0 is not None else None
        y = batch_norm(xi, rm, rv, wi, bi, training=True, momentum=mom, eps=eps, axis=axis)
        leaves = [t for t in (xi, wi, bi) if t is not None]
        grads = torch.autograd.grad(y, leaves, g)
        out = {"out": y.detach(), "grad_input": grads[0], "running_mean": rm, "running_var": rv}
        k = 1
        if wi is not None:
            out["grad_weight"], k = grads[k], k + 1
        if bi is not None:
            out["grad_bias"] = grads[k]
        return out

    got = train()
    for fmt in (torch.channels_last, torch.channels_last_3d):  # the output keeps the input's memory format
        try:
            keeps = not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
        except RuntimeError:  # (a format of another rank)
            keeps = False
        if keeps:
            assert got["out"].is_contiguous(memory_format=fmt), f"output not in the input's {fmt}"
    try:
        arb = torch_in_dtype(x.cpu(), *(t.cpu() if t is not None else None for t in (rm0, rv0, w, b)), mom, eps,
                             axis, g.cpu(), True, pdtype)
        arb = {"output": arb["out"], **arb}
    except RuntimeError:  # (a dtype combination torch's CPU kernel refuses: no arbiter)
        arb = {}
    # A float32 mean (the CUDA kernels' apply subtracts one) is within half an ulp of the true
    # mean, which moves an output by that times the feature's scale w * invstd: with |mean| >> std
    # (two close values at offset 30) more than torch's CPU path, which sums float32 in float64.
    slack = 0.0
    if dtype == torch.float32 and x.numel():
        axes = feature_axes(axis, x.dim())
        red = [d for d in range(x.dim()) if d not in axes]
        x64 = x.detach().cpu().double()
        m, v = x64.mean(red), x64.var(red, unbiased=False)
        wabs = w.detach().cpu().double().abs().reshape(m.shape) if w is not None else 1.0
        slack = 2 * float((m.abs() * 2.0**-24 * wabs * (v + eps).rsqrt()).max())
    check("output", got["out"], ref["out"], dtype, arb, slack=slack)
    check("grad_input", got["grad_input"], ref["grad_input"], dtype, arb, scale=ref["grad_input_scale"])
    wt = coarser(dtype, pdtype, torch.float32)
    if w is not None:
        check("grad_weight", got["grad_weight"], ref["grad_weight"], wt, arb)
    if b is not None:
        check("grad_bias", got["grad_bias"], ref["grad_bias"], wt, arb)
    if rm0 is not None:
        check("running_mean", got["running_mean"], ref["running_mean"], coarser(pdtype, torch.float32), arb)
        check("running_var", got["running_var"], ref["running_var"], coarser(pdtype, torch.float32), arb)

    def same(a: dict, b_: dict, what: str):
        for key, t in a.items():
            if t is not None:
                assert torch.equal(t, b_[key]), f"{what}: {key} differs bitwise"

    same(got, train(), "second call")
    if hook:
        with single_cf(False):
            same(got, train(), "three-launch channels-first path")
    if rm0 is not None:  # inference with the running statistics
        y = batch_norm(x, rm0, rv0, w, b, training=False, eps=eps, axis=axis)
        ref_inf = reference_batch_norm(x, rm0, rv0, w, b, training=False, eps=eps, axis=axis)
        try:
            arb = torch_in_dtype(x.cpu(), *(t.cpu() if t is not None else None for t in (rm0, rv0, w, b)), mom, eps,
                                 axis, None, False, pdtype)
            arb = {"inference output": arb["out"]}
        except RuntimeError:
            arb = {}
        check("inference output", y, ref_inf["out"], coarser(dtype, pdtype), arb)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-numel", type=int, default=None,
                    help="elements per input (default: 20000 in the emulated build, else 300000)")
    ap.add_argument("--only", type=int, default=None, help="run configuration INDEX only")
    ap.add_argument("--start", type=int, default=0, help="first configuration index (to continue a run)")
    args = ap.parse_args()
    info = bn_cuda.build_info()
    emulated = bool(info.get("emulated_cuda"))
    max_numel = args.max_numel or (20_000 if emulated else 300_000)
    hook = (args.device == "cuda" or emulated) and hasattr(bn_cuda._C, "_set_single_cf")
    print(f"bn_cuda {info['version']} ({'emulated CUDA kernels' if emulated else 'CUDA kernels' if args.device == 'cuda' else 'CPU kernels'}), "
          f"torch {torch.__version__}, device {args.device}, seed {args.seed}, max numel {max_numel}", flush=True)
    indices = [args.only] if args.only is not None else None
    deadline = time.monotonic() + 60 * args.minutes
    counts, failures = Counter(), []
    index = args.start
    while True:
        if indices is not None:
            if not indices:
                break
            index = indices.pop()
        elif time.monotonic() > deadline:
            break
        case = random_case(args.seed, index, max_numel)
        CURRENT[0] = index
        try:
            run_case(case, args.device, hook)
            counts["passed"] += 1
        except Exception as e:  # noqa: BLE001  (report every kind of failure with its case)
            counts["failed"] += 1
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            failures.append((index, case, f"{type(e).__name__}: {first}"))
            print(f"FAILED {index}: {case}\n    {type(e).__name__}: {first}", flush=True)
        counts[case["dtype"]] += 1
        counts["layout " + case["layout"]] += 1
        index += 1
    total = counts["passed"] + counts["failed"]
    print(f"{total} configurations: {counts['passed']} passed, {counts['failed']} failed; tolerance misses within "
          f"the arbiter's bound: " + (", ".join(f"{k} {v} (at most {WORST[k]:.2g}x torch's error, "
                                                 f"configuration {WORST_AT[k]})"
                                                 for k, v in sorted(ARBITRATED.items())) or "none"))
    print("  by dtype: " + ", ".join(f"{k} {counts[k]}" for k in DTYPES))
    print("  by layout: " + ", ".join(f"{k[7:]} {v}" for k, v in sorted(counts.items()) if k.startswith("layout ")))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
