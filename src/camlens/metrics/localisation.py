"""Localisation metrics against ground-truth masks or boxes: pointing game, relevance mass, relevance rank.

Maps ``(B, T, H, W)``; ground truth per image and target, ``ctx.masks`` ``(B, T, H, W)`` bool or
``ctx.boxes`` ``(B, T, 4)`` ``(x0, y0, x1, y1)`` in pixels (masks win when both are given). A box
covers the pixels whose centre ``(col + 0.5, row + 0.5)`` lies in ``[x0, x1] x [y0, y1]``: an
integer box covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``. An empty mask gives NaN
(no object to point at), which :meth:`camlens.Scores.summary` leaves out.

**Volumes and clips.** Maps ``(B, T, D, H, W)`` are scored over all voxels against masks
``(B, T, D, H, W)`` or boxes ``(B, T, 6)`` ``(x0, y0, z0, x1, y1, z1)`` (the 2-D order with depth /
time ``z`` added: voxel (slice s, row r, col c) is inside when its centre ``(c, r, s) + 0.5`` is in
the box, as for images). The pointing game's point is the volume's maximum ``(slice, row, col)``
and its tolerance a ball of ``tolerance`` voxels (Euclidean distance between voxel indices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import array_api_compat

from ..backends.base import namespace
from ..core.errors import ConfigError, InputError
from ..core.registry import Option, number
from .base import EvalContext, Metric, MetricResult, Tensor, as_array_like, flat_spatial, order_pixels, register_metric

__all__ = ["boxes_to_masks", "ground_truth", "pointing_game", "relevance_mass", "relevance_rank", "PointingGame",
           "RelevanceMass", "RelevanceRank"]


def boxes_to_masks(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Boxes ``(..., 4)`` ``(x0, y0, x1, y1)`` -> bool masks ``(..., H, W)``: pixel (row r, col c) is
    inside when ``x0 <= c + 0.5 <= x1`` and ``y0 <= r + 0.5 <= y1``.

    Volumes: ``size = (D, H, W)`` and boxes ``(..., 6)`` ``(x0, y0, z0, x1, y1, z1)`` -> masks
    ``(..., D, H, W)``; voxel (slice s, row r, col c) also needs ``z0 <= s + 0.5 <= z1``."""
    size = tuple(int(v) for v in size)
    k = len(size)  # 2 or 3 axes: the box has 2 k corners' coordinates
    if boxes.shape[-1] != 2 * k:
        raise InputError(f"boxes for a {'x'.join(map(str, size))} grid must be (..., {2 * k}) "
                         f"({', '.join(('x0', 'y0', 'z0')[:k])}, {', '.join(('x1', 'y1', 'z1')[:k])}); "
                         f"got {tuple(boxes.shape)}")
    xp = namespace(boxes)
    b = xp.astype(boxes, xp.float32)
    dev = array_api_compat.device(b)
    inside = None
    for a in range(k):  # a = 0: x (the last axis), 1: y, 2: z (depth / time)
        n = size[-1 - a]
        centre = xp.arange(n, device=dev, dtype=b.dtype) + 0.5
        along = (centre >= b[..., a, None]) & (centre <= b[..., k + a, None])  # (..., n)
        lead = along.shape[:-1]
        along = xp.reshape(along, (*lead, *([1] * (k - 1 - a)), n, *([1] * a)))  # (..., 1, n, 1): on axis -1 - a
        inside = along if inside is None else inside & along
    return inside


def ground_truth(ctx: EvalContext) -> Tensor:
    """Bool masks ``(B, T, H, W)`` (volumes: ``(B, T, D, H, W)``) on the maps' device: ``ctx.masks``,
    else ``ctx.boxes`` as masks."""
    xp = namespace(ctx.maps)
    if ctx.masks is not None:
        return xp.astype(as_array_like(ctx.masks, ctx.maps), xp.bool)
    if ctx.boxes is not None:
        return boxes_to_masks(as_array_like(ctx.boxes, ctx.maps), tuple(ctx.maps.shape[2:]))
    raise ConfigError("localisation metrics need masks= or boxes=")


def _nan_if_empty(values: Tensor, mask: Tensor, spatial: int = 2) -> Tensor:
    xp = namespace(values, mask)
    return xp.where(xp.any(flat_spatial(mask, spatial), axis=-1), values, xp.full_like(values, float("nan")))


@dataclass(frozen=True)
class PointingGame(Metric):
    """Pointing game (Zhang et al., Top-down Neural Attention by Excitation Backprop, ECCV 2016).

    The point is the map's maximum — the first one in raster order when several pixels tie
    (``torch.argmax``). A hit (1.0) when a ground-truth pixel lies strictly closer than ``tolerance``
    pixels (Euclidean distance between pixel indices) to the point, as TorchRay's ``PointingGame``,
    or is the point itself (so ``tolerance=0`` means "the maximum is inside the mask"); else a miss
    (0.0). Equivalent to testing the point against the mask dilated by an open disc of radius
    ``tolerance``. ``extra["points"]``: ``(B, T, 2)`` (row, col) of each map's point.
    Option: ``tolerance`` (default 15 px). Volumes: the maximum over all voxels (first in raster
    order depth, row, column), a ball of radius ``tolerance`` voxels, points ``(B, T, 3)``
    (slice, row, col).
    """

    def __call__(self, ctx: EvalContext) -> MetricResult:
        hit, points = pointing_game(ctx.maps, ground_truth(ctx), float(ctx.opt(self, "tolerance")), ctx.spatial)
        return MetricResult(values=hit, extra={"points": points})


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 15, spatial: int = 2) -> tuple[Tensor, Tensor]:
    """The pointing game of :class:`PointingGame` on maps ``(..., H, W)`` and bool masks of the same
    shape: hits ``(...)`` (1.0 / 0.0, NaN where the mask is empty) and the points ``(..., 2)`` (row, col).

    ``spatial=3``: maps and masks ``(..., D, H, W)``, the maximum over all voxels, a hit when a mask
    voxel ``v`` has ``|v - point|_2 < tolerance`` (voxel indices) or is the point; points
    ``(..., 3)`` (slice, row, col)."""
    grid = tuple(maps.shape[maps.ndim - spatial:])
    xp = namespace(maps)
    dev = array_api_compat.device(maps)
    gt = xp.astype(as_array_like(masks, maps), xp.bool)
    idx = xp.argmax(flat_spatial(maps, spatial), axis=-1)  # first maximum
    coords, rest = [], idx
    for n in grid[::-1]:  # unravel: the last axis first
        coords.insert(0, rest % n)
        rest = rest // n
    d2 = None
    for a, (n, p) in enumerate(zip(grid, coords)):  # squared distance of every cell to the point, (..., *grid)
        ax = xp.reshape(xp.arange(n, device=dev, dtype=idx.dtype), (n, *([1] * (spatial - 1 - a))))
        term = (ax - xp.reshape(p, (*p.shape, *([1] * spatial)))) ** 2
        d2 = term if d2 is None else d2 + term
    accept = (xp.astype(d2, xp.float64) < tolerance * tolerance) | (d2 == 0)
    hit = xp.astype(xp.any(flat_spatial(gt & accept, spatial), axis=-1), xp.float32)
    return _nan_if_empty(hit, gt, spatial), xp.stack(coords, axis=-1)


def relevance_mass(maps: Tensor, masks: Tensor, spatial: int = 2) -> Tensor:
    """Relevance mass accuracy of :class:`RelevanceMass` on maps ``(..., H, W)`` and bool masks of the
    same shape: ``Σ_{p in mask} R_p / Σ_p R_p`` with ``R = max(map, 0)`` (float64 sums), ``(...)``
    float32 in [0, 1]; 0 where the map has no positive mass, NaN where the mask is empty.
    ``spatial=3``: ``(..., D, H, W)``, the sums over all voxels."""
    xp = namespace(maps, masks)
    r = xp.astype(flat_spatial(xp.clip(maps, min=0), spatial), xp.float64)
    total = xp.sum(r, axis=-1)
    inside = xp.sum(r * xp.astype(flat_spatial(masks, spatial), r.dtype), axis=-1)
    v = xp.where(total > 0, inside / xp.clip(total, min=xp.finfo(r.dtype).smallest_normal), xp.zeros_like(total))
    return _nan_if_empty(xp.astype(v, xp.float32), masks, spatial)


def relevance_rank(maps: Tensor, masks: Tensor, spatial: int = 2) -> Tensor:
    """Relevance rank accuracy of :class:`RelevanceRank` on maps ``(..., H, W)`` and bool masks of the
    same shape: with K the mask's pixel count, ``|top_K(map) ∩ mask| / K`` (ties in raster order),
    ``(...)`` float32 in [0, 1]; NaN where the mask is empty. ``spatial=3``: ``(..., D, H, W)``,
    K voxels of the whole volume."""
    xp = namespace(maps, masks)
    gt = flat_spatial(masks, spatial)  # (..., HW)
    k = xp.count_nonzero(gt, axis=-1)  # (...)
    order = order_pixels(maps, spatial=spatial)  # (..., HW) descending
    top = xp.arange(gt.shape[-1], device=array_api_compat.device(gt)) < k[..., None]  # first K places of the order
    hits = xp.count_nonzero(xp.take_along_axis(gt, order, axis=-1) & top, axis=-1)
    v = xp.astype(hits, xp.float64) / xp.astype(xp.clip(k, min=1), xp.float64)
    return _nan_if_empty(xp.astype(v, xp.float32), masks, spatial)


@dataclass(frozen=True)
class RelevanceMass(Metric):
    """Relevance mass accuracy (Arras et al., CLEVR-XAI, Information Fusion 2022): the share of the
    map's positive relevance inside the mask, ``Σ_{p in mask} R_p / Σ_p R_p`` with
    ``R = max(map, 0)``; in [0, 1]. A map with no positive mass scores 0."""

    def __call__(self, ctx: EvalContext) -> MetricResult:
        return MetricResult(values=relevance_mass(ctx.maps, ground_truth(ctx), ctx.spatial))


@dataclass(frozen=True)
class RelevanceRank(Metric):
    """Relevance rank accuracy (Arras et al., 2022): with K = the mask's pixel count, the fraction of
    the map's K highest pixels that lie in the mask, ``|top_K(map) ∩ mask| / K``; in [0, 1]. Ties
    are ranked in raster order (stable sort), so a constant map picks the first K pixels."""

    def __call__(self, ctx: EvalContext) -> MetricResult:
        return MetricResult(values=relevance_rank(ctx.maps, ground_truth(ctx), ctx.spatial))


_REQ = ("masks|boxes",)
register_metric(PointingGame(
    name="pointing_game", higher_is_better=True, category="localisation",
    description="Pointing game: the map's maximum within `tolerance` px of the mask (Zhang et al., 2016)",
    requires=_REQ, defaults={"tolerance": Option(15, lambda v: None if number(v) is None and v >= 0
                                                     else "a number of pixels >= 0", "distance to the mask")},
    volumes=True))
register_metric(RelevanceMass(
    name="relevance_mass", higher_is_better=True, category="localisation",
    description="Relevance mass accuracy: share of the map's mass inside the mask (Arras et al., 2022)",
    requires=_REQ, volumes=True))
register_metric(RelevanceRank(
    name="relevance_rank", higher_is_better=True, category="localisation",
    description="Relevance rank accuracy: share of the top-K pixels inside the K-pixel mask (Arras et al., 2022)",
    requires=_REQ, volumes=True))
