"""Faithfulness metrics (deletion, insertion, Average Drop / Increase in Confidence / Average Gain) and
the sparseness (Gini) complexity metric.

Shapes: B images, T targets per image, maps ``(B, T, H, W)`` (higher = more important), inputs
``(B, C, H, W)`` in the model's own (normalised) input space. "Probability" below is
``ctx.probs``: the softmax probability of the target's class on its head (the raw score for a
target without a class, where the formulas lose their probabilistic meaning).

Every perturbation metric loops over the B images (``ctx.probs`` is per image, since each image has
its own targets) and builds its perturbed inputs chunk by chunk, ``ctx.batch_size`` at a time, on the
model's device; the chunks' results are joined once at the end, with no host synchronisation. The
maths is array-API code (:func:`camlens.backends.base.namespace`); the blur's convolution is the
backend's (``Ops.separable_filter``).

**Volumes and clips.** Inputs ``(B, C, D, H, W)`` with maps ``(B, T, D, H, W)`` are scored by the
same formulas over all ``D H W`` voxels: deletion / insertion rank the voxels of the whole volume
(raster order depth, row, column for ties) and move ``step`` voxels per step, every channel of a
voxel together; the ``"blur"`` substrate blurs each slice / frame in ``(H, W)`` (not along depth or
time: a frame of a clip is an image, and its neighbours in time need not be alike), ``"mean"`` is
each channel's mean over the volume; Average Drop & co. multiply the input by the map min-maxed over
the volume, voxel by voxel; sparseness is the Gini index over all voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import array_api_compat

from ..backends.base import namespace
from ..core.errors import ConfigError, ConfigTypeError
from ..core import postprocess
from ..core.postprocess import gaussian_blur
from ..core.registry import Option, number, positive_int, positive_number
from .base import EvalContext, Metric, MetricResult, Tensor, as_array_like, auc, order_pixels, register_metric

__all__ = ["CausalMetric", "ConfidenceChange", "Sparseness", "gaussian_blur", "gini", "causal_curves",
           "mult_image_probs"]

Substrate = Union[float, int, str, Tensor]


# ----------------------------------------------------------------------------------------------- helpers


def _substrate(x: Tensor, spec: Substrate, kernel: int, sigma: float) -> Tensor:
    """The reference images ``(B, C, H, W)``: a constant (in the normalised input space), ``"blur"``
    (Gaussian blur of each image), ``"mean"`` (each image's per-channel mean), or a tensor
    broadcastable to ``x``. Volumes ``(B, C, D, H, W)``: ``"blur"`` blurs every slice / frame in
    ``(H, W)`` alone (:func:`gaussian_blur` on ``(B, C D, H, W)``), ``"mean"`` is over ``D, H, W``."""
    xp = namespace(x)
    spatial = tuple(range(2 - x.ndim, 0))  # (-2, -1), or (-3, -2, -1) for volumes
    if isinstance(spec, str):
        if spec == "blur":
            if x.ndim == 5:
                B, C, D, H, W = x.shape
                return xp.reshape(gaussian_blur(xp.reshape(x, (B, C * D, H, W)), kernel, sigma), x.shape)
            return gaussian_blur(x, kernel, sigma)
        if spec == "mean":
            return xp.asarray(xp.broadcast_to(xp.mean(x, axis=spatial, keepdims=True), x.shape), copy=True)
        raise ConfigError(f"substrate must be a number, 'blur', 'mean' or a tensor; got {spec!r}")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return xp.full_like(x, float(spec))
    if array_api_compat.is_array_api_obj(spec):
        return xp.asarray(xp.broadcast_to(xp.astype(as_array_like(spec, x), x.dtype), x.shape), copy=True)
    raise ConfigTypeError(f"substrate must be a number, 'blur', 'mean' or a tensor; got {type(spec).__name__}")


def causal_curves(ctx: EvalContext, start: Tensor, finish: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """RISE-style curves: pixels move from ``start`` to ``finish`` in order of descending saliency.

    Args:
        start, finish: ``(B, C, H, W)``; deletion goes image -> substrate, insertion the reverse.
            Volumes: ``(B, C, D, H, W)`` with maps ``(B, T, D, H, W)``, where every ``H W`` below
            reads ``D H W`` (voxels ranked over the whole volume, ties in raster order).
        step: pixels moved per step (all channels of a pixel move together).

    Returns:
        curves ``(B, T, n + 1)`` with ``n = ceil(H W / step)``: ``curves[b, t, i]`` is target t's
        probability on the image whose ``min(i * step, H W)`` most salient pixels (by map ``(b, t)``,
        ties in raster order) come from ``finish`` and the rest from ``start``; and the fractions
        ``(n + 1,)`` of pixels moved.

    Steps 0 and n are the same for all T targets of an image (one forward of 2 images); each
    interior step ``(t, i)`` is one perturbed image, in chunks of ``ctx.batch_size``.
    """
    if int(step) < 1:
        raise ConfigError(f"step must be a positive number of pixels, got {step}")
    step = int(step)
    xp = namespace(start, finish)
    B, T = ctx.maps.shape[:2]
    grid = tuple(ctx.maps.shape[2:])  # (H, W), or (D, H, W)
    C, hw, dev = start.shape[1], math.prod(grid), array_api_compat.device(start)
    n = math.ceil(hw / step)
    counts = xp.clip(xp.arange(n + 1, device=dev) * step, max=hw)  # pixels moved after step i
    order = order_pixels(ctx.maps, spatial=len(grid))  # (B, T, HW), descending, stable
    rank = xp.argsort(order, axis=-1)  # the inverse permutation: rank[b, t, p] = place of pixel p in the order
    n_jobs = T * (n - 1)  # interior steps i = 1 .. n-1 for every target; job j -> (t, i) = (j % T, 1 + j // T)
    bs = max(1, int(ctx.batch_size))
    rows = []
    for b in range(B):
        ends = xp.astype(ctx.probs(xp.stack([start[b], finish[b]]), b), xp.float32, copy=False)  # (2, T)
        s_flat, f_flat = xp.reshape(start[b], (1, C, hw)), xp.reshape(finish[b], (1, C, hw))
        inner = []  # job order j
        for lo in range(0, n_jobs, bs):
            j = xp.arange(lo, min(lo + bs, n_jobs), device=dev)
            t, i = j % T, 1 + j // T
            moved = xp.take(rank[b], t, axis=0) < xp.take(counts, i)[:, None]  # (N, HW)
            xs = xp.reshape(xp.where(moved[:, None, :], f_flat, s_flat), (-1, C, *grid))
            inner.append(xp.take_along_axis(ctx.probs(xs, b), t[:, None], axis=1)[:, 0])
        mid = (xp.reshape(xp.astype(xp.concat(inner), xp.float32, copy=False), (n - 1, T)).T if inner
               else xp.zeros((T, 0), dtype=xp.float32, device=dev))  # (T, n - 1)
        rows.append(xp.concat([ends[0][:, None], mid, ends[1][:, None]], axis=1))
    curves = xp.stack(rows)
    return curves, xp.astype(counts, xp.float32) / hw


def mult_image_probs(ctx: EvalContext, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """``Y, O`` ``(B, T)``: target probability on the input and on ``E = x * M`` (the normalised
    input tensor multiplied, every channel, by the map), as pytorch-grad-cam's
    ``CamMultImageConfidenceChange`` and torchcam's ``ClassificationMetric``.

    ``M`` is the map min-maxed per ``(b, t)`` to [0, 1] when ``normalize`` (a constant map becomes
    all zero); camlens' own maps are already min-maxed, so this only matters for plain map tensors.
    Volumes: ``x`` ``(B, C, D, H, W)`` times maps ``(B, T, D, H, W)`` voxel by voxel, each map
    min-maxed over its whole volume.
    """
    maps = ctx.maps
    if normalize:
        xp = namespace(maps)
        maps = xp.reshape(postprocess.normalize(xp.reshape(maps, (*maps.shape[:2], -1, maps.shape[-1])), warn=False),
                          maps.shape)  # min-max over all of (H, W), or (D, H, W)
    B, T = maps.shape[:2]
    x = ctx.inputs
    xp, dev = namespace(x), array_api_compat.device(x)
    bs = max(1, int(ctx.batch_size))
    Y, O = [], []
    for b in range(B):
        Y.append(ctx.probs(x[b:b + 1], b)[0])
        o = []
        for lo in range(0, T, bs):
            hi = min(lo + bs, T)
            t = xp.arange(lo, hi, device=dev)
            xs = x[b][None] * xp.astype(maps[b, lo:hi], x.dtype)[:, None]  # (N, C, H, W) or (N, C, D, H, W)
            o.append(xp.take_along_axis(ctx.probs(xs, b), t[:, None], axis=1)[:, 0])
        O.append(xp.concat(o))
    return xp.astype(xp.stack(Y), xp.float32, copy=False), xp.astype(xp.stack(O), xp.float32, copy=False)


def gini(values: Tensor) -> Tensor:
    """Gini index of ``|values|`` over the last dim: ``G = Σ_i (2i - n - 1) a_(i) / (n Σ_i a_i)`` with
    ``a_(1) <= ... <= a_(n)`` sorted ascending (Chalasani et al. 2020; Hurley & Rickard 2009).

    0 for an all-equal vector (and for an all-zero one, by convention), ``(n - 1) / n`` for a one-hot
    vector. Quantus' ``Sparseness`` adds ``1e-7`` to every entry first; here nothing is added.
    """
    xp = namespace(values)
    a = xp.sort(xp.astype(xp.abs(values), xp.float64), axis=-1)
    n = a.shape[-1]
    i = xp.arange(1, n + 1, dtype=a.dtype, device=array_api_compat.device(a))
    total = xp.sum(a, axis=-1)
    num = xp.sum((2 * i - n - 1) * a, axis=-1)
    return xp.astype(xp.where(total > 0, num / (n * xp.clip(total, min=xp.finfo(a.dtype).smallest_normal)),
                              xp.zeros_like(total)), xp.float32)


# ----------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class CausalMetric(Metric):
    """Deletion / insertion (Petsiuk et al., RISE, BMVC 2018).

    Pixels are ranked by descending saliency (stable sort: ties in raster order) and moved
    ``step`` at a time, every channel together: deletion replaces the image's pixels by the
    substrate (default ``0.0``, i.e. zero in the normalised input space — the dataset mean for
    mean/std-normalised inputs; or ``"blur"``, ``"mean"``, a number, a tensor); insertion starts
    from the substrate (default ``"blur"``: Gaussian blur, kernel 11, sigma 5) and reveals the
    image's pixels. ``n = ceil(H W / step)`` steps (volumes: ``ceil(D H W / step)``, ``step`` voxels each;
``"blur"`` per slice / frame: see the module docstring); the curve ``(B, T, n + 1)`` holds the target's
    probability at step 0 (no pixel moved), after each step, and in the final state; the value is
    its trapezoidal area ``(Σ_i s_i - s_0 / 2 - s_n / 2) / n`` (:func:`~camlens.metrics.auc`), as
    RISE's ``CausalMetric``. ``extra["fractions"]`` ``(n + 1,)``: fraction of pixels moved.

    Options: ``step`` (pixels per step, default 224), ``substrate``, ``blur_kernel`` (11),
    ``blur_sigma`` (5.0).
    """

    mode: str = "deletion"

    def __call__(self, ctx: EvalContext) -> MetricResult:
        x = ctx.inputs
        ref = _substrate(x, ctx.opt(self, "substrate"), int(ctx.opt(self, "blur_kernel")),
                         float(ctx.opt(self, "blur_sigma")))
        start, finish = (x, ref) if self.mode == "deletion" else (ref, x)
        curves, fractions = causal_curves(ctx, start, finish, ctx.opt(self, "step"))
        return MetricResult(values=auc(curves), curves=curves, extra={"fractions": fractions})


@dataclass(frozen=True)
class ConfidenceChange(Metric):
    """Average Drop, Increase in Confidence (Chattopadhay et al., Grad-CAM++, WACV 2018) and Average
    Gain (Zhang et al., Opti-CAM, 2023), per image and target.

    ``Y`` = target probability on the input, ``O`` = on the explanation map ``E = x * M``: the
    normalised input tensor (what the model receives) multiplied by the map min-maxed to [0, 1]
    (pytorch-grad-cam's ``CamMultImageConfidenceChange`` convention). Then
    ``drop = max(0, Y - O) / Y * 100``, ``increase = 1[O > Y]``,
    ``gain = max(0, O - Y) / (1 - Y) * 100``; averaging over images gives the papers' numbers
    (percent for drop and gain, a fraction for increase). A zero denominator gives 0.
    ``extra``: ``Y`` and ``O`` ``(B, T)``. Option ``normalize`` (True): min-max each map first.
    """

    kind: str = "drop"

    def __call__(self, ctx: EvalContext) -> MetricResult:
        Y, O = mult_image_probs(ctx, bool(ctx.opt(self, "normalize")))
        xp = namespace(Y, O)
        zero = xp.zeros_like(Y)
        if self.kind == "drop":
            v = xp.where(Y > 0, xp.clip(Y - O, min=0) / xp.where(Y > 0, Y, 1.0) * 100, zero)
        elif self.kind == "increase":
            v = xp.astype(O > Y, xp.float32)
        else:  # gain
            room = 1 - Y
            v = xp.where(room > 0, xp.clip(O - Y, min=0) / xp.where(room > 0, room, 1.0) * 100, zero)
        return MetricResult(values=v, extra={"Y": Y, "O": O})


@dataclass(frozen=True)
class Sparseness(Metric):
    """Sparseness: the Gini index of each map's absolute values over its H W pixels (Chalasani et
    al., ICML 2020; as Quantus' ``Sparseness``, without its ``1e-7`` offset), ``(B, T)`` in
    ``[0, (HW - 1) / HW]``; higher = a more concentrated map. Volume maps: over all ``D H W`` voxels."""

    def __call__(self, ctx: EvalContext) -> MetricResult:
        maps = ctx.maps
        return MetricResult(values=gini(namespace(maps).reshape(maps, (*maps.shape[:2], -1))))


_NORMALISE = Option(True, lambda v: None if isinstance(v, bool) else "True or False", "min-max the map first")


def _odd_positive(v: Any) -> Optional[str]:
    return None if positive_int(v) is None and v % 2 == 1 else "a positive odd int"


def _substrate_check(v: Any) -> Optional[str]:
    ok = v in ("blur", "mean") if isinstance(v, str) else array_api_compat.is_array_api_obj(v) or number(v) is None
    return None if ok else "a number, 'blur', 'mean' or a tensor"


_CAUSAL_OPTS: dict[str, Any] = {"step": Option(224, positive_number, "pixels (voxels) removed / revealed per step"),
                                "blur_kernel": Option(11, _odd_positive, "Gaussian kernel for 'blur'"),
                                "blur_sigma": Option(5.0, positive_number, "Gaussian std for 'blur'")}

register_metric(CausalMetric(
    name="deletion", higher_is_better=False, category="faithfulness",
    description="Deletion AUC: probability as the most salient pixels are removed (Petsiuk et al., RISE, 2018)",
    defaults={**_CAUSAL_OPTS, "substrate": Option(0.0, _substrate_check, "what removed pixels become")}, mode="deletion",
    volumes=True))
register_metric(CausalMetric(
    name="insertion", higher_is_better=True, category="faithfulness",
    description="Insertion AUC: probability as the most salient pixels are revealed on a blurred image (RISE, 2018)",
    defaults={**_CAUSAL_OPTS, "substrate": Option("blur", _substrate_check, "the start image")}, mode="insertion",
    volumes=True))
register_metric(ConfidenceChange(
    name="average_drop", higher_is_better=False, category="faithfulness",
    description="Average Drop %: max(0, Y - O) / Y on image x map (Chattopadhay et al., Grad-CAM++, 2018)",
    defaults={"normalize": _NORMALISE}, kind="drop", volumes=True))
register_metric(ConfidenceChange(
    name="increase_in_confidence", higher_is_better=True, category="faithfulness",
    description="Increase in Confidence: 1[O > Y] on image x map (Chattopadhay et al., Grad-CAM++, 2018)",
    defaults={"normalize": _NORMALISE}, kind="increase", volumes=True))
register_metric(ConfidenceChange(
    name="average_gain", higher_is_better=True, category="faithfulness",
    description="Average Gain %: max(0, O - Y) / (1 - Y) on image x map (Zhang et al., Opti-CAM, 2023)",
    defaults={"normalize": _NORMALISE}, kind="gain", volumes=True))
register_metric(Sparseness(
    name="sparseness", higher_is_better=True, category="complexity",
    description="Sparseness: Gini index of the map (Chalasani et al., 2020)", volumes=True))
