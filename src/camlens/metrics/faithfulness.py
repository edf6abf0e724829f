"""Faithfulness metrics (deletion, insertion, Average Drop / Increase in Confidence / Average Gain) and
the sparseness (Gini) complexity metric.

Shapes: B images, T targets per image, maps ``(B, T, H, W)`` (higher = more important), inputs
``(B, C, H, W)`` in the model's own (normalised) input space. "Probability" below is
``ctx.probs``: the softmax probability of the target's class on its head (the raw score for a
target without a class, where the formulas lose their probabilistic meaning).

Every perturbation metric loops over the B images (``ctx.probs`` is per image, since each image has
its own targets) and builds its perturbed inputs chunk by chunk, ``ctx.batch_size`` at a time, on the
model's device; results are written into preallocated tensors with no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..postprocess import normalize
from ..registry import Option, number, positive_int, positive_number
from .base import EvalContext, Metric, MetricResult, auc, order_pixels, register_metric
from ..errors import ConfigError, ConfigTypeError

__all__ = ["CausalMetric", "ConfidenceChange", "Sparseness", "gaussian_blur", "gini", "causal_curves",
           "mult_image_probs"]

Substrate = Union[float, int, str, Tensor]


# ----------------------------------------------------------------------------------------------- helpers


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
    B, C, H, W = x.shape
    dtype = x.dtype if x.is_floating_point() else torch.float32

    def kernel(k: int) -> Tensor:
        half = (k - 1) * 0.5
        grid = torch.linspace(-half, half, k, device=x.device, dtype=torch.float32)
        k1 = torch.exp(-0.5 * (grid / sigma) ** 2)
        return (k1 / k1.sum()).to(dtype)

    pw, ph = kw // 2, kh // 2
    mode = "reflect" if pw < W and ph < H else "replicate"
    y = F.pad(x.reshape(B * C, 1, H, W).to(dtype), (pw, pw, ph, ph), mode=mode)
    y = F.conv2d(y, kernel(kw).view(1, 1, 1, -1))  # along W
    y = F.conv2d(y, kernel(kh).view(1, 1, -1, 1))  # along H
    return y.reshape(B, C, H, W).to(x.dtype)


def _substrate(x: Tensor, spec: Substrate, kernel: int, sigma: float) -> Tensor:
    """The reference images ``(B, C, H, W)``: a constant (in the normalised input space), ``"blur"``
    (Gaussian blur of each image), ``"mean"`` (each image's per-channel mean), or a tensor
    broadcastable to ``x``."""
    if isinstance(spec, Tensor):
        return torch.broadcast_to(spec.to(device=x.device, dtype=x.dtype), x.shape).clone()
    if isinstance(spec, str):
        if spec == "blur":
            return gaussian_blur(x, kernel, sigma)
        if spec == "mean":
            return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
        raise ConfigError(f"substrate must be a number, 'blur', 'mean' or a tensor; got {spec!r}")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return torch.full_like(x, float(spec))
    raise ConfigTypeError(f"substrate must be a number, 'blur', 'mean' or a tensor; got {type(spec).__name__}")


def causal_curves(ctx: EvalContext, start: Tensor, finish: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """RISE-style curves: pixels move from ``start`` to ``finish`` in order of descending saliency.

    Args:
        start, finish: ``(B, C, H, W)``; deletion goes image -> substrate, insertion the reverse.
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
    B, T, H, W = ctx.maps.shape
    C, hw, dev = start.shape[1], H * W, start.device
    n = math.ceil(hw / step)
    counts = (torch.arange(n + 1, device=dev) * step).clamp_max(hw)  # pixels moved after step i
    order = order_pixels(ctx.maps)  # (B, T, HW), descending, stable
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(hw, device=order.device).expand_as(order))
    curves = torch.empty(B, T, n + 1, device=dev)
    n_jobs = T * (n - 1)  # interior steps i = 1 .. n-1 for every target; job j -> (t, i) = (j % T, 1 + j // T)
    bs = max(1, int(ctx.batch_size))
    for b in range(B):
        ends = ctx.probs(torch.stack([start[b], finish[b]]), b)  # (2, T)
        curves[b, :, 0], curves[b, :, n] = ends[0], ends[1]
        s_flat, f_flat = start[b].reshape(1, C, hw), finish[b].reshape(1, C, hw)
        for lo in range(0, n_jobs, bs):
            j = torch.arange(lo, min(lo + bs, n_jobs), device=dev)
            t, i = j % T, 1 + j // T
            moved = rank[b, t] < counts[i, None]  # (N, HW)
            xs = torch.where(moved[:, None, :], f_flat, s_flat).view(-1, C, H, W)
            curves[b, t, i] = ctx.probs(xs, b).gather(1, t[:, None])[:, 0]
    return curves, counts.float() / hw


def mult_image_probs(ctx: EvalContext, normalise: bool = True) -> tuple[Tensor, Tensor]:
    """``Y, O`` ``(B, T)``: target probability on the input and on ``E = x * M`` (the normalised
    input tensor multiplied, every channel, by the map), as pytorch-grad-cam's
    ``CamMultImageConfidenceChange`` and torchcam's ``ClassificationMetric``.

    ``M`` is the map min-maxed per ``(b, t)`` to [0, 1] when ``normalise`` (a constant map becomes
    all zero); camlens' own maps are already min-maxed, so this only matters for plain map tensors.
    """
    maps = normalize(ctx.maps, warn=False) if normalise else ctx.maps
    B, T = maps.shape[:2]
    x, dev = ctx.inputs, ctx.inputs.device
    Y = torch.empty(B, T, device=dev)
    O = torch.empty(B, T, device=dev)
    bs = max(1, int(ctx.batch_size))
    for b in range(B):
        Y[b] = ctx.probs(x[b:b + 1], b)[0]
        for lo in range(0, T, bs):
            t = torch.arange(lo, min(lo + bs, T), device=dev)
            xs = x[b][None] * maps[b, t][:, None].to(x.dtype)  # (N, C, H, W)
            O[b, t] = ctx.probs(xs, b).gather(1, t[:, None])[:, 0]
    return Y, O


def gini(values: Tensor) -> Tensor:
    """Gini index of ``|values|`` over the last dim: ``G = Σ_i (2i - n - 1) a_(i) / (n Σ_i a_i)`` with
    ``a_(1) <= ... <= a_(n)`` sorted ascending (Chalasani et al. 2020; Hurley & Rickard 2009).

    0 for an all-equal vector (and for an all-zero one, by convention), ``(n - 1) / n`` for a one-hot
    vector. Quantus' ``Sparseness`` adds ``1e-7`` to every entry first; here nothing is added.
    """
    a = values.abs().double().sort(dim=-1).values
    n = a.shape[-1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(-1)
    num = ((2 * i - n - 1) * a).sum(-1)
    return torch.where(total > 0, num / (n * total.clamp_min(torch.finfo(a.dtype).tiny)),
                       torch.zeros_like(total)).float()


# ----------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class CausalMetric(Metric):
    """Deletion / insertion (Petsiuk et al., RISE, BMVC 2018).

    Pixels are ranked by descending saliency (stable sort: ties in raster order) and moved
    ``step`` at a time, every channel together: deletion replaces the image's pixels by the
    substrate (default ``0.0``, i.e. zero in the normalised input space — the dataset mean for
    mean/std-normalised inputs; or ``"blur"``, ``"mean"``, a number, a tensor); insertion starts
    from the substrate (default ``"blur"``: Gaussian blur, kernel 11, sigma 5) and reveals the
    image's pixels. ``n = ceil(H W / step)`` steps; the curve ``(B, T, n + 1)`` holds the target's
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
    ``extra``: ``Y`` and ``O`` ``(B, T)``. Option ``normalise`` (True): min-max each map first.
    """

    kind: str = "drop"

    def __call__(self, ctx: EvalContext) -> MetricResult:
        Y, O = mult_image_probs(ctx, bool(ctx.opt(self, "normalise")))
        zero = torch.zeros_like(Y)
        if self.kind == "drop":
            v = torch.where(Y > 0, (Y - O).clamp_min(0) / torch.where(Y > 0, Y, 1.0) * 100, zero)
        elif self.kind == "increase":
            v = (O > Y).float()
        else:  # gain
            room = 1 - Y
            v = torch.where(room > 0, (O - Y).clamp_min(0) / torch.where(room > 0, room, 1.0) * 100, zero)
        return MetricResult(values=v, extra={"Y": Y, "O": O})


@dataclass(frozen=True)
class Sparseness(Metric):
    """Sparseness: the Gini index of each map's absolute values over its H W pixels (Chalasani et
    al., ICML 2020; as Quantus' ``Sparseness``, without its ``1e-7`` offset), ``(B, T)`` in
    ``[0, (HW - 1) / HW]``; higher = a more concentrated map."""

    def __call__(self, ctx: EvalContext) -> MetricResult:
        return MetricResult(values=gini(ctx.maps.flatten(-2)))


_NORMALISE = Option(True, lambda v: None if isinstance(v, bool) else "True or False", "min-max the map first")


def _odd_positive(v: Any) -> Optional[str]:
    return None if positive_int(v) is None and v % 2 == 1 else "a positive odd int"


def _substrate_check(v: Any) -> Optional[str]:
    ok = v in ("blur", "mean") if isinstance(v, str) else isinstance(v, Tensor) or number(v) is None
    return None if ok else "a number, 'blur', 'mean' or a tensor"


_CAUSAL_OPTS: dict[str, Any] = {"step": Option(224, positive_number, "pixels removed / revealed per step"),
                                "blur_kernel": Option(11, _odd_positive, "Gaussian kernel for 'blur'"),
                                "blur_sigma": Option(5.0, positive_number, "Gaussian std for 'blur'")}

register_metric(CausalMetric(
    name="deletion", higher_is_better=False, category="faithfulness",
    description="Deletion AUC: probability as the most salient pixels are removed (Petsiuk et al., RISE, 2018)",
    defaults={**_CAUSAL_OPTS, "substrate": Option(0.0, _substrate_check, "what removed pixels become")}, mode="deletion"))
register_metric(CausalMetric(
    name="insertion", higher_is_better=True, category="faithfulness",
    description="Insertion AUC: probability as the most salient pixels are revealed on a blurred image (RISE, 2018)",
    defaults={**_CAUSAL_OPTS, "substrate": Option("blur", _substrate_check, "the start image")}, mode="insertion"))
register_metric(ConfidenceChange(
    name="average_drop", higher_is_better=False, category="faithfulness",
    description="Average Drop %: max(0, Y - O) / Y on image x map (Chattopadhay et al., Grad-CAM++, 2018)",
    defaults={"normalise": _NORMALISE}, kind="drop"))
register_metric(ConfidenceChange(
    name="increase_in_confidence", higher_is_better=True, category="faithfulness",
    description="Increase in Confidence: 1[O > Y] on image x map (Chattopadhay et al., Grad-CAM++, 2018)",
    defaults={"normalise": _NORMALISE}, kind="increase"))
register_metric(ConfidenceChange(
    name="average_gain", higher_is_better=True, category="faithfulness",
    description="Average Gain %: max(0, O - Y) / (1 - Y) on image x map (Zhang et al., Opti-CAM, 2023)",
    defaults={"normalise": _NORMALISE}, kind="gain"))
register_metric(Sparseness(
    name="sparseness", higher_is_better=True, category="complexity",
    description="Sparseness: Gini index of the map (Chalasani et al., 2020)"))
