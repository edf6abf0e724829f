"""Post-processing of a pass's output (:class:`~camlens.methods.MethodOutput`): ReLU → upsample →
min-max → fuse layers, by :func:`camlens.core.postprocess.process`; saliency maps at input
resolution are ReLU'd, capped at their quantile and min-maxed."""

from __future__ import annotations

from typing import Any, Optional

from ..backends.base import namespace, ops_for
from ..core.postprocess import clip_quantile, normalize, process, to_float32
from ..methods import MethodOutput

Tensor = Any  # an array of the model's backend

__all__ = ["finish", "finish_maps"]


def finish(result: MethodOutput, size: Optional[tuple[int, int]], relu: bool, fuse: str) -> Tensor:
    """Method output -> maps ``(B, T, H, W)`` in [0, 1], without a graph."""
    parts = [t for t in (*(result.raws or {}).values(), result.saliency) if t is not None]
    ops = ops_for(parts[0])
    if not any(ops.has_graph(t) for t in parts):  # nothing to record: skip the grad-mode switch
        return finish_maps(result, size, relu, fuse)
    return finish_maps(result.__class__(raws={k: ops.detach(v) for k, v in result.raws.items()} if result.raws else None,
                                        saliency=None if result.saliency is None else ops.detach(result.saliency),
                                        pixel=result.pixel, clip=result.clip), size, relu, fuse)


def finish_maps(result: MethodOutput, size: Optional[tuple[int, int]], relu: bool, fuse: str) -> Tensor:
    """:func:`finish` in the caller's grad mode (differentiable maps keep their graph)."""
    if result.raws:
        return process(list(result.raws.values()), size, relu=relu, fuse=fuse)  # type: ignore[arg-type]
    sal = to_float32(result.saliency)
    return normalize(clip_quantile(namespace(sal).clip(sal, min=0) if relu else sal, result.clip))
