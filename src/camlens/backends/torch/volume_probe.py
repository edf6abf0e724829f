"""The default CAM layer of a volume / clip model (inputs ``(B, C, D, H, W)``) and how each layer's
output holds its 3-D map: the probe's records (:func:`camlens.backends.torch.probing.probe_layers`)
read with the rules of 2-D maps, for 3-D maps.

Layouts (:class:`~camlens.backends.base.MapLayout`), all read as ``(B, C, d, h*w)``:

* ``"volume"``: ``(B, C, d, h, w)`` (3-D CNNs: r3d_18, a 3-D U-Net);
* ``"volume-last"``: channels-last ``(B, d, h, w, C)`` (torchvision Swin3D's ``features`` stages and
  ``norm``): where only that reading fits the input (:func:`~camlens.backends.base.volume_readings`),
  or where both fit and the module (or one inside it) is a ``LayerNorm`` / ``Linear`` of the last
  dimension's width and none a 3-D convolution / norm of dimension 1's;
* ``"volume-tokens"``: tokens ``(B, P + t*h*w, C)`` (torchvision MViT's blocks: a class token first).
  The grid ``(t, h, w)`` is the model's own where it passes one along: an integer triple that the
  module, or the nearest module around it, takes or returns with ``t*h*w = N - P`` (MViT's blocks
  take and return ``thw``; a block that pools its queries returns the smaller grid); else one
  triple of that product seen anywhere in the forward; else the shape search
  (:func:`~camlens.backends.base.token_volume_grids`) when it finds exactly one grid. Otherwise the
  layer cannot be read, and explaining it is a :class:`~camlens.core.errors.LayerError`.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import torch
from torch import nn

from ...core.errors import LayerError
from ..base import MAX_PREFIX_TOKENS, MapLayout, token_volume_grids, volume_readings
from .probing import (LayerProbe, LayerRecord, _is_attention, _strict_ancestors, _tensor_leaves,
                      _transformer_layer, module_ids, probe_layers, token_prefix)

__all__ = ["choose_volume_layer", "input_rank", "probe_volume", "volume_layouts", "record_layout"]

_RANKS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Optional[int]]]" = weakref.WeakKeyDictionary()
_BY_DIMS = (((nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.MaxPool3d, nn.AvgPool3d), 5),
            ((nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.MaxPool2d, nn.AvgPool2d), 4),
            ((nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d), 3))


def input_rank(model: nn.Module) -> Optional[int]:
    """The rank of a batch the model's first spatial module takes: 5 for a 3-D CNN (its first
    convolution / norm / pooling module is 3-D: ``Conv3d``, ``BatchNorm3d``, ...), 4 for a 2-D one, 3
    for 1-D; ``None`` when it has none. Memoised per model while it holds the same modules (a
    submodule swapped in since is seen, as by ``default_layer``'s memo)."""
    key = module_ids(model)
    try:
        hit = _RANKS.get(model)
    except TypeError:  # cannot be weakly referenced
        return _first_rank(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    rank = _first_rank(model)
    _RANKS[model] = (key, rank)
    return rank


def _first_rank(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        for kinds, rank in _BY_DIMS:
            if isinstance(m, kinds):
                return rank
    return None


_LAST_EVIDENCE = (nn.LayerNorm, nn.Linear)
_FIRST_EVIDENCE = (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm)


def _width(m: nn.Module) -> Optional[int]:
    """The feature width a module works on: a LayerNorm's last normalised size, a Linear's output,
    a 3-D convolution's output channels, a norm's channels."""
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1]) if m.normalized_shape else None
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
        return int(m.out_channels)
    if isinstance(m, nn.GroupNorm):
        return int(m.num_channels)
    return getattr(m, "num_features", None)


def _channels_last_evidence(mod: nn.Module, shape: tuple[int, ...]) -> bool:
    """The module (or one inside it) is a LayerNorm / Linear of the last dimension's width, and none a
    3-D convolution / norm of dimension 1's: the output ``(B, d, h, w, C)`` is channels-last."""
    mods = list(mod.modules())
    last = any(isinstance(m, _LAST_EVIDENCE) and _width(m) == shape[-1] for m in mods)
    first = any(isinstance(m, _FIRST_EVIDENCE) and _width(m) == shape[1] for m in mods)
    return last and not first


def record_layout(r: LayerRecord, records: dict[str, LayerRecord], size: tuple[int, int, int],
                  mod: nn.Module, prefix: Optional[int] = None) -> Optional[MapLayout]:
    """How a probe record's output holds a 3-D map of a volume input of ``size`` ``(D, H, W)``
    (module doc: ``"volume"``, ``"volume-last"``, ``"volume-tokens"``), or ``None`` (not readable).
    ``records``: all records by name (the grids passed along around ``r``); ``prefix``: the
    model's count of prefix tokens, where it says."""
    shape = r.shape
    if shape is None:
        return None
    if len(shape) == 5:
        first, last = volume_readings(shape, size)
        if last and (not first or _channels_last_evidence(mod, shape)) or (
                not first and not last and _channels_last_evidence(mod, shape)):
            return MapLayout("volume-last", (shape[1], shape[2], shape[3]), 0)
        return MapLayout("volume", (shape[2], shape[3], shape[4]), 0)
    if len(shape) != 3:
        return None
    found = token_grid(r, records, size, prefix)
    return None if found is None else MapLayout("volume-tokens", found[0], found[1])


def token_grid(r: LayerRecord, records: dict[str, LayerRecord], size: tuple[int, int, int],
               prefix: Optional[int] = None) -> Optional[tuple[tuple[int, int, int], int]]:
    """``((t, h, w), P)`` of a token record ``(B, N, C)`` (module doc), or ``None``."""
    N = r.shape[1]
    counts = [prefix] if prefix is not None else list(range(MAX_PREFIX_TOKENS + 1))

    def match(grids: Any) -> list[tuple[tuple[int, int, int], int]]:
        return [(g, N - math.prod(g)) for g in grids if N - math.prod(g) in counts]

    for name in (r.name, *_strict_ancestors(r.name)):  # the module's own grid, or the nearest block's
        rec = records.get(name)
        hit = match(rec.grids) if rec is not None else []
        if hit:
            return hit[0]
    seen = {h for rec in records.values() for h in match(rec.grids)}
    if len(seen) == 1:
        return next(iter(seen))
    P, grids = token_volume_grids(N, size, prefix)
    return (grids[0], P) if P is not None and len(grids) == 1 else None


def _why_unreadable(r: LayerRecord, size: tuple[int, int, int], prefix: Optional[int]) -> str:
    """Why a token record has no grid: what the shape search found."""
    N = r.shape[1]
    P, grids = token_volume_grids(N, size, prefix)
    D, H, W = size
    found = ("no (t, h, w) with t <= D and (h, w) at one stride of (H, W) holds N - P tokens for P in "
             f"0..{MAX_PREFIX_TOKENS}" if P is None else
             f"{len(grids)} grids hold its {N - P} tokens after {P} prefix tokens "
             f"({', '.join('x'.join(map(str, g)) for g in grids[:4])}{', ...' if len(grids) > 4 else ''})")
    return (f"tokens (B, N, C) with N = {N} of a {D}x{H}x{W} clip, but camlens cannot tell their (t, h, w) grid: "
            f"the model passes no (t, h, w) triple of that size through it or a module around it, and {found}")


def choose_volume_layer(p: LayerProbe, named: dict[str, nn.Module]) -> None:
    """Set ``p.layer`` (or ``p.error``) for a volume input: the deepest module (execution order) that

    * runs once and keeps the batch axis,
    * outputs a 3-D map ``(B, C, d, h, w)`` with ``d*h*w > 1`` (adaptive pooling skipped),
    * is not inside an attention block,
    * is not the output head of a dense-prediction model (a 5-D output ``(B, K, D', H', W')``: the
      convolution to K channels and the K-channel modules after it),

    preferring a whole block over a piece of one whose own output has no grid left (as for images).
    torchvision's r3d_18 / mc3_18 / r2plus1d_18 get ``layer4``.

    Video transformers (channels-last ``(B, d, h, w, C)`` maps or clip tokens, read by
    :func:`record_layout`) get the 2-D rule of :func:`~camlens.backends.torch.probing._transformer_layer`
    when their last attention block runs after the last ``(B, C, d, h, w)`` candidate (their patch
    embedding): Swin3D the last stage (``features.6``, as 2-D Swin's ``features.7``), MViT the input
    norm of the last block (``blocks.15.norm1``, as ViT's ``ln_1``: the head reads the class token,
    and the patch tokens reach it only through that block's attention; ``p.family`` ``"vit"``).
    """
    B = p.batch
    size = p.volume_size
    by_name = {r.name: r for r in p.records}
    prefix = token_prefix(named[""])
    good = []
    for r in p.records:
        mod = named[r.name]
        lay = record_layout(r, by_name, size, mod, prefix) if r.shape is not None and r.shape[0] == B else None
        if isinstance(mod, (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)) or "adaptive" in r.kind.lower():
            r.reason = "adaptive pooling (its grid does not follow the volume)"
        elif r.shape is None:
            r.reason = "no tensor output"
        elif r.shape[0] != B:
            r.reason = f"its leading dimension ({r.shape[0]}) is not the batch of the input ({B})"
        elif lay is not None and lay.kind == "volume-last":
            r.reason = "channels-last 3-D map (B, d, h, w, C) (a transformer stage)"
        elif lay is not None and lay.kind == "volume-tokens":
            r.reason = f"tokens on a {'x'.join(map(str, lay.grid))} grid (a transformer block)"
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
    if any(_is_attention(m) for m in named.values()):
        def reader(r: LayerRecord) -> Optional[MapLayout]:
            if r.shape is None or r.shape[0] != B:
                return None
            lay = record_layout(r, by_name, size, named[r.name], prefix)
            return lay if lay is not None and lay.kind != "volume" else None

        reasons = {r.name: r.reason for r in p.records}
        tok = _transformer_layer(p, named, reader)
        if tok is not None and (pick is None or by_name[tok[2]].order > pick.order):
            p.layer, p.family = tok[0], tok[1]
            return
        for r in p.records:  # a CNN after all: the transformer rule's candidates are not
            r.reason = reasons[r.name]
    if pick is None:
        seen = "; ".join(r.describe() for r in reversed(p.records[-6:]))
        p.error = ("no module outputs a 3-D feature map (B, C, d, h, w) with d*h*w > 1 that runs once and keeps the "
                   "batch axis (nor a channels-last (B, d, h, w, C) map or clip tokens (B, P + t*h*w, C) of a "
                   f"transformer), for a volume input; deepest modules: {seen or 'none'}. Pass layer= explicitly")
        return
    p.layer = pick.name


# ----------------------------------------------------------------------------------------------
# the memoised probe, and the layouts of the explained layers

_PROBES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def probe_volume(model: nn.Module, x: torch.Tensor) -> LayerProbe:
    """:func:`probe_layers` of a volume input (layer chosen, layouts readable from its records),
    memoised per model for inputs of the same ``(C, D, H, W)``, dtype and device while the model holds
    the same modules: ``layer=None`` and the layouts of the explained layers share one probe forward.
    The memo keeps the records, not the output."""

    key = (module_ids(model), tuple(x.shape[1:]), x.dtype, x.device)
    try:
        memo = _PROBES.setdefault(model, {})
    except TypeError:  # cannot be weakly referenced: no memo
        memo = {}
    p = memo.get(key)
    if p is None:
        p = probe_layers(model, x)
        p.output = None
        if len(memo) >= 4:
            memo.clear()
        memo[key] = p
    return p


def volume_layouts(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, MapLayout]:
    """How each explained layer holds its 3-D map for the volume input ``x`` (:func:`record_layout`,
    from the memoised probe): layer name -> :class:`MapLayout` (kind ``"volume"`` without a grid
    where the probe did not see the layer, or its output is no 3-D map: the capture's check then
    says what it saw). Token layers whose grid cannot be found raise a :class:`LayerError`."""
    p = probe_volume(model, x)
    by_name = {r.name: r for r in p.records}
    size = p.volume_size
    prefix = token_prefix(model)
    out: dict[str, MapLayout] = {}
    for name in names:
        r = by_name.get(name)
        lay = None if r is None else record_layout(r, by_name, size, model.get_submodule(name), prefix)
        if lay is None and r is not None and r.shape is not None and len(r.shape) == 3:
            cands = ", ".join(repr(c) for c in p.candidates(3)) if p.layer is not None else ""
            raise LayerError(f"layer {name!r} ({r.kind}) outputs {_why_unreadable(r, size, prefix)}. Pick a layer "
                             "whose output is a 3-D map (B, C, d, h, w) or (B, d, h, w, C)"
                             + (f", e.g. {cands}" if cands else "") + ", or give its grid: layout=camlens."
                             "MapLayout('tokens', grid=(t, h, w), prefix=P)")
        out[name] = lay if lay is not None else MapLayout("volume")
    return out
