"""Baseline "methods" that explain nothing, so metric tables show what chance looks like.

* ``random``: RandomCAM-style — the layer's activations ``A`` ``(B, C, h, w)`` weighted by random
  channel weights ``w[b, t, c] ~ U(-1, 1)``: ``raw[b, t] = sum_c w[b, t, c] A[b, c] - mean_hw(...)``
  ``(B, T, h, w)``, then the usual ReLU → bilinear upsampling → min-max. Seeded by the option
  ``random_seed`` (not ``seed``, which is ``camlens.explain``'s own argument for ``noise_smooth``),
  drawn on the CPU so every device gives the same map, and keyed on the target's class index: a
  target's map does not depend on the batch or on the other targets explained with it (so targets
  of two heads with the same class index share weights); another seed gives another map. No
  gradients, one forward. Centring differs from pytorch-grad-cam's RandomCAM: without it a random
  mix of non-negative activations is often negative everywhere, the ReLU leaves an all-zero map,
  and metrics then order its pixels by tie-breaking noise — the per-pixel noise this baseline
  exists to avoid.
* ``center``: a centre prior, ``exp(-((y - yc)^2 / (2 (s H)^2) + (x - xc)^2 / (2 (s W)^2)))`` with
  ``s`` the option ``sigma`` (a fraction of the image size, default 0.25), the same for every
  image and target ``(B, T, H, W)``. Objects in photos sit near the centre more often than not, so
  this is the baseline a localisation score should beat.

**Why the random map is smooth.** A map of per-pixel noise orders pixels at random, so deletion
removes a salt-and-pepper pattern spread over the whole image: the perturbed images leave the data
distribution and the score collapses after a few steps, whatever the model looks at. Such a map
then looks *better* than any real method. Measured on EfficientNet-Lite0 (the cat photo, top
class, camlens' default deletion settings): deletion AUC 0.049 for per-pixel noise against 0.31 for
Grad-CAM and 0.27 for this smooth random map (the issue that asked for it measured 0.12 / 0.41 /
0.51 with other settings; the point is the same). A random map with the spatial smoothness of a CAM removes contiguous regions, like
the methods it is compared with, and lands where chance should.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..registry import Option, positive_number
from .base import Method, MethodContext, MethodOutput, register
from ..errors import ConfigError

__all__ = ["RandomCAM", "CenterPrior", "random_weights", "center_map", "RANDOM", "CENTER"]


def _target_key(target: Any) -> str:
    """What a target's random weights are keyed on: its class index (its label for score functions)."""
    cls = getattr(target, "cls", None)
    return f"cls={cls}" if cls is not None else f"label={getattr(target, 'label', target)}"


def random_weights(targets: list, C: int, seed: int, layer: int = 0) -> Tensor:
    """Channel weights ``(B, T, C)`` ~ U(-1, 1) for B lists of T targets.

    Each target's weights come from a CPU generator seeded with ``crc32(seed, layer, key)``, the
    key being its class index: a target's map does not depend on the batch or on the other targets
    explained with it (targets of different heads with the same class index share weights).
    """
    cache: dict[str, Tensor] = {}
    rows = []
    for row in targets:
        ws = []
        for tg in row:
            key = _target_key(tg)
            if key not in cache:
                gen = torch.Generator().manual_seed(zlib.crc32(f"random:{int(seed)}:{layer}:{key}".encode()))
                cache[key] = torch.rand(C, generator=gen) * 2 - 1
            ws.append(cache[key])
        rows.append(torch.stack(ws))
    return torch.stack(rows)


def center_map(H: int, W: int, sigma: float, device: torch.device = torch.device("cpu")) -> Tensor:
    """Centred Gaussian ``(H, W)``, peak 1 at the image centre, std ``sigma * H`` / ``sigma * W`` pixels."""
    if not sigma > 0:
        raise ConfigError(f"center sigma must be > 0 (a fraction of the image size), got {sigma!r}")
    y = torch.arange(H, device=device, dtype=torch.float32) - (H - 1) / 2
    x = torch.arange(W, device=device, dtype=torch.float32) - (W - 1) / 2
    return torch.exp(-(y[:, None] ** 2 / (2 * (sigma * H) ** 2) + x[None, :] ** 2 / (2 * (sigma * W) ** 2)))


@dataclass(frozen=True)
class RandomCAM(Method):
    """Random channel weights on the layer's activations (smooth chance baseline)."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        raws = {}
        for i, n in enumerate(ctx.layers):
            a = ctx.spatial_acts(n, "method 'random'")
            w = random_weights(ctx.targets, a.shape[1], int(ctx.options["random_seed"]), i).to(a.device, a.dtype)
            raw = torch.einsum("btc,bchw->bthw", w, a)
            raws[n] = raw - raw.mean(dim=(-2, -1), keepdim=True)  # the ReLU keeps the above-average half
        return MethodOutput(raws=raws)


@dataclass(frozen=True)
class CenterPrior(Method):
    """A centred Gaussian at input resolution, the same for every image and target."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        B, _, H, W = ctx.inputs.shape
        T = ctx.scores.shape[1]
        g = center_map(H, W, float(ctx.options["sigma"]), ctx.inputs.device)
        return MethodOutput(saliency=g.expand(B, T, H, W).clone())


RANDOM = register(RandomCAM(
    name="random", description="Baseline: random channel weights on the layer's activations (smooth chance map)",
    cost="1 forward, no backward", needs_grads=False,
    options={"random_seed": Option(0, lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "an int")}))
CENTER = register(CenterPrior(
    name="center", description="Baseline: a centred Gaussian (centre prior), independent of the model",
    cost="1 forward (for the targets), no backward", needs_grads=False, needs_layer=False,
    options={"sigma": Option(0.25, positive_number, "std as a fraction of the image size")}))
