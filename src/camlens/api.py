"""The one call most users need: :func:`explain`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.torch import (LayerSpec, Layout, Runner, autocast, capture, check_calls, check_layer_outputs,
                             guess_layer, layer_gradients, model_device, model_state, resolve_layers)
from .errors import (ConfigError, ConfigTypeError, InputError, InputTypeError, ModelRuntimeError, NonFiniteScoresError,
                     TargetError)
from .explanation import Explanation
from .methods import Method, MethodContext, MethodOutput, get_method
from .methods.cam import CAM
from .postprocess import _float, clip_quantile, normalize, process
from .targets import (Categories, ResolvedTarget, combine_targets, resolve_targets, split_outputs,
                      target_probabilities)

__all__ = ["explain"]


def _unwrap(model: Any, inputs: Any, layer: Any, categories: Categories):
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
    finite = torch.isfinite(inputs.flatten(1)).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise InputError(f"inputs contain NaN/Inf in image(s) {bad}: their maps and scores would be NaN; fix or "
                         "drop those images (e.g. torch.nan_to_num) before explaining")
    return model, inputs, layer, categories, display


def _outside_inference_mode(fn: Any) -> Any:
    """Run ``fn`` with inference mode off: under ``torch.inference_mode()`` no graph can be recorded,
    so gradient methods would fail (inference tensors among the inputs are cloned by :func:`_unwrap`)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


def _check_model_tensors(net: nn.Module) -> None:
    """A model whose weights were made under ``torch.inference_mode()`` cannot be differentiated."""
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if t.is_inference():
            raise ModelRuntimeError(f"the model's tensor {name!r} is an inference tensor (the model was created or loaded "
                               "under torch.inference_mode()), so no gradients can flow through it; create / load the "
                               "model outside inference mode, or clone its state: "
                               "model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})")


def _match_dtype(net: nn.Module, x: Tensor, precision: str) -> Tensor:
    """Inputs on the model's device, in the dtype of its floating-point parameters (e.g. float64
    images for a float32 model, float32 for a ``.half()`` one). Under fp16/bf16 autocast the
    input is left to autocast (float64 becomes float32)."""
    dev = model_device(net)
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if dtype is None or x.dtype == dtype:
        return x.to(dev)
    if precision == "fp32":
        return x.to(dev, dtype)
    return x.to(dev, torch.float32) if x.dtype == torch.float64 else x.to(dev)


def _check_differentiable(meth: Method, tile: Any, aug_smooth: bool, noise_smooth: int) -> None:
    """``differentiable=True`` needs a method whose maths is differentiable, and no wrappers yet."""
    if not meth.differentiable:
        from .methods import available_methods

        ok = [n for n, m in available_methods().items() if m.differentiable]
        raise ConfigError(f"method {meth.name!r} cannot return differentiable maps (its maps come from "
                          f"{'perturbed forwards without a graph' if not meth.needs_grads else 'steps without a stable gradient'}); "
                          f"differentiable=True works with: {', '.join(ok)}")
    unsupported = [n for n, on in (("tile=", tile is not None), ("aug_smooth=True", aug_smooth),
                                   ("noise_smooth=", bool(noise_smooth))) if on]
    if unsupported:
        raise ConfigError(f"differentiable=True does not combine with {', '.join(unsupported)} yet; "
                          "drop them for the training loss (they matter for pictures, not for gradients)")


def _check_scores(scores: Tensor, rows: list[list[ResolvedTarget]]) -> None:
    """The model's scores for finite inputs must be finite: name the images and targets that are not."""
    bad = ~torch.isfinite(scores.detach())
    if bool(bad.any()):
        where = bad.nonzero().tolist()
        items = ", ".join(f"image {b} target {rows[b][t].label!r}" for b, t in where[:8])
        more = f" and {len(where) - 8} more" if len(where) > 8 else ""
        raise NonFiniteScoresError(f"the model returned NaN/Inf scores for finite inputs: {items}{more}; the model "
                                 "itself produces non-finite outputs (check its weights with torch.isfinite and its "
                                 "numerics, e.g. precision=), so no map can be computed")


def _class_scores(rows: list[list[ResolvedTarget]], heads: dict) -> Optional[Tensor]:
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
    out = None
    for k, cls in idx.items():
        c = torch.tensor(cls, device=heads[k].device)
        s = heads[k].gather(1, c.clamp_min(0))
        out = s if len(idx) == 1 else torch.where(c >= 0, s, 0 if out is None else out)
    return out


def _scores(rows: list[list[ResolvedTarget]], heads: dict, output: Any) -> Tensor:
    """Scores ``(B, T)``: ``S[b, t]`` is target ``rows[b][t]`` evaluated on image ``b``."""
    fast = _class_scores(rows, heads)
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


@_outside_inference_mode
def explain(model: Any, inputs: Any, targets: Any = None, *, layer: Union[LayerSpec, Sequence[LayerSpec], None] = None,
            method: str = "gradcam", top_k: Optional[int] = None, categories: Categories = None, heads: Any = None,
            fuse: Literal["mean", "max"] = "mean", relu: bool = True, upsample: bool = True,
            eval_mode: Optional[bool] = None, combine: str = "separate", aug_smooth: bool = False,
            noise_smooth: int = 0, noise_sigma: float = 0.15, seed: int = 0, precision: str = "fp32",
            channels_last: Optional[bool] = None, tile: Optional[Union[int, tuple[int, int]]] = None,
            overlap: int = 32, tile_batch: int = 4, differentiable: bool = False, **options: Any) -> Explanation:
    """Explain T targets of each of B images: maps ``(B, T, H, W)`` in [0, 1].

    Args:
        model: an ``nn.Module`` (any output structure: tensor, tuple, list, dict, namedtuple,
            dataclass) or a :class:`camlens.models.LoadedModel`, which also preprocesses images
            and supplies the default layer and class names.
        inputs: ``(B, 3, H, W)`` or ``(3, H, W)`` float tensor, preprocessed as the model expects
            (moved to the model's device and cast to its parameters' dtype, e.g. float64 -> float32);
            with a LoadedModel also images / paths / uint8 ``(B, 3, H, W)`` tensors, which it
            preprocesses. Integer tensors for a plain module, and NaN/Inf pixels, are errors naming
            the cause (and the images). Inference tensors and ``torch.inference_mode()`` around the
            call are fine: camlens runs with inference mode off and clones such inputs.
        targets: an int, ``"head:class"``, ``(head, class)``, :class:`camlens.Target`, callable
            ``output -> (B,)``, a flat list of these (same targets for every image), a list of B
            lists (per image), or ``"all"`` / ``"head:all"`` (every class of the first
            classification head / of that head). A tensor or NumPy array of class indices: 0-D
            (or ``np.int64``) one class for every image; 1-D ``(B,)`` ONE CLASS PER IMAGE (unlike a
            flat list: ``targets=[3, 5]`` is classes 3 and 5 of every image, ``torch.tensor([3, 5])``
            class 3 of image 0 and class 5 of image 1); 2-D ``(B, T)`` T classes per image.
            ``None``: the top class of every classification head (or ``top_k``); see ``heads``.
        layer: dotted name(s) or module(s); several layers are fused by ``fuse``. ``None``:
            the last spatial layer of the forward pass. Ignored by input-space methods.
        method: a registered method name (``camlens.methods.available_methods()``).
        top_k: explain each classification head's K highest-scoring classes.
        categories: class names, a list (first head) or ``{head: list}``.
        heads: which outputs are classification heads when camlens picks the classes
            (``targets=None``, ``top_k``, ``"all"``): an output key / position or a list of them,
            e.g. ``heads=["shape", "colour"]`` or ``heads=[0]``; each must be ``(B, K)``. Explicit
            targets are not affected. ``None``, the default rule: only ``(B, K)`` float outputs
            with ``K >= 2`` qualify; of POSITIONAL outputs (a tensor, tuple, list) only the first
            such one, so ``(logits, features)`` explains the logits alone; of NAMED outputs (dict,
            namedtuple, dataclass, ``ModelOutput``) every such one except names with a feature
            token (``feat(ure)s``, ``emb(ed)(ding)s``, ``hidden``, ``pooled``/``pooler``, ``latent``,
            ``repr``, ...: :data:`camlens.targets.FEATURE_NAMES`).
        relu: apply ReLU to the raw maps (``False`` keeps negative evidence before min-max).
        upsample: resize maps to the input size (``False``: the layer's own size).
        eval_mode: run the model in eval mode (restored afterwards); ``None`` (default): ``True``,
            or ``False`` with ``differentiable=True``. ``False`` runs it in the mode it is in;
            buffers a training-mode forward updates (BatchNorm running statistics,
            ``num_batches_tracked``) are restored afterwards too (not with ``differentiable``).
        combine: ``"separate"`` (one map per target), or fold each image's targets into ONE map:
            ``"mean"`` (gradients averaged over the outputs), ``"confidence"`` (each output's
            gradients weighted by its softmax confidence for its target, then averaged), ``"sum"``.
            ``exp.components`` keeps the targets that were combined.
        aug_smooth: average the maps of flipped and rescaled inputs, each mapped back in place.
        noise_smooth: if > 0, SmoothGrad-style: average the method's raw output over this many
            noisy copies (noise std ``noise_sigma`` x the image's value range; ``seed`` fixes it).
        precision: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``: the model's forwards run under
            ``torch.autocast`` with that dtype (backward follows it); activations, gradients and
            all of camlens' maths are then taken in fp32. Fast on GPUs; on CPUs without bf16/fp16
            units it is slower. Maps match fp32 within ~1e-2 (see README "Performance").
        channels_last: input memory layout for the model's forwards. ``None`` (auto): NHWC for
            batches of 2+ images on conv models on CPU, or on CUDA with fp16/bf16 (faster there);
            ``True``/``False`` force it. The model's weights are never converted.
        tile: explain large images tile by tile with bounded peak memory: an int or ``(th, tw)``.
            Equal tiles overlapping by ``overlap`` pixels cover the image (the last ones end at the
            edge); each tile's maps are computed as untiled, ReLU'd, upsampled to the tile, and
            blended into full-size maps with weights that ramp linearly over the overlap
            (:mod:`camlens.tiling`). ``targets=None`` / ``top_k`` pick classes from the mean over
            tiles of each output; ``scores`` are the MEAN of the tile scores. Not combinable with
            ``upsample=False``, ``combine``, ``aug_smooth`` or ``noise_smooth``. ``None``: no tiling.
        overlap: with ``tile``: pixels shared by neighbouring tiles, ``0 <= overlap < tile``
            (more overlap: smoother blends, more tiles).
        tile_batch: with ``tile``: tiles per forward/backward pass (peak memory grows with it).
        differentiable: return maps that carry the autograd graph back to the model's parameters
            and the input (for CAM losses in training): the whole forward records a graph, the
            gradients are taken with ``create_graph=True``, nothing is detached, and the model runs
            in its own mode with its own ``requires_grad`` (nothing frozen). ``exp.maps``,
            ``exp.raws``, ``exp.scores`` and ``exp.heads`` then keep their graphs, so one forward
            gives both a classification loss (from ``exp.heads``) and a map loss. As in any
            forward of a training step, BatchNorm statistics of a training-mode model update once
            (they are not restored). Parameter ``.grad`` is still untouched (``autograd.grad``).
            Methods: those whose maths is differentiable (``Method.differentiable``: the Grad-CAM
            family but Eigen-Grad-CAM); not with ``tile``, ``aug_smooth`` or ``noise_smooth``.
        **options: the method's options (see ``camlens methods``), e.g. ``batch_size=`` for Score-CAM.

    One forward pass runs with the layers hooked; all T targets' gradients come from one batched
    backward. The model is left exactly as given: modes, ``requires_grad``, ``.grad``, buffers and
    hooks.
    """
    net, x, layer, categories, display = _unwrap(model, inputs, layer, categories)
    _check_model_tensors(net)
    meth = get_method(method)
    opts = meth.resolve_options(options)
    if differentiable:
        _check_differentiable(meth, tile, aug_smooth, noise_smooth)
    if eval_mode is None:
        eval_mode = not differentiable
    x = _match_dtype(net, x, precision)
    if tile is not None:  # large images: tile by tile with bounded memory (the layer is guessed on a tile)
        from .tiling import check_tiling, explain_tiled

        check_tiling(tile, overlap, tile_batch)
        with model_state(net, eval_mode=eval_mode):
            return explain_tiled(net, x, targets, layer=layer, meth=meth, opts=opts, categories=categories,
                                 top_k=top_k, fuse=fuse, relu=relu, upsample_maps=upsample, combine=combine,
                                 aug_smooth=aug_smooth, noise_smooth=noise_smooth, display=display, tile=tile,
                                 overlap=overlap, tile_batch=tile_batch, layout=Layout(net, channels_last, precision),
                                 head_keys=heads)
    if meth.needs_layer:
        layers = resolve_layers(net, layer if layer is not None else guess_layer(net, x))
    else:
        layers = []
    names = [n for n, _ in layers]
    size = tuple(x.shape[-2:])
    out_size = size if upsample else None

    with model_state(net, eval_mode=eval_mode, freeze=not differentiable, restore_buffers=not differentiable):
        layout = Layout(net, channels_last, precision)
        p = _compute(net, x, targets, layers, meth, opts, categories, top_k, combine, layout, head_keys=heads,
                     differentiable=differentiable)
        result = p.result
        if noise_smooth:
            result = _noise_smoothed(net, x, p, layers, meth, opts, noise_smooth, noise_sigma, seed, layout)
        maps = _finish_maps(result, out_size, relu, fuse) if differentiable else _finish(result, out_size, relu, fuse)
        if aug_smooth:
            maps = _aug_smoothed(net, x, p, layers, meth, opts, maps, out_size, relu, fuse, layout)
    raws = result.raws or {}
    detached = {k: v.detach() for k, v in p.heads.items()}
    first = next(iter(raws.values())) if raws else result.saliency
    return Explanation(maps=maps, raw=first, raws=dict(raws), scores=p.scores,
                       probs=target_probabilities(p.rows, detached), targets=p.rows,
                       inputs=x if differentiable else x.detach(), heads=p.heads if differentiable else detached,
                       layers=names, method=meth.name, display=display, pixel=result.pixel,
                       components=p.components if combine != "separate" else None, options=dict(opts))


@dataclass
class _Pass:
    """One engine pass: the method's output, the scores (B, T), the resolved targets, the heads."""

    result: MethodOutput
    scores: Tensor
    rows: list[list[ResolvedTarget]]
    heads: dict
    components: list[list[ResolvedTarget]]


def _compute(net: nn.Module, x: Tensor, targets: Any, layers: list, meth: Method, opts: dict,
             categories: Categories, top_k: Optional[int], combine: str = "separate",
             layout: Optional[Layout] = None, head_keys: Any = None, differentiable: bool = False) -> _Pass:
    """One forward with the layers hooked, the batched backward if needed, then the method's math.

    ``layout`` carries the precision and memory layout of every forward (default: fp32, auto);
    ``head_keys`` is ``explain(heads=...)``. ``differentiable``: the forward records its graph
    from the input, gradients keep theirs (``create_graph``) and nothing is detached.
    """
    names = [n for n, _ in layers]
    layout = layout if layout is not None else Layout(net)
    with capture(net, layers, grad=meth.needs_grads, linear=meth is CAM, full_graph=differentiable) as cap:
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            output = layout.run(x)
        check_calls(cap, layers)
        check_layer_outputs(cap, layers, net, x)  # one clear error for any method: (B, C, h, w) of this batch
        heads = split_outputs(output)
        components = resolve_targets(targets, heads, output, top_k=top_k, categories=categories, head_keys=head_keys)
        rows = combine_targets(components, heads, combine)
        acts = [cap.activations[n] for n in names]
        with torch.enable_grad(), autocast(x.device, layout.precision):  # score fns must record a graph
            scores = _scores(rows, heads, output)
        _check_scores(scores, rows)
        grads = None
        if meth.needs_grads:
            cast = _float if differentiable else Tensor.float
            grads = dict(zip(names, (cast(g) for g in layer_gradients(scores, acts, names, [t.label for t in rows[0]],
                                                                      create_graph=differentiable))))
    scores = _float(scores) if differentiable else scores.detach().float()

    def score_image(out: Any, b: int) -> Tensor:  # scores (N, T) of image b's targets on N outputs
        hs = split_outputs(out)
        return torch.stack([tg.score(hs, out) for tg in rows[b]], dim=1)

    ctx = MethodContext(inputs=x.detach(), layers=names, modules=dict(layers),
                        acts={n: _float(a) if differentiable else a.detach().float() for n, a in zip(names, acts)},
                        grads=grads, scores=scores,
                        targets=rows, runner=Runner(net, score_image, layout),
                        score_all=lambda out: _scores(rows, split_outputs(out), out), options=opts,
                        extra={"linear_io": cap.linear_io, "heads": heads, "model": net})
    with torch.enable_grad() if differentiable else torch.no_grad():
        result = meth.compute(ctx)
    if not result.raws and result.saliency is None:
        raise RuntimeError(f"method {meth.name!r} returned no maps")
    for key, m in [*(result.raws or {}).items(), ("saliency", result.saliency)]:
        if m is not None and m.shape[0] != x.shape[0]:  # never maps for proposals/windows instead of images
            raise RuntimeError(f"method {meth.name!r} returned maps {tuple(m.shape)} for {key!r}, but the input "
                               f"has a batch of {x.shape[0]}: its leading dimension must be the batch")
    return _Pass(result, scores, rows, heads, components)


@torch.no_grad()
def _finish(result: MethodOutput, size: Optional[tuple[int, int]], relu: bool, fuse: str) -> Tensor:
    """Method output -> maps ``(B, T, H, W)`` in [0, 1]."""
    return _finish_maps(result, size, relu, fuse)


def _finish_maps(result: MethodOutput, size: Optional[tuple[int, int]], relu: bool, fuse: str) -> Tensor:
    """:func:`_finish` in the caller's grad mode (differentiable maps keep their graph)."""
    if result.raws:
        return process(list(result.raws.values()), size, use_relu=relu, fuse_how=fuse)  # type: ignore[arg-type]
    sal = result.saliency.float()  # type: ignore[union-attr]
    return normalize(clip_quantile(sal.clamp_min(0) if relu else sal, result.clip))


def _noise_smoothed(net: nn.Module, x: Tensor, p: _Pass, layers: list, meth: Method, opts: dict, n: int,
                    sigma: float, seed: int, layout: Optional[Layout] = None) -> MethodOutput:
    """SmoothGrad-style: the method's raw output averaged over ``n`` noisy copies of each image.

    Noise ``N(0, (sigma * (max x_b - min x_b))^2)`` per image; the n*B copies run as one batch
    (one forward, one batched backward) with the targets resolved on the clean images.
    """
    B = x.shape[0]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(B, 1, 1, 1)
    noisy = x.repeat(n, 1, 1, 1)  # copy i of image b at index i * B + b
    noisy = noisy + torch.randn(noisy.shape, generator=gen, device=x.device, dtype=x.dtype) * (sigma * span).repeat(n, 1, 1, 1)
    q = _compute(net, noisy, p.rows * n, layers, meth, opts, None, None, layout=layout).result

    def avg(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.reshape(n, B, *t.shape[1:]).mean(0)

    return MethodOutput(raws={k: avg(v) for k, v in q.raws.items()} if q.raws else None,  # type: ignore[misc]
                        saliency=avg(q.saliency), pixel=avg(q.pixel), clip=q.clip)


AUG_SCALES = (1.0, 1.1, 0.9)


def _aug_smoothed(net: nn.Module, x: Tensor, p: _Pass, layers: list, meth: Method, opts: dict, maps: Tensor,
                  size: Optional[tuple[int, int]], relu: bool, fuse: str, layout: Optional[Layout] = None) -> Tensor:
    """Test-time augmentation: maps of horizontally flipped and rescaled (x1.1, x0.9) inputs, each
    mapped back in place (resized back, flipped back), averaged with the plain maps and min-maxed."""
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
            q = _compute(net, xa, p.rows, layers, meth, opts, None, None, layout=layout).result
            m = _finish(q, tuple(xa.shape[-2:]) if size is not None else None, relu, fuse)
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False) if m.shape[-2:] != (H, W) else m
            total += torch.flip(m, dims=(-1,)) if flip else m
            count += 1
    return normalize(total / count, warn=False)
