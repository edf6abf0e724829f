"""CAM (Zhou et al., 2016): class activation maps from a global-average-pooling + Linear head.

For a head ``y = W · GAP(A) + b`` the map of class k is ``M_k = sum_c W[k, c] * A[c]`` — the
logit decomposed over space (``y_k = mean_ij M_k[i, j] + b_k``). Maps for ALL classes come from one
forward and one matrix product, no backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backends.base import namespace
from ..core.errors import ConfigError, TargetError
from .base import Method, MethodContext, MethodOutput, Tensor, register


def cam_maps(acts: Tensor, weight: Tensor, classes: Tensor) -> Tensor:
    """Raw CAMs: acts ``(B, C, h, w)``, weight ``(K, C)``, classes ``(B, T)`` integer -> ``(B, T, h, w)``.

    ``M[b, t] = sum_c W[classes[b, t], c] * A[b, c]`` (bias excluded: it is constant over space).
    """
    xp = namespace(acts)
    B, C, h, w = acts.shape
    T = classes.shape[1]
    wt = xp.reshape(xp.take(xp.astype(weight, acts.dtype, copy=False), xp.reshape(classes, (-1,)), axis=0), (B, T, C))
    return xp.reshape(xp.matmul(wt, xp.reshape(acts, (B, C, h * w))), (B, T, h, w))


@dataclass(frozen=True)
class CamMethod(Method):
    """CAM for class targets on heads produced by GAP + Linear; one layer."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        if len(ctx.layers) != 1:
            raise ConfigError(f"CAM uses one layer (the one right before global pooling), got {ctx.layers}")
        assert ctx.linear_head is not None  # declared: needs_linear_head
        name = ctx.layers[0]
        a = ctx.spatial_acts(name, "CAM")
        xp = namespace(a)
        rows = ctx.targets
        B, T = len(rows), len(rows[0])
        by_head: dict[Any, None] = {}  # the heads used, in order
        for t in range(T):
            for b in range(B):
                tg = rows[b][t]
                if tg.fn is not None or tg.cls is None:
                    raise TargetError(f"CAM explains classes of a Linear head; target {tg.label!r} is not a class. "
                                     "Use method='gradcam'.")
                by_head.setdefault(tg.head, None)
        out = None
        for h in by_head:  # one matrix product per head, over all columns; each (b, t) keeps its own head's map
            weight = ctx.linear_head(name, h)
            classes = ctx.ops.asarray([[rows[b][t].cls if rows[b][t].head == h else 0 for t in range(T)]
                                       for b in range(B)], like=a)
            m = cam_maps(a, weight, classes)
            if out is None:
                out = m
            else:
                own = ctx.ops.asarray([[rows[b][t].head == h for t in range(T)] for b in range(B)], like=a)
                out = xp.where(own[..., None, None], m, out)
        if any(tg.sign == -1 for row in rows for tg in row):  # a decrease: the map of -y_k is -M_k
            signs = ctx.ops.asarray([[float(tg.sign) for tg in row] for row in rows], like=a)
            out = out * xp.astype(signs, out.dtype)[..., None, None]
        return MethodOutput(raws={name: out})


CAM = register(CamMethod(
    name="cam",
    description="CAM: the final Linear layer's weights on globally average-pooled features (GAP+FC models)",
    cost="1 forward, no backward; all classes at once",
    needs_grads=False,
    needs_linear_head=True,
    volumes=True,  # GAP over (d, h, w) of a 3-D map, read as (B, C, d, h*w): the same mean
))
