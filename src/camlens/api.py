"""The one call most users need: :func:`explain`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from .backends.torch import (LayerSpec, capture, check_calls, guess_layer, layer_gradients, model_device,
                             model_state, resolve_layers)
from .explanation import Explanation
from .methods import GradientMethod, get_method
from .methods.cam import CAM, cam_maps, find_cam_head
from .postprocess import process
from .targets import Categories, ResolvedTarget, resolve_targets, split_outputs, target_probabilities

__all__ = ["explain"]


def _unwrap(model: Any, inputs: Any, layer: Any, categories: Categories):
    """Accept a :class:`camlens.models.LoadedModel`: preprocess images, default layer and class names."""
    display = None
    if hasattr(model, "model") and hasattr(model, "preprocess") and not isinstance(model, nn.Module):
        if not isinstance(inputs, Tensor):
            inputs = model.preprocess(inputs)
            display = model.to_display(inputs) if hasattr(model, "to_display") else None
        layer = layer if layer is not None else getattr(model, "default_layer", None)
        categories = categories if categories is not None else getattr(model, "categories", None)
        model = model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a camlens LoadedModel, got {type(model).__name__}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a tensor (B, 3, H, W) for a plain nn.Module, got {type(inputs).__name__}; "
                        "preprocess images first, or pass a camlens.models.load(...) object as the model")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
        if display is not None and display.ndim == 3:
            display = display[None]
    if inputs.ndim != 4:
        raise ValueError(f"inputs must have shape (B, C, H, W), got {tuple(inputs.shape)}")
    return model, inputs, layer, categories, display


def _scores(rows: list[list[ResolvedTarget]], heads: dict, output: Any) -> Tensor:
    """Scores ``(B, T)``: ``S[b, t]`` is target ``rows[b][t]`` evaluated on image ``b``."""
    B, T = len(rows), len(rows[0])
    cols = []
    for t in range(T):
        col = [rows[b][t] for b in range(B)]
        if all(c == col[0] for c in col):
            s = col[0].score(heads, output)
        else:
            cache: dict[ResolvedTarget, Tensor] = {}
            parts = []
            for b, c in enumerate(col):
                if c not in cache:
                    cache[c] = c.score(heads, output)
                parts.append(cache[c][b])
            s = torch.stack(parts)
        if s.shape[0] != B:
            raise ValueError(f"target {col[0].label!r} gave {s.shape[0]} scores for a batch of {B}")
        cols.append(s)
    return torch.stack(cols, dim=1)


def explain(model: Any, inputs: Any, targets: Any = None, *, layer: Union[LayerSpec, Sequence[LayerSpec], None] = None,
            method: str = "gradcam", top_k: Optional[int] = None, categories: Categories = None,
            fuse: Literal["mean", "max"] = "mean", relu: bool = True, upsample: bool = True,
            eval_mode: bool = True) -> Explanation:
    """Explain T targets of each of B images: maps ``(B, T, H, W)`` in [0, 1].

    Args:
        model: an ``nn.Module`` (any output structure: tensor, tuple, list, dict, namedtuple,
            dataclass) or a :class:`camlens.models.LoadedModel`, which also preprocesses images
            and supplies the default layer and class names.
        inputs: ``(B, 3, H, W)`` or ``(3, H, W)`` tensor; with a LoadedModel also images / paths.
        targets: an int, ``"head:class"``, ``(head, class)``, :class:`camlens.Target`, callable
            ``output -> (B,)``, a flat list of these (same targets for every image), a list of B
            lists (per image), or ``"all"`` / ``"head:all"`` (every class of a head). ``None``:
            the top class of every classification head (or ``top_k``).
        layer: dotted name(s) or module(s); several layers are fused by ``fuse``. ``None``:
            the last spatial layer of the forward pass.
        method: a registered method name (``camlens.methods.available_methods()``).
        top_k: explain each classification head's K highest-scoring classes.
        categories: class names, a list (first head) or ``{head: list}``.
        relu: apply ReLU to the raw maps (``False`` keeps negative evidence before min-max).
        upsample: resize maps to the input size (``False``: the layer's own size).
        eval_mode: run the model in eval mode (restored afterwards).

    One forward pass runs; all T targets' gradients come from one batched backward. The model is
    left exactly as given: modes, ``requires_grad``, ``.grad``, buffers and hooks.
    """
    net, x, layer, categories, display = _unwrap(model, inputs, layer, categories)
    meth = get_method(method)
    x = x.to(model_device(net))
    if layer is None:
        layer = guess_layer(net, x)
    layers = resolve_layers(net, layer)
    names = [n for n, _ in layers]

    with model_state(net, eval_mode=eval_mode), capture(net, layers, grad=meth.needs_grads, linear=meth is CAM) as cap:
        with torch.no_grad():
            output = net(x)
        check_calls(cap, layers)
        heads = split_outputs(output)
        rows = resolve_targets(targets, heads, output, top_k=top_k, categories=categories)
        acts = [cap.activations[n] for n in names]
        if meth.needs_grads:
            with torch.enable_grad():  # score fns must record a graph, even under a caller's no_grad
                scores = _scores(rows, heads, output)
            grads = layer_gradients(scores, acts, names, [t.label for t in rows[0]])
            if not isinstance(meth, GradientMethod):
                raise TypeError(f"method {meth.name!r} is not a gradient method")
            with torch.no_grad():
                raws = [meth.raw(a.detach(), g) for a, g in zip(acts, grads)]
            scores = scores.detach()
        else:
            with torch.no_grad():
                scores = _scores(rows, heads, output)
            raws = [_cam(acts, rows, heads, cap, net, names)]
    with torch.no_grad():
        maps = process(raws, tuple(x.shape[-2:]) if upsample else None, use_relu=relu, fuse_how=fuse)
    detached = {k: v.detach() for k, v in heads.items()}
    return Explanation(maps=maps, raw=raws[0], raws=dict(zip(names, raws)), scores=scores,
                       probs=target_probabilities(rows, detached), targets=rows, inputs=x.detach(), layers=names,
                       method=meth.name, display=display, heads=detached)


def _cam(acts: list[Tensor], rows: list[list[ResolvedTarget]], heads: dict, cap: Any, net: nn.Module,
         names: list[str]) -> Tensor:
    """Raw CAMs ``(B, T, h, w)`` for class targets on heads produced by GAP + Linear."""
    if len(acts) != 1:
        raise ValueError(f"CAM uses one layer (the one before global pooling), got {names}")
    a = acts[0]
    B, T = len(rows), len(rows[0])
    out = torch.empty((B, T, *a.shape[-2:]), dtype=a.dtype, device=a.device)
    modules = dict(net.named_modules())
    by_head: dict[Any, list[int]] = {}
    for t in range(T):
        hs = {rows[b][t].head for b in range(B)}
        for b in range(B):
            tg = rows[b][t]
            if tg.fn is not None or tg.cls is None:
                raise ValueError(f"CAM explains classes of a Linear head; target {tg.label!r} is a score function. "
                                 "Use method='gradcam'.")
        for h in hs:
            by_head.setdefault(h, []).append(t)
    for h, ts in by_head.items():
        linear = find_cam_head(a, heads[h], cap.linear_io, modules, names[0], str(h))
        classes = torch.tensor([[rows[b][t].cls if rows[b][t].head == h else 0 for t in ts] for b in range(B)],
                               device=a.device)
        m = cam_maps(a, linear, classes)
        for j, t in enumerate(ts):
            mask = torch.tensor([rows[b][t].head == h for b in range(B)], device=a.device)
            out[:, t] = torch.where(mask[:, None, None], m[:, j], out[:, t])
    return out
