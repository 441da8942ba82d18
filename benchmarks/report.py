"""Output: the terminal table, Markdown, CSV, JSON and the PNG chart."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .runner import BASELINES, IMPLS

__all__ = ["LOADED", "CSV_FIELDS", "table_rows", "markdown_table", "print_table", "summary_lines", "write_csv",
           "write_json", "write_chart", "flat_row"]

#: Rows measured while other processes used more than this share of the CPUs are marked with a dagger.
LOADED = 0.10

CSV_FIELDS: List[str] = (
    ["group", "shape", "layout", "dtype", "variant", "mode", "bytes", "copy_ms", "copy_gbs"]
    + [f"{i}_{k}" for i in IMPLS for k in ("ms", "iqr_ms", "runs", "gbs", "pct_copy", "status")]
    + ["torch_backend"] + [f"speedup_vs_{b}" for b in BASELINES]
    + ["check_ok", "check_max_err", "check_worst", "check_tol", "other_cpu_share", "case_wall_s", "notes"]
)
_SHORT = {"torch": "vs torch", "torch_nocudnn": "vs no-cuDNN", "torch_compile": "vs compile",
          "composite": "vs composite"}


def flat_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """One CSV line: the row with its per-implementation entries spread into columns."""
    out = {k: row.get(k) for k in CSV_FIELDS if k in row}
    for impl in IMPLS:
        e = row.get("impls", {}).get(impl, {})
        for k in ("ms", "iqr_ms", "runs", "gbs", "pct_copy", "status"):
            out[f"{impl}_{k}"] = e.get(k)
    for b in BASELINES:
        out[f"speedup_vs_{b}"] = row.get("speedup", {}).get(b)
    out["notes"] = "; ".join(row.get("notes", []))
    return out


def _f(v: Optional[float], fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _check_cell(row: Dict[str, Any]) -> str:
    if row.get("check_ok") is None:
        return "skip" if any(n.startswith("skipped") for n in row.get("notes", [])) else ""
    if row["check_ok"]:
        return "ok"
    return f"FAIL {row.get('check_worst') or ''} {_f(row.get('check_max_err'), '.1e')}".strip()


def table_rows(rows: Sequence[Dict[str, Any]]) -> tuple:
    """Header and string cells of the results table; columns empty in every row are dropped."""
    header = ["case", "mode", "bn_cuda ms", "GB/s", "% copy", "torch ms", "torch kernel"] \
        + [_SHORT[b] for b in BASELINES] + ["check"]
    body = []
    for r in rows:
        bn = r.get("impls", {}).get("bn_cuda", {})
        tr = r.get("impls", {}).get("torch", {})
        v = "" if r["variant"] == "plain" else f" {r['variant']}"
        dagger = " †" if (r.get("other_cpu_share") or 0) > LOADED else ""
        cells = [f"{r['shape']} {r['layout']} {r['dtype']}{v}{dagger}", r["mode"], _f(bn.get("ms"), ".3f"),
                 _f(bn.get("gbs"), ".1f"), _f(bn.get("pct_copy"), ".0f"), _f(tr.get("ms"), ".3f"),
                 r.get("torch_backend") or ""]
        cells += [_f(r.get("speedup", {}).get(b), ".2f") + ("x" if r.get("speedup", {}).get(b) else "")
                  for b in BASELINES]
        cells.append(_check_cell(r))
        body.append(cells)
    keep = [j for j in range(len(header)) if j < 2 or any(c[j] for c in body)]
    return [header[j] for j in keep], [[c[j] for j in keep] for c in body]


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The results table in Markdown (speedup = baseline time / bn_cuda time; > 1 means bn_cuda is faster)."""
    header, body = table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def _geomean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary_lines(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Geometric-mean speedups per mode and baseline, how often bn_cuda is slower, failures, skips."""
    lines = []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for b in BASELINES:
        parts = []
        for m in modes:
            s = [r["speedup"][b] for r in rows if r["mode"] == m and b in r.get("speedup", {})]
            if s:
                slower = sum(1 for v in s if v < 1.0)
                parts.append(f"{m} {_geomean(s):.2f}x ({slower}/{len(s)} slower)")
        if parts:
            lines.append(f"bn_cuda {_SHORT[b]} (geomean): " + ", ".join(parts))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "plain"]
    if len(variants) > 1:
        parts = []
        for v in variants:
            s = [r["speedup"]["composite"] for r in rows
                 if r["variant"] == v and r["mode"] == "fwd+bwd" and "composite" in r.get("speedup", {})]
            if s:
                parts.append(f"{v} {_geomean(s):.2f}x ({min(s):.2f}x worst)")
        if parts:
            lines.append("bn_cuda vs composite, fwd+bwd per variant (geomean): " + ", ".join(parts))
    # The variants' cost against plain batch norm through the same layer ("layer" rows), else
    # against the functional call ("plain" rows; that leaves the layer's own host time in the ratio).
    plain: Dict[Any, float] = {}
    for base in ("plain", "layer"):
        plain.update({(r["shape"], r["layout"], r["dtype"], r["mode"]): r["impls"]["bn_cuda"]["ms"] for r in rows
                      if r["variant"] == base and r.get("impls", {}).get("bn_cuda", {}).get("ms")})
    base_name = "the plain layer" if any(r["variant"] == "layer" for r in rows) else "plain bn_cuda"
    parts = []
    for v in (v for v in variants if v != "layer"):
        s = [r["impls"]["bn_cuda"]["ms"] / plain[k] for r in rows
             if r["variant"] == v and r["mode"] == "fwd+bwd" and r.get("impls", {}).get("bn_cuda", {}).get("ms")
             and (k := (r["shape"], r["layout"], r["dtype"], r["mode"])) in plain]
        if s:
            parts.append(f"{v} {_geomean(s):.2f}x ({max(s):.2f}x worst, {len(s)} shapes)")
    if parts:
        lines.append(f"bn_cuda cost of each variant relative to {base_name} on the same input, fwd+bwd "
                     "(geomean; 1.00x = free): " + ", ".join(parts))
    loaded = [r for r in rows if (r.get("other_cpu_share") or 0) > LOADED]
    if loaded:
        lines.append(f"† {len(loaded)} of {len(rows)} rows were measured while other processes used more than "
                     f"{LOADED:.0%} of the CPUs (column other_cpu_share): their times are inflated and unreliable")
    fails = [r for r in rows if r.get("check_ok") is False]
    if fails:
        seen = dict.fromkeys(f"{r['shape']} {r['layout']} {r['dtype']} {r['variant']}: {_check_cell(r)}"
                             for r in fails)
        lines.append(f"CORRECTNESS FAILURES ({len(seen)} cases): " + "; ".join(seen))
    skips = dict.fromkeys(n for r in rows for n in r.get("notes", []) if n.startswith("skipped"))
    for s in list(skips)[:6]:
        lines.append(f"note: {sum(1 for r in rows if s in r.get('notes', []))} rows {s}")
    remarks = dict.fromkeys(n for r in rows for n in r.get("notes", [])
                            if not n.startswith(("skipped", "torch.compile: first call")))
    for s in list(remarks)[:8]:
        lines.append(f"note: {s}")
    others = dict.fromkeys(
        f"{e['status']}" for r in rows for i, e in r.get("impls", {}).items()
        if e.get("status", "ok") != "ok" and not e["status"].startswith("same as"))
    for s in list(others)[:6]:
        lines.append(f"note: an implementation was not timed: {s}")
    return lines


def print_table(rows: Sequence[Dict[str, Any]], title: str, summary: Optional[Sequence[str]] = None) -> None:
    """Print the table to the terminal (rich when available, Markdown otherwise) and the summary
    (``summary`` or :func:`summary_lines` of ``rows``)."""
    header, body = table_rows(rows)
    try:
        import shutil

        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(rows))
    else:
        console = Console(width=max(shutil.get_terminal_size((200, 40)).columns, 160))
        table = Table(title=title, show_lines=False, header_style="bold")
        for j, h in enumerate(header):
            table.add_column(h, justify="left" if j < 2 or h in ("torch kernel", "check") else "right",
                             no_wrap=j == 0)
        for cells in body:
            styled = []
            for h, c in zip(header, cells):
                if h.startswith("vs ") and c:
                    c = f"[green]{c}[/]" if float(c[:-1]) >= 1.0 else f"[red]{c}[/]"
                elif h == "check" and c.startswith("FAIL"):
                    c = f"[bold white on red]{c}[/]"
                styled.append(c)
            table.add_row(*styled)
        console.print(table)
    for line in (summary if summary is not None else summary_lines(rows)):
        print(line)


def write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    """One line per (case, mode); columns :data:`CSV_FIELDS`."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(flat_row(r))


def write_json(doc: Dict[str, Any], path: Path) -> None:
    """The whole run: machine, settings, bytes model, rows (NaN written as null)."""
    def clean(o: Any) -> Any:
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    path.write_text(json.dumps(clean(doc), indent=1, default=str) + "\n")


def write_chart(rows: Sequence[Dict[str, Any]], path: Path, title: str) -> Optional[str]:
    """Two panels per case and mode: bn_cuda's speedup over the row's reference baseline (torch,
    or the composite path for ghost/renorm), and % of the measured copy bandwidth reached by
    bn_cuda and by that baseline. Returns None, or why no chart was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: matplotlib unavailable ({exc})"
    cases = list(dict.fromkeys(f"{r['shape']} {r['layout']} {r['dtype']}"
                               + ("" if r["variant"] == "plain" else f" {r['variant']}") for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    if not cases:
        return "no chart: no rows"
    colors = dict(zip(["fwd-train", "backward", "fwd+bwd", "inference"], ["C0", "C1", "C2", "C3"]))
    width = 0.8 / max(1, len(modes))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(min(40.0, max(10.0, 0.21 * len(cases) * max(1, len(modes)))), 9.5),
                                   sharex=True)
    for k, m in enumerate(modes):
        xs, sp, pb, pt = [], [], [], []
        for r in rows:
            if r["mode"] != m:
                continue
            label = f"{r['shape']} {r['layout']} {r['dtype']}" + ("" if r["variant"] == "plain" else f" {r['variant']}")
            base = "torch" if r["variant"] == "plain" else "composite"
            xs.append(cases.index(label) + (k - (len(modes) - 1) / 2) * width)
            sp.append(r.get("speedup", {}).get(base, float("nan")))
            pb.append(r.get("impls", {}).get("bn_cuda", {}).get("pct_copy") or float("nan"))
            pt.append(r.get("impls", {}).get(base, {}).get("pct_copy") or float("nan"))
        c = colors.get(m, f"C{k + 4}")
        ax1.bar(xs, sp, width, label=m, color=c)
        ax2.bar(xs, pb, width, label=f"bn_cuda {m}", color=c)
        ax2.scatter(xs, pt, marker="_", s=120, color="black", zorder=3,
                    label="baseline (torch / composite)" if k == 0 else None)
    ax1.axhline(1.0, color="black", lw=0.8)
    ax1.set_ylabel("speedup over torch (plain)\nor composite (ghost/renorm)")
    ax1.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax1.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if f"{v:.0e}"[0] in "25" else ""))
    ax1.legend(fontsize=8, ncol=len(modes))
    ax1.set_title(title, fontsize=10)
    tops = [v for p in ax2.patches for v in [p.get_height()] if v == v]
    if tops and max(tops) > 150:  # latency-bound tiny rows can exceed the copy; keep the rest readable
        ax2.set_ylim(0, 150)
        ax2.set_ylabel("% of measured copy bandwidth\n(activations only; clipped at 150%)")
    else:
        ax2.set_ylabel("% of measured copy bandwidth\n(bytes model: activations only)")
    ax2.legend(fontsize=7, ncol=min(5, len(modes) + 1))
    ax2.set_xticks(range(len(cases)))
    ax2.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
