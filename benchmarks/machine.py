"""What machine produced a result: device, driver / CUDA / cuDNN / torch versions, CPU, threads,
and how bn_cuda was built. Also the device slug that names ``benchmarks/results/<device>/``."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["machine_info", "device_slug", "cpu_model", "provenance_lines", "OtherLoad"]

_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform), e.g. ``AMD EPYC``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_slug(device: torch.device) -> str:
    """Folder name for a device's results: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    model = re.sub(r"\s+\d+-core processor.*$", "", cpu_model(), flags=re.I)
    return f"cpu-{_slug(model)}-{torch.get_num_threads()}c"


def _run(cmd: list) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}, cwd=_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance_lines(info: Dict[str, Any]) -> list:
    """A markdown report's first bullets from :func:`machine_info`: device, torch and commit, then
    how bn_cuda was built."""
    return [f"- device: {info.get('device_name')}; torch {info.get('torch')}; commit {info.get('git_commit')}",
            f"- bn_cuda: {info.get('bn_cuda_build')}"]


def machine_info(device: torch.device) -> Dict[str, Any]:
    """Everything needed to tell two result files' machines apart (JSON-serialisable)."""
    info: Dict[str, Any] = {
        "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
    }
    if device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
        except RuntimeError as exc:  # a sticky CUDA error earlier in the run
            info["device_name"] = f"cuda (properties unavailable: {exc})"
            props = None
    if device.type == "cuda" and props is not None:
        info.update({
            "device_name": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                            f"--id={device.index or 0}"]),
        })
    else:
        info["device_name"] = f"{cpu_model()} ({torch.get_num_threads()} threads)"
    try:
        import bn_cuda
        info["bn_cuda_build"] = bn_cuda.build_info()
    except Exception as exc:  # noqa: BLE001  (recorded, not fatal here)
        info["bn_cuda_build"] = f"unavailable: {exc}"
    return info


class OtherLoad:
    """How busy *other* processes kept the CPUs while we ran: (busy CPU time of the whole machine
    from /proc/stat - this process's CPU time) / (wall time x CPUs). On a shared machine, CPU
    timings with every core in use are not trustworthy when this is more than a few percent:
    torch's OpenMP regions wait whole scheduler slices for a descheduled thread."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> Optional[tuple]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle, time.process_time(), time.monotonic()

    def fraction(self) -> Optional[float]:
        """Share of all CPUs that other processes used since construction (0..1), or None."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (end[0] - self._start[0]) / tick
        ours = end[1] - self._start[1]
        wall = end[2] - self._start[2]
        cpus = os.cpu_count() or 1
        return max(0.0, min(1.0, (busy - ours) / max(wall * cpus, 1e-9)))
