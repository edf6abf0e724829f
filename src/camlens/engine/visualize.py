"""``camlens.visualize``: activation maximisation — the image a class, a channel or a neuron wants.

Erhan et al. 2009; DeepVis (Yosinski et al. 2015: plain pixels with L2 and total-variation
regularisers); Olah et al. 2017 ("Feature Visualization": a Fourier parameterisation with
decorrelated colour and transformation robustness). Every objective gets its own image and all are
optimised in ONE batch. This module parses objectives (class targets in the language of
:mod:`camlens.core.targets`); the optimisation is the model's backend's (``Backend.maximise``):
PyTorch (:mod:`camlens.backends.torch.visualize`, which documents the maths) and Keras 3 on its
TensorFlow, JAX or PyTorch backend (:mod:`camlens.backends.keras.visualize`: the same maths in
``keras.ops`` on NHWC images). Both share the framework-free parts — the colour matrix, the
frequency grid, the initial image and every transform drawn from one NumPy generator
(:mod:`camlens.backends.maximise`) — so a Keras model and a torch model with the same weights give
the same images to float rounding, and an image does not depend on the others in its batch.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from ..backends.base import get_backend, ops_for
from ..core.errors import ConfigError, ConfigTypeError, TargetError
from ..core.targets import Categories, ResolvedTarget, Target, parse_target, split_outputs
from .passes import is_loaded

__all__ = ["Objective", "Visualization", "visualize", "DEFAULT_TRANSFORMS"]

# the transformation-robustness defaults (camlens.backends.maximise.Transforms takes these fields)
DEFAULT_TRANSFORMS: dict[str, Any] = {"pad": 12, "jitter": 8, "scale": (0.9, 1.1), "rotate": 10.0}


@dataclass(frozen=True)
class Objective:
    """What to maximise: a weighted sum of terms, each a class score, a channel or a neuron.

    Build with :meth:`cls`, :meth:`channel`, :meth:`neuron` and combine with ``+``, ``-`` and a
    number ``*``: ``Objective.cls("espresso") + 0.5 * Objective.channel("blocks.5", 12)``.

    ``terms``: ``(weight, kind, spec)`` with kind ``"class"`` (spec: a target as in
    ``camlens.explain(targets=)``: an index, a class name, ``"head:class"``, ``(head, class)``, a
    :class:`camlens.Target` or a callable ``fn(output) -> (B,)``), ``"channel"`` (spec ``(layer, c)``:
    the spatial mean of channel ``c`` of the layer's ``(B, C, h, w)`` output; Keras: ``(B, h, w, C)``)
    or ``"neuron"`` (spec ``(layer, c, y, x)``: one activation, ``(y, x)`` in the layer's map of the
    untransformed image, the same place under the transforms' border; ``y, x = None``: the centre).
    """

    terms: tuple[tuple[float, str, Any], ...]
    label: Optional[str] = None

    @staticmethod
    def cls(target: Any, label: Optional[str] = None) -> "Objective":
        return Objective(((1.0, "class", target),), label)

    @staticmethod
    def channel(layer: str, channel: int) -> "Objective":
        return Objective(((1.0, "channel", (layer, int(channel))),), f"{layer}:{int(channel)}")

    @staticmethod
    def neuron(layer: str, channel: int, y: Optional[int] = None, x: Optional[int] = None) -> "Objective":
        where = "centre" if y is None and x is None else f"({y}, {x})"
        return Objective(((1.0, "neuron", (layer, int(channel), y, x)),), f"{layer}:{int(channel)} {where}")

    def __add__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(self.terms + other.terms, f"{self.describe()} + {other.describe()}")

    def __radd__(self, other: Any) -> "Objective":
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts at 0
            return self
        return NotImplemented

    def __mul__(self, w: float) -> "Objective":
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            return NotImplemented
        return Objective(tuple((float(w) * a, k, s) for a, k, s in self.terms), f"{w:g}·({self.describe()})")

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return self * -1.0

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-other)

    def describe(self) -> str:
        """The label, or one made of the terms."""
        if self.label is not None:
            return self.label
        return " + ".join(f"{w:g}·{_spec_label(s)}" if w != 1 else _spec_label(s) for w, _k, s in self.terms)


def _spec_label(spec: Any) -> str:
    if isinstance(spec, tuple) and spec and isinstance(spec[0], str) and len(spec) in (2, 4):
        return ":".join(str(p) for p in spec if p is not None)
    return getattr(spec, "__name__", None) or str(spec)


@dataclass
class Visualization:
    """The result of :func:`camlens.visualize`: one image per objective.

    Attributes:
        images: ``(N, H, W, 3)`` uint8 (``round(255 · x)``).
        floats: ``(N, H, W, 3)`` float32 in ``[0, 1]``, the optimised images themselves.
        values: ``(N,)`` each objective's final value on its image (untransformed).
        history: ``(steps, N)`` the objective values during optimisation (on the transformed images).
        labels: one label per objective (for class targets: the class name).
        objectives: the parsed :class:`Objective` s.
        options: the settings used (``param``, ``steps``, ``size``, ``lr``, ``transforms``, ...).
    """

    images: np.ndarray
    floats: np.ndarray
    values: np.ndarray
    history: np.ndarray
    labels: list[str]
    objectives: list[Objective]
    options: dict[str, Any] = field(default_factory=dict)


class _OutputScore:
    """A class term's score ``fn(output) -> (B,)``: the target resolved once, on the first output."""

    def __init__(self, spec: Any, categories: Categories, layers: Sequence[str] = ()) -> None:
        self.spec, self.categories, self.layers = spec, categories, layers
        self.resolved: Optional[ResolvedTarget] = None

    def __call__(self, output: Any) -> Any:
        heads = split_outputs(output)
        if self.resolved is None:
            try:
                self.resolved = parse_target(self.spec, heads, self.categories)
            except TargetError as err:
                name = _layerish(self.spec)
                if name is None:
                    raise
                close = difflib.get_close_matches(name, list(self.layers), n=6, cutoff=0.5)
                raise type(err)(f"{err}; nor is {name!r} a layer of the model (for a channel objective "
                                f"'layer:channel'; closest layer names: {close})") from err
        return self.resolved.score(heads, output)


def _layerish(spec: Any) -> Optional[str]:
    """The layer a ``"name:int"`` / ``(name, int, ...)`` spec would name, else ``None``."""
    if isinstance(spec, str) and ":" in spec and spec.rpartition(":")[2].strip().isdigit():
        return spec.rpartition(":")[0].strip()
    if isinstance(spec, tuple) and len(spec) in (2, 4) and isinstance(spec[0], str):
        return spec[0]
    return None


def _as_objective(spec: Any, layers: set[str], heads: frozenset = frozenset()) -> Objective:
    """One user spec as an :class:`Objective` (see :func:`visualize`); ``"a:b"`` with ``a`` in
    ``heads`` (the class-name dict's keys) is a head's class, also where ``a`` names a layer."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, Mapping):  # {spec: weight}: a weighted sum
        if not spec:
            raise ConfigError("an objective dict {spec: weight} needs at least one entry")
        parts = []
        for k, w in spec.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ConfigTypeError(f"objective weight for {k!r} must be a number, got {type(w).__name__}")
            parts.append(float(w) * _as_objective(k, layers, heads))
        out = sum(parts[1:], parts[0])
        return dataclasses.replace(out, label=" + ".join(f"{w:g}·{_as_objective(k, layers, heads).describe()}"
                                                         for k, w in spec.items()))
    if isinstance(spec, str) and ":" in spec:
        name, _, rest = spec.rpartition(":")
        if name.strip() in layers and name.strip() not in heads:
            if not rest.strip().lstrip("-").isdigit():
                raise ConfigError(f"objective {spec!r}: {name.strip()!r} is a layer, so the part after ':' must be "
                                  "a channel index, e.g. 'layer:12'")
            return Objective.channel(name.strip(), int(rest))
    if isinstance(spec, tuple) and spec and isinstance(spec[0], str) and spec[0] in layers:
        if len(spec) == 2:
            return Objective.channel(spec[0], spec[1])
        if len(spec) == 4:
            return Objective.neuron(*spec)
        raise ConfigError(f"objective {spec!r}: a layer tuple is (layer, channel) or (layer, channel, y, x)")
    if isinstance(spec, (list, np.ndarray)):
        raise ConfigTypeError("a list inside an objective is ambiguous: give one objective per image in the "
                              "outer list, and sums as Objective a + b or {spec: weight}")
    return Objective.cls(spec)


def _labels(objs: Sequence[Objective], terms: Sequence[Sequence[Any]]) -> list[str]:
    out = []
    for obj, row in zip(objs, terms):
        if obj.label is not None:
            out.append(obj.label)
            continue
        parts = []
        for (w, _k, s), t in zip(obj.terms, row):
            rt = getattr(t[2], "resolved", None)
            name = rt.label if rt is not None else _spec_label(s)
            parts.append(name if w == 1 else f"{w:g}·{name}")
        out.append(" + ".join(parts))
    return out


def visualize(
    model: Any,
    objective: Any,
    *,
    param: str = "fourier",
    steps: int = 128,
    size: Optional[Union[int, tuple[int, int]]] = None,
    lr: Optional[float] = None,
    transforms: Union[str, None, Mapping[str, Any]] = "default",
    decorrelate: bool = True,
    decay: float = 1.0,
    tv: Optional[float] = None,
    l2: Optional[float] = None,
    seed: int = 0,
    categories: Categories = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channels: Optional[Sequence[int]] = None,
) -> Visualization:
    """Optimise one image per objective so that it maximises the objective (all in one batch).

    Args:
        model: a :class:`camlens.models.LoadedModel` (its normalisation, input size and class names
            are used; a Keras one's preprocessing read as the affine map it is), a PyTorch
            ``nn.Module`` taking ``(B, 3, H, W)`` images or a ``keras.Model`` taking ``(B, H, W, 3)``
            ones (on Keras' TensorFlow, JAX or PyTorch backend; ``mean``/``std`` default to none:
            images in ``[0, 1]``).
        objective: one objective or a list of them (one image each). Each is an :class:`Objective`,
            a class target (``int`` index, class name ``"espresso"``, ``"head:class"``, ``(head, class)``,
            :class:`camlens.Target`, callable ``fn(output) -> (B,)``), ``"layer:channel"`` (``layer``
            a module name: that channel's spatial mean), ``(layer, channel)``, ``(layer, channel, y,
            x)`` (a neuron, ``(y, x)`` in the map of the untransformed image) or ``{spec: weight}`` (a
            weighted sum). Keras layers by path
            (``"features/block4_conv"``) or a bare name unique across the nesting; a class objective
            is the logit (a final softmax / sigmoid left out, as ``explain`` scores it).
        param: ``"fourier"`` (1/f-scaled spectrum with decorrelated colour, Olah et al. 2017) or
            ``"pixels"`` (DeepVis: plain pixels clamped to [0, 1], with ``tv`` and ``l2``).
        steps: Adam steps (default 128; 48 suffice for the README's EfficientNet-Lite0 classes at 128 px).
        size: the image size ``H`` or ``(H, W)``; default the loaded model's ``input_size``, else a
            Keras model's fixed input size, else 224. The model sees ``size + 2·pad`` (the transforms'
            grey border).
        lr: Adam's step size; default 0.05 (fourier) / 0.01 (pixels).
        transforms: ``"default"`` (:data:`DEFAULT_TRANSFORMS`: pad 12 px grey, jitter ±8 px, scale
            0.9–1.1, rotation ±10°, drawn afresh every step, the same for every image of the batch),
            ``None`` (none) or a dict overriding some of those fields.
        decorrelate: decorrelated colour for ``param="fourier"`` (``False``: plain RGB spectrum).
        decay: the spectrum's ``1/f**decay`` scaling (fourier).
        tv, l2: regulariser weights, ``tv · TV(x) + l2 · ||x - 0.5||²`` subtracted from each objective;
            default 0 for fourier, ``tv=2.0, l2=1e-4`` for pixels.
        seed: the seed of every random draw (initial image, transforms; NumPy, the same on every
            framework and device): CPU runs repeat exactly, and each image is the one its objective
            alone would give with this seed (every image starts from the same noise and sees the
            same transforms; for different images of one objective, use different seeds).
        categories: class names for class-name objectives (default: the loaded model's).
        mean, std: the normalisation from ``[0, 1]`` RGB images to model inputs, ``(x - mean) / std``
            (default: the loaded model's).
        channels: the model input's channel order, ``input[..., c] = normalised[..., channels[c]]``
            (``(2, 1, 0)``: BGR, as ``keras.applications``' caffe models; default: the loaded model's,
            else RGB).

    Returns:
        :class:`Visualization` with ``images`` ``(N, H, W, 3)`` uint8, ``floats`` ``(N, H, W, 3)``,
        ``values`` ``(N,)`` (each objective on its final image), ``history``, ``labels``.

    The returned images are RGB in ``[0, 1]`` on every framework (the model input is made from them
    as above). The model is left exactly as given: modes, ``requires_grad`` / ``trainable`` and
    weights; no ``.grad`` is written (gradients are taken with respect to the image parameters only).
    """
    if is_loaded(model):
        categories = categories if categories is not None else getattr(model, "categories", None)
        norm = getattr(model, "input_normalisation", None)  # a Keras model's preprocess_input, read as affine
        if callable(norm) and mean is None and std is None and channels is None:
            mean, std, channels = norm()
        mean = mean if mean is not None else getattr(model, "mean", None)
        std = std if std is not None else getattr(model, "std", None)
        size = size if size is not None else getattr(model, "input_size", None)
        model = model.model
    bk = get_backend(model)
    mean = (0.0, 0.0, 0.0) if mean is None else tuple(float(v) for v in mean)
    std = (1.0, 1.0, 1.0) if std is None else tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"mean and std are 3 numbers (RGB), std > 0; got mean={mean}, std={std}")
    if channels is not None:
        channels = tuple(int(c) for c in channels)
        if sorted(channels) != [0, 1, 2]:
            raise ConfigError(f"channels is an order of the RGB channels, e.g. (2, 1, 0) for BGR; got {channels}")
    hw = _size(size if size is not None else bk.image_size(model))
    if param not in ("fourier", "pixels"):
        raise ConfigError(f"unknown param {param!r}; use 'fourier' (Olah et al. 2017) or 'pixels' (DeepVis)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be an int >= 0, got {steps!r}")
    lr = (0.05 if param == "fourier" else 0.01) if lr is None else float(lr)
    tv = (0.0 if param == "fourier" else 2.0) if tv is None else float(tv)
    l2 = (0.0 if param == "fourier" else 1e-4) if l2 is None else float(l2)
    tf = _transforms(transforms)

    specs = objective if isinstance(objective, list) else [objective]
    if not specs:
        raise ConfigError("no objective given: pass one, or a list (one image each)")
    layers = set(bk.layer_names(model))
    heads = frozenset(categories) if isinstance(categories, Mapping) else frozenset()
    objs = [_as_objective(s, layers, heads) for s in specs]
    terms = [[_term(w, k, s, categories, sorted(layers)) for w, k, s in o.terms] for o in objs]
    kw = dict(size=hw, steps=steps, lr=lr, param=param, decorrelate=decorrelate, tv=tv, l2=l2, seed=int(seed),
              mean=mean, std=std, channels=channels, decay=float(decay), transforms=tf)
    with bk.call_context():  # (torch: inference mode off, so it also works inside torch.inference_mode())
        x, values, hist = bk.maximise(model, terms, **kw)
    ops = ops_for(x)
    floats = np.ascontiguousarray(np.asarray(ops.to_numpy(x), dtype=np.float32).transpose(0, 2, 3, 1))
    images = np.clip(np.round(floats * 255.0), 0, 255).astype(np.uint8)
    options = dict(kw)
    return Visualization(images=images, floats=floats, values=np.asarray(ops.to_numpy(values), dtype=np.float64),
                         history=np.asarray(ops.to_numpy(hist), dtype=np.float64), labels=_labels(objs, terms),
                         objectives=objs, options=options)


def _size(size: Any) -> tuple[int, int]:
    if size is None:
        return (224, 224)
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in size)):
        raise ConfigError(f"size is an int >= 8 or (H, W), got {size!r}")
    return (int(size[0]), int(size[1]))


def _transforms(transforms: Any) -> Optional[dict[str, Any]]:
    if transforms is None:
        return None
    if isinstance(transforms, str):
        if transforms != "default":
            raise ConfigError(f"transforms is 'default', None or a dict of {sorted(DEFAULT_TRANSFORMS)}, got {transforms!r}")
        return dict(DEFAULT_TRANSFORMS)
    if isinstance(transforms, Mapping):
        bad = sorted(set(transforms) - set(DEFAULT_TRANSFORMS))
        if bad:
            raise ConfigError(f"unknown transform(s) {bad}; the fields are {sorted(DEFAULT_TRANSFORMS)}")
        out = {**DEFAULT_TRANSFORMS, **transforms}
        out["scale"] = tuple(float(v) for v in (out["scale"] if isinstance(out["scale"], (tuple, list))
                                                else (out["scale"], out["scale"])))
        return out
    raise ConfigTypeError(f"transforms is 'default', None or a dict, got {type(transforms).__name__}")


def _term(weight: float, kind: str, spec: Any, categories: Categories,
          layers: Sequence[str] = ()) -> tuple[float, str, Any]:
    """A term as the backend takes it: ``(weight, "output", fn(output) -> (B,))``, ``(weight,
    "channel", (layer, c))`` or ``(weight, "neuron", (layer, c, y, x))``."""
    if kind == "class":
        if isinstance(spec, bool) or not (isinstance(spec, (int, str, tuple, Target)) or callable(spec)
                                          or hasattr(spec, "__index__")):
            raise ConfigTypeError(f"cannot use {spec!r} ({type(spec).__name__}) as an objective; use a class "
                                  "(index, name, 'head:class'), 'layer:channel', (layer, channel, y, x), "
                                  "camlens.Objective or {spec: weight}")
        return (weight, "output", _OutputScore(spec, categories, layers))
    return (weight, kind, spec)
