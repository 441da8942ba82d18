"""Keras-style ``get`` / ``serialize`` for the small object catalogs (initializers, regularizers,
constraints).

Accepted identifiers, as in Keras: ``None``, a snake_case alias (``"glorot_uniform"``), a class name
(``"GlorotUniform"``), a Keras config dict (``{"class_name": "L2", "config": {"l2": 0.01}}``, with or
without Keras's ``module`` / ``registered_name`` keys), an instance, or any callable.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional, Type


class KerasObject:
    """Base of the catalog classes: a callable with a Keras config."""

    _keras_module = "keras"

    def get_config(self) -> Dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def make_get(kind: str, classes: Mapping[str, Type[KerasObject]],
             aliases: Mapping[str, Callable[[], KerasObject]]) -> Callable[[Any], Optional[Callable]]:
    """Build the ``get(identifier)`` of one catalog; ``kind`` names it in errors."""
    by_name: Dict[str, Callable[..., KerasObject]] = {}
    for cls_name, cls in classes.items():
        by_name[cls_name] = cls
        by_name[snake_case(cls_name)] = cls
    by_name.update(aliases)

    def get(identifier: Any) -> Optional[Callable]:
        if identifier is None:
            return None
        if isinstance(identifier, str):
            try:
                return by_name[identifier]()
            except KeyError:
                raise ValueError(
                    f"Could not interpret {kind} identifier: {identifier!r}. Known names: "
                    f"{sorted(k for k in by_name if not k[0].isupper())}"
                ) from None
        if isinstance(identifier, Mapping):
            if "class_name" not in identifier:
                raise ValueError(f"Could not interpret {kind} identifier: {dict(identifier)!r} "
                                 "(a config dict needs a 'class_name' key)")
            name = identifier["class_name"]
            cls = classes.get(name)
            if cls is None:
                raise ValueError(
                    f"Could not interpret {kind} identifier: unknown class_name {name!r} in {dict(identifier)!r}. "
                    f"Supported: {sorted(classes)}; pass a callable for anything else"
                )
            return cls.from_config(dict(identifier.get("config") or {}))
        if callable(identifier):
            return identifier
        raise ValueError(f"Could not interpret {kind} identifier: {identifier!r}")

    return get


def serialize(obj: Any, module: str) -> Any:
    """Keras's serialized form for catalog objects; other callables are returned as they are."""
    if obj is None:
        return None
    if isinstance(obj, KerasObject):
        return {"module": module, "class_name": type(obj).__name__, "config": obj.get_config(),
                "registered_name": None}
    return obj


def to_numpy(value: Any):
    """A numpy array from a TensorFlow variable/tensor or any array-like (not a torch tensor)."""
    import numpy as np

    return value.numpy() if hasattr(value, "numpy") and not hasattr(value, "detach") else np.asarray(value)
