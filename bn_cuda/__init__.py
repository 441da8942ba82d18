"""bn_cuda: TensorFlow/Keras BatchNormalization for PyTorch on fused C++/CUDA kernels.

Operators live under ``torch.ops.bn_cuda``; the torch-style functional API is
:func:`bn_cuda.functional.batch_norm`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

__all__ = ["build_info", "get_include", "functional", "ops", "staged", "nn", "onnx", "BatchNormalization",
           "register_constraints"]

_HERE = Path(__file__).resolve().parent


def _read_meta() -> Dict[str, Any]:
    try:
        return json.loads((_HERE / "_build_meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _load_native():
    meta = _read_meta()
    built = meta.get("torch")
    if built is not None and built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"bn_cuda was built against torch {built} but torch {torch.__version__} is installed. "
            "Rebuild it against this torch: pip install --no-build-isolation --force-reinstall --no-deps ."
        )
    try:
        from . import _C  # noqa: F401  (registers torch.ops.bn_cuda.*)
    except ImportError as exc:  # undefined symbols, missing libraries, no build at all
        hint = (
            "bn_cuda's native module is missing; build it with "
            "'pip install --no-build-isolation -e .' from the source tree"
            if "No module named" in str(exc)
            else f"bn_cuda's native module failed to load (built for torch {built}, "
            f"CUDA {meta.get('cuda')}; running torch {torch.__version__}, CUDA {torch.version.cuda}). "
            "Rebuild it against the installed torch: pip install --no-build-isolation --force-reinstall --no-deps ."
        )
        raise ImportError(f"{hint}\n(original error: {exc})") from exc
    return _C


_C = _load_native()


def build_info() -> Dict[str, Any]:
    """How the native module was built.

    Returns
    -------
    dict
        ``version``, ``torch`` (the torch version it was built against), ``cuda`` (CUDA version or
        None), ``cuda_archs``, ``with_cuda`` (CUDA kernels compiled in), ``cpu_capability`` (the copy of
        the CPU kernels this process runs: ``avx512_bf16``, ``avx512``, ``avx2`` or ``default``;
        torch's choice, its ``avx512`` being ``avx512_bf16`` on CPUs with AVX512_BF16, unless
        ``BN_CUDA_CPU_CAPABILITY`` names one), ``compiler``,
        ``emulated_cuda`` (True only in the test build whose CPU ops run the CUDA kernels under a host
        emulation: scripts/emulate.sh).
    """
    return dict(_C.build_info())


def get_include() -> str:
    """Directory holding the public torch-free headers (``#include <bn_cuda/welford.h>``)."""
    src = _HERE.parent / "csrc" / "include"  # a source checkout: always the current headers
    if (src / "bn_cuda" / "welford.h").is_file():
        return str(src)
    return str(_HERE / "include")  # an installed package: the copy setup.py put there


def _load_triton_before_tensorflow() -> None:
    """Load torch._dynamo (and with it triton) now, unless tensorflow is loaded already.

    triton's native library crashes the process (a segmentation fault) when it loads after
    tensorflow's (torch 2.14 + tensorflow 2.21 here), and torch loads it for torch.compile and for
    an optimizer's first step. Loading it with bn_cuda lets a Keras port import tensorflow after
    bn_cuda and train. With tensorflow loaded first it is too late: bn_cuda then loads nothing and
    says so, instead of crashing the import."""
    import sys

    if "torch._dynamo" in sys.modules:
        return
    if "tensorflow" in sys.modules:
        import warnings

        warnings.warn(
            "bn_cuda was imported after tensorflow: triton, which torch loads for torch.compile and an "
            "optimizer's first step, may crash the process when it loads after tensorflow (their native "
            "libraries clash). Import bn_cuda (or torch._dynamo) before tensorflow.",
            RuntimeWarning, stacklevel=3)
        return
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # pragma: no cover - a torch build without dynamo: nothing to order
        pass


_load_triton_before_tensorflow()

from . import ops  # noqa: E402  (fake kernels + autograd)
from . import functional  # noqa: E402
from . import staged  # noqa: E402  (fake kernels of the staged ops)
from .layers import BatchNormalization, register_constraints  # noqa: E402,F401
from . import nn  # noqa: E402,F401  (bn_cuda.nn: BatchNorm1d/2d/3d, SyncBatchNorm, convert_batchnorm)
from . import onnx  # noqa: E402,F401  (ONNX export: bn_cuda.onnx.custom_translation_table)
