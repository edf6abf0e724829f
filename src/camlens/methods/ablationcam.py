"""Ablation-CAM (Desai & Ramaswamy, 2020): channels weighted by the score drop when they are removed.

For image b and a layer with activations ``A = acts[b]`` ``(C, h, w)``:

    A^(c)     = A with channel c set to the ablation value v                    (C, h, w)
    S_c[t]    = S[b, t] with the layer's output replaced by A^(c)               (T,) per c
    w[t, c]   = (S[b, t] - S_c[t]) / S[b, t]                                    (T, C)
    raw[b, t] = sum_c w[t, c] * A_c                                             (T, h, w)

The ablated copies replace the layer's output (``ctx.runner.scores_with_layer``), so only the
part of the network after the layer is recomputed per copy; copies are built chunk by chunk
(``batch_size x C x h x w``) and one batch of forwards gives the scores of all T targets.

Conventions of pytorch-grad-cam's ``AblationLayer``:

* ablation value ``v = 0`` when ``min(A) == 0`` (the usual post-ReLU case), otherwise
  ``v = min(A) - 1e7`` (min over the image's whole activation). pytorch-grad-cam's in-place loop
  additionally lowers ``v`` by a further 1e7 for each later copy of a batch in that second case; we
  use one value for every copy. Option ``ablation_value`` overrides the rule (e.g. 0.0, the paper).
* ``ratio`` < 1 (``ratio_channels_to_ablate``): channels are ranked by how much of their
  (|A_c|, min-max'd) mass falls inside the foreground of the first principal component of ``A``
  (``|projection|`` min-max'd ``> 0.01``); the ``int(C * ratio)`` highest AND the
  ``int(C * ratio)`` lowest ranked channels are ablated (a constant channel ranks highest, NaN in
  numpy's sort), so ``ratio >= 0.5`` ablates every channel (pytorch-grad-cam mis-assembles the
  duplicated picks there). Channels not ablated keep the original score: weight 0. Ties in the
  ranking are broken by channel index; pytorch-grad-cam uses numpy's unstable sort, so with equal
  scores at the cut (common on 2 x 2 maps) the two may ablate different channels.

Exact shortcut: an all-zero channel adds ``w * 0`` to the map whatever its weight, so it is not
ablated (no forward; weight 0). When ``S[b, t] == 0`` the division is skipped
(``w = S - S_c``) instead of returning inf / NaN.

Options: ``batch_size`` (int, default 32), ``ratio`` (float in (0, 1], default 1.0),
``ablation_value`` (float or None, default None: the rule above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..registry import Option, fraction, number, optional, positive_int
from .base import Method, MethodContext, MethodOutput, register

__all__ = ["AblationCam", "ABLATIONCAM", "ablation_value", "channels_to_ablate", "ablationcam_image"]

ABLATION_OFFSET = 1e7  # pytorch-grad-cam's ABLATION_VALUE below the minimum for layers with negative outputs
SVD_THRESHOLD = 0.01  # pytorch-grad-cam's threshold on the normalised |first principal component|


def ablation_value(acts: Tensor) -> Tensor:
    """pytorch-grad-cam's value for an ablated channel of acts ``(C, h, w)``: 0 if ``min == 0``, else ``min - 1e7``."""
    lo = acts.amin()
    return torch.where(lo == 0, torch.zeros_like(lo), lo - ABLATION_OFFSET)


def channels_to_ablate(acts: Tensor, ratio: float) -> Tensor:
    """Boolean ``(C,)``: the channels of acts ``(C, h, w)`` that pytorch-grad-cam's selection ablates.

    ``ratio == 1``: all. Otherwise rank channels by the share of their min-max'd ``|A_c|`` inside
    the mask ``norm(|X v_1|) > 0.01`` (X: the ``(h*w, C)`` activations centred per channel, v_1 its
    first right singular vector) and keep the ``int(C * ratio)`` highest and lowest.
    """
    C = acts.shape[0]
    keep = torch.zeros(C, dtype=torch.bool, device=acts.device)
    if ratio >= 1.0:
        return keep | True
    k = int(C * ratio)
    if k == 0:
        return keep
    X = acts.float().flatten(1).T  # (h*w, C)
    X = X - X.mean(0)
    vh = torch.linalg.svd(X, full_matrices=False).Vh
    proj = (X @ vh[0]).abs()
    proj = proj - proj.min()
    fg = (proj / proj.max()) > SVD_THRESHOLD  # (h*w,)
    nrm = acts.float().flatten(1).abs()
    nrm = nrm - nrm.amin(1, keepdim=True)
    nrm = nrm / nrm.amax(1, keepdim=True)  # NaN for a constant channel, as in numpy
    score = (nrm * fg).sum(1) / nrm.sum(1)
    order = torch.argsort(score, stable=True)  # NaN last, like numpy's argsort
    keep[order[:k]] = True
    keep[order[-k:]] = True
    return keep


def ablationcam_image(ctx: MethodContext, name: str, b: int, batch_size: int = 32, ratio: float = 1.0,
                      value: Optional[float] = None) -> Tensor:
    """Raw Ablation-CAM maps of image ``b`` at layer ``name``: ``(T, h, w)``.

    Runs ``ceil(K / batch_size)`` forwards from the layer on, K = ablated channels that are not all zero.
    """
    acts = ctx.acts[name][b]  # (C, h, w)
    C = acts.shape[0]
    flat = acts.flatten(1)
    v = ablation_value(acts) if value is None else torch.tensor(value, dtype=acts.dtype, device=acts.device)
    todo = torch.nonzero(channels_to_ablate(acts, ratio) & (flat != 0).any(1)).flatten()  # one sync
    S = ctx.scores[b].float()  # (T,)
    x_b = ctx.inputs[b:b + 1]
    drops = []
    for i in range(0, todo.numel(), batch_size):
        idx = todo[i:i + batch_size]
        copies = acts.expand(idx.numel(), *acts.shape).clone()  # (k, C, h, w), fresh: may be changed in place
        copies[torch.arange(idx.numel(), device=acts.device), idx] = v.to(acts.dtype)
        drops.append(S - ctx.runner.scores_with_layer(ctx.modules[name], copies, x_b, b, batch_size))  # (k, T)
    weights = torch.zeros((S.shape[0], C), dtype=S.dtype, device=acts.device)  # (T, C)
    if drops:
        weights[:, todo] = torch.cat(drops).T
    weights = weights / torch.where(S == 0, torch.ones_like(S), S)[:, None]
    return torch.einsum("tc,chw->thw", weights.to(acts.dtype), acts)




@dataclass(frozen=True)
class AblationCam(Method):
    """Ablation-CAM on each given layer; see the module docstring for the maths and options."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        o = ctx.options
        raws = {}
        for name in ctx.layers:
            a = ctx.spatial_acts(name, "Ablation-CAM")
            raws[name] = torch.stack([ablationcam_image(ctx, name, b, o["batch_size"], float(o["ratio"]),
                                                        o["ablation_value"]) for b in range(a.shape[0])])
        return MethodOutput(raws=raws)


ABLATIONCAM = register(AblationCam(
    name="ablationcam",
    description="Ablation-CAM: channels weighted by the relative score drop when each one is ablated",
    cost="1 forward + C forwards from the layer on per image and layer, batched; all targets share them "
         "(ratio<1: fewer)",
    needs_grads=False,
    options={"batch_size": Option(32, positive_int, "ablated copies per forward"),
             "ratio": Option(1.0, fraction, "share of channels to ablate"),
             "ablation_value": Option(None, optional(number, "pytorch-grad-cam's rule"), "what ablated channels are set to")},
))
