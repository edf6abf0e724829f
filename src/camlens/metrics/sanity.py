"""Sanity checks: the model parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for
Saliency Maps", NeurIPS), cascading from the output towards the input.

A map that explains the model must change when the model's learned weights are destroyed. On a
deep copy of the model (the user's model is never touched) the parametrised modules are
re-initialised step by step, from the top (output side) down to the input, cumulatively; after
every step the maps are re-computed with the same method and layers (``ctx.explain``) and compared
with the maps of the intact copy by the Spearman rank correlation, per image and target:

    rho_s[b, t] = Pearson(rank(m_0[b, t]), rank(m_s[b, t]))        over the H*W pixels,

(over the D*H*W voxels for volume / clip maps ``(B, T, D, H, W)``: the re-explanations go through
:func:`camlens.explain`, which explains volumes with the same method and layers),

with average ranks for ties (ReLU'd maps have many zeros). A map that is constant in one of the
two has no ranking to share: rho = 0 (1 when both are constant). Low rho = the method depends on
the weights (↓ better); a model-independent map (an edge detector) stays at 1.

**Steps.** Units are the modules that own parameters (``recurse=False``) and run in a forward
pass, in reverse order of their first call (modules that never run are left alone). With
``max_steps`` (default 12, ``None`` = one step per module) they are grouped by the deepest
module-name prefix (``layer4`` at depth 1, ``layer4.1`` at depth 2) that yields at most
``max_steps`` consecutive groups; if even the top-level blocks are too many, consecutive blocks are
merged into ``max_steps`` chunks. The last step always leaves every parameter re-initialised.

**Re-initialisation** (by the model's backend; for PyTorch:) ``module.reset_parameters()`` where it
exists (the layer's own default init; BatchNorm also resets its running statistics), else every own
parameter is redrawn from ``N(0, s^2)`` with ``s`` its current standard deviation (0.02 for a
constant or 1-element one).
Seeded by ``seed`` (+ the step index) inside a forked RNG: the global RNG is left as it was.

**Reference.** The intact copy is re-explained too, and that is the reference ``m_0``: a method
option the re-explanation does not carry (``ctx.explain`` reuses method and layers only) cannot
pass for sensitivity. ``extra["reference_correlation"]`` ``(B, T)`` is rho between ``ctx.maps`` and
``m_0`` (1 when they agree).

Result: ``values`` ``(B, T)`` = rho after the LAST step (every parameter re-initialised);
``curves`` ``(B, T, S)`` = rho after each step; ``extra["steps"]`` the S step names (module names
or prefixes; ``"a … b"`` for merged blocks). Cost: ``S + 1`` explanations of the batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..backends.base import namespace, ops_for
from ..core.errors import ConfigError
from ..core.registry import Option, optional, positive_int
from .base import EvalContext, Metric, MetricResult, Tensor, as_array_like, register_metric

__all__ = ["average_ranks", "spearman", "randomisation_steps", "MPRT", "MPRT_METRIC"]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks ``(N, P)`` (float64) of each row of ``x`` ``(N, P)``, 0-based, ties sharing their average
    rank: the arrays' :meth:`~camlens.backends.base.Ops.average_ranks` (torch: one sort and two
    ``scatter_reduce``; the array API has no scatter)."""
    return ops_for(x).average_ranks(x)


def spearman(a: Tensor, b: Tensor, spatial: int = 2) -> Tensor:
    """Spearman rank correlation of maps ``a``, ``b`` ``(..., H, W)`` over pixels -> ``(...)``
    (``spatial=3``: ``(..., D, H, W)`` over voxels).

    Pearson correlation of average ranks; 0 when exactly one of the two maps is constant, 1 when
    both are.
    """
    xp = namespace(a, b)
    lead = a.shape[:a.ndim - spatial]
    ra = average_ranks(xp.astype(xp.reshape(a, (-1, math.prod(a.shape[a.ndim - spatial:]))), xp.float64))
    rb = average_ranks(xp.astype(xp.reshape(b, (-1, math.prod(b.shape[b.ndim - spatial:]))), xp.float64))
    ra = ra - xp.mean(ra, axis=1, keepdims=True)
    rb = rb - xp.mean(rb, axis=1, keepdims=True)
    na, nb = xp.linalg.vector_norm(ra, axis=1), xp.linalg.vector_norm(rb, axis=1)
    const_a, const_b = na == 0, nb == 0
    rho = xp.sum(ra * rb, axis=1) / xp.clip(na * nb, min=1e-300)
    rho = xp.where(const_a | const_b, xp.zeros_like(rho), rho)
    rho = xp.where(const_a & const_b, xp.ones_like(rho), rho)
    return xp.reshape(xp.astype(rho, xp.float32), lead)


def _prefix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth]) if name else "<model>"


def randomisation_steps(units_top_first: list[tuple[str, Any]],
                        max_steps: Optional[int]) -> list[tuple[str, list[Any]]]:
    """Group units ``(name, unit)`` (output side first) into at most ``max_steps`` ``(name, units)``
    steps; see module doc. A unit is anything (MPRT passes layer names)."""
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"mprt max_steps must be >= 1 or None, got {max_steps!r}")
    if max_steps is None or len(units_top_first) <= max_steps:
        return [(n or "<model>", [m]) for n, m in units_top_first]

    def runs(depth: int) -> list[tuple[str, list[Any]]]:
        out: list[tuple[str, list[Any]]] = []
        for n, m in units_top_first:
            p = _prefix(n, depth)
            if out and out[-1][0] == p:
                out[-1][1].append(m)
            else:
                out.append((p, [m]))
        return out

    deepest = max(len(n.split(".")) for n, _ in units_top_first)
    for depth in range(deepest, 0, -1):
        groups = runs(depth)
        if len(groups) <= max_steps:
            return groups
    groups = runs(1)
    chunks = np.array_split(np.arange(len(groups)), max_steps)
    return [(groups[c[0]][0] if len(c) == 1 else f"{groups[c[0]][0]} … {groups[c[-1]][0]}",
             [m for i in c for m in groups[i][1]]) for c in chunks if len(c)]


def _explain(ctx: EvalContext, model: Any) -> Tensor:
    with warnings.catch_warnings():  # randomised models often give constant (all-zero) maps
        warnings.filterwarnings("ignore", message=".*maps are constant.*")
        maps = ctx.explain(model, ctx.inputs, ctx.targets)  # type: ignore[misc]
    xp = namespace(ctx.maps)
    return xp.astype(as_array_like(maps, ctx.maps), xp.float32, copy=False)


@dataclass(frozen=True)
class MPRT(Metric):
    """Cascading model parameter randomisation; see the module docstring.

    The framework work is the model's backend's (``ctx.model_backend()``): ``randomized_copy`` for
    the intact copy, ``layer_order`` for the units, ``reinitialise_layers`` (in place, on that copy)
    for each step; this class only groups names and computes correlations.
    """

    def __call__(self, ctx: EvalContext) -> MetricResult:
        if ctx.explain is None:
            raise ConfigError("mprt needs to re-explain: pass a camlens Explanation, not a plain map tensor")
        seed, max_steps = int(ctx.opt(self, "seed")), ctx.opt(self, "max_steps")
        bk = ctx.model_backend()
        net = bk.randomized_copy(ctx.model, [], seed)  # an intact copy: the user's model is never modified
        names = bk.layer_order(net, ctx.inputs[:1])  # input side first
        steps = randomisation_steps([(n, n) for n in names[::-1]], max_steps)
        ref = _explain(ctx, net)
        rhos = []
        for s, (_, layers) in enumerate(steps):
            bk.reinitialise_layers(net, layers, seed + 1000 * s)  # the j-th layer of step s: seed + 1000 s + j
            rhos.append(spearman(ref, _explain(ctx, net), ctx.spatial))
        xp = namespace(ctx.maps)
        B, T = ctx.maps.shape[:2]
        curves = xp.stack(rhos, axis=-1) if rhos else xp.ones((B, T, 0))
        values = curves[..., -1] if rhos else xp.ones((B, T))
        return MetricResult(values=values, curves=curves,
                            extra={"steps": [n for n, _ in steps], "reference_correlation": spearman(ctx.maps, ref, ctx.spatial)})


MPRT_METRIC = register_metric(MPRT(
    name="mprt", higher_is_better=False, category="randomisation",
    description="Model parameter randomisation (Adebayo et al. 2018): Spearman correlation of the maps with "
                "those of the model re-initialised top-down, after the last step",
    requires=("explain",), defaults={"max_steps": Option(12, optional(positive_int, "every layer"), "randomisation steps"),
                                     "seed": Option(0, lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                    else "an int >= 0", "of the random weights")},
    volumes=True))
