"""Evaluation-mode batch norm inside a model under ``torch.compile``: torch's layer against ours.

Under ``torch.compile`` an evaluation-mode ``bn_cuda`` batch norm of CUDA tensors traces as torch
operations (``bn_cuda.ops.infer_for_inductor``): Inductor can then fuse it with the ReLU after it
and, with ``freezing``, fold it into the convolution before it, as it does torch's batch norm. CPU
tensors keep bn_cuda's operator, which Inductor cannot fuse. This script measures that choice. Each
row compiles one small model four ways, in one process, and times them alternately:

- ``torch``: the model with ``torch.nn.BatchNorm2d``;
- ``ours``: converted by ``bn_cuda.nn.convert_batchnorm`` (the routing above);
- ``ours-op``: converted, with the batch norm forced to be the opaque ``bn_cuda::forward_infer``
  operator (the alternative the routing did not take);
- ``ours-eager``: the converted model without ``torch.compile``.

    python -m benchmarks.compile_eval                                  # CPU, small shapes
    python -m benchmarks.compile_eval --device cuda --out benchmarks/results/<device>/

Models: ``bn-relu`` (BatchNorm2d -> ReLU) and ``conv-bn-relu`` (Conv2d 3x3 -> BatchNorm2d -> ReLU,
compiled with Inductor's ``freezing``, which folds a batch norm into the convolution). Rows are
written to the output files one at a time, so a run cut short keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.benchmark import Timer

import bn_cuda

from .machine import device_slug, machine_info, provenance_lines

IMPLS = ("torch", "ours", "ours-op", "ours-eager")
MODELS = ("bn-relu", "conv-bn-relu")


class _OpBatchNorm(nn.Module):
    """An evaluation-mode batch norm that is always the opaque ``bn_cuda::forward_infer`` operator."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return torch.ops.bn_cuda.forward_infer.default(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps, [1])


def _model(kind: str, channels: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    layers: List[nn.Module] = [nn.Conv2d(channels, channels, 3, padding=1)] if kind == "conv-bn-relu" else []
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():  # statistics and affine parameters of their own
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
    model = nn.Sequential(*layers, bn, nn.ReLU()).eval()
    if kind == "conv-bn-relu":
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=g) * 0.05)
    return model.to(device=device, dtype=dtype)


def _variants(kind: str, channels: int, device: torch.device, dtype: torch.dtype,
              backend: str) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    ref = _model(kind, channels, device, dtype)
    ours = bn_cuda.nn.convert_batchnorm(copy.deepcopy(ref))
    forced = copy.deepcopy(ours)
    forced[len(forced) - 2] = _OpBatchNorm(forced[len(forced) - 2])
    return {"torch": torch.compile(ref, backend=backend), "ours": torch.compile(ours, backend=backend),
            "ours-op": torch.compile(forced, backend=backend), "ours-eager": ours}


def measure_row(kind: str, shape: List[int], dtype: torch.dtype, channels_last: bool, device: torch.device,
                backend: str, rounds: int, min_run_time: float) -> Dict[str, Any]:
    """One row: each variant's median milliseconds per call (the best of ``rounds`` alternating
    rounds), ratios against torch's compiled model, and the largest output difference from it."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with inductor_config.patch(freezing=kind == "conv-bn-relu"), torch.no_grad():
        fns = _variants(kind, shape[1], device, dtype, backend)
        outs = {k: fn(x) for k, fn in fns.items()}  # (compiles)
        best = {k: float("inf") for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                t = Timer("fn(x)", globals={"fn": fn, "x": x}).blocked_autorange(min_run_time=min_run_time)
                best[k] = min(best[k], t.median * 1e3)
    diff = max((outs[k].float() - outs["torch"].float()).abs().max().item() for k in fns)
    return {"model": kind, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
            "layout": "channels_last" if channels_last else "contiguous",
            "ms": {k: round(v, 4) for k, v in best.items()},
            "torch_over": {k: float(f"{best['torch'] / v:.4g}") for k, v in best.items() if k != "torch"},
            "max_abs_diff": diff}


def markdown(rows: List[Dict[str, Any]], info: Dict[str, Any], settings: Dict[str, Any]) -> str:
    lines = [
        "# Evaluation-mode batch norm in a compiled model: torch's against ours",
        "",
        *provenance_lines(info),
        f"- torch.compile backend {settings['backend']}, default mode; conv-bn-relu with Inductor's freezing; "
        f"median ms per call (torch.utils.benchmark), best of {settings['rounds']} alternating rounds",
        "- ours: convert_batchnorm (CUDA tensors: torch operations; CPU: the operator); ours-op: the operator "
        "forced; ratio = torch compiled / this (> 1: faster than torch's compiled model)",
        f"- {info.get('timestamp_utc')}",
        "",
        "| model | input | torch ms | ours ms | ours-op ms | ours-eager ms | ours | ours-op | ours-eager | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, q = r["ms"], r["torch_over"]
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"| {r['model']} | {shape} {r['dtype']} {r['layout']} | {ms['torch']:.4f} | {ms['ours']:.4f} | "
                     f"{ms['ours-op']:.4f} | {ms['ours-eager']:.4f} | {q['ours']:.2f}x | {q['ours-op']:.2f}x | "
                     f"{q['ours-eager']:.2f}x | {r['max_abs_diff']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--shape", default=None, help="NxCxHxW (default: 32x64x56x56 on a GPU, 8x64x28x28 on CPU)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated fp32 / bf16 / fp16 (default: fp32 on CPU; fp32,bf16 on a GPU)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds per timing (default 0.1)")
    p.add_argument("--out", help="a folder for compile-eval.md / compile-eval.json")
    p.add_argument("--name", default="compile-eval", help="file name stem under --out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    gpu = device.type == "cuda"
    shape = [int(s) for s in (args.shape or ("32x64x56x56" if gpu else "8x64x28x28")).split("x")]
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = [names[d] for d in (args.dtypes or ("fp32,bf16" if gpu else "fp32")).split(",")]
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    settings = {"backend": args.backend, "rounds": args.rounds, "min_run_time": args.min_run_time, "shape": shape}
    info = machine_info(device)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    doc = {"machine": info, "settings": settings, "rows": rows, "device_slug": device_slug(device)}
    for dtype in dtypes:
        for kind in models:
            # (16-bit rows in channels_last, as mixed-precision convolutional models run)
            rows.append(measure_row(kind, shape, dtype, dtype != torch.float32, device, args.backend, args.rounds,
                                    args.min_run_time))
            text = markdown(rows, info, settings)
            if out is not None:  # (after every row: a run cut short keeps what it measured)
                (out / f"{args.name}.md").write_text(text)
                (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(markdown(rows, info, settings))
    return doc


if __name__ == "__main__":
    main()
