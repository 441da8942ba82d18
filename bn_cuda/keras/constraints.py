"""Keras weight constraints: callables ``project(weight) -> Tensor`` (Keras's formulas, epsilon 1e-7)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._serialization import KerasObject, make_get, serialize as _serialize

__all__ = ["Constraint", "NonNeg", "MaxNorm", "MinMaxNorm", "UnitNorm", "get", "serialize"]

_EPSILON = 1e-7  # keras.backend.epsilon()


def _norms(w: Tensor, axis) -> Tensor:
    return w.square().sum(dim=axis, keepdim=True).sqrt()


class Constraint(KerasObject):
    def __call__(self, w: Tensor) -> Tensor:
        return w


class NonNeg(Constraint):
    def __call__(self, w):
        return w * (w >= 0).to(w.dtype)


class MaxNorm(Constraint):
    def __init__(self, max_value: float = 2, axis: int = 0):
        self.max_value, self.axis = max_value, axis

    def __call__(self, w):
        norms = _norms(w, self.axis)
        desired = norms.clamp(0, self.max_value)
        return w * (desired / (_EPSILON + norms))

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(Constraint):
    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: int = 0):
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, axis

    def __call__(self, w):
        norms = _norms(w, self.axis)
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        return w * (desired / (_EPSILON + norms))

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate, "axis": self.axis}


class UnitNorm(Constraint):
    def __init__(self, axis: int = 0):
        self.axis = axis

    def __call__(self, w):
        return w / (_EPSILON + _norms(w, self.axis))

    def get_config(self):
        return {"axis": self.axis}


get = make_get("constraint", {c.__name__: c for c in (NonNeg, MaxNorm, MinMaxNorm, UnitNorm)}, {})
get.__doc__ = "A constraint from a Keras name, config dict, instance or callable (None stays None)."


def serialize(constraint: Any) -> Any:
    return _serialize(constraint, "keras.constraints")
