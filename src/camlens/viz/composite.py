"""Several targets' maps on one image, each in its own hue, blended where they overlap.

For T maps ``m_t`` (H, W) in [0, 1] and colours ``c_t`` (RGB, 0..255), per pixel:

* ``m_t`` is set to 0 where ``m_t <= threshold`` (with the default ``threshold=0`` nothing changes);
* ``colour = sum_t m_t * c_t / sum_t m_t``   — the maps' colours mixed in proportion to the maps;
* ``a = alpha * max_t m_t``                   — opacity follows the strongest map;
* ``out = round((1 - a) * image + a * colour)``.

So a single map of 1 gives ``(1 - alpha) * image + alpha * c_t``, two maps both at 1 give the
average of their colours at opacity ``alpha``, and where every map is 0 the image is unchanged.
The HTML report's "composite" mode uses the same formula and palette.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, never ``pyplot``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..core.errors import ConfigError, InputError
from .grid import display_from_inputs, target_label
from .overlay import ArrayLike, as_rgb_float, resize_bilinear, to_numpy

__all__ = ["PALETTE", "composite", "composite_figure", "explanation_composite"]

# matplotlib's tab10 without its grey (a grey "hue" is invisible on photos): 9 distinguishable colours.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),   # blue
    (255, 127, 14),   # orange
    (44, 160, 44),    # green
    (214, 39, 40),    # red
    (148, 103, 189),  # purple
    (140, 86, 75),    # brown
    (227, 119, 194),  # pink
    (188, 189, 34),   # olive
    (23, 190, 207),   # cyan
)


def palette_colors(n: int, colors: Optional[Sequence[Any]] = None, *, cycle: bool = False) -> np.ndarray:
    """``n`` target colours as float64 (n, 3) on the 0..255 scale.

    Args:
        n: number of targets.
        colors: matplotlib colour specs (``"red"``, ``"#ff0000"``, RGB floats in [0, 1]); default
            :data:`PALETTE`.
        cycle: reuse the palette when ``n`` exceeds it (the HTML report does); otherwise raise.

    Raises:
        ValueError: more targets than colours (and ``cycle`` is False).
    """
    if colors is None:
        pal = np.asarray(PALETTE, dtype=np.float64)
    else:
        pal = np.asarray([to_rgb(c) for c in colors], dtype=np.float64).reshape(-1, 3) * 255.0
    if n > len(pal):
        if not cycle or len(pal) == 0:
            raise ConfigError(
                f"{n} targets but only {len(pal)} colours; pass colors= with {n} colours, or draw fewer "
                "targets (e.g. explanation_composite(..., targets=[0, 1, 2]))"
            )
        pal = pal[np.arange(n) % len(pal)]
    return pal[:n]


def _as_maps(maps: ArrayLike, hw: tuple[int, int]) -> np.ndarray:
    """Maps (T, h, w) (or one (h, w)) as float64 (T, H, W) in [0, 1], resized to ``hw`` if needed."""
    m = to_numpy(maps).astype(np.float64)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise InputError(f"maps must be (T, H, W), got shape {m.shape}")
    if m.shape[1:] != hw:
        m = np.stack([resize_bilinear(x, hw) for x in m]) if len(m) else np.zeros((0, *hw))
    return np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0)


def composite(
    image: ArrayLike,
    maps: ArrayLike,
    labels: Optional[Sequence[str]] = None,
    *,
    colors: Optional[Sequence[Any]] = None,
    alpha: float = 0.6,
    threshold: float = 0.0,
) -> np.ndarray:
    """Draw T maps over one image, each in its own hue, blending colours where maps overlap.

    See the module docstring for the formula.

    Args:
        image: (H, W, 3) uint8 or float in [0, 1], or (H, W) grey.
        maps: (T, h, w) values in [0, 1]; resized bilinearly to (H, W) when they differ.
        labels: optional T labels (only checked here; :func:`composite_figure` shows them).
        colors: T matplotlib colour specs; default :data:`PALETTE` (9 colours).
        alpha: opacity where a map is 1, in [0, 1].
        threshold: map values ``<= threshold`` count as 0 (hides faint background).

    Returns:
        uint8 array (H, W, 3).

    Raises:
        ValueError: bad shapes, ``alpha`` outside [0, 1], ``len(labels) != T``, or more than
            ``len(colors)`` (default 9) targets — colours are never silently reused.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    img = as_rgb_float(image)
    m = _as_maps(maps, img.shape[:2])
    T = m.shape[0]
    if labels is not None and len(labels) != T:
        raise ConfigError(f"{len(labels)} labels for {T} maps")
    if T == 0:
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    col = palette_colors(T, colors)  # (T, 3)
    m = np.where(m > threshold, m, 0.0)
    s = m.sum(0)  # (H, W)
    mixed = np.einsum("thw,tc->hwc", m, col) / np.where(s > 0, s, 1.0)[..., None]
    a = alpha * m.max(0)[..., None]  # (H, W, 1); 0 where every map is 0 → image unchanged
    out = (1.0 - a) * img + a * mixed
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def composite_figure(
    image: ArrayLike,
    maps: ArrayLike,
    labels: Sequence[str],
    *,
    colors: Optional[Sequence[Any]] = None,
    alpha: float = 0.6,
    threshold: float = 0.0,
    title: Optional[str] = None,
    size: float = 5.0,
) -> Figure:
    """:func:`composite` in a Figure with a legend (one coloured patch per label, right of the image).

    Args:
        image, maps, labels, colors, alpha, threshold: as :func:`composite` (``labels`` required).
        title: optional axes title.
        size: image width in inches.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas) with one image axes (axes off) and its legend.
    """
    arr = composite(image, maps, labels, colors=colors, alpha=alpha, threshold=threshold)
    col = palette_colors(len(labels), colors) / 255.0
    h, w = arr.shape[:2]
    longest = max((len(str(lb)) for lb in labels), default=0)
    fig = Figure(figsize=(size + 0.8 + 0.075 * longest, size * h / w + (0.4 if title else 0.1)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(arr)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    handles = [Patch(facecolor=tuple(c), edgecolor="none", label=str(lb)) for c, lb in zip(col, labels)]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  fontsize=8, frameon=False)
    return fig


def explanation_composite(
    exp: Any,
    b: int = 0,
    *,
    images: Optional[ArrayLike] = None,
    targets: Optional[Sequence[int]] = None,
    **kw: Any,
) -> Figure:
    """:func:`composite_figure` of image ``b`` of an ``Explanation`` (duck-typed).

    Reads ``exp.maps`` (B, T, H, W), ``exp.targets[b][t].label`` and ``exp.probs`` (B, T):
    legend labels ``"{label} p={p:.2f}"`` (no ``p=`` where NaN). The image is ``images[b]`` if
    given, else ``exp.display[b]`` (H, W, 3) uint8, else ``exp.inputs[b]`` min-max rescaled.

    Args:
        exp: an ``Explanation``.
        b: which image of the batch.
        images: optional display images (B, H, W, 3).
        targets: indices of the targets to draw (default all T; at most 9 with the default palette).
        **kw: passed to :func:`composite_figure` (``colors``, ``alpha``, ``threshold``, ``title``, ``size``).
    """
    maps = to_numpy(exp.maps)
    B, T = maps.shape[:2]
    if not -B <= b < B:
        raise IndexError(f"image index {b} out of range for a batch of {B}")
    if images is None:
        images = getattr(exp, "display", None)
    img = to_numpy(images)[b] if images is not None else display_from_inputs(exp.inputs[b:b + 1])[0]
    idx = list(range(T)) if targets is None else [int(t) for t in targets]
    probs = getattr(exp, "probs", None)
    p = None if probs is None else to_numpy(probs).astype(np.float64).reshape(B, T)[b]
    labels = [target_label(exp.targets[b][t]) + ("" if p is None or math.isnan(p[t]) else f" p={p[t]:.2f}")
              for t in idx]
    return composite_figure(img, maps[b, idx], labels, **kw)
