"""Feature maps held in other layouts, read as ``(..., C, h, w)``: channels-last ``(..., h, w, C)``
and tokens ``(..., N, C)`` (prefix tokens dropped, patches row by row on their grid).

The engine takes gradients of the layer's own output and reads activations and gradients with
the same linear map (a slice, a reshape, a permutation), so every method's maths is unchanged:
for tokens, Grad-CAM is pytorch-grad-cam with the usual ``reshape_transform`` (drop the class
token, reshape to the grid, channels first).
"""

from __future__ import annotations

from typing import Any

from ..backends.base import MapLayout, namespace
from .errors import LayerError

__all__ = ["to_map"]


def to_map(x: Any, layout: MapLayout, lead: int = 1) -> Any:
    """``x`` with ``lead`` leading dims (1: activations ``(B, ...)``, 2: gradients ``(B, T, ...)``)
    and the layer's trailing dims in ``layout`` -> ``(*lead dims, C, h, w)`` (a view where it can be)."""
    xp = namespace(x)
    head = tuple(x.shape[:lead])
    if layout.kind == "tokens":
        h, w = layout.grid
        if layout.prefix:
            x = x[(slice(None),) * lead + (slice(layout.prefix, None),)]
        x = xp.reshape(x, (*head, h, w, x.shape[-1]))
    elif layout.kind != "nhwc":
        raise LayerError(f"unknown map layout {layout.kind!r}; camlens reads 'nhwc' and 'tokens'")
    return xp.permute_dims(x, (*range(lead), lead + 2, lead, lead + 1))
