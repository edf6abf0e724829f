"""Image preprocessing (resize, optional centre crop, normalise) and its inverse for display."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..core.errors import ConfigError, InputError, InputTypeError
from ..io.images import array_to_pil, load_image

__all__ = ["Preprocess", "to_display", "IMAGENET_MEAN", "IMAGENET_STD", "PIL_INTERPOLATION"]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "random": Image.Resampling.BILINEAR,  # timm's train-time "random" -> bilinear at eval
}

# One image: PIL image, path, or array (H,W) / (H,W,C) uint8 or float in [0,1].
_Resized = Union[Image.Image, np.ndarray]


def _resized_hw(h: int, w: int, size: int) -> Tuple[int, int]:
    """Shorter side -> ``size``, longer side scaled and truncated (as torchvision's Resize)."""
    if h <= w:
        return size, max(1, int(size * w / h))
    return max(1, int(size * h / w)), size


def _centre_box(h: int, w: int, size: int) -> Tuple[int, int]:
    """(top, left) of a centred size x size crop, rounding like torchvision's CenterCrop."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


@dataclass
class Preprocess:
    """Callable turning images into a normalised batch tensor.

    ``preprocess(images) -> Tensor (N, 3, H, W) float32`` on ``device``, where the shorter side
    of each image is resized to ``input_size`` (aspect ratio kept, longer side truncated) and,
    if ``crop``, centre-cropped to ``input_size x input_size``; then ``(x/255 - mean) / std``.

    ``images``: one image or a list of them. An image is a ``PIL.Image``, a path to an image
    file, or a numpy array (H, W) grayscale / (H, W, 3) RGB, ``uint8`` or float in [0, 1]
    (float arrays are resized in float, without quantisation). A 4-D array (N, H, W, C) is a
    batch. Images in a list must resize to the same (H, W).
    """

    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bilinear"
    crop: bool = False
    device: Union[str, torch.device] = "cpu"

    def __post_init__(self) -> None:
        if self.interpolation not in PIL_INTERPOLATION:
            raise ConfigError(
                f"unknown interpolation {self.interpolation!r}; "
                f"use one of {sorted(PIL_INTERPOLATION)}"
            )
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]

    # -- geometry ---------------------------------------------------------------------------
    def output_hw(self, h: int, w: int) -> Tuple[int, int]:
        """(H, W) that an h x w image has after preprocessing."""
        return (self.input_size, self.input_size) if self.crop else _resized_hw(h, w, self.input_size)

    def source_box(self, h: int, w: int) -> Tuple[float, float, float, float]:
        """The region ``(left, top, right, bottom)`` of an h x w original image that the model input
        shows, in the original's pixels: the whole image, or with ``crop`` the centred square that
        the crop keeps. Use it to draw maps back onto the original picture."""
        if not self.crop:
            return 0.0, 0.0, float(w), float(h)
        nh, nw = _resized_hw(h, w, self.input_size)
        top, left = _centre_box(nh, nw, self.input_size)
        sy, sx = h / nh, w / nw
        return (max(0.0, left * sx), max(0.0, top * sy), min(float(w), (left + self.input_size) * sx),
                min(float(h), (top + self.input_size) * sy))

    def resize(self, image: object) -> _Resized:
        """Resize (and crop) one image as :meth:`__call__` does, without normalising.

        Returns an RGB ``PIL.Image`` (uint8 inputs, paths, PIL images) or a float32 array
        (H, W, 3) in [0, 1] (float array inputs). Use it to get the image a CAM overlays on.
        """
        img = _as_rgb(image)
        resample = PIL_INTERPOLATION[self.interpolation]
        if isinstance(img, Image.Image):
            h, w = img.height, img.width
            nh, nw = _resized_hw(h, w, self.input_size)
            if (nh, nw) != (h, w):
                img = img.resize((nw, nh), resample)
            if self.crop:
                top, left = _centre_box(nh, nw, self.input_size)
                img = img.crop((left, top, left + self.input_size, top + self.input_size))
            return img
        h, w = img.shape[:2]
        nh, nw = _resized_hw(h, w, self.input_size)
        if (nh, nw) != (h, w):  # per-channel float resize ("F" mode) keeps full precision
            chans = [
                np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32)).resize((nw, nh), resample))
                for c in range(3)
            ]
            img = np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)
        if self.crop:
            top, left = _centre_box(nh, nw, self.input_size)
            img = img[top : top + self.input_size, left : left + self.input_size]
        return img

    # -- main entry -------------------------------------------------------------------------
    def __call__(self, images: object) -> torch.Tensor:
        """Preprocess one image or a list of images -> Tensor (N, 3, H, W) float32 on ``device``."""
        if isinstance(images, torch.Tensor):
            raise InputTypeError(
                "preprocess expects images (PIL, numpy array, path), not a tensor; "
                "a tensor is assumed to be already preprocessed: pass it to the model directly"
            )
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items: Sequence[object] = list(images)
        elif isinstance(images, (list, tuple)):
            items = images
        else:
            items = [images]
        if len(items) == 0:
            raise InputError("preprocess got an empty list of images")
        arrays = [self._to_chw(self.resize(im)) for im in items]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise InputError(
                f"images preprocess to different sizes {sorted(shapes)}; preprocess them one "
                "at a time, resize them to one size first, or use crop=True"
            )
        x = torch.from_numpy(np.stack(arrays))
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @staticmethod
    def _to_chw(img: _Resized) -> np.ndarray:
        """PIL RGB or float (H,W,3) array -> float32 (3, H, W) in [0, 1]."""
        if isinstance(img, Image.Image):
            arr = np.asarray(img, dtype=np.float32) / 255.0
        else:
            arr = np.asarray(img, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def to_display(self, x: torch.Tensor) -> np.ndarray:
        """Undo the normalisation: see :func:`to_display`."""
        return to_display(x, self.mean, self.std)


def _as_rgb(image: object) -> _Resized:
    """One image -> RGB PIL image, or float32 (H, W, 3) array in [0, 1] for float inputs."""
    if isinstance(image, (str, os.PathLike, Image.Image)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if np.issubdtype(image.dtype, np.floating):
            arr = image.astype(np.float32)
            if arr.ndim == 3 and arr.shape[2] in (1, 4):
                arr = arr[:, :, :1] if arr.shape[2] == 1 else arr[:, :, :3]
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[:, :, 0]
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise InputError(f"expected an image array (H, W) or (H, W, 3), got {image.shape}")
            if arr.size and (np.nanmin(arr) < -1e-3 or np.nanmax(arr) > 1 + 1e-3):
                raise InputError(
                    f"float image values must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; "
                    "divide by 255 or cast to uint8"
                )
            return np.clip(arr, 0.0, 1.0)
        return array_to_pil(image)
    raise InputTypeError(
        f"cannot preprocess a {type(image).__name__}; expected a PIL.Image, a numpy array "
        "(H, W) or (H, W, 3), a path to an image file, or a list of these"
    )


def to_display(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Invert ``(x/255 - mean) / std``.

    ``x``: Tensor (N, 3, H, W) or (3, H, W) -> uint8 array (N, H, W, 3) or (H, W, 3).
    """
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise InputError(f"to_display expects (N, 3, H, W) or (3, H, W), got {tuple(t.shape)}")
    shape = (3, 1, 1)
    t = t * torch.tensor(std, dtype=torch.float32).view(shape) + torch.tensor(mean, dtype=torch.float32).view(shape)
    u8 = (t * 255.0).round().clamp(0, 255).to(torch.uint8)
    return u8.movedim(-3, -1).contiguous().numpy()
