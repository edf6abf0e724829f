"""Pictures of volume / clip explanations (maps ``(B, T, D, H, W)``): overlays slice by slice along
depth / time, as one PNG grid (:func:`volume_grid`), an animated GIF (:func:`volume_gif`) or an MP4
video (:func:`volume_video`: H.264 through PyAV, the optional ``video`` extra).

The input volume is shown grey (one channel) or RGB (three channels, e.g. video frames), min-maxed
over the whole volume for display (model inputs are usually standardised, not in [0, 1]).
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..core.errors import ConfigError, InputError, MissingDependencyError
from ..core.predictions import to_numpy
from .grid import save_png
from .overlay import ArrayLike, CmapLike, overlay

__all__ = ["volume_slices", "volume_overlays", "volume_grid", "volume_gif", "volume_video", "even_frame"]


def volume_slices(depth: int, slices: Union[int, Sequence[int], None] = None) -> list[int]:
    """Indices of the slices to show: all (``None``), ``n`` evenly spaced ones including the middle
    region (``round((i + 0.5) * depth / n)``, ``i < n``), or the given indices (negative ones count
    from the end)."""
    if slices is None:
        return list(range(depth))
    if isinstance(slices, int):
        if slices < 1:
            raise ConfigError(f"slices must be a positive number of slices or a list of indices, got {slices}")
        n = min(slices, depth)
        return sorted({min(int((i + 0.5) * depth / n), depth - 1) for i in range(n)})
    out = []
    for s in slices:
        k = int(s) + depth if int(s) < 0 else int(s)
        if not 0 <= k < depth:
            raise ConfigError(f"slice {s} is outside the volume's {depth} slices")
        out.append(k)
    return out


def _display_volume(volume: ArrayLike) -> np.ndarray:
    """``(C, D, H, W)`` input (C = 1 or 3) -> ``(D, H, W, 3)`` float in [0, 1] (min-max over the volume)."""
    v = to_numpy(volume).astype(np.float64)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4 or v.shape[0] not in (1, 3):
        raise InputError(f"volume must be (C, D, H, W) with C = 1 or 3 (or (D, H, W)), got shape {v.shape}")
    lo, hi = float(np.min(v)), float(np.max(v))
    v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    v = np.moveaxis(v, 0, -1)  # (D, H, W, C)
    return np.repeat(v, 3, axis=-1) if v.shape[-1] == 1 else v


def volume_overlays(volume: ArrayLike, maps: ArrayLike, slices: Union[int, Sequence[int], None] = None,
                    cmap: CmapLike = "jet", alpha: float = 0.5) -> tuple[list[int], list[np.ndarray]]:
    """Overlays of one map ``(D, H, W)`` on its volume ``(C, D, H, W)``: ``(indices, [uint8 (H, W, 3)])``
    for the slices chosen by :func:`volume_slices` (the map is resized per slice if its grid differs)."""
    m = to_numpy(maps).astype(np.float64)
    v = _display_volume(volume)
    if m.ndim != 3:
        raise InputError(f"maps must be one volume map (D, H, W), got shape {m.shape}")
    if m.shape[0] != v.shape[0]:
        raise InputError(f"the map has {m.shape[0]} slices but the volume {v.shape[0]}; pass maps of the input's "
                         "size (explain(..., upsample=True), the default)")
    idx = volume_slices(v.shape[0], slices)
    return idx, [overlay(v[k], m[k], cmap=cmap, alpha=alpha) for k in idx]


def _pick(exp: Any, b: int, t: int) -> tuple[Any, Any]:
    maps = exp.maps
    if maps.ndim != 5:
        raise InputError(f"this explanation's maps are {tuple(maps.shape)}, not volume maps (B, T, D, H, W); "
                         "use camlens.viz.explanation_grid for images")
    if not (0 <= b < maps.shape[0] and 0 <= t < maps.shape[1]):
        raise ConfigError(f"image {b} target {t} is outside the maps {tuple(maps.shape)}")
    return exp.inputs[b], maps[b, t]


def volume_grid(exp: Any, path: Union[str, PathLike], *, b: int = 0, t: int = 0,
                slices: Union[int, Sequence[int], None] = 8, cols: Optional[int] = None, cmap: CmapLike = "jet",
                alpha: float = 0.5, gap: int = 2) -> Path:
    """Write a PNG grid of overlays of image ``b``'s map for target ``t``, one tile per slice / frame
    (``slices``: see :func:`volume_slices`; 8 evenly spaced by default), row by row in ``cols`` columns
    (default: about square), white ``gap`` pixels between tiles. Returns the path."""
    vol, m = _pick(exp, b, t)
    _, tiles = volume_overlays(vol, m, slices, cmap, alpha)
    n = len(tiles)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    H, W = tiles[0].shape[:2]
    out = np.full((rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = tile
    return save_png(path, out)


def volume_gif(exp: Any, path: Union[str, PathLike], *, b: int = 0, t: int = 0,
               slices: Union[int, Sequence[int], None] = None, duration: int = 100, cmap: CmapLike = "jet",
               alpha: float = 0.5, loop: int = 0) -> Path:
    """Write an animated GIF of the overlays through depth / time (every slice by default), one frame
    per slice, ``duration`` ms each, looping (``loop=0``: forever). Returns the path. (Pillow merges
    consecutive frames that are identical pixel for pixel into one longer frame.)"""
    from PIL import Image

    vol, m = _pick(exp, b, t)
    _, tiles = volume_overlays(vol, m, slices, cmap, alpha)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(tile) for tile in tiles]
    frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:], duration=int(duration), loop=loop)
    return p


def even_frame(frame: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(H + H % 2, W + W % 2, 3)``: an odd height or width padded by one row /
    column repeating the last one (yuv420p, which every player decodes, halves the chroma
    resolution and needs even sizes). Even frames are returned as they are."""
    H, W = frame.shape[:2]
    if H % 2 == 0 and W % 2 == 0:
        return frame
    return np.pad(frame, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge")


def _video_codec(av: Any, codec: Optional[str]) -> str:
    """``codec`` if PyAV's FFmpeg can encode it; ``None``: ``"libx264"`` (H.264) when the build has
    it, else ``"mpeg4"`` (MPEG-4 Part 2, in every FFmpeg)."""
    have = av.codecs_available
    if codec is not None:
        if codec not in have:
            raise ConfigError(f"PyAV's FFmpeg has no codec {codec!r}; pass codec=None (libx264 or mpeg4), "
                              f"or one of {sorted(c for c in ('libx264', 'h264', 'mpeg4', 'libopenh264') if c in have)}")
        return codec
    return "libx264" if "libx264" in have else "mpeg4"


def volume_video(exp: Any, path: Union[str, PathLike], *, b: int = 0, t: int = 0,
                 slices: Union[int, Sequence[int], None] = None, fps: float = 10, cmap: CmapLike = "jet",
                 alpha: float = 0.5, codec: Optional[str] = None, crf: int = 18, pix_fmt: str = "yuv420p") -> Path:
    """Write an MP4 video of the overlays through depth / time (every slice by default, as
    :func:`volume_gif`: the same frames, see :func:`volume_overlays`), one video frame per slice at
    ``fps`` frames per second. Returns the path.

    Encoding (PyAV, ``pip install "camlens[video]"`` or ``pip install av``): H.264 (``"libx264"``)
    when PyAV's FFmpeg has it, else MPEG-4 Part 2 (``"mpeg4"``); ``codec=`` picks another. Pixels
    are ``pix_fmt="yuv420p"`` by default (what browsers and players decode), so a frame of odd
    height or width is padded by one row / column repeating its last (:func:`even_frame`), and
    colour is stored at half resolution in each direction: on small frames with sharp colour-map
    edges the decoded RGB differs from the overlay by a few grey levels on average (tested:
    under 16 of 255 on 15 x 20 frames, most of it yuv420p's own round trip).
    ``pix_fmt="yuv444p"`` (libx264 only) keeps full colour and the frames' own size, for players
    that decode H.264 High 4:4:4. ``crf`` is x264's quality (0 = lossless, 18 = visually lossless,
    23 = x264's default); other codecs get a bit rate of 4 bits a pixel (at least 2 Mbit/s) instead.
    """
    try:
        import av
    except ImportError as err:
        raise MissingDependencyError('volume_video writes MP4 with PyAV, which is not installed: '
                                     'pip install "camlens[video]" (or pip install av); '
                                     'camlens.viz.volume_gif needs only Pillow') from err
    if not fps > 0:
        raise ConfigError(f"fps must be a positive number of frames per second, got {fps!r}")
    name = _video_codec(av, codec)
    if pix_fmt not in ("yuv420p", "yuv444p") or (pix_fmt == "yuv444p" and name != "libx264"):
        raise ConfigError(f"pix_fmt must be 'yuv420p', or 'yuv444p' with codec 'libx264'; got {pix_fmt!r} "
                          f"with codec {name!r}")
    vol, m = _pick(exp, b, t)
    _, tiles = volume_overlays(vol, m, slices, cmap, alpha)
    frames = [even_frame(tile) for tile in tiles] if pix_fmt == "yuv420p" else tiles
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    from fractions import Fraction

    with av.open(str(p), mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if name == "libx264":
            stream.options = {"crf": str(int(crf))}
        else:  # no crf: a generous bit rate, 4 bits a pixel (at least 2 Mbit/s)
            stream.bit_rate = max(2_000_000, int(4 * stream.height * stream.width * float(fps)))
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return p
