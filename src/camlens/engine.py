"""The engine: one pass (capture → targets → scores → gradients → method), one finish
(post-processing), and the wrappers around a pass (noise smoothing, test-time augmentation; tiling
lives in :mod:`camlens.tiling`). The public calls (:func:`camlens.explain`, :func:`camlens.stream`,
:func:`camlens.evaluate`) are built from these; nothing here knows a method by name — a method
declares what it needs (``needs_grads``, ``needs_layer``, ``differentiable``) and gets exactly that.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.base import Backend, get_backend
from .backends.torch import Layout, autocast, model_device
from .errors import ConfigTypeError, InputError, InputTypeError, ModelRuntimeError, NonFiniteScoresError, TargetError
from .methods import Method, MethodContext, MethodOutput
from .postprocess import as_float, clip_quantile, normalize, process, to_float32
from .targets import Categories, ResolvedTarget, combine_targets, resolve_targets, split_outputs

__all__ = ["prepare", "outside_inference_mode", "check_model_tensors", "match_dtype", "check_scores",
           "target_scores", "Pass", "run_pass", "finish", "finish_maps", "noise_smoothed", "aug_smoothed"]


def prepare(model: Any, inputs: Any, layer: Any, categories: Categories):
    """Accept a :class:`camlens.models.LoadedModel`: preprocess images, default layer and class names.

    Also checks the input tensor: floating point (a uint8 tensor given with a LoadedModel is
    preprocessed as images), finite, not an inference tensor (cloned), shape ``(B, C, H, W)``.
    """
    display = None
    if hasattr(model, "model") and hasattr(model, "preprocess") and not isinstance(model, nn.Module):
        if isinstance(inputs, Tensor) and inputs.dtype == torch.uint8 and inputs.ndim in (3, 4) \
                and inputs.shape[-3] == 3:  # uint8 (B, 3, H, W) images: preprocess them like arrays
            inputs = list(inputs.reshape(-1, *inputs.shape[-3:]).permute(0, 2, 3, 1).cpu().numpy())
        if not isinstance(inputs, Tensor):
            inputs = model.preprocess(inputs)
            display = model.to_display(inputs) if hasattr(model, "to_display") else None
        layer = layer if layer is not None else getattr(model, "default_layer", None)
        categories = categories if categories is not None else getattr(model, "categories", None)
        model = model.model
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be an nn.Module or a camlens LoadedModel, got {type(model).__name__}")
    if not isinstance(inputs, Tensor):
        raise InputTypeError(f"inputs must be a tensor (B, 3, H, W) for a plain nn.Module, got {type(inputs).__name__}; "
                        "preprocess images first, or pass a camlens.models.load(...) object as the model")
    if not inputs.is_floating_point():
        kind = "a uint8 image tensor" if inputs.dtype == torch.uint8 else f"a {inputs.dtype} tensor"
        raise InputTypeError(f"inputs is {kind}, but models take float inputs: convert to float and normalise as the "
                        "model expects (e.g. x.float() / 255, then the model's mean/std), or pass a "
                        "camlens.models.load(...) object as the model, which preprocesses uint8 images")
    if inputs.is_inference():  # made under torch.inference_mode(): a normal copy can record gradients
        inputs = inputs.clone()
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
        if display is not None and display.ndim == 3:
            display = display[None]
    if inputs.ndim != 4:
        raise InputError(f"inputs must have shape (B, C, H, W), got {tuple(inputs.shape)}")
    # NaN/Inf make the sum non-finite (one cheap reduction); only then (or on overflow) the full test
    if not math.isfinite(float(inputs.detach().sum())) and not bool(torch.isfinite(inputs).all()):
        bad = (~torch.isfinite(inputs.flatten(1)).all(1)).nonzero().flatten().tolist()
        raise InputError(f"inputs contain NaN/Inf in image(s) {bad}: their maps and scores would be NaN; fix or "
                         "drop those images (e.g. torch.nan_to_num) before explaining")
    return model, inputs, layer, categories, display


def outside_inference_mode(fn: Any) -> Any:
    """Run ``fn`` with inference mode off: under ``torch.inference_mode()`` no graph can be recorded,
    so gradient methods would fail (inference tensors among the inputs are cloned by :func:`prepare`)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


def check_model_tensors(net: nn.Module) -> None:
    """A model whose weights were made under ``torch.inference_mode()`` cannot be differentiated."""
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if t.is_inference():
            raise ModelRuntimeError(f"the model's tensor {name!r} is an inference tensor (the model was created or loaded "
                               "under torch.inference_mode()), so no gradients can flow through it; create / load the "
                               "model outside inference mode, or clone its state: "
                               "model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})")


def match_dtype(net: nn.Module, x: Tensor, precision: str) -> Tensor:
    """Inputs on the model's device, in the dtype of its floating-point parameters (e.g. float64
    images for a float32 model, float32 for a ``.half()`` one). Under fp16/bf16 autocast the
    input is left to autocast (float64 becomes float32)."""
    first = next(net.parameters(), None)
    dev = first.device if first is not None else model_device(net)
    dtype = first.dtype if first is not None and first.is_floating_point() else \
        next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if dtype is None or x.dtype == dtype:
        return x if x.device == dev else x.to(dev)
    if precision == "fp32":
        return x.to(dev, dtype)
    return x.to(dev, torch.float32) if x.dtype == torch.float64 else x.to(dev)


def check_scores(scores: Tensor, rows: list[list[ResolvedTarget]]) -> None:
    """The model's scores for finite inputs must be finite: name the images and targets that are not."""
    if scores.numel() <= 256 and all(map(math.isfinite, scores.detach().view(-1).tolist())):
        return  # a few scores: one copy to the host (on a GPU the same one sync as .any())
    bad = ~torch.isfinite(scores.detach())
    if bool(bad.any()):
        where = bad.nonzero().tolist()
        items = ", ".join(f"image {b} target {rows[b][t].label!r}" for b, t in where[:8])
        more = f" and {len(where) - 8} more" if len(where) > 8 else ""
        raise NonFiniteScoresError(f"the model returned NaN/Inf scores for finite inputs: {items}{more}; the model "
                                 "itself produces non-finite outputs (check its weights with torch.isfinite and its "
                                 "numerics, e.g. precision=), so no map can be computed")


def class_scores(rows: list[list[ResolvedTarget]], heads: dict) -> Optional[Tensor]:
    """The scores ``(B, T)`` by one gather per head when every target is a class of a ``(B, K)``
    head (e.g. all 1000 classes); ``None`` when any target is something else."""
    B = len(rows)
    idx: dict[Any, list[list[int]]] = {}
    for b, row in enumerate(rows):
        for t, tg in enumerate(row):
            h = heads.get(tg.head) if tg.fn is None else None
            if h is None or tg.cls is None or h.ndim != 2 or h.shape[0] != B or not 0 <= tg.cls < h.shape[1]:
                return None
            idx.setdefault(tg.head, [[-1] * len(row) for _ in range(B)])[b][t] = tg.cls
    if len(idx) == 1:  # one head: every index is valid, one gather
        k, cls = next(iter(idx.items()))
        return heads[k].gather(1, torch.tensor(cls, device=heads[k].device))
    out = None
    for k, cls in idx.items():
        c = torch.tensor(cls, device=heads[k].device)
        s = heads[k].gather(1, c.clamp_min(0))
        out = torch.where(c >= 0, s, 0 if out is None else out)
    return out


def target_scores(rows: list[list[ResolvedTarget]], heads: dict, output: Any) -> Tensor:
    """Scores ``(B, T)``: ``S[b, t]`` is target ``rows[b][t]`` evaluated on image ``b``."""
    fast = class_scores(rows, heads)
    if fast is not None:
        return fast
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
            raise TargetError(f"target {col[0].label!r} gave {s.shape[0]} scores for a batch of {B}")
        cols.append(s)
    return torch.stack(cols, dim=1)


@dataclass
class Pass:
    """One engine pass: the method's output, the scores (B, T), the resolved targets, the heads."""

    result: MethodOutput
    scores: Tensor
    rows: list[list[ResolvedTarget]]
    heads: dict
    components: list[list[ResolvedTarget]]


def run_pass(net: nn.Module, x: Tensor, targets: Any, layers: list, meth: Method, opts: dict,
             categories: Categories, top_k: Optional[int], combine: str = "separate",
             layout: Optional[Layout] = None, head_keys: Any = None, differentiable: bool = False,
             backend: Optional[Backend] = None) -> Pass:
    """One forward with the layers hooked, the batched backward if needed, then the method's math.

    Everything framework-specific goes through ``backend`` (default: the model's, from
    :func:`camlens.backends.base.get_backend`); the method gets what it declares
    (``needs_grads``, ``needs_linear_head``). ``layout`` carries the precision and memory layout of
    every forward (default: fp32, auto); ``head_keys`` is ``explain(heads=...)``.
    ``differentiable``: the forward records its graph from the input, gradients keep theirs
    (``create_graph``) and nothing is detached.
    """
    bk = backend if backend is not None else get_backend(net)
    names = [n for n, _ in layers]
    layout = layout if layout is not None else bk.layout(net, None, "fp32")
    with bk.capture(net, layers, grad=meth.needs_grads, linear=meth.needs_linear_head,
                    full_graph=differentiable) as cap:
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            output = layout.run(x)
        bk.check_capture(cap, layers, net, x)  # one clear error for any method: (B, C, h, w) of this batch
        heads = split_outputs(output)
        components = resolve_targets(targets, heads, output, top_k=top_k, categories=categories, head_keys=head_keys)
        rows = combine_targets(components, heads, combine)
        acts = [cap.activations[n] for n in names]
        with torch.enable_grad(), autocast(x.device, layout.precision):  # score fns must record a graph
            scores = target_scores(rows, heads, output)
        check_scores(scores, rows)
        grads = None
        if meth.needs_grads:
            cast = as_float if differentiable else to_float32
            grads = dict(zip(names, (cast(g) for g in bk.target_gradients(
                scores, acts, names, [t.label for t in rows[0]], create_graph=differentiable))))
    scores = as_float(scores) if differentiable else to_float32(scores.detach())

    def score_image(out: Any, b: int) -> Tensor:  # scores (N, T) of image b's targets on N outputs
        hs = split_outputs(out)
        return torch.stack([tg.score(hs, out) for tg in rows[b]], dim=1)

    acts_f = {n: as_float(a) if differentiable else to_float32(a.detach()) for n, a in zip(names, acts)}

    def linear_head(layer: str, head: Any) -> Tensor:  # the dense layer's weight (K, C) for GAP(layer) -> head
        return bk.linear_head(cap, heads[head], acts_f[layer], layer, net, str(head))

    ctx = MethodContext(inputs=x.detach(), layers=names, modules=dict(layers), acts=acts_f, grads=grads, scores=scores,
                        targets=rows, runner=bk.runner(net, score_image, layout),
                        score_all=lambda out: target_scores(rows, split_outputs(out), out), options=opts,
                        xp=bk.xp, ops=bk.ops, heads=heads,
                        linear_head=linear_head if meth.needs_linear_head else None)
    with torch.enable_grad() if differentiable else torch.no_grad():
        result = meth.compute(ctx)
    if not result.raws and result.saliency is None:
        raise RuntimeError(f"method {meth.name!r} returned no maps")
    for key, m in [*(result.raws or {}).items(), ("saliency", result.saliency)]:
        if m is not None and m.shape[0] != x.shape[0]:  # never maps for proposals/windows instead of images
            raise RuntimeError(f"method {meth.name!r} returned maps {tuple(m.shape)} for {key!r}, but the input "
                               f"has a batch of {x.shape[0]}: its leading dimension must be the batch")
    return Pass(result, scores, rows, heads, components)


def finish(result: MethodOutput, size: Optional[tuple[int, int]], relu: bool, fuse: str) -> Tensor:
    """Method output -> maps ``(B, T, H, W)`` in [0, 1], without a graph."""
    parts = [*(result.raws or {}).values(), result.saliency]
    if not any(t is not None and t.requires_grad for t in parts):  # nothing to record: skip the grad-mode switch
        return finish_maps(result, size, relu, fuse)
    with torch.no_grad():
        return finish_maps(result, size, relu, fuse)


def finish_maps(result: MethodOutput, size: Optional[tuple[int, int]], relu: bool, fuse: str) -> Tensor:
    """:func:`finish` in the caller's grad mode (differentiable maps keep their graph)."""
    if result.raws:
        return process(list(result.raws.values()), size, use_relu=relu, fuse_how=fuse)  # type: ignore[arg-type]
    sal = result.saliency.float()  # type: ignore[union-attr]
    return normalize(clip_quantile(sal.clamp_min(0) if relu else sal, result.clip))


def noise_smoothed(net: nn.Module, x: Tensor, p: Pass, layers: list, meth: Method, opts: dict, n: int,
                    sigma: float, seed: int, layout: Optional[Layout] = None, span: Optional[Tensor] = None,
                    gen: Optional[torch.Generator] = None) -> MethodOutput:
    """SmoothGrad-style: the method's raw output averaged over ``n`` noisy copies of each image.

    Noise ``N(0, (sigma * (max x_b - min x_b))^2)`` per image; the n*B copies run as one batch
    (one forward, one batched backward) with the targets resolved on the clean images. Tiling gives
    each tile its whole image's ``span`` ``(B, 1, 1, 1)`` and one generator ``gen`` for all tiles.
    """
    B = x.shape[0]
    gen = gen if gen is not None else torch.Generator(device=x.device).manual_seed(seed)
    if span is None:
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(B, 1, 1, 1)
    noisy = x.repeat(n, 1, 1, 1)  # copy i of image b at index i * B + b
    noisy = noisy + torch.randn(noisy.shape, generator=gen, device=x.device, dtype=x.dtype) * (sigma * span).repeat(n, 1, 1, 1)
    q = run_pass(net, noisy, p.rows * n, layers, meth, opts, None, None, layout=layout).result

    def avg(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.reshape(n, B, *t.shape[1:]).mean(0)

    return MethodOutput(raws={k: avg(v) for k, v in q.raws.items()} if q.raws else None,  # type: ignore[misc]
                        saliency=avg(q.saliency), pixel=avg(q.pixel), clip=q.clip)


AUG_SCALES = (1.0, 1.1, 0.9)


def aug_smoothed(net: nn.Module, x: Tensor, p: Pass, layers: list, meth: Method, opts: dict, maps: Tensor,
                  size: Optional[tuple[int, int]], relu: bool, fuse: str, layout: Optional[Layout] = None,
                  maps_of: Optional[Any] = None) -> Tensor:
    """Test-time augmentation: maps of horizontally flipped and rescaled (x1.1, x0.9) inputs, each
    mapped back in place (resized back, flipped back), averaged with the plain maps and min-maxed.

    ``maps_of(xa) -> (B, T, h, w)`` computes the maps of an augmented batch (default: one pass and
    :func:`finish`; tiling passes its own tiled explanation, so the two compose)."""
    H, W = maps.shape[-2:]
    total = maps.clone()
    count = 1
    for flip in (False, True):
        for scale in AUG_SCALES:
            if not flip and scale == 1.0:
                continue
            xa = torch.flip(x, dims=(-1,)) if flip else x
            if scale != 1.0:
                hw = (max(8, round(x.shape[-2] * scale)), max(8, round(x.shape[-1] * scale)))
                xa = F.interpolate(xa, size=hw, mode="bilinear", align_corners=False)
            if maps_of is not None:
                m = maps_of(xa)
            else:
                q = run_pass(net, xa, p.rows, layers, meth, opts, None, None, layout=layout).result
                m = finish(q, tuple(xa.shape[-2:]) if size is not None else None, relu, fuse)
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False) if m.shape[-2:] != (H, W) else m
            total += torch.flip(m, dims=(-1,)) if flip else m
            count += 1
    return normalize(total / count, warn=False)
