"""Tiled explanations of large images (e.g. 2048x2048) with bounded peak memory.

An image ``(C, H, W)`` is covered by equal tiles ``(th, tw)`` (:func:`tile_boxes`); each tile is
explained like an untiled call (one forward + one batched backward per batch of tiles) and the
per-tile maps are blended into full-size canvases with linear feathering (:func:`tile_weights`):

    M(y, x) = sum_i w_i(y, x) * m_i(y, x) / sum_i w_i(y, x)

where ``m_i`` is tile i's map (ReLU'd and bilinearly upsampled to ``(th, tw)``, placed at the
tile's position, zero outside it) and ``w_i`` its weight map (zero outside the tile). The weights
ramp linearly across the overlap, so where exactly two tiles overlap by ``overlap`` pixels the
weights sum to 1 and the blend is a cross-fade without seams.

Peak memory is that of ``tile_batch`` tiles plus the canvases ``(B, T, H, W)``: tiles are sliced
from the input batch by batch, never all at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import array_api_compat
import numpy as np

from ..backends.base import get_backend, namespace, ops_for, to_float32
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.activations import model_activation
from ..core.layouts import layer_reads
from ..core.postprocess import upsample
from ..core.regions import contains_region
from ..methods import Method, MethodOutput
from .finish import finish
from .passes import run_pass
from .wrappers import aug_smoothed, noise_smoothed
from ..core.targets import (Categories, RawHeads, ResolvedTarget, combine_targets, resolve_targets, split_outputs,
                      target_probabilities)

__all__ = ["tile_size", "tile_boxes", "tile_weights", "weight_sum", "TileCanvas", "check_tiling", "explain_tiled"]

TileSpec = Union[int, Sequence[int]]
Tensor = Any  # an array of the model's backend


def check_tiling(tile: TileSpec, overlap: int, tile_batch: int) -> tuple[int, int]:
    """Validate the tiling options; return the tile size ``(th, tw)`` before clipping to the image.

    Raises:
        ValueError: a non-positive tile, ``overlap`` outside ``[0, min(th, tw))``, ``tile_batch < 1``.
    """
    if isinstance(tile, bool) or not (isinstance(tile, int) or (isinstance(tile, (tuple, list)) and len(tile) == 2
                                                                and all(isinstance(t, int) and not isinstance(t, bool)
                                                                        for t in tile))):
        raise ConfigError(f"tile must be a positive int or a (height, width) pair of positive ints, e.g. tile=512; "
                         f"got {tile!r}")
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    if th < 1 or tw < 1:
        raise ConfigError(f"tile must be positive, got {tile!r}; e.g. tile=512 explains 512x512 tiles")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ConfigError(f"overlap must be an int >= 0 (pixels shared by neighbouring tiles), got {overlap!r}")
    if overlap >= min(th, tw):
        raise ConfigError(f"overlap ({overlap}) must be smaller than the tile {(th, tw)}; "
                         f"e.g. overlap={max(min(th, tw) // 4, 0)}")
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1:
        raise ConfigError(f"tile_batch must be an int >= 1 (tiles per forward/backward pass), got {tile_batch!r}")
    return th, tw


def tile_size(H: int, W: int, tile: TileSpec) -> tuple[int, int]:
    """The tile size ``(th, tw) = (min(tile_h, H), min(tile_w, W))``: a tile never exceeds the image."""
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    return min(th, H), min(tw, W)


def _starts(L: int, t: int, overlap: int) -> list[int]:
    """Tile starts along one axis of length ``L`` for tiles of length ``t <= L``.

    Stride ``s = t - overlap``; ``n = ceil((L - t) / s) + 1`` tiles start at ``0, s, ..., (n-2) s``
    and the last at ``L - t`` (it ends at the edge). ``(n-1) s >= L - t`` makes the last overlap
    ``t - (L - t - (n-2) s) >= t - s = overlap``, and ``(n-2) s < L - t`` keeps the starts distinct.
    """
    if t >= L:
        return [0]
    s = t - overlap
    n = math.ceil((L - t) / s) + 1
    return [i * s for i in range(n - 1)] + [L - t]


def tile_boxes(H: int, W: int, tile: TileSpec, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y0, x0)`` of equal tiles ``(th, tw) = tile_size(H, W, tile)`` covering ``H x W``.

    Row-major order. Consecutive tiles along each axis overlap by at least ``overlap`` pixels; the
    last tile along each axis is shifted to end exactly at the image edge (tiles are never padded);
    an image not larger than the tile is one tile of the image's size.
    """
    th, tw = tile_size(H, W, tile)
    if overlap < 0 or (overlap >= min(th, tw) and (th < H or tw < W)):
        raise ConfigError(f"overlap must be in [0, tile) for tiles {(th, tw)}, got {overlap}")
    return [(y0, x0) for y0 in _starts(H, th, overlap) for x0 in _starts(W, tw, overlap)]


def _ramp(n: int, overlap: int, ramp_start: bool, ramp_end: bool) -> Tensor:
    """1-D weights ``(n,)``: ``r(d) = min(1, (d + 1) / (overlap + 1))`` with ``d`` the distance in pixels
    to each border that ramps (the minimum over both ends), 1 where no border ramps."""
    r = np.ones(n, dtype=np.float32)
    if overlap <= 0:
        return r
    d = np.arange(n, dtype=np.float32)
    if ramp_start:
        r = np.minimum(r, (d + 1) / np.float32(overlap + 1))
    if ramp_end:
        r = np.minimum(r, (n - d) / np.float32(overlap + 1))
    return r


def tile_weights(H: int, W: int, th: int, tw: int, y0: int, x0: int, overlap: int) -> np.ndarray:
    """Feathering weights ``(th, tw)`` (NumPy float32) of the tile at ``(y0, x0)``: ``w(y, x) = r_y(y) * r_x(x)``.

    Each 1-D ramp rises linearly from ``1 / (overlap + 1)`` at a tile border to 1 at ``overlap``
    pixels inside (see :func:`_ramp`); a border lying on the image edge does not ramp (weight 1),
    so every pixel of the image has a weight sum ``>= 1 / (overlap + 1)^2 > 0``. Where two tiles
    overlap by exactly ``overlap`` pixels, their ramps are ``(overlap - j) / (overlap + 1)`` and
    ``(j + 1) / (overlap + 1)`` at offset j and sum to 1.
    """
    ry = _ramp(th, overlap, y0 > 0, y0 + th < H)
    rx = _ramp(tw, overlap, x0 > 0, x0 + tw < W)
    return ry[:, None] * rx[None, :]


def weight_sum(H: int, W: int, th: int, tw: int, boxes: Sequence[tuple[int, int]], overlap: int) -> np.ndarray:
    """``sum_i w_i`` over all tiles, shape ``(H, W)`` (NumPy float32); positive everywhere when the
    boxes cover the image."""
    total = np.zeros((H, W), dtype=np.float32)
    for y0, x0 in boxes:
        total[y0:y0 + th, x0:x0 + tw] += tile_weights(H, W, th, tw, y0, x0, overlap)
    return total


class TileCanvas:
    """Weighted accumulation of per-tile maps into full-size maps.

    ``add(b, y0, x0, m)`` adds ``w * m`` for a tile map ``m`` of shape ``(..., th, tw)`` of image b;
    :meth:`result` divides by the weight sum: ``(B, *lead, H, W)`` blended maps, arrays of the kind
    and device of ``like`` (default: of the first map added).
    """

    def __init__(self, B: int, lead: Sequence[int], H: int, W: int, th: int, tw: int,
                 boxes: Sequence[tuple[int, int]], overlap: int, like: Any = None, wsum: Optional[Any] = None):
        self.B, self.lead, self.H, self.W, self.th, self.tw, self.overlap = B, tuple(lead), H, W, th, tw, overlap
        self.wsum = wsum if wsum is not None else weight_sum(H, W, th, tw, boxes, overlap)
        self.sum: Any = None
        self._w: dict[tuple[int, int], Any] = {}
        if like is not None:
            self._start(like)

    def _start(self, like: Any) -> None:
        xp, ops = namespace(like), ops_for(like)
        self.sum = xp.zeros((self.B, *self.lead, self.H, self.W), dtype=xp.float32, device=array_api_compat.device(like))
        if type(self.wsum) is not type(self.sum):
            self.wsum = ops.asarray(self.wsum, like=self.sum)

    def weights(self, y0: int, x0: int) -> Tensor:
        """The tile's weights ``(th, tw)`` (cached per position)."""
        if (y0, x0) not in self._w:
            w = tile_weights(self.H, self.W, self.th, self.tw, y0, x0, self.overlap)
            self._w[(y0, x0)] = ops_for(self.sum).asarray(w, like=self.sum)
        return self._w[(y0, x0)]

    def add(self, b: int, y0: int, x0: int, m: Tensor) -> None:
        if self.sum is None:
            self._start(m)
        ys, xs = slice(y0, y0 + self.th), slice(x0, x0 + self.tw)
        self.sum[b, ..., ys, xs] = self.sum[b, ..., ys, xs] + self.weights(y0, x0) * to_float32(m)

    def result(self) -> Tensor:
        return self.sum / self.wsum


Job = tuple[int, int, int]  # (image b, y0, x0)


def _chunks(B: int, boxes: Sequence[tuple[int, int]], tile_batch: int) -> list[list[Job]]:
    jobs = [(b, y0, x0) for b in range(B) for y0, x0 in boxes]
    return [jobs[i:i + tile_batch] for i in range(0, len(jobs), tile_batch)]


def _slice(x: Tensor, chunk: Sequence[Job], th: int, tw: int) -> Tensor:
    """The chunk's tiles ``(n, C, th, tw)``, copied out of ``x`` ``(B, C, H, W)``."""
    return namespace(x).stack([x[b, :, y0:y0 + th, x0:x0 + tw] for b, y0, x0 in chunk])


class _HeadMean:
    """Per-image mean over tiles of each head: ``mean_i head(tile_i of image b)``, ``(B, ...)``."""

    def __init__(self, B: int, n_tiles: int):
        self.B, self.n = B, n_tiles
        self.sums: dict[Any, Tensor] = {}

    def add(self, heads: dict, chunk: Sequence[Job]) -> None:
        for k, v in heads.items():
            if v.ndim == 0 or v.shape[0] != len(chunk):
                continue  # not one row per tile: cannot be attributed to an image
            xp = namespace(v)
            v = to_float32(ops_for(v).detach(v))
            if k not in self.sums:
                self.sums[k] = xp.zeros((self.B, *v.shape[1:]), dtype=xp.float32, device=array_api_compat.device(v))
            for j, (b, _, _) in enumerate(chunk):
                self.sums[k][b] = self.sums[k][b] + v[j]

    def result(self) -> dict:
        return {k: v / self.n for k, v in self.sums.items()}


def _tile_heads(out: Any) -> dict:
    """A tile's output heads; an output camlens cannot flatten (a detector's per-image boxes) has no
    meaning averaged or matched over tiles: a clear error."""
    heads = split_outputs(out)
    if isinstance(heads, RawHeads):
        raise ConfigError(f"tile= explains models whose outputs are tensors (averaged over tiles); this model's "
                          f"output is {heads.describe()} ({heads.why}). Explain without tile= (a detector resizes "
                          "its inputs itself)")
    return heads


def explain_tiled(net: Any, x: Tensor, targets: Any, *, layer: Any, meth: Method, opts: dict,
                  categories: Categories, top_k: Optional[int], fuse: str, relu: bool, upsample_maps: bool,
                  combine: str, aug_smooth: bool, noise_smooth: int, display: Any, tile: TileSpec, overlap: int,
                  tile_batch: int, layout: Any = None, head_keys: Any = None, noise_sigma: float = 0.15,
                  seed: int = 0, map_layout: Any = None, reshape: Any = None, sign: int = 1,
                  activation: Any = None) -> Explanation:
    """:func:`camlens.explain` tile by tile; called by it when ``tile`` is given (model state held by the caller).

    1. Targets: explicit specs are resolved against the output of one tile (head names, class
       ranges). ``targets=None`` / ``top_k``: every tile runs once without graph, in batches of
       ``tile_batch``, and the targets are the top classes of the per-image MEAN over tiles of each
       head, ``mean_i f(tile_i)`` (for a GAP classifier the full-image logit is close to the
       area-weighted mean of the tile logits).
    2. Maps: batches of ``tile_batch`` tiles (over all B images) run through the engine with the
       resolved targets; each layer's raw map ``(n, T, h, w)`` is ReLU'd (``relu=True``),
       upsampled bilinearly to ``(th, tw)``, weighted by :func:`tile_weights` and added to a
       canvas ``(B, T, H, W)``; the canvas is divided by the weight sum. The layers' canvases are
       then normalised and fused as :func:`camlens.postprocess.process` does. Input-space methods:
       the saliency ``(n, T, th, tw)`` (and ``pixel``) is blended the same way (no ReLU before the
       blend), then ReLU, the method's quantile cap and min-max, as untiled.
    3. ``scores`` ``(B, T)`` are the MEAN of the tile scores, ``heads`` the mean of the tile
       outputs, ``probs`` the softmax of the mean heads; ``raw`` / ``raws`` the blended canvases
       ``(B, T, H, W)`` before normalisation.

    A tile at least as large as the image gives exactly the untiled maps for one layer; with
    several layers each layer is min-maxed after upsampling instead of before (close, not equal).
    ``layout`` (the backend's, e.g. :class:`camlens.backends.torch.Layout`; optional) sets the
    precision and memory layout of every forward, as in the untiled engine; ``map_layout`` and
    ``reshape`` are ``explain(layout=..., reshape=...)``.
    """

    th0, tw0 = check_tiling(tile, overlap, tile_batch)
    if not upsample_maps:
        raise ConfigError("upsample=False is not available with tile=: tiled maps are always at the input "
                         "resolution; drop upsample=False, or tile=None for layer-resolution maps")
    if aug_smooth:  # a wrapper around the tiled explanation: each augmented image is tiled too
        kw = dict(layer=layer, meth=meth, opts=opts, categories=categories, top_k=None, fuse=fuse, relu=relu,
                  upsample_maps=True, combine="separate", aug_smooth=False, noise_smooth=noise_smooth,
                  display=display, tile=tile, overlap=overlap, tile_batch=tile_batch, layout=layout,
                  noise_sigma=noise_sigma, seed=seed, map_layout=map_layout, reshape=reshape, sign=sign,
                  activation=activation)
        base = explain_tiled(net, x, targets, **{**kw, "top_k": top_k, "combine": combine, "head_keys": head_keys})
        rows = base.targets  # resolved (and combined) once, on the plain image
        # as untiled: the augmented views are not noise-smoothed (only the plain pass is)
        base.maps = aug_smoothed(net, x, None, [], meth, opts, base.maps, tuple(x.shape[-2:]), relu, fuse,
                                 maps_of=lambda xa: explain_tiled(net, xa, rows, **{**kw, "noise_smooth": 0}).maps)
        return base
    B, _, H, W = x.shape
    th, tw = tile_size(H, W, (th0, tw0))
    boxes = tile_boxes(H, W, (th, tw), overlap)
    chunks = _chunks(B, boxes, tile_batch)

    bk = get_backend(net)
    xp, ops = namespace(x), ops_for(x)
    if meth.needs_layer:
        spec = layer if layer is not None else bk.default_layer(net, x[:1, :, :th, :tw])  # never the full image
        layers = bk.resolve_layers(net, spec)
    else:
        layers = []
    names = [n for n, _ in layers]
    layout = layout if layout is not None else bk.layout(net, None, "fp32")
    forward = layout.run
    read = layer_reads(map_layout, reshape, names)
    extra = {"layout": layout, "backend": bk, "read": read}

    if contains_region(targets):
        raise ConfigError("Target.region does not combine with tile= yet (its mask or box is in whole-image "
                          "pixels, the outputs are per tile); explain without tile=")
    # 1. targets
    if targets is None or top_k is not None or combine == "confidence":  # classes / weights from the mean heads
        pre = _HeadMean(B, len(boxes))
        with bk.graph(False):
            for chunk in chunks:
                pre.add(_tile_heads(forward(_slice(x, chunk, th, tw))), chunk)
        heads0 = pre.result()
    else:
        with bk.graph(False):
            one = _tile_heads(forward(_slice(x, [(0, *boxes[0])], th, tw)))
        heads0 = {k: namespace(v).broadcast_to(v, (B, *v.shape[1:])) if v.ndim else v
                  for k, v in one.items()}  # shapes, to resolve
    components: list[list[ResolvedTarget]] = resolve_targets(targets, heads0, None, top_k=top_k,
                                                             categories=categories, head_keys=head_keys, sign=sign,
                                                             activation=model_activation(net, activation))
    rows = combine_targets(components, heads0, combine)
    T = len(rows[0])
    gen = ops.generator(seed, x) if noise_smooth else None
    flat = xp.reshape(x, (B, -1))
    spans = xp.reshape(xp.max(flat, axis=1) - xp.min(flat, axis=1), (B, 1, 1, 1)) if noise_smooth else None

    # 2. maps; canvases are made on first use (a layer method may return input-space saliency only)
    like = to_float32(x[:0])
    wsum = ops.asarray(weight_sum(H, W, th, tw, boxes, overlap), like=like)

    def canvas(lead: tuple[int, ...]) -> TileCanvas:
        return TileCanvas(B, lead, H, W, th, tw, boxes, overlap, like, wsum)

    canvases: dict[str, TileCanvas] = {}
    sal: Optional[TileCanvas] = None
    pix: Optional[TileCanvas] = None
    clip = 1.0
    score_sum = xp.zeros((B, T), dtype=xp.float32, device=array_api_compat.device(x))
    heads = _HeadMean(B, len(boxes))
    for chunk in chunks:
        tiles = _slice(x, chunk, th, tw)
        p = run_pass(net, tiles, [rows[b] for b, _, _ in chunk], layers, meth, opts, None, None, **extra)
        res = p.result
        if noise_smooth:  # SmoothGrad per tile: noise scaled by the whole image's range, one generator
            res = noise_smoothed(net, tiles, p, layers, meth, opts, noise_smooth, noise_sigma, seed, layout,
                                 span=xp.stack([spans[b] for b, _, _ in chunk]), gen=gen,  # type: ignore[index]
                                 read=read)
        heads.add(p.heads, chunk)
        tile_scores = to_float32(p.scores)
        for j, (b, _, _) in enumerate(chunk):
            score_sum[b] = score_sum[b] + tile_scores[j]
        with bk.graph(False):
            for n in res.raws or {}:  # layer names (or a layer-free method's own key, e.g. "attention")
                m = xp.clip(res.raws[n], min=0) if relu else res.raws[n]  # type: ignore[index]
                m = upsample(to_float32(m), (th, tw))
                c = canvases.setdefault(n, canvas((T,)))
                for j, (b, y0, x0) in enumerate(chunk):
                    c.add(b, y0, x0, m[j])
            if not res.raws:
                clip = res.clip
                sal = sal if sal is not None else canvas((T,))
                if res.pixel is not None and pix is None:
                    pix = canvas(tuple(res.pixel.shape[1:3]))
                for j, (b, y0, x0) in enumerate(chunk):
                    sal.add(b, y0, x0, res.saliency[j])  # type: ignore[index]
                    if pix is not None and res.pixel is not None:
                        pix.add(b, y0, x0, res.pixel[j])
        del p, res

    raws = {n: c.result() for n, c in canvases.items()}
    saliency = None if raws or sal is None else sal.result()
    maps = finish(MethodOutput(raws=raws or None, saliency=saliency, clip=clip), (H, W), relu, fuse)
    first = next(iter(raws.values())) if raws else saliency
    mean_heads = heads.result()
    return Explanation(maps=maps, raw=first, raws=raws, scores=score_sum / len(boxes),
                       probs=target_probabilities(rows, mean_heads), targets=rows, inputs=ops.detach(x), layers=names,
                       method=meth.name, display=display, heads=mean_heads,
                       pixel=pix.result() if pix is not None else None,
                       components=components if combine != "separate" else None, options=dict(opts))
