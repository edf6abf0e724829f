"""Post-processing of raw maps, on tensors on the model's device: ReLU, upsample, normalise, fuse.

The pipeline for one layer is ``normalize(upsample(relu(raw)))``. Min-max normalisation is affine
and bilinear upsampling is a convex combination, so this equals pytorch-grad-cam's
normalise → resize → normalise, and captum's ``LayerAttribution.interpolate`` + min-max.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Literal, Optional

import torch
from torch import Tensor

from .backends.torch.ops import TorchOps, _bilinear_matrix, _source_index
from .errors import ConfigError

OPS = TorchOps()  # (until post-processing takes its ops from the maps' backend)

__all__ = ["relu", "upsample", "upsample_normalize", "normalize", "clip_quantile", "fuse", "process"]

# a map is constant when its span is within this many float epsilons of its magnitude
CONSTANT_ULPS = 8


def relu(maps: Tensor) -> Tensor:
    """Keep positive evidence only: ``max(maps, 0)``."""
    return maps.clamp_min(0)


@functools.lru_cache(maxsize=64)
def _extreme_rows(n_in: int, n_out: int) -> tuple[int, ...]:
    """Output indices where a bilinear resize can reach its min or max along one axis.

    Outputs that share the source cell ``i0`` are ``(1 - l) v[i0] + l v[i1]`` with ``l`` rising
    with ``d``: monotone in ``d``, so within a cell the extremes are its first and last output.
    """
    i0 = _source_index(n_in, n_out).floor().long().tolist()
    keep = {0, n_out - 1}
    keep.update(d for d in range(1, n_out) if i0[d] != i0[d - 1])
    keep.update(d - 1 for d in range(1, n_out) if i0[d] != i0[d - 1])
    return tuple(sorted(keep))


def as_float(t: Tensor) -> Tensor:
    """float32, except that float64 stays float64 (differentiable maps checked in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def to_float32(t: Tensor) -> Tensor:
    """``t.float()`` without a dispatch when ``t`` is float32 already."""
    return t if t.dtype == torch.float32 else t.float()


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, T, h, w)`` maps to ``(B, T, *size)``; bilinear with ``align_corners=False``.

    Bilinear resizing is separable: ``Ry @ m @ Rx^T`` with the two small resize matrices — the
    same numbers as ``F.interpolate`` (to ~5e-7) and faster for many maps (one batched matmul).
    """
    return OPS.resize(maps, size, mode)


FUSED_MIN_PIXELS = 1 << 17  # below ~2.6 maps of 224², upsampling then min-maxing is faster (measured on CPU)


def upsample_normalize(maps: Tensor, size: tuple[int, int], *, warn: bool = True) -> Tensor:
    """``normalize(upsample(maps, size))`` without min-maxing at full resolution.

    Min-max is affine and each output of a bilinear resize is a convex combination of inputs, so
    ``(up(m) - lo) / (hi - lo) = up((m - lo) / (hi - lo))``; ``lo``/``hi`` (the min and max of
    ``up(m)``) are attained at the corner outputs of each source cell (:func:`_extreme_rows`),
    which are computed exactly from a ``(2h, 2w)``-sized resize. The full-size maps are written
    once. Equal to the two-step pipeline within float rounding (~1e-6); output clamped to [0, 1].
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return normalize(maps, warn=warn)
    if maps.numel() // (maps.shape[-2] * maps.shape[-1]) * int(size[0]) * int(size[1]) < FUSED_MIN_PIXELS:
        return normalize(upsample(maps, size), warn=warn)  # small outputs: the fixed cost below dominates
    m = as_float(maps)
    h, w = m.shape[-2:]
    ry = _bilinear_matrix(h, int(size[0]), m.device).to(m.dtype)
    rx = _bilinear_matrix(w, int(size[1]), m.device).to(m.dtype)
    ys = torch.tensor(_extreme_rows(h, int(size[0])), device=m.device)
    xs = torch.tensor(_extreme_rows(w, int(size[1])), device=m.device)
    corners = torch.matmul(ry[ys], torch.matmul(m, rx[xs].T)).flatten(-2)
    scaled, const = _min_max(m, corners.amin(-1)[..., None, None], corners.amax(-1)[..., None, None], warn)
    out = torch.matmul(ry, torch.matmul(scaled, rx.T)).clamp_(0.0, 1.0)
    # pin the extremes to exactly 0 and 1 where they are attained (rounding may leave 1 - 6e-8)
    nx = xs.numel()
    flat = out.view(-1, out.shape[-2] * out.shape[-1])
    live = ~const.reshape(-1)
    for idx, value in ((corners.argmax(-1), 1.0), (corners.argmin(-1), 0.0)):
        pos = (ys[idx // nx] * out.shape[-1] + xs[idx % nx]).reshape(-1, 1)
        flat.scatter_(1, pos, torch.where(live, value, 0.0).to(out.dtype).reshape(-1, 1))
    return out


def normalize(maps: Tensor, *, warn: bool = True) -> Tensor:
    """Per-map min-max to [0, 1]: ``(m - min) / (max - min)`` over the last two dims.

    A constant map (``max - min`` within a few float epsilons of its magnitude, e.g. all zero
    after ReLU; see :func:`_min_max`) becomes all zero — never NaN or inf — with a warning saying
    how many maps were constant and why. Tiny but valid maps (values ~1e-15) are kept.
    """
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)  # (faster than aminmax on CPU)
    out, _ = _min_max(flat, lo, hi, warn, mask=False)
    return out.view_as(maps)


def _min_max(t: Tensor, lo: Tensor, hi: Tensor, warn: bool, mask: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``(t - lo) / (hi - lo)`` with a per-map (broadcast) ``lo``/``hi``. Returns the scaled ``t``
    and the constant mask (shape of ``lo``; ``None`` with ``mask=False``).

    A map is constant only relative to the precision of its own dtype and magnitude:
    ``hi - lo <= CONSTANT_ULPS * eps(dtype) * max(|hi|, |lo|)`` (an all-zero map included). The
    test is scale-free, so Grad-CAM of a score multiplied by 1e-20 gives the same map as the
    unscaled score. Maps are divided by their magnitude first, so spans down to the smallest
    normal float neither underflow nor overflow. Constant maps become 0 (never NaN / inf), with a
    warning that tells apart "all <= 0 (no positive evidence, e.g. after ReLU)" from "numerically
    flat".
    """
    if lo.numel() <= SMALL_MAP_COUNT and not (t.requires_grad or lo.requires_grad or hi.requires_grad):
        small = _min_max_few(t, lo, hi, warn, mask)
        if small is not None:
            return small
    t32 = t if t.dtype in (torch.float32, torch.float64) else t.float()
    if lo.dtype != t32.dtype:
        lo, hi = lo.to(t32.dtype), hi.to(t32.dtype)
    mag = torch.maximum(hi.abs(), lo.abs())
    scale = torch.where(mag > 0, mag, 1.0)  # work in units of the map's magnitude
    lo_s = lo / scale
    span = hi / scale - lo_s  # in [0, 2]: no overflow for huge maps, no underflow for tiny ones
    # constant: a span within rounding, and also NaN spans (inf / NaN values); an all-zero map has span 0
    const = ~(span > CONSTANT_ULPS * torch.finfo(t32.dtype).eps)
    if warn:
        n = int(const.sum())
        if n:
            _warn_constant(n, int((const & (hi <= 0)).sum()), const.numel())
    out = torch.where(const, 0.0, (t32 / scale - lo_s) / torch.where(const, 1.0, span))
    return out.to(t.dtype) if t.dtype != t32.dtype else out, const


SMALL_MAP_COUNT = 64  # up to this many maps, lo/hi are read on the host and plain maps take 3 ops, not 16


@functools.lru_cache(maxsize=8)
def _plain_range(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(tol, smallest, largest)``: the constant-map threshold, and the magnitudes between which
    ``(t - lo) / (hi - lo)`` neither underflows nor overflows in ``dtype``."""
    fi = torch.finfo(dtype)
    tol = CONSTANT_ULPS * fi.eps
    return tol, fi.tiny / tol * 4, fi.max / 4


def _min_max_few(t: Tensor, lo: Tensor, hi: Tensor, warn: bool,
                 mask: bool = True) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """:func:`_min_max` for a few plain float32/float64 maps: ``(t - lo) / (hi - lo)`` directly.

    ``lo``/``hi`` are read on the host (one copy each); when every map is clearly non-constant
    (span above twice the threshold) and of a magnitude where the span cannot underflow nor the
    difference overflow, that is the general path's scale-free map, and the maximum maps to
    exactly 1. ``None`` otherwise: constant, non-finite or extreme maps take the general path
    (which warns).
    """
    if t.dtype not in (torch.float32, torch.float64) or lo.dtype != t.dtype or hi.dtype != t.dtype:
        return None
    tol, small, large = _plain_range(t.dtype)
    for lv, hv in zip(lo.reshape(-1).tolist(), hi.reshape(-1).tolist()):
        mag = max(abs(lv), abs(hv))
        if not (small <= mag <= large and hv - lv > 2 * tol * mag):  # NaN fails too
            return None
    out = (t - lo) / (hi - lo)
    return out, (torch.zeros(lo.shape, dtype=torch.bool, device=t.device) if mask else None)


def _warn_constant(n: int, zero: int, total: int) -> None:
    parts = []
    if zero:
        parts.append(f"{zero} have no positive evidence (all values <= 0)")
    if n - zero:
        parts.append(f"{n - zero} are numerically flat (max - min within float rounding of their values)")
    warnings.warn(f"{n} of {total} maps are constant: " + "; ".join(parts)
                  + "; they are returned as all-zero maps", RuntimeWarning, stacklevel=_caller_level())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside camlens (the user's call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def clip_quantile(maps: Tensor, q: float) -> Tensor:
    """Cap each map ``(..., H, W)`` at its ``q`` quantile (``q`` in (0, 1]; 1 leaves it unchanged).

    Gradient maps are heavy-tailed: without a cap a few pixels take the whole [0, 1] range after
    min-max (captum's visualisation caps the top 2 % for the same reason).
    """
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"clip is a quantile in (0, 1], got {q}")
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
    raise ConfigError(f"fuse must be 'mean' or 'max', got {how!r}")


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
        return upsample_normalize(m, size) if interpolation == "bilinear" else normalize(upsample(m, size, interpolation))
    per_layer = [upsample(normalize(relu(r) if use_relu else r, warn=False), size, interpolation) for r in raws]
    return normalize(fuse(per_layer, fuse_how))
