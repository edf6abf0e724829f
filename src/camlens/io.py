"""Image reading helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

__all__ = ["ImageLike", "load_image", "array_to_pil"]


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """Convert an image array to an RGB PIL image.

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped), either
    integer-valued in 0..255 or float in [0, 1]. Floats are rounded to uint8.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(
            f"expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {arr.shape}"
        )
    if arr.dtype == np.uint8:
        u8 = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < -1e-3 or np.nanmax(arr) > 1 + 1e-3):
            raise ValueError(
                f"float image values must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; "
                "divide by 255 or cast to uint8"
            )
        u8 = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(
                f"integer image values must be in 0..255, got [{arr.min()}, {arr.max()}]"
            )
        u8 = arr.astype(np.uint8)
    else:
        raise TypeError(f"unsupported image array dtype {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(u8)).convert("RGB")


def load_image(path_or_obj: ImageLike) -> Image.Image:
    """Return an RGB PIL image from a file path, a PIL image or an image array.

    Files are decoded with PIL; EXIF orientation is applied, grayscale/palette/RGBA images
    are converted to RGB (alpha is dropped).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: ``"cannot read image {path}: ..."`` when the file is not a readable image.
        TypeError: unsupported object type.
    """
    if isinstance(path_or_obj, Image.Image):
        return path_or_obj.convert("RGB") if path_or_obj.mode != "RGB" else path_or_obj
    if isinstance(path_or_obj, np.ndarray):
        return array_to_pil(path_or_obj)
    if isinstance(path_or_obj, (str, os.PathLike)):
        path = Path(path_or_obj)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        if path.is_dir():
            raise ValueError(f"cannot read image {path}: it is a directory")
        try:
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
    raise TypeError(
        f"cannot read an image from {type(path_or_obj).__name__}; "
        "expected a file path, a PIL.Image or a numpy array"
    )
