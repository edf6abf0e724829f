"""Image reading helpers."""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import ConfigError, InputError, InputFileNotFoundError, InputTypeError

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

__all__ = ["ImageLike", "load_image", "array_to_pil", "to_rgb", "DEFAULT_MAX_PIXELS"]

#: Default pixel limit of :func:`load_image` (width x height): files claiming more are refused
#: before they are decoded (decompression bombs). 100 megapixels, e.g. 12000 x 8000.
DEFAULT_MAX_PIXELS = 100_000_000

_PIL_LIMIT_LOCK = threading.Lock()


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
        raise InputError(
            f"expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {arr.shape}"
        )
    if arr.dtype == np.uint8:
        u8 = arr
    elif arr.dtype == np.uint16:  # 16-bit data: 0..65535 -> 0..255
        u8 = _scale16(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < -1e-3 or np.nanmax(arr) > 1 + 1e-3):
            raise InputError(
                f"float image values must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; "
                "divide by 255 or cast to uint8"
            )
        u8 = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InputError(
                f"integer image values must be in 0..255, got [{arr.min()}, {arr.max()}]"
            )
        u8 = arr.astype(np.uint8)
    else:
        raise InputTypeError(f"unsupported image array dtype {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(u8)).convert("RGB")


def _scale16(arr: np.ndarray) -> np.ndarray:
    """0..65535 integers -> uint8 0..255 (``round(v / 257)``: 8-bit data stored as 16-bit round-trips)."""
    return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _scale_wide(arr: np.ndarray) -> np.ndarray:
    """Single-band integer or float data of unknown range -> uint8 0..255 (see :func:`to_rgb`)."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    a = np.clip(a, 0.0, None)
    hi = float(a.max()) if a.size else 0.0
    if np.issubdtype(arr.dtype, np.floating) and hi <= 1.0:
        a = a * 255.0  # float in [0, 1]
    elif hi <= 255.0:
        pass  # already on the 0..255 scale
    elif hi <= 65535.0:
        a = a / 257.0  # 16-bit range
    else:
        a = a * (255.0 / hi)  # wider: scaled by its maximum
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """An RGB copy of a PIL image of any mode, with high-bit-depth data scaled, not clipped.

    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey): ``round(v / 257)``, so the same
      picture saved as 8-bit and as 16-bit gives the same pixels.
    * ``I`` (32-bit int; older PIL opens 16-bit PNGs so) and ``F`` (32-bit float, e.g. float TIFFs):
      negative values and NaNs become 0; float data with max <= 1 is read as [0, 1]; data with
      max <= 255 as 0..255; max <= 65535 as 16-bit (``/ 257``); anything wider is scaled by its max.
    * 16-bit RGB(A) files are opened by PIL as 8-bit RGB(A) (the high byte of each sample).
    * Everything else (L, P, LA, RGBA, CMYK, YCbCr, 1, ...): PIL's ``convert("RGB")`` (alpha dropped).
    """
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16"):
        arr = np.asarray(im)
        u8 = _scale16(arr) if not im.mode.endswith("S") else _scale16(np.clip(arr.astype(np.int64), 0, None))
        return Image.fromarray(np.ascontiguousarray(u8), "L").convert("RGB")
    if im.mode in ("I", "F"):
        return Image.fromarray(np.ascontiguousarray(_scale_wide(np.asarray(im))), "L").convert("RGB")
    return im.convert("RGB")


def _open(path: Union[Path, io.BytesIO]) -> Image.Image:
    """``Image.open`` (of a file or of bytes in memory) without PIL's own decompression-bomb warning/error (``load_image`` checks the
    size itself, against its ``max_pixels``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError:
        if isinstance(path, io.BytesIO):
            path.seek(0)
        with _PIL_LIMIT_LOCK:  # only the header is read here; the size is checked by the caller
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = old


def load_image(path_or_obj: ImageLike, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return an RGB PIL image from a file path, the bytes of an image file, a PIL image or an image array.

    Files (and bytes: an upload, read with the same checks) are decoded with PIL; EXIF orientation
    is applied, grayscale/palette/RGBA images are converted to RGB (alpha is dropped); 16-bit and
    float images are scaled to 0..255 (see :func:`to_rgb`), 16-bit arrays (uint16) likewise.

    Args:
        path_or_obj: a file path, ``bytes`` of an image file, a ``PIL.Image`` or an image array.
        max_pixels: refuse files whose header claims more than this many pixels (width x height),
            before decoding them: a protection against decompression bombs (a few KB that decode
            to gigabytes). Default :data:`DEFAULT_MAX_PIXELS` (100 megapixels); ``None`` or 0: no
            limit. PIL's own ``MAX_IMAGE_PIXELS`` warning/error is replaced by this check.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: ``"cannot read image {path}: ..."`` when the file is not a readable image or
            exceeds ``max_pixels`` (then the message says "exceeds the limit").
        TypeError: unsupported object type.
    """
    if isinstance(path_or_obj, Image.Image):
        return to_rgb(path_or_obj)
    if isinstance(path_or_obj, np.ndarray):
        return array_to_pil(path_or_obj)
    if isinstance(path_or_obj, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(path_or_obj)), "<bytes>", max_pixels)
    if isinstance(path_or_obj, (str, os.PathLike)):
        path = Path(path_or_obj)
        if not path.exists():
            raise InputFileNotFoundError(f"image file not found: {path}")
        if path.is_dir():
            raise InputError(f"cannot read image {path}: it is a directory")
        return _decode(path, str(path), max_pixels)
    raise InputTypeError(
        f"cannot read an image from {type(path_or_obj).__name__}; "
        "expected a file path, bytes, a PIL.Image or a numpy array"
    )


def _decode(src: Union[Path, io.BytesIO], where: str, max_pixels: Optional[int]) -> Image.Image:
    """Decode one image file (a path or bytes in memory) after checking its header's size."""
    if max_pixels is not None and max_pixels < 0:
        raise ConfigError(f"max_pixels must be >= 0 (0 or None: no limit), got {max_pixels}")
    try:
        with _open(src) as im:
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise InputError(
                    f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} pixels "
                    "(a decompression bomb?); raise the limit (--max-pixels) if the file is genuine"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            MemoryError) as e:
        raise InputError(f"cannot read image {where}: {e}") from e
