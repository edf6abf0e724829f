"""Post-processing of raw maps, on tensors on the model's device: ReLU, upsample, normalise, fuse.

The pipeline for one layer is ``normalize(upsample(relu(raw)))``. Min-max normalisation is affine
and bilinear upsampling is a convex combination, so this equals pytorch-grad-cam's
normalise → resize → normalise, and captum's ``LayerAttribution.interpolate`` + min-max.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["relu", "upsample", "normalize", "clip_quantile", "fuse", "process"]

CONSTANT_EPS = 1e-12


def relu(maps: Tensor) -> Tensor:
    """Keep positive evidence only: ``max(maps, 0)``."""
    return maps.clamp_min(0)


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, T, h, w)`` maps to ``(B, T, *size)``; bilinear with ``align_corners=False``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.float(), size=tuple(size), mode=mode, **kw)


def normalize(maps: Tensor, *, warn: bool = True) -> Tensor:
    """Per-map min-max to [0, 1]: ``(m - min) / (max - min)`` over the last two dims.

    A constant map (``max - min`` below ``1e-12`` relative to its magnitude, e.g. all zero after
    ReLU) becomes all zero — never NaN or inf — with a warning naming how many maps were constant.
    """
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    span = hi - lo
    const = span <= CONSTANT_EPS * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    out = torch.where(const, torch.zeros_like(flat), (flat - lo) / torch.where(const, torch.ones_like(span), span))
    if warn:
        n = int(const.sum())
        if n:
            warnings.warn(f"{n} of {const.numel()} maps are constant (no positive evidence at this layer); "
                          "they are returned as all-zero maps", RuntimeWarning, stacklevel=3)
    return out.view_as(maps)


def clip_quantile(maps: Tensor, q: float) -> Tensor:
    """Cap each map ``(..., H, W)`` at its ``q`` quantile (``q`` in (0, 1]; 1 leaves it unchanged).

    Gradient maps are heavy-tailed: without a cap a few pixels take the whole [0, 1] range after
    min-max (captum's visualisation caps the top 2 % for the same reason).
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"clip is a quantile in (0, 1], got {q}")
    if q == 1.0:
        return maps
    cap = torch.quantile(maps.flatten(-2).float(), q, dim=-1)[..., None, None].to(maps.dtype)
    return torch.minimum(maps, cap)


def fuse(maps: Sequence[Tensor], how: Literal["mean", "max"] = "mean") -> Tensor:
    """Combine per-layer maps of equal shape ``(B, T, H, W)`` by their mean or max."""
    stack = torch.stack(list(maps))
    if how == "mean":
        return stack.mean(0)
    if how == "max":
        return stack.amax(0)
    raise ValueError(f"fuse must be 'mean' or 'max', got {how!r}")


def process(raws: Sequence[Tensor], size: Optional[tuple[int, int]], *, use_relu: bool = True,
            fuse_how: Literal["mean", "max"] = "mean", interpolation: str = "bilinear") -> Tensor:
    """Raw maps of one or more layers -> final maps ``(B, T, H, W)`` in [0, 1].

    One layer: ReLU (optional) → upsample to ``size`` (or to the largest layer's size when
    ``None``) → min-max. Several layers: each is ReLU'd and min-maxed at its own resolution (so
    layers of different scales weigh equally), upsampled, fused, and min-maxed again — the same
    convention as pytorch-grad-cam's multi-layer aggregation.
    """
    if size is None:
        size = max((tuple(r.shape[-2:]) for r in raws), key=lambda s: s[0] * s[1])
    if len(raws) == 1:
        m = relu(raws[0]) if use_relu else raws[0]
        return normalize(upsample(m, size, interpolation))
    per_layer = [upsample(normalize(relu(r) if use_relu else r, warn=False), size, interpolation) for r in raws]
    return normalize(fuse(per_layer, fuse_how))
