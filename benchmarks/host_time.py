"""Host time of one call, in microseconds: bn_cuda's calls against torch's on tiny tensors.

On tensors this small the kernels take next to nothing, and what a call costs is the work on the
CPU around them: argument checks, dispatch, autograd bookkeeping, allocation. On a GPU that is the
time to enqueue the call (the loop is timed without synchronizing, and short enough that the launch
queue never fills), which bounds a small model's step rate. Each row times bn_cuda's call and
torch's counterpart alternately in one process, several rounds of a fixed number of calls each, and
keeps each one's fastest round (the least disturbed by other work on the machine).

    python -m benchmarks.host_time                     # CPU tensors, one thread
    python -m benchmarks.host_time --device cuda --out benchmarks/results/<device>/

Rows: ``bn_cuda.functional.batch_norm`` against ``torch.nn.functional.batch_norm`` (training,
evaluation, training forward + ``torch.autograd.grad``), ``bn_cuda.nn.BatchNorm2d`` against
``torch.nn.BatchNorm2d``, the Keras layer (plain; no torch counterpart), and the three operators
called directly (``torch.ops.bn_cuda.*`` against ATen's ``native_batch_norm`` /
``native_batch_norm_backward``), which leave out the Python layer above them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import bn_cuda

from .machine import device_slug, machine_info, provenance_lines

Fn = Callable[[], Any]

# (name, shape) of the input of each row; the Keras layer takes the channels-last transpose.
SHAPE = (2, 3, 4, 4)


def _cases(device: torch.device) -> List[Tuple[str, Fn, Optional[Fn]]]:
    """(row name, bn_cuda's call, torch's call or None)."""
    C = SHAPE[1]
    g = torch.Generator().manual_seed(0)
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x, dy = rand(*SHAPE), rand(*SHAPE)
    w, b = rand(C).abs() + 0.5, rand(C)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    ours_F, torch_F = bn_cuda.functional.batch_norm, F.batch_norm

    def grad(fn: Callable[..., torch.Tensor]) -> Fn:
        return lambda: torch.autograd.grad(fn(xg, rm, rv, wg, bg, True), (xg, wg, bg), dy)

    bn_ours, bn_torch = bn_cuda.nn.BatchNorm2d(C).to(device), torch.nn.BatchNorm2d(C).to(device)
    bn_ours_eval = bn_cuda.nn.BatchNorm2d(C).to(device).eval()
    bn_torch_eval = torch.nn.BatchNorm2d(C).to(device).eval()

    def module_step(m: torch.nn.Module) -> Fn:
        return lambda: m(xg).backward(dy)

    keras = bn_cuda.BatchNormalization(axis=-1).to(device)
    xk = x.permute(0, 2, 3, 1).contiguous()
    keras(xk, training=True)  # (built by its first call)
    xkg = xk.clone().requires_grad_()
    dyk = dy.permute(0, 2, 3, 1).contiguous()

    def keras_step() -> Any:
        return keras(xkg, training=True).backward(dyk)

    ops, aten = torch.ops.bn_cuda, torch.ops.aten
    _, sm, si = ops.forward_train(x, w, b, None, None, 0.1, 1e-5, [1])
    _, tsm, tsi = aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    mask = [True, True, True]
    return [
        ("functional: training forward", lambda: ours_F(x, rm, rv, w, b, True), lambda: torch_F(x, rm, rv, w, b, True)),
        ("functional: evaluation", lambda: ours_F(x, rm, rv, w, b, False), lambda: torch_F(x, rm, rv, w, b, False)),
        ("functional: training forward + autograd.grad", grad(ours_F), grad(torch_F)),
        ("BatchNorm2d: training forward", lambda: bn_ours(x), lambda: bn_torch(x)),
        ("BatchNorm2d: evaluation", lambda: bn_ours_eval(x), lambda: bn_torch_eval(x)),
        ("BatchNorm2d: training forward + backward", module_step(bn_ours), module_step(bn_torch)),
        ("Keras layer: training forward", lambda: keras(xk, training=True), None),
        ("Keras layer: evaluation", lambda: keras(xk, training=False), None),
        ("Keras layer: training forward + backward", keras_step, None),
        ("op: forward_train / native_batch_norm", lambda: ops.forward_train(x, w, b, rm, rv, 0.1, 1e-5, [1]),
         lambda: aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)),
        ("op: forward_infer / native_batch_norm", lambda: ops.forward_infer(x, w, b, rm, rv, 1e-5, [1]),
         lambda: aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)),
        ("op: backward / native_batch_norm_backward", lambda: ops.backward(dy, x, w, sm, si, True, [1], mask),
         lambda: aten.native_batch_norm_backward(dy, x, w, rm, rv, tsm, tsi, True, 1e-5, mask)),
    ]


def _per_call_us(fn: Fn, calls: int, device: torch.device) -> float:
    """Host microseconds per call over `calls` back-to-back calls (on a GPU: enqueue time; the
    queue is drained before, and after, outside the timed span)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (t1 - t0) / calls * 1e6


def measure(device: torch.device, rounds: int = 5, calls: int = 0, warmup: int = 50) -> List[Dict[str, Any]]:
    """One dict per row: name, ours_us, torch_us (None without a counterpart), ratio torch / ours."""
    if calls <= 0:  # (a GPU: a short loop, whose few hundred launches fit in the launch queue)
        calls = 100 if device.type == "cuda" else 2000
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cases = _cases(device)
    for name, ours, theirs in cases:
        impls = {"ours": ours, "torch": theirs} if theirs is not None else {"ours": ours}
        best = {k: float("inf") for k in impls}
        grad_free = "grad" not in name and "backward" not in name
        with torch.no_grad() if grad_free else torch.enable_grad():
            for fn in impls.values():
                for _ in range(warmup):
                    fn()
            for _ in range(rounds):  # (alternating: a slow spell of the machine hits both)
                for k, fn in impls.items():
                    best[k] = min(best[k], _per_call_us(fn, calls, device))
        ours_us, torch_us = best["ours"], best.get("torch")
        rows.append({"call": name, "ours_us": round(ours_us, 2),
                     "torch_us": None if torch_us is None else round(torch_us, 2),
                     "torch_over_ours": None if torch_us is None else float(f"{torch_us / ours_us:.4g}")})
    return rows


def markdown(rows: List[Dict[str, Any]], info: Dict[str, Any], settings: Dict[str, Any]) -> str:
    lines = [
        "# bn_cuda host time per call",
        "",
        *provenance_lines(info),
        f"- input {'x'.join(map(str, SHAPE))} float32 (Keras layer: its channels-last transpose); "
        f"{settings['threads']} CPU thread(s); {settings['rounds']} alternating rounds of {settings['calls']} calls, "
        "the fastest round of each",
        f"- {info.get('timestamp_utc')}",
        "",
        "| call | bn_cuda µs | torch µs | torch / bn_cuda |",
        "|---|---|---|---|",
    ]
    for r in rows:
        t = "" if r["torch_us"] is None else f"{r['torch_us']:.2f}"
        q = "" if r["torch_over_ours"] is None else f"{r['torch_over_ours']:.2f}x"
        lines.append(f"| {r['call']} | {r['ours_us']:.2f} | {t} | {q} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=0, help="calls per round (default: 2000 on CPU, 100 on a GPU)")
    p.add_argument("--out", help="a folder for host-time.md / host-time.json "
                                 "(a results folder: benchmarks/results/<device>/)")
    p.add_argument("--name", default="host-time", help="file name stem under --out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    rows = measure(device, rounds=args.rounds, calls=args.calls)
    settings = {"threads": args.threads, "rounds": args.rounds,
                "calls": args.calls or (100 if device.type == "cuda" else 2000), "shape": list(SHAPE)}
    info = machine_info(device)
    text = markdown(rows, info, settings)
    print(text)
    doc = {"machine": info, "settings": settings, "rows": rows, "device_slug": device_slug(device)}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text(text)
        (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {out / (args.name + '.md')} and .json")
    return doc


if __name__ == "__main__":
    main()
