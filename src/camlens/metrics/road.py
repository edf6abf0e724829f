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

Cost: ``B * T * P`` forwards per order and ``B * T * P`` systems of up to ``0.9 H W`` unknowns.
When several ROAD metrics are evaluated together, each order's curves are computed once per
evaluation (cached on the :class:`EvalContext`, keyed by the options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Option, number, one_of, positive_number
from .base import EvalContext, Metric, MetricResult, order_pixels, register_metric
from ..errors import ConfigError, InputError

__all__ = ["NEIGHBOURS", "imputation_system", "impute_spsolve", "impute_cg", "noisy_linear_impute", "removal_masks",
           "road_curves", "ROAD", "ROAD_MORF", "ROAD_LERF", "ROAD_COMBINED"]

# (row offset, column offset, weight): 1/6 for the 4 direct neighbours, 1/12 for the 4 diagonal ones
NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
    (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))
PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _neighbour_sum(t: Tensor) -> Tensor:
    """``sum_j w_ij t_j`` over the in-image 8-neighbours of every pixel of ``t`` ``(..., H, W)``
    (zero padding; 8 shifted adds — faster than a 1-channel float64 ``conv2d`` on the CPU)."""
    H, W = t.shape[-2:]
    tp = F.pad(t, (1, 1, 1, 1))
    out = torch.zeros_like(t)
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

    Solves ``L x_c = K v_c`` for all C channels with one sparse LU (scipy, float64, CPU); kept
    pixels are returned unchanged. Same dtype and device as ``img``.
    """
    from scipy.sparse.linalg import spsolve

    C, H, W = img.shape
    rem = removed.detach().cpu().numpy().astype(bool)
    if not rem.any():
        return img.clone()
    if rem.all():
        raise InputError("linear imputation needs at least one kept pixel")
    L, K, idx = imputation_system(rem)
    v = img.detach().cpu().double().reshape(C, H * W).numpy()
    x = spsolve(L, np.ascontiguousarray((K @ v.T)))  # (n, C), or (n,) when C == 1
    x = np.asarray(x).reshape(idx.size, C)
    out = img.detach().cpu().double().reshape(C, H * W).clone()
    out[:, torch.from_numpy(idx)] = torch.from_numpy(x.T.copy())
    return out.reshape(C, H, W).to(device=img.device, dtype=img.dtype)


def impute_cg(imgs: Tensor, removed: Tensor, tol: float = 1e-6, max_iter: int = 5000) -> Tensor:
    """Noise-free linear imputation of ``N`` images ``(N, C, H, W)``, masks ``(N, H, W)``, by batched CG.

    Matrix-free on the tensors' device: with ``M`` the removed mask and ``k`` the neighbour kernel
    (zero padding, so out-of-image neighbours drop out), ``A x = M (d x - k * (M x))`` and
    ``r = M (k * ((1 - M) v))`` with ``d = k * 1``. Jacobi-preconditioned CG per image and channel,
    started from a normalised-convolution guess (kept pixels blurred into the holes), until
    ``||A x - r|| <= tol ||r||`` for all of them (checked every 10 iterations; or ``max_iter``).
    Computed in float64 (float32 on MPS). Meant for accelerators: on a CPU scipy's sparse LU
    (:func:`impute_spsolve`) is faster (224 x 224, 9 masks: about 6 s against minutes).
    """
    N, C, H, W = imgs.shape
    dtype = torch.float32 if imgs.device.type == "mps" else torch.float64  # MPS has no float64
    v = imgs.detach().to(dtype).reshape(N * C, 1, H, W)
    M = removed.to(device=imgs.device, dtype=dtype)[:, None].expand(N, C, H, W).reshape(N * C, 1, H, W)
    if bool((M.flatten(1).amin(1) > 0).any()):
        raise InputError("linear imputation needs at least one kept pixel per image")
    conv = _neighbour_sum
    d = conv(torch.ones(1, 1, H, W, dtype=dtype, device=imgs.device))

    def A(x: Tensor) -> Tensor:
        return M * (d * x - conv(M * x))

    keep = 1 - M
    r_rhs = M * conv(keep * v)
    # initial guess: normalised convolution of the kept pixels at a few scales (coarse fills big holes)
    x = torch.zeros_like(v)
    filled = torch.zeros_like(v)
    for s in (1, 2, 4, 8, 16, 32):
        if s > max(H, W):
            break
        ks = 2 * s + 1
        num = F.avg_pool2d(keep * v, ks, stride=1, padding=s, count_include_pad=False)
        den = F.avg_pool2d(keep, ks, stride=1, padding=s, count_include_pad=False)
        ok = (den > 1e-8) & (filled == 0)
        x = torch.where(ok, num / den.clamp_min(1e-8), x)
        filled = torch.where(ok, torch.ones_like(filled), filled)
    mean_known = (keep * v).flatten(1).sum(1) / keep.flatten(1).sum(1)
    x = torch.where(filled > 0, x, mean_known.view(-1, 1, 1, 1)) * M

    r = r_rhs - A(x)
    z = M * r / d
    p = z.clone()
    rz = (r * z).flatten(1).sum(1)
    norm_b = r_rhs.flatten(1).norm(dim=1).clamp_min(1e-30)
    for it in range(max_iter):
        if it % 10 == 0 and bool((r.flatten(1).norm(dim=1) <= tol * norm_b).all()):
            break
        Ap = A(p)
        pAp = (p * Ap).flatten(1).sum(1)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(1e-300 if dtype == torch.float64 else 1e-30),
                            torch.zeros_like(rz))
        x = x + alpha.view(-1, 1, 1, 1) * p
        r = r - alpha.view(-1, 1, 1, 1) * Ap
        z = M * r / d
        rz_new = (r * z).flatten(1).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300 if dtype == torch.float64 else 1e-30),
                           torch.zeros_like(rz))
        p = z + beta.view(-1, 1, 1, 1) * p
        rz = rz_new
    out = torch.where(M > 0, x, v)
    return out.reshape(N, C, H, W).to(imgs.dtype)


def noisy_linear_impute(imgs: Tensor, removed: Tensor, noise: float = 0.01, generator: Optional[torch.Generator] = None,
                        solver: str = "auto", cg_tol: float = 1e-6) -> Tensor:
    """ROAD's imputation of ``N`` images ``(N, C, H, W)``: linear fill of ``removed`` ``(N, H, W)``
    plus ``noise * N(0, 1)`` on the removed pixels (drawn on the CPU from ``generator``, so the same
    seed gives the same noise on every device). Kept pixels are unchanged.

    ``solver``: ``"spsolve"``, ``"cg"`` or ``"auto"`` (spsolve for CPU tensors, CG on accelerators).
    """
    if solver == "auto":
        solver = "spsolve" if imgs.device.type == "cpu" else "cg"
    if solver == "spsolve":
        out = torch.stack([impute_spsolve(im, m) for im, m in zip(imgs, removed)])
    elif solver == "cg":
        out = impute_cg(imgs, removed, tol=cg_tol)
    else:
        raise ConfigError(f"ROAD solver must be 'auto', 'cg' or 'spsolve', got {solver!r}")
    if noise:
        eps = torch.randn(imgs.shape, generator=generator, dtype=torch.float32).to(imgs.device, imgs.dtype)
        out = torch.where(removed[:, None].to(imgs.device), out + noise * eps, out)
    return out


def removal_masks(order: Tensor, shape: tuple[int, int], percentages: Sequence[float], most_first: bool) -> Tensor:
    """Removal masks ``(P, H, W)`` bool from one pixel order ``(H*W,)`` (descending relevance).

    Mask ``i`` removes ``k_i = round(p_i * H * W)`` pixels: the first ``k_i`` of the order (MoRF,
    ``most_first``) or the last ``k_i`` (LeRF).
    """
    n = order.numel()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=order.device)  # rank 0 = most relevant
    if not most_first:
        rank = n - 1 - rank  # rank 0 = least relevant
    ks = torch.tensor([int(round(p * n)) for p in percentages], device=order.device)
    return (rank[None, :] < ks[:, None]).reshape(len(percentages), *shape)


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
    B, T, H, W = maps.shape
    tie_gen = torch.Generator(device=maps.device).manual_seed(int(opts["seed"]))
    order = order_pixels(maps, generator=tie_gen, tie_noise=float(opts["tie_noise"]))  # (B, T, H*W)
    noise_gen = torch.Generator().manual_seed(int(opts["seed"]))
    curves = torch.empty(B, T, len(pcts), device=maps.device)
    base = torch.empty(B, T, device=maps.device)
    for b in range(B):
        base[b] = ctx.probs(x[b:b + 1], b)[0].to(maps.device)
        for t in range(T):
            masks = removal_masks(order[b, t], (H, W), pcts, most_first)
            xs = noisy_linear_impute(x[b:b + 1].expand(len(pcts), -1, -1, -1), masks, float(opts["noise"]),
                                     noise_gen, opts["solver"], float(opts["cg_tol"]))
            curves[b, t] = ctx.probs(xs, b)[:, t].to(maps.device)
    cache[key] = (curves, base)
    return curves, base


@dataclass(frozen=True)
class ROAD(Metric):
    """ROAD MoRF / LeRF / combined (``order`` = ``"morf"``, ``"lerf"`` or ``"both"``); see the module doc."""

    order: str = "morf"

    def __call__(self, ctx: EvalContext) -> MetricResult:
        pcts = torch.tensor([float(p) for p in ctx.opt(self, "percentages")])
        if self.order in ("morf", "lerf"):
            curves, base = road_curves(ctx, self, most_first=self.order == "morf")
            return MetricResult(values=curves.mean(-1), curves=curves, extra={"percentages": pcts, "base": base})
        morf, base = road_curves(ctx, self, most_first=True)
        lerf, _ = road_curves(ctx, self, most_first=False)
        gap = (lerf - morf) / 2
        return MetricResult(values=gap.mean(-1), curves=gap,
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
