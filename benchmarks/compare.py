"""Compare two benchmark result files (``bench.py``'s JSON) case by case: what changed between two
commits. ``python -m benchmarks.compare OLD.json NEW.json [--top N] [--out FILE.md]``, or
``python -m benchmarks.compare --against-latest benchmarks/results NEW.json`` for the newest
earlier run of the same preset (on the same GPU model where there is one).

Two measures per case present in both files:

- **bn_cuda time, old / new** (> 1: faster now). Meaningful only when both runs used the same
  device (``machine.device_name``); on different cards it is printed but flagged.
- **speedup against torch, new / old**: each run's bn_cuda time against torch's measured side by
  side in that run, so it can be compared across runs and, with care, across cards.

Cases are matched on (group, shape, layout, dtype, variant, mode); a case whose bn_cuda status is
not ``ok`` in either file is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

Key = Tuple[str, str, str, str, str, str]

__all__ = ["load", "compare", "format_report", "latest_under", "main"]


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise SystemExit(f"{path}: not a bench.py result file (no 'rows' list)")
    return data


def _key(row: dict) -> Key:
    return tuple(str(row.get(k, "")) for k in ("group", "shape", "layout", "dtype", "variant", "mode"))  # type: ignore


def _ok_ms(row: dict) -> Optional[float]:
    impl = row.get("impls", {}).get("bn_cuda") or {}
    ms = impl.get("ms")
    return float(ms) if impl.get("status") == "ok" and ms and ms > 0 else None


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def compare(old: dict, new: dict) -> dict:
    """Per-case ratios of two result dicts (see the module docstring)."""
    old_rows: Dict[Key, dict] = {}
    for r in old["rows"]:
        old_rows[_key(r)] = r
    cases: List[dict] = []
    for r in new["rows"]:
        o = old_rows.get(_key(r))
        if o is None:
            continue
        t_old, t_new = _ok_ms(o), _ok_ms(r)
        if t_old is None or t_new is None:
            continue
        s_old, s_new = o.get("speedup", {}).get("torch"), r.get("speedup", {}).get("torch")
        cases.append({
            "key": _key(r),
            "old_ms": t_old,
            "new_ms": t_new,
            "time_ratio": t_old / t_new,
            "vs_torch_old": s_old,
            "vs_torch_new": s_new,
            "vs_torch_ratio": (s_new / s_old) if s_old and s_new else None,
        })
    dev = [d.get("machine", {}).get("device_name") for d in (old, new)]
    return {"cases": cases, "same_device": dev[0] == dev[1], "devices": dev,
            "commits": [d.get("machine", {}).get("git_commit") for d in (old, new)]}


def format_report(result: dict, top: int = 15) -> str:
    cases = result["cases"]
    old_dev, new_dev = result["devices"]
    lines = [f"# bn_cuda: {result['commits'][0]} ({old_dev}) -> {result['commits'][1]} ({new_dev})", ""]
    if not cases:
        return "\n".join(lines + ["no case in both files"]) + "\n"
    if not result["same_device"]:
        lines += ["**Different devices: the time ratios compare cards, not commits; use the ratios against torch.**", ""]
    by_mode: Dict[str, List[dict]] = defaultdict(list)
    for c in cases:
        by_mode[c["key"][5]].append(c)
    lines += ["| mode | cases | bn_cuda time, old / new (geomean) | faster / slower by > 5% | "
              "vs torch, new / old (geomean) |", "|---|---|---|---|---|"]
    for mode in sorted(by_mode):
        cs = by_mode[mode]
        tr = [c["time_ratio"] for c in cs]
        vt = [c["vs_torch_ratio"] for c in cs if c["vs_torch_ratio"]]
        vs_torch = f"{_geomean(vt):.2f}x" if vt else "-"
        lines.append(f"| {mode} | {len(cs)} | {_geomean(tr):.2f}x | {sum(t > 1.05 for t in tr)} / "
                     f"{sum(t < 1 / 1.05 for t in tr)} | {vs_torch} |")

    def row(c: dict) -> str:
        g, shape, layout, dtype, variant, mode = c["key"]
        vs = (f"{c['vs_torch_old']:.2f}x -> {c['vs_torch_new']:.2f}x"
              if c["vs_torch_old"] and c["vs_torch_new"] else "-")
        return (f"| {shape} {layout} {dtype} {variant} | {mode} | {c['old_ms']:.4f} | {c['new_ms']:.4f} | "
                f"{c['time_ratio']:.2f}x | {vs} |")

    head = ["| case | mode | old ms | new ms | old / new | vs torch |", "|---|---|---|---|---|---|"]
    ranked = sorted(cases, key=lambda c: c["time_ratio"])
    lines += ["", f"Most improved ({min(top, len(cases))}):", ""] + head + [row(c) for c in ranked[::-1][:top]]
    lines += ["", f"Most regressed ({min(top, len(cases))}):", ""] + head + [row(c) for c in ranked[:top]]
    return "\n".join(lines) + "\n"


def _graphed(data: dict) -> bool:
    """Whether a run timed CUDA-graph replays (``--cuda-graphs``) rather than eager calls."""
    return any((r.get("impls", {}).get("bn_cuda") or {}).get("graphed") for r in data["rows"])


def latest_under(root: str, new: dict) -> Optional[str]:
    """The newest result file under ``root`` of the same preset, device type and timing (eager or
    CUDA graphs) as ``new``, preferring the same device name (GPU model); None if there is none."""
    import os

    want = new.get("machine", {})
    graphed = _graphed(new)
    best: Optional[Tuple[Tuple[bool, str], str]] = None
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".json"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            m = data.get("machine", {}) if isinstance(data, dict) else {}
            if not isinstance(data.get("rows"), list) or data.get("preset") != new.get("preset"):
                continue
            if _graphed(data) != graphed:
                continue
            if str(m.get("device", "")).split(":")[0] != str(want.get("device", "")).split(":")[0]:
                continue
            if m.get("timestamp_utc") == want.get("timestamp_utc"):
                continue  # (the new file itself)
            rank = (m.get("device_name") == want.get("device_name"), str(m.get("timestamp_utc", "")))
            if best is None or rank > best[0]:
                best = (rank, path)
    return best[1] if best else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", nargs="?", help="the earlier run's JSON (e.g. benchmarks/results/<device>/<date>/gpu-default.json)")
    ap.add_argument("new", help="the later run's JSON")
    ap.add_argument("--against-latest", metavar="DIR",
                    help="instead of OLD: the newest result under DIR of the same preset and device type "
                         "(the same GPU model first)")
    ap.add_argument("--top", type=int, default=15, help="cases listed as most improved / regressed")
    ap.add_argument("--out", help="also write the report (markdown) here")
    args = ap.parse_args(argv)
    new = load(args.new)
    old_path = args.old
    if args.against_latest:
        if old_path:
            ap.error("give OLD or --against-latest, not both")
        old_path = latest_under(args.against_latest, new)
        if old_path is None:
            print(f"no earlier {new.get('preset')} result under {args.against_latest}")
            return 0
        print(f"(earlier run: {old_path})")
    elif not old_path:
        ap.error("OLD is required without --against-latest")
    report = format_report(compare(load(old_path), new), top=args.top)
    sys.stdout.write(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
