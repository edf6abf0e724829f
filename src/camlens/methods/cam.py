"""CAM (Zhou et al., 2016): class activation maps from a global-average-pooling + Linear head.

For a head ``y = W · GAP(A) + b`` the map of class k is ``M_k = sum_c W[k, c] * A[c]`` — the
logit decomposed over space (``y_k = mean_ij M_k[i, j] + b_k``). Maps for ALL classes come from one
forward and one matrix product, no backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .base import Method, MethodContext, MethodOutput, register
from ..errors import ConfigError, LayerError, ModelError, TargetError


def find_cam_head(acts: Tensor, head: Tensor, linear_io: Mapping[str, tuple[Tensor, Tensor]],
                  modules: Mapping[str, nn.Module], layer: str, head_name: str) -> nn.Linear:
    """Find the ``nn.Linear`` that maps ``GAP(acts)`` to ``head``; explain why when there is none.

    Args:
        acts: layer output ``(B, C, h, w)``; head: the output tensor ``(B, K)`` being explained;
        linear_io: per Linear name, the ``(input, output)`` seen in the forward.
    """
    if acts.ndim != 4:
        raise LayerError(f"CAM needs a spatial layer output (B, C, h, w); layer {layer!r} gave {tuple(acts.shape)}")
    pooled = acts.detach().float().mean(dim=(2, 3))
    producers = [n for n, (_, o) in linear_io.items() if o is head or (o.shape == head.shape and torch.equal(o, head))]
    if not producers:
        raise ModelError(f"CAM needs output {head_name!r} to come straight from an nn.Linear layer; none of the "
                         f"model's Linear layers ({list(linear_io) or 'none'}) produced it. Use method='gradcam', "
                         "which works on any architecture.")
    name = producers[-1]
    inp = linear_io[name][0]
    tol = max(1e-4, 8 * torch.finfo(inp.dtype).eps)  # fp16/bf16 forwards round the pooled features
    inp = inp.float()
    if inp.shape != pooled.shape or not torch.allclose(inp, pooled, rtol=tol, atol=tol / 10 * (1 + pooled.abs().max().item())):
        raise ModelError(f"CAM needs the input of Linear {name!r} to be the global average pool of layer {layer!r}: "
                         f"its input has shape {tuple(inp.shape)}, while GAP({layer}) has shape {tuple(pooled.shape)}"
                         + ("" if inp.shape != pooled.shape else " but different values (other layers in between)")
                         + ". Pick the layer right before the global pooling, or use method='gradcam'.")
    return modules[name]  # type: ignore[return-value]


def cam_maps(acts: Tensor, linear: nn.Linear, classes: Tensor) -> Tensor:
    """Raw CAMs: acts ``(B, C, h, w)``, classes ``(B, T)`` long -> ``(B, T, h, w)``.

    ``M[b, t] = sum_c W[classes[b, t], c] * A[b, c]`` (bias excluded: it is constant over space).
    """
    w = linear.weight.detach().to(acts.dtype)[classes]  # (B, T, C)
    return torch.einsum("btc,bchw->bthw", w, acts.detach())


@dataclass(frozen=True)
class CamMethod(Method):
    """CAM for class targets on heads produced by GAP + Linear; one layer."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        if len(ctx.layers) != 1:
            raise ConfigError(f"CAM uses one layer (the one right before global pooling), got {ctx.layers}")
        name = ctx.layers[0]
        a = ctx.spatial_acts(name, "CAM")
        rows = ctx.targets
        B, T = len(rows), len(rows[0])
        out = torch.empty((B, T, *a.shape[-2:]), dtype=a.dtype, device=a.device)
        by_head: dict[Any, dict[int, None]] = {}  # head -> the target columns that use it (ordered set)
        for t in range(T):
            for b in range(B):
                tg = rows[b][t]
                if tg.fn is not None or tg.cls is None:
                    raise TargetError(f"CAM explains classes of a Linear head; target {tg.label!r} is not a class. "
                                     "Use method='gradcam'.")
                by_head.setdefault(tg.head, {})[t] = None
        heads = ctx.extra["heads"]
        for h, cols in by_head.items():
            ts = list(cols)
            modules = dict(ctx.extra["model"].named_modules())
            linear = find_cam_head(a, heads[h], ctx.extra["linear_io"], modules, name, str(h))
            classes = torch.tensor([[rows[b][t].cls if rows[b][t].head == h else 0 for t in ts] for b in range(B)],
                                   device=a.device)
            m = cam_maps(a, linear, classes)
            own = torch.tensor([[rows[b][t].head == h for t in ts] for b in range(B)], device=a.device)
            idx = torch.tensor(ts, device=a.device)
            out[:, idx] = torch.where(own[..., None, None], m, out[:, idx])  # all of this head's columns at once
        return MethodOutput(raws={name: out})


CAM = register(CamMethod(
    name="cam",
    description="CAM: the final Linear layer's weights on globally average-pooled features (GAP+FC models)",
    cost="1 forward, no backward; all classes at once",
    needs_grads=False,
))
