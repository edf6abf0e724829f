"""Loading Keras models by name for :func:`camlens.models.load` and the CLI (``--model keras:...``).

* ``keras:path/to/model.keras`` (or ``.h5``): ``keras.saving.load_model(path, compile=False)``
  (Keras' safe mode on: no arbitrary code from the file);
* ``keras:applications.ResNet50`` (``@SIZE`` for an ``(SIZE, SIZE, 3)`` input, else the
  application's default, 224 for most): the architecture of ``keras.applications`` with random
  weights (``weights=None``; nothing is downloaded), or the weights of a ``.weights.h5`` / ``.h5``
  file (``model.load_weights``). Its preprocessing is the family's own
  ``keras.applications.<family>.preprocess_input`` (``"caffe"``: RGB -> BGR minus the ImageNet
  means in 0-255, ``"tf"``: ``x / 127.5 - 1``, ``"torch"``: ``(x / 255 - mean) / std``, or none for
  the families that normalise inside the model: EfficientNet, ConvNeXt, MobileNetV3, ...).

This module is the Keras half of the loader (it imports Keras); the torch-free half that wraps
the result for the engine is :mod:`camlens.models.keras`.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import keras
import numpy as np

from ...core.errors import ConfigError, MissingFileError, ModelRuntimeError

__all__ = ["KerasSpec", "load_keras", "application_names", "affine_preprocessing"]

_APPS = "applications."
_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass
class KerasSpec:
    """What :func:`load_keras` built: the model, its ``preprocess_input`` (NHWC float 0-255 in,
    the model's input out), its ``(H, W)`` input size (``None`` entries: any size), whether its
    weights are random, and a name."""

    model: Any
    preprocess_input: Callable[[np.ndarray], np.ndarray]
    input_hw: tuple
    random_weights: bool
    name: str


def application_names() -> list[str]:
    """The model constructors of ``keras.applications`` (``"ResNet50"``, ``"MobileNetV2"``, ...)."""
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _family_preprocess(fn: Callable[..., Any]) -> Callable[[np.ndarray], np.ndarray]:
    """``preprocess_input`` of the module that defines the application constructor ``fn``."""
    module = importlib.import_module(fn.__module__)
    pre = getattr(module, "preprocess_input", None)
    if pre is None:
        return _identity

    def apply(x: np.ndarray) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(pre(np.array(x, dtype=np.float32, copy=True))), dtype=np.float32)

    apply.__qualname__ = f"{module.__name__}.preprocess_input"
    return apply


def _input_hw(model: Any) -> tuple:
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(shape[1:3]) if shape is not None and len(shape) == 4 else (None, None)


def _load_weights(model: Any, weights: str) -> None:
    p = Path(weights)
    if not p.is_file():
        raise MissingFileError(f"weights file not found: {p}")
    if not (p.name.endswith(".weights.h5") or p.suffix in (".h5", ".hdf5")):
        raise ConfigError(f"weights file {p} is not a Keras weights file: give a .weights.h5 (model.save_weights) or "
                          "a legacy .h5 file")
    with warnings.catch_warnings(record=True) as caught:  # Keras warns (and goes on) for parts it skips
        warnings.simplefilter("always")
        try:
            model.load_weights(str(p))
        except Exception as err:  # Keras raises ValueError / KeyError / OSError by case
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ModelRuntimeError(f"weights from {p} do not fit Keras model {model.name!r} "
                                    f"({len(model.weights)} variables): {first}") from err
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()
               or "could not be loaded" in str(w.message).lower()]
    if skipped:
        raise ModelRuntimeError(f"weights from {p} do not fit Keras model {model.name!r}: Keras skipped part of the "
                                f"file ({len(skipped)} warning(s), e.g. {skipped[0][:200]!r})")


def load_keras(spec: str, weights: Optional[str] = None) -> KerasSpec:
    """Build the Keras model named by ``spec`` (the part after ``keras:``; see the module docstring).

    Raises:
        MissingFileError: a model or weights file that does not exist.
        ConfigError: an unknown application (close names listed), a bad ``@SIZE``, an unknown suffix.
        ModelRuntimeError: a weights file that does not fit the model.
    """
    if spec.startswith(_APPS):
        name, _, size = spec[len(_APPS):].partition("@")
        names = application_names()
        fn = getattr(keras.applications, name, None) if name in names else None
        if fn is None:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
            close += [n for n in names if name and name.lower() in n.lower() and n not in close][:5 - len(close)]
            raise ConfigError(f"unknown Keras application {name!r}" + (f"; close names: {close}" if close else "")
                              + f". Keras {keras.__version__} has {len(names)}: e.g. {names[:6]}; see "
                              "dir(keras.applications)")
        kw: dict = {"weights": None}
        if size:
            if not size.isdigit() or int(size) < 32:
                raise ConfigError(f"keras:{spec}: the size after '@' is the input side in pixels (an int >= 32), "
                                  f"got {size!r}")
            kw["input_shape"] = (int(size), int(size), 3)
        try:
            model = fn(**kw)
        except ValueError as err:
            raise ConfigError(f"keras.applications.{name}({kw}) failed: {err}") from err
        if weights is not None:
            _load_weights(model, weights)
        return KerasSpec(model, _family_preprocess(fn), _input_hw(model), weights is None, f"keras:{spec}")
    p = Path(spec)
    if p.suffix.lower() not in _MODEL_SUFFIXES:
        raise ConfigError(f"keras:{spec}: give a saved Keras model file (.keras or .h5) or 'applications.NAME' "
                          "(e.g. keras:applications.ResNet50, keras:applications.MobileNetV2@160)")
    if not p.is_file():
        raise MissingFileError(f"Keras model file not found: {p}")
    try:
        model = keras.saving.load_model(str(p), compile=False)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(f"cannot load Keras model {p}: {first}") from err
    if weights is not None:
        _load_weights(model, weights)
    # a saved model brings no preprocessing: its inputs are the image's 0-255 values scaled to [0, 1]
    return KerasSpec(model, _unit_scale, _input_hw(model), False, f"keras:{p.name}")


def _unit_scale(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) / 255.0


def affine_preprocessing(pre: Callable[[np.ndarray], np.ndarray]) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(perm, scale, shift)`` with ``pre(x)[..., c] = scale[c] * x[..., perm[c]] + shift[c]`` when the
    preprocessing is a per-channel affine map of permuted channels (every ``preprocess_input`` of
    ``keras.applications``: caffe's BGR swap, tf, torch, identity), measured on four probe images;
    ``None`` otherwise (then overlays show the model's input min-maxed)."""
    probe = np.zeros((5, 1, 1, 3), dtype=np.float32)
    for k in range(3):
        probe[1 + k, 0, 0, k] = 255.0
    probe[4, 0, 0] = (37.0, 151.0, 222.0)
    try:
        out = np.asarray(pre(probe), dtype=np.float64).reshape(5, -1)
    except Exception:  # noqa: BLE001 - any failure: not affine as far as we can tell
        return None
    if out.shape[1] != 3:
        return None
    shift = out[0]
    cols = (out[1:4] - shift) / 255.0  # cols[k, c]: d out_c / d in_k
    perm = np.argmax(np.abs(cols), axis=0)
    scale = cols[perm, np.arange(3)]
    if np.any(scale == 0) or len(set(perm.tolist())) != 3:
        return None
    if not np.allclose(out[4], scale * probe[4, 0, 0][perm] + shift, rtol=1e-5, atol=1e-4):
        return None
    return perm, scale, shift
