"""Keras weight regularizers: callables ``penalty(weight) -> scalar Tensor`` (Keras's formulas)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._serialization import KerasObject, make_get, serialize as _serialize

__all__ = ["Regularizer", "L1", "L2", "L1L2", "get", "serialize"]


class Regularizer(KerasObject):
    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class L1L2(Regularizer):
    """``l1 * sum(|x|) + l2 * sum(x ** 2)``."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        self.l1, self.l2 = float(l1), float(l2)

    def __call__(self, x):
        out = x.new_zeros(())
        if self.l1:
            out = out + self.l1 * x.abs().sum()
        if self.l2:
            out = out + self.l2 * x.square().sum()
        return out

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(Regularizer):
    """``l1 * sum(|x|)``."""

    def __init__(self, l1: float = 0.01):
        self.l1 = float(l1)

    def __call__(self, x):
        return self.l1 * x.abs().sum()

    def get_config(self):
        return {"l1": self.l1}


class L2(Regularizer):
    """``l2 * sum(x ** 2)`` (no factor 1/2, as in Keras)."""

    def __init__(self, l2: float = 0.01):
        self.l2 = float(l2)

    def __call__(self, x):
        return self.l2 * x.square().sum()

    def get_config(self):
        return {"l2": self.l2}


get = make_get("regularizer", {c.__name__: c for c in (L1, L2, L1L2)},
               {"l1_l2": lambda: L1L2(l1=0.01, l2=0.01)})
get.__doc__ = "A regularizer from a Keras name, config dict, instance or callable (None stays None)."


def serialize(regularizer: Any) -> Any:
    return _serialize(regularizer, "keras.regularizers")
