"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML), with noisy linear imputation.

Deleting pixels by painting them black (or blurring them) leaks the shape of the deleted region
to the model: the score then measures the mask, not the information removed. ROAD fills each
removed pixel from its neighbours instead, so the perturbed image stays close to the data.

**Noisy linear imputation.** Let ``R`` be the removed pixels of a ``(C, H, W)`` image ``v`` and
``N(i)`` the in-image 8-neighbours of pixel ``i`` with weights ``w = 1/6`` (direct) and ``1/12``
(diagonal); ``d_i = sum_{j in N(i)} w_ij`` (1 inside the image, less at the border). Each removed
pixel is the weighted mean of its neighbours, removed or not, jointly for all of ``R``:

    d_i x_i - sum_{j in N(i) ∩ R} w_ij x_j = sum_{j in N(i) \\ R} w_ij v_j        for every i in R,

one sparse linear system ``L x = r`` per channel (``L = D - W_RR``, symmetric positive definite
whenever at least one pixel is kept), then ``x + noise * N(0, 1)`` (option ``noise``, default
0.01 as in the authors' code and pytorch-grad-cam, absolute, in the model's input space; seeded by
``seed``). Option ``solver``: ``"spsolve"`` (scipy's sparse LU on the CPU, exact, one
factorisation for all channels), ``"cg"`` (matrix-free conjugate gradients with 3x3 neighbour sums
on the tensor's device, all percentages and channels of a map solved as one batch; stops at a
relative residual ``cg_tol``) or ``"auto"`` (default: spsolve for CPU inputs, CG otherwise).

**Orders and percentages.** For a removed fraction ``p`` in ``percentages`` (default 0.1, ...,
0.9), ``k = round(p * H * W)`` pixels are removed (pixels ordered by :func:`order_pixels`, ties
broken by tiny seeded noise):

* MoRF (most relevant first, ↓ better): the ``k`` MOST relevant pixels are removed.
* LeRF (least relevant first, ↑ better): the ``k`` LEAST relevant pixels are removed, i.e. the
  ``1 - p`` most relevant are kept — the paper's convention: the x-axis is always the fraction
  removed. (pytorch-grad-cam's ``percentile`` argument is the fraction KEPT, for both orders:
  ``ROADMostRelevantFirst(percentile=80)`` removes the top 20 %, ``ROADLeastRelevantFirst(20)``
  keeps the top 20 %; camlens' ``p`` equals ``1 - percentile / 100`` for both. Its threshold is
  ``np.percentile`` with a strict ``<``, which can remove one pixel more or fewer than ``k``.)

Curves ``(B, T, P)`` hold the softmax probability of the target (``ctx.probs``) on each imputed
image; ``values`` are their mean over ``p``. ``extra["base"]`` ``(B, T)`` is the probability on the
unperturbed image: pytorch-grad-cam's ``ROAD*Average`` with ``ClassifierOutputSoftmaxTarget``
returns the mean change, i.e. ``values - base``.

**Combined score** ``road`` (↑): ``(LeRF_p - MoRF_p) / 2`` averaged over ``p`` — the same as
pytorch-grad-cam's ``ROADCombined`` (the base probability cancels). Its curve is the per-``p``
half gap.

**Images only.** The imputation is a 2-D system over a pixel's 8 neighbours; ROAD's metrics are
not registered for volumes, and ``camlens.evaluate`` on ``(B, C, D, H, W)`` inputs refuses them
with a ConfigError naming the metrics that do score volumes.

Cost: ``B * T * P`` forwards per order and ``B * T * P`` systems of up to ``0.9 H W`` unknowns.
When several ROAD metrics are evaluated together, each order's curves are computed once per
evaluation (cached on the :class:`EvalContext`, keyed by the options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import array_api_compat
import numpy as np

from ..backends.base import namespace, ops_for
from ..core.errors import ConfigError, InputError
from ..core.registry import Option, number, one_of, positive_number
from .base import EvalContext, Metric, MetricResult, Tensor, order_pixels, register_metric

__all__ = ["NEIGHBOURS", "imputation_system", "impute_spsolve", "impute_cg", "noisy_linear_impute", "removal_masks",
           "road_curves", "ROAD", "ROAD_MORF", "ROAD_LERF", "ROAD_COMBINED"]

# (row offset, column offset, weight): 1/6 for the 4 direct neighbours, 1/12 for the 4 diagonal ones
NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
    (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))
PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _neighbour_sum(t: Tensor) -> Tensor:
    """``sum_j w_ij t_j`` over the in-image 8-neighbours of every pixel of ``t`` ``(..., H, W)``
    (zero padding; 8 shifted adds — faster than a 1-channel float64 convolution on the CPU)."""
    xp = namespace(t)
    H, W = t.shape[-2:]
    tp = xp.zeros((*t.shape[:-2], H + 2, W + 2), dtype=t.dtype, device=array_api_compat.device(t))
    tp[..., 1:H + 1, 1:W + 1] = t
    out = xp.zeros_like(t)
    for dr, dc, w in NEIGHBOURS:
        out = out + w * tp[..., 1 + dr:1 + dr + H, 1 + dc:1 + dc + W]
    return out


def imputation_system(removed: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    """The linear system of one removal mask ``(H, W)`` bool (True = removed).

    Returns ``(L, K, idx)``: ``L`` ``(n, n)`` CSC, ``L = D - W_RR`` (SPD); ``K`` ``(n, H*W)`` CSR with
    the weights of the KEPT neighbours, so the right-hand side of channel c is ``K @ v_c.ravel()``;
    ``idx`` ``(n,)`` the flat indices of the removed pixels (row-major), the unknowns' order.
    """
    from scipy.sparse import coo_matrix

    H, W = removed.shape
    rem = removed.ravel().astype(bool)
    idx = np.flatnonzero(rem)
    n = idx.size
    var = np.full(H * W, -1, dtype=np.int64)
    var[idx] = np.arange(n)
    r, c = np.divmod(idx, W)
    diag = np.zeros(n)
    li, lj, lv, ki, kj, kv = [], [], [], [], [], []
    for dr, dc, w in NEIGHBOURS:
        rr, cc = r + dr, c + dc
        inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        diag[inside] += w
        eq = np.flatnonzero(inside)
        nb = rr[inside] * W + cc[inside]
        unknown = rem[nb]
        li.append(eq[unknown]), lj.append(var[nb[unknown]]), lv.append(np.full(int(unknown.sum()), -w))
        ki.append(eq[~unknown]), kj.append(nb[~unknown]), kv.append(np.full(int((~unknown).sum()), w))
    li.append(np.arange(n)), lj.append(np.arange(n)), lv.append(diag)
    L = coo_matrix((np.concatenate(lv), (np.concatenate(li), np.concatenate(lj))), shape=(n, n)).tocsc()
    K = coo_matrix((np.concatenate(kv), (np.concatenate(ki), np.concatenate(kj))), shape=(n, H * W)).tocsr()
    return L, K, idx


def impute_spsolve(img: Tensor, removed: Tensor) -> Tensor:
    """Noise-free linear imputation of one image ``(C, H, W)`` where ``removed`` ``(H, W)`` is True.

    Solves ``L x_c = K v_c`` for all C channels with one sparse LU (scipy, float64, CPU; the arrays
    cross to NumPy and back by ``ops.to_numpy`` / ``ops.asarray``); kept pixels are returned
    unchanged. Same dtype and device as ``img``.
    """
    from scipy.sparse.linalg import spsolve

    xp, ops = namespace(img), ops_for(img)
    C, H, W = img.shape
    rem = ops_for(removed).to_numpy(removed).astype(bool)
    if not rem.any():
        return xp.asarray(img, copy=True)
    if rem.all():
        raise InputError("linear imputation needs at least one kept pixel")
    L, K, idx = imputation_system(rem)
    v = np.asarray(ops.to_numpy(img), dtype=np.float64).reshape(C, H * W)
    x = spsolve(L, np.ascontiguousarray((K @ v.T)))  # (n, C), or (n,) when C == 1
    x = np.asarray(x).reshape(idx.size, C)
    out = v.copy()
    out[:, idx] = x.T
    return xp.astype(ops.asarray(out.reshape(C, H, W), like=img), img.dtype)


def impute_cg(imgs: Tensor, removed: Tensor, tol: float = 1e-6, max_iter: int = 5000) -> Tensor:
    """Noise-free linear imputation of ``N`` images ``(N, C, H, W)``, masks ``(N, H, W)``, by batched CG.

    Matrix-free on the arrays' device: with ``M`` the removed mask and ``k`` the neighbour kernel
    (zero padding, so out-of-image neighbours drop out), ``A x = M (d x - k * (M x))`` and
    ``r = M (k * ((1 - M) v))`` with ``d = k * 1``. Jacobi-preconditioned CG per image and channel,
    started from a normalised-convolution guess (kept pixels blurred into the holes: the backend's
    ``Ops.box_mean``), until ``||A x - r|| <= tol ||r||`` for all of them (checked every 10
    iterations; or ``max_iter``). Computed in float64 (float32 on MPS). Meant for accelerators: on a
    CPU scipy's sparse LU (:func:`impute_spsolve`) is faster (224 x 224, 9 masks: about 6 s against minutes).
    """
    xp, ops = namespace(imgs), ops_for(imgs)
    N, C, H, W = imgs.shape
    dev = array_api_compat.device(imgs)
    dtype = xp.float32 if ops.device_type(imgs) == "mps" else xp.float64  # MPS has no float64
    tiny = 1e-300 if dtype == xp.float64 else 1e-30
    v = xp.reshape(xp.astype(imgs, dtype), (N * C, 1, H, W))
    M = xp.astype(array_api_compat.to_device(removed, dev), dtype)[:, None]
    M = xp.reshape(xp.broadcast_to(M, (N, C, H, W)), (N * C, 1, H, W))

    def rows(a: Tensor) -> Tensor:  # (N C, 1, H, W) -> (N C, H W)
        return xp.reshape(a, (N * C, H * W))

    def col(a: Tensor) -> Tensor:  # (N C,) -> (N C, 1, 1, 1)
        return xp.reshape(a, (-1, 1, 1, 1))

    if bool(xp.any(xp.min(rows(M), axis=1) > 0)):
        raise InputError("linear imputation needs at least one kept pixel per image")
    conv = _neighbour_sum
    d = conv(xp.ones((1, 1, H, W), dtype=dtype, device=dev))

    def A(x: Tensor) -> Tensor:
        return M * (d * x - conv(M * x))

    keep = 1 - M
    r_rhs = M * conv(keep * v)
    # initial guess: normalised convolution of the kept pixels at a few scales (coarse fills big holes)
    x = xp.zeros_like(v)
    filled = xp.zeros_like(v)
    for s in (1, 2, 4, 8, 16, 32):
        if s > max(H, W):
            break
        num = ops.box_mean(keep * v, s)
        den = ops.box_mean(keep, s)
        ok = (den > 1e-8) & (filled == 0)
        x = xp.where(ok, num / xp.clip(den, min=1e-8), x)
        filled = xp.where(ok, xp.ones_like(filled), filled)
    mean_known = xp.sum(rows(keep * v), axis=1) / xp.sum(rows(keep), axis=1)
    x = xp.where(filled > 0, x, col(mean_known)) * M

    r = r_rhs - A(x)
    z = M * r / d
    p = z
    rz = xp.sum(rows(r * z), axis=1)
    norm_b = xp.clip(xp.linalg.vector_norm(rows(r_rhs), axis=1), min=1e-30)
    for it in range(max_iter):
        if it % 10 == 0 and bool(xp.all(xp.linalg.vector_norm(rows(r), axis=1) <= tol * norm_b)):
            break
        Ap = A(p)
        pAp = xp.sum(rows(p * Ap), axis=1)
        alpha = xp.where(pAp > 0, rz / xp.clip(pAp, min=tiny), xp.zeros_like(rz))
        x = x + col(alpha) * p
        r = r - col(alpha) * Ap
        z = M * r / d
        rz_new = xp.sum(rows(r * z), axis=1)
        beta = xp.where(rz > 0, rz_new / xp.clip(rz, min=tiny), xp.zeros_like(rz))
        p = z + col(beta) * p
        rz = rz_new
    out = xp.where(M > 0, x, v)
    return xp.astype(xp.reshape(out, (N, C, H, W)), imgs.dtype)


def noisy_linear_impute(imgs: Tensor, removed: Tensor, noise: float = 0.01, generator: Any = None,
                        solver: str = "auto", cg_tol: float = 1e-6) -> Tensor:
    """ROAD's imputation of ``N`` images ``(N, C, H, W)``: linear fill of ``removed`` ``(N, H, W)``
    plus ``noise * N(0, 1)`` on the removed pixels (float32 draws on the CPU from ``generator``, a
    stream of ``ops.generator(seed)``, ``None``: the global one; so the same seed gives the same
    noise on every device). Kept pixels are unchanged.

    ``solver``: ``"spsolve"``, ``"cg"`` or ``"auto"`` (spsolve for CPU arrays, CG on accelerators).
    """
    xp, ops = namespace(imgs), ops_for(imgs)
    if solver == "auto":
        solver = "spsolve" if ops.device_type(imgs) == "cpu" else "cg"
    if solver == "spsolve":
        out = xp.stack([impute_spsolve(imgs[i], removed[i]) for i in range(imgs.shape[0])])
    elif solver == "cg":
        out = impute_cg(imgs, removed, tol=cg_tol)
    else:
        raise ConfigError(f"ROAD solver must be 'auto', 'cg' or 'spsolve', got {solver!r}")
    if noise:
        gen = generator if generator is not None else ops.generator(None)
        eps = ops.random(imgs.shape, gen, imgs, normal=True)
        rem = array_api_compat.to_device(removed, array_api_compat.device(imgs))[:, None]
        out = xp.where(rem, out + noise * eps, out)
    return out


def removal_masks(order: Tensor, shape: tuple[int, int], percentages: Sequence[float], most_first: bool) -> Tensor:
    """Removal masks ``(P, H, W)`` bool from one pixel order ``(H*W,)`` (descending relevance).

    Mask ``i`` removes ``k_i = round(p_i * H * W)`` pixels: the first ``k_i`` of the order (MoRF,
    ``most_first``) or the last ``k_i`` (LeRF).
    """
    xp = namespace(order)
    n = order.shape[0]
    rank = xp.argsort(order)  # the inverse permutation: rank 0 = most relevant
    if not most_first:
        rank = n - 1 - rank  # rank 0 = least relevant
    ks = xp.asarray([int(round(p * n)) for p in percentages], dtype=rank.dtype, device=array_api_compat.device(order))
    return xp.reshape(rank[None, :] < ks[:, None], (len(percentages), *shape))


def road_curves(ctx: EvalContext, metric: Metric, most_first: bool) -> tuple[Tensor, Tensor]:
    """Probability curves ``(B, T, P)`` for one order and the base probabilities ``(B, T)``.

    The options (``percentages``, ``noise``, ``seed``, ``tie_noise``, ``solver``, ``cg_tol``) are
    read from ``metric``; results are cached on ``ctx`` per order and option values.
    """
    opts = {k: ctx.opt(metric, k) for k in ("percentages", "noise", "seed", "tie_noise", "solver", "cg_tol")}
    pcts = tuple(float(p) for p in opts["percentages"])
    if not pcts or not all(0.0 <= p < 1.0 for p in pcts):
        raise ConfigError(f"ROAD percentages must be fractions in [0, 1) (removed share), got {opts['percentages']!r}")
    key = (most_first, pcts, float(opts["noise"]), int(opts["seed"]), float(opts["tie_noise"]), opts["solver"],
           float(opts["cg_tol"]))
    cache = ctx.__dict__.setdefault("_road_cache", {})
    if key in cache:
        return cache[key]
    x, maps = ctx.inputs, ctx.maps
    xp, ops = namespace(maps), ops_for(maps)
    dev = array_api_compat.device(maps)
    B, T, H, W = maps.shape
    tie_gen = ops.generator(int(opts["seed"]), like=maps)
    order = order_pixels(maps, generator=tie_gen, tie_noise=float(opts["tie_noise"]))  # (B, T, H*W)
    noise_gen = ops_for(x).generator(int(opts["seed"]))  # on the CPU: the same noise on every device
    P = len(pcts)
    curves, base = [], []
    for b in range(B):
        base.append(array_api_compat.to_device(ctx.probs(x[b:b + 1], b)[0], dev))
        for t in range(T):
            masks = removal_masks(order[b, t], (H, W), pcts, most_first)
            xs = noisy_linear_impute(xp.broadcast_to(x[b:b + 1], (P, *x.shape[1:])), masks, float(opts["noise"]),
                                     noise_gen, opts["solver"], float(opts["cg_tol"]))
            curves.append(array_api_compat.to_device(ctx.probs(xs, b)[:, t], dev))
    curves = xp.astype(xp.reshape(xp.stack(curves), (B, T, P)), xp.float32, copy=False)
    base = xp.astype(xp.stack(base), xp.float32, copy=False)
    cache[key] = (curves, base)
    return curves, base


@dataclass(frozen=True)
class ROAD(Metric):
    """ROAD MoRF / LeRF / combined (``order`` = ``"morf"``, ``"lerf"`` or ``"both"``); see the module doc."""

    order: str = "morf"

    def __call__(self, ctx: EvalContext) -> MetricResult:
        xp = namespace(ctx.maps)
        pcts = xp.asarray([float(p) for p in ctx.opt(self, "percentages")], dtype=xp.float32)
        if self.order in ("morf", "lerf"):
            curves, base = road_curves(ctx, self, most_first=self.order == "morf")
            return MetricResult(values=xp.mean(curves, axis=-1), curves=curves,
                                extra={"percentages": pcts, "base": base})
        morf, base = road_curves(ctx, self, most_first=True)
        lerf, _ = road_curves(ctx, self, most_first=False)
        gap = (lerf - morf) / 2
        return MetricResult(values=xp.mean(gap, axis=-1), curves=gap,
                            extra={"percentages": pcts, "base": base, "morf": morf, "lerf": lerf})


_DEFAULTS = {"percentages": PERCENTAGES, "noise": Option(0.01, lambda v: None if number(v) is None and v >= 0 else "a number >= 0",
                                                         "std of the imputation noise"),
             "seed": 0, "tie_noise": 1e-6, "solver": Option("auto", one_of("auto", "cg", "spsolve"), "linear solver"),
             "cg_tol": Option(1e-6, positive_number, "conjugate-gradient tolerance")}

ROAD_MORF = register_metric(ROAD(
    name="road_morf", higher_is_better=False, category="faithfulness",
    description="ROAD MoRF (Rong et al. 2022): probability after removing the most relevant p% with noisy "
                "linear imputation, mean over p = 0.1..0.9", defaults=dict(_DEFAULTS), order="morf"))
ROAD_LERF = register_metric(ROAD(
    name="road_lerf", higher_is_better=True, category="faithfulness",
    description="ROAD LeRF (Rong et al. 2022): probability after removing the least relevant p% with noisy "
                "linear imputation, mean over p = 0.1..0.9", defaults=dict(_DEFAULTS), order="lerf"))
ROAD_COMBINED = register_metric(ROAD(
    name="road", higher_is_better=True, category="faithfulness",
    description="ROAD combined: (LeRF - MoRF) / 2 averaged over p = 0.1..0.9 (pytorch-grad-cam's ROADCombined)",
    defaults=dict(_DEFAULTS), order="both"))
