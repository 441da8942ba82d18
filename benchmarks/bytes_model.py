"""The bytes model: the fewest bytes each mode must move through memory.

Every activation-sized input is read once and every activation-sized output is written once:

============  ==========================  ======================
mode          traffic                      multiple of |x| bytes
============  ==========================  ======================
fwd-train     read x, write y              2
inference     read x, write y              2
backward      read x, read dy, write dx    3
fwd+bwd       the two above                5
============  ==========================  ======================

Per-feature vectors (weight, bias, running and saved statistics, their gradients) are left out:
they are O(C) against O(N*C*H*W) and below 0.1% of the traffic for every preset shape except the
tiny latency-bound ones (e.g. ``(256, 1000, 1, 1)``), where no kernel is bandwidth-bound anyway.
A kernel that reads x twice (a stats pass and a normalize pass, as most batch norms do once x
no longer fits in cache) can therefore reach at most ~67% (fwd) of the copy bandwidth; the
model is a floor on traffic, not a prediction.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

__all__ = ["ACTIVATION_PASSES", "BYTES_MODEL", "min_bytes", "gbps", "pct_of_copy"]

#: Activation-sized tensors each mode reads or writes at least once.
ACTIVATION_PASSES: Dict[str, int] = {"fwd-train": 2, "inference": 2, "backward": 3, "fwd+bwd": 5}

#: One-line statement of the model, stored in every result file.
BYTES_MODEL = ("activations only: fwd-train/inference = read x + write y (2|x|), backward = read x + "
               "read dy + write dx (3|x|), fwd+bwd = 5|x|; per-feature vectors excluded")


def min_bytes(shape: Sequence[int], dtype: torch.dtype, mode: str) -> int:
    """Minimum bytes ``mode`` must move for an input of ``shape`` and ``dtype``.

    Parameters
    ----------
    shape : sequence of int
        Input shape.
    dtype : torch.dtype
        Activation dtype (x, y, dy and dx share it).
    mode : str
        One of ``fwd-train``, ``backward``, ``fwd+bwd``, ``inference``.
    """
    if mode not in ACTIVATION_PASSES:
        raise ValueError(f"min_bytes: unknown mode {mode!r}; expected one of {sorted(ACTIVATION_PASSES)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return ACTIVATION_PASSES[mode] * math.prod(int(s) for s in shape) * itemsize


def gbps(nbytes: int, seconds: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def pct_of_copy(impl_seconds: float, copy_seconds: float) -> float:
    """Achieved share of the copy bandwidth, in percent: a copy moving the same bytes in
    ``copy_seconds`` against the implementation's ``impl_seconds``."""
    return 100.0 * copy_seconds / impl_seconds if impl_seconds > 0 else float("nan")
