"""The probe forward that finds the default CAM layer (and names layers that would work)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ...core.errors import LayerError
from ..base import MAX_PREFIX_TOKENS, MapLayout, layout_problem, looks_channels_last, read_layout
from .state import first_tensor, model_state

_PROBE_BATCH = 2  # the probe runs 2 images, so that a leading dimension that is not the batch shows
_STEM_TOKENS = 6  # at least this many token / channels-last modules after the last (B, C, h, w) layer, and more
# of them than (B, C, h, w) modules before it: that layer is the patch-embedding stem of a token-based network


@dataclass
class LayerRecord:
    """What the probe saw of one module: its first output's shape, calls, and why it is no candidate.

    Attributes:
        name, kind: dotted name and class name.
        calls: times it ran in the forward; shape: its (first) tensor output's shape, or ``None``.
        order: completion index of its first call (execution order).
        reason: why it cannot be the default CAM layer; ``None``: a candidate.
        fragment: a candidate inside a block whose output has no grid left (h*w = 1): used only
            when no other candidate exists.
        grids: for a volume input, the ``(t, h, w)`` integer triples the module took as arguments or
            returned (inputs first), e.g. the ``thw`` torchvision MViT's blocks pass along: the grid
            of their tokens (:mod:`.volume_probe`).
    """

    name: str
    kind: str
    calls: int
    shape: Optional[tuple[int, ...]]
    order: int
    reason: Optional[str] = None
    fragment: bool = False
    grids: tuple[tuple[int, int, int], ...] = ()

    def describe(self) -> str:
        shape = "no tensor" if self.shape is None else str(tuple(self.shape))
        return f"{self.name} ({self.kind}) {shape}" + (f": {self.reason}" if self.reason else "")


@dataclass
class LayerProbe:
    """One probe forward: the output, per-module records, the chosen layer or why there is none.

    ``batch`` is the probe's batch size (shapes in ``records`` have it as leading dimension).
    """

    output: Any
    batch: int
    size: tuple[int, int]
    records: list[LayerRecord]
    layer: Optional[str] = None
    error: Optional[str] = None
    volume_size: Optional[tuple[int, int, int]] = None  # a volume input's (D, H, W)
    family: str = "cnn"  # how it was picked: "cnn", "vit", "vit-pooled", "swin" or "tokens" (see _transformer_layer)

    def candidates(self, n: int = 5) -> list[str]:
        """The ``n`` deepest candidate layer names, deepest first (the chosen layer first), without
        pieces of a listed block with its shape (``layer4``, ``layer3``, not ``layer4``, ``layer4.1``)."""
        good = [r for r in reversed(self.records) if r.reason is None]
        good.sort(key=lambda r: (r.name != self.layer, r.fragment))  # stable: the pick, whole blocks, fragments
        out: list[LayerRecord] = []
        for r in good:
            if len(out) < n and not any(r.name.startswith(o.name + ".") and r.shape == o.shape for o in out):
                out.append(r)
        return [r.name for r in out]

    def near_misses(self, n: int = 6) -> list[LayerRecord]:
        """The deepest modules with a batch-leading 3-D/4-D output, for error messages."""
        out = [r for r in reversed(self.records) if r.shape is not None and len(r.shape) in (3, 4)
               and not r.kind.startswith("Adaptive")]
        return out[:n]


def module_ids(model: nn.Module) -> tuple[int, ...]:
    """The identities of every module (``_modules`` walk): a submodule swapped in changes them."""
    out: list[int] = []
    stack = [model]
    while stack:
        m = stack.pop()
        out.append(id(m))
        stack.extend(c for c in m._modules.values() if c is not None)
    return tuple(out)


def _int_triples(v: Any, depth: int = 2) -> tuple[tuple[int, int, int], ...]:
    """The triples of positive ints in ``v`` (tuples / lists nested ``depth`` deep), in order, once each."""
    out: list[tuple[int, int, int]] = []
    if isinstance(v, (tuple, list)):
        if len(v) == 3 and all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in v):
            return ((int(v[0]), int(v[1]), int(v[2])),)
        if depth > 0:
            for e in v:
                out.extend(g for g in _int_triples(e, depth - 1) if g not in out)
    return tuple(out)


def _strict_ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def _tensor_leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        vals: Any = out.values()
    elif isinstance(out, (tuple, list)):
        vals = out
    elif hasattr(out, "__dataclass_fields__"):
        vals = [getattr(out, f) for f in out.__dataclass_fields__]
    else:
        return []
    return [t for v in vals for t in _tensor_leaves(v)]


def _is_attention(mod: nn.Module) -> bool:
    """An attention module: ``nn.MultiheadAttention``, a class named ``*Attention*`` / ``*Attn*``
    (timm's ``Attention``, CaiT's ``TalkingHeadAttn``, Twins' ``GlobalSubSampleAttn``, Swin's
    ``WindowAttention``) but not a ``*Block*`` / ``*Stage*``, or one with a fused ``qkv`` projection
    (XCiT's ``XCA``)."""
    if isinstance(mod, nn.MultiheadAttention):
        return True
    kind = type(mod).__name__.lower()
    if "block" in kind or "stage" in kind:  # a transformer block named after its attention (CaiT's ...BlockClassAttn)
        return False
    return "attention" in kind or "attn" in kind or isinstance(mod._modules.get("qkv"), nn.Linear)


def probe_layers(model: nn.Module, x: Tensor) -> LayerProbe:
    """One forward without graph, in eval mode, of 2 images (``x[:2]``, or ``x[0]`` twice if B = 1).

    Two images, so that an output whose leading dimension is not the batch shows (one image can
    give 150 proposals, two give 300); a model that only takes batch 1 is probed at batch 1.

    Picks the default CAM layer: the deepest module (execution order) that

    * runs once (a reused module's output is ambiguous; the block around it is used instead),
    * keeps the batch axis (not per-proposal / per-window outputs of detection or Swin internals),
    * outputs a ``(B, C, h, w)`` map with h*w > 1 (not tokens, vectors or channels-last maps;
      adaptive pooling is skipped: its fixed grid does not follow the image),
    * is not inside an attention block (e.g. timm ViT's ``attn.k_norm`` ``(B, heads, N, d)``),
    * is not the output head of a dense-prediction model (an output ``(B, K, H, W)``): a
      convolution to K channels and the K-channel modules right after it, with all of a head
      module (e.g. a segmentation ``classifier``) unless it holds the whole network,

    preferring a whole block over a piece of a block whose own output has no grid left (resnet50
    on a 32x32 input: ``layer3``, not ``layer4.0.bn1``). A token-based network (most modules after
    the last such layer output tokens or channels-last maps, or that layer is a reshape at the end of
    one, as torchvision Swin's ``permute``) gets its transformer layer instead
    (:func:`_transformer_layer`: ViT-like, Swin-like, token MLPs; ``LayerProbe.family``); one with none
    gets no layer, and ``error`` says why. Model state and hooks are
    restored.

    Object detectors (an output that is a list of per-image dicts with ``"boxes"``, as torchvision's)
    get the last stage of their backbone's feature extractor, the single map before any FPN
    (:func:`_detector_layer`): ``backbone.body.layer4`` for Faster / Mask R-CNN, RetinaNet and
    FCOS on ResNets, ``backbone.features.1`` (the last MobileNet stage) for SSDlite.
    """
    xs = x[:_PROBE_BATCH] if x.shape[0] >= _PROBE_BATCH else torch.cat([x[:1]] * _PROBE_BATCH)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    named = dict(model.named_modules())
    records: dict[str, LayerRecord] = {}
    volume = x.ndim == 5

    def hook(name: str) -> Callable:
        def f(m: nn.Module, i: Any, o: Any) -> None:
            r = records.get(name)
            if r is not None:
                r.calls += 1
                return
            t = first_tensor(o)
            records[name] = LayerRecord(name, type(m).__name__, 1, None if t is None else tuple(t.shape),
                                        len(records), grids=_int_triples((i, o)) if volume else ())
        return f

    def run(xb: Tensor) -> Any:
        records.clear()
        handles = [mod.register_forward_hook(hook(name)) for name, mod in named.items() if name]
        try:
            with torch.no_grad(), model_state(model):
                return model(xb)
        finally:
            for h in handles:
                h.remove()

    try:
        out, B = run(xs), _PROBE_BATCH
    except Exception:  # a model that only takes batch 1 (if batch 1 fails too, that error is raised)
        out, B = run(x[:1]), 1
    recs = sorted(records.values(), key=lambda r: r.order)
    p = LayerProbe(out, B, size, recs)
    if volume:
        p.volume_size = (int(x.shape[-3]), int(x.shape[-2]), int(x.shape[-1]))  # volumes / clips (B, C, D, H, W): 3-D maps
        from .volume_probe import choose_volume_layer

        choose_volume_layer(p, named)
    else:
        _choose(p, named)
    if _is_detections(out):
        p.layer = _detector_layer(p) or p.layer
    return p


#: Where a detector's backbone keeps its feature extractor's stages (torchvision: ``body`` of a
#: ``BackboneWithFPN``, ``features`` of SSD / SSDlite feature extractors), tried in order.
_DETECTOR_BODIES = ("backbone.body", "backbone.features", "backbone")


def _is_detections(out: Any) -> bool:
    """A detector's output: a non-empty list / tuple of dicts that each have ``"boxes"``."""
    return isinstance(out, (list, tuple)) and bool(out) and all(isinstance(d, dict) and "boxes" in d for d in out)


def _detector_layer(p: LayerProbe) -> Optional[str]:
    """The last stage (in execution order) among the direct children of a detector's backbone body
    that is a usable map (:func:`_choose`'s rules), or ``None`` for a model without such a body."""
    for body in _DETECTOR_BODIES:
        stages = [r for r in p.records if r.reason is None and r.name.startswith(body + ".")
                  and "." not in r.name[len(body) + 1:]]
        if stages:
            return stages[-1].name
    return None


def _choose(p: LayerProbe, named: dict[str, nn.Module]) -> None:
    B, size = p.batch, p.size
    by_name = {r.name: r for r in p.records}
    spatial: list[LayerRecord] = []  # (B, C, h, w) with h*w > 1, run once or not
    for r in p.records:
        mod = named[r.name]
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or "adaptive" in r.kind.lower():
            r.reason = "adaptive pooling (its grid does not follow the image)"
        elif r.shape is None:
            r.reason = "no tensor output"
        elif (why := layout_problem(r.shape, B, size)) is not None:
            r.reason = why
        elif r.shape[2] * r.shape[3] <= 1:
            r.reason = "no spatial grid (h*w = 1)"
        else:
            att = next((a for a in _strict_ancestors(r.name) if _is_attention(named[a])), None)
            if att is not None:
                r.reason = f"inside attention block {att!r} ({type(named[att]).__name__})"
            elif r.calls > 1:
                r.reason = f"called {r.calls} times in one forward"
            spatial.append(r)
    # output head of a dense-prediction model: from a projection conv to K output channels on
    dense_k = {int(t.shape[1]) for t in _tensor_leaves(p.output)
               if t.ndim == 4 and t.shape[0] == B and t.shape[2] * t.shape[3] > 1}
    heads: list[LayerRecord] = []
    if dense_k:
        chain = False
        for r in spatial:
            mod = named[r.name]
            if r.shape[1] not in dense_k:
                chain = False
                continue
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.in_channels != mod.out_channels:
                chain = True
            if chain:
                heads.append(r)
        for r in heads:
            r.reason = r.reason or f"output head (its {r.shape[1]} channels are the output's classes)"
        head_names = {r.name for r in heads}
        for h in heads:  # a head module: all of it is head, unless it holds the whole network
            inside = [r for r in spatial if r.name.startswith(h.name + ".")]
            outside = [r for r in spatial if r.reason is None and not r.name.startswith(h.name + ".")
                       and r.name not in head_names]
            if outside:
                for r in inside:
                    r.reason = r.reason or f"inside the output head {h.name!r}"
    good = [r for r in spatial if r.reason is None]
    for r in good:  # a piece of a block whose output has no grid left (e.g. layer4.0.bn1 when layer4 is 1x1)
        r.fragment = any(a in by_name and by_name[a].shape is not None and len(by_name[a].shape) == 4
                         and by_name[a].shape[0] == B and by_name[a].shape[2] * by_name[a].shape[3] <= 1
                         for a in _strict_ancestors(r.name))
    whole = [r for r in good if not r.fragment]
    pick = (whole or good or [None])[-1]
    misses = "; ".join(r.describe() for r in p.near_misses())
    after = [] if pick is None else [
        r for r in p.records if r.order > pick.order and not r.name.startswith(pick.name + ".")
        and r.shape is not None and r.shape[0] == B
        and ((len(r.shape) == 3 and r.shape[1] > 1) or looks_channels_last(r.shape, size))]
    maps_before = sum(1 for r in spatial if pick is not None and r.order <= pick.order)
    tok = _transformer_layer(p, named)
    stem = len(after) >= _STEM_TOKENS and len(after) > maps_before  # mostly tokens after it
    tail = pick is not None and _reshape_only(named[pick.name]) and any(  # a permute right after a token map
        r.order == pick.order - 1 and r.shape is not None and read_layout(r.shape, B, size) is not None
        for r in p.records)
    if tok is not None and (pick is None or stem or (tok[1] != "tokens" and (
            by_name[tok[2]].order > pick.order or tail))):
        p.layer, p.family = tok[0], tok[1]
        return
    if pick is None:
        p.error = (f"no module of the model outputs a feature map that camlens can use for a "
                   f"{size[0]}x{size[1]} input -- it needs a layer that runs once, keeps the batch axis, "
                   "outputs a (B, C, h, w) map with h*w > 1, channels-last (B, h, w, C) or tokens (B, N, C) on a "
                   "patch grid, and is not the output head or inside an attention block. "
                   f"Deepest modules (shapes at a probe batch of {B}): {misses or 'none'}. Pass layer= explicitly")
        return
    if len(after) >= _STEM_TOKENS and len(after) > maps_before:
        p.error = (f"it is token-based: after its patch-embedding stem {pick.name!r} ({pick.kind}, "
                   f"{tuple(pick.shape)}), {len(after)} modules output tokens (B, N, C) or channels-last "
                   f"(B, h, w, C) maps (the last: {after[-1].name} {tuple(after[-1].shape)}), but none of them runs "
                   "once with the batch axis on a patch grid that fits the input, and a CAM of the stem says "
                   f"nothing about the network. Pass layer= explicitly (with layout= or reshape= if camlens cannot "
                   "read its output), or use an input-space method such as method='occlusion'")
        return
    p.layer = pick.name


def token_prefix(model: nn.Module) -> Optional[int]:
    """The model's count of prefix tokens (class, distillation, register) where it says: timm's
    ``num_prefix_tokens``, torchvision ViT's ``class_token`` (one); ``None`` otherwise."""
    n = model.__dict__.get("num_prefix_tokens")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    return 1 if "class_token" in model._parameters else None


def patch_grid(model: nn.Module, size: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The patch grid of a ViT-like model for an input of ``size``, where the model says its patch
    size: timm's ``patch_embed.patch_size`` (also with a dynamic image size), torchvision ViT's
    ``patch_size``; ``None`` otherwise."""
    pe = model._modules.get("patch_embed")
    p = getattr(pe, "patch_size", None) if pe is not None else model.__dict__.get("patch_size")
    if isinstance(p, int) and not isinstance(p, bool):
        p = (p, p)
    if not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)):
        return None
    return size[0] // p[0], size[1] // p[1]


def map_layout(shape: Optional[tuple[int, ...]], batch: int, size: tuple[int, int],
               prefix: Optional[int], grid: Optional[tuple[int, int]] = None) -> Optional[MapLayout]:
    """The channels-last / token layout of a module output, or ``None``: tokens on the model's own
    patch ``grid`` (:func:`patch_grid`) with its prefix count where they hold exactly that many
    patches, else the prefix count the model says, else the search of :func:`read_layout`."""
    if shape is None:
        return None
    if grid is not None and len(shape) == 3 and shape[0] == batch:
        P = shape[1] - grid[0] * grid[1]
        if (P == prefix if prefix is not None else 0 <= P <= MAX_PREFIX_TOKENS):
            return MapLayout("tokens", grid, P)
    return (read_layout(shape, batch, size, prefix) if prefix is not None else None) or read_layout(shape, batch, size)


_TOKEN_KINDS = ("tokens", "volume-tokens")


def _transformer_layer(p: LayerProbe, named: dict[str, nn.Module],
                       reader: Optional[Callable[[LayerRecord], Optional[MapLayout]]] = None
                       ) -> Optional[tuple[str, str, str]]:
    """The default layer of a token-based network, its family and its last attention block (the
    block's record decides whether the network ends in transformer blocks), or ``None``.

    * ViT-like (tokens ``(B, N, C)``: ViT, DeiT, BEiT, EVA, CaiT, XCiT, Twins, EfficientFormer's last
      stage): the input norm of the last attention block (timm ``blocks[-1].norm1``, torchvision
      ``encoder.layers[-1].ln_1``), as pytorch-grad-cam's and the Chefer et al. / vit-explain docs
      recommend: a class-token head reads the patch tokens only through that block's attention, so a
      later layer (the final norm) gets no gradient on the patches and gives a blank map.
    * Swin-like (channels-last ``(B, h, w, C)``): the last stage (timm ``layers[-1]``, torchvision
      ``features[-1]``): the stage container around the last attention block.
    * Token models with no prefix token (Twins, LeViT, EfficientFormer's last stage; family
      ``"vit-pooled"``) or without attention (MLP-Mixer, ResMLP; ``"tokens"``): the deepest token
      layer (their head averages all tokens, so every patch gets a gradient there).

    Candidates run once, keep the batch axis, are not inside an attention block and read as a map
    (:func:`map_layout`). The last attention block is the nearest ancestor of the last attention
    module to run whose output is such a map (Swin's windowed blocks are ``(B*nW, n, C)`` inside but
    ``(B, h, w, C)`` outside).

    ``reader``: how a record reads as a map (default: :func:`map_layout` of its shape); volumes
    pass theirs (:mod:`.volume_probe`: channels-last ``(B, d, h, w, C)`` and clip tokens), and the
    same rules pick Swin3D's last stage and MViT's last ``norm1``."""
    B, size = p.batch, p.size
    prefix, grid = token_prefix(named[""]), patch_grid(named[""], size)
    by_name = {r.name: r for r in p.records}

    def readable(r: LayerRecord) -> Optional[MapLayout]:
        if r.calls != 1 or r.shape is None or any(_is_attention(named[a]) for a in _strict_ancestors(r.name)):
            return None
        if _is_attention(named[r.name]):
            return None
        return reader(r) if reader is not None else map_layout(r.shape, B, size, prefix, grid)

    maps = {r.name: lay for r in p.records if (lay := readable(r)) is not None}
    for r in p.records:  # such layers are candidates now (error hints list them)
        if r.name in maps:
            r.reason = None
    attn = [r for r in p.records if _is_attention(named[r.name])
            and not any(_is_attention(named[a]) for a in _strict_ancestors(r.name))]
    if not attn:
        if not maps:
            return None
        last = max((by_name[n] for n in maps), key=lambda r: r.order)
        return last.name, "tokens", last.name
    last = attn[-1]
    parent = last.name.rpartition(".")[0]  # the last attention block (its input norm: a child that runs before)
    kids = [by_name[n] for n in maps if n.rpartition(".")[0] == parent and maps[n].kind in _TOKEN_KINDS]
    norms = [r for r in kids if "norm" in r.kind.lower() and r.order < last.order]
    if norms and parent:  # ViT-like (also CaiT / XCiT class-attention blocks, whose own output is the class token)
        norm = min(norms, key=lambda r: r.order)
        if maps[norm.name].prefix == 0:  # no class token: the head pools every token, the deepest token layer
            deepest = max((by_name[n] for n in maps if maps[n].kind in _TOKEN_KINDS), key=lambda r: r.order)
            return deepest.name, "vit-pooled", parent
        return norm.name, "vit", parent
    block = next((a for a in _strict_ancestors(last.name) if a in maps), None)
    if block is None:
        return None
    if maps[block].kind in _TOKEN_KINDS:  # no input norm (LeViT): the deepest token layer, as for pooled heads
        deepest = max((by_name[n] for n in maps if maps[n].kind in _TOKEN_KINDS), key=lambda r: r.order)
        return deepest.name, "vit-pooled", block
    stage = block  # channels-last: climb to the stage holding the block (same shape, finishing right after it)
    for a in _strict_ancestors(block):
        r, cur = by_name.get(a), by_name[stage]
        if r is None:  # a ModuleList of blocks is never called: look at the module holding it
            continue
        if a not in maps or r.shape != cur.shape or r.order != cur.order + 1:
            break
        kids = [by_name[n] for n in by_name if n.startswith(a + ".") and "." not in n[len(a) + 1:]]
        if any(k.shape != cur.shape for k in kids):  # a list of stages with different grids: stop below it
            break
        stage = a
    return stage, "swin", block


def _reshape_only(mod: nn.Module) -> bool:
    """A module with no parameters and no children (a permute, flatten, identity): an NCHW layer
    of that kind at the end of a transformer is a view of its last stage, not a CNN feature map."""
    return not mod._modules and not mod._parameters


def probe(model: nn.Module, x: Tensor) -> tuple[Optional[str], Any]:
    """``(default CAM layer or None, output)`` from :func:`probe_layers` (the output is for 2 images)."""
    p = probe_layers(model, x)
    return p.layer, p.output


def guess_layer(model: nn.Module, x: Tensor) -> str:
    """The default CAM layer (see :func:`probe_layers`); a clear error listing candidates if none.

    torchvision ResNets give ``layer4``, VGG ``features``, timm EfficientNets ``bn2``.
    """
    if x.ndim == 5:  # volumes: the probe is memoised (its layouts are read again by every call)
        from .volume_probe import probe_volume

        p = probe_volume(model, x)
    else:
        p = probe_layers(model, x)
    if p.layer is None:
        raise LayerError(f"cannot pick a CAM layer of {type(model).__name__}: {p.error}")
    return p.layer


# ----------------------------------------------------------------------------------------------
# extra passes for perturbation and input-gradient methods

ScoreFn = Callable[[Any, int], Tensor]  # (model output for N inputs, image index b) -> (N, T)
