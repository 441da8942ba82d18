"""The one place where time is measured.

CPU: :class:`torch.utils.benchmark.Timer` with ``blocked_autorange`` (its block-size estimate is
the warm-up; blocks run until ``min_run_time`` has passed), with every thread torch uses. The
implementations of one row (and the reference copy) are measured in ``rounds`` interleaved rounds
(the first is ``blocked_autorange``, later ones ``Timer.timeit`` blocks of the size it chose) so
that load arriving or leaving mid-row (other processes on a shared machine) hits all of them
alike; the median over all blocks of all rounds is reported. Inputs are rotated by the caller
(see :func:`rotation_count`) so the working set exceeds the last-level cache.

CUDA: CUDA events around each call, with the L2 cache flushed before every call by writing a
buffer twice the L2 size (``triton.testing.do_bench``'s method). The flush is enqueued before the
start event, so the host has the flush's duration to enqueue the call; what is left of the host
launch overhead is part of what eager users pay and is measured. The median over the calls is
reported.
"""

from __future__ import annotations

import glob
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch.utils.benchmark import Timer

__all__ = ["Timing", "TimingConfig", "measure", "llc_bytes", "rotation_count", "describe"]


@dataclass(frozen=True)
class Timing:
    """A measurement: median and interquartile range in seconds, over ``runs`` calls."""

    median_s: float
    iqr_s: float
    runs: int
    graphed: bool = False  # replayed from a CUDA graph (TimingConfig.cuda_graphs)
    note: str = ""


@dataclass(frozen=True)
class TimingConfig:
    """Knobs of :func:`measure`.

    ``min_run_time``: CPU seconds of measurement per call site (after the block estimates),
    split over ``rounds`` interleaved rounds.
    ``gpu_target_s``: GPU seconds of timed calls to aim for; the call count is clamped to
    ``[gpu_min_reps, gpu_max_reps]`` after ``warmup`` untimed calls.
    ``cuda_graphs``: CUDA only: capture each call once in a CUDA graph and time its replays, so
    the host's launch cost drops out and what is left is the device time of the kernels (an
    implementation whose call cannot be captured is timed eagerly, with a note).
    """

    min_run_time: float = 0.2
    rounds: int = 3
    gpu_target_s: float = 0.02
    gpu_min_reps: int = 10
    gpu_max_reps: int = 100
    warmup: int = 3
    cuda_graphs: bool = False


_flush_buffers: Dict[int, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _flush_buffers:
        l2 = int(getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or 50 * 2**20)
        _flush_buffers[idx] = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
    return _flush_buffers[idx]


def _quantiles(xs: List[float]) -> tuple:
    if len(xs) < 2:
        return xs[0], 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[2] - q[0]


def _graphed(fn: Callable[[], Any], device: torch.device, warmup: int) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph (warmed up on a side stream first); its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep = fn()  # outputs live in the graph's pool; kept with the graph
    torch.cuda.synchronize(device)

    def replay() -> Any:
        graph.replay()
        return keep
    return replay


def _measure_cuda(fn: Callable[[], Any], device: torch.device, cfg: TimingConfig) -> Timing:
    flush = _l2_flush_buffer(device)
    graphed, note = False, ""
    if cfg.cuda_graphs:
        # Two tries: on the H200 the first backward captured in a process failed for torch's and
        # bn_cuda's calls alike ("operation failed due to a previous error during capture") and
        # the same calls captured fine on the next case; a call that fails twice is not capturable.
        for _ in range(2):
            try:
                fn, graphed, note = _graphed(fn, device, cfg.warmup), True, ""
                break
            except Exception as exc:  # noqa: BLE001  (not capturable: timed eagerly, with a note)
                torch.cuda.synchronize(device)
                note = f"timed eagerly: CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]})"

    def timed(reps: int) -> List[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]

    for _ in range(cfg.warmup):
        fn()
    torch.cuda.synchronize(device)
    estimate = statistics.median(timed(3))
    reps = int(min(cfg.gpu_max_reps, max(cfg.gpu_min_reps, math.ceil(cfg.gpu_target_s / max(estimate, 1e-7)))))
    median, iqr = _quantiles(timed(reps))
    return Timing(median, iqr, reps, graphed, note)


def measure(fns: Dict[str, Callable[[], Any]], device: torch.device,
            cfg: Optional[TimingConfig] = None) -> Dict[str, Union[Timing, Exception]]:
    """Time each ``fn()`` of ``fns`` on ``device``: median seconds per call (module docstring).

    Returns the same keys, each mapped to a :class:`Timing` or to the exception its call raised.
    """
    cfg = cfg or TimingConfig()
    out: Dict[str, Union[Timing, Exception]] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            try:
                out[name] = _measure_cuda(fn, device, cfg)
            except Exception as exc:  # noqa: BLE001  (reported per implementation)
                out[name] = exc
        return out
    per_call: Dict[str, List[float]] = {n: [] for n in fns}
    runs: Dict[str, int] = {n: 0 for n in fns}
    timers = {n: Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for n, fn in fns.items()}
    number: Dict[str, int] = {}
    rounds = max(1, cfg.rounds)
    per_round = cfg.min_run_time / rounds
    for r in range(rounds):
        for name, timer in timers.items():
            if name in out:
                continue
            try:
                if r == 0:  # the block-size estimate (and warm-up) happens once per call site
                    m = timer.blocked_autorange(min_run_time=per_round)
                    number[name] = m.number_per_run
                    blocks = [m]
                else:
                    blocks, spent = [], 0.0
                    while spent < per_round:
                        blocks.append(timer.timeit(number[name]))
                        spent += blocks[-1].raw_times[0]
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
                continue
            for m in blocks:  # each raw time is one block of `number_per_run` calls; `times` are per call
                per_call[name] += list(m.times)
                runs[name] += m.number_per_run * len(m.raw_times)
    for name in fns:
        if name not in out:
            median, iqr = _quantiles(per_call[name])
            out[name] = Timing(median, iqr, runs[name])
    return out


def llc_bytes(default: int = 32 * 2**20) -> int:
    """Size of the CPU's last-level cache (sysfs), or ``default`` where unknown."""
    best_level, best = -1, 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            level = int(open(f"{d}/level").read())
            text = open(f"{d}/size").read().strip().upper()
        except (OSError, ValueError):
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            size = int(text.rstrip("KMG")) * mult
        except ValueError:
            continue
        if level > best_level or (level == best_level and size > best):
            best_level, best = level, size
    return best or default


def rotation_count(set_bytes: int, device: torch.device, cap: int = 32) -> int:
    """How many copies of a case's inputs to cycle through so they are not cache-resident.

    CUDA: 1 (the L2 is flushed before each call instead). CPU: enough copies that together they
    are twice the last-level cache, at most ``cap``.
    """
    if device.type == "cuda" or set_bytes <= 0:
        return 1
    return int(max(1, min(cap, math.ceil(2 * llc_bytes() / set_bytes))))


def describe(device: torch.device, cfg: TimingConfig) -> str:
    """The timing method in one sentence, stored in the result files."""
    if device.type == "cuda":
        how = ("each call captured once in a CUDA graph and its replays timed (device time, host launch cost "
               "excluded; calls that cannot be captured are timed eagerly and noted)" if cfg.cuda_graphs
               else "eager calls")
        return (f"CUDA events per call, {how}, L2 flushed (write of 2x L2) before each call; {cfg.warmup} warm-up "
                f"calls, then {cfg.gpu_min_reps}-{cfg.gpu_max_reps} timed calls (~{cfg.gpu_target_s * 1e3:.0f} ms); "
                "median")
    return (f"torch.utils.benchmark.Timer.blocked_autorange with {torch.get_num_threads()} threads, "
            f"{cfg.rounds} interleaved rounds of min_run_time={cfg.min_run_time / max(1, cfg.rounds):.3g} s per "
            f"implementation and row; inputs rotated to exceed 2x LLC ({llc_bytes() // 2**20} MiB); median "
            "over all blocks")
