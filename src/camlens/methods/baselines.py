"""Baseline "methods" that explain nothing, so metric tables show what chance looks like.

* ``random``: RandomCAM-style — the layer's activations ``A`` ``(B, C, h, w)`` weighted by random
  channel weights ``w[b, t, c] ~ U(-1, 1)``: ``raw[b, t] = sum_c w[b, t, c] A[b, c] - mean_hw(...)``
  ``(B, T, h, w)`` (volumes: the mean over all ``d*h*w`` positions), then the usual ReLU → upsampling →
  min-max. Seeded by the option
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
  image and target ``(B, T, H, W)``; for volumes / clips also along D (``s D``): ``(B, T, D, H, W)``. Objects in photos sit near the centre more often than not, so
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
from typing import Any, Optional

import array_api_compat

from ..backends.base import namespace, ops_for
from ..core.errors import ConfigError
from ..core.registry import Option, positive_number
from .base import Method, MethodContext, MethodOutput, Tensor, register
from .gradcam import weighted_sum

__all__ = ["RandomCAM", "CenterPrior", "random_weights", "center_map", "RANDOM", "CENTER"]


def _target_key(target: Any) -> str:
    """What a target's random weights are keyed on: its class index (its label for score functions)."""
    cls = getattr(target, "cls", None)
    return f"cls={cls}" if cls is not None else f"label={getattr(target, 'label', target)}"


def random_weights(targets: list, C: int, seed: int, layer: int = 0, *, like: Tensor, ops: Any = None) -> Tensor:
    """Channel weights ``(B, T, C)`` ~ U(-1, 1) for B lists of T targets, float32 on ``like``'s device
    (an array of the backend whose ``ops`` draw them; default: the Ops of ``like``).

    Each target's weights are ``2 u - 1``, u the ``C`` float32 uniform draws of a CPU generator
    (``ops.generator``) seeded with ``crc32(seed, layer, key)``, the key being its class index: the
    same numbers on every device, and a target's map does not depend on the batch or on the other
    targets explained with it (targets of different heads with the same class index share weights).
    """
    xp = namespace(like)
    ops = ops_for(like) if ops is None else ops
    like32 = xp.zeros((), dtype=xp.float32, device=array_api_compat.device(like))
    cache: dict[str, Tensor] = {}
    rows = []
    for row in targets:
        ws = []
        for tg in row:
            key = _target_key(tg)
            if key not in cache:
                gen = ops.generator(zlib.crc32(f"random:{int(seed)}:{layer}:{key}".encode()))  # on the CPU
                cache[key] = ops.random((C,), gen, like32) * 2 - 1
            ws.append(cache[key])
        rows.append(xp.stack(ws))
    return xp.stack(rows)


def center_map(xp: Any, H: int, W: int, sigma: float, device: Optional[Any] = None) -> Tensor:
    """Centred Gaussian ``(H, W)`` float32 of namespace ``xp`` on ``device``, peak 1 at the image centre,
    std ``sigma * H`` / ``sigma * W`` pixels."""
    if not sigma > 0:
        raise ConfigError(f"center sigma must be > 0 (a fraction of the image size), got {sigma!r}")
    y = xp.arange(H, device=device, dtype=xp.float32) - (H - 1) / 2
    x = xp.arange(W, device=device, dtype=xp.float32) - (W - 1) / 2
    return xp.exp(-(y[:, None] ** 2 / (2 * (sigma * H) ** 2) + x[None, :] ** 2 / (2 * (sigma * W) ** 2)))


@dataclass(frozen=True)
class RandomCAM(Method):
    """Random channel weights on the layer's activations (smooth chance baseline)."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        raws = {}
        for i, n in enumerate(ctx.layers):
            a = ctx.spatial_acts(n, "method 'random'")
            xp = namespace(a)
            w = random_weights(ctx.targets, a.shape[1], int(ctx.options["random_seed"]), i, like=a, ops=ctx.ops)
            raw = weighted_sum(xp, xp.astype(w, a.dtype, copy=False), a)  # (B, T, h, w)
            raws[n] = raw - xp.mean(raw, axis=(-2, -1), keepdims=True)  # the ReLU keeps the above-average half
        return MethodOutput(raws=raws)


@dataclass(frozen=True)
class CenterPrior(Method):
    """A centred Gaussian at input resolution, the same for every image and target."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        B, _, *sides = ctx.inputs.shape
        T = ctx.scores.shape[1]
        xp = namespace(ctx.inputs)
        dev = array_api_compat.device(ctx.inputs)
        sigma = float(ctx.options["sigma"])
        g = center_map(xp, sides[-2], sides[-1], sigma, dev)
        if len(sides) == 3:  # volumes / clips: times the Gaussian along D (a separable 3-D Gaussian)
            g = center_map(xp, sides[0], 1, sigma, dev)[:, :, None] * g[None]
        return MethodOutput(saliency=xp.asarray(xp.broadcast_to(g, (B, T, *sides)), copy=True))


RANDOM = register(RandomCAM(
    name="random", description="Baseline: random channel weights on the layer's activations (smooth chance map)",
    cost="1 forward, no backward", needs_grads=False, volumes=True,
    options={"random_seed": Option(0, lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "an int")}))
CENTER = register(CenterPrior(
    name="center", description="Baseline: a centred Gaussian (centre prior), independent of the model",
    cost="1 forward (for the targets), no backward", needs_grads=False, needs_layer=False, volumes=True,
    options={"sigma": Option(0.25, positive_number, "std as a fraction of the image size")}))
