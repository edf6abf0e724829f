"""The method registry: a CAM method is a small piece of array maths on what the engine captures.

The engine (:mod:`camlens.engine`, through the model's backend, :mod:`camlens.backends`) runs one
forward with the method's layers hooked, computes the gradients of all T target scores when the
method declares ``needs_grads``, finds the linear head when it declares ``needs_linear_head``, and
hands the method a :class:`MethodContext`. The method returns a :class:`MethodOutput`;
post-processing (ReLU, upsampling, normalisation, layer fusion) is done by :mod:`camlens.postprocess`.

Adding a gradient method is one function ``(acts (B, C, h, w), grads (B, T, C, h, w)) -> (B, T, h, w)``
of array-API maths (``xp = camlens.backends.base.namespace(acts)``: ``array_api_compat.torch`` for
PyTorch tensors), wrapped in :class:`GradientMethod` and :func:`register`-ed; methods that need more passes call ``ctx.runner`` (perturbed inputs, replaced
layer outputs, input gradients).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..backends.base import layout_problem
from ..core.errors import LayerError

Tensor = Any  # an array of the model's backend (a torch.Tensor for PyTorch models)
from ..core.registry import Registry, check_options, defaults

__all__ = ["Method", "GradientMethod", "ActivationMethod", "MethodContext", "MethodOutput", "register", "get_method",
           "available_methods"]

_REGISTRY: "Registry[Method]" = Registry("method", "camlens.methods")


@dataclass
class MethodContext:
    """What a method may use. Shapes: B images, T targets per image, C channels.

    Attributes:
        inputs: ``(B, C, H, W)`` the model input.
        layers: the layer names, in the order given.
        modules: layer name -> layer object (for ``runner.scores_with_layer``).
        acts: layer name -> activations ``(B, C, h, w)`` (detached unless differentiable).
        grads: layer name -> gradients ``(B, T, C, h, w)`` of the target scores (``None`` when the
            method does not declare ``needs_grads``).
        scores: ``(B, T)`` the target scores of the unperturbed input.
        targets: B lists of T resolved targets.
        runner: extra passes (the backend's runner): ``scores(x, b)``,
            ``scores_with_layer(layer, acts, x_b, b)``, ``input_gradients(x, fn, guided)``.
        score_all: ``output -> (B, T)`` scores of every image's targets on a batch of B outputs.
        options: the method's options, defaults filled in.
        xp: the array-API namespace of the arrays (``array_api_compat.torch`` for PyTorch).
        ops: the backend's :class:`camlens.backends.base.Ops` (resize, top-k, quantile, noise).
        heads: the model's outputs by key (:func:`camlens.targets.split_outputs`).
        linear_head: for methods that declare ``needs_linear_head``: ``(layer, head key) ->`` the
            weight ``(K, C)`` of the dense layer mapping ``GAP(layer)`` to that head (an error
            saying why when there is none).
        layouts: layer name -> :class:`camlens.backends.base.MapLayout` for layers whose own
            output is channels-last or tokens, or that the user's ``layout=`` / ``reshape=`` read
            (``acts`` and ``grads`` are already read as ``(B, C, h, w)``; a method that feeds
            arrays back into the layer needs its layout: ``to_layer``).
        to_layer: ``(layer, maps (k, C, h, w), b) ->`` the same arrays in the layer's own layout
            (tokens get image b's prefix tokens back), for ``runner.scores_with_layer``; the
            identity for ``(B, C, h, w)`` layers; an error for a ``reshape=`` function (no inverse).
        attention: for methods that declare ``needs_attention``: the attention probabilities
            ``(B, heads, N, N)`` of every attention call of the forward, in call order.
        attention_grads: with ``needs_attention`` and ``needs_grads``: per call, the gradients
            ``(B, T, heads, N, N)`` of the T target scores w.r.t. those probabilities (one batched
            backward with the layers' gradients).
        attention_layout: the attention tokens' :class:`camlens.backends.base.MapLayout`:
            ``prefix`` class / register tokens first, then the ``grid`` ``(h, w)`` patches row by row.
    """

    inputs: Tensor
    layers: list[str]
    modules: Mapping[str, Any]
    acts: dict[str, Tensor]
    grads: Optional[dict[str, Tensor]]
    scores: Tensor
    targets: list
    runner: Any
    score_all: Callable[[Any], Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    xp: Any = None
    ops: Any = None
    heads: Mapping[Any, Tensor] = field(default_factory=dict)
    linear_head: Optional[Callable[[str, Any], Tensor]] = None
    layouts: Mapping[str, Any] = field(default_factory=dict)
    to_layer: Callable[[str, Tensor, int], Tensor] = lambda layer, maps, b: maps
    attention: Optional[list] = None
    attention_grads: Optional[list] = None
    attention_layout: Any = None

    def spatial_acts(self, name: str, who: str) -> Tensor:
        """Layer ``name``'s activations ``(B, C, h, w)``; a clear error for any other shape.

        The same check as the engine's (:func:`camlens.backends.base.layout_problem`): vectors,
        tokens, channels-last maps and a leading dimension other than the batch are refused.
        """
        a = self.acts[name]
        B, H, W = (int(self.inputs.shape[i]) for i in (0, -2, -1))
        if name in self.layouts and a.ndim == 4 and a.shape[0] == B:  # read as a map by the engine
            return a
        why = layout_problem(a.shape, B, (H, W))
        if why is not None:
            raise LayerError(f"{who} needs a (B, C, h, w) feature map with B = {B}; layer {name!r} gave "
                             f"{tuple(a.shape)}: {why}. Pick a convolutional feature layer (layer=None picks one).")
        return a


@dataclass
class MethodOutput:
    """A method's result; at least one field is set.

    Attributes:
        raws: layer name -> raw maps ``(B, T, h, w)`` (before ReLU / upsampling / min-max).
        saliency: ``(B, T, H, W)`` maps already at input resolution (occlusion, guided backprop),
            positive = evidence for the target; only min-max normalised afterwards.
        pixel: ``(B, T, C, H, W)`` per-input-channel attributions (guided backprop and friends).
        clip: for ``saliency``: cap each map at this quantile before min-max (heavy-tailed
            gradient maps; 1.0 = no cap). ``exp.raw`` keeps the uncapped values.
        segments, weights: superpixel methods: ``(B, H, W)`` int segment indices and ``(B, T, M)``
            per-segment weights (NumPy), kept as ``exp.segments`` / ``exp.weights``.
    """

    raws: Optional[dict[str, Tensor]] = None
    saliency: Optional[Tensor] = None
    pixel: Optional[Tensor] = None
    clip: float = 1.0
    segments: Optional[Any] = None
    weights: Optional[Any] = None


@dataclass(frozen=True)
class Method:
    """A method's identity, cost and needs.

    Attributes:
        name: registry key (``--method NAME``).
        description: one line.
        cost: forwards / backwards per call, in words.
        needs_grads: the engine computes gradients of the targets at the layers.
        needs_layer: the method works on a layer (False for input-space methods).
        needs_linear_head: the engine records the dense layers' inputs and outputs in the forward so
            that ``ctx.linear_head`` can find the GAP + dense head (CAM).
        differentiable: its maths is plain differentiable tensor code on the activations and
            gradients, so ``explain(..., differentiable=True)`` can return maps with a graph.
        needs_attention: the engine records the attention probabilities of every attention call
            of the forward (``ctx.attention``) and, with ``needs_grads``, the target gradients
            w.r.t. them (``ctx.attention_grads``); for transformers only.
        options: option name -> :class:`camlens.registry.Option` (default, check, doc) or a plain
            default; accepted as keyword arguments by ``camlens.explain``.
        needs_input_grads: it takes gradients w.r.t. the input pixels (``ctx.runner.input_gradients``:
            guided backprop), which a black-box model cannot give.
        volumes: it explains volume / clip inputs ``(B, C, D, H, W)``: its maths only reduces over
            all positions of a map or works position by position, so the engine may hand it a 3-D
            map ``(B, C, d, h, w)`` read as ``(B, C, d, h*w)`` (:mod:`camlens.engine.volumes`).
    """

    name: str
    description: str
    cost: str
    needs_grads: bool = True
    needs_layer: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    differentiable: bool = False
    needs_linear_head: bool = False
    needs_attention: bool = False
    volumes: bool = False
    needs_input_grads: bool = False

    @property
    def score_only(self) -> bool:
        """Does it need nothing but the scores of (perturbed) inputs — no layer, gradient, linear head,
        attention or input gradient — so it explains any model, a black-box callable included?"""
        return not (self.needs_grads or self.needs_layer or self.needs_linear_head or self.needs_attention
                    or self.needs_input_grads)

    def compute(self, ctx: MethodContext) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"method {self.name!r} has no compute()")

    @property
    def defaults(self) -> dict[str, Any]:
        """Option name -> default (``options`` values are :class:`camlens.registry.Option` specs or
        plain defaults)."""
        return defaults(self.options)

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``given``, each given value checked against its Option spec; an
        unknown option lists the valid ones."""
        check_options("method", self.name, self.options, given)
        return {**self.defaults, **given}


@dataclass(frozen=True)
class GradientMethod(Method):
    """A method that is a function of activations and gradients only.

    ``fn(acts (B, C, h, w), grads (B, T, C, h, w), **options) -> raw maps (B, T, h, w)``; the
    method's ``options`` (defaults filled in) are passed as keyword arguments.
    """

    fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    differentiable: bool = True
    volumes: bool = True

    def raw(self, acts: Tensor, grads: Tensor, **options: Any) -> Tensor:
        assert self.fn is not None
        return self.fn(acts, grads, **options)

    def compute(self, ctx: MethodContext) -> MethodOutput:
        assert ctx.grads is not None
        return MethodOutput(raws={n: self.raw(ctx.spatial_acts(n, self.name), ctx.grads[n], **ctx.options)
                                  for n in ctx.layers})


@dataclass(frozen=True)
class ActivationMethod(Method):
    """A method that is a function of activations only: ``fn(acts (B, C, h, w), T) -> (B, T, h, w)``."""

    fn: Optional[Callable[[Tensor, int], Tensor]] = None
    needs_grads: bool = False
    volumes: bool = True

    def compute(self, ctx: MethodContext) -> MethodOutput:
        assert self.fn is not None
        T = ctx.scores.shape[1]
        return MethodOutput(raws={n: self.fn(ctx.spatial_acts(n, self.name), T) for n in ctx.layers})


def register(method: Method) -> Method:
    """Add a method to the registry (name must be new). Third-party packages may call it from a
    module named by an entry point of the group ``camlens.methods`` (see :mod:`camlens.registry`)."""
    return _REGISTRY.register(method)


def get_method(name: str) -> Method:
    """Look a method up by name (case, ``-`` and ``_`` ignored); an unknown name lists close and
    available ones."""
    return _REGISTRY.get_item(name)


def available_methods() -> dict[str, Method]:
    """All registered methods by name (entry-point plug-ins included)."""
    return _REGISTRY.available()
