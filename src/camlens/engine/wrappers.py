"""Wrappers around one pass: SmoothGrad-style noise averaging (:func:`noise_smoothed`) and
test-time augmentation (:func:`aug_smoothed`). Tiling (:mod:`.tiling`) composes with both."""

from __future__ import annotations

from typing import Any, Optional

from ..backends.base import namespace, ops_for
from ..core.postprocess import normalize
from ..methods import Method, MethodOutput
from .finish import finish
from .passes import Pass, run_pass

Tensor = Any  # an array of the model's backend

__all__ = ["noise_smoothed", "aug_smoothed", "AUG_SCALES"]


def noise_smoothed(net: Any, x: Tensor, p: Pass, layers: list, meth: Method, opts: dict, n: int,
                    sigma: float, seed: int, layout: Optional[Any] = None, span: Optional[Tensor] = None,
                    gen: Optional[Any] = None, read: Optional[dict] = None) -> MethodOutput:
    """SmoothGrad-style: the method's raw output averaged over ``n`` noisy copies of each image.

    Noise ``N(0, (sigma * (max x_b - min x_b))^2)`` per image; the n*B copies run as one batch
    (one forward, one batched backward) with the targets resolved on the clean images. Tiling gives
    each tile its whole image's ``span`` ``(B, 1, 1, 1)`` and one generator ``gen`` for all tiles.
    """
    B = x.shape[0]
    xp, ops = namespace(x), ops_for(x)
    gen = gen if gen is not None else ops.generator(seed, x)
    ones = (1,) * (x.ndim - 1)  # (B, C, H, W) images or (B, C, D, H, W) volumes
    if span is None:
        flat = xp.reshape(x, (B, -1))
        span = xp.reshape(xp.max(flat, axis=1) - xp.min(flat, axis=1), (B, *ones))
    noisy = xp.tile(x, (n, *ones))  # copy i of image b at index i * B + b
    noisy = noisy + ops.random(noisy.shape, gen, x, normal=True) * xp.tile(sigma * span, (n, *ones))
    q = run_pass(net, noisy, p.rows * n, layers, meth, opts, None, None, layout=layout, read=read).result

    def avg(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else xp.mean(xp.reshape(t, (n, B, *t.shape[1:])), axis=0)

    return MethodOutput(raws={k: avg(v) for k, v in q.raws.items()} if q.raws else None,  # type: ignore[misc]
                        saliency=avg(q.saliency), pixel=avg(q.pixel), clip=q.clip)


AUG_SCALES = (1.0, 1.1, 0.9)


def aug_smoothed(net: Any, x: Tensor, p: Pass, layers: list, meth: Method, opts: dict, maps: Tensor,
                  size: Optional[tuple[int, int]], relu: bool, fuse: str, layout: Optional[Any] = None,
                  maps_of: Optional[Any] = None, read: Optional[dict] = None,
                  norm: Optional[Any] = None) -> Tensor:
    """Test-time augmentation: maps of horizontally flipped and rescaled (x1.1, x0.9) inputs, each
    mapped back in place (resized back, flipped back), averaged with the plain maps and min-maxed.

    ``maps_of(xa) -> (B, T, h, w)`` computes the maps of an augmented batch (default: one pass and
    :func:`finish`; tiling passes its own tiled explanation, so the two compose). Volumes / clips
    ``(B, C, D, H, W)`` (maps ``(B, T, D, H, W)``): only H and W are flipped and rescaled (the
    depth / time axis is kept), ``maps_of`` gives volume maps and ``norm`` min-maxes whole volumes
    (default: :func:`camlens.core.postprocess.normalize`, per ``(H, W)`` map)."""
    H, W = maps.shape[-2:]
    full = tuple(int(s) for s in maps.shape[2:])  # (H, W) or (D, H, W)
    xp, ops = namespace(x), ops_for(x)
    total = xp.asarray(maps, copy=True)
    count = 1
    for flip in (False, True):
        for scale in AUG_SCALES:
            if not flip and scale == 1.0:
                continue
            xa = xp.flip(x, axis=-1) if flip else x
            if scale != 1.0:
                hw = (max(8, round(x.shape[-2] * scale)), max(8, round(x.shape[-1] * scale)))
                xa = ops.resize(xa, (*x.shape[2:-2], *hw))  # volumes: (D, h', w'), D unchanged
            if maps_of is not None:
                m = maps_of(xa)
            else:
                q = run_pass(net, xa, p.rows, layers, meth, opts, None, None, layout=layout, read=read).result
                m = finish(q, tuple(xa.shape[-2:]) if size is not None else None, relu, fuse)
            m = ops.resize(m, full) if tuple(m.shape[2:]) != full else m
            total = total + (xp.flip(m, axis=-1) if flip else m)
            count += 1
    return (normalize if norm is None else norm)(total / count, warn=False)
