"""Post-processing of raw maps, on the arrays' own device: ReLU, upsample, normalise, fuse; and the
Gaussian blur of images shared by occlusion's blurred baseline and the metrics' blurred substrate.

The pipeline for one layer is ``normalize(upsample(relu(raw)))``. Min-max normalisation is affine
and bilinear upsampling is a convex combination, so this equals pytorch-grad-cam's
normalise → resize → normalise, and captum's ``LayerAttribution.interpolate`` + min-max.

Framework-free: array-API maths (:func:`camlens.backends.base.namespace`) plus the arrays' backend
:class:`~camlens.backends.base.Ops` (:func:`camlens.backends.base.ops_for`) — torch tensors and
NumPy arrays alike.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import array_api_compat

from ..backends.base import extreme_rows, namespace, ops_for, to_float32
from .errors import ConfigError

Tensor = Any  # an array: a torch tensor, a NumPy array, ...

__all__ = ["to_float32", "relu", "upsample", "upsample_normalize", "normalize", "clip_quantile", "fuse", "process",
           "gaussian_blur"]

# a map is constant when its span is within this many float epsilons of its magnitude
CONSTANT_ULPS = 8


def relu(maps: Tensor) -> Tensor:
    """Keep positive evidence only: ``max(maps, 0)``."""
    return namespace(maps).clip(maps, min=0)


def as_float(t: Tensor) -> Tensor:
    """float32, except that float64 stays float64 (differentiable maps checked in float64)."""
    xp = namespace(t)
    return t if t.dtype in (xp.float32, xp.float64) else xp.astype(t, xp.float32)


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, T, h, w)`` maps to ``(B, T, *size)``; bilinear with ``align_corners=False``.

    Bilinear resizing is separable: ``Ry @ m @ Rx^T`` with the two small resize matrices — the
    same numbers as ``F.interpolate`` (to ~5e-7) and faster for many maps (one batched matmul).
    """
    return ops_for(maps).resize(maps, size, mode)


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
    lead = maps.shape[:-2]
    n_maps = math.prod(int(d) for d in lead)
    if n_maps * int(size[0]) * int(size[1]) < FUSED_MIN_PIXELS:
        return normalize(upsample(maps, size), warn=warn)  # small outputs: the fixed cost below dominates
    xp, ops = namespace(maps), ops_for(maps)
    m = as_float(maps)
    h, w = int(m.shape[-2]), int(m.shape[-1])
    H, W = int(size[0]), int(size[1])
    ry, rxt = ops.resize_matrices(h, w, H, W, m)
    ys = ops.asarray(extreme_rows(h, H), like=m)
    xs = ops.asarray(extreme_rows(w, W), like=m)
    corners = xp.take(ry, ys, axis=0) @ (m @ xp.take(rxt, xs, axis=1))
    corners = xp.reshape(corners, (*lead, -1))
    scaled, const = _min_max(m, xp.min(corners, axis=-1)[..., None, None], xp.max(corners, axis=-1)[..., None, None],
                             warn)
    out = ops.clip_(ry @ (scaled @ rxt), 0.0, 1.0)
    # pin the extremes to exactly 0 and 1 where they are attained (rounding may leave 1 - 6e-8)
    nx = int(xs.shape[0])
    flat = xp.reshape(out, (n_maps, H * W))
    live = xp.reshape(~const, (-1,))
    flat_corners = xp.reshape(corners, (n_maps, -1))
    rows = xp.arange(n_maps, device=array_api_compat.device(flat))
    for idx, value in ((xp.argmax(flat_corners, axis=-1), 1.0), (xp.argmin(flat_corners, axis=-1), 0.0)):
        pos = xp.take(ys, idx // nx) * W + xp.take(xs, idx % nx)
        flat = ops.set_at(flat, (rows, pos), xp.where(live, xp.asarray(value, dtype=out.dtype),
                                                      xp.asarray(0.0, dtype=out.dtype)))
    return xp.reshape(flat, out.shape)


def normalize(maps: Tensor, *, warn: bool = True) -> Tensor:
    """Per-map min-max to [0, 1]: ``(m - min) / (max - min)`` over the last two dims.

    A constant map (``max - min`` within a few float epsilons of its magnitude, e.g. all zero
    after ReLU; see :func:`_min_max`) becomes all zero — never NaN or inf — with a warning saying
    how many maps were constant and why. Tiny but valid maps (values ~1e-15) are kept.
    """
    xp, ops = namespace(maps), ops_for(maps)
    if math.prod(maps.shape[:-2]) == 1 and maps.dtype in (xp.float32, xp.float64) and not ops.has_graph(maps):
        lo, hi = ops.extrema(maps)  # one map: no reshapes, one reduction, host scalars
        if _plain_span(lo, hi, xp, maps.dtype):
            out = maps - lo
            out /= hi - lo  # in place: a fresh array
            return out
    flat = xp.reshape(maps, (*maps.shape[:-2], -1))
    lo, hi = xp.min(flat, axis=-1, keepdims=True), xp.max(flat, axis=-1, keepdims=True)
    out, _ = _min_max(flat, lo, hi, warn, mask=False)
    return xp.reshape(out, maps.shape)


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
    xp, ops = namespace(t), ops_for(t)
    if math.prod(lo.shape) <= SMALL_MAP_COUNT and not (ops.has_graph(t) or ops.has_graph(lo) or ops.has_graph(hi)):
        small = _min_max_few(t, lo, hi, warn, mask)
        if small is not None:
            return small
    t32 = as_float(t)
    if lo.dtype != t32.dtype:
        lo, hi = xp.astype(lo, t32.dtype), xp.astype(hi, t32.dtype)
    one = xp.asarray(1.0, dtype=t32.dtype)
    zero = xp.asarray(0.0, dtype=t32.dtype)
    mag = xp.maximum(xp.abs(hi), xp.abs(lo))
    scale = xp.where(mag > 0, mag, one)  # work in units of the map's magnitude
    lo_s = lo / scale
    span = hi / scale - lo_s  # in [0, 2]: no overflow for huge maps, no underflow for tiny ones
    # constant: a span within rounding, and also NaN spans (inf / NaN values); an all-zero map has span 0
    const = ~(span > CONSTANT_ULPS * xp.finfo(t32.dtype).eps)
    if warn:
        n = int(xp.sum(xp.astype(const, xp.int64)))
        if n:
            _warn_constant(n, int(xp.sum(xp.astype(const & (hi <= 0), xp.int64))), math.prod(const.shape))
    out = xp.where(const, zero, (t32 / scale - lo_s) / xp.where(const, one, span))
    return xp.astype(out, t.dtype) if t.dtype != t32.dtype else out, const


SMALL_MAP_COUNT = 64  # up to this many maps, lo/hi are read on the host and plain maps take 3 ops, not 16


@functools.lru_cache(maxsize=8)
def _plain_range(xp: Any, dtype: Any) -> tuple[float, float, float]:
    """``(tol, smallest, largest)``: the constant-map threshold, and the magnitudes between which
    ``(t - lo) / (hi - lo)`` neither underflows nor overflows in ``dtype``."""
    fi = xp.finfo(dtype)
    fi_tiny = float(getattr(fi, "smallest_normal", None) or fi.tiny)
    tol = CONSTANT_ULPS * fi.eps
    return tol, fi_tiny / tol * 4, float(fi.max) / 4


def _min_max_few(t: Tensor, lo: Tensor, hi: Tensor, warn: bool,
                 mask: bool = True) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """:func:`_min_max` for a few plain float32/float64 maps: ``(t - lo) / (hi - lo)`` directly.

    ``lo``/``hi`` are read on the host (one copy each); when every map is clearly non-constant
    (span above twice the threshold) and of a magnitude where the span cannot underflow nor the
    difference overflow, that is the general path's scale-free map, and the maximum maps to
    exactly 1. ``None`` otherwise: constant, non-finite or extreme maps take the general path
    (which warns).
    """
    xp, ops = namespace(t), ops_for(t)
    if t.dtype not in (xp.float32, xp.float64) or lo.dtype != t.dtype or hi.dtype != t.dtype:
        return None
    los, his = ops.to_list(lo), ops.to_list(hi)
    if not all(_plain_span(lv, hv, xp, t.dtype) for lv, hv in zip(los, his)):
        return None
    # one map: host scalars (lo, hi are values of t's dtype, so hi - lo rounds as it would in t's dtype)
    out = (t - los[0]) / (his[0] - los[0]) if len(los) == 1 else (t - lo) / (hi - lo)
    return out, (xp.zeros_like(lo, dtype=xp.bool) if mask else None)


def _plain_span(lo: float, hi: float, xp: Any, dtype: Any) -> bool:
    """A map with host extremes ``lo``/``hi`` is clearly non-constant (span above twice the
    constant threshold) and of a magnitude where ``(t - lo) / (hi - lo)`` neither underflows nor
    overflows in ``dtype``: then that is :func:`_min_max`'s scale-free result. NaN fails."""
    tol, small, large = _plain_range(xp, dtype)
    mag = max(abs(lo), abs(hi))
    return small <= mag <= large and hi - lo > 2 * tol * mag


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
    xp = namespace(maps)
    flat = to_float32(xp.reshape(maps, (*maps.shape[:-2], -1)))
    cap = xp.astype(ops_for(maps).quantile(flat, q, axis=-1)[..., None, None], maps.dtype)
    return xp.minimum(maps, cap)


def fuse(maps: Sequence[Tensor], how: Literal["mean", "max"] = "mean") -> Tensor:
    """Combine per-layer maps of equal shape ``(B, T, H, W)`` by their mean or max."""
    maps = list(maps)
    xp = namespace(*maps)
    stack = xp.stack(maps)
    if how == "mean":
        return xp.mean(stack, axis=0)
    if how == "max":
        return xp.max(stack, axis=0)
    raise ConfigError(f"fuse must be 'mean' or 'max', got {how!r}")


_relu, _fuse = relu, fuse  # (process's flags of the same names shadow them)


def process(raws: Sequence[Tensor], size: Optional[tuple[int, int]], *, relu: bool = True,
            fuse: Literal["mean", "max"] = "mean", interpolation: str = "bilinear") -> Tensor:
    """Raw maps of one or more layers -> final maps ``(B, T, H, W)`` in [0, 1].

    One layer: ReLU (optional) → upsample to ``size`` (or to the largest layer's size when
    ``None``) → min-max. Several layers: each is ReLU'd and min-maxed at its own resolution (so
    layers of different scales weigh equally), upsampled, fused, and min-maxed again — the same
    convention as pytorch-grad-cam's multi-layer aggregation.
    """
    if size is None:
        size = max((tuple(r.shape[-2:]) for r in raws), key=lambda s: s[0] * s[1])
    if len(raws) == 1:
        m = _relu(raws[0]) if relu else raws[0]
        return upsample_normalize(m, size) if interpolation == "bilinear" else normalize(upsample(m, size, interpolation))
    per_layer = [upsample(normalize(_relu(r) if relu else r, warn=False), size, interpolation) for r in raws]
    return normalize(_fuse(per_layer, fuse))


def gaussian_blur(x: Tensor, kernel_size: Union[int, tuple[int, int]] = 11, sigma: float = 5.0) -> Tensor:
    """Gaussian blur of ``(B, C, H, W)`` images, per channel; the same numbers as
    ``torchvision.transforms.functional.gaussian_blur(x, [k, k], [sigma, sigma])``.

    ``kernel_size``: ``k``, or ``(k_w, k_h)`` (torchvision's order: width first) for a different
    kernel along each axis. Kernel ``g_i ∝ exp(-i^2 / (2 sigma^2))`` for ``i = -(k-1)/2 .. (k-1)/2``,
    normalised to sum 1, applied separably with reflect padding (replicate padding for images smaller
    than ``k // 2 + 1``, where reflection is undefined). RISE's original code used a zero-padded 2-D
    convolution with a kernel from ``scipy.ndimage.gaussian_filter``; the two differ only near the border.
    """
    kw, kh = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    for k in (kw, kh):
        if k % 2 != 1 or k < 1:
            raise ConfigError(f"kernel_size must be a positive odd integer, got {k}")
    xp = namespace(x)
    H, W = x.shape[-2:]
    dtype = x.dtype if xp.isdtype(x.dtype, "real floating") else xp.float32
    dev = array_api_compat.device(x)

    def kernel(k: int) -> Tensor:
        half = (k - 1) * 0.5
        grid = xp.linspace(-half, half, k, dtype=xp.float32, device=dev)
        k1 = xp.exp(-0.5 * (grid / sigma) ** 2)
        return xp.astype(k1 / xp.sum(k1), dtype)

    pw, ph = kw // 2, kh // 2
    mode = "reflect" if pw < W and ph < H else "replicate"
    y = ops_for(x).separable_filter(xp.astype(x, dtype, copy=False), kernel(kw), kernel(kh), mode)
    return xp.astype(y, x.dtype, copy=False)
