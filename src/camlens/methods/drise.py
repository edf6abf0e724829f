"""D-RISE (Petsiuk et al., "Black-box Explanation of Object Detectors via Saliency Maps", CVPR 2021):
a model-agnostic map for one detection, from random masks and the detections of the masked images.

For image b and the detection it explains (box ``L_t``, class ``c``; a box target, or
``targets=None``, on a detector), N smooth random masks ``M_i`` ``(H, W)`` in [0, 1] are drawn
(RISE's: a ``grid x grid`` binary grid, each cell kept with probability ``p``, bilinearly
upsampled to ``(grid + 1) * cell`` with ``cell = ceil(side / grid)`` and cropped at a random shift
in ``[0, cell)``). The detector runs on each masked image ``x * M_i``; the mask's weight is the
best similarity of its detections ``j`` (box ``L_j``, label ``l_j``, score ``s_j``) to the target:

    w_i = max_j IoU(L_t, L_j) * s_j * [l_j == c]          (0 when nothing is detected)

and the map is ``S = sum_i w_i M_i / (N p)`` (the expectation of ``w`` given each pixel kept).

For a target that is not a detection (a class of a classifier, a callable) the weight is the
target's score on the masked image (logits for class targets, as every camlens method) minus its
mean over the N masks: RISE (Petsiuk et al., BMVC 2018), of which D-RISE is the detector form.
Centring differs from RISE's softmax probabilities: a logit's offset means nothing, and uncentred
it would add that offset times the masks' density (noise) to the map, or make it all negative.

Convention: the paper's similarity is ``IoU * objectness * cos(P_t, P_j)`` with the detector's full
class-probability vector ``P_j``; torchvision-style outputs give only a label and a score per box,
so ``cos(onehot(c), P_j)`` is read as ``s_j`` for a box of class ``c`` and 0 otherwise (objectness 1).

Options: ``n_masks`` (default 500), ``grid`` (16), ``p`` (0.5), ``batch_size`` (16), ``mask_seed`` (0).
Cost: ``B * n_masks`` forwards in chunks of ``batch_size``; no backward; all T targets of an image
from the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..backends.base import namespace
from ..core.detection import box_iou, detection_lists, host_copy
from ..core.errors import ConfigError
from ..core.registry import Option, fraction, positive_int
from .base import Method, MethodContext, MethodOutput, Tensor, register

__all__ = ["drise_masks", "rise_crop", "rise_map", "drise_weights", "DRise", "DRISE"]

Box = tuple[float, float, float, float]


def drise_masks(n: int, size: tuple[int, int], grid: int, p: float, ops: Any, generator: Any, like: Tensor) -> Tensor:
    """RISE's random masks ``(n, H, W)`` in [0, 1] (see the module docstring), float32 on ``like``'s
    device: a binary ``(n, grid, grid)`` draw (kept where uniform < p), bilinearly upsampled
    (half-pixel centres) to ``(grid + 1) * cell`` per side, cropped at a random shift in ``[0, cell)``."""
    H, W = size
    xp = namespace(like)
    ch, cw = math.ceil(H / grid), math.ceil(W / grid)
    cells = xp.astype(ops.random((n, grid, grid), generator, like) < p, xp.float32)
    shift = ops.to_numpy(ops.random((n, 2), generator, like)) * np.array([ch, cw])
    return rise_crop(cells, np.floor(shift).astype(np.int64), size, ops.resize, xp)


def rise_crop(cells: Tensor, shifts: np.ndarray, size: tuple[int, int], resize: Any, xp: Any) -> Tensor:
    """RISE's masks ``(n, H, W)`` from binary grids ``cells`` ``(n, g, g)`` and integer shifts ``(n, 2)``
    in ``[0, cell)``: each grid bilinearly upsampled (``resize``: half-pixel centres) to
    ``(g + 1) * cell`` per side, ``cell = ceil(side / g)``, and cropped at ``(dy, dx)``."""
    H, W = size
    g = int(cells.shape[-1])
    up = resize(cells, ((g + 1) * math.ceil(H / g), (g + 1) * math.ceil(W / g)))
    dy, dx = shifts.T
    return xp.stack([up[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(int(cells.shape[0]))])


def rise_map(weights: np.ndarray, masks: Tensor, p: float, ops: Any) -> Tensor:
    """RISE's saliency ``(T, H, W)``: ``sum_i w[i, t] M_i / (N p)`` for weights ``(N, T)`` and masks
    ``(N, H, W)``; the weights of score targets are centred over the masks first (see the module docs)."""
    xp = namespace(masks)
    n, H, W = (int(v) for v in masks.shape)
    s = ops.asarray(weights, like=masks).T @ xp.reshape(masks, (n, H * W)) / (n * p)  # (T, H*W)
    return xp.reshape(s, (-1, H, W))


def drise_weights(output: Any, targets: list[tuple[Box, int]]) -> np.ndarray:
    """``(N, T)`` mask weights from a detector's output for N masked images: for each target
    ``(box, class)``, the max over detections j of ``IoU(box, L_j) * s_j * [l_j == class]``."""
    dets = detection_lists(output)
    if dets is None:
        raise ConfigError(f"method 'drise' explains object detectors (outputs: lists of per-image dicts with boxes, "
                          f"labels, scores), got a {type(output).__name__}")
    w = np.zeros((len(dets), len(targets)))
    for n, d in enumerate(dets):
        boxes, labels, scores = host_copy(d["boxes"]), host_copy(d["labels"]), host_copy(d["scores"])
        if boxes.shape[0] == 0:
            continue
        for t, (box, cls) in enumerate(targets):
            w[n, t] = max(float((box_iou(box, boxes) * scores * (labels == cls)).max()), 0.0)
    return w


def _seed(v: Any) -> Optional[str]:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "an int >= 0"


@dataclass(frozen=True)
class DRise(Method):
    """D-RISE: each random mask weighted by how well the masked image's detections match the target."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        o = ctx.options
        x, xp, ops = ctx.inputs, ctx.xp, ctx.ops
        H, W = (int(v) for v in x.shape[-2:])
        n, p = int(o["n_masks"]), float(o["p"])
        bs = int(o["batch_size"])
        gen = ops.generator(int(o["mask_seed"]), x)
        out = []
        for b, row in enumerate(ctx.targets):
            dets = [t for t, tg in enumerate(row) if getattr(tg, "detection", None) is not None]
            masks = drise_masks(n, (H, W), int(o["grid"]), p, ops, gen, x)  # (N, H, W)
            masked = x[b:b + 1] * xp.astype(masks, x.dtype)[:, None]  # (N, C, H, W)
            w = np.zeros((n, len(row)), dtype=np.float32)
            if len(dets) < len(row):  # classes / callables: their scores, centred over the masks (RISE)
                w[:] = ops.to_numpy(xp.astype(ctx.runner.scores(masked, b, bs), xp.float32))
                w -= w.mean(axis=0, keepdims=True)
            if dets:  # detections: the best match among the masked image's detections (D-RISE)
                want = [(row[t].detection.box, row[t].detection.label) for t in dets]
                w[:, dets] = np.concatenate(ctx.runner.outputs(masked, lambda res: drise_weights(res, want), bs))
            out.append(rise_map(w, masks, p, ops))
        return MethodOutput(saliency=xp.stack(out))


DRISE = register(DRise(
    name="drise",
    description="D-RISE: random masks weighted by the masked image's best detection match (IoU x score); "
                "RISE (its score) for other targets",
    cost="n_masks forwards per image, batched; no backward; all targets of an image at once",
    needs_grads=False,
    needs_layer=False,
    options={"n_masks": Option(500, positive_int, "random masks per image"),
             "grid": Option(16, positive_int, "mask grid cells per side"),
             "p": Option(0.5, fraction, "probability that a grid cell is kept"),
             "batch_size": Option(16, positive_int, "masked images per forward"),
             "mask_seed": Option(0, _seed, "random seed of the masks (explain's own seed= is for noise_smooth)")},
))
