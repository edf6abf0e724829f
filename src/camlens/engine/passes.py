"""One engine pass: capture → targets → scores → gradients → method (:func:`run_pass`), and what a
call does before it (:func:`prepare`, :func:`match_dtype`). Post-processing is :mod:`.finish`, the
wrappers around a pass (noise smoothing, test-time augmentation) :mod:`.wrappers`, tiling
:mod:`.tiling`. Nothing here knows a method by name — a method declares what it needs
(``needs_grads``, ``needs_layer``, ``needs_linear_head``, ``differentiable``) and gets exactly that.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional


from ..backends.base import Backend, get_backend, namespace, ops_for
from ..core.errors import CamlensError, InputError, ModelError, NonFiniteScoresError, TargetError
from ..core.activations import model_activation
from ..core.layouts import from_map, to_map
from ..core.explanation import Deferred, Explanation
from ..core.postprocess import as_float, to_float32
from ..core.targets import (Categories, ResolvedTarget, combine_targets, is_framework_array, resolve_targets,
                           split_outputs, target_probabilities)
from ..methods import Method, MethodContext, MethodOutput

Tensor = Any  # an array of the model's backend

__all__ = ["is_loaded", "unwrap_model", "prepare", "check_method", "outside_inference_mode", "match_dtype",
           "check_scores", "class_scores", "target_scores", "Pass", "run_pass", "pass_explanation"]


def is_loaded(model: Any) -> bool:
    """A :class:`camlens.models.LoadedModel`-like wrapper (a model plus its preprocessing)."""
    # a framework model first: its own attributes answer at once (a missing one raises inside the framework)
    return not hasattr(model, "named_modules") and hasattr(model, "model") and hasattr(model, "preprocess")


def prepare(model: Any, inputs: Any, layer: Any, categories: Categories):
    """Accept a :class:`camlens.models.LoadedModel`: preprocess images, default layer and class names.

    Also checks the input array (through the model's backend): floating point (a uint8 tensor given
    with a LoadedModel is preprocessed as images), finite, not an inference tensor (copied), shape
    ``(B, C, H, W)`` or ``(B, C, D, H, W)`` (volumes). Returns ``(model, inputs, layer, categories, display)``.
    """
    display = None
    if is_loaded(model):
        inputs = get_backend(model.model).images_in(inputs)
        if not is_framework_array(inputs):  # paths, PIL / NumPy images, lists: preprocessed
            inputs = model.preprocess(inputs)
            display = model.to_display(inputs) if hasattr(model, "to_display") else None
        layer = layer if layer is not None else getattr(model, "default_layer", None)
        categories = categories if categories is not None else getattr(model, "categories", None)
        model = model.model
    bk = get_backend(model)
    inputs = bk.check_inputs(inputs)
    if inputs.ndim == 3:
        inputs = inputs[None]
        if display is not None and display.ndim == 3:
            display = display[None]
    elif inputs.ndim == 4 and display is None and getattr(bk, "input_rank", _no_rank)(model) == 5:
        inputs = inputs[None]  # one volume (C, D, H, W) for a 3-D model
    if inputs.ndim != 4 and inputs.ndim != 5:
        raise InputError(f"inputs must have shape (B, C, H, W) (images) or (B, C, D, H, W) (volumes, video clips), "
                         f"got {tuple(inputs.shape)}")
    adopt = getattr(bk, "adopt", None)  # (optional: a black-box callable wrapped with its inputs' layout)
    if adopt is not None:
        model = adopt(model, inputs)
    # NaN/Inf make the sum non-finite (one cheap reduction); only then (or on overflow) the full test
    xp, ops = namespace(inputs), ops_for(inputs)
    if not math.isfinite(float(xp.sum(ops.detach(inputs)))):
        finite = xp.all(xp.reshape(xp.isfinite(inputs), (inputs.shape[0], -1)), axis=1)
        bad = [b for b, ok in enumerate(ops.to_list(finite)) if not ok]
        if bad:
            raise InputError(f"inputs contain NaN/Inf in image(s) {bad}: their maps and scores would be NaN; fix or "
                             "drop those images (e.g. torch.nan_to_num) before explaining")
    return model, inputs, layer, categories, display


def check_method(bk: Backend, meth: Method) -> None:
    """Refuse, before any work, a method the model's backend cannot serve: a black-box backend
    (``score_only``: a callable, NumPy in, scores out) serves only methods that score perturbed
    inputs (:attr:`camlens.methods.Method.score_only`); the error lists them."""
    if not getattr(bk, "score_only", False) or meth.score_only:
        return
    from ..methods import available_methods

    needs = [w for w, on in (("a layer's activations", meth.needs_layer), ("gradients", meth.needs_grads),
                             ("the linear head", meth.needs_linear_head), ("attention", meth.needs_attention),
                             ("input gradients", meth.needs_input_grads)) if on]
    ok = sorted(n for n, m in available_methods().items() if m.score_only)
    raise ModelError(f"method {meth.name!r} needs {' and '.join(needs)}, but the model is a black-box callable "
                     f"(NumPy images in, scores out) that camlens can only run forward. Methods that explain it: "
                     f"{', '.join(ok)}; for {meth.name!r}, pass the framework model itself (an nn.Module or "
                     "keras.Model)")


def _no_rank(model: Any) -> None:
    """A backend without ``input_rank``: inputs are read by their own rank."""
    return None


def unwrap_model(model: Any) -> Any:
    """The framework model inside a loaded model (:func:`is_loaded`), or ``model`` itself."""
    return model.model if is_loaded(model) else model


def outside_inference_mode(fn: Any) -> Any:
    """Run ``fn`` (whose first argument is the model) in the framework modes a call needs, and name
    the cause of a framework failure when its backend can (:meth:`Backend.explain_failure`; only on
    the error path, no per-call cost). For torch: inference mode off — under
    ``torch.inference_mode()`` no graph can be recorded, so gradient methods would fail (inference
    tensors among the inputs are copied by :func:`prepare`) — and a model whose weights are
    inference tensors ("Inference tensors cannot be saved for backward") gets a message naming the
    tensor and the fix."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bk = get_backend(unwrap_model(args[0] if args else kwargs.get("model")))
        except CamlensError:  # not a model camlens knows: fn itself raises the clear error
            return fn(*args, **kwargs)
        with bk.call_context():
            try:
                return fn(*args, **kwargs)
            except RuntimeError as err:
                bk.explain_failure(err, unwrap_model(args[0] if args else kwargs.get("model")))
                raise
    return wrapper


def match_dtype(net: Any, x: Tensor, precision: str) -> Tensor:
    """Inputs on the model's device, in the dtype of its floating-point weights (e.g. float64
    images for a float32 model, float32 for a ``.half()`` one). Under fp16/bf16 autocast the
    input is left to autocast (float64 becomes float32)."""
    return get_backend(net).to_model_input(net, x, precision)


def check_scores(scores: Tensor, rows: list[list[ResolvedTarget]]) -> None:
    """The model's scores for finite inputs must be finite: name the images and targets that are not."""
    ops = ops_for(scores)
    if math.prod(scores.shape) <= 256 and all(map(math.isfinite, ops.to_list(scores))):
        return  # a few scores: one copy to the host (on a GPU the same one sync as .any())
    xp = namespace(scores)
    bad = ~xp.isfinite(ops.detach(scores))
    if bool(xp.any(bad)):
        T = scores.shape[1]
        where = [(i // T, i % T) for i, v in enumerate(ops.to_list(bad)) if v]
        items = ", ".join(f"image {b} target {rows[b][t].label!r}" for b, t in where[:8])
        more = f" and {len(where) - 8} more" if len(where) > 8 else ""
        raise NonFiniteScoresError(f"the model returned NaN/Inf scores for finite inputs: {items}{more}; the model "
                                 "itself produces non-finite outputs (check its weights with torch.isfinite and its "
                                 "numerics, e.g. precision=), so no map can be computed")


def class_scores(rows: list[list[ResolvedTarget]], heads: dict) -> Optional[Tensor]:
    """The scores ``(B, T)`` by one gather per head when every target is a class of a ``(B, K)``
    head (e.g. all 1000 classes), negated when every target has ``sign=-1``; ``None`` when any
    target is something else (or the signs are mixed)."""
    B = len(rows)
    row0 = rows[0]
    if len(row0) == 1 and all(r is row0 or r == row0 for r in rows):  # one target for every image
        tg = row0[0]
        h = heads.get(tg.head) if tg.fn is None else None
        if h is not None and tg.cls is not None and h.ndim == 2 and h.shape[0] == B and 0 <= tg.cls < h.shape[1]:
            return -h[:, tg.cls:tg.cls + 1] if tg.sign == -1 else h[:, tg.cls:tg.cls + 1]  # a view (+1)
        return None
    idx: dict[Any, list[list[int]]] = {}
    signs = set()
    for b, row in enumerate(rows):
        for t, tg in enumerate(row):
            h = heads.get(tg.head) if tg.fn is None else None
            if h is None or tg.cls is None or h.ndim != 2 or h.shape[0] != B or not 0 <= tg.cls < h.shape[1]:
                return None
            idx.setdefault(tg.head, [[-1] * len(row) for _ in range(B)])[b][t] = tg.cls
            signs.add(tg.sign)
    if len(signs) > 1:
        return None
    neg = signs == {-1}
    first = heads[next(iter(idx))]
    xp, ops = namespace(first), ops_for(first)
    if len(idx) == 1:  # one head: every index is valid, one gather
        k, cls = next(iter(idx.items()))
        if len(cls[0]) == 1 and all(c == cls[0] for c in cls):  # one class for every image: a view
            out = heads[k][:, cls[0][0]:cls[0][0] + 1]
        else:
            out = xp.take_along_axis(heads[k], ops.asarray(cls, like=heads[k]), axis=1)
        return -out if neg else out
    out = None
    for k, cls in idx.items():
        c = ops.asarray(cls, like=heads[k])
        s = xp.take_along_axis(heads[k], xp.clip(c, min=0), axis=1)
        out = xp.where(c >= 0, s, xp.zeros_like(s) if out is None else out)
    return -out if neg else out


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
            s = namespace(*parts).stack(parts)
        if s.shape[0] != B:
            raise TargetError(f"target {col[0].label!r} gave {s.shape[0]} scores for a batch of {B}")
        cols.append(s)
    return namespace(*cols).stack(cols, axis=1)


def _each(fn: Any, a: Any) -> Any:
    """``fn`` of an array, or of each value of a dict of arrays (a layer whose output is a dict, e.g.
    an FPN's levels, read by a ``reshape=`` function)."""
    return {k: fn(v) for k, v in a.items()} if isinstance(a, dict) else fn(a)


@dataclass
class Pass:
    """One engine pass: the method's output, the scores (B, T), the resolved targets, the heads,
    and how each layer not in ``(B, C, h, w)`` was read (layer name -> :class:`MapLayout`)."""

    result: MethodOutput
    scores: Tensor
    rows: list[list[ResolvedTarget]]
    heads: dict
    components: list[list[ResolvedTarget]]
    layouts: Optional[dict] = None


def run_pass(net: Any, x: Tensor, targets: Any, layers: list, meth: Method, opts: dict,
             categories: Categories, top_k: Optional[int], combine: str = "separate",
             layout: Optional[Any] = None, head_keys: Any = None, differentiable: bool = False,
             backend: Optional[Backend] = None, read: Optional[dict] = None, sign: int = 1,
             activation: Any = None) -> Pass:
    """One forward with the layers hooked, the batched backward if needed, then the method's math.

    Everything framework-specific goes through ``backend`` (default: the model's, from
    :func:`camlens.backends.base.get_backend`); the method gets what it declares
    (``needs_grads``, ``needs_linear_head``). ``layout`` carries the precision and memory layout of
    every forward (default: fp32, auto); ``head_keys`` is ``explain(heads=...)``.
    ``differentiable``: the forward records its graph from the input, gradients keep theirs
    (``create_graph``) and nothing is detached. ``read``: layer name -> how to read its output
    (``explain(layout=..., reshape=...)``, :func:`camlens.core.layouts.layer_reads`). ``sign`` /
    ``activation``: as :func:`camlens.explain`'s (the activation the model documents when ``None``:
    :func:`~camlens.core.activations.model_activation`).
    """
    bk = backend if backend is not None else get_backend(net)
    names = [n for n, _ in layers]
    layout = layout if layout is not None else bk.layout(net, None, "fp32")
    attn = {"attention": True} if meth.needs_attention else {}  # (backends without it need not take the keyword)
    with bk.capture(net, layers, grad=meth.needs_grads, linear=meth.needs_linear_head,
                    full_graph=differentiable, **attn) as cap:
        with contextlib.nullcontext() if differentiable else bk.graph(False):
            output = layout.run(x)
        bk.check_capture(cap, layers, net, x, read)  # one clear error for any method: (B, C, h, w) of this batch
        heads = split_outputs(output)
        components = resolve_targets(targets, heads, output, top_k=top_k, categories=categories, head_keys=head_keys,
                                     sign=sign, activation=model_activation(net, activation),
                                     input_size=tuple(x.shape[2:]))
        rows = combine_targets(components, heads, combine)
        acts = [cap.activations[n] for n in names]
        att = list(cap.attentions) if attn else []  # (B, heads, N, N) per attention call
        with bk.graph(True), layout.autocast(x):  # score fns must record a graph
            scores = target_scores(rows, heads, output)
        check_scores(scores, rows)
        grads, att_grads = None, None
        cast = as_float if differentiable else to_float32
        if meth.needs_grads:
            gs = [_each(cast, g) for g in bk.target_gradients(scores, acts + att, names + [f"attention call {i}" for i
                  in range(len(att))], [t.label for t in rows[0]], create_graph=differentiable, targets=rows)]
            grads, att_grads = dict(zip(names, gs)), gs[len(names):] if attn else None
    scores = as_float(scores) if differentiable else to_float32(bk.ops.detach(scores))

    def score_image(out: Any, b: int) -> Tensor:  # scores (N, T) of image b's targets on N outputs
        hs = split_outputs(out)
        cols = [tg.score(hs, out) for tg in rows[b]]
        return namespace(*cols).stack(cols, axis=1)

    acts_f = {n: _each(as_float if differentiable else lambda t: to_float32(bk.ops.detach(t)), a)
              for n, a in zip(names, acts)}
    layouts = getattr(cap, "layouts", None) or {}
    own = {n: acts_f[n] for n in layouts}  # the layer's own layout, for arrays fed back into it
    for n, lay in layouts.items():  # channels-last / token layers: read as (B, C, h, w), their gradients alike
        acts_f[n] = to_map(acts_f[n], lay)
        if grads is not None:
            grads[n] = to_map(grads[n], lay, lead=2)

    def to_layer(layer: str, maps: Tensor, b: int) -> Tensor:  # (k, C, h, w) read as maps -> the layer's layout
        lay = layouts.get(layer)
        return maps if lay is None else from_map(maps, lay, own[layer][b:b + 1])

    def linear_head(layer: str, head: Any) -> Tensor:  # the dense layer's weight (K, C) for GAP(layer) -> head
        return bk.linear_head(cap, heads[head], acts_f[layer], layer, net, str(head))

    ctx = MethodContext(inputs=bk.ops.detach(x), layers=names, modules=dict(layers), acts=acts_f, grads=grads, scores=scores,
                        targets=rows, runner=bk.runner(net, score_image, layout, targets=rows),
                        score_all=lambda out: target_scores(rows, split_outputs(out), out), options=opts,
                        xp=bk.xp, ops=bk.ops, heads=heads, layouts=dict(layouts), to_layer=to_layer,
                        linear_head=linear_head if meth.needs_linear_head else None,
                        attention=[cast(a if differentiable else bk.ops.detach(a)) for a in att] if attn else None,
                        attention_grads=att_grads, attention_layout=cap.attention_layout if attn else None)
    with bk.graph(differentiable):
        result = meth.compute(ctx)
    if not result.raws and result.saliency is None:
        raise RuntimeError(f"method {meth.name!r} returned no maps")
    for key, m in [*(result.raws or {}).items(), ("saliency", result.saliency)]:
        if m is not None and m.shape[0] != x.shape[0]:  # never maps for proposals/windows instead of images
            raise RuntimeError(f"method {meth.name!r} returned maps {tuple(m.shape)} for {key!r}, but the input "
                               f"has a batch of {x.shape[0]}: its leading dimension must be the batch")
    return Pass(result, scores, rows, heads, components, layouts)


def pass_explanation(p: Pass, maps: Tensor, raws: dict, x: Tensor, names: list, meth: Method, opts: dict,
                     display: Any, combine: str, differentiable: bool, bk: Backend, saliency: Optional[Tensor] = None,
                     pixel: Optional[Tensor] = None, extra: Optional[MethodOutput] = None) -> Explanation:
    """The :class:`~camlens.Explanation` of one pass with its finished ``maps`` and raw maps ``raws``
    (``exp.raw``: the first layer's, else ``saliency``), for images and volumes alike. Heads and
    inputs are detached unless ``differentiable``; ``probs`` are computed on first access. ``extra``: the
    method's output whose ``segments`` / ``weights`` the explanation keeps."""
    detach = bk.ops.detach
    detached = {k: detach(v) for k, v in p.heads.items()}
    first = next(iter(raws.values())) if raws else saliency
    return Explanation(maps=maps, raw=first, raws=dict(raws), scores=p.scores,
                       probs=Deferred(functools.partial(target_probabilities, p.rows, detached, like=p.scores)),
                       targets=p.rows, inputs=x if differentiable else detach(x),
                       heads=p.heads if differentiable else detached, layers=names, method=meth.name,
                       display=display, pixel=pixel, components=p.components if combine != "separate" else None,
                       options=dict(opts), segments=getattr(extra, "segments", None),
                       weights=getattr(extra, "weights", None))
