"""Per-kernel device times of bn_cuda and torch on a few shapes, from torch.profiler.

The eager benchmark times whole calls; on a GPU small tensors are then bound by launches and host
work, and a slow row does not say which kernel is slow. This lists every kernel each call
launches with its device time (mean over the profiled calls), for fwd-train and backward, so the
next change can aim at the kernel that matters. CPU-only runs list the CPU ops instead.

    python -m benchmarks.kernel_profile [--out FILE.md] [--reps 20]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import bn_cuda

# (shape, dtype, channels_last): small ResNet-50 layers (launch-bound on a GPU), NHWC fp16 layers
# with 64 channels where cuDNN's training forward was 2-2.8x faster in kernel time on the H200
# (CUDA-graph replays, 2026-12-04: 3 to 100 MB; one 8-wide tile of channels, so few stats blocks),
# and a large NCHW one.
CASES: List[Tuple[Tuple[int, ...], torch.dtype, bool]] = [
    ((32, 256, 14, 14), torch.bfloat16, False),
    ((32, 256, 14, 14), torch.float16, True),
    ((32, 2048, 7, 7), torch.float16, False),
    ((2, 64, 112, 112), torch.float16, True),
    ((32, 64, 56, 56), torch.float16, True),
    ((256, 64, 56, 56), torch.float16, True),
    ((256, 64, 112, 112), torch.float16, True),
    ((256, 64, 112, 112), torch.float16, False),
]


def _calls(x: torch.Tensor) -> Dict[str, Dict[str, Callable[[], object]]]:
    c = x.shape[1]
    dev = x.device
    w = torch.ones(c, device=dev, requires_grad=True)
    b = torch.zeros(c, device=dev, requires_grad=True)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    xr = x.detach().requires_grad_(True)
    out = {}
    for name, fn in (("bn_cuda", bn_cuda.functional.batch_norm), ("torch", F.batch_norm)):
        y = fn(xr, rm, rv, w, b, True)
        dy = torch.randn_like(y)
        out[name] = {
            "fwd-train": lambda fn=fn: fn(xr, rm, rv, w, b, True),
            "backward": lambda y=y, dy=dy: torch.autograd.grad(y, [xr, w, b], dy, retain_graph=True),
        }
    return out


# The Keras layer's variants on one shape: which kernels the fused steps launch next to the plain
# layer's (the variants' cost is meant to stay within 15% of it).
KERAS_CASE: Tuple[Tuple[int, ...], torch.dtype, bool] = ((32, 64, 56, 56), torch.bfloat16, True)
KERAS_VARIANTS = {
    "layer": {},
    "ghost": {"virtual_batch_size": 8},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}},
    "ghost-renorm": {"virtual_batch_size": 8, "renorm": True},
    "adjust": {"adjustment": "fixed"},
}


def _keras_calls(x: torch.Tensor) -> Dict[str, Dict[str, Callable[[], object]]]:
    c = x.shape[1]
    out = {}
    for name, kw in KERAS_VARIANTS.items():
        kw = dict(kw)
        if kw.get("adjustment") == "fixed":
            view = (1, c) + (1,) * (x.dim() - 2)
            adj = (torch.full(view, 1.05, device=x.device), torch.full(view, 0.02, device=x.device))
            kw["adjustment"] = lambda shape, adj=adj: adj
        layer = bn_cuda.BatchNormalization(axis=1, **kw)
        layer(x, training=False)  # builds it on x's device
        xr = x.detach().requires_grad_(True)
        params = [p for p in layer.parameters() if p.requires_grad]
        y = layer(xr, training=True)
        dy = torch.randn_like(y)
        out[name] = {
            "fwd-train": lambda layer=layer, xr=xr: layer(xr, training=True),
            "backward": lambda y=y, dy=dy, xr=xr, params=params: torch.autograd.grad(y, [xr] + params, dy,
                                                                                   retain_graph=True),
        }
    return out


def _profile(fn: Callable[[], object], reps: int, cuda: bool) -> List[Tuple[str, float, float]]:
    """[(kernel or op name, mean device (or CPU) us per call, launches per call)]."""
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    total: Dict[str, float] = defaultdict(float)
    count: Dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if cuda:
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            dur = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        else:
            if ev.cpu_parent is not None:  # top-level CPU ops only
                continue
            dur = ev.cpu_time_total
        total[ev.name] += dur
        count[ev.name] += 1
    rows = [(n[:90], total[n] / reps, count[n] / reps) for n in total]
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the tables to this markdown file too")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    lines = [f"# Kernel profile ({torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__})", ""]
    lines.append("Mean " + ("device" if cuda else "CPU") + f" time per call over {args.reps} calls (us), and "
                 "launches per call.")
    for shape, dtype, cl in CASES if cuda else [((8, 64, 14, 14), torch.float32, False)]:
        x = torch.randn(shape, device=dev, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        calls = _calls(x)
        lines += ["", f"## {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} "
                  f"{'channels_last' if cl else 'contiguous'}"]
        for mode in ("fwd-train", "backward"):
            for impl in ("bn_cuda", "torch"):
                rows = _profile(calls[impl][mode], args.reps, cuda)
                tot = sum(r[1] for r in rows)
                lines.append(f"- **{impl} {mode}**: {tot:.1f} us in {sum(r[2] for r in rows):.0f} kernels/ops: " +
                             "; ".join(f"`{n}` {t:.1f} us x{k:g}" for n, t, k in rows[:6]))
        del calls, x
    shape, dtype, cl = KERAS_CASE if cuda else ((8, 64, 14, 14), torch.float32, True)
    x = torch.randn(shape, device=dev, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    lines += ["", f"## Keras layer, {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} "
              f"{'channels_last' if cl else 'contiguous'}"]
    keras = _keras_calls(x)
    for mode in ("fwd-train", "backward"):
        for name, calls in keras.items():
            rows = _profile(calls[mode], args.reps, cuda)
            tot = sum(r[1] for r in rows)
            lines.append(f"- **{name} {mode}**: {tot:.1f} us in {sum(r[2] for r in rows):.0f} kernels/ops: " +
                         "; ".join(f"`{n}` {t:.1f} us x{k:g}" for n, t, k in rows[:8]))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
