"""Occlusion (Zeiler & Fergus, 2014): how much each target's score drops when a patch is hidden.

A ``kh x kw`` patch slides over the image with stride ``(sh, sw)``; each position ``w`` hides its
pixels in all channels (replaced by ``baseline``) and costs one forward. The map of target t of
image b is the score drop averaged over the windows covering each pixel:

    d[b, t, w]  = S[b, t](x_b) - S[b, t](x_b occluded by window w)
    map[b, t, i, j] = sum_{w covers (i, j)} d[b, t, w] / #{w covers (i, j)}           (B, T, H, W)

Positive = hiding the pixel lowers the score (evidence for the target).

Window positions follow captum's ``Occlusion``: along a side of length ``D`` there are
``ceil((D - k) / s) + 1`` windows starting at ``0, s, 2s, ...``; the last one may stick out past
the border and is cut there (not shifted back). ``stride <= patch`` is required (as in captum),
so every pixel is covered by at least one window and the average is always defined. For a
window over all channels captum's attribution is the same in every channel and equals this map.

Volumes and clips ``(B, C, D, H, W)``: the window is a box ``kd x kh x kw`` sliding along all three
axes with the same rule per axis; the map ``(B, T, D, H, W)`` averages the drops of the boxes covering
each voxel. An int ``patch`` k is the box ``min(k, D) x k x k`` (clips often have fewer than k frames),
an int ``stride`` s the step ``(min(s, kd), s, s)``; ``(d, h, w)`` triples give each axis its own.
``baseline="blur"`` blurs each slice / frame in 2-D.

Options: ``patch`` (int, (h, w) or (d, h, w), default 16), ``stride`` (default half the patch),
``baseline`` (see :func:`occlusion_fill`), ``blur_sigma`` (for ``baseline="blur"``), ``batch_size``.

Cost: ``B * n_windows`` forwards in chunks of ``batch_size``; all T targets of image b come
from the same occluded forwards. Occluded images are built chunk by chunk, never all at once.
The sum over covering windows is separable: with indicator matrices ``R (H, n_rows)`` and
``K (W, n_cols)`` it is ``R @ d @ K^T``, and the count is ``R.sum(1) outer K.sum(1)`` (for volumes
one more indicator along D: a product of three such contractions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import array_api_compat

from ..backends.base import namespace, ops_for
from ..core.errors import ConfigError, ConfigTypeError
from ..core.registry import Option, int_or_sides, optional, positive_int, positive_number
from .base import Method, MethodContext, MethodOutput, Tensor, register

__all__ = ["window_starts", "coverage", "occlusion_fill", "occlusion_maps", "Occlusion", "OCCLUSION"]



def _sides(v: Any, name: str, sides: tuple[int, ...], half_of: Optional[tuple[int, ...]] = None) -> tuple[int, ...]:
    """``patch`` / ``stride`` as one positive int per axis of an input whose spatial sides are ``sides``
    (``(H, W)`` or ``(D, H, W)``). An int is the same along H and W and, for volumes, capped along D at
    ``D`` (patch) or at the depth patch (stride, ``half_of``: the patch), so a default fits short clips."""
    n = len(sides)
    if isinstance(v, bool):
        raise ConfigTypeError(f"occlusion option {name!r} must be an int or a tuple of {n}, got {v!r}")
    if isinstance(v, int):
        if v <= 0:
            raise ConfigTypeError(f"occlusion option {name!r} must be a positive int, got {v!r}")
        if n == 2:
            return (v, v)
        cap = sides[0] if half_of is None else half_of[0]
        return (min(v, cap), v, v)
    vals = tuple(v) if isinstance(v, (tuple, list)) else None
    axes = "(h, w)" if n == 2 else "(d, h, w)"
    if vals is None or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in vals):
        raise ConfigTypeError(f"occlusion option {name!r} must be a positive int or a tuple {axes} of them, got {v!r}")
    if len(vals) != n:
        what = "an image (B, C, H, W)" if n == 2 else "a volume / clip (B, C, D, H, W)"
        raise ConfigError(f"occlusion option {name!r} = {v!r} has {len(vals)} sides, but the input is {what}: give "
                          f"an int or {axes}")
    return vals  # type: ignore[return-value]


def _baseline_check(v: Any) -> Optional[str]:
    ok = v == "blur" if isinstance(v, str) else array_api_compat.is_array_api_obj(v) or (
        isinstance(v, (int, float)) and not isinstance(v, bool))
    return None if ok else "a number, a tensor or 'blur'"


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """captum's window start positions on a side of ``size``: ``0, s, ..., (ceil((size - k) / s)) * s``."""
    if patch > size:
        raise ConfigError(f"occlusion patch {patch} is larger than the image side {size}; use patch <= {size}")
    if stride > patch and patch < size:
        raise ConfigError(f"occlusion stride {stride} is larger than the patch {patch}: pixels between windows would "
                         f"never be occluded; use stride <= patch")
    return [i * stride for i in range(math.ceil((size - patch) / stride) + 1)]


def coverage(xp: Any, size: int, starts: list[int], patch: int, device: Any, dtype: Any) -> Tensor:
    """Indicator ``(size, n)`` of namespace ``xp`` on ``device``, in ``dtype``: entry ``[p, w]`` is 1 when
    window ``w`` (starting at ``starts[w]``) covers position ``p`` (cut at the border)."""
    pos = xp.arange(size, device=device)[:, None]
    s = xp.asarray(starts, dtype=pos.dtype, device=device)[None, :]
    return xp.astype((pos >= s) & (pos < s + patch), dtype)


def occlusion_fill(x: Tensor, baseline: Any, blur_sigma: float, ops: Any = None) -> Tensor:
    """What hidden pixels are replaced by, broadcastable to ``x`` ``(B, C, H, W)`` (or ``(B, C, D, H, W)``).

    ``baseline``: a number (in the model's input space, e.g. 0.0 = the dataset mean after
    normalisation), a tensor broadcastable to ``(C, H, W)`` or ``(B, C, H, W)`` (an array of another
    library is copied over through NumPy by ``ops.asarray``), or ``"blur"``: the image blurred with a
    Gaussian of std ``blur_sigma`` pixels (kernel ``2 * ceil(3 sigma) + 1``, capped by the image
    size, reflect padding; :func:`camlens.core.postprocess.gaussian_blur`). ``ops``: the
    backend's Ops (default: those of ``x``).
    """
    xp = namespace(x)
    dev = array_api_compat.device(x)
    if isinstance(baseline, str):
        if baseline != "blur":
            raise ConfigError(f"occlusion baseline must be a number, a tensor or 'blur', got {baseline!r}")
        if not blur_sigma > 0:
            raise ConfigError(f"occlusion blur_sigma must be > 0, got {blur_sigma!r}")
        from ..core.postprocess import gaussian_blur

        H, W = x.shape[-2:]
        kh = min(2 * math.ceil(3 * blur_sigma) + 1, 2 * H - 1)  # odd; reflect padding needs k // 2 < side
        kw = min(2 * math.ceil(3 * blur_sigma) + 1, 2 * W - 1)
        if x.ndim == 5:  # volumes / clips: each slice / frame blurred in 2-D
            B, C, D = x.shape[:3]
            return xp.reshape(gaussian_blur(xp.reshape(x, (B, C * D, H, W)), (kw, kh), float(blur_sigma)), x.shape)
        return gaussian_blur(x, (kw, kh), float(blur_sigma))
    if array_api_compat.is_array_api_obj(baseline):
        try:
            namespace(baseline, x)
        except TypeError:  # another array library
            baseline = (ops_for(x) if ops is None else ops).asarray(baseline, like=x)
        return xp.astype(array_api_compat.to_device(baseline, dev), x.dtype, copy=False)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return xp.full((), float(baseline), dtype=x.dtype, device=dev)
    raise ConfigTypeError(f"occlusion baseline must be a number, a tensor or 'blur', got {type(baseline).__name__}")


def occlusion_maps(ctx: MethodContext, patch: Any, stride: Any, baseline: Any,
                   blur_sigma: float, batch_size: int) -> Tensor:
    """Average score drop per pixel ``(B, T, H, W)`` (float32), or per voxel ``(B, T, D, H, W)`` for
    volume inputs; see the module docstring."""
    x = ctx.inputs
    xp = namespace(x)
    B = x.shape[0]
    sides = tuple(int(v) for v in x.shape[2:])  # (H, W) or (D, H, W)
    ks = _sides(patch, "patch", sides)
    ss = tuple(max(1, k // 2) for k in ks) if stride is None else _sides(stride, "stride", sides, half_of=ks)
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"occlusion batch_size must be a positive int, got {batch_size!r}")
    starts = [window_starts(S, k, st) for S, k, st in zip(sides, ks, ss)]
    counts = [len(st) for st in starts]  # windows along each axis
    n = math.prod(counts)
    dev = array_api_compat.device(x)
    covs = [coverage(xp, S, st, k, dev, xp.float32) for S, st, k in zip(sides, starts, ks)]  # (S_a, n_a)
    on = [xp.astype(c.T, xp.bool) for c in covs]  # (n_a, S_a)
    count = xp.sum(covs[0], axis=1)  # windows covering each pixel / voxel, >= 1
    for c in covs[1:]:
        count = count[..., None] * xp.sum(c, axis=1)

    fill = occlusion_fill(x, baseline, blur_sigma, ctx.ops)
    if fill.ndim == x.ndim and fill.shape[0] == B:
        fills = [fill[b:b + 1] for b in range(B)]
    else:
        fills = [fill] * B
    base = xp.astype(array_api_compat.to_device(ctx.scores, dev), xp.float32, copy=False)  # (B, T) unoccluded scores
    out = []
    for b in range(B):
        xb = x[b:b + 1]
        drops = []
        for s in range(0, n, batch_size):
            w = xp.arange(s, min(s + batch_size, n), device=dev)  # window ids, row-major over the axes
            mask, step = None, n
            for a, na in enumerate(counts):  # the window's indicator along axis a, broadcast to (k, *sides)
                step //= na
                m = xp.take(on[a], (w // step) % na, axis=0)  # (k, S_a)
                m = xp.reshape(m, (m.shape[0], *(1,) * a, sides[a], *(1,) * (len(sides) - a - 1)))
                mask = m if mask is None else mask & m
            occluded = xp.where(mask[:, None], fills[b], xb)  # (k, C, *sides)
            drops.append(base[b][None, :] - ctx.runner.scores(occluded, b, batch_size))  # (k, T)
        d = xp.reshape(xp.concat(drops).T, (-1, *counts))  # (T, n_1, ..., n_k)
        if len(sides) == 2:
            summed = covs[0] @ d @ covs[1].T  # (T, H, W)
        else:  # contract each window axis with its indicator: (T, n_d, n_h, n_w) -> (T, D, H, W)
            summed = d
            for c in covs:
                summed = xp.tensordot(summed, c, axes=([1], [1]))  # the new axis goes last: axes cycle back
        out.append(summed / count)
    return xp.stack(out)


@dataclass(frozen=True)
class Occlusion(Method):
    """Occlusion: average drop of each target's score over the sliding patches covering a pixel."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        o = ctx.options
        sal = occlusion_maps(ctx, o["patch"], o["stride"], o["baseline"], o["blur_sigma"], o["batch_size"])
        return MethodOutput(saliency=sal)


OCCLUSION = register(Occlusion(
    name="occlusion",
    description="Occlusion: drop of the target's score when a sliding patch is hidden, averaged per pixel",
    cost="(ceil((H-k)/s)+1) * (ceil((W-k)/s)+1) forwards per image (volumes: x the windows along D), batched; "
         "no backward; all targets at once",
    needs_grads=False,
    needs_layer=False,
    volumes=True,
    options={"patch": Option(16, int_or_sides, "window side(s) in pixels: k, (h, w), or (d, h, w) for volumes",
                             type_error=True),
             "stride": Option(None, optional(int_or_sides, "half the patch"), "window step(s)", type_error=True),
             "baseline": Option(0.0, _baseline_check, "what hidden pixels are replaced by"),
             "blur_sigma": Option(5.0, positive_number, "Gaussian std in pixels for baseline='blur'"),
             "batch_size": Option(32, positive_int, "occluded inputs per forward")},
))
