"""Figure grids of overlays, PNG saving and a helper for core ``Explanation`` objects.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas directly,
never through ``pyplot``, so no global state or interactive backend is touched.
"""

from __future__ import annotations

import math
import textwrap
from os import PathLike
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from ..core.errors import ConfigError, InputError
from .overlay import ArrayLike, CmapLike, get_cmap, overlay, to_numpy

__all__ = ["grid", "save_png", "explanation_grid", "filter_grid"]

_TITLE_FONTSIZE = 8


def _as_image_list(images: ArrayLike) -> list[Any]:
    """Split images (B, H, W, 3) or a sequence of B images into a list (items unchanged)."""
    if isinstance(images, (list, tuple)):
        return list(images)
    arr = to_numpy(images)
    if arr.ndim not in (3, 4):
        raise InputError(f"images must be (B, H, W, 3) or a sequence of (H, W, 3) arrays, got shape {arr.shape}")
    return list(arr)


def _wrap(title: str, cell_size: float) -> str:
    """Wrap a title to roughly the width of one cell at the small title font."""
    width = max(10, int(cell_size * 72 / (_TITLE_FONTSIZE * 0.6)))
    return "\n".join(textwrap.fill(line, width) for line in str(title).splitlines() or [""])


def grid(
    images: Union[Sequence[ArrayLike], ArrayLike],
    maps: ArrayLike,
    titles: Optional[Sequence[Sequence[str]]] = None,
    *,
    cmap: CmapLike = "jet",
    alpha: float = 0.5,
    cell_size: float = 3.0,
    suptitle: Optional[str] = None,
    max_cols: Optional[int] = 16,
    max_cells: Optional[int] = 128,
    boxes: Optional[Sequence[Sequence[Optional[tuple[Sequence[float], str]]]]] = None,
) -> Figure:
    """Plot a B x T grid of overlays: one row per image, one column per target.

    Bounded whatever B and T: an image's targets wrap onto several rows of at most ``max_cols``
    cells, and at most ``max_cells`` cells are drawn (the first ``min(T, max_cells)`` targets of
    the first ``max_cells // that`` images); what was left out is said in the figure title.

    Args:
        images: B images (H, W, 3) (uint8 or float in [0, 1], or (H, W) grey),
            as a sequence or an array/tensor (B, H, W, 3).
        maps: array/tensor (B, T, h, w) in [0, 1]; (B, h, w) is read as T=1.
            Maps are resized to their image's size when they differ (see ``overlay``).
        titles: optional B lists of T strings; long titles are wrapped; a ``None`` title leaves
            that cell empty (for ragged layouts).
        cmap: colormap name or ``Colormap``.
        alpha: heat-map weight in [0, 1].
        cell_size: size of one cell in inches.
        suptitle: optional figure title.
        max_cols: at most this many cells per row (``None``: no wrapping).
        max_cells: at most this many cells in all (``None``: no cap).
        boxes: optional B lists of T ``((x0, y0, x1, y1), text)`` or ``None``: a box drawn on that
            cell with its text (e.g. an explained detection, ``"dog 0.87"``) on a tab at its
            top-left corner. Coordinates are in the maps' pixels (the model input's, as a detector's
            boxes), scaled to the image shown.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas) with B*T image axes (axes off)
        and a shared colorbar (0..1) on the right.
    """
    imgs = _as_image_list(images)
    m = to_numpy(maps)
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise InputError(f"maps must be (B, T, H, W), got shape {m.shape}")
    B, T = m.shape[:2]
    if B != len(imgs):
        raise InputError(f"maps has B={B} but {len(imgs)} images were given")
    if B == 0 or T == 0:
        raise InputError(f"nothing to plot: maps has shape {m.shape}")
    if titles is not None:
        if len(titles) != B:
            raise InputError(f"titles has {len(titles)} rows but maps has B={B}")
        for b, row in enumerate(titles):
            if isinstance(row, str) or len(row) != T:
                got = "a string" if isinstance(row, str) else f"{len(row)} titles"
                raise InputError(f"titles[{b}] must be a list of T={T} strings, got {got}")
    if boxes is not None and (len(boxes) != B or any(isinstance(r, str) or len(r) != T for r in boxes)):
        raise InputError(f"boxes must be B={B} lists of T={T} ((x0, y0, x1, y1), text) pairs or None")
    if cell_size <= 0:
        raise ConfigError(f"cell_size must be > 0, got {cell_size}")
    for name, value in (("max_cols", max_cols), ("max_cells", max_cells)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 or None, got {value}")
    colormap = get_cmap(cmap)

    # Bound the number of cells drawn, then wrap each image's targets onto rows of `cols` cells.
    shown_t = T if max_cells is None else min(T, max_cells)
    shown_b = B if max_cells is None else min(B, max(1, max_cells // shown_t))
    notes = []
    if shown_b < B:
        notes.append(f"first {shown_b} of {B} rows")
    if shown_t < T:
        notes.append(f"first {shown_t} of {T} targets")
    if notes:
        note = "(showing " + ", ".join(notes) + ")"
        suptitle = f"{suptitle}\n{note}" if suptitle else note
    cols = shown_t if max_cols is None else min(shown_t, max_cols)
    per = -(-shown_t // cols)  # rows per image
    nrows = shown_b * per

    # Cells follow the images' aspect (cell_size is the width); room for titles, colorbar, suptitle.
    aspect = max(np.asarray(im).shape[0] / np.asarray(im).shape[1] for im in imgs[:shown_b])
    row_h = cell_size * aspect + (0.3 if titles is not None else 0.05)
    lines = 0 if not suptitle else 1 + str(suptitle).count("\n")
    fig = Figure(
        figsize=(cell_size * cols + 0.2 * cell_size + 0.6, row_h * nrows + 0.4 * lines),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for b in range(shown_b):
        for t in range(shown_t):
            ax = axes[b * per + t // cols, t % cols]
            if titles is not None and titles[b][t] is None:
                continue  # an empty cell (ragged layouts)
            ax.imshow(overlay(imgs[b], m[b, t], cmap=colormap, alpha=alpha))
            if boxes is not None and boxes[b][t] is not None:
                _draw_box(ax, *boxes[b][t], scale=np.asarray(imgs[b]).shape[:2], of=m.shape[-2:])
            if titles is not None:
                ax.set_title(_wrap(titles[b][t], cell_size), fontsize=_TITLE_FONTSIZE)
            ax.set_axis_off()
    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormap)
    fig.colorbar(sm, ax=axes.ravel().tolist(), location="right", fraction=0.05 / max(cols, 1) + 0.02, shrink=0.9)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def _draw_box(ax: Any, box: Sequence[float], text: str, scale: Sequence[int], of: Sequence[int]) -> None:
    """A box ``(x0, y0, x1, y1)`` in ``of`` = (h, w) pixels, drawn on an image of ``scale`` = (H, W)
    pixels, with ``text`` on a filled tab at its top-left corner."""
    sy, sx = scale[0] / of[0], scale[1] / of[1]
    x0, y0, x1, y1 = (float(v) for v in box)
    # imshow puts pixel i's centre at i: a box edge at pixel coordinate c is drawn at c - 0.5
    ax.add_patch(Rectangle((x0 * sx - 0.5, y0 * sy - 0.5), (x1 - x0) * sx, (y1 - y0) * sy, fill=False,
                           edgecolor="white", linewidth=1.5))
    if text:
        ax.text(x0 * sx - 0.5, y0 * sy - 0.5, text, fontsize=_TITLE_FONTSIZE - 1, color="black", va="top",
                ha="left", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})


def save_png(path: Union[str, PathLike], array_or_figure: Union[ArrayLike, Figure], dpi: int = 100) -> Path:
    """Save an image array or a Figure as PNG, creating parent directories.

    Args:
        path: destination file (written as PNG whatever the suffix).
        array_or_figure: a ``Figure`` (saved with ``bbox_inches="tight"``), or an
            image (H, W, 3) / (H, W, 4) / (H, W) uint8 (float in [0, 1] is scaled to 0..255).
        dpi: figure resolution; for arrays only stored as PNG metadata.

    Returns:
        The ``Path`` written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(array_or_figure, Figure):
        array_or_figure.savefig(p, format="png", dpi=dpi, bbox_inches="tight")
        return p
    arr = to_numpy(array_or_figure)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise InputError(f"array must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.rint(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8)
        else:
            raise InputError(f"array must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    Image.fromarray(np.ascontiguousarray(arr)).save(p, format="PNG", dpi=(dpi, dpi))
    return p


def display_from_inputs(inputs: ArrayLike) -> np.ndarray:
    """Min-max rescale model inputs (B, C, H, W) per image to uint8 (B, H, W, C)."""
    x = to_numpy(inputs).astype(np.float64)
    if x.ndim != 4:
        hint = ": a volume / clip; draw it with camlens.viz.volume_grid or volume_gif" if x.ndim == 5 else ""
        raise InputError(f"exp.inputs must be (B, C, H, W), got shape {x.shape}{hint}")
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    span = x.max(axis=(1, 2, 3), keepdims=True) - lo
    x = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.rint(x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def target_label(target: Any) -> str:
    """A target's ``.label`` (e.g. ``"species: dog"``), else the object itself as text."""
    return str(getattr(target, "label", target))


def explanation_grid(exp: Any, images: Optional[Union[Sequence[ArrayLike], ArrayLike]] = None, **kw: Any) -> Figure:
    """``grid`` for an ``Explanation`` (duck-typed; the core is not imported).

    Uses ``exp.maps`` (B, T, H, W), ``exp.targets`` (B lists of T objects with
    ``.label``) and ``exp.probs`` (B, T) for titles ``"{label} p={p:.2f}"`` (the
    ``p=`` part is omitted where the probability is NaN or ``probs`` is None).
    Display images: ``images`` if given, else ``exp.display`` (B, H, W, 3) uint8,
    else ``exp.inputs`` (B, 3, H, W) min-max rescaled per image to 0..255.
    Extra keyword arguments go to ``grid`` (``titles=`` overrides the built ones); by default
    at most 8 cells per row (targets wrap) and 64 cells in all (``max_cols``, ``max_cells``).
    A target that explains a detection (``target.detection``, a box target of an object detector)
    gets its box drawn with its label (``"class score"``) on its cell (``boxes=`` overrides).
    """
    kw.setdefault("max_cols", 8)
    kw.setdefault("max_cells", 64)
    maps = exp.maps
    B, T = tuple(maps.shape[:2])
    if images is None:
        images = getattr(exp, "display", None)
    if images is None:
        images = display_from_inputs(exp.inputs)
    if "boxes" not in kw and any(getattr(tg, "detection", None) is not None for row in exp.targets for tg in row):
        kw["boxes"] = [[None if (d := getattr(tg, "detection", None)) is None else (d.box, target_label(tg))
                        for tg in row] for row in exp.targets]
    if "titles" not in kw:
        targets = exp.targets
        if len(targets) != B or any(len(row) != T for row in targets):
            raise InputError(f"exp.targets must be B={B} lists of T={T} targets")
        probs = getattr(exp, "probs", None)
        p = None if probs is None else to_numpy(probs).astype(np.float64).reshape(B, T)
        kw["titles"] = [
            [
                target_label(targets[b][t]) + ("" if p is None or math.isnan(p[b, t]) else f" p={p[b, t]:.2f}")
                for t in range(T)
            ]
            for b in range(B)
        ]
    return grid(images, maps, **kw)


def filter_grid(result: Any, images: Optional[Union[Sequence[ArrayLike], ArrayLike]] = None, **kw: Any) -> Figure:
    """``grid`` of a :class:`camlens.Filters` (duck-typed): one row per image (wrapping at ``max_cols``
    cells), one cell per channel, titled ``"#index  w=weight"``, largest weight first; the figure title
    (``result.title()``) names the layer, the order and, for ``"contribution"``, the targets. Display images:
    ``images``, else ``result.display``, else the inputs min-max rescaled. Keyword arguments go to
    ``grid`` (default: 8 cells per row, 128 cells in all; ``alpha=0.6``)."""
    kw.setdefault("max_cols", 8)
    kw.setdefault("alpha", 0.6)
    if images is None:
        images = result.display if getattr(result, "display", None) is not None else display_from_inputs(result.inputs)
    kw.setdefault("suptitle", result.title())
    return grid(images, result.maps, titles=kw.pop("titles", None) or result.titles(), **kw)
