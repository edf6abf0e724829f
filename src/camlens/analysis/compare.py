"""Agreement and conflict between the maps of several targets (across heads) of one explanation.

For each pair ``(i, j)`` of an image's targets, with final maps ``m_i, m_j`` in [0, 1] and raw maps
``r_i = sum_c w_ic A_c`` (the layer's channel weights applied to its activations, upsampled):

* ``overlap``  = ``min(m_i, m_j)``: where both are high;
* ``only``     = ``m_i (1 - m_j)`` and ``m_j (1 - m_i)``: where only one is high;
* ``conflict`` = ``min(r_i⁺, r_j⁻) - min(r_j⁺, r_i⁻)`` with ``r`` scaled by its max ``|r|``: positive
  where target i's head pushes a region that target j's suppresses, negative for the reverse;
* ``iou``      = IoU of the two top-``top`` fractions of pixels (default the top 20 %);
* ``pearson``  = Pearson correlation of the two maps over pixels.

Framework-free (array-API maths): the maps of any backend, torch tensors or NumPy arrays alike;
the results are arrays of the same kind, on the same device.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Optional

from ..backends.base import namespace, ops_for, to_float32
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.postprocess import upsample

Tensor = Any  # an array: a torch tensor, a NumPy array, ...

__all__ = ["Agreement", "agreement", "agreement_summary", "top_fraction_mask", "pearson"]

#: Default cap of :func:`agreement_summary`: pairwise statistics of the first 16 targets (120 pairs).
MAX_AGREEMENT_TARGETS = 16


@dataclass
class Agreement:
    """Pairwise agreement of an explanation's targets. P pairs, B images.

    Attributes:
        pairs: the P target-index pairs ``(i, j)``, ``i < j``.
        labels: per pair, the two targets' labels (first image).
        iou: ``(B, P)``; pearson: ``(B, P)``.
        overlap: ``(B, P, H, W)``; only: ``(B, P, 2, H, W)``.
        conflict: ``(B, P, H, W)`` signed, in [-1, 1]; ``None`` when the method has no raw layer maps.

    Arrays of the explanation's kind (torch tensors on its device, NumPy arrays, ...).
    """

    pairs: list[tuple[int, int]]
    labels: list[tuple[str, str]]
    iou: Tensor
    pearson: Tensor
    overlap: Tensor
    only: Tensor
    conflict: Optional[Tensor]

    def summary(self, b: int = 0) -> list[dict[str, Any]]:
        """Per pair of image ``b``: labels, IoU, Pearson and the conflict mass (mean |conflict|)."""
        rows = []
        for p, ((i, j), (li, lj)) in enumerate(zip(self.pairs, self.labels)):
            row = {"targets": [li, lj], "index": [i, j], "iou": round(float(self.iou[b, p]), 4),
                   "pearson": round(float(self.pearson[b, p]), 4)}
            if self.conflict is not None:
                xp = namespace(self.conflict)
                row["conflict_mass"] = round(float(xp.mean(xp.abs(self.conflict[b, p]))), 4)
            rows.append(row)
        return rows


def _flat(x: Tensor, xp: Any) -> Tensor:
    """``(..., H, W) -> (..., H * W)`` (a view where the layout allows it)."""
    return xp.reshape(x, (*x.shape[:-2], x.shape[-2] * x.shape[-1]))


def top_fraction_mask(maps: Tensor, top: float) -> Tensor:
    """Boolean masks ``(..., H, W)`` of each map's top ``top`` fraction of pixels (ties broken by order)."""
    if not 0.0 < top <= 1.0:
        raise ConfigError(f"top is a fraction in (0, 1], got {top}")
    xp = namespace(maps)
    flat = _flat(maps, xp)
    k = max(1, round(top * flat.shape[-1]))
    return xp.reshape(ops_for(maps).top_mask(flat, k), maps.shape)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation over the last two dims; 0 where a map is constant."""
    xp = namespace(a, b)
    a = xp.astype(_flat(a, xp), xp.float64, copy=False)
    b = xp.astype(_flat(b, xp), xp.float64, copy=False)
    a = a - xp.mean(a, axis=-1, keepdims=True)
    b = b - xp.mean(b, axis=-1, keepdims=True)
    den = xp.linalg.vector_norm(a, axis=-1) * xp.linalg.vector_norm(b, axis=-1)
    r = xp.where(den > 0, xp.sum(a * b, axis=-1) / xp.clip(den, min=1e-300), xp.zeros_like(den))
    return xp.astype(r, xp.float32)


def _iou(ti: Tensor, tj: Tensor, xp: Any) -> Tensor:
    """IoU of bool masks ``(..., H, W)`` -> ``(...)`` float32 (0 for two empty masks)."""
    inter = xp.astype(xp.sum(_flat(ti & tj, xp), axis=-1), xp.float32)
    union = xp.astype(xp.sum(_flat(ti | tj, xp), axis=-1), xp.float32)
    return inter / xp.clip(union, min=1.0)


def _conflict(ri: Tensor, rj: Tensor, xp: Any) -> Tensor:
    """``min(r_i⁺, r_j⁻) - min(r_j⁺, r_i⁻)`` of unit-peak raw maps."""
    return (xp.minimum(xp.clip(ri, min=0), xp.clip(-rj, min=0))
            - xp.minimum(xp.clip(rj, min=0), xp.clip(-ri, min=0)))


def _indices(pairs: list[tuple[int, int]], like: Tensor) -> tuple[Tensor, Tensor]:
    """The first and second target index of each pair, as integer arrays of ``like``'s kind and device."""
    ops = ops_for(like)
    return ops.asarray([i for i, _ in pairs], like=like), ops.asarray([j for _, j in pairs], like=like)


def agreement(exp: Explanation, top: float = 0.2) -> Agreement:
    """Pairwise agreement / conflict of each image's targets (needs T >= 2).

    Returns the full per-pixel ``overlap`` / ``only`` / ``conflict`` maps: memory grows as
    pairs x H x W (``T (T - 1) / 2`` pairs), so use it for a handful of targets; for summary
    numbers of many targets use :func:`agreement_summary` (bounded memory).
    """
    B, T, H, W = exp.maps.shape
    if T < 2:
        raise ConfigError("agreement needs at least two targets per image (try top_k=2 or several heads)")
    pairs = list(combinations(range(T), 2))
    xp = namespace(exp.maps)
    ii, jj = _indices(pairs, exp.maps)
    mi, mj = xp.take(exp.maps, ii, axis=1), xp.take(exp.maps, jj, axis=1)  # (B, P, H, W)
    iou = _iou(top_fraction_mask(mi, top), top_fraction_mask(mj, top), xp)
    conflict = None
    if exp.raws:
        raws = [upsample(to_float32(r), (H, W)) for r in exp.raws.values()]
        r = _unit_peak(xp.mean(xp.stack(raws), axis=0))  # (B, T, H, W), layers averaged
        conflict = _conflict(xp.take(r, ii, axis=1), xp.take(r, jj, axis=1), xp)
    return Agreement(pairs=pairs, labels=[(exp.targets[0][i].label, exp.targets[0][j].label) for i, j in pairs],
                     iou=iou, pearson=pearson(mi, mj), overlap=xp.minimum(mi, mj),
                     only=xp.stack([mi * (1 - mj), mj * (1 - mi)], axis=2), conflict=conflict)


def _unit_peak(r: Tensor) -> Tensor:
    """``r / max|r|`` per map (last two axes), scale-free: a map of raw values around 1e-15 is scaled
    like one around 1 (no absolute floor); an all-zero map stays zero."""
    xp = namespace(r)
    peak = xp.max(xp.abs(_flat(r, xp)), axis=-1)[..., None, None]
    return xp.where(peak > 0, r / xp.where(peak > 0, peak, xp.ones_like(peak)), xp.zeros_like(r))


def agreement_summary(exp: Explanation, top: float = 0.2, *, max_targets: Optional[int] = MAX_AGREEMENT_TARGETS,
                      chunk: int = 64) -> list[list[dict[str, Any]]]:
    """The numbers of :meth:`Agreement.summary` for every image, in bounded memory.

    Per image ``b``, one row per pair ``(i, j)`` of its first ``max_targets`` targets (all when
    ``None``): ``{"targets": [label_i, label_j], "index": [i, j], "iou", "pearson"}`` and, when the
    method has raw layer maps, ``"conflict_mass"`` (mean ``|conflict|``). The same values as
    ``agreement(exp).summary(b)``, but pairs are processed ``chunk`` at a time, so memory stays
    O(T H W + chunk H W) instead of O(pairs H W) whatever the number of targets.

    Returns ``B`` lists of rows (empty lists when fewer than two targets are compared).
    """
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    if max_targets is not None and max_targets < 0:
        raise ConfigError(f"max_targets must be >= 0 or None, got {max_targets}")
    B, T, H, W = exp.maps.shape
    n = T if max_targets is None else min(T, max_targets)
    out: list[list[dict[str, Any]]] = [[] for _ in range(B)]
    if n < 2:
        return out
    pairs = list(combinations(range(n), 2))
    maps = to_float32(exp.maps[:, :n])
    xp, ops = namespace(maps), ops_for(maps)
    tops = top_fraction_mask(maps, top)  # (B, n, H, W) bool
    r = None
    if exp.raws:
        r = None
        for raw in exp.raws.values():  # layers averaged, one at a time
            u = upsample(to_float32(raw[:, :n]), (H, W))
            r = u if r is None else r + u
        r = r / len(exp.raws)
        r = _unit_peak(r)
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        ii, jj = _indices(part, maps)
        iou = ops.to_numpy(_iou(xp.take(tops, ii, axis=1), xp.take(tops, jj, axis=1), xp))
        pr = ops.to_numpy(pearson(xp.take(maps, ii, axis=1), xp.take(maps, jj, axis=1)))
        cm = None
        if r is not None:
            c = _conflict(xp.take(r, ii, axis=1), xp.take(r, jj, axis=1), xp)
            cm = ops.to_numpy(xp.mean(_flat(xp.abs(c), xp), axis=-1))
        for p, (i, j) in enumerate(part):
            for b in range(B):
                row = {"targets": [exp.targets[b][i].label, exp.targets[b][j].label], "index": [i, j],
                       "iou": round(float(iou[b, p]), 4), "pearson": round(float(pr[b, p]), 4)}
                if cm is not None:
                    row["conflict_mass"] = round(float(cm[b, p]), 4)
                out[b].append(row)
    return out
