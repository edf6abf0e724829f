"""Guided backpropagation (Springenberg et al., 2015) and Guided Grad-CAM (Selvaraju et al., 2017).

Guided backpropagation: the gradient of each target score ``S[b, t]`` w.r.t. the input pixels,
computed with every ReLU's backward replaced by the *guided* rule: a ReLU passes the incoming
gradient ``g`` back only where its input was positive (the ordinary ReLU rule) AND ``g > 0``
(the deconvnet rule), i.e. ``dx = max(g, 0) * [x > 0]``; ReLU6 likewise passes
``max(g, 0) * [0 < x < 6]``.

    pixel[b, t, c, i, j]  = guided dS[b, t] / dx[b, c, i, j]          (B, T, C, H, W)
    saliency[b, t, i, j]  = max_c |pixel[b, t, c, i, j]|                (B, T, H, W)

The saliency map takes the maximum absolute value over input channels (as in Simonyan et al.'s
saliency maps): a pixel is salient when any of its colour channels moves the score; the signed
per-channel attributions stay available as ``Explanation.pixel``.

How ReLUs are found: they are not. The backward runs inside :class:`camlens.backends.torch.GuidedReLU`,
a ``TorchDispatchMode`` that sees every ATen op of the backward pass. ``nn.ReLU`` (also
``inplace=True``, as in torchvision ResNets), ``F.relu``, ``torch.relu``, ``Tensor.relu_`` and
ReLU6 (``nn.ReLU6`` / ``F.relu6``, i.e. ``hardtanh(0, 6)``) all reach the same backward kernels,
``threshold_backward`` and ``hardtanh_backward``; for the duration of the backward those kernels
receive ``max(g, 0)`` instead of ``g``. No module is swapped, no hook is registered, nothing in
the model is modified, and leaving the block (also on an exception) restores plain autograd.

The rule is defined for ReLU networks only. Where the backward also runs another activation's
kernel (GELU and SiLU in transformers and EfficientNets, Hardswish in MobileNetV3, ...), its
gradient would pass unguided and the result would be a plain gradient under this method's name:
that is an error naming the activations, unless ``non_relu="plain"`` (guide the ReLUs only).

Guided Grad-CAM: per target, the guided backprop attributions times the (non-negative) Grad-CAM
map of the chosen layer upsampled to the input size,

    cam[b, t]            = ReLU(sum_c mean_ij(dS[b, t] / dA[b, c, i, j]) * A[b, c])   (B, T, h, w)
    pixel[b, t, c]       = guided[b, t, c] * upsample(cam[b, t])                      (B, T, C, H, W)
    saliency[b, t]       = max_c |pixel[b, t, c]|                                     (B, T, H, W)

with the un-normalised Grad-CAM and ``nearest`` upsampling by default, exactly as captum's
``GuidedGradCam``; ``interpolate="bilinear"`` follows the Grad-CAM paper (``align_corners=False``).

Volumes and clips ``(B, C, D, H, W)``: the guided gradients are ``(B, T, C, D, H, W)`` and the
saliency ``max_c |pixel|`` ``(B, T, D, H, W)``; Guided Grad-CAM takes the Grad-CAM of the 3-D layer
over all ``d*h*w`` positions and upsamples it to ``(D, H, W)`` (nearest, or trilinear for
``interpolate="bilinear"``), as captum's ``GuidedGradCam`` on a 3-D layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backends.base import VOLUME_KINDS, namespace, ops_for
from ..core.errors import ConfigError
from ..core.registry import Option, fraction, one_of
from .base import Method, MethodContext, MethodOutput, Tensor, register
from .gradcam import gradcam

__all__ = ["guided_gradients", "channel_saliency", "upsample_cam", "GuidedBackprop", "GuidedGradCam",
           "GUIDED_BACKPROP", "GUIDED_GRADCAM"]

_INTERPOLATE = ("nearest", "bilinear")
_NON_RELU = Option("error", one_of("error", "plain"),
                   "other activations (GELU, SiLU, ...): 'error', or 'plain' (guide only the ReLUs)")


def guided_gradients(ctx: MethodContext) -> Tensor:
    """Guided-backprop gradients of all T targets of all B images: ``(B, T, C, H, W)``.

    One forward of ``ctx.inputs`` and one batched backward (all T targets at once) with guided ReLUs.
    """
    grads, _ = ctx.runner.input_gradients(ctx.inputs, ctx.score_all, guided=True,
                                          non_relu=ctx.options.get("non_relu", "error"))
    return grads


def channel_saliency(pixel: Tensor) -> Tensor:
    """``(B, T, C, ...)`` per-channel attributions -> ``(B, T, ...)`` maps, ``max_c |pixel|``
    (``...``: ``(H, W)``, or ``(D, H, W)`` for volumes)."""
    xp = namespace(pixel)
    return xp.max(xp.abs(pixel), axis=2)


def upsample_cam(cam: Tensor, size: tuple[int, ...], mode: str = "nearest", ops: Any = None) -> Tensor:
    """Resize maps ``(B, T, h, w)`` to ``(B, T, *size)`` with the backend's ``Ops.resize`` (``ops``;
    default: the Ops of ``cam``): ``nearest``, or ``bilinear`` with ``align_corners=False`` (captum's
    ``LayerAttribution.interpolate`` convention). Volumes ``(B, T, d, h, w)`` and a 3-entry ``size``:
    nearest, or trilinear for ``"bilinear"``."""
    if mode not in _INTERPOLATE:
        raise ConfigError(f"interpolate must be one of {_INTERPOLATE}, got {mode!r}")
    if tuple(cam.shape[-len(size):]) == tuple(size):
        return cam
    return (ops_for(cam) if ops is None else ops).resize(cam, tuple(size), mode)


@dataclass(frozen=True)
class GuidedBackprop(Method):
    """Guided backpropagation: input gradients with guided ReLU backward (no layer, no hooks)."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        pixel = guided_gradients(ctx)
        return MethodOutput(saliency=channel_saliency(pixel), pixel=pixel,
                            clip=ctx.options["clip"])


@dataclass(frozen=True)
class GuidedGradCam(Method):
    """Guided Grad-CAM: guided backprop times the ReLU'd Grad-CAM of one layer, upsampled."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        if len(ctx.layers) != 1:
            raise ConfigError(f"guided_gradcam uses one layer (usually the last convolutional one), got "
                             f"{ctx.layers}; pass layer='<name>'")
        if ctx.grads is None:  # pragma: no cover - the engine honours needs_grads
            raise RuntimeError("guided_gradcam needs the layer gradients (needs_grads=True)")
        name = ctx.layers[0]
        acts = ctx.spatial_acts(name, "guided_gradcam")
        xp = namespace(acts)
        cam = xp.clip(gradcam(acts, ctx.grads[name]), min=0)  # (B, T, h, w); volumes: (B, T, d, h*w)
        size = tuple(int(s) for s in ctx.inputs.shape[2:])  # (H, W), or (D, H, W) for volumes
        lay = ctx.layouts.get(name)
        if len(size) == 3 and lay is not None and lay.kind in VOLUME_KINDS:
            cam = xp.reshape(cam, (*cam.shape[:2], *lay.grid))  # (B, T, d, h, w)
        cam = upsample_cam(cam, size, ctx.options["interpolate"], ctx.ops)  # (B, T, H, W) / (B, T, D, H, W)
        guided = guided_gradients(ctx)  # (B, T, C, H, W) / (B, T, C, D, H, W)
        pixel = guided * xp.astype(cam[:, :, None], guided.dtype, copy=False)
        return MethodOutput(saliency=channel_saliency(pixel), pixel=pixel,
                            clip=ctx.options["clip"])


GUIDED_BACKPROP = register(GuidedBackprop(
    name="guided_backprop",
    description="Guided backpropagation: input gradients through guided ReLUs; map = max over channels of |grad|",
    cost="1 forward + 1 batched backward to the input for all targets",
    needs_grads=False,
    needs_layer=False,
    needs_input_grads=True,
    volumes=True,
    options={"clip": Option(0.995, fraction, "a quantile: maps are capped there before min-max"),
             "non_relu": _NON_RELU},
))

GUIDED_GRADCAM = register(GuidedGradCam(
    name="guided_gradcam",
    description="Guided Grad-CAM: guided backprop times the layer's ReLU'd Grad-CAM upsampled to the input",
    cost="2 forwards + 2 batched backwards (layer gradients, guided input gradients) for all targets",
    needs_grads=True,
    needs_layer=True,
    needs_input_grads=True,
    volumes=True,
    options={"interpolate": Option("nearest", one_of(*_INTERPOLATE), "how Grad-CAM is upsampled"),
             "clip": Option(0.995, fraction, "a quantile: maps are capped there before min-max"),
             "non_relu": _NON_RELU},
))
