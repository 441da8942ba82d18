"""Argument checks of :class:`bn_cuda.BatchNormalization`, worded as Keras 3 / tf_keras word them
(with the value received)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

Axis = Union[int, Sequence[int]]

_CLIPPING_KEYS = ["rmax", "rmin", "dmax"]


# Keras dtype policies: name -> (compute dtype, variable dtype). As in tf_keras, 16-bit policies
# keep float32 variables (BatchNormalization raises them to float32 even without "mixed_").
DTYPE_POLICIES = {
    "float16": ("float16", "float32"), "bfloat16": ("bfloat16", "float32"), "float32": ("float32", "float32"),
    "float64": ("float64", "float64"), "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}


def check_dtype(dtype: Any) -> Optional[str]:
    """A Keras ``dtype`` argument as a policy name (None: none given). Takes a policy or dtype name,
    a torch / numpy / TensorFlow dtype, a Keras ``Policy`` or its serialized config dict."""
    if dtype is None:
        return None
    name = None
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, Mapping):  # Keras's serialized Policy: {"class_name": "Policy", "config": {"name": ...}}
        config = dtype.get("config")
        name = config.get("name") if isinstance(config, Mapping) else None
    elif isinstance(getattr(dtype, "name", None), str):  # tf.DType, np.dtype, keras Policy
        name = dtype.name
    elif isinstance(dtype, type) and isinstance(getattr(dtype, "__name__", None), str):  # np.float64
        name = dtype.__name__
    else:
        name = str(dtype).replace("torch.", "") if str(dtype).startswith("torch.") else None
    if name not in DTYPE_POLICIES:
        raise ValueError("`dtype` must be None, a floating dtype or a Keras dtype policy ("
                         f"{', '.join(repr(n) for n in DTYPE_POLICIES)}). Received: dtype={dtype!r}")
    return name


def input_shape_arg(input_shape: Any, batch_input_shape: Any, batch_size: Any, input_dim: Any) -> Optional[list]:
    """The full input shape given by Keras's base-layer arguments (None: none given)."""
    def dims(name: str, value: Any) -> list:
        items = [value] if name in ("batch_size", "input_dim") else value
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise TypeError(f"`{name}` must be a tuple of ints or None. Received: {name}={value!r}")
        items = list(items)
        if not all(d is None or (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0)
                   for d in items):
            raise TypeError(f"`{name}` must hold non-negative ints or None. Received: {name}={value!r}")
        return [None if d is None else int(d) for d in items]

    batch = None if batch_size is None else dims("batch_size", batch_size)[0]
    if batch_input_shape is not None:
        return dims("batch_input_shape", batch_input_shape)
    if input_shape is not None:
        return [batch] + dims("input_shape", input_shape)
    if input_dim is not None:
        return [batch] + dims("input_dim", input_dim)
    return None


def check_axis_arg(axis: Any) -> Union[int, List[int]]:
    if isinstance(axis, bool):
        raise TypeError("Expected an int or a list/tuple of ints for the argument 'axis', "
                        f"but received: {axis!r}")
    if isinstance(axis, numbers.Integral):
        return int(axis)
    if hasattr(axis, "__index__") and getattr(axis, "ndim", 0) == 0:  # a 0-d integer tensor / array
        try:
            return operator.index(axis)
        except TypeError:
            pass
    if isinstance(axis, (str, bytes)) or not hasattr(axis, "__iter__"):
        raise TypeError("Expected an int or a list/tuple of ints for the argument 'axis', "
                        f"but received: {axis!r}")
    try:
        out = list(axis)
    except TypeError:  # (e.g. a 0-d float tensor: iterable in type, not in fact)
        raise TypeError("Expected an int or a list/tuple of ints for the argument 'axis', "
                        f"but received: {axis!r}") from None
    if not out or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in out):
        raise TypeError("Expected an int or a list/tuple of ints for the argument 'axis', "
                        f"but received: {axis!r}")
    return [int(a) for a in out]


def validate_axis(axis: Axis, rank: int) -> List[int]:
    """tf_keras's ``validate_axis``: non-negative axes in the order given."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    axes = [a + rank if a < 0 else a for a in axes]
    for a in axes:
        if a < 0 or a >= rank:
            raise ValueError("Invalid value for `axis` argument. Expected 0 <= axis < inputs.rank "
                             f"(with inputs.rank={rank}). Received: axis={tuple(axes)}")
    if len(axes) != len(set(axes)):
        raise ValueError(f"Duplicate axis: {tuple(axes)}")
    return axes


def check_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a float between [0, 1]. Received: {name}={value!r}")
    return float(value)


def check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not float(epsilon) > 0.0:
        raise ValueError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    if not math.isfinite(float(epsilon)):  # (tf_keras takes it, and every call then gives NaN)
        raise ValueError(f"`epsilon` must be finite. Received: epsilon={epsilon!r}")
    return float(epsilon)


def check_renorm_clipping(renorm_clipping: Optional[Mapping[str, Any]]) -> Dict[str, float]:
    if renorm_clipping is not None and not isinstance(renorm_clipping, Mapping):
        raise TypeError("`renorm_clipping` must be a dict with keys among "
                        f"{_CLIPPING_KEYS} (or None). Received: {renorm_clipping!r} ({type(renorm_clipping).__name__})")
    clipping = dict(renorm_clipping or {})
    if set(clipping) - set(_CLIPPING_KEYS):
        raise ValueError("Received invalid keys for `renorm_clipping` argument: "
                         f"{clipping}. Supported values: {_CLIPPING_KEYS}.")
    for key, value in clipping.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or math.isnan(float(value))):
            raise ValueError(f"`renorm_clipping[{key!r}]` must be a number. Received: {key}={value!r}")
    clipping = {k: v for k, v in clipping.items() if v is not None}
    rmax, rmin, dmax = (clipping.get(k) for k in _CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError("rmax should be greater than rmin in the `renorm_clipping` argument. "
                         f"Received: rmax={rmax}, rmin={rmin}.")
    if dmax is not None and dmax < 0:
        raise ValueError(f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}.")
    return clipping


def vbs_message(virtual_batch_size: Any, detail: str = "") -> str:
    return ("`virtual_batch_size` must be a positive integer that divides the true batch size of the "
            f"input tensor. Received: virtual_batch_size={virtual_batch_size!r}{detail}")


def check_virtual_batch_size(virtual_batch_size: Any, axis: Axis, adjustment: Any) -> Optional[int]:
    if virtual_batch_size is None:
        return None
    if (isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, numbers.Integral)
            or virtual_batch_size <= 0):
        raise ValueError(vbs_message(virtual_batch_size))
    if adjustment is not None:
        raise ValueError("When using `virtual_batch_size`, adjustment cannot be specified. Received: "
                         f"virtual_batch_size={virtual_batch_size}, adjustment={adjustment!r}")
    check_batch_axis(axis if isinstance(axis, int) else list(axis), None)
    return int(virtual_batch_size)


def check_batch_axis(axis: Axis, rank: Optional[int]) -> None:
    """With ghost batches dim 0 is the batch and cannot be a feature axis."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    if any(a == 0 or (rank is not None and a == -rank) for a in axes):
        raise ValueError("When using `virtual_batch_size`, the batch dimension must be 0 and thus axis "
                         f"cannot include 0. Received axis={axis}")


def incompatible_input(name: str, detail: str) -> ValueError:
    return ValueError(f"Input 0 of layer '{name}' is incompatible with the layer: {detail}")
