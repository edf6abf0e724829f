"""Keras models loaded by name (``camlens.models.load("keras:...")``, ``--model keras:...``), torch-free.

:func:`load_keras` wraps what :func:`camlens.backends.keras.loading.load_keras` builds (the only
module here that imports Keras, imported on call) in a :class:`KerasLoadedModel`: the
``LoadedModel`` contract the engine reads (``model``, ``preprocess``, ``to_display``,
``categories``, ``default_layer``, ``input_size``, ``random_weights``, ``name``) for a
``keras.Model`` taking NHWC images.

Preprocessing (:class:`KerasPreprocess`): each image (a path, a PIL image, a uint8 array
``(H, W)`` / ``(H, W, 3)``, or a list of these) is read as RGB and resized bilinearly to the
model's input size — exactly ``(H, W)`` when the model's input has a fixed size (with ``crop``:
shorter side to fit, then the centred ``H x W`` window), otherwise the shorter side to
``input_size`` (aspect kept) — then given to the model's own preprocessing (``preprocess_input`` of
its ``keras.applications`` family, on 0-255 floats; ``x / 255`` for a saved model file). Float
arrays are taken as model inputs already preprocessed: ``(H, W, C)`` or ``(B, H, W, C)``, unchanged.
``to_display`` inverts the preprocessing where it is a per-channel affine map (every
``preprocess_input`` of ``keras.applications`` is: measured, :func:`affine_preprocessing`), else
min-maxes the input.

Class names: the 1000 ImageNet names (``camlens/data/imagenet_classes.txt``, a copy of the list
torchvision ships, index 281 = "tabby") for a model with 1000 outputs; otherwise ``None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
from PIL import Image

from ..core.errors import InputError, InputTypeError
from ..io.images import array_to_pil, load_image

__all__ = ["KerasLoadedModel", "KerasPreprocess", "load_keras", "imagenet_names"]

_NAMES = Path(__file__).resolve().parent.parent / "data" / "imagenet_classes.txt"


@lru_cache(maxsize=1)
def _imagenet_names() -> tuple:
    return tuple(_NAMES.read_text(encoding="utf-8").splitlines())


def imagenet_names() -> List[str]:
    """The 1000 ImageNet class names in the usual index order (281 = "tabby"), without torch."""
    return list(_imagenet_names())


@dataclass
class KerasPreprocess:
    """Images -> a float32 NHWC batch ``(N, H, W, 3)`` for a Keras model (see the module docstring)."""

    input_hw: tuple  # (H, W); None entries: any size (then the shorter side -> input_size)
    preprocess_input: Callable[[np.ndarray], np.ndarray]
    input_size: int = 224
    crop: bool = False
    affine: Optional[tuple] = field(default=None, repr=False)  # (perm, scale, shift), see to_display

    def output_hw(self, h: int, w: int) -> tuple:
        """The ``(H, W)`` an ``h x w`` image is resized to."""
        H, W = self.input_hw
        if H is not None and W is not None:
            return int(H), int(W)
        s = self.input_size
        return (s, max(1, int(s * w / h))) if h <= w else (max(1, int(s * h / w)), s)

    def resize(self, image: Any) -> Image.Image:
        """One image as an RGB PIL image at the model's input size."""
        if isinstance(image, (str, os.PathLike)):
            img = load_image(image)
        elif isinstance(image, Image.Image):
            img = image.convert("RGB")
        elif isinstance(image, np.ndarray) and image.dtype == np.uint8:
            img = array_to_pil(image).convert("RGB")
        else:
            raise InputTypeError(f"cannot preprocess a {type(image).__name__} "
                                 f"{getattr(image, 'dtype', '')} for a Keras model: give paths, PIL images or uint8 "
                                 "arrays (H, W, 3), or float arrays (B, H, W, C) already preprocessed")
        H, W = self.output_hw(img.height, img.width)
        if self.crop and (img.height, img.width) != (H, W):
            s = max(H / img.height, W / img.width)
            nh, nw = max(H, round(img.height * s)), max(W, round(img.width * s))
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            top, left = (nh - H) // 2, (nw - W) // 2
            return img.crop((left, top, left + W, top + H))
        return img if (img.height, img.width) == (H, W) else img.resize((W, H), Image.Resampling.BILINEAR)

    def __call__(self, images: Any) -> np.ndarray:
        """One image or a list -> ``(N, H, W, 3)`` float32, the model's input."""
        if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
            if images.ndim not in (3, 4):
                raise InputError(f"a float array for a Keras model is its input (H, W, C) or (B, H, W, C), got "
                                 f"{images.shape}")
            return np.asarray(images[None] if images.ndim == 3 else images, dtype=np.float32)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items: list = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise InputError("preprocess got an empty list of images")
        arrays = [np.asarray(self.resize(im), dtype=np.float32) for im in items]
        if len({a.shape for a in arrays}) > 1:
            raise InputError(f"images resize to different sizes {sorted({a.shape for a in arrays})}; give them one "
                             "at a time, or use crop=True")
        return np.asarray(self.preprocess_input(np.stack(arrays)), dtype=np.float32)

    def to_display(self, x: Any) -> np.ndarray:
        """The model input ``(N, H, W, 3)`` (or one ``(H, W, 3)``; or the engine's ``(N, 3, H, W)``, as
        ``Explanation.inputs`` holds it) back as uint8 RGB images ``(N, H, W, 3)``."""
        a = np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)
        if a.ndim == 4 and a.shape[1] == 3 and a.shape[-1] != 3:  # the engine's (N, 3, H, W) (Explanation.inputs)
            a = a.transpose(0, 2, 3, 1)
        if a.ndim not in (3, 4) or a.shape[-1] != 3:
            raise InputError(f"to_display expects Keras inputs (N, H, W, 3) or (H, W, 3), got {a.shape}")
        if self.affine is not None:
            perm, scale, shift = self.affine
            rgb = np.empty_like(a)
            rgb[..., perm] = (a - shift) / scale  # pre[..., c] = scale[c] * x[..., perm[c]] + shift[c]
        else:
            lo, hi = a.min(), a.max()
            rgb = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


@dataclass
class KerasLoadedModel:
    """A ``keras.Model`` with its preprocessing and class names (the ``LoadedModel`` contract)."""

    model: Any
    preprocess: KerasPreprocess
    categories: Optional[List[str]]
    name: str
    input_size: int = 224
    random_weights: bool = False
    default_layer: Optional[str] = None  # None: the backend's rule (explain(layer=None))
    layer_note: Optional[str] = None

    def __call__(self, x: Any) -> Any:
        return self.model(x, training=False)

    def to_display(self, x: Any) -> np.ndarray:
        return self.preprocess.to_display(x)

    def input_normalisation(self) -> tuple[tuple, tuple, tuple]:
        """``(mean, std, channels)``: the preprocessing of ``[0, 1]`` RGB images ``x`` as
        ``input[..., c] = ((x - mean) / std)[..., channels[c]]`` (for :func:`camlens.visualize`), read
        from the affine map ``preprocess_input(255 x)[..., c] = scale[c] · 255 x[..., perm[c]] + shift[c]``:
        ``channels = perm``, ``std[perm[c]] = 1 / (255 scale[c])``, ``mean[perm[c]] = -shift[c] / (255
        scale[c])``. E.g. caffe (ResNet50): BGR, ``mean`` the ImageNet means / 255, ``std = 1/255``."""
        aff = self.preprocess.affine
        if aff is None or np.any(np.asarray(aff[1]) <= 0):
            raise InputError(f"the preprocessing of {self.name} is not a per-channel affine map with positive scales, "
                             "so camlens.visualize cannot optimise [0, 1] images through it; pass mean=, std= (and "
                             "channels=) saying how the model input is made from [0, 1] RGB images")
        perm, scale, shift = (np.asarray(a, dtype=np.float64) for a in aff)
        mean, std = np.empty(3), np.empty(3)
        perm = perm.astype(int)
        std[perm] = 1.0 / (255.0 * scale)
        mean[perm] = -shift / (255.0 * scale) + 0.0  # (+ 0.0: no negative zeros)
        return tuple(mean.tolist()), tuple(std.tolist()), tuple(perm.tolist())


def load_keras(spec: str, weights: Optional[str] = None, crop: bool = False) -> KerasLoadedModel:
    """``keras:...`` (``spec`` without the prefix) as a :class:`KerasLoadedModel`; see the module docstring
    and :func:`camlens.backends.keras.loading.load_keras` (errors: unknown application with close names,
    missing files, a weights file that does not fit)."""
    from ..backends.keras.loading import affine_preprocessing
    from ..backends.keras.loading import load_keras as build

    got = build(spec, weights)
    H, W = got.input_hw
    size = int(min(H, W)) if H is not None and W is not None else 224
    pre = KerasPreprocess(got.input_hw, got.preprocess_input, size, crop)
    pre.affine = affine_preprocessing(got.preprocess_input)
    outputs = getattr(got.model, "outputs", None) or []
    k = outputs[0].shape[-1] if len(outputs) == 1 and len(outputs[0].shape) == 2 else None
    return KerasLoadedModel(model=got.model, preprocess=pre, categories=imagenet_names() if k == 1000 else None,
                            name=got.name, input_size=size, random_weights=got.random_weights)
