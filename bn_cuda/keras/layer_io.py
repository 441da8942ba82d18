"""Config, state and Keras import of :class:`bn_cuda.BatchNormalization` (a mixin of the layer)."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional

import torch

from . import constraints, initializers, regularizers
from ._serialization import to_numpy as _to_numpy

__all__ = ["KerasLayerIO"]

# Keras base-layer config keys that have no meaning here.
_KERAS_BASE_KEYS = ("dynamic", "autocast")


class KerasLayerIO:
    """``get_config`` / ``from_config`` / ``from_keras`` and the state_dict hooks that let an
    unbuilt layer load a state dict."""

    def get_config(self) -> Dict[str, Any]:
        """Keras's config; ``adjustment`` is omitted, as in Keras.

        ``tf_keras.layers.BatchNormalization.from_config`` accepts it, except with ``fused=True``
        where tf_keras has no fused kernel (renorm, ``virtual_batch_size``, several axes,
        ``synchronized``): bn_cuda's fused kernels run those, tf_keras refuses the combination.
        ``fused=None`` gives a config both accept."""
        config: Dict[str, Any] = {
            "name": self.name,
            "trainable": self.trainable,
            "axis": self.axis if isinstance(self.axis, int) else list(self.axis),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        if self.renorm:
            config.update(renorm=True, renorm_clipping=dict(self.renorm_clipping),
                          renorm_momentum=self.renorm_momentum)
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        config["fused"] = self.fused
        config["synchronized"] = self.synchronized
        if self.dtype_policy is not None:
            config["dtype"] = self.dtype_policy
        if self._batch_input_shape is not None:
            config["batch_input_shape"] = self._batch_input_shape
        if self.adjustment is not None:
            warnings.warn(f"The `adjustment` function of layer '{self.name}' cannot be serialized and has been "
                          "omitted from the layer config. It will not be included when re-creating the layer "
                          "from the saved config.", stacklevel=2)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Any:
        """A layer from :meth:`get_config`'s output or a (tf_)keras BatchNormalization config."""
        config = dict(config)
        for key in _KERAS_BASE_KEYS:
            config.pop(key, None)
        if "axis" in config and not isinstance(config["axis"], int):
            config["axis"] = list(config["axis"])
        if config.get("renorm_clipping") is not None:
            config["renorm_clipping"] = dict(config["renorm_clipping"])
        return cls(**config)

    def _keras_weight_names(self) -> List[str]:
        """The weights in Keras's order: gamma, beta, the moving variables (renorm's last)."""
        return [n for n in ["gamma", "beta"] + self._variables() if getattr(self, n) is not None]

    @property
    def weights(self) -> List[torch.Tensor]:
        """Keras's ``layer.weights``: the weight tensors themselves, in Keras's order."""
        return [getattr(self, n) for n in self._keras_weight_names()]

    @property
    def trainable_weights(self) -> List[torch.Tensor]:
        """gamma and beta while the layer is trainable (Keras's ``trainable_weights``)."""
        return [getattr(self, n) for n in self._keras_weight_names() if n in ("gamma", "beta") and self.trainable]

    @property
    def non_trainable_weights(self) -> List[torch.Tensor]:
        """The moving variables, and gamma / beta of a frozen layer (Keras's order)."""
        trainable = {id(t) for t in self.trainable_weights}
        return [t for t in self.weights if id(t) not in trainable]

    def count_params(self) -> int:
        """Number of scalars in :attr:`weights` (Keras counts the moving variables too)."""
        if not self.built:
            raise ValueError(f"You tried to call `count_params` on layer '{self.name}', but the layer isn't built. "
                             "You can build it manually via: `layer.build(input_shape)`.")
        return sum(t.numel() for t in self.weights)

    def compute_output_shape(self, input_shape: Any) -> Any:
        """The output shape: the input's (Keras's ``compute_output_shape``)."""
        return input_shape

    def get_weights(self) -> List[Any]:
        """The weights as numpy arrays, in Keras's order (``layer.get_weights()`` of tf_keras)."""
        return [getattr(self, n).detach().cpu().numpy().copy() for n in self._keras_weight_names()]

    def set_weights(self, weights: Any) -> None:
        """Keras's ``set_weights``: numpy arrays (or tensors) in :meth:`get_weights`'s order, e.g. a
        tf_keras layer's ``get_weights()``; each is copied into the weight, in its dtype. Checked
        whole before anything is written."""
        names = self._keras_weight_names()
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f'You called `set_weights(weights)` on layer "{self.name}" with a weight list of length '
                             f"{len(weights)}, but the layer was expecting {len(names)} weights"
                             + ("" if self.built else " (it is not built: call build() or pass input_shape)"))
        values = []
        for name, w in zip(names, weights):
            try:
                value = w.detach() if isinstance(w, torch.Tensor) else torch.as_tensor(_to_numpy(w))
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"Layer {self.name}: the value for weight '{name}' is not a numeric array: "
                                f"{type(w).__name__} ({e})") from None
            ours = getattr(self, name)
            if tuple(value.shape) != tuple(ours.shape):
                raise ValueError(f"Layer {self.name} weight shape {tuple(ours.shape)} is not compatible with provided "
                                 f"weight shape {tuple(value.shape)} (weight '{name}')")
            if value.is_complex():  # (a copy into a real weight would drop the imaginary part)
                raise TypeError(f"Layer {self.name}: the value for weight '{name}' has dtype {value.dtype}, "
                                "expected a real number type")
            try:  # converted here, so that a value that cannot be read (a meta tensor) fails before any write
                values.append(value.to(device=ours.device, dtype=ours.dtype))
            except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
                raise RuntimeError(f"Layer {self.name}: the value for weight '{name}' ({value.dtype} on "
                                   f"{value.device}) cannot be copied to {ours.dtype} on {ours.device}: {e}") from None
        with torch.no_grad():
            for name, value in zip(names, values):
                getattr(self, name).copy_(value)

    def get_extra_state(self) -> torch.Tensor:
        """The input spec the layer was built for (its feature dims, -1 elsewhere) as an int64
        tensor, empty before the layer is built. A tensor, so that every ``state_dict`` value is one:
        safetensors, torch's TorchScript ONNX exporter and other tools read them all as tensors.
        (The ``{"input_shape": [...]}`` dict earlier releases saved loads too.)"""
        spec = [] if self._build_shape is None else [-1 if s is None else int(s) for s in self._build_shape]
        return torch.tensor(spec, dtype=torch.int64)

    @staticmethod
    def _saved_spec(state: Any) -> Optional[List[Optional[int]]]:
        """The input spec in a saved extra state (the tensor above, or an earlier release's dict),
        None if the layer that saved it was not built."""
        if isinstance(state, Mapping):
            return state.get("input_shape")
        if isinstance(state, torch.Tensor) and state.dim() == 1 and state.numel() > 0 and not state.is_floating_point():
            return [None if int(s) < 0 else int(s) for s in state.tolist()]
        return None

    def set_extra_state(self, state: Any) -> None:
        shape = self._saved_spec(state)
        if shape is not None:
            self.build(shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # An unbuilt layer builds itself from the saved input spec, so that loading works before
        # the first call (the usual order when restoring a model).
        shape = self._saved_spec(state_dict.get(prefix + "_extra_state"))
        if not self.built and shape is not None:
            self.build(shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_keras(cls, keras_layer: Any, **overrides: Any) -> Any:
        """A layer with a (tf_)keras ``BatchNormalization``'s config and, if it is built, its weights.

        Parameters
        ----------
        keras_layer
            A ``tf_keras`` (or Keras 3) ``BatchNormalization`` layer.
        **overrides
            Constructor arguments replacing the config's, e.g. ``fused=False`` or an
            ``adjustment`` written for torch (a TensorFlow adjustment function cannot be ported).
        """
        config = dict(keras_layer.get_config())
        spec = getattr(keras_layer, "input_spec", None)
        built = bool(getattr(keras_layer, "built", False)) and getattr(spec, "axes", None)
        if built:
            # tf_keras shifts its `axis` by one once built with ghost batches; the input spec keeps
            # the input's own axes.
            axes = sorted(int(a) for a in spec.axes)
            config["axis"] = axes[0] if len(axes) == 1 and isinstance(keras_layer.axis, int) else axes
        if getattr(keras_layer, "adjustment", None) is not None and "adjustment" not in overrides:
            warnings.warn(f"Layer '{config.get('name')}' has an `adjustment` function; TensorFlow functions cannot "
                          "be ported, pass `adjustment=` (a torch function) to from_keras", stacklevel=2)
        config.update(overrides)
        layer = cls.from_config(config)
        if not built:
            return layer
        shape: List[Optional[int]] = [None] * int(spec.ndim)
        for a, dim in spec.axes.items():
            shape[int(a)] = int(dim)
        layer.build(shape)
        with torch.no_grad():
            for name in ["gamma", "beta"] + layer._variables():
                ours = getattr(layer, name)
                theirs = getattr(keras_layer, name, None)
                if ours is None or theirs is None:
                    continue
                value = torch.as_tensor(_to_numpy(theirs))
                if tuple(value.shape) != tuple(ours.shape):
                    raise ValueError(f"Weight '{name}' of Keras layer '{config.get('name')}' has shape "
                                     f"{tuple(value.shape)}, expected {tuple(ours.shape)}")
                ours.copy_(value.to(ours.dtype))
        return layer
