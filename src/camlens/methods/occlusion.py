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

Options: ``patch`` (int or (h, w), default 16), ``stride`` (default half the patch),
``baseline`` (see :func:`occlusion_fill`), ``blur_sigma`` (for ``baseline="blur"``), ``batch_size``.

Cost: ``B * n_windows`` forwards in chunks of ``batch_size``; all T targets of image b come
from the same occluded forwards. Occluded images are built chunk by chunk, never all at once.
The sum over covering windows is separable: with indicator matrices ``R (H, n_rows)`` and
``K (W, n_cols)`` it is ``R @ d @ K^T``, and the count is ``R.sum(1) outer K.sum(1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import array_api_compat

from ..backends.base import namespace, ops_for
from ..core.errors import ConfigError, ConfigTypeError
from ..core.registry import Option, int_or_pair, optional, positive_int, positive_number
from .base import Method, MethodContext, MethodOutput, Tensor, register

__all__ = ["window_starts", "coverage", "occlusion_fill", "occlusion_maps", "Occlusion", "OCCLUSION"]

IntPair = Union[int, tuple[int, int]]


def _pair(v: Any, name: str) -> tuple[int, int]:
    """An int or an (h, w) pair of positive ints."""
    if isinstance(v, bool):
        raise ConfigTypeError(f"occlusion option {name!r} must be an int or (h, w), got {v!r}")
    vals = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else None
    ok = vals is not None and len(vals) == 2
    if not ok or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in vals):
        raise ConfigTypeError(f"occlusion option {name!r} must be a positive int or a pair (h, w) of them, got {v!r}")
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
    """What hidden pixels are replaced by, broadcastable to ``x`` ``(B, C, H, W)``.

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


def occlusion_maps(ctx: MethodContext, patch: IntPair, stride: Optional[IntPair], baseline: Any,
                   blur_sigma: float, batch_size: int) -> Tensor:
    """Average score drop per pixel ``(B, T, H, W)`` (float32); see the module docstring."""
    x = ctx.inputs
    xp = namespace(x)
    B, C, H, W = x.shape
    kh, kw = _pair(patch, "patch")
    sh, sw = (max(1, kh // 2), max(1, kw // 2)) if stride is None else _pair(stride, "stride")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"occlusion batch_size must be a positive int, got {batch_size!r}")
    rows, cols = window_starts(H, kh, sh), window_starts(W, kw, sw)
    nr, nc = len(rows), len(cols)
    n = nr * nc
    dev = array_api_compat.device(x)
    R = coverage(xp, H, rows, kh, dev, xp.float32)  # (H, nr)
    K = coverage(xp, W, cols, kw, dev, xp.float32)  # (W, nc)
    Rb, Kb = xp.astype(R.T, xp.bool), xp.astype(K.T, xp.bool)  # (nr, H), (nc, W)
    count = xp.sum(R, axis=1)[:, None] * xp.sum(K, axis=1)[None, :]  # (H, W) windows covering each pixel, >= 1

    fill = occlusion_fill(x, baseline, blur_sigma, ctx.ops)
    if fill.ndim == 4 and fill.shape[0] == B:
        fills = [fill[b:b + 1] for b in range(B)]
    else:
        fills = [fill] * B
    base = xp.astype(array_api_compat.to_device(ctx.scores, dev), xp.float32, copy=False)  # (B, T) unoccluded scores
    out = []
    for b in range(B):
        xb = x[b:b + 1]
        drops = []
        for s in range(0, n, batch_size):
            w = xp.arange(s, min(s + batch_size, n), device=dev)  # window ids, row-major
            mask = xp.take(Rb, w // nc, axis=0)[:, :, None] & xp.take(Kb, w % nc, axis=0)[:, None, :]  # (n_chunk, H, W)
            occluded = xp.where(mask[:, None], fills[b], xb)  # (n_chunk, C, H, W)
            drops.append(base[b][None, :] - ctx.runner.scores(occluded, b, batch_size))  # (n_chunk, T)
        d = xp.reshape(xp.concat(drops).T, (-1, nr, nc))  # (T, nr, nc)
        out.append(R @ d @ K.T / count)  # (T, H, W)
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
    cost="(ceil((H-k)/s)+1) * (ceil((W-k)/s)+1) forwards per image, batched; no backward; all targets at once",
    needs_grads=False,
    needs_layer=False,
    options={"patch": Option(16, int_or_pair, "window side(s) in pixels", type_error=True),
             "stride": Option(None, optional(int_or_pair, "half the patch"), "window step(s)", type_error=True),
             "baseline": Option(0.0, _baseline_check, "what hidden pixels are replaced by"),
             "blur_sigma": Option(5.0, positive_number, "Gaussian std in pixels for baseline='blur'"),
             "batch_size": Option(32, positive_int, "occluded inputs per forward")},
))
