"""Localisation from maps: boxes, masks and their IoU (weakly supervised localisation).

Conventions used throughout:

* **Boxes** are ``(x0, y0, x1, y1)`` integer pixel indices, **inclusive-exclusive**: the box
  covers columns ``x0 <= x < x1`` and rows ``y0 <= y < y1`` (like Python slices, so
  ``mask[y0:y1, x0:x1]`` is the box and its area is ``(x1 - x0) * (y1 - y0)``). The whole
  ``H x W`` image is ``(0, 0, W, H)``.
* **Thresholds are fractions of each map's own maximum**: a pixel is foreground when
  ``map >= threshold * map.max()`` (the CAM paper's rule, Zhou et al. 2016, with 0.2). For the
  min-max normalised maps of :func:`camlens.explain` (max 1) this is the plain value.
* **Degenerate maps** (maximum ``<= 0`` or not finite, e.g. the all-zero map camlens returns
  when a layer has no positive evidence) localise nothing: their box is the whole image (an
  uninformative but valid box, so every target still has one) and their mask is empty.
* Coordinates are those of the map, i.e. of the model input (the resized image), not of the
  original file.

Components are 8-connected (diagonal neighbours join). Everything takes arrays of any backend
(torch tensors, NumPy arrays; framework-free array-API maths) and returns arrays of the same kind on
the maps' device; plain nested lists are read as the default backend's arrays (torch tensors when
torch is installed, :func:`camlens.backends.base.default_array`). Labelling and GrabCut run on CPU copies.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from scipy import ndimage

from ..backends.base import default_array, namespace, ops_for, to_float32
from ..core.errors import ConfigError, InputError
from ..core.targets import is_array

Tensor = Any  # an array: a torch tensor, a NumPy array, ...

__all__ = ["boxes_from_maps", "boxes_all_components", "masks_from_maps", "foreground_masks", "box_iou", "mask_iou",
           "draw_boxes", "cutout"]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for ndimage.label


def _as_arrays(*xs: Any) -> list[Tensor]:
    """``xs`` as arrays of one library: that of the first framework (non-NumPy) array among them, else
    NumPy when one is a NumPy array, else the default backend's (:func:`default_array`); the others are
    converted to it (on its device), as ``torch.as_tensor`` did."""
    def numpy_or_plain(x: Any) -> bool:
        return not is_array(x) or type(x).__module__.split(".")[0] == "numpy"

    like = next((x for x in xs if not numpy_or_plain(x)), None)
    if like is not None:
        ops = ops_for(like)
        return [ops.asarray(np.asarray(x), like=like) if numpy_or_plain(x) else x for x in xs]
    if any(is_array(x) for x in xs):
        return [np.asarray(x) for x in xs]
    return [default_array(x) for x in xs]


def _host(x: Any) -> Any:
    """A NumPy array (or the object itself) for values that go to the host: arrays copied off their device."""
    return ops_for(x).to_numpy(x) if is_array(x) else x


def _flat(x: Tensor, xp: Any) -> Tensor:
    """``(..., H, W) -> (..., H * W)``."""
    return xp.reshape(x, (*x.shape[:-2], x.shape[-2] * x.shape[-1]))


def _finite(maps: Tensor) -> Tensor:
    """float32 maps with NaN read as 0 and +-inf as the largest / lowest float32 (``nan_to_num``)."""
    maps = to_float32(maps)
    xp = namespace(maps)
    info = xp.finfo(maps.dtype)
    return xp.clip(xp.where(xp.isnan(maps), xp.zeros_like(maps), maps), min=float(info.min), max=float(info.max))


def _check_maps(maps: Tensor) -> Tensor:
    if not is_array(maps):
        maps = _as_arrays(maps)[0]
    if maps.ndim != 4:
        raise InputError(f"maps must be (B, T, H, W), got shape {tuple(maps.shape)}")
    return maps


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a fraction of the map's max in [0, 1], got {value}")
    return value


def foreground_masks(maps: Tensor, threshold: float) -> Tensor:
    """``maps >= threshold * max`` per map: bool ``(B, T, H, W)``; degenerate maps give all False.

    Args:
        maps: ``(B, T, H, W)`` float maps (NaN is read as 0).
        threshold: fraction of each map's maximum, in [0, 1].
    """
    maps = _finite(_check_maps(maps))
    threshold = _check_fraction("threshold", threshold)
    xp = namespace(maps)
    peak = xp.max(_flat(maps, xp), axis=-1)[..., None, None]  # (B, T, 1, 1)
    ok = xp.isfinite(peak) & (peak > 0)
    return (maps >= threshold * peak) & ok


def _bbox(mask: Tensor) -> Tensor:
    """Box ``(..., 4)`` around the True pixels of bool ``(..., H, W)``; all-False gives the whole image."""
    H, W = mask.shape[-2:]
    xp, ops = namespace(mask), ops_for(mask)
    rows, cols = xp.any(mask, axis=-1), xp.any(mask, axis=-2)  # (..., H), (..., W)

    def span(hit: Tensor, n: int) -> tuple[Tensor, Tensor]:
        idx = ops.asarray(np.arange(n, dtype=np.int64), like=hit)
        zero, full = ops.asarray(np.int64(0), like=hit), ops.asarray(np.int64(n), like=hit)  # 0-d
        lo = xp.min(xp.where(hit, idx, full), axis=-1)
        hi = xp.max(xp.where(hit, idx + 1, zero), axis=-1)
        empty = ~xp.any(hit, axis=-1)
        return xp.where(empty, zero, lo), xp.where(empty, full, hi)

    y0, y1 = span(rows, H)
    x0, x1 = span(cols, W)
    return xp.astype(xp.stack([x0, y0, x1, y1], axis=-1), xp.int64, copy=False)


def _largest_component(fg: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of bool ``(H, W)`` (ties: the first in raster order)."""
    labels, n = ndimage.label(fg, structure=_EIGHT)
    if n <= 1:
        return fg
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == int(np.argmax(sizes)) + 1


def boxes_from_maps(maps: Tensor, threshold: float = 0.2, *, largest: bool = True) -> Tensor:
    """One box per map, as in the CAM paper's weakly supervised localisation.

    Pixels with ``map >= threshold * map.max()`` are kept; with ``largest=True`` the box is the
    bounding box of the largest 8-connected component of them (by pixel count; ties go to the
    component met first in raster order), with ``largest=False`` the box around all of them.

    Args:
        maps: ``(B, T, H, W)`` maps, e.g. ``explain(...).maps`` in [0, 1].
        threshold: fraction of each map's maximum, in [0, 1] (0.2 in Zhou et al.).
        largest: keep only the largest connected component.

    Returns:
        ``(B, T, 4)`` long ``(x0, y0, x1, y1)``, inclusive-exclusive (``x0 <= x < x1``), on the
        maps' device. A degenerate map (max ``<= 0``) gets the whole image ``(0, 0, W, H)``.
    """
    fg = foreground_masks(maps, threshold)
    if largest:
        flat = ops_for(fg).to_numpy(fg).reshape(-1, *fg.shape[-2:])
        kept = np.stack([_largest_component(m) for m in flat]) if len(flat) else flat
        fg = ops_for(fg).asarray(kept.reshape(tuple(fg.shape)), like=fg)
    return _bbox(fg)


def boxes_all_components(maps: Tensor, threshold: float = 0.2, *, min_area: int = 1) -> list[list[Tensor]]:
    """Every 8-connected component's box, per map: ``B`` lists of ``T`` arrays ``(N_bt, 4)`` int64.

    Boxes are ``(x0, y0, x1, y1)`` inclusive-exclusive, sorted by component area (pixel count),
    largest first; components smaller than ``min_area`` pixels are dropped. A degenerate map
    gives an empty ``(0, 4)`` tensor (no fallback box here: there are no components).
    """
    fg = foreground_masks(maps, threshold)
    ops = ops_for(fg)
    arr = ops.to_numpy(fg)
    out: list[list[Tensor]] = []
    for b in range(arr.shape[0]):
        row = []
        for t in range(arr.shape[1]):
            labels, n = ndimage.label(arr[b, t], structure=_EIGHT)
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            found = []
            for i, sl in enumerate(ndimage.find_objects(labels)):
                if sl is not None and sizes[i] >= min_area:
                    found.append((int(sizes[i]), (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)))
            found.sort(key=lambda s: -s[0])  # stable: equal areas keep raster order
            row.append(ops.asarray(np.asarray([box for _, box in found], dtype=np.int64).reshape(-1, 4), like=fg))
        out.append(row)
    return out


def _as_images(images: Any, B: int, H: int, W: int) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 numpy from a tensor / array; checks the shape against the maps."""
    arr = np.asarray(_host(images))
    if arr.ndim == 3:
        arr = arr[None]
    if arr.shape != (B, H, W, 3):
        raise InputError(f"images must be (B, H, W, 3) = {(B, H, W, 3)} to match the maps, got {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputError(f"images must be uint8 (0..255), got {arr.dtype}")
    return arr


def _grabcut(image: np.ndarray, m: np.ndarray, threshold: float, low: float, high: float,
             iterations: int) -> Optional[np.ndarray]:
    """GrabCut one map; ``None`` when the initialisation lacks foreground or background."""
    import cv2

    peak = float(m.max())
    if not np.isfinite(peak) or peak <= 0:
        return None
    r = m / peak
    init = np.full(m.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    init[r >= threshold] = cv2.GC_PR_FGD
    init[r >= high] = cv2.GC_FGD
    init[r <= low] = cv2.GC_BGD
    fg = (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)
    if fg.all() or not fg.any():  # a GMM needs samples on both sides
        return None
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means initialisation: reproducible
    try:
        cv2.grabCut(np.ascontiguousarray(image), init, None, bgd, fgd, int(iterations), cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return None
    return (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)


def masks_from_maps(maps: Tensor, threshold: float = 0.5, *, refine: Optional[str] = None, images: Any = None,
                    iterations: int = 5, low: float = 0.1, high: float = 0.9) -> Tensor:
    """Foreground masks from maps: ``map >= threshold * map.max()``, optionally refined by GrabCut.

    With ``refine="grabcut"`` each map initialises OpenCV's GrabCut (``cv2.GC_INIT_WITH_MASK``)
    on its image, thresholds again as fractions of the map's max::

        map >= high                -> definite foreground  (GC_FGD)
        threshold <= map < high    -> probable foreground  (GC_PR_FGD)
        low < map < threshold      -> probable background  (GC_PR_BGD)
        map <= low                 -> definite background  (GC_BGD)

    and the mask is what GrabCut ends up labelling (probable or definite) foreground: colour
    models of the image snap the map's blurry edge to the object's. A map whose initialisation
    has no foreground or no background pixel keeps its plain threshold mask.

    Args:
        maps: ``(B, T, H, W)`` maps.
        threshold: fraction of each map's maximum, in [0, 1].
        refine: ``None`` or ``"grabcut"``.
        images: ``(B, H, W, 3)`` uint8 (tensor or array) at the maps' resolution; required by
            GrabCut (e.g. ``explain(...).display``, or ``LoadedModel.to_display(exp.inputs)``).
        iterations: GrabCut iterations.
        low, high: GrabCut's definite background / foreground fractions (``low <= threshold <= high``).

    Returns:
        ``(B, T, H, W)`` bool on the maps' device; a degenerate map (max ``<= 0``) gives an empty mask.
    """
    maps = _check_maps(maps)
    masks = foreground_masks(maps, threshold)
    if refine is None:
        return masks
    if refine != "grabcut":
        raise ConfigError(f"refine must be None or 'grabcut', got {refine!r}")
    low, high = _check_fraction("low", low), _check_fraction("high", high)
    if not low <= threshold <= high:
        raise ConfigError(f"need low <= threshold <= high, got {low}, {threshold}, {high}")
    if images is None:
        raise ConfigError("refine='grabcut' needs images (B, H, W, 3) uint8 at the maps' resolution")
    B, T, H, W = maps.shape
    imgs = _as_images(images, B, H, W)
    ops = ops_for(maps)
    arr = ops.to_numpy(_finite(ops.detach(maps)))
    out = np.array(ops.to_numpy(masks), copy=True)
    for b in range(B):
        for t in range(T):
            refined = _grabcut(imgs[b], arr[b, t], threshold, low, high, iterations)
            if refined is not None:
                out[b, t] = refined
    return ops.asarray(out, like=maps)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``(..., 4)`` ``(x0, y0, x1, y1)`` inclusive-exclusive, broadcast -> ``(...)`` float.

    Area is ``(x1 - x0) * (y1 - y0)``; boxes that only touch do not overlap. Two empty boxes
    (union 0) have IoU 0.
    """
    a, b = (to_float32(x) for x in _as_arrays(a, b))
    xp = namespace(a, b)
    iw = xp.clip(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), min=0)
    ih = xp.clip(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), min=0)
    inter = iw * ih

    def area(x: Tensor) -> Tensor:
        return xp.clip(x[..., 2] - x[..., 0], min=0) * xp.clip(x[..., 3] - x[..., 1], min=0)

    union = area(a) + area(b) - inter
    return xp.where(union > 0, inter / xp.clip(union, min=1e-12), xp.zeros_like(union))


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of bool masks over the last two dims, broadcast: ``(..., H, W)`` -> ``(...)`` float.

    Two empty masks (union 0) have IoU 0.
    """
    a, b = _as_arrays(a, b)
    xp = namespace(a, b)
    a, b = xp.astype(a, xp.bool, copy=False), xp.astype(b, xp.bool, copy=False)
    inter = xp.astype(xp.sum(_flat(a & b, xp), axis=-1), xp.float32)
    union = xp.astype(xp.sum(_flat(a | b, xp), axis=-1), xp.float32)
    return xp.where(union > 0, inter / xp.clip(union, min=1.0), xp.zeros_like(union))


# --------------------------------------------------------------------------------------------
# drawing (numpy uint8 in, numpy uint8 out)
# --------------------------------------------------------------------------------------------
def draw_boxes(image: Any, boxes: Any, labels: Optional[list[str]] = None,
               colors: Optional[list[tuple[int, int, int]]] = None, width: int = 2) -> np.ndarray:
    """Rectangles (and label text) drawn on a copy of ``image``.

    Args:
        image: ``(H, W, 3)`` uint8.
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` inclusive-exclusive, in the image's pixels.
        labels: N strings written on a filled tab at each box's top-left corner (inside the box
            when there is no room above it); a tab that would cover an earlier one is moved down
            (or up) a row at a time, so labels of boxes with the same corner stay readable.
        colors: N RGB colours (default: camlens's categorical palette, cycled).
        width: line width in pixels, drawn inwards from the box edge.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    from PIL import Image, ImageDraw, ImageFont

    from ..viz import PALETTE

    arr = np.asarray(_host(image))
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(f"image must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    bx = np.asarray(_host(boxes), dtype=np.int64).reshape(-1, 4)
    pil = Image.fromarray(np.ascontiguousarray(arr))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    placed: list[tuple[int, int, int, int]] = []  # label tabs drawn so far: never drawn over each other
    for i, (x0, y0, x1, y1) in enumerate(bx.tolist()):
        colour = tuple(colors[i]) if colors else PALETTE[i % len(PALETTE)]
        if x1 <= x0 or y1 <= y0:
            continue
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)  # PIL's corners are inclusive
        if labels:
            l, t, r, b = draw.textbbox((0, 0), labels[i], font=font)
            tw, th = r - l + 4, b - t + 4
            tx, ty = _label_spot(placed, x0, y0, tw, th, pil.width, pil.height)
            placed.append((tx, ty, tx + tw, ty + th))
            draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
            draw.text((tx + 2 - l, ty + 2 - t), labels[i], fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def _label_spot(placed: list, x0: int, y0: int, tw: int, th: int, W: int, H: int) -> tuple[int, int]:
    """Top-left corner of a ``tw x th`` label tab for a box at ``(x0, y0)`` that overlaps none of the
    ``placed`` tabs: above the box if there is room, else just inside it, else stacked downwards
    (then upwards) one tab height at a time; the first spot if every row is taken."""
    tx = max(0, min(x0, W - tw))
    first = y0 - th if y0 - th >= 0 else y0
    rows = [first] + [first + k * th for k in range(1, H // max(th, 1) + 1)] + \
           [first - k * th for k in range(1, H // max(th, 1) + 1)]
    for ty in rows:
        if ty < 0 or ty + th > max(H, th):
            continue
        if not any(tx < px1 and px0 < tx + tw and ty < py1 and py0 < ty + th for px0, py0, px1, py1 in placed):
            return tx, ty
    return tx, first


def cutout(image: Any, mask: Any) -> np.ndarray:
    """The foreground of ``image`` (H, W, 3) uint8 as RGBA ``(H, W, 4)`` uint8, alpha = mask * 255."""
    arr = np.asarray(_host(image))
    m = np.asarray(_host(mask)).astype(bool)
    if arr.shape[:2] != m.shape or arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"image (H, W, 3) and mask (H, W) must match, got {arr.shape} and {m.shape}")
    return np.concatenate([arr.astype(np.uint8), (m * 255).astype(np.uint8)[..., None]], axis=-1)
