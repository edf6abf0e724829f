"""The one call most users need: :func:`explain` (built from :mod:`camlens.engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

from ..backends.base import get_backend
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.layouts import layer_reads
from ..core.targets import Categories
from ..methods import Method, get_method
from .finish import finish, finish_maps
from .passes import check_method, match_dtype, unwrap_model, outside_inference_mode, pass_explanation, prepare, run_pass
from .tiling import check_tiling, explain_tiled
from .volumes import explain_volume
from .wrappers import aug_smoothed, noise_smoothed

__all__ = ["explain", "layer_names"]


def layer_names(model: Any) -> list[str]:
    """The names ``explain(layer=...)`` takes for ``model`` (an ``nn.Module``, a Keras model or a
    :class:`camlens.models.LoadedModel`), in the model's own order: torch's dotted module names
    (``"layer4.1.conv2"``), Keras layer paths. Not every one holds a map (``explain`` says why when
    one does not); a loaded model's ``default_layer`` is among them."""
    net = unwrap_model(model)
    return list(get_backend(net).layer_names(net))


def _check_differentiable(meth: Method, tile: Any, aug_smooth: bool, noise_smooth: int) -> None:
    """``differentiable=True`` needs a method whose maths is differentiable, and no wrappers yet."""
    if not meth.differentiable:
        from ..methods import available_methods

        ok = [n for n, m in available_methods().items() if m.differentiable]
        raise ConfigError(f"method {meth.name!r} cannot return differentiable maps (its maps come from "
                          f"{'perturbed forwards without a graph' if not meth.needs_grads else 'steps without a stable gradient'}); "
                          f"differentiable=True works with: {', '.join(ok)}")
    unsupported = [n for n, on in (("tile=", tile is not None), ("aug_smooth=True", aug_smooth),
                                   ("noise_smooth=", bool(noise_smooth))) if on]
    if unsupported:
        raise ConfigError(f"differentiable=True does not combine with {', '.join(unsupported)} yet; "
                          "drop them for the training loss (they matter for pictures, not for gradients)")


@outside_inference_mode
def explain(model: Any, inputs: Any, targets: Any = None, *, layer: Union[Any, Sequence[Any], None] = None,
            method: str = "gradcam", top_k: Optional[int] = None, categories: Categories = None, heads: Any = None,
            fuse: Literal["mean", "max"] = "mean", relu: bool = True, upsample: bool = True,
            eval_mode: Optional[bool] = None, combine: str = "separate", aug_smooth: bool = False,
            noise_smooth: int = 0, noise_sigma: float = 0.15, seed: int = 0, precision: str = "fp32",
            channels_last: Optional[bool] = None, tile: Optional[Union[int, tuple[int, int]]] = None,
            overlap: int = 32, tile_batch: int = 4, differentiable: bool = False, layout: Any = None,
            reshape: Any = None, sign: int = 1, activation: Union[str, dict, None] = None,
            **options: Any) -> Explanation:
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
            Volumes / video clips ``(B, C, D, H, W)`` (or one ``(C, D, H, W)`` for a 3-D CNN) give
            maps ``(B, T, D, H, W)`` (trilinear upsampling, min-max per volume) for the methods
            listed by :func:`camlens.engine.volumes.volume_methods` (:mod:`camlens.engine.volumes`).
        targets: an int, ``"head:class"``, ``(head, class)``, :class:`camlens.Target`, callable
            ``output -> (B,)``, a flat list of these (same targets for every image), a list of B
            lists (per image), or ``"all"`` / ``"head:all"`` (every class of the first
            classification head / of that head). A tensor or NumPy array of class indices: 0-D
            (or ``np.int64``) one class for every image; 1-D ``(B,)`` ONE CLASS PER IMAGE (unlike a
            flat list: ``targets=[3, 5]`` is classes 3 and 5 of every image, ``torch.tensor([3, 5])``
            class 3 of image 0 and class 5 of image 1); 2-D ``(B, T)`` T classes per image.
            ``None``: the top class of every classification head (or ``top_k``); see ``heads``.
            ``camlens.Target.region(mask_or_box, cls=c)``: class c summed over a region of a
            segmentation output ``(B, K, h, w)`` (no mask: the pixels predicted as c).
            Object detectors (outputs: lists of per-image dicts of boxes / labels / scores):
            ``camlens.Target.box((x0, y0, x1, y1), cls=c)`` explains the detection matching a box,
            ``None`` each image's ``top_k`` best detections (:mod:`camlens.core.detection`); a
            callable always receives the raw output.
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
            noisy copies (noise std ``noise_sigma`` x the image's value range; ``seed`` fixes it;
            it is also the ``seed`` of methods that have one: lime, kernelshap, rise).
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
            tiles of each output; ``scores`` are the MEAN of the tile scores. Composes with ``combine``
            (confidence weights from the mean tile outputs), ``noise_smooth`` (per tile, noise scaled by
            the whole image's range) and ``aug_smooth`` (each augmented image is tiled); not with
            ``upsample=False``. ``None``: no tiling.
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
        layout: how to read the layer's output as a ``(B, C, h, w)`` map, where camlens' own reading
            (from the model, else from shapes) is not what you want: ``"nchw"`` (as is, even where it
            looks channels-last), ``"nhwc"``, ``"tokens"`` (prefix and grid found as usual), or
            ``camlens.MapLayout("tokens", grid=(h, w), prefix=P)``; a dict ``{layer: ...}`` per layer.
        reshape: a function ``a (B, ...) -> (B, C, h, w)`` applied to the layer's activations and,
            alike, to each target's gradients (so it must be linear: slices, reshapes, permutations);
            a pytorch-grad-cam ``reshape_transform`` works unchanged. A dict ``{layer: fn}`` per layer.
            A layer whose output is a dict of tensors (an FPN backbone's levels) is read by ``fn(dict)``
            (pytorch-grad-cam's ``fasterrcnn_reshape_transform``); each value's gradients come from the
            same batched backward (zeros for a value the targets do not read) and go through ``fn`` alike.
            Methods that feed maps back into the layer (Ablation-CAM) need ``layout=`` instead.
        sign: ``+1`` (default) explains an increase of each target's score S; ``-1`` a decrease
            (the score ``-S``: regression outputs, "what lowers this logit"), for every method and
            every target without a sign of its own (``camlens.Target(..., sign=...)``).
            ``exp.scores`` then holds ``-S`` (the maps explain exactly ``exp.scores``) and the
            labels end in ``" (decrease)"``.
        activation: how a head's logits become ``exp.probs`` and the ``combine="confidence"``
            weights: ``"softmax"`` (the default of ``(B, K)`` heads), ``"sigmoid"`` (multi-label
            heads: each class its own probability), ``"none"`` (no probabilities: NaN; the default
            of other heads), or ``{head: name}`` per head, e.g.
            ``{"attrs": "sigmoid", "species": "softmax"}``. ``None``: from the model's
            ``config.problem_type`` when it has one (HuggingFace: ``"multi_label_classification"``
            is sigmoid), else the defaults. It never changes the maps or the top-k classes.
        **options: the method's options (see ``camlens methods``), e.g. ``batch_size=`` for Score-CAM.

    One forward pass runs with the layers hooked; all T targets' gradients come from one batched
    backward. The model is left exactly as given: modes, ``requires_grad``, ``.grad``, buffers and
    hooks.
    """
    net, x, layer, categories, display = prepare(model, inputs, layer, categories)
    meth = get_method(method)
    if "seed" in meth.options:  # seeded methods (lime, kernelshap, rise) take explain's seed=
        options = {**options, "seed": seed}
    opts = meth.resolve_options(options)
    if differentiable:
        _check_differentiable(meth, tile, aug_smooth, noise_smooth)
    if eval_mode is None:
        eval_mode = not differentiable
    bk = get_backend(net)
    check_method(bk, meth)
    x = match_dtype(net, x, precision)
    if x.ndim == 5:  # volumes / clips (B, C, D, H, W)
        return explain_volume(net, x, targets, bk=bk, meth=meth, opts=opts, layer=layer, categories=categories,
                              top_k=top_k, fuse=fuse, relu=relu, upsample=upsample, eval_mode=eval_mode,
                              combine=combine, precision=precision, channels_last=channels_last, heads=heads,
                              sign=sign, activation=activation, display=display, differentiable=differentiable,
                              noise_smooth=noise_smooth, noise_sigma=noise_sigma, seed=seed, aug_smooth=aug_smooth,
                              layout=layout, reshape=reshape, **{"tile=": tile is not None})
    if tile is not None:  # large images: tile by tile with bounded memory (the layer is guessed on a tile)
        check_tiling(tile, overlap, tile_batch)
        with bk.session(net, eval_mode=eval_mode):
            return explain_tiled(net, x, targets, layer=layer, meth=meth, opts=opts, categories=categories,
                                 top_k=top_k, fuse=fuse, relu=relu, upsample_maps=upsample, combine=combine,
                                 aug_smooth=aug_smooth, noise_smooth=noise_smooth, display=display, tile=tile,
                                 overlap=overlap, tile_batch=tile_batch, layout=bk.layout(net, channels_last, precision),
                                 head_keys=heads, noise_sigma=noise_sigma, seed=seed, map_layout=layout,
                                 reshape=reshape, sign=sign, activation=activation)
    if meth.needs_layer:
        layers = bk.resolve_layers(net, layer if layer is not None else bk.default_layer(net, x))
    else:
        layers = []
    names = [n for n, _ in layers]
    read = layer_reads(layout, reshape, names)
    size = tuple(x.shape[-2:])
    out_size = size if upsample else None

    with bk.session(net, eval_mode=eval_mode, freeze=not differentiable, restore_buffers=not differentiable):
        fwd = bk.layout(net, channels_last, precision)
        p = run_pass(net, x, targets, layers, meth, opts, categories, top_k, combine, fwd, head_keys=heads,
                     differentiable=differentiable, backend=bk, read=read, sign=sign, activation=activation)
        result = p.result
        if noise_smooth:
            result = noise_smoothed(net, x, p, layers, meth, opts, noise_smooth, noise_sigma, seed, fwd, read=read)
        maps = finish_maps(result, out_size, relu, fuse) if differentiable else finish(result, out_size, relu, fuse)
        if aug_smooth:
            maps = aug_smoothed(net, x, p, layers, meth, opts, maps, out_size, relu, fuse, fwd, read=read)
    return pass_explanation(p, maps, result.raws or {}, x, names, meth, opts, display, combine, differentiable, bk,
                            saliency=result.saliency, pixel=result.pixel, extra=result)
