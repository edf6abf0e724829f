"""Feature maps held in other layouts, read as ``(..., C, h, w)``: channels-last ``(..., h, w, C)``,
tokens ``(..., N, C)`` (prefix tokens dropped, patches row by row on their grid) and volumes
``(..., C, d, h, w)`` (as ``(..., C, d, h*w)``), channels-last volumes ``(..., d, h, w, C)`` (Swin3D:
permuted to ``(..., C, d, h*w)``) and clip tokens ``(..., P + d*h*w, C)`` (MViT: the P prefix tokens
dropped, the patches in ``(t, h, w)`` raster order reshaped to ``(..., d, h*w, C)`` and permuted to
``(..., C, d, h*w)``).

The engine takes gradients of the layer's own output and reads activations and gradients with
the same linear map (a slice, a reshape, a permutation), so every method's maths is unchanged:
for tokens, Grad-CAM is pytorch-grad-cam with the usual ``reshape_transform`` (drop the class
token, reshape to the grid, channels first).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..backends.base import MapLayout, namespace
from .errors import ConfigError, LayerError

__all__ = ["to_map", "from_map", "layer_reads"]


def to_map(x: Any, layout: MapLayout, lead: int = 1) -> Any:
    """``x`` with ``lead`` leading dims (1: activations ``(B, ...)``, 2: gradients ``(B, T, ...)``)
    and the layer's trailing dims in ``layout`` -> ``(*lead dims, C, h, w)`` (a view where it can be)."""
    if layout.kind == "nchw":  # explain(layout="nchw"): as it is
        return x
    if isinstance(x, dict):  # a layer's dict output (FPN levels): the user's fn reads the dict
        return _dict_to_map(x, layout, lead)
    xp = namespace(x)
    head = tuple(x.shape[:lead])
    if layout.kind == "volume":  # (..., C, d, h, w) -> (..., C, d, h*w): a view
        return xp.reshape(x, (*x.shape[:-2], x.shape[-2] * x.shape[-1]))
    if layout.kind in ("volume-last", "volume-tokens"):  # (..., d, h, w, C) / (..., P + d*h*w, C) -> (..., C, d, h*w)
        d, h, w = layout.grid
        if layout.kind == "volume-tokens" and layout.prefix:
            x = x[(slice(None),) * lead + (slice(layout.prefix, None),)]
        x = xp.reshape(x, (*head, d, h * w, x.shape[-1]))
        return xp.permute_dims(x, (*range(lead), lead + 2, lead, lead + 1))
    if layout.kind == "reshape":  # the user's fn on (B, ...) rows: gradients (B, T, ...) as B*T rows
        n = math.prod(head)
        out = layout.fn(xp.reshape(x, (n, *x.shape[lead:])) if lead != 1 else x)
        if not hasattr(out, "shape") or len(out.shape) != 4 or out.shape[0] != n:
            seen = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            raise LayerError(f"reshape= must turn the layer output (B, {', '.join(map(str, x.shape[lead:]))}) into "
                             f"(B, C, h, w) with the same B = {n}; it returned {seen}")
        return out if lead == 1 else xp.reshape(out, (*head, *out.shape[1:]))
    if layout.kind == "tokens":
        h, w = layout.grid
        if layout.prefix:
            x = x[(slice(None),) * lead + (slice(layout.prefix, None),)]
        x = xp.reshape(x, (*head, h, w, x.shape[-1]))
    elif layout.kind != "nhwc":
        raise LayerError(f"unknown map layout {layout.kind!r}; camlens reads 'nhwc', 'tokens' and 'reshape'")
    return xp.permute_dims(x, (*range(lead), lead + 2, lead, lead + 1))


def _dict_to_map(x: dict, layout: MapLayout, lead: int) -> Any:
    """A ``reshape=`` function on a dict of arrays ``{key: (*lead dims, ...)}``: activations (``lead=1``)
    as they are; gradients ``(B, T, ...)`` as ``B*T`` rows of every value, the result read back to
    ``(B, T, C, h, w)``."""
    if layout.kind != "reshape":
        raise LayerError(f"a layer with a dict output is read by a reshape= function only, not layout={layout.kind!r}")
    first = next(iter(x.values()))
    xp = namespace(first)
    head = tuple(first.shape[:lead])
    n = math.prod(head)
    rows = x if lead == 1 else {k: xp.reshape(v, (n, *v.shape[lead:])) for k, v in x.items()}
    out = layout.fn(rows)
    if not hasattr(out, "shape") or len(out.shape) != 4 or out.shape[0] != n:
        seen = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise LayerError(f"reshape= must turn the layer's dict output into (B, C, h, w) with the same B = {n}; it "
                         f"returned {seen}")
    return out if lead == 1 else xp.reshape(out, (*head, *out.shape[1:]))


def from_map(maps: Any, layout: MapLayout, like: Any) -> Any:
    """The inverse read: maps ``(k, C, h, w)`` (e.g. Ablation-CAM's ablated copies) -> the layer's own
    layout, ``(k, h, w, C)`` or tokens ``(k, N, C)`` whose prefix tokens are those of ``like``
    (one image's own output, ``(1, N, C)``), unchanged: only the patch tokens carry the map. Volume
    kinds take ``(k, C, d, h*w)``: back to ``(k, C, d, h, w)``, ``(k, d, h, w, C)`` or ``(k, P + d*h*w, C)``."""
    if layout.kind == "nchw":
        return maps
    xp = namespace(maps)
    if layout.kind == "volume":  # (k, C, d, h*w) -> (k, C, d, h, w)
        return xp.reshape(maps, (*maps.shape[:-1], *layout.grid[1:]))
    k = maps.shape[0]
    if layout.kind in ("volume-last", "volume-tokens"):  # (k, C, d, h*w) -> (k, d, h, w, C) / (k, P + d*h*w, C)
        d, h, w = layout.grid
        x = xp.permute_dims(maps, (0, 2, 3, 1))  # (k, d, h*w, C)
        if layout.kind == "volume-last":
            return xp.reshape(x, (k, d, h, w, maps.shape[1]))
        x = xp.reshape(x, (k, d * h * w, maps.shape[1]))
        if layout.prefix:
            pre = xp.broadcast_to(like[:, :layout.prefix], (k, layout.prefix, like.shape[-1]))
            x = xp.concat([xp.astype(pre, x.dtype, copy=False), x], axis=1)
        return x
    x = xp.permute_dims(maps, (0, 2, 3, 1))  # (k, h, w, C)
    if layout.kind == "nhwc":
        return x
    if layout.kind != "tokens":
        raise LayerError(f"a {layout.kind!r} layer cannot take arrays read as maps back (a reshape= function has "
                         "no inverse); give layout= instead, or use a method that only reads the layer")
    x = xp.reshape(x, (k, maps.shape[2] * maps.shape[3], maps.shape[1]))
    if layout.prefix:
        pre = xp.broadcast_to(like[:, :layout.prefix], (k, layout.prefix, like.shape[-1]))
        x = xp.concat([xp.astype(pre, x.dtype, copy=False), x], axis=1)
    return x


def layer_reads(layout: Any, reshape: Any, names: list) -> Optional[dict]:
    """``explain(layout=..., reshape=...)`` as ``{layer name: spec}`` for the backend's check, or
    ``None`` (camlens reads each layer's layout itself).

    ``layout``: ``"nchw"`` / ``"nhwc"`` / ``"tokens"`` or a :class:`MapLayout` for every layer, or a
    dict ``{layer name: that}``; ``reshape``: a callable ``fn(a (B, ...)) -> (B, C, h, w)`` (a
    pytorch-grad-cam ``reshape_transform`` works unchanged), applied alike to the activations and
    to each target's gradients, so it must be linear (a slice, reshape, permutation); or a dict
    ``{layer name: fn}``. Not both for one layer."""
    if layout is None and reshape is None:
        return None

    def per_layer(spec: Any, what: str) -> dict:
        if spec is None:
            return {}
        if isinstance(spec, dict):
            unknown = [k for k in spec if k not in names]
            if unknown:
                raise ConfigError(f"{what}= names layers {unknown} that are not explained; the layers are {names}")
            return dict(spec)
        return {n: spec for n in names}

    reads = per_layer(layout, "layout")
    for n, fn in per_layer(reshape, "reshape").items():
        if not callable(fn):
            raise ConfigError(f"reshape= takes a function a -> (B, C, h, w) (e.g. a pytorch-grad-cam "
                              f"reshape_transform), got {type(fn).__name__}")
        if n in reads:
            raise ConfigError(f"layer {n!r} has both layout= and reshape=; give one")
        reads[n] = MapLayout("reshape", fn=fn)
    return reads
