"""Score-CAM (Wang et al., 2020): channels weighted by the target score of the input they reveal.

For image b and a layer with activations ``A = acts[b]`` ``(C, h, w)`` and input ``x_b`` ``(3, H, W)``:

    U_c      = upsample(A_c) to (H, W)     bilinear, align_corners=True (pytorch-grad-cam's
                                            ``nn.UpsamplingBilinear2d``)
    M_c      = (U_c - min U_c) / (max U_c - min U_c + 1e-8)                     mask in [0, 1]
    s[t, c]  = S[b, t](x_b * M_c)           score of target t on the masked input    (T, C)
    w[t]     = softmax_c s[t]                                                        (T, C)
    raw[b, t] = sum_c w[t, c] * A_c                                                  (T, h, w)

With ``weights="class_probability"`` (tf-keras-vis' ``Scorecam``) the weight is instead the
target's probability on the masked input, ``w[t, c] = P[b, t](x_b * M_c)`` — the softmax over the
head's classes at the target's class (sigmoid for a multi-label head, ``1 - p`` for ``sign=-1``),
with no softmax over the channels; only class targets on a classifier head have one.

The masked inputs depend on the channel only, never on the target: one batch of C masked
forwards gives the scores of all T targets of image b. Masked inputs are built chunk by chunk
(``batch_size x 3 x H x W``); nothing of size ``C x 3 x H x W`` is ever held.

Volumes and clips (inputs ``(1, 3, D, H, W)``, layer maps ``(C, d, h, w)``): the same with
trilinear upsampling (``align_corners=True``) to ``(D, H, W)``.

Exact shortcut: a channel whose upsampled map is constant (e.g. a dead, all-zero channel) gets
the mask 0 (``0 / (0 + 1e-8)``), i.e. the all-zero input, whichever channel it is. Its score is
computed once per image and shared, so a layer with many dead channels costs fewer forwards with
the same result.

Options:
    batch_size (int, default 32): masked inputs per forward (CPU: 16-32 is fastest per image).
    max_channels (int or None, default None): "Faster Score-CAM": only the ``max_channels``
        channels with the largest spatial variance of ``A_c`` (over h x w) are masked and scored;
        the other channels are left out of the softmax and get weight 0. Cost drops from C to
        ``max_channels`` forwards per image; the map is an approximation, close to the full one
        when the low-variance channels carry little (resnet18 layer3, 64 of 256 channels:
        correlation 0.99 with the full map).
    weights ("channel_softmax" or "class_probability", default "channel_softmax"): how a channel's
        masked scores become its weight: the softmax over the channels of each target's scores
        (the paper's code, pytorch-grad-cam), or the target's class probability on the masked
        input (tf-keras-vis 0.8.7).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import array_api_compat

from ..backends.base import VOLUME_KINDS, namespace, ops_for
from ..core.errors import ConfigError
from ..core.registry import Option, one_of, optional, positive_int
from ..core.targets import split_outputs, target_probabilities
from .base import Method, MethodContext, MethodOutput, Tensor, register

__all__ = ["ScoreCam", "SCORECAM", "channel_masks", "scorecam_image"]

MASK_EPS = 1e-8  # pytorch-grad-cam's epsilon in the min-max of the upsampled channel maps
WEIGHTS = ("channel_softmax", "class_probability")


def channel_masks(acts: Tensor, size: tuple[int, int], ops: Any = None) -> Tensor:
    """Score-CAM masks: channel maps ``(k, h, w)`` -> ``(k, H, W)`` upsampled and min-max'd to [0, 1].

    Bilinear with ``align_corners=True`` (what ``nn.UpsamplingBilinear2d`` does; the backend's
    ``Ops.resize_corners``, in float32), then ``(U - min) / (max - min + 1e-8)`` per channel; a
    constant channel gives an all-zero mask. ``ops``: the backend's Ops (default: those of ``acts``).
    """
    xp = namespace(acts)
    ops = ops_for(acts) if ops is None else ops
    up = ops.resize_corners(xp.astype(acts, xp.float32, copy=False), size)  # (k, H, W)
    flat = xp.reshape(up, (up.shape[0], -1))
    one = (up.shape[0],) + (1,) * (up.ndim - 1)  # (k, 1, 1) or, for volumes, (k, 1, 1, 1)
    lo = xp.reshape(xp.min(flat, axis=1), one)
    hi = xp.reshape(xp.max(flat, axis=1), one)
    return (up - lo) / (hi - lo + MASK_EPS)


def _scatter(xp: Any, C: int, idx: Tensor, values: Tensor, dev: Any) -> Tensor:
    """Boolean ``(C,)``: True at the channels ``idx`` ``(k,)`` whose ``values`` ``(k,)`` are True (a
    ``(C, k)`` comparison; k is at most a chunk of channels)."""
    hit = xp.arange(C, device=dev)[:, None] == idx[None, :]
    return xp.any(hit & values[None, :], axis=1)


def check_probabilities(ctx: MethodContext) -> None:
    """``weights="class_probability"`` needs every target to have a class probability: a clear
    error naming those that do not (score functions, regions, boxes, ``"none"`` heads)."""
    xp = namespace(ctx.scores)
    p = target_probabilities(ctx.targets, ctx.heads, like=ctx.scores)  # (B, T), NaN where undefined
    bad = xp.any(xp.isnan(p), axis=0)
    missing = [ctx.targets[0][t].label for t in range(p.shape[1]) if bool(bad[t])]
    if missing:
        raise ConfigError(f"scorecam weights='class_probability' needs class targets on a softmax / sigmoid head; "
                          f"{missing} have no class probability (score functions, regions, boxes or heads with "
                          "activation 'none'); use the default weights='channel_softmax'")


def _probabilities(ctx: MethodContext, b: int) -> Any:
    """``rows(x (N, C, H, W), batch_size) -> (N, T)``: image ``b``'s targets' class probabilities
    on the outputs of N inputs (``1 - p`` for ``sign=-1`` targets)."""
    row = ctx.targets[b]

    def read(out: Any) -> Tensor:
        heads = split_outputs(out)
        n = int(next(iter(heads.values())).shape[0])
        p = target_probabilities([row] * n, heads)  # (n, T)
        xp = namespace(p)
        neg = xp.asarray([tg.sign == -1 for tg in row], device=array_api_compat.device(p))
        return xp.where(neg[None, :], 1 - p, p)

    def rows(x: Tensor, batch_size: int) -> Tensor:
        parts = ctx.runner.outputs(x, read, batch_size)
        return namespace(*parts).concat(parts)

    return rows


def scorecam_image(ctx: MethodContext, acts: Tensor, b: int, batch_size: int = 64,
                   max_channels: Optional[int] = None, grid: Optional[tuple[int, int, int]] = None,
                   weights: str = "channel_softmax") -> Tensor:
    """Raw Score-CAM maps of image ``b`` for one layer: acts ``(C, h, w)`` -> ``(T, h, w)``.

    Runs ``ceil(K / batch_size)`` forwards through ``ctx.runner.scores``, K = number of scored
    channels with a non-constant mask, plus one row for the all-zero input when any scored
    channel has a constant map (that row shares a chunk with the others).
    """
    xp = namespace(acts)
    ops = ctx.ops if ctx.ops is not None else ops_for(acts)
    x_b = ctx.inputs[b:b + 1]  # (1, 3, H, W)
    size = (int(x_b.shape[-2]), int(x_b.shape[-1]))
    C, h, w = acts.shape
    flat = xp.reshape(acts, (C, h * w))
    spatial = acts  # what the masks upsample: (C, h, w), or a volume's (C, d, h', w') (acts: (C, d, h'*w'))
    if grid is not None:
        spatial = xp.reshape(acts, (C, *grid))
        size = tuple(int(v) for v in x_b.shape[-3:])  # type: ignore[assignment]
    dev = array_api_compat.device(acts)

    # the channels that take part in the softmax
    if max_channels is not None and max_channels < C:
        top = ops.topk(xp.var(xp.astype(flat, xp.float32, copy=False), axis=1), max_channels)[1]
        selected = _scatter(xp, C, top, xp.ones(top.shape, dtype=xp.bool, device=dev), dev)
    else:
        selected = xp.ones(C, dtype=xp.bool, device=dev)

    # constant low-res maps are candidates for the all-zero mask; keep only those whose
    # upsampled map is exactly constant (bilinear rounding could break constancy)
    candidates = xp.nonzero(selected & (xp.max(flat, axis=1) == xp.min(flat, axis=1)))[0]  # one sync
    zero_mask = xp.zeros(C, dtype=xp.bool, device=dev)
    for i in range(0, candidates.shape[0], batch_size):
        idx = candidates[i:i + batch_size]
        m = channel_masks(xp.take(spatial, idx, axis=0), size, ops)
        zero_mask = zero_mask | _scatter(xp, C, idx, xp.max(xp.reshape(m, (m.shape[0], -1)), axis=1) == 0, dev)
    scored_mask = selected & ~zero_mask
    scored = xp.nonzero(scored_mask)[0]  # one sync
    K = scored.shape[0]
    need_zero = bool(xp.any(zero_mask))
    n_rows = K + int(need_zero)  # row K (if any) is the all-zero input

    def chunks() -> Iterator[Tensor]:
        for i in range(0, n_rows, batch_size):
            idx = scored[i:min(i + batch_size, K)]
            parts = [x_b * xp.astype(channel_masks(xp.take(spatial, idx, axis=0), size, ops)[:, None], x_b.dtype,
                                     copy=False)] if idx.shape[0] else []
            if need_zero and i + batch_size >= n_rows:
                parts.append(xp.zeros_like(x_b))
            yield xp.concat(parts)

    score = _probabilities(ctx, b) if weights == "class_probability" else \
        (lambda chunk, n: ctx.runner.scores(chunk, b, n))
    rows = xp.concat([score(chunk, batch_size) for chunk in chunks()])  # (n_rows, T)
    # s[c] = rows[position of c among the scored channels], rows[K] for all-zero masks, -inf (weight 0)
    # for the channels left out
    pos = xp.cumulative_sum(xp.astype(scored_mask, xp.int64)) - 1
    pos = xp.where(zero_mask, xp.full_like(pos, K), xp.where(scored_mask, pos, xp.zeros_like(pos)))
    s = xp.where(selected[:, None], xp.take(rows, pos, axis=0), float("-inf"))  # (C, T)
    if weights == "class_probability":  # (T, C) the probabilities themselves; 0 for the channels left out
        wts = xp.where(selected[None, :], s.T, xp.zeros_like(s.T))
    else:
        wts = ops.softmax(s.T, axis=1)  # (T, C) softmax over the channels
    T = wts.shape[0]
    return xp.reshape(xp.astype(wts, acts.dtype, copy=False) @ flat, (T, h, w))


@dataclass(frozen=True)
class ScoreCam(Method):
    """Score-CAM on each given layer; see the module docstring for the maths and options."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        bs, max_ch, weights = ctx.options["batch_size"], ctx.options["max_channels"], ctx.options["weights"]
        if weights == "class_probability":
            check_probabilities(ctx)
        raws = {}
        for name in ctx.layers:
            a = ctx.spatial_acts(name, "Score-CAM")
            lay = ctx.layouts.get(name)
            grid = tuple(lay.grid) if lay is not None and lay.kind in VOLUME_KINDS else None  # masks are 3-D
            raws[name] = namespace(a).stack([scorecam_image(ctx, a[b], b, bs, max_ch, grid, weights)
                                             for b in range(a.shape[0])])
        return MethodOutput(raws=raws)


SCORECAM = register(ScoreCam(
    name="scorecam",
    description="Score-CAM: channels weighted by the softmax of the target scores of the inputs they mask",
    cost="1 forward + C masked forwards per image and layer, batched; all targets share them "
         "(max_channels=N: N forwards)",
    needs_grads=False,
    volumes=True,
    options={"batch_size": Option(32, positive_int, "masked inputs per forward"),
             "max_channels": Option(None, optional(positive_int, "all channels"),
                                    "score only the N channels of highest activation variance"),
             "weights": Option("channel_softmax", one_of(*WEIGHTS),
                               "'channel_softmax' (softmax over the channels of the masked scores, the paper's code) "
                               "or 'class_probability' (the target's class probability, as tf-keras-vis)")},
))
