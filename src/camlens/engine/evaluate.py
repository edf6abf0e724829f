"""``camlens.evaluate``: score maps with faithfulness, localisation, complexity and sanity metrics.

Images ``(B, C, H, W)`` with maps ``(B, T, H, W)``, or volumes / video clips ``(B, C, D, H, W)`` with
maps ``(B, T, D, H, W)``: the metrics registered with ``volumes=True`` (:func:`volume_metrics`: all
but ROAD, whose imputation is 2-D) score those over all ``D H W`` voxels; see
:mod:`camlens.metrics.faithfulness` and :mod:`camlens.metrics.localisation`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..backends.base import get_backend, namespace, ops_for, to_float32
from ..core.errors import ConfigError, InputError, TargetError
from ..core.explanation import Explanation
from ..core.registry import check_options
from ..core.activations import activate, default_activation, model_activation
from ..core.targets import ResolvedTarget, resolve_targets, split_outputs
from ..metrics import EvalContext, Metric, available_metrics, get_metric, mean_sem
from .api import explain
from .passes import match_dtype, outside_inference_mode, prepare

__all__ = ["evaluate", "Scores", "DEFAULT_METRICS", "volume_metrics"]

Tensor = Any  # an array of the model's backend

DEFAULT_METRICS = ("deletion", "insertion", "average_drop")


@dataclass
class Scores(Mapping):
    """Metric values by name, each ``(B, T)``; ``curves[name]`` ``(B, T, S)`` for curve metrics.

    ``metrics[name]`` is the :class:`~camlens.metrics.Metric` (its direction: ``higher_is_better``).
    """

    values: dict[str, Tensor]
    curves: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def summary(self) -> list[dict[str, Any]]:
        """Per metric: name, direction arrow, mean and standard error over all images and targets."""
        rows = []
        for name, v in self.values.items():
            mean, sem, n = mean_sem(v)
            rows.append({"metric": name, "arrow": self.metrics[name].arrow, "mean": mean,
                         "sem": sem, "n": n, "category": self.metrics[name].category})
        return rows


def _per_target(t: Optional[Tensor], B: int, T: int, what: str, tail: tuple[int, ...], like: Any) -> Optional[Tensor]:
    """Broadcast ``(B, *tail)`` or ``(B, T, *tail)`` ground truth to ``(B, T, *tail)`` (arrays like ``like``)."""
    if t is None:
        return None
    t = ops_for(like).asarray(t, like=like)
    if t.ndim == 1 + len(tail):
        t = namespace(t).broadcast_to(t[:, None], (B, T, *t.shape[1:]))
    if t.shape[:2] != (B, T) or (tail and tuple(t.shape[2:]) != tail and tail != (-1,)):
        raise InputError(f"{what} must have shape (B, {', '.join(map(str, tail))}) or (B, T, ...) with B={B}, "
                         f"T={T}; got {tuple(t.shape)}")
    return t


def _probability(tg: ResolvedTarget, heads: Mapping, output: Any) -> Tensor:
    """Probability of ``tg``'s class on its head under the head's activation (softmax by default,
    sigmoid for multi-label heads: :mod:`camlens.core.activations`), ``(N,)``; ``1 - p`` for a
    ``sign=-1`` target (what it explains is less of the class: for sigmoid ``sigmoid(-z)``); the
    explained raw score for targets without a probability (score functions, regions, values; a
    detection's score, which detectors already give as a probability)."""
    if tg.fn is None:
        h = heads[tg.head]
        p = activate(tg.activation or default_activation(h), h)
        c = 0 if tg.cls is None else tg.cls
        if p is not None and 0 <= c < p.shape[1]:
            return 1 - p[:, c] if tg.sign == -1 else p[:, c]
    return to_float32(tg.score(heads, output))


def volume_metrics() -> list[str]:
    """Names of the registered metrics that score volume / clip maps (``Metric.volumes``)."""
    return sorted(name for name, m in available_metrics().items() if m.volumes)


@outside_inference_mode
def evaluate(model: Any, inputs: Any, explanation: Union[Explanation, Tensor],
             metrics: Sequence[str] = DEFAULT_METRICS, *, targets: Any = None, masks: Any = None, boxes: Any = None,
             batch_size: int = 64, options: Optional[dict[str, dict[str, Any]]] = None,
             eval_mode: bool = True, heads: Any = None) -> Scores:
    """Score maps with the given metrics: ``scores[name]`` ``(B, T)``, ``scores.curves[name]``.

    Args:
        model: ``nn.Module`` or :class:`camlens.models.LoadedModel`.
        inputs: ``(B, C, H, W)`` (or images, with a LoadedModel); or volumes / clips
            ``(B, C, D, H, W)`` for a 3-D model (then only :func:`volume_metrics`).
        explanation: a :class:`camlens.Explanation`, or a plain map tensor ``(B, T, H, W)``
            (volumes: ``(B, T, D, H, W)``; higher = more important) with ``targets=`` naming what
            each map explains.
        metrics: metric names (``camlens.metrics.available_metrics()``).
        masks, boxes: ground truth for localisation metrics: ``(B, H, W)`` / ``(B, 4)`` for every
            target, or ``(B, T, H, W)`` / ``(B, T, 4)`` per target; boxes are ``(x0, y0, x1, y1)``.
            Volumes: masks ``(B, D, H, W)`` / ``(B, T, D, H, W)``, boxes ``(B, 6)`` / ``(B, T, 6)``
            ``(x0, y0, z0, x1, y1, z1)`` with z along depth / time.
        batch_size: perturbed inputs per forward.
        options: per-metric options, e.g. ``{"deletion": {"step": 448}}``.
        heads: with a plain map tensor, which outputs are classification heads for ``targets=``
            such as ``"all"`` (as :func:`camlens.explain`'s ``heads=``); an Explanation brings its
            resolved targets.

    Runs with ``torch.inference_mode`` off (as :func:`camlens.explain`), so it can be called inside it.
    The model is left as it came (modes, ``requires_grad``, hooks, ``.grad``).
    """
    net, x, _, categories, _ = prepare(model, inputs, None, None)
    if x.ndim == 5:
        refused = [get_metric(n).name for n in metrics if not get_metric(n).volumes]
        if refused:
            raise ConfigError(f"metric(s) {refused} score images only, and the inputs {tuple(x.shape)} are volumes / "
                              f"clips (B, C, D, H, W) (ROAD's noisy linear imputation is a 2-D system); the metrics "
                              f"that score volumes are {volume_metrics()}: pass metrics= among them, or score the "
                              "slices / frames as images with a 2-D model")
    checked = _checked_options(options, metrics)  # before the model runs
    bk = get_backend(net)
    x = match_dtype(net, x, "fp32")
    xp, ops = namespace(x), ops_for(x)
    explain_fn: Optional[Callable[..., Tensor]] = None
    with bk.session(net, eval_mode=eval_mode):
        if isinstance(explanation, Explanation):
            maps, rows = explanation.maps, explanation.targets
            exp = explanation

            def reexplain(m: Any, xs: Tensor, rows: Any) -> Tensor:  # the sanity check re-explains
                layers = exp.layers if exp.layers else None
                return explain(m, xs, targets=rows, layer=layers, method=exp.method).maps

            explain_fn = reexplain
        else:
            maps = ops.asarray(explanation, like=x)
            if targets is None:
                raise ConfigError("a plain map tensor needs targets= (what each of its T maps explains)")
            with bk.graph(False):  # the backend's forward of the engine's (B, C, H, W) inputs (NHWC for Keras)
                out = bk.layout(net, False, "fp32").run(x)
            rows = resolve_targets(targets, split_outputs(out), out, categories=categories, head_keys=heads,
                                   activation=model_activation(net, None))
        grid = tuple(x.shape[2:])  # (H, W), or (D, H, W) for volumes
        if maps.ndim != 2 + len(grid) or maps.shape[0] != x.shape[0] or tuple(maps.shape[2:]) != grid:
            names = ("B", "T", "D", "H", "W") if len(grid) == 3 else ("B", "T", "H", "W")
            raise InputError(f"maps must be ({', '.join(names)}) = ({x.shape[0]}, T, {', '.join(map(str, grid))}) at "
                             f"input resolution; got {tuple(maps.shape)}")
        B, T = maps.shape[:2]
        if len(rows) != B or any(len(r) != T for r in rows):
            raise TargetError(f"targets resolve to {[len(r) for r in rows]} per image, but maps have T={T}")

        def prob_fn(out: Any, b: int) -> Tensor:
            hs = split_outputs(out)
            return xp.stack([_probability(tg, hs, out) for tg in rows[b]], axis=1)

        def score_fn(out: Any, b: int) -> Tensor:
            hs = split_outputs(out)
            return xp.stack([tg.score(hs, out) for tg in rows[b]], axis=1)

        layout = bk.layout(net, None, "fp32")
        prob_runner, score_runner = bk.runner(net, prob_fn, layout), bk.runner(net, score_fn, layout)
        ctx = EvalContext(model=net, inputs=x, maps=to_float32(ops.asarray(maps, like=x)), targets=rows, backend=bk,
                          probs=lambda xs, b: prob_runner.scores(xs, b, batch_size),
                          scores=lambda xs, b: score_runner.scores(xs, b, batch_size),
                          masks=_per_target(masks, B, T, "masks", grid, x),
                          boxes=_per_target(boxes, B, T, "boxes", (2 * len(grid),), x), batch_size=batch_size,
                          explain=explain_fn, options=checked)
        result = Scores(values={})
        for name in metrics:
            metric = get_metric(name)
            _check_requires(metric, ctx)
            r = metric(ctx)
            result.values[metric.name] = r.values
            result.metrics[metric.name] = metric
            if r.curves is not None:
                result.curves[metric.name] = r.curves
            if r.extra:
                result.extra[metric.name] = r.extra
    return result


def _checked_options(options: Optional[Mapping[str, Mapping[str, Any]]], metrics: Sequence[str]) -> dict:
    """``{metric: {key: value}}`` with each metric and key known and each value checked against the
    metric's Option spec (the same rule as method options). Options of a known metric that is not
    among ``metrics`` are checked too, then unused (one options dict can serve several calls)."""
    out: dict = {}
    for name, given in dict(options or {}).items():
        metric = get_metric(name)  # an unknown metric name is an error
        check_options("metric", metric.name, metric.defaults, given)
        out[metric.name] = dict(given)
    return out


def _check_requires(metric: Metric, ctx: EvalContext) -> None:
    for need in metric.requires:
        have = {"masks": ctx.masks is not None, "boxes": ctx.boxes is not None, "explain": ctx.explain is not None}
        if not any(have[n] for n in need.split("|")):
            what = " or ".join(need.split("|"))
            raise ConfigError(f"metric {metric.name!r} needs {what}" + (
                " (pass masks= / boxes=)" if need != "explain" else
                " (pass a camlens Explanation, not a plain map tensor, so it can re-explain)"))
