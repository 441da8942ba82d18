"""Keras pieces of :class:`bn_cuda.BatchNormalization`: the composite reference maths, argument
checks, and the initializer / regularizer / constraint catalogs."""

from . import checks, composite, constraints, initializers, regularizers  # noqa: F401

__all__ = ["checks", "composite", "constraints", "initializers", "regularizers"]
