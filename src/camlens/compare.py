"""Agreement and conflict between the maps of several targets (across heads) of one explanation.

For each pair ``(i, j)`` of an image's targets, with final maps ``m_i, m_j`` in [0, 1] and raw maps
``r_i = sum_c w_ic A_c`` (the layer's channel weights applied to its activations, upsampled):

* ``overlap``  = ``min(m_i, m_j)``: where both are high;
* ``only``     = ``m_i (1 - m_j)`` and ``m_j (1 - m_i)``: where only one is high;
* ``conflict`` = ``min(r_i⁺, r_j⁻) - min(r_j⁺, r_i⁻)`` with ``r`` scaled by its max ``|r|``: positive
  where target i's head pushes a region that target j's suppresses, negative for the reverse;
* ``iou``      = IoU of the two top-``top`` fractions of pixels (default the top 20 %);
* ``pearson``  = Pearson correlation of the two maps over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Optional

import torch
from torch import Tensor

from .explanation import Explanation
from .postprocess import upsample
from .errors import ConfigError

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
                row["conflict_mass"] = round(float(self.conflict[b, p].abs().mean()), 4)
            rows.append(row)
        return rows


def top_fraction_mask(maps: Tensor, top: float) -> Tensor:
    """Boolean masks ``(..., H, W)`` of each map's top ``top`` fraction of pixels (ties broken by order)."""
    if not 0.0 < top <= 1.0:
        raise ConfigError(f"top is a fraction in (0, 1], got {top}")
    flat = maps.flatten(-2)
    k = max(1, round(top * flat.shape[-1]))
    idx = flat.topk(k, dim=-1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view_as(maps)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation over the last two dims; 0 where a map is constant."""
    a = a.flatten(-2).double()
    b = b.flatten(-2).double()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


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
    ii = torch.tensor([i for i, _ in pairs], device=exp.maps.device)
    jj = torch.tensor([j for _, j in pairs], device=exp.maps.device)
    mi, mj = exp.maps[:, ii], exp.maps[:, jj]  # (B, P, H, W)
    ti, tj = top_fraction_mask(mi, top), top_fraction_mask(mj, top)
    inter = (ti & tj).flatten(-2).sum(-1).float()
    union = (ti | tj).flatten(-2).sum(-1).float()
    iou = inter / union.clamp_min(1)
    conflict = None
    if exp.raws:
        raws = [upsample(r.float(), (H, W)) for r in exp.raws.values()]
        r = torch.stack(raws).mean(0)  # (B, T, H, W), layers averaged
        r = _unit_peak(r)
        ri, rj = r[:, ii], r[:, jj]
        conflict = (torch.minimum(ri.clamp_min(0), (-rj).clamp_min(0))
                    - torch.minimum(rj.clamp_min(0), (-ri).clamp_min(0)))
    return Agreement(pairs=pairs, labels=[(exp.targets[0][i].label, exp.targets[0][j].label) for i, j in pairs],
                     iou=iou, pearson=pearson(mi, mj), overlap=torch.minimum(mi, mj),
                     only=torch.stack([mi * (1 - mj), mj * (1 - mi)], dim=2), conflict=conflict)


def _unit_peak(r: Tensor) -> Tensor:
    """``r / max|r|`` per map (last two axes), scale-free: a map of raw values around 1e-15 is scaled
    like one around 1 (no absolute floor); an all-zero map stays zero."""
    peak = r.flatten(-2).abs().amax(-1)[..., None, None]
    return torch.where(peak > 0, r / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(r))


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
    maps = exp.maps[:, :n].float()
    tops = top_fraction_mask(maps, top)  # (B, n, H, W) bool
    r = None
    if exp.raws:
        r = None
        for raw in exp.raws.values():  # layers averaged, one at a time
            u = upsample(raw[:, :n].float(), (H, W))
            r = u if r is None else r + u
        r = r / len(exp.raws)
        r = _unit_peak(r)
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        ii = torch.tensor([i for i, _ in part], device=maps.device)
        jj = torch.tensor([j for _, j in part], device=maps.device)
        ti, tj = tops[:, ii], tops[:, jj]
        inter = (ti & tj).flatten(-2).sum(-1).float()
        union = (ti | tj).flatten(-2).sum(-1).float()
        iou = (inter / union.clamp_min(1)).cpu()
        pr = pearson(maps[:, ii], maps[:, jj]).cpu()
        cm = None
        if r is not None:
            ri, rj = r[:, ii], r[:, jj]
            cm = (torch.minimum(ri.clamp_min(0), (-rj).clamp_min(0))
                  - torch.minimum(rj.clamp_min(0), (-ri).clamp_min(0))).abs().flatten(-2).mean(-1).cpu()
        for p, (i, j) in enumerate(part):
            for b in range(B):
                row = {"targets": [exp.targets[b][i].label, exp.targets[b][j].label], "index": [i, j],
                       "iou": round(float(iou[b, p]), 4), "pearson": round(float(pr[b, p]), 4)}
                if cm is not None:
                    row["conflict_mass"] = round(float(cm[b, p]), 4)
                out[b].append(row)
    return out
