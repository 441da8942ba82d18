"""Shape presets, selectable by name, and the expansion of a preset into benchmark cases.

A preset is an ordered list of :class:`ShapeGroup` s; each group is a set of shapes crossed with
dtypes, layouts and variants. Order is priority: when a run's time budget runs out, the cases
at the end are the ones skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "MODES", "VARIANTS", "DTYPES", "LAYOUTS", "ShapeGroup", "Case", "Preset", "PRESETS",
    "parse_shape", "expand", "custom_preset", "layout_label",
]

Shape = Tuple[int, ...]

MODES: Tuple[str, ...] = ("fwd-train", "backward", "fwd+bwd", "inference")
#: Keras-layer variants: "layer" (bn_cuda.BatchNormalization with no option: plain batch norm
#: through the layer, the baseline of the variants' cost), "ghost" (virtual_batch_size), "renorm"
#: (with clipping), "ghost-renorm" (both), "adjust" (an adjustment callable); each timed against
#: the layer's composite path (fused=False).
VARIANTS: Tuple[str, ...] = ("plain", "layer", "ghost", "renorm", "ghost-renorm", "adjust")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: "nchw": contiguous; "nhwc": torch.channels_last / channels_last_3d (a memory format of the
#: same NC... shape). Only 4-D and 5-D inputs have a channels-last form.
LAYOUTS: Tuple[str, ...] = ("nchw", "nhwc")


@dataclass(frozen=True)
class ShapeGroup:
    """Shapes crossed with dtypes, layouts and variants.

    ``compile`` adds the ``torch.compile`` baseline; ``compile_shapes`` / ``compile_dtypes`` /
    ``compile_layouts`` restrict it to a subset (each compiled case costs seconds of compilation;
    tens of seconds on a small CPU).
    """

    name: str
    shapes: Tuple[Shape, ...]
    dtypes: Tuple[str, ...] = ("fp32",)
    layouts: Tuple[str, ...] = LAYOUTS
    variants: Tuple[str, ...] = ("plain",)
    modes: Tuple[str, ...] = MODES
    compile: bool = False
    compile_shapes: Optional[Tuple[Shape, ...]] = None
    compile_dtypes: Optional[Tuple[str, ...]] = None
    compile_layouts: Optional[Tuple[str, ...]] = None


@dataclass(frozen=True)
class Case:
    """One (shape, layout, dtype, variant); timed in each of ``modes``."""

    group: str
    shape: Shape
    layout: str
    dtype: str
    variant: str
    modes: Tuple[str, ...]
    compile: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def layout_label(self) -> str:
        return layout_label(self.layout, len(self.shape))

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def label(self) -> str:
        v = "" if self.variant == "plain" else f" {self.variant}"
        return f"{self.shape_str} {self.layout_label} {self.dtype}{v}"


@dataclass(frozen=True)
class Preset:
    """A named benchmark set.

    ``min_run_time`` is the CPU timer's measuring time per measurement (seconds);
    ``time_budget`` stops starting new cases after that many seconds (0: no limit).
    """

    name: str
    description: str
    groups: Tuple[ShapeGroup, ...]
    min_run_time: float = 0.2
    time_budget: float = 0.0


def layout_label(layout: str, ndim: int) -> str:
    """Display name of a layout for an input of rank ``ndim`` (NCHW / NHWC / NCDHW / NDHWC / NC...)."""
    if ndim == 4:
        return "NCHW" if layout == "nchw" else "NHWC"
    if ndim == 5:
        return "NCDHW" if layout == "nchw" else "NDHWC"
    return {2: "NC", 3: "NCL"}.get(ndim, f"{ndim}D")


_RESNET50_LAYERS = ((64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 14),
                    (1024, 14), (512, 7), (2048, 7))


def _resnet50(n: int) -> Tuple[Shape, ...]:
    return tuple((n, c, hw, hw) for c, hw in _RESNET50_LAYERS)


RESNET50_B32 = _resnet50(32)
RESNET50_B256 = _resnet50(256)
SMALL_BATCH: Tuple[Shape, ...] = ((2, 64, 112, 112), (8, 128, 56, 56))
UNET3D: Tuple[Shape, ...] = ((2, 32, 128, 128, 128), (2, 64, 64, 64, 64), (2, 128, 32, 32, 32),
                             (2, 256, 16, 16, 16), (2, 320, 8, 8, 8), (2, 320, 4, 4, 4))
MLP: Tuple[Shape, ...] = ((4096, 1024), (65536, 1024), (32 * 512, 1024))
#: Odd channel counts (3, 17, 1000) and spatial sizes 1 and 49 (7x7).
ODD: Tuple[Shape, ...] = ((32, 3, 224, 224), (32, 17, 56, 56), (64, 17, 7, 7), (32, 1000, 7, 7),
                          (256, 1000, 1, 1))
_REPR = ((32, 64, 56, 56), (32, 256, 14, 14), (32, 2048, 7, 7))  # one early, one mid, one late layer
_ALL3 = ("fp32", "fp16", "bf16")
_KERAS = ("layer", "ghost", "renorm", "ghost-renorm", "adjust")
#: The example of issue 4: batch 256, virtual_batch_size 32, 28x28x64 channels-last.
KERAS_CPU: Tuple[Shape, ...] = ((256, 64, 28, 28),)
_TRAIN = ("fwd-train", "backward", "fwd+bwd")

PRESETS: Dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


_add(Preset(
    "quick",
    "CPU-sized shapes, fp32, both layouts, every mode, odd channel counts (3, 17, 1000; spatial 1 "
    "and 49), 3-D and 2-D inputs, ghost/renorm on one shape, torch.compile on one: the preset "
    "./scripts/bench.sh runs on a CPU (under 3 minutes on 2 cores)",
    (
        # one torch.compile baseline (about 45 s of compilation on 2 cores)
        ShapeGroup("resnet50-like-b8", ((8, 64, 56, 56), (8, 256, 14, 14)), compile=True,
                   compile_shapes=((8, 256, 14, 14),), compile_layouts=("nchw",)),
        ShapeGroup("odd", ((16, 3, 64, 64), (8, 17, 28, 28), (8, 1000, 7, 7), (64, 1000, 1, 1))),
        ShapeGroup("short-rows", ((32, 512, 3, 3),)),  # a late stage's 3x3 maps: rows shorter than a vector
        ShapeGroup("unet3d-small", ((2, 32, 16, 16, 16),)),
        ShapeGroup("mlp", ((1024, 1024),)),
        ShapeGroup("keras-variants", ((8, 64, 28, 28),), layouts=("nchw",), variants=("plain",) + _KERAS,
                   modes=_TRAIN),
    ),
    min_run_time=0.06, time_budget=150.0,
))
_add(Preset(
    "gpu-default",
    "The GPU check's set (under 5 minutes on an H100): ResNet-50 at batch 32 in fp32/fp16/bf16 "
    "(torch.compile on three layers), ghost/renorm, ResNet-50 at batch 256, small batch, odd "
    "channels, MLP and 3D U-Net",
    (
        ShapeGroup("resnet50-b32", _REPR, dtypes=("bf16", "fp16"), compile=True),
        ShapeGroup("resnet50-b32", tuple(s for s in RESNET50_B32 if s not in _REPR), dtypes=("bf16", "fp16")),
        ShapeGroup("resnet50-b32", RESNET50_B32, dtypes=("fp32",)),
        ShapeGroup("keras-variants", _REPR, dtypes=("fp32", "bf16"), variants=("layer", "ghost", "renorm"),
                   modes=_TRAIN),
        ShapeGroup("keras-variants", _REPR, dtypes=("fp32", "bf16"), layouts=("nhwc",),
                   variants=("ghost-renorm", "adjust"), modes=_TRAIN),
        ShapeGroup("resnet50-b256", RESNET50_B256, dtypes=("bf16", "fp16")),
        ShapeGroup("small-batch", SMALL_BATCH, dtypes=_ALL3),
        ShapeGroup("odd", ODD, dtypes=("fp32", "fp16")),
        ShapeGroup("mlp", MLP, dtypes=_ALL3),
        ShapeGroup("unet3d", UNET3D, dtypes=("bf16", "fp16")),
    ),
    min_run_time=0.05, time_budget=240.0,
))
for _name, _shapes, _desc in (
    ("resnet50-b32", RESNET50_B32, "ResNet-50's ten batch-norm shapes at batch 32"),
    ("resnet50-b256", RESNET50_B256, "ResNet-50's ten batch-norm shapes at batch 256"),
    ("small-batch", SMALL_BATCH, "small batches: 2x64x112x112, 8x128x56x56"),
    ("unet3d", UNET3D, "3D U-Net: 2x32x128^3 down to 2x320x4^3"),
    ("mlp", MLP, "2-D (N, C) inputs: (4096, 1024), (65536, 1024), (16384, 1024)"),
    ("odd", ODD, "odd channel counts (3, 17, 1000) and spatial sizes 1 and 49"),
):
    _add(Preset(_name, _desc + "; fp32/fp16/bf16, both layouts, torch.compile baseline",
                (ShapeGroup(_name, _shapes, dtypes=_ALL3, compile=True),)))
_add(Preset(
    "keras-variants",
    "ghost batches, batch renorm, both, adjustment on ResNet-50 batch-32 layers, against the composite path",
    (ShapeGroup("keras-variants", RESNET50_B32, dtypes=_ALL3, variants=_KERAS, modes=_TRAIN),),
))
_add(Preset(
    "keras-cpu", "the Keras variants at batch 256 (virtual_batch_size 32), 64x28x28 channels-last fp32, "
    "fused against fused=False and against plain bn_cuda on the same input: the CPU comparison of the "
    "fused-variants issue (about 80 s on 2 cores)",
    (ShapeGroup("keras-cpu", KERAS_CPU, layouts=("nhwc",), variants=("plain",) + _KERAS, modes=_TRAIN),),
    min_run_time=0.2,
))
_add(Preset(
    "all", "every named group (long; a GPU is advised)",
    tuple(g for n in ("resnet50-b32", "resnet50-b256", "small-batch", "unet3d", "mlp", "odd", "keras-variants")
          for g in PRESETS[n].groups),
))


def parse_shape(text: str) -> Shape:
    """``"32x64x56x56"`` (or ``32,64,56,56``) -> ``(32, 64, 56, 56)``; at least 2 dims, all >= 1."""
    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shape {text!r}: expected integers separated by 'x', e.g. 32x64x56x56") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape {text!r}: need at least 2 dimensions (N, C, ...), each >= 1; got {shape}")
    return shape


def custom_preset(shapes: Sequence[Shape], *, compile: bool = False) -> Preset:
    """A preset from command-line shapes (fp32, both layouts, plain, every mode unless overridden)."""
    return Preset("custom", "shapes from the command line",
                  (ShapeGroup("custom", tuple(shapes), compile=compile),))


def expand(preset: Preset, *, dtypes: Optional[Sequence[str]] = None, layouts: Optional[Sequence[str]] = None,
           variants: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
           compile: Optional[bool] = None) -> List[Case]:
    """The cases of ``preset``, in priority order; each non-None argument overrides every group's.

    Variants other than ``plain`` only change training, so they are never timed in
    ``inference`` mode (identical to plain inference). Channels-last exists only for 4-D/5-D.
    """
    cases: List[Case] = []
    seen = set()
    for g in preset.groups:
        g_modes = tuple(modes) if modes is not None else g.modes
        for variant in (variants if variants is not None else g.variants):
            v_modes = tuple(m for m in g_modes if variant == "plain" or m != "inference")
            if not v_modes:
                continue
            for dtype in (dtypes if dtypes is not None else g.dtypes):
                for layout in (layouts if layouts is not None else g.layouts):
                    for shape in g.shapes:
                        if layout == "nhwc" and len(shape) not in (4, 5):
                            continue
                        key = (shape, layout, dtype, variant)
                        if key in seen:
                            continue
                        seen.add(key)
                        want_compile = g.compile and (g.compile_shapes is None or shape in g.compile_shapes) \
                            and (g.compile_dtypes is None or dtype in g.compile_dtypes) \
                            and (g.compile_layouts is None or layout in g.compile_layouts)
                        if compile is not None:
                            want_compile = compile and (variant == "plain")
                        cases.append(Case(g.name, tuple(shape), layout, dtype, variant, v_modes,
                                          bool(want_compile and variant == "plain")))
    return cases
