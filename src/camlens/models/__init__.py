"""Model loading and preprocessing.

>>> from camlens import models
>>> lm = models.load()                      # EfficientNet-Lite0, ImageNet weights, eval mode
>>> x = lm.preprocess("cat.jpg")            # Tensor (1, 3, 224, W) on lm.device
>>> logits = lm(x)                          # (1, 1000)
>>> rgb = lm.to_display(x)                  # uint8 (1, 224, W, 3) for overlays
>>> km = models.load("keras:applications.ResNet50")   # a keras.Model (random weights), NHWC, no torch

The names load lazily: ``keras:...`` models (:mod:`camlens.models.keras_loaded`) never import torch;
everything else comes from :mod:`camlens.models.loading` (PyTorch).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Union

KERAS_PREFIX = "keras:"

_LAZY = {
    "DEFAULT_MODEL": "loading", "LoadedModel": "loading", "guess_default_layer": "loading",
    "imagenet_categories": "loading", "list_models": "loading", "load_weights_file": "loading",
    "remap_state_dict_by_order": "loading", "IMAGENET_MEAN": "preprocess", "IMAGENET_STD": "preprocess",
    "Preprocess": "preprocess", "to_display": "preprocess", "load_image": "..io.images",
    "KerasLoadedModel": "keras_loaded", "KerasPreprocess": "keras_loaded",
}

_SUBMODULES = ("loading", "preprocess", "shapes", "keras_loaded")


def load(name: str = "efficientnet-lite0", *, weights: Optional[Union[str, os.PathLike]] = None, device: Any = None,
         crop: bool = False) -> Any:
    """Load a model by name with matching preprocessing: see :func:`camlens.models.loading.load` for the
    PyTorch forms; ``"keras:path/model.keras"`` (or ``.h5``) and ``"keras:applications.NAME[@SIZE]"``
    give a :class:`~camlens.models.keras_loaded.KerasLoadedModel` (``weights``: a ``.weights.h5`` /
    ``.h5`` file; ``device`` is for PyTorch models only: TensorFlow places a Keras model itself)."""
    if isinstance(name, str) and name.startswith(KERAS_PREFIX):
        from ..core.errors import ConfigError
        from .keras_loaded import load_keras

        if device is not None:
            raise ConfigError(f"device={device!r} is for PyTorch models; a Keras model runs where TensorFlow places "
                              "it (CUDA_VISIBLE_DEVICES / tf.device)")
        return load_keras(name[len(KERAS_PREFIX):], os.fspath(weights) if weights is not None else None, crop)
    load_torch = _torch_side("loading", "load")
    return load_torch(name, weights=weights, device=device, crop=crop)


def _torch_side(module: str, name: Optional[str]) -> Any:
    """``name`` of the torch-backed submodule ``module``; without torch a MissingDependencyError naming
    the extra (``pip install "camlens[torch]"``)."""
    try:
        mod = importlib.import_module(f".{module}", __name__) if not module.startswith(".") else \
            importlib.import_module(module, __name__)
    except ImportError as err:
        from .. import _missing_dependency

        missing = _missing_dependency(err, f"camlens.models.{name}")
        if missing is None:
            raise
        raise missing from err
    return mod if name is None else getattr(mod, name)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None and name in _SUBMODULES:  # camlens.models.loading etc. without importing them first
        return _torch_side(name, None)
    if mod is None:
        raise AttributeError(f"module 'camlens.models' has no attribute {name!r}")
    value = _torch_side(mod, name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KerasLoadedModel",
    "KerasPreprocess",
    "LoadedModel",
    "Preprocess",
    "guess_default_layer",
    "imagenet_categories",
    "list_models",
    "load",
    "load_image",
    "load_weights_file",
    "remap_state_dict_by_order",
    "to_display",
]
