"""Per-filter activation maps: :func:`filters` — which channels of a layer respond most, and which
ones carry a target's Grad-CAM evidence.

For a layer's activations ``A`` ``(B, C, h, w)`` and image b, each channel c gets a weight

* ``order="activation"``: ``w[b, c] = mean_ij A[b, c, i, j]`` (its mean activation; one forward,
  no backward);
* ``order="contribution"``: ``w[b, c] = alpha[b, c] * mean_ij A[b, c, i, j]`` with Grad-CAM's weight
  ``alpha[b, c] = mean_ij dS_b / dA[b, c, i, j]`` for the target score ``S``: channel c's term of the
  Grad-CAM sum averaged over the map, so ``sum_c w[b, c]`` is the spatial mean of image b's Grad-CAM
  map before its ReLU (one forward, one backward).

The ``top`` channels of largest weight (per image, largest first) are returned with their indices,
weights and maps: each channel's activation ``A[b, c]`` upsampled bilinearly to the input size and
min-maxed to [0, 1] (``relu=True``: ReLU first). The picture is :func:`camlens.viz.filter_grid`.
Everything runs through the model's backend (one :func:`~camlens.engine.passes.run_pass`), so torch and
Keras models work alike; the model is left as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..backends.base import get_backend
from ..core.errors import ConfigError
from ..core.targets import Categories
from ..methods import Method, MethodContext, MethodOutput
from .finish import finish
from .passes import check_method, match_dtype, outside_inference_mode, prepare, run_pass

__all__ = ["filters", "Filters", "FILTER_ORDERS"]

FILTER_ORDERS = ("activation", "contribution")


@dataclass
class Filters:
    """The ``top`` channels of one layer for each of B images (see :mod:`camlens.engine.filters`).

    Attributes:
        maps: ``(B, top, H, W)`` in [0, 1], the channels' activations upsampled to the input (the
            model backend's arrays: torch tensors, NumPy for Keras).
        raw: ``(B, top, h, w)`` the channels' activations as the layer gave them.
        indices: ``(B, top)`` int64 channel indices, largest weight first (NumPy).
        weights: ``(B, top)`` float64, their weights (NumPy).
        layer: the layer's name; ``channels``: its channel count C.
        order: ``"activation"`` or ``"contribution"``.
        targets: for ``"contribution"``, each image's target label; else ``None``.
        inputs: ``(B, C_in, H, W)`` the model input; ``display``: ``(B, H, W, 3)`` uint8 images of a
            loaded model, else ``None`` (pictures then min-max the inputs).
    """

    maps: Any
    raw: Any
    indices: np.ndarray
    weights: np.ndarray
    layer: str
    channels: int
    order: str
    targets: Optional[list[str]] = None
    inputs: Any = None
    display: Optional[np.ndarray] = None

    def titles(self) -> list[list[str]]:
        """B lists of ``"#index  w=weight"`` (the grid's cell labels)."""
        return [[f"#{int(i)}  w={float(w):.3g}" for i, w in zip(ii, ww)] for ii, ww in zip(self.indices, self.weights)]

    def title(self) -> str:
        """``"layer L: top k of C channels by <weight>[ for <targets>]"``."""
        what = "mean activation" if self.order == "activation" else "Grad-CAM weight x mean activation"
        targets = "" if not self.targets else " for " + ", ".join(dict.fromkeys(self.targets))
        return f"layer {self.layer}: top {self.indices.shape[1]} of {self.channels} channels by {what}{targets}"

    def to_dict(self) -> dict:
        """What a JSON file keeps: layer, order, channel count, per image its target and the top
        channels' indices and weights."""
        return {"layer": self.layer, "order": self.order, "channels": self.channels,
                "images": [{"target": None if self.targets is None else self.targets[b],
                            "indices": [int(i) for i in self.indices[b]],
                            "weights": [float(w) for w in self.weights[b]]} for b in range(len(self.indices))]}


@dataclass(frozen=True)
class _TopChannels(Method):
    """The pass's method: the channel weights of the layer, its ``top`` channels' maps as raws
    ``(B, top, h, w)``; indices and weights are left in ``picked``."""

    top: int = 16
    order: str = "activation"
    picked: dict = field(default_factory=dict, compare=False)

    def compute(self, ctx: MethodContext) -> MethodOutput:
        name = ctx.layers[0]
        a = ctx.spatial_acts(name, "camlens.filters")  # (B, C, h, w)
        xp, ops = ctx.xp, ctx.ops
        w = xp.mean(a, axis=(-2, -1))  # (B, C) mean activation
        if self.order == "contribution":
            if ctx.scores.shape[1] != 1:
                raise ConfigError(f"order='contribution' ranks channels for ONE target per image, got "
                                  f"{ctx.scores.shape[1]} ({[t.label for t in ctx.targets[0]]}); pass one target")
            w = xp.mean(ctx.grads[name][:, 0], axis=(-2, -1)) * w  # Grad-CAM's alpha x mean activation
        k = min(self.top, int(a.shape[1]))
        vals, idx = ops.topk(w, k, axis=-1)  # (B, k), largest first
        self.picked.update(indices=ops.to_numpy(idx).astype(np.int64), weights=ops.to_numpy(vals).astype(np.float64),
                           channels=int(a.shape[1]))
        maps = xp.stack([xp.take(a[b], idx[b], axis=0) for b in range(a.shape[0])])  # (B, k, h, w)
        return MethodOutput(raws={name: maps})


@outside_inference_mode
def filters(model: Any, inputs: Any, layer: Any = None, *, top: int = 16, order: str = "activation",
            target: Any = None, categories: Categories = None, heads: Any = None, relu: bool = False,
            upsample: bool = True) -> Filters:
    """The ``top`` channels of ``layer`` with the highest mean activation (``order="activation"``) or
    the highest Grad-CAM weight x mean activation for ``target`` (``order="contribution"``), per image.

    Args:
        model: an ``nn.Module``, a Keras 3 ``keras.Model`` or a loaded model (``camlens.models.load``).
        inputs: as for :func:`camlens.explain` (``(B, 3, H, W)`` tensors for torch, ``(B, H, W, 3)``
            arrays for Keras, images / paths with a loaded model).
        layer: one layer (name or object); ``None``: the default CAM layer of the model.
        top: how many channels (at most the layer's C).
        order: ``"activation"`` or ``"contribution"`` (see :mod:`camlens.engine.filters`).
        target: with ``"contribution"``, ONE target per image in :func:`camlens.explain`'s language
            (a class index, a name with ``categories=``, ``"head:class"``, a callable); ``None``: each
            image's top class. With ``"activation"`` nothing depends on it (the pass still resolves it,
            so a model without a classification head needs a callable target there too).
        categories, heads: as for :func:`camlens.explain`.
        relu: ReLU the maps before min-max (``False``: each map min-maxed as it is).
        upsample: maps at the input size (``False``: the layer's ``(h, w)``).

    Returns:
        :class:`Filters`: maps ``(B, top, H, W)``, raw ``(B, top, h, w)``, indices and weights
        ``(B, top)``; draw it with :func:`camlens.viz.filter_grid`.
    """
    if order not in FILTER_ORDERS:
        raise ConfigError(f"order= takes one of {FILTER_ORDERS}, got {order!r}")
    if not (isinstance(top, int) and not isinstance(top, bool) and top > 0):
        raise ConfigError(f"top= must be a positive int, got {top!r}")
    if isinstance(layer, (list, tuple)):
        raise ConfigError(f"camlens.filters reads ONE layer, got {len(layer)}: call it once per layer")
    net, x, layer, categories, display = prepare(model, inputs, layer, categories)
    bk = get_backend(net)
    meth = _TopChannels(name="filters", description="per-filter activation maps", cost="1 forward (+1 backward)",
                        needs_grads=order == "contribution", top=top, order=order)
    check_method(bk, meth)
    x = match_dtype(net, x, "fp32")
    if x.ndim != 4:
        raise ConfigError(f"camlens.filters explains images (B, C, H, W), got shape {tuple(x.shape)}")
    layers = bk.resolve_layers(net, layer if layer is not None else bk.default_layer(net, x))
    with bk.session(net):
        p = run_pass(net, x, target, layers[:1], meth, {}, categories, None, layout=bk.layout(net, None, "fp32"),
                     head_keys=heads, backend=bk)
    name = layers[0][0]
    raw = p.result.raws[name]
    maps = finish(p.result, tuple(x.shape[-2:]) if upsample else None, relu, "mean")
    picked = meth.picked
    return Filters(maps=maps, raw=raw, indices=picked["indices"], weights=picked["weights"], layer=name,
                   channels=picked["channels"], order=order,
                   targets=[row[0].label for row in p.rows] if order == "contribution" else None,
                   inputs=bk.ops.detach(x), display=display)
