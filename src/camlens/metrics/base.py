"""Metric base: each metric declares its direction and category, and is batched over images and targets.

A metric is called with an :class:`EvalContext` and returns a :class:`MetricResult`: one value per
image and target ``(B, T)``, and optionally curves ``(B, T, S)``. Metrics that perturb inputs use
``ctx.probs(xs, b)`` / ``ctx.scores(xs, b)``: the softmax probability (or raw score) of image b's
T targets for N perturbed copies, computed in chunks of ``ctx.batch_size`` — no metric holds all
perturbed images of a data set in memory at once.

Metrics import no framework: their maths is array-API code (``xp = namespace(arrays)``, see
:mod:`camlens.backends.base`), what the standard lacks comes from the arrays' :class:`Ops`
(``ops_for(x)``), and model-level work (layer order, re-initialised copies) from the model's
backend, ``ctx.model_backend()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import array_api_compat
import numpy as np

from ..backends.base import Backend, get_backend, namespace, ops_for
from ..core.registry import Registry
from ..core.registry import defaults as option_defaults

__all__ = ["Metric", "MetricResult", "EvalContext", "register_metric", "get_metric", "available_metrics", "auc",
           "order_pixels", "mean_sem", "as_array_like", "flat_spatial"]

_METRICS: "Registry[Metric]" = Registry("metric", "camlens.metrics")

Tensor = Any  # an array of the model's backend (a torch.Tensor for PyTorch models), or a NumPy array


@dataclass
class EvalContext:
    """What a metric may use. B images, T targets per image, maps ``(B, T, H, W)`` in [0, 1].

    For volumes / clips every ``H, W`` below reads ``D, H, W``: inputs ``(B, C, D, H, W)``, maps
    ``(B, T, D, H, W)``, masks ``(B, T, D, H, W)``, boxes ``(B, T, 6)`` ``(x0, y0, z0, x1, y1, z1)``
    (z along depth / time); ``ctx.spatial`` is 2 or 3. Only metrics registered with
    ``volumes=True`` are run on them (:attr:`Metric.volumes`).

    Attributes:
        model: the model (an ``nn.Module`` for PyTorch; eval mode, frozen, for the duration of the evaluation).
        inputs: ``(B, C, H, W)`` model inputs (normalised as the model expects).
        maps: ``(B, T, H, W)`` saliency maps at input resolution, higher = more important.
        targets: B lists of T resolved targets (see :mod:`camlens.targets`).
        probs: ``(xs (N, C, H, W), b) -> (N, T)`` softmax probability of image b's targets'
            classes on their heads (the raw score for targets without a class).
        scores: ``(xs, b) -> (N, T)`` raw (pre-softmax) target scores.
        masks: optional ``(B, T, H, W)`` bool ground-truth masks (per target), or ``None``.
        boxes: optional ``(B, T, 4)`` ground-truth boxes ``(x0, y0, x1, y1)``, or ``None``.
        batch_size: perturbed inputs per forward.
        explain: ``(model, inputs, targets) -> maps (B, T, H, W)``: re-explains (the sanity check
            uses it on randomised models), or ``None`` when the maps did not come from camlens.
        options: per-metric options, ``{metric name: {option: value}}``.
        backend: the model's :class:`camlens.backends.base.Backend`, or ``None``:
            :meth:`model_backend` then finds it from the model's type.
    """

    model: Any
    inputs: Tensor
    maps: Tensor
    targets: list
    probs: Callable[[Tensor, int], Tensor]
    scores: Callable[[Tensor, int], Tensor]
    masks: Optional[Tensor] = None
    boxes: Optional[Tensor] = None
    batch_size: int = 64
    explain: Optional[Callable[..., Tensor]] = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend: Optional[Backend] = None

    @property
    def spatial(self) -> int:
        """How many trailing axes of the maps are spatial: 2 for images ``(H, W)``, 3 for volumes / clips ``(D, H, W)``."""
        return self.maps.ndim - 2

    def model_backend(self) -> Backend:
        """``backend``, else the backend that owns ``model`` (:func:`camlens.backends.base.get_backend`)."""
        return self.backend if self.backend is not None else get_backend(self.model)

    def opt(self, metric: "Metric", key: str) -> Any:
        """Option ``key`` of ``metric``: the user's value, else the metric's default."""
        given = self.options.get(metric.name, {})
        return given[key] if key in given else option_defaults(metric.defaults)[key]


@dataclass
class MetricResult:
    """``values`` ``(B, T)``; ``curves`` ``(B, T, S)`` for curve metrics (deletion, insertion, ROAD...)."""

    values: Tensor
    curves: Optional[Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """A metric's identity.

    Attributes:
        name: registry key (``metrics=["deletion", ...]``).
        higher_is_better: the direction (tables show ↑ / ↓).
        category: ``"faithfulness"``, ``"localisation"``, ``"complexity"`` or ``"randomisation"``.
        description: one line, with the paper.
        requires: what beyond model + maps it needs: subset of ``{"masks", "boxes", "explain"}``
            (``"masks|boxes"`` means either).
        defaults: option name -> :class:`camlens.registry.Option` (default, check, doc) or a plain default.
        volumes: whether it also scores volume / clip maps ``(B, T, D, H, W)`` (its maths over all
            ``D H W`` voxels); ``camlens.evaluate`` refuses the others on volumes. Off by default, so a
            plug-in metric written for images is not run on volumes unawares.
    """

    name: str
    higher_is_better: bool
    category: str
    description: str
    requires: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    volumes: bool = False

    def __call__(self, ctx: EvalContext) -> MetricResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


def register_metric(metric: Metric) -> Metric:
    """Add a metric to the registry (name must be new); plug-ins: entry-point group ``camlens.metrics``."""
    return _METRICS.register(metric)


def get_metric(name: str) -> Metric:
    """Look a metric up by name (case, ``-`` and ``_`` ignored, as methods); an unknown name lists
    close and available ones."""
    return _METRICS.get_item(name)


def available_metrics() -> dict[str, Metric]:
    """All registered metrics by name (entry-point plug-ins included)."""
    return _METRICS.available()


def as_array_like(v: Any, x: Tensor) -> Tensor:
    """``v`` (an array of any backend, or nested lists) as an array of ``x``'s backend on ``x``'s device
    (its dtype kept): moved when both are of one array library, else through NumPy
    (``ops.to_numpy`` / ``ops.asarray``)."""
    if not array_api_compat.is_array_api_obj(v):
        return ops_for(x).asarray(v, like=x)
    try:
        namespace(v, x)
    except TypeError:  # another array library
        return ops_for(x).asarray(ops_for(v).to_numpy(v), like=x)
    return array_api_compat.to_device(v, array_api_compat.device(x))


def auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves ``(..., n+1)`` sampled at n equal steps on [0, 1]:
    ``(sum_i s_i - s_0 / 2 - s_n / 2) / n``."""
    xp = namespace(curve)
    n = curve.shape[-1] - 1
    return (xp.sum(curve, axis=-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / n


def mean_sem(values: Tensor) -> tuple[float, float, int]:
    """Mean, standard error of the mean (``std(unbiased) / sqrt(n)``) and count ``n`` of ``values``
    (any shape), NaN values left out, in float64. The mean is NaN when ``n == 0``, the s.e. when ``n < 2``."""
    if not array_api_compat.is_array_api_obj(values):
        values = np.asarray(values)
    xp = namespace(values)
    v = xp.reshape(xp.astype(values, xp.float64), (-1,))
    v = v[~xp.isnan(v)]
    n = int(v.shape[0])
    mean = float(xp.mean(v)) if n else float("nan")
    sem = float(xp.std(v, correction=1) / n ** 0.5) if n > 1 else float("nan")
    return mean, sem, n


def flat_spatial(x: Tensor, spatial: int = 2) -> Tensor:
    """``(..., *S) -> (..., prod(S))``: the last ``spatial`` axes (``H, W``, or ``D, H, W`` for volumes)
    flattened in raster order."""
    lead = x.shape[:x.ndim - spatial]
    return namespace(x).reshape(x, (*lead, math.prod(x.shape[x.ndim - spatial:])))


def order_pixels(maps: Tensor, generator: Any = None, tie_noise: float = 0.0, spatial: int = 2) -> Tensor:
    """Pixel indices ``(B, T, H*W)`` by descending saliency (stable; optional tiny noise breaks ties).
    ``spatial=3``: voxel indices ``(B, T, D*H*W)`` of volume maps ``(B, T, D, H, W)`` (raster order:
    depth, then row, then column).

    ``tie_noise``: ``tie_noise * U[0, 1)`` added to the (float32) maps first, drawn from
    ``generator`` (``ops.generator(seed, like=maps)``; ``None``: the global stream on the maps' device).
    """
    xp = namespace(maps)
    flat = xp.astype(flat_spatial(maps, spatial), xp.float32, copy=False)
    if tie_noise:
        flat = flat + tie_noise * ops_for(flat).random(flat.shape, generator, flat)
    return xp.argsort(flat, axis=-1, descending=True, stable=True)
