"""Localisation metrics against ground-truth masks or boxes: pointing game, relevance mass, relevance rank.

Maps ``(B, T, H, W)``; ground truth per image and target, ``ctx.masks`` ``(B, T, H, W)`` bool or
``ctx.boxes`` ``(B, T, 4)`` ``(x0, y0, x1, y1)`` in pixels (masks win when both are given). A box
covers the pixels whose centre ``(col + 0.5, row + 0.5)`` lies in ``[x0, x1] x [y0, y1]``: an
integer box covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``. An empty mask gives NaN
(no object to point at), which :meth:`camlens.Scores.summary` leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from ..backends.base import namespace
from ..core.errors import ConfigError
from ..core.registry import Option, number
from .base import EvalContext, Metric, MetricResult, Tensor, as_array_like, order_pixels, register_metric

__all__ = ["boxes_to_masks", "ground_truth", "pointing_game", "relevance_mass", "relevance_rank", "PointingGame",
           "RelevanceMass", "RelevanceRank"]


def boxes_to_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boxes ``(..., 4)`` ``(x0, y0, x1, y1)`` -> bool masks ``(..., H, W)``: pixel (row r, col c) is
    inside when ``x0 <= c + 0.5 <= x1`` and ``y0 <= r + 0.5 <= y1``."""
    H, W = size
    xp = namespace(boxes)
    b = xp.astype(boxes, xp.float32)
    dev = array_api_compat.device(b)
    cx = xp.arange(W, device=dev, dtype=b.dtype) + 0.5
    cy = xp.arange(H, device=dev, dtype=b.dtype) + 0.5
    x0, y0, x1, y1 = (b[..., k, None] for k in range(4))
    in_x = (cx >= x0) & (cx <= x1)  # (..., W)
    in_y = (cy >= y0) & (cy <= y1)  # (..., H)
    return in_y[..., :, None] & in_x[..., None, :]


def ground_truth(ctx: EvalContext) -> Tensor:
    """Bool masks ``(B, T, H, W)`` on the maps' device: ``ctx.masks``, else ``ctx.boxes`` as masks."""
    xp = namespace(ctx.maps)
    if ctx.masks is not None:
        return xp.astype(as_array_like(ctx.masks, ctx.maps), xp.bool)
    if ctx.boxes is not None:
        return boxes_to_masks(as_array_like(ctx.boxes, ctx.maps), tuple(ctx.maps.shape[-2:]))
    raise ConfigError("localisation metrics need masks= or boxes=")


def _flat(x: Tensor) -> Tensor:
    """``(..., H, W) -> (..., H*W)``."""
    return namespace(x).reshape(x, (*x.shape[:-2], x.shape[-2] * x.shape[-1]))


def _nan_if_empty(values: Tensor, mask: Tensor) -> Tensor:
    xp = namespace(values, mask)
    return xp.where(xp.any(_flat(mask), axis=-1), values, xp.full_like(values, float("nan")))


@dataclass(frozen=True)
class PointingGame(Metric):
    """Pointing game (Zhang et al., Top-down Neural Attention by Excitation Backprop, ECCV 2016).

    The point is the map's maximum — the first one in raster order when several pixels tie
    (``torch.argmax``). A hit (1.0) when a ground-truth pixel lies strictly closer than ``tolerance``
    pixels (Euclidean distance between pixel indices) to the point, as TorchRay's ``PointingGame``,
    or is the point itself (so ``tolerance=0`` means "the maximum is inside the mask"); else a miss
    (0.0). Equivalent to testing the point against the mask dilated by an open disc of radius
    ``tolerance``. ``extra["points"]``: ``(B, T, 2)`` (row, col) of each map's point.
    Option: ``tolerance`` (default 15 px).
    """

    def __call__(self, ctx: EvalContext) -> MetricResult:
        hit, points = pointing_game(ctx.maps, ground_truth(ctx), float(ctx.opt(self, "tolerance")))
        return MetricResult(values=hit, extra={"points": points})


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 15) -> tuple[Tensor, Tensor]:
    """The pointing game of :class:`PointingGame` on maps ``(..., H, W)`` and bool masks of the same
    shape: hits ``(...)`` (1.0 / 0.0, NaN where the mask is empty) and the points ``(..., 2)`` (row, col)."""
    H, W = maps.shape[-2:]
    xp = namespace(maps)
    dev = array_api_compat.device(maps)
    gt = xp.astype(as_array_like(masks, maps), xp.bool)
    idx = xp.argmax(_flat(maps), axis=-1)  # first maximum
    py, px = idx // W, idx % W
    rows = xp.arange(H, device=dev, dtype=idx.dtype)
    cols = xp.arange(W, device=dev, dtype=idx.dtype)
    d2 = (xp.reshape(rows, (H, 1)) - py[..., None, None]) ** 2 + (xp.reshape(cols, (1, W)) - px[..., None, None]) ** 2
    accept = (xp.astype(d2, xp.float64) < tolerance * tolerance) | (d2 == 0)
    hit = xp.astype(xp.any(_flat(gt & accept), axis=-1), xp.float32)
    return _nan_if_empty(hit, gt), xp.stack([py, px], axis=-1)


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance mass accuracy of :class:`RelevanceMass` on maps ``(..., H, W)`` and bool masks of the
    same shape: ``Σ_{p in mask} R_p / Σ_p R_p`` with ``R = max(map, 0)`` (float64 sums), ``(...)``
    float32 in [0, 1]; 0 where the map has no positive mass, NaN where the mask is empty."""
    xp = namespace(maps, masks)
    r = xp.astype(_flat(xp.clip(maps, min=0)), xp.float64)
    total = xp.sum(r, axis=-1)
    inside = xp.sum(r * xp.astype(_flat(masks), r.dtype), axis=-1)
    v = xp.where(total > 0, inside / xp.clip(total, min=xp.finfo(r.dtype).smallest_normal), xp.zeros_like(total))
    return _nan_if_empty(xp.astype(v, xp.float32), masks)


def relevance_rank(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance rank accuracy of :class:`RelevanceRank` on maps ``(..., H, W)`` and bool masks of the
    same shape: with K the mask's pixel count, ``|top_K(map) ∩ mask| / K`` (ties in raster order),
    ``(...)`` float32 in [0, 1]; NaN where the mask is empty."""
    xp = namespace(maps, masks)
    gt = _flat(masks)  # (..., HW)
    k = xp.count_nonzero(gt, axis=-1)  # (...)
    order = order_pixels(maps)  # (..., HW) descending
    top = xp.arange(gt.shape[-1], device=array_api_compat.device(gt)) < k[..., None]  # first K places of the order
    hits = xp.count_nonzero(xp.take_along_axis(gt, order, axis=-1) & top, axis=-1)
    v = xp.astype(hits, xp.float64) / xp.astype(xp.clip(k, min=1), xp.float64)
    return _nan_if_empty(xp.astype(v, xp.float32), masks)


@dataclass(frozen=True)
class RelevanceMass(Metric):
    """Relevance mass accuracy (Arras et al., CLEVR-XAI, Information Fusion 2022): the share of the
    map's positive relevance inside the mask, ``Σ_{p in mask} R_p / Σ_p R_p`` with
    ``R = max(map, 0)``; in [0, 1]. A map with no positive mass scores 0."""

    def __call__(self, ctx: EvalContext) -> MetricResult:
        return MetricResult(values=relevance_mass(ctx.maps, ground_truth(ctx)))


@dataclass(frozen=True)
class RelevanceRank(Metric):
    """Relevance rank accuracy (Arras et al., 2022): with K = the mask's pixel count, the fraction of
    the map's K highest pixels that lie in the mask, ``|top_K(map) ∩ mask| / K``; in [0, 1]. Ties
    are ranked in raster order (stable sort), so a constant map picks the first K pixels."""

    def __call__(self, ctx: EvalContext) -> MetricResult:
        return MetricResult(values=relevance_rank(ctx.maps, ground_truth(ctx)))


_REQ = ("masks|boxes",)
register_metric(PointingGame(
    name="pointing_game", higher_is_better=True, category="localisation",
    description="Pointing game: the map's maximum within `tolerance` px of the mask (Zhang et al., 2016)",
    requires=_REQ, defaults={"tolerance": Option(15, lambda v: None if number(v) is None and v >= 0
                                                     else "a number of pixels >= 0", "distance to the mask")}))
register_metric(RelevanceMass(
    name="relevance_mass", higher_is_better=True, category="localisation",
    description="Relevance mass accuracy: share of the map's mass inside the mask (Arras et al., 2022)",
    requires=_REQ))
register_metric(RelevanceRank(
    name="relevance_rank", higher_is_better=True, category="localisation",
    description="Relevance rank accuracy: share of the top-K pixels inside the K-pixel mask (Arras et al., 2022)",
    requires=_REQ))
