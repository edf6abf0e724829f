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

Volumes and clips: a 3-D layer ``(C, d, h, w)`` is read as ``(C, d, h*w)``; the ablated copies go
back into the layer as ``(k, C, d, h, w)`` (:func:`camlens.core.layouts.from_map`), and ``raw[b, t]`` is
``(T, d, h, w)``. The principal-component ranking of ``ratio < 1`` is over all ``d*h*w`` positions.

Exact shortcut: an all-zero channel adds ``w * 0`` to the map whatever its weight, so it is not
ablated (no forward; weight 0). When ``S[b, t] == 0`` the division is skipped
(``w = S - S_c``) instead of returning inf / NaN.

Options: ``batch_size`` (int, default 32), ``ratio`` (float in (0, 1], default 1.0),
``ablation_value`` (float or None, default None: the rule above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import array_api_compat

from ..backends.base import namespace, ops_for
from ..core.errors import LayerError
from ..core.registry import Option, fraction, number, optional, positive_int
from .base import Method, MethodContext, MethodOutput, Tensor, register

__all__ = ["AblationCam", "ABLATIONCAM", "ablation_value", "channels_to_ablate", "ablationcam_image"]

ABLATION_OFFSET = 1e7  # pytorch-grad-cam's ABLATION_VALUE below the minimum for layers with negative outputs
SVD_THRESHOLD = 0.01  # pytorch-grad-cam's threshold on the normalised |first principal component|


def ablation_value(acts: Tensor) -> Tensor:
    """pytorch-grad-cam's value for an ablated channel of acts ``(C, h, w)``: 0 if ``min == 0``, else ``min - 1e7``."""
    xp = namespace(acts)
    lo = xp.min(acts)
    return xp.where(lo == 0, xp.zeros_like(lo), lo - ABLATION_OFFSET)


def channels_to_ablate(acts: Tensor, ratio: float) -> Tensor:
    """Boolean ``(C,)``: the channels of acts ``(C, h, w)`` that pytorch-grad-cam's selection ablates.

    ``ratio == 1``: all. Otherwise rank channels by the share of their min-max'd ``|A_c|`` inside
    the mask ``norm(|X v_1|) > 0.01`` (X: the ``(h*w, C)`` activations centred per channel, v_1 its
    first right singular vector) and keep the ``int(C * ratio)`` highest and lowest.
    """
    xp = namespace(acts)
    dev = array_api_compat.device(acts)
    C = acts.shape[0]
    if ratio >= 1.0:
        return xp.ones(C, dtype=xp.bool, device=dev)
    k = int(C * ratio)
    if k == 0:
        return xp.zeros(C, dtype=xp.bool, device=dev)
    A = xp.reshape(xp.astype(acts, xp.float32, copy=False), (C, -1))  # (C, h*w)
    X = A.T  # (h*w, C)
    X = X - xp.mean(X, axis=0)
    vh = xp.linalg.svd(X, full_matrices=False)[2]
    proj = xp.abs(X @ vh[0])
    proj = proj - xp.min(proj)
    fg = (proj / xp.max(proj)) > SVD_THRESHOLD  # (h*w,)
    nrm = xp.abs(A)
    nrm = nrm - xp.min(nrm, axis=1, keepdims=True)
    nrm = nrm / xp.max(nrm, axis=1, keepdims=True)  # NaN for a constant channel, as in numpy
    score = xp.sum(nrm * xp.astype(fg, nrm.dtype), axis=1) / xp.sum(nrm, axis=1)
    order = xp.argsort(score, stable=True)  # NaN last, like numpy's argsort
    picked = xp.concat([order[:k], order[-k:]])  # (2k,) the lowest and the highest ranked
    return xp.any(xp.arange(C, device=dev)[:, None] == picked[None, :], axis=1)


def ablationcam_image(ctx: MethodContext, name: str, b: int, batch_size: int = 32, ratio: float = 1.0,
                      value: Optional[float] = None) -> Tensor:
    """Raw Ablation-CAM maps of image ``b`` at layer ``name``: ``(T, h, w)``.

    Runs ``ceil(K / batch_size)`` forwards from the layer on, K = ablated channels that are not all zero.
    """
    acts = ctx.acts[name][b]  # (C, h, w)
    xp = namespace(acts)
    ops = ctx.ops if ctx.ops is not None else ops_for(acts)
    dev = array_api_compat.device(acts)
    C, h, w = acts.shape
    flat = xp.reshape(acts, (C, h * w))
    v = ablation_value(acts) if value is None else xp.asarray(value, dtype=acts.dtype, device=dev)
    v = xp.astype(v, acts.dtype, copy=False)
    todo_mask = channels_to_ablate(acts, ratio) & xp.any(flat != 0, axis=1)
    todo = xp.nonzero(todo_mask)[0]  # one sync
    S = xp.astype(ctx.scores[b], xp.float32, copy=False)  # (T,)
    x_b = ctx.inputs[b:b + 1]
    drops = []
    for i in range(0, todo.shape[0], batch_size):
        idx = todo[i:i + batch_size]
        k = idx.shape[0]
        copies = xp.asarray(xp.broadcast_to(acts, (k, C, h, w)), copy=True)  # fresh: may be changed in place
        copies = ops.set_at(copies, (xp.arange(k, device=dev), idx), v)  # copy j: channel idx[j] set to v
        copies = ctx.to_layer(name, copies, b)  # tokens / channels-last layers take them in their own layout
        drops.append(S - ctx.runner.scores_with_layer(ctx.modules[name], copies, x_b, b, batch_size))  # (k, T)
    T = S.shape[0]
    if drops:  # weights[:, c] = the drops of channel c (its place in todo), 0 for channels not ablated
        D = xp.concat(drops).T  # (T, K)
        pos = xp.cumulative_sum(xp.astype(todo_mask, xp.int64)) - 1
        weights = xp.where(todo_mask[None, :], xp.take(D, xp.where(todo_mask, pos, xp.zeros_like(pos)), axis=1),
                           0.0)  # (T, C)
    else:
        weights = xp.zeros((T, C), dtype=S.dtype, device=dev)
    weights = weights / xp.where(S == 0, xp.ones_like(S), S)[:, None]
    return xp.reshape(xp.astype(weights, acts.dtype, copy=False) @ flat, (T, h, w))


@dataclass(frozen=True)
class AblationCam(Method):
    """Ablation-CAM on each given layer; see the module docstring for the maths and options."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        o = ctx.options
        raws = {}
        for name in ctx.layers:
            a = ctx.spatial_acts(name, "Ablation-CAM")
            raws[name] = namespace(a).stack([ablationcam_image(ctx, name, b, o["batch_size"], float(o["ratio"]),
                                                               o["ablation_value"]) for b in range(a.shape[0])])
        return MethodOutput(raws=raws)


ABLATIONCAM = register(AblationCam(
    name="ablationcam",
    description="Ablation-CAM: channels weighted by the relative score drop when each one is ablated",
    cost="1 forward + C forwards from the layer on per image and layer, batched; all targets share them "
         "(ratio<1: fewer)",
    needs_grads=False,
    volumes=True,  # channels of a 3-D map (C, d, h, w), read as (C, d, h*w): ablated and fed back as (C, d, h, w)
    options={"batch_size": Option(32, positive_int, "ablated copies per forward"),
             "ratio": Option(1.0, fraction, "share of channels to ablate"),
             "ablation_value": Option(None, optional(number, "pytorch-grad-cam's rule"), "what ablated channels are set to")},
))
