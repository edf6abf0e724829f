"""The default CAM layer of a volume / clip model (inputs ``(B, C, D, H, W)``): the probe's records
(:func:`camlens.backends.torch.probing.probe_layers`) read with the rules of 2-D maps, for 3-D maps."""

from __future__ import annotations

import math
import weakref
from typing import Optional

from torch import nn

from .probing import LayerProbe, _is_attention, _strict_ancestors, _tensor_leaves

__all__ = ["choose_volume_layer", "input_rank"]

_RANKS: "weakref.WeakKeyDictionary[nn.Module, Optional[int]]" = weakref.WeakKeyDictionary()
_BY_DIMS = (((nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.MaxPool3d, nn.AvgPool3d), 5),
            ((nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.MaxPool2d, nn.AvgPool2d), 4),
            ((nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d), 3))


def input_rank(model: nn.Module) -> Optional[int]:
    """The rank of a batch the model's first spatial module takes: 5 for a 3-D CNN (its first
    convolution / norm / pooling module is 3-D: ``Conv3d``, ``BatchNorm3d``, ...), 4 for a 2-D one, 3
    for 1-D; ``None`` when it has none. Memoised per model (a module swapped in later is not seen)."""
    try:
        return _RANKS[model]
    except KeyError:
        pass
    except TypeError:  # cannot be weakly referenced
        return _first_rank(model)
    rank = _RANKS[model] = _first_rank(model)
    return rank


def _first_rank(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        for kinds, rank in _BY_DIMS:
            if isinstance(m, kinds):
                return rank
    return None


def choose_volume_layer(p: LayerProbe, named: dict[str, nn.Module]) -> None:
    """Set ``p.layer`` (or ``p.error``) for a volume input: the deepest module (execution order) that

    * runs once and keeps the batch axis,
    * outputs a 3-D map ``(B, C, d, h, w)`` with ``d*h*w > 1`` (adaptive pooling skipped),
    * is not inside an attention block,
    * is not the output head of a dense-prediction model (a 5-D output ``(B, K, D', H', W')``: the
      convolution to K channels and the K-channel modules after it),

    preferring a whole block over a piece of one whose own output has no grid left (as for images).
    torchvision's r3d_18 / mc3_18 / r2plus1d_18 get ``layer4``.
    """
    B = p.batch
    by_name = {r.name: r for r in p.records}
    good = []
    for r in p.records:
        mod = named[r.name]
        if isinstance(mod, (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)) or "adaptive" in r.kind.lower():
            r.reason = "adaptive pooling (its grid does not follow the volume)"
        elif r.shape is None:
            r.reason = "no tensor output"
        elif r.shape[0] != B:
            r.reason = f"its leading dimension ({r.shape[0]}) is not the batch of the input ({B})"
        elif len(r.shape) != 5:
            r.reason = f"it is {len(r.shape)}-D, not a 3-D map (B, C, d, h, w)"
        elif math.prod(r.shape[2:]) <= 1:
            r.reason = "no spatial grid (d*h*w = 1)"
        elif r.calls > 1:
            r.reason = f"called {r.calls} times in one forward"
        elif (att := next((a for a in _strict_ancestors(r.name) if _is_attention(named[a])), None)) is not None:
            r.reason = f"inside attention block {att!r}"
        else:
            good.append(r)
    dense_k = {int(t.shape[1]) for t in _tensor_leaves(p.output)
               if t.ndim == 5 and t.shape[0] == B and math.prod(t.shape[2:]) > 1}
    chain = False
    for r in list(good) if dense_k else []:  # a dense 3-D head (segmentation): from its projection conv on
        mod = named[r.name]
        if r.shape[1] not in dense_k:
            chain = False
            continue
        chain = chain or (isinstance(mod, nn.modules.conv._ConvNd) and mod.in_channels != mod.out_channels)
        if chain:
            r.reason = f"output head (its {r.shape[1]} channels are the output's classes)"
            good.remove(r)
    for r in good:
        r.fragment = any(a in by_name and by_name[a].shape is not None and len(by_name[a].shape) == 5
                         and math.prod(by_name[a].shape[2:]) <= 1 for a in _strict_ancestors(r.name))
    whole = [r for r in good if not r.fragment]
    pick = (whole or good or [None])[-1]
    if pick is None:
        seen = "; ".join(r.describe() for r in reversed(p.records[-6:]))
        p.error = ("no module outputs a 3-D feature map (B, C, d, h, w) with d*h*w > 1 that runs once and keeps the "
                   f"batch axis, for a volume input; deepest modules: {seen or 'none'}. Pass layer= explicitly")
        return
    p.layer = pick.name
