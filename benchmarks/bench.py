"""bn_cuda's benchmark: ``python -m benchmarks.bench [--quick | --preset NAME | --shape NxCxHxW ...]``.

Checks and times ``bn_cuda`` against ``torch.nn.functional.batch_norm`` (cuDNN or native, as torch
picks), torch with cuDNN disabled, ``torch.compile`` and, for ghost batches / renorm, the Keras
layer's composite path; prints a table and writes JSON, CSV, Markdown and a PNG chart. Exits 1
when bn_cuda failed a correctness check (after writing everything). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import presets as P
from .bytes_model import BYTES_MODEL
from .machine import OtherLoad, device_slug, machine_info
from .report import LOADED, markdown_table, print_table, summary_lines, write_chart, write_csv, write_json
from .runner import PARAMS, TOLERANCE, RunEnv, run_case, skipped_rows
from .timing import TimingConfig, describe

__all__ = ["BenchConfig", "run", "main", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class BenchConfig:
    """Everything a run needs; the CLI fills it from its flags.

    ``preset`` None picks ``gpu-default`` on CUDA and ``quick`` on CPU; ``shapes`` non-empty
    replaces the preset with those shapes. ``dtypes``/``layouts``/``variants``/``modes``/
    ``compile`` override every group of the preset when not None. ``min_run_time`` and
    ``time_budget`` override the preset's; ``rounds`` the timer's (CPU interleaved rounds, 3). ``out`` is where files go (a new temporary folder when
    None); ``save`` also writes them to ``benchmarks/results/<device>/``.
    """

    preset: Optional[str] = None
    shapes: Sequence[tuple] = ()
    dtypes: Optional[Sequence[str]] = None
    layouts: Optional[Sequence[str]] = None
    variants: Optional[Sequence[str]] = None
    modes: Optional[Sequence[str]] = None
    compile: Optional[bool] = None
    device: str = "auto"
    min_run_time: Optional[float] = None
    rounds: Optional[int] = None
    cuda_graphs: bool = False
    params: str = "fp32"
    time_budget: Optional[float] = None
    out: Optional[str] = None
    save: bool = False
    chart: bool = True
    progress: bool = True
    seed: int = 0
    name: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {spec}: no CUDA device is visible (torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda})")
    return dev


class _Progress:
    """tqdm bar on a terminal; one line per case otherwise (logs of the GPU check)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        self.total, self.done = total, 0
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="mode", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def case(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _select(cfg: BenchConfig, device: torch.device) -> P.Preset:
    if cfg.shapes:
        return P.custom_preset(cfg.shapes)
    name = cfg.preset or ("gpu-default" if device.type == "cuda" else "quick")
    if name not in P.PRESETS:
        raise SystemExit(f"--preset {name!r}: unknown; choose one of {', '.join(P.PRESETS)}")
    return P.PRESETS[name]


def run(cfg: BenchConfig) -> Dict[str, Any]:
    """Run a benchmark and write its files.

    Returns
    -------
    dict
        The JSON document (``machine``, ``settings``, ``rows``, ``summary``) plus ``files`` (the
        paths written) and ``failed`` (True when bn_cuda failed a correctness check).
    """
    t_start = time.perf_counter()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    other_load = OtherLoad()
    device = _device(cfg.device)
    slug = device_slug(device)
    preset = _select(cfg, device)
    cases = P.expand(preset, dtypes=cfg.dtypes, layouts=cfg.layouts, variants=cfg.variants,
                     modes=cfg.modes, compile=cfg.compile)
    tcfg = TimingConfig(min_run_time=cfg.min_run_time if cfg.min_run_time is not None else preset.min_run_time,
                        rounds=cfg.rounds or TimingConfig.rounds, cuda_graphs=cfg.cuda_graphs)
    budget = cfg.time_budget if cfg.time_budget is not None else preset.time_budget
    progress = _Progress(sum(len(c.modes) for c in cases), cfg.progress)
    env = RunEnv(device=device, timing=tcfg, seed=cfg.seed, on_mode_done=progress.step, params=cfg.params)
    import bn_cuda  # noqa: F401  (fails loudly, with bn_cuda's own actionable message)

    per_case: List[List[Dict[str, Any]]] = []
    for case in cases:
        if budget and time.perf_counter() - t_start > budget:
            per_case.append(skipped_rows(case, env, f"time budget of {budget:.0f} s used up"))
            progress.step(len(case.modes))
            continue
        progress.case(case.label)
        done_before = progress.done
        per_case.append(_run_one(case, env, device))
        progress.step(len(case.modes) - (progress.done - done_before))
    # On a shared CPU, cases measured while other processes were busy are measured again with
    # what is left of the budget; the quieter measurement is kept.
    remeasured = 0
    if device.type == "cpu":
        env.on_mode_done = lambda: None
        loaded = sorted((i for i, rs in enumerate(per_case) if rs and (rs[0].get("other_cpu_share") or 0) > LOADED),
                        key=lambda i: -per_case[i][0]["other_cpu_share"])
        for i in loaded:
            if budget and time.perf_counter() - t_start > budget:
                break
            progress.case(f"again (was loaded): {cases[i].label}")
            remeasured += 1
            again = _run_one(cases[i], env, device)
            if again and (again[0].get("other_cpu_share") or 0) < per_case[i][0]["other_cpu_share"]:
                per_case[i] = again
    rows: List[Dict[str, Any]] = [r for rs in per_case for r in rs]
    progress.close()
    wall = time.perf_counter() - t_start
    others = other_load.fraction()

    label = cfg.name or preset.name
    machine = machine_info(device)
    machine["device_slug"] = slug
    doc: Dict[str, Any] = {
        "preset": preset.name, "description": preset.description, "machine": machine,
        "settings": {
            "timing": describe(device, tcfg), "bytes_model": BYTES_MODEL, "tolerance": TOLERANCE,
            "params": PARAMS[cfg.params],
            "check": "max|impl - reference| / max|reference| over y, dx, d(weight), d(bias), running "
                     "state after one step, inference y; reference = torch F.batch_norm (plain) or the "
                     "Keras layer with fused=False (ghost/renorm)",
            "speedup": "baseline median time / bn_cuda median time (> 1: bn_cuda faster)",
            "pct_copy": "100 * copy time / implementation time, the copy moving the same bytes in the same run",
            "time_budget_s": budget, "seed": cfg.seed, "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "other_processes_cpu_share": None if others is None else round(others, 3),
            "cases_measured_again": remeasured, **cfg.extra,
        },
        "wall_time_s": round(wall, 1), "rows": rows, "summary": summary_lines(rows),
    }
    if device.type == "cpu" and others is not None and others > 0.05:
        still = sum(1 for r in rows if (r.get("other_cpu_share") or 0) > LOADED)
        doc["summary"].insert(0, (
            f"WARNING: other processes kept {others:.0%} of the {os.cpu_count()} CPUs busy during this run; "
            f"{remeasured} loaded cases were measured again, {still} rows are still marked † (unreliable)")
            if still else (
            f"note: other processes kept {others:.0%} of the {os.cpu_count()} CPUs busy during this run; "
            f"the {remeasured} cases measured under load were measured again, and every row kept was "
            f"measured with other processes below {LOADED:.0%} (other_cpu_share)"))
    failed = any(r.get("check_ok") is False for r in rows)
    doc["failed"] = failed

    out = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="bn_cuda_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    title = (f"bn_cuda {label} on {doc['machine']['device_name']} (torch {torch.__version__}); "
             f"speedup = baseline / bn_cuda")
    files = _write(doc, rows, out, label, title, cfg.chart)
    if cfg.save:
        dest = RESULTS_DIR / slug
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / Path(f).name)
        files += [str(dest / Path(f).name) for f in files]
    doc["files"] = files
    doc["table_title"] = title
    return doc


def _run_one(case: P.Case, env: RunEnv, device: torch.device) -> List[Dict[str, Any]]:
    """Rows of one case; never raises. Records the case's wall time and other processes' CPU share."""
    t0 = time.perf_counter()
    load = OtherLoad()
    try:
        case_rows = run_case(case, env)
    except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
        case_rows = skipped_rows(case, env, f"out of memory ({str(exc).splitlines()[0][:120]})")
    except Exception as exc:  # noqa: BLE001  (e.g. a sticky CUDA error): counted as a failure
        case_rows = skipped_rows(case, env, f"case crashed ({type(exc).__name__}: {str(exc)[:160]})")
        for r in case_rows:
            r["check_ok"] = False
    share = load.fraction() if device.type == "cpu" else None
    for r in case_rows:
        r["case_wall_s"] = round(time.perf_counter() - t0, 2)
        r["other_cpu_share"] = None if share is None else round(share, 3)
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass
    return case_rows


def _write(doc: Dict[str, Any], rows: List[Dict[str, Any]], out: Path, label: str, title: str,
           chart: bool) -> List[str]:
    files = []
    write_json(doc, out / f"{label}.json")
    write_csv(rows, out / f"{label}.csv")
    m = doc["machine"]
    md = [f"# bn_cuda benchmark: {label}", "",
          f"- device: {m['device_name']}; torch {m['torch']} (CUDA {m['torch_cuda']}, cuDNN {m['cudnn']}); "
          f"driver {m.get('driver') or 'n/a'}; CPU {m['cpu_model']} x {m['torch_threads']} threads",
          f"- bn_cuda: {m['bn_cuda_build']}; commit {m['git_commit']}",
          f"- timing: {doc['settings']['timing']}", f"- bytes model: {BYTES_MODEL}",
          f"- weight, bias and running statistics (plain rows): {doc['settings']['params']}",
          f"- wall time: {doc['wall_time_s']} s; {m['timestamp_utc']}; load average at start "
          f"{doc['settings'].get('load_avg_at_start')}; other processes' CPU share during the run "
          f"{doc['settings'].get('other_processes_cpu_share')}",
          "- speedup = baseline time / bn_cuda time (> 1: bn_cuda faster); % copy = share of a same-size "
          "copy's bandwidth", "", markdown_table(rows), ""] + [f"- {s}" for s in doc["summary"]]
    (out / f"{label}.md").write_text("\n".join(md) + "\n")
    files += [str(out / f"{label}.{e}") for e in ("json", "csv", "md")]
    if chart:
        why = write_chart(rows, out / f"{label}.png", title)
        if why is None:
            files.append(str(out / f"{label}.png"))
        else:
            doc["summary"].append(why)
    return files


def _csv_list(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected a comma-separated subset of {', '.join(allowed)}")
    return items


def _shape_arg(text: str) -> tuple:
    try:
        return P.parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets:\n" + "\n".join(f"  {n:15s} {pr.description}" for n, pr in P.PRESETS.items()))
    p.add_argument("--preset", choices=list(P.PRESETS), help="shape set (default: gpu-default on CUDA, quick on CPU)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--shape", action="append", default=[], type=_shape_arg, metavar="NxCxHxW",
                   help="custom shape (repeatable); replaces the preset")
    p.add_argument("--dtype", type=lambda s: _csv_list(s, list(P.DTYPES), "--dtype"), help="e.g. fp32,bf16")
    p.add_argument("--layout", type=lambda s: _csv_list(s, list(P.LAYOUTS), "--layout"), help="nchw,nhwc")
    p.add_argument("--variant", type=lambda s: _csv_list(s, list(P.VARIANTS), "--variant"), help=",".join(P.VARIANTS))
    p.add_argument("--mode", type=lambda s: _csv_list(s, list(P.MODES), "--mode"),
                   help="fwd-train,backward,fwd+bwd,inference")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="add the torch.compile baseline to every plain case")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="no torch.compile baseline")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--min-run-time", type=float, help="CPU seconds per measurement (preset's by default)")
    p.add_argument("--rounds", type=int, help="CPU: interleaved timing rounds per row (default 3)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: time replays of each call captured in a CUDA graph (kernel time without the host's "
                        "launch cost)")
    p.add_argument("--params", choices=list(PARAMS), default="fp32",
                   help="dtype of the plain rows' weight, bias and running statistics: fp32 (default; what autocast "
                        "and cuDNN's fp16 path use) or the input's (a model converted with .half() / .bfloat16())")
    p.add_argument("--time-budget", type=float, help="stop starting cases after this many seconds; 0: none")
    p.add_argument("--out", help="folder for the result files (default: a new temporary folder)")
    p.add_argument("--save", action="store_true", help="also write them to benchmarks/results/<device>/")
    p.add_argument("--name", help="file stem (default: the preset name)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / per-case lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (1 when bn_cuda failed a correctness check)."""
    args = _parser().parse_args(argv)
    if args.list_presets:
        for n, pr in P.PRESETS.items():
            n_cases = len(P.expand(pr))
            print(f"{n:15s} {n_cases:4d} cases  {pr.description}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        preset="quick" if args.quick else args.preset, shapes=args.shape, dtypes=args.dtype,
        layouts=args.layout, variants=args.variant, modes=args.mode, compile=args.compile,
        device=args.device, min_run_time=args.min_run_time, rounds=args.rounds, cuda_graphs=args.cuda_graphs,
        params=args.params,
        time_budget=args.time_budget, out=args.out,
        save=args.save, chart=not args.no_chart, progress=not args.no_progress, seed=args.seed, name=args.name,
        extra={"argv": list(argv) if argv is not None else sys.argv[1:]},
    )
    doc = run(cfg)
    print_table(doc["rows"], doc["table_title"], doc["summary"])
    print(f"wall time {doc['wall_time_s']} s; files:")
    for f in doc["files"]:
        print(f"  {f}")
    if doc["failed"]:
        print("FAILED: bn_cuda did not match the reference in at least one case (see the check column)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
