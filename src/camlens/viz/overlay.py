"""Colour maps and heat-map overlays as uint8 RGB arrays (numpy + matplotlib only).

Torch tensors are accepted everywhere and converted at the boundary with
``.detach().float().cpu().numpy()``; torch itself is never imported here.
"""

from __future__ import annotations

from typing import Any, Union

import matplotlib
import numpy as np
from matplotlib.colors import Colormap

from ..core.errors import ConfigError, ConfigTypeError, InputError
from ..core.predictions import to_numpy

# Anything numpy can take, or a torch.Tensor (duck-typed through ``.detach``).
ArrayLike = Any
CmapLike = Union[str, Colormap]

__all__ = ["colorize", "overlay"]

_SUGGESTED_CMAPS = ("jet", "viridis", "inferno", "magma", "plasma", "turbo", "gray", "hot")


def get_cmap(cmap: CmapLike) -> Colormap:
    """Resolve a colormap name or object; unknown names raise ``ValueError``."""
    if isinstance(cmap, Colormap):
        return cmap
    if not isinstance(cmap, str):
        raise ConfigTypeError(f"cmap must be a colormap name or a matplotlib Colormap, got {type(cmap).__name__}")
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        n = len(list(matplotlib.colormaps))
        raise ConfigError(
            f"unknown colormap {cmap!r}; try one of {', '.join(_SUGGESTED_CMAPS)} "
            f"(matplotlib.colormaps lists all {n})"
        ) from None


def _as_map(map: ArrayLike) -> np.ndarray:
    """Validate a 2-D map and return it as float64 (H, W)."""
    m = to_numpy(map).astype(np.float64)
    if m.ndim != 2:
        raise InputError(f"map must be 2-D (H, W), got shape {m.shape}")
    return m


def as_rgb_float(image: ArrayLike) -> np.ndarray:
    """Convert an image to float64 (H, W, 3) on the 0..255 scale.

    Accepts (H, W, 3) or (H, W, 4) (alpha dropped), (H, W, 1) or (H, W) grey;
    integer dtypes are read as 0..255, float dtypes as 0..1 (clipped).
    """
    img = to_numpy(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        hint = " (for a CHW tensor use image.permute(1, 2, 0))" if img.ndim == 3 and img.shape[0] in (1, 3) else ""
        raise InputError(f"image must be (H, W, 3) or (H, W), got shape {img.shape}{hint}")
    img = img[..., :3]
    if img.dtype == np.bool_:
        return img.astype(np.float64) * 255.0
    if np.issubdtype(img.dtype, np.integer):
        return np.clip(img.astype(np.float64), 0.0, 255.0)
    img = img.astype(np.float64)
    if np.nanmax(img, initial=0.0) > 1.5:  # clearly 0..255 data stored as float
        raise InputError("float images must be in [0, 1]; convert 0..255 data to uint8 first")
    return np.clip(np.nan_to_num(img), 0.0, 1.0) * 255.0


def resize_bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D array to ``size`` = (H, W).

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` without antialiasing: output pixel ``i`` reads the
    source at ``(i + 0.5) * in / out - 0.5`` (clamped at the border).
    """

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    (h, w), (oh, ow) = m.shape, size
    y0, y1, wy = axis(h, oh)
    x0, x1, wx = axis(w, ow)
    wy, wx = wy[:, None], wx[None, :]
    top = m[y0][:, x0] * (1 - wx) + m[y0][:, x1] * wx
    bot = m[y1][:, x0] * (1 - wx) + m[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def colorize(map: ArrayLike, cmap: CmapLike = "jet") -> np.ndarray:
    """Colour a scalar map with a matplotlib colormap.

    Args:
        map: (H, W) values in [0, 1]; values outside are clipped, NaN is treated as 0.
        cmap: colormap name (e.g. ``"jet"``, ``"viridis"``) or a ``Colormap``.

    Returns:
        uint8 array (H, W, 3), equal to ``cmap(map, bytes=True)[..., :3]``.
    """
    m = np.clip(np.nan_to_num(_as_map(map), nan=0.0), 0.0, 1.0)
    return np.ascontiguousarray(get_cmap(cmap)(m, bytes=True)[..., :3])


def overlay(image: ArrayLike, map: ArrayLike, cmap: CmapLike = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised map onto an image.

    ``result = round((1 - alpha) * image + alpha * colorize(map))`` in float on
    the 0..255 scale.

    Args:
        image: (H, W, 3) uint8 or float in [0, 1], or (H, W) grey.
        map: (h, w) values in [0, 1]. If (h, w) != (H, W) the *scalar* map is
            resized to (H, W) bilinearly (``align_corners=False`` convention, as
            ``torch.nn.functional.interpolate``) before colouring.
        cmap: colormap name or ``Colormap``.
        alpha: weight of the heat map, in [0, 1].

    Returns:
        uint8 array (H, W, 3).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    img = as_rgb_float(image)
    m = _as_map(map)
    if m.shape != img.shape[:2]:
        m = resize_bilinear(m, img.shape[:2])
    heat = colorize(m, cmap).astype(np.float64)
    out = (1.0 - alpha) * img + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
