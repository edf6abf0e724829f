"""Model-agnostic perturbation methods: LIME, KernelSHAP (over superpixels) and RISE (random masks).

They only need the model's target scores on perturbed images (``ctx.runner.scores``), so they
work on any backend's model. For image ``b`` with its ``M`` segments ``s`` ``(H, W)`` (labels
``0 .. M-1``) and a baseline image ``r`` (what a hidden segment shows), a coalition ``z in {0, 1}^M``
is the image

    x(z) = r + z[s] * (x - r)                                        (C, H, W)

(segment m visible where ``z_m = 1``); ``f_t(z)`` is target t's score on it. A method fits a weight
``phi[t, m]`` per segment from N coalitions; the map is ``phi[t, s]`` ``(T, H, W)`` at pixel
resolution, and ``exp.segments`` ``(B, H, W)`` / ``exp.weights`` ``(B, T, M)`` keep both.

**KernelSHAP** (Lundberg & Lee 2017): the weighted linear regression with the Shapley kernel

    pi(z) = (M - 1) / (C(M, |z|) |z| (M - |z|))      (0 < |z| < M)
    phi   = argmin sum_z pi(z) (f(z) - f(0) - z . phi)^2   subject to  sum_m phi_m = f(1) - f(0)

(the efficiency constraint exact, by eliminating ``phi_M``; ``f(1)`` = the image, ``f(0)`` = the
baseline). When ``2^M <= n_samples`` every coalition is enumerated and ``phi`` are the exact
Shapley values. Otherwise, as shap's KernelExplainer: coalition sizes are taken from the outside
in (``k`` and ``M - k`` together) and enumerated completely while the budget's share of the
kernel's mass covers all of them (each with its weight ``pi(z)``). The rest of the budget samples
the other sizes, starting with an orthogonal design (:func:`hadamard_coalitions`): the ``q - 1``
non-constant rows of a Sylvester-Hadamard matrix (``q = 2^ceil(log2 M)``) on random columns, then
their complements. With the end points the first ``M`` rows determine an additive game exactly (the
``+-1`` design has orthogonal columns), and the rows with their complements, ``2 (q - 1) + 2``
evaluations, determine the values of any game with interactions up to order two (a complementary
pair's difference ``f(z) - f(1 - z)`` holds only the game's odd orders, and the constraint removes
the rest); at a budget of ``2 M`` this design reaches Pearson r >= 0.95 with the exact values where
random draws need 2-30x more evaluations (``benchmarks/perturbation.py``). After it: a size from the
kernel's size distribution ``p(k) ~ (M - 1) / (k (M - k))``, a uniform subset of that size and its
complement (paired / antithetic), each distinct coalition evaluated once (a repeated draw adds to
its weight instead of costing a forward: sampling without replacement of evaluations), until
``n_samples - 2`` distinct coalitions are drawn; the sampled coalitions (the orthogonal start counted
as one draw each) share the remaining kernel mass in proportion to their draw counts, so the start's
share of the weight falls as the budget grows and the fit converges to the Shapley values.
``n_samples`` counts every forward, the two end points ``f(1)``, ``f(0)`` included (as captum counts).

**LIME** (Ribeiro et al. 2016): ``N = n_samples`` coalitions, each marginally a uniform random
coalition (every segment kept with probability 1/2, captum's ``Lime`` default) but drawn as
randomised orthogonal arrays, folded over (``z`` then ``1 - z``) once ``n_samples >= 3 M``
(:func:`lime_coalitions`; ``design="random"``: independent rows); the weighted ridge regression
with an intercept

    pi(z) = exp(-d(z)^2 / (2 w^2)),   d(z) = 1 - cos(z, 1) = 1 - sqrt(|z| / M)   (d = 1 when z = 0)
    (phi, c) = argmin sum_z pi(z) (f(z) - c - z . phi)^2 + alpha |phi|^2

with kernel width ``w = kernel_width`` (0.25, lime_image's) and ``alpha`` (1.0, lime's
``Ridge``; 0 = ordinary least squares). The cosine distance is lime_image's, in the interpretable
space; captum's default ``get_exp_kernel_similarity_function("cosine", 1.0)`` measures it between
the flattened perturbed and original *input tensors* (it then depends on the baseline and the pixel
values) with ``w = 1``, and fits ``SkLearnLasso(alpha=0.01)``.

**RISE** (Petsiuk et al. 2018): N random smooth masks ``M_i`` ``(H, W)`` (:func:`rise_masks`; a
``grid x grid`` binary grid kept with probability ``p``, upsampled and randomly shifted, as D-RISE's
in :mod:`camlens.methods.drise`), the images ``r + M_i (x - r)``, and

    S_t = sum_i (f_t(M_i) - mean_i f_t(M_i)) M_i / (N p)                                   (H, W)

(centred scores: a logit's offset means nothing). Drawn on the host with NumPy, so a seed gives the
same masks on every backend and device.

Superpixels (``segments=``), on the image min-max scaled to [0, 1] (channels last), with
``s = sqrt(H W) / 224`` (the scale of lime_image's defaults, which were made for 224 px):
``"slic"`` ``slic(n_segments=50, compactness=10 (0.1 without 3 colour channels), sigma=1)``;
``"quickshift"`` lime_image's ``quickshift(kernel_size=4 s, max_dist=200 s, ratio=0.2)``;
``"felzenszwalb"`` ``felzenszwalb(scale=100 s^2, sigma=0.8, min_size=20 s^2)``; or an int array
``(H, W)`` (every image) or ``(B, H, W)`` of labels (any ints: relabelled ``0 .. M-1`` in sorted
order). scikit-image (``pip install scikit-image``) is needed for the named ones.

Baselines (``baseline=``): ``"mean"`` (each image's mean colour per channel), ``"blur"`` (Gaussian,
``blur_sigma`` pixels), a number (in the model's input space) or an image ``(C, H, W)`` /
``(B, C, H, W)``.

Cost: ``n_samples`` forwards per image (RISE: ``n_masks``), in chunks of ``batch_size``, all T
targets from the same forwards; no backward. Perturbed images are built chunk by chunk.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..backends.base import bilinear_matrix, namespace
from ..core.errors import ConfigError, InputError
from ..core.registry import Option, fraction, positive_int, positive_number
from .base import Method, MethodContext, MethodOutput, Tensor, register
from .drise import rise_crop, rise_map
from .occlusion import occlusion_fill

__all__ = ["superpixels", "perturbation_baseline", "kernelshap_coalitions", "hadamard_coalitions", "sylvester_plus",
           "lime_coalitions", "lime_kernel",
           "shapley_kernel", "solve_kernelshap", "solve_lime", "rise_masks", "Lime", "KernelShap", "Rise", "LIME",
           "KERNELSHAP", "RISE"]

SEGMENTERS = ("slic", "quickshift", "felzenszwalb")


# ------------------------------------------------------------------------------------------------
# segments and baselines


def _segment_one(img: np.ndarray, how: str) -> np.ndarray:
    """Superpixels ``(H, W)`` of one image ``(C, H, W)`` (host float) by scikit-image (see the module docs)."""
    try:
        from skimage import segmentation as seg
    except ImportError:  # pragma: no cover - scikit-image is in the dev extra
        raise ConfigError(f"segments={how!r} needs scikit-image (pip install scikit-image), or give the segments "
                          "as an int array (H, W)") from None
    C, H, W = img.shape
    lo, hi = float(img.min()), float(img.max())
    im = np.moveaxis((img - lo) / (hi - lo if hi > lo else 1.0), 0, -1).astype(np.float64)  # (H, W, C) in [0, 1]
    s = math.sqrt(H * W) / 224
    if how == "slic":
        return seg.slic(im if C > 1 else im[..., 0], n_segments=50, compactness=10.0 if C == 3 else 0.1, sigma=1.0,
                        start_label=0, channel_axis=-1 if C > 1 else None)
    if how == "quickshift":
        rgb = im if C == 3 else np.repeat(im.mean(-1, keepdims=True), 3, axis=-1)
        return seg.quickshift(rgb, kernel_size=max(1.0, 4 * s), max_dist=200 * s, ratio=0.2, convert2lab=C == 3)
    return seg.felzenszwalb(im if C > 1 else im[..., 0], scale=100 * s * s, sigma=0.8,
                            min_size=max(1, round(20 * s * s)), channel_axis=-1 if C > 1 else None)


def superpixels(x: np.ndarray, segments: Any) -> np.ndarray:
    """Segment indices ``(B, H, W)`` int32, each image's labelled ``0 .. M_b - 1``, for host images
    ``x`` ``(B, C, H, W)``: ``segments`` is a scikit-image method name or user labels ``(H, W)`` /
    ``(B, H, W)`` (relabelled in sorted order of the given labels)."""
    B, _, H, W = x.shape
    if isinstance(segments, str):
        if segments not in SEGMENTERS:
            raise ConfigError(f"segments must be one of {', '.join(map(repr, SEGMENTERS))} or an int array (H, W), "
                              f"got {segments!r}")
        labels = np.stack([_segment_one(x[b], segments) for b in range(B)])
    else:
        labels = np.asarray(segments)
        if labels.ndim == 2:
            labels = np.broadcast_to(labels, (B, *labels.shape))
        if labels.ndim != 3 or labels.shape[1:] != (H, W) or labels.shape[0] != B:
            raise InputError(f"segments must be an int array (H, W) = ({H}, {W}) or (B, H, W) = ({B}, {H}, {W}) for "
                             f"this input, got shape {tuple(labels.shape)}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"segments must hold integer labels, got dtype {labels.dtype}")
    return np.stack([np.unique(lab, return_inverse=True)[1].reshape(H, W) for lab in labels]).astype(np.int32)


def perturbation_baseline(x: Tensor, baseline: Any, blur_sigma: float, ops: Any) -> Tensor:
    """What hidden pixels show, broadcastable to ``x`` ``(B, C, H, W)``: ``"mean"`` each image's mean
    per channel ``(B, C, 1, 1)``; else :func:`camlens.methods.occlusion.occlusion_fill` (``"blur"``,
    a number, an image)."""
    if isinstance(baseline, str) and baseline == "mean":
        xp = namespace(x)
        return xp.mean(x, axis=(-2, -1), keepdims=True)
    return occlusion_fill(x, baseline, blur_sigma, ops)


# ------------------------------------------------------------------------------------------------
# coalitions and kernels (host NumPy, float64)


def shapley_kernel(M: int, k: np.ndarray) -> np.ndarray:
    """The Shapley kernel of a coalition of size ``k`` (``0 < k < M``): ``(M-1) / (C(M, k) k (M-k))``."""
    k = np.asarray(k, dtype=np.float64)
    comb = np.array([math.comb(M, int(v)) for v in k.ravel()], dtype=np.float64).reshape(k.shape)
    return (M - 1) / (comb * k * (M - k))


def sylvester_plus(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(len(rows), len(cols))`` bool: where the Sylvester-Hadamard matrix (any power-of-two order above
    the indices) is +1, its entry ``(r, c)`` being ``(-1)^popcount(r & c)``."""
    parity = np.zeros((len(rows), len(cols)), np.int64)
    rc = np.asarray(rows, np.int64)[:, None] & np.asarray(cols, np.int64)[None, :]
    while rc.any():
        parity ^= rc & 1
        rc = rc >> 1
    return parity == 0


def hadamard_coalitions(M: int, rng: np.random.Generator) -> np.ndarray:
    """``(q - 1, M)`` uint8: rows ``1 .. q-1`` of the Sylvester-Hadamard matrix of order
    ``q = 2^ceil(log2 M)`` on ``M`` distinct random columns, as coalitions (kept where +1), in random
    order. Row 0 is the end point ``z = 1``; with it and ``z = 0`` the ``+-1`` design ``2 z - 1`` has
    orthogonal columns, so ``M`` rows determine an additive model exactly and the rows with their
    complements (``2 (q - 1)`` coalitions) determine every value of a game with interactions up to
    order two (the complementary pairs cancel the even orders). No row is constant or another row's
    complement (each non-constant row has ``q/2 < M`` entries +1)."""
    q = 1 << max(1, math.ceil(math.log2(M)))
    cols = rng.permutation(q)[:M]
    return sylvester_plus(rng.permutation(np.arange(1, q)), cols).astype(np.uint8)


def kernelshap_coalitions(M: int, n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(Z (N, M) uint8, weights (N,))``: KernelSHAP's coalitions other than the end points, and
    their regression weights (see the module docs). ``n_samples`` counts the two end points too;
    ``2^M <= n_samples``: all ``2^M - 2`` coalitions with ``pi(z)`` (exact Shapley values)."""
    if M < 2:
        return np.zeros((0, M), np.uint8), np.zeros(0)
    sizes = np.arange(1, M)
    mass = (M - 1) / (sizes * (M - sizes))  # total kernel weight of each size: C(M,k) pi(z)
    rows: list[np.ndarray] = []
    wts: list[float] = []

    def enumerate_size(k: int) -> None:
        w = float(shapley_kernel(M, np.array([k]))[0])
        for idx in combinations(range(M), k):
            z = np.zeros(M, np.uint8)
            z[list(idx)] = 1
            rows.append(z)
            wts.append(w)

    if 2 ** M <= n_samples:
        for k in range(1, M):
            enumerate_size(k)
        return np.stack(rows), np.asarray(wts)
    budget = max(n_samples - 2, 0)
    left = {int(k): float(m) for k, m in zip(sizes, mass)}  # sizes not enumerated yet -> their mass
    for k in range(1, M // 2 + 1):  # outside in: sizes k and M - k together
        pair = sorted({k, M - k})
        count = sum(math.comb(M, s) for s in pair)
        share = sum(left[s] for s in pair) / sum(left.values())
        if budget * share + 1e-9 < count:
            break
        for s in pair:
            enumerate_size(s)
            del left[s]
        budget -= count
    if left and budget > 0:
        counts: dict[bytes, list] = {}
        # an orthogonal start: Sylvester-Hadamard rows (their sizes not enumerated above), then complements
        H = hadamard_coalitions(M, rng)
        H = H[np.isin(H.sum(1), list(left))]
        for v in (*H, *(1 - H)):
            if len(counts) >= budget:
                break
            counts.setdefault(v.tobytes(), [v, 0])[1] += 1
        lower = sorted(s for s in left if s <= M - s)  # draw a size <= M/2, add the subset and its complement
        p = np.array([left[s] + (left[M - s] if M - s != s else 0.0) for s in lower])
        p /= p.sum()
        draws, cap = 0, 1000 * budget + 1000
        while len(counts) < budget and draws < cap:
            k = lower[int(rng.choice(len(lower), p=p))]
            z = np.zeros(M, np.uint8)
            z[rng.choice(M, size=k, replace=False)] = 1
            for v in (z, 1 - z):
                key = v.tobytes()
                if key in counts:
                    counts[key][1] += 1
                elif len(counts) < budget:
                    counts[key] = [v, 1]
            draws += 1
        total = sum(c for _, c in counts.values())
        rest = sum(left.values())
        for v, c in counts.values():
            rows.append(v)
            wts.append(rest * c / total)
    if not rows:
        return np.zeros((0, M), np.uint8), np.zeros(0)
    return np.stack(rows), np.asarray(wts)


def lime_coalitions(M: int, n_samples: int, rng: np.random.Generator, design: str = "orthogonal") -> np.ndarray:
    """LIME's coalitions ``(n_samples, M)`` uint8. Every row is a uniform random coalition (each segment
    kept with probability 1/2, captum's ``Lime`` distribution); ``design`` says how the rows depend on
    each other:

    * ``"random"``: independent rows (captum, lime_image).
    * ``"orthogonal"``: randomised orthogonal arrays — the rows of a Sylvester-Hadamard matrix of order
      ``q`` (``q`` a power of two ``> M``) on ``M`` distinct random non-constant columns, each column's sign
      flipped at random, in random row order: within a block of ``q`` rows every segment is kept in
      exactly half and every two segments are kept together in exactly a quarter (strength 2: the
      columns are balanced and uncorrelated, not just on average). With ``n_samples >= 3 M`` the design
      is folded over: the first half's rows are followed by their complements ``1 - z``, which cancels
      the two-segment interactions out of the segment effects (a resolution-IV design), as KernelSHAP's
      complementary pairs do. Blocks are as large as the budget allows (one block of ``q`` rows when it
      fits, more blocks with fresh columns and signs otherwise).

    The random signs make each row marginally uniform, so the fit converges to the same LIME solution
    as with ``"random"``, at lower variance across seeds (``benchmarks/perturbation.py``)."""
    if design == "random":
        return (rng.random((n_samples, M)) < 0.5).astype(np.uint8)
    if design != "orthogonal":
        raise ConfigError(f"design must be 'orthogonal' or 'random', got {design!r}")
    fold = n_samples >= 3 * M
    m = (n_samples + 1) // 2 if fold else n_samples
    q = 1 << max(1, math.ceil(math.log2(M + 1)))  # the smallest Hadamard order with M non-constant columns
    while 2 * q <= m:
        q *= 2
    blocks, have = [], 0
    while have < m:
        cols = rng.choice(np.arange(1, q), size=M, replace=False)
        rows = rng.permutation(q)[:m - have]
        flip = rng.random(M) < 0.5
        blocks.append((sylvester_plus(rows, cols) != flip[None, :]).astype(np.uint8))  # entry * sign = +1
        have += len(rows)
    Z = np.concatenate(blocks)
    return np.concatenate([Z, 1 - Z])[:n_samples] if fold else Z


def lime_kernel(Z: np.ndarray, kernel_width: float) -> np.ndarray:
    """LIME's weights ``(N,)``: ``exp(-d^2 / (2 w^2))``, ``d = 1 - cos(z, 1) = 1 - sqrt(|z| / M)``."""
    M = Z.shape[1]
    d = 1.0 - np.sqrt(Z.sum(axis=1, dtype=np.float64) / max(M, 1))
    return np.exp(-d ** 2 / (2 * kernel_width ** 2))


def solve_kernelshap(Z: np.ndarray, w: np.ndarray, y: np.ndarray, f1: np.ndarray, f0: np.ndarray) -> np.ndarray:
    """``phi`` ``(T, M)``: ``argmin sum_i w_i (y_i - f0 - z_i . phi)^2`` subject to ``sum phi = f1 - f0``,
    for coalitions ``Z`` ``(N, M)``, weights ``(N,)``, scores ``y`` ``(N, T)`` and the end points ``(T,)``
    (``phi_M`` eliminated; least squares by ``lstsq``, the minimum-norm solution if underdetermined)."""
    N, M = Z.shape
    delta = f1 - f0  # (T,)
    if M == 1 or N == 0:
        return np.tile(delta[:, None] / M, (1, M))
    Zf = Z.astype(np.float64)
    A = Zf[:, :-1] - Zf[:, -1:]  # (N, M-1)
    r = (y - f0[None]) - Zf[:, -1:] * delta[None]  # (N, T)
    sw = np.sqrt(w)[:, None]
    phi, *_ = np.linalg.lstsq(sw * A, sw * r, rcond=None)  # (M-1, T)
    return np.concatenate([phi, delta[None] - phi.sum(0, keepdims=True)]).T


def solve_lime(Z: np.ndarray, w: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """``phi`` ``(T, M)`` of the weighted ridge regression with an intercept (scikit-learn's ``Ridge``
    with ``sample_weight``): weighted centring, then ``(Zc' W Zc + alpha I) phi = Zc' W yc``."""
    Zf = Z.astype(np.float64)
    wn = w / w.sum()
    Zc = Zf - wn @ Zf
    yc = y - wn @ y
    G = Zc.T @ (w[:, None] * Zc) + alpha * np.eye(Z.shape[1])
    phi, *_ = np.linalg.lstsq(G, Zc.T @ (w[:, None] * yc), rcond=None)
    return phi.T


def rise_masks(n: int, size: tuple[int, int], grid: int, p: float, seed: int) -> np.ndarray:
    """RISE's masks ``(n, H, W)`` float32 (host), in one array: see :func:`rise_mask_chunks`."""
    return np.concatenate(list(rise_mask_chunks(n, size, grid, p, seed, n)))


def rise_mask_chunks(n: int, size: tuple[int, int], grid: int, p: float, seed: int,
                     chunk: int) -> Iterator[np.ndarray]:
    """RISE's masks in chunks ``(k, H, W)`` float32: grids ``(n, grid, grid)`` kept where a uniform draw
    of ``np.random.default_rng(seed)`` is ``< p``, then ``n`` shifts ``floor(u * cell)``; each chunk
    upsampled (bilinear, half-pixel) and cropped by :func:`camlens.methods.drise.rise_crop`."""
    H, W = size
    rng = np.random.default_rng(seed)
    cells = (rng.random((n, grid, grid), dtype=np.float32) < p).astype(np.float32)
    shifts = np.floor(rng.random((n, 2)) * np.array([math.ceil(H / grid), math.ceil(W / grid)])).astype(np.int64)
    up_h, up_w = (grid + 1) * math.ceil(H / grid), (grid + 1) * math.ceil(W / grid)
    ry, rx = bilinear_matrix(grid, up_h).astype(np.float32), bilinear_matrix(grid, up_w).astype(np.float32)
    for i in range(0, n, chunk):
        yield rise_crop(cells[i:i + chunk], shifts[i:i + chunk], size, lambda c, _: ry @ c @ rx.T, np)


# ------------------------------------------------------------------------------------------------
# evaluation


class _Progress:
    """A Rich progress bar over the forwards of one call, shown when ``progress`` is True, or when it is
    None, stderr is a terminal and the call has at least 20 forwards."""

    def __init__(self, progress: Optional[bool], total: int, what: str) -> None:
        show = progress if progress is not None else (total >= 20 and sys.stderr.isatty())
        self.bar: Any = None
        if show:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(what, total=total)
            self.bar.start()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _scores(ctx: MethodContext, b: int, fill: Tensor, masks: Iterator[np.ndarray], bs: int, bar: _Progress,
            on_chunk: Optional[Callable[[np.ndarray, np.ndarray], None]] = None) -> np.ndarray:
    """Scores ``(N, T)`` float64 of image b's targets on ``r + m (x_b - r)`` for the host masks ``m``
    ``(k, H, W)`` of each chunk (``on_chunk(masks, scores)`` sees both)."""
    xp, ops = ctx.xp, ctx.ops
    xb = ctx.inputs[b:b + 1]
    rb = fill[b:b + 1] if fill.ndim == 4 and fill.shape[0] == ctx.inputs.shape[0] else fill
    diff = xb - rb
    out = []
    for m in masks:
        mk = xp.astype(ops.asarray(np.ascontiguousarray(m), like=xb), xb.dtype)[:, None]  # (k, 1, H, W)
        s = ops.to_numpy(xp.astype(ctx.runner.scores(rb + mk * diff, b, bs), xp.float32)).astype(np.float64)
        out.append(s)
        if on_chunk is not None:
            on_chunk(m, s)
        bar.step()
    return np.concatenate(out) if out else np.zeros((0, ctx.scores.shape[1]))


def _segment_masks(Z: np.ndarray, seg: np.ndarray, bs: int) -> Iterator[np.ndarray]:
    for i in range(0, Z.shape[0], bs):
        yield Z[i:i + bs][:, seg].astype(np.float32)  # (k, H, W)


def _coalitions_check(v: Any) -> Optional[str]:
    if v is None:
        return None
    a = np.asarray(v)
    return None if a.ndim == 2 and a.size and np.isin(a, (0, 1)).all() else "None or a 0/1 array (N, M)"


def _segments_check(v: Any) -> Optional[str]:
    if isinstance(v, str):
        return None if v in SEGMENTERS else f"one of {', '.join(map(repr, SEGMENTERS))} or an int array"
    a = np.asarray(v) if hasattr(v, "__array__") or isinstance(v, (list, tuple)) else None
    return None if a is not None and a.ndim in (2, 3) and np.issubdtype(a.dtype, np.integer) else \
        "'slic', 'quickshift', 'felzenszwalb' or an int array (H, W) / (B, H, W)"


def _baseline_check(v: Any) -> Optional[str]:
    if isinstance(v, str):
        return None if v in ("mean", "blur") else "'mean', 'blur', a number or an image"
    if isinstance(v, bool):
        return "'mean', 'blur', a number or an image"
    return None if isinstance(v, (int, float)) or hasattr(v, "shape") else "'mean', 'blur', a number or an image"


def _seed_check(v: Any) -> Optional[str]:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "an int >= 0"


def _nonneg(v: Any) -> Optional[str]:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 \
        else "a number >= 0"


@dataclass(frozen=True)
class _SegmentMethod(Method):
    """LIME / KernelSHAP: coalitions of superpixels, a weighted linear fit per image. Subclasses give
    ``coalitions(M, rng, o) -> (Z, w)``, ``given_weights(Z, o)``, ``fit(Z, w, y, o) -> phi (T, M)`` and
    ``with_ends(Z)`` (rows evaluated ahead of ``Z``)."""

    def coalitions(self, M: int, rng: np.random.Generator, o: dict) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover

    def given_weights(self, Z: np.ndarray, o: dict) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def fit(self, Z: np.ndarray, w: np.ndarray, y: np.ndarray, o: dict) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def with_ends(self, Z: np.ndarray) -> np.ndarray:
        return Z

    def compute(self, ctx: MethodContext) -> MethodOutput:
        o = ctx.options
        x, xp, ops = ctx.inputs, ctx.xp, ctx.ops
        if x.ndim != 4:
            raise InputError(f"method {self.name!r} explains images (B, C, H, W), got an input of shape "
                             f"{tuple(x.shape)}")
        B, T = int(x.shape[0]), int(ctx.scores.shape[1])
        seg = superpixels(ops.to_numpy(xp.astype(x, xp.float32)), o["segments"])  # (B, H, W)
        fill = perturbation_baseline(x, o["baseline"], float(o["blur_sigma"]), ops)
        bs = int(o["batch_size"])
        plans = []
        for b in range(B):
            M = int(seg[b].max()) + 1
            if o["coalitions"] is not None:
                Z = np.asarray(o["coalitions"]).astype(np.uint8)
                if Z.shape[1] != M:
                    raise InputError(f"coalitions has {Z.shape[1]} columns, but image {b} has {M} segments; give "
                                     f"one column per segment")
                w = self.given_weights(Z, o)
            else:  # the same stream for every image: an image's draws do not depend on the batch
                Z, w = self.coalitions(M, np.random.default_rng(int(o["seed"])), o)
            plans.append((self.with_ends(Z), w))
        bar = _Progress(o["progress"], sum(math.ceil(Z.shape[0] / bs) for Z, _ in plans), self.name)
        weights = np.full((B, T, int(seg.max()) + 1), np.nan, dtype=np.float32)
        maps = []
        try:
            for b, (Z, w) in enumerate(plans):
                y = _scores(ctx, b, fill, _segment_masks(Z, seg[b], bs), bs, bar)  # (N, T)
                phi = self.fit(Z, w, y, o)  # (T, M_b)
                weights[b, :, :phi.shape[1]] = phi
                maps.append(phi[:, seg[b]])  # (T, H, W)
        finally:
            bar.close()
        sal = ops.asarray(np.stack(maps).astype(np.float32), like=x)
        return MethodOutput(saliency=xp.astype(sal, xp.float32), segments=seg, weights=weights)


@dataclass(frozen=True)
class KernelShap(_SegmentMethod):
    """KernelSHAP: Shapley-kernel weighted least squares with the efficiency constraint."""

    def coalitions(self, M: int, rng: np.random.Generator, o: dict) -> tuple[np.ndarray, np.ndarray]:
        return kernelshap_coalitions(M, int(o["n_samples"]), rng)

    def given_weights(self, Z: np.ndarray, o: dict) -> np.ndarray:
        """Given coalitions are draws from the kernel's size distribution (captum's convention): weight 1
        each; the end points (all 0 / all 1) only enter through the constraint."""
        return np.ones(Z.shape[0])

    def with_ends(self, Z: np.ndarray) -> np.ndarray:
        M = Z.shape[1]
        return np.concatenate([np.ones((1, M), np.uint8), np.zeros((1, M), np.uint8), Z])  # f(1), f(0) first

    def fit(self, Z: np.ndarray, w: np.ndarray, y: np.ndarray, o: dict) -> np.ndarray:
        f1, f0, Z, y = y[0], y[1], Z[2:], y[2:]
        inner = (Z.sum(1) > 0) & (Z.sum(1) < Z.shape[1])
        return solve_kernelshap(Z[inner], w[inner], y[inner], f1, f0)


@dataclass(frozen=True)
class Lime(_SegmentMethod):
    """LIME: exponential-kernel weighted ridge regression on random coalitions."""

    def coalitions(self, M: int, rng: np.random.Generator, o: dict) -> tuple[np.ndarray, np.ndarray]:
        Z = lime_coalitions(M, int(o["n_samples"]), rng, o["design"])
        return Z, lime_kernel(Z, float(o["kernel_width"]))

    def given_weights(self, Z: np.ndarray, o: dict) -> np.ndarray:
        return lime_kernel(Z, float(o["kernel_width"]))

    def fit(self, Z: np.ndarray, w: np.ndarray, y: np.ndarray, o: dict) -> np.ndarray:
        return solve_lime(Z, w, y, float(o["alpha"]))


@dataclass(frozen=True)
class Rise(Method):
    """RISE: random smooth masks weighted by the centred target scores of the masked images."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        o = ctx.options
        x, xp, ops = ctx.inputs, ctx.xp, ctx.ops
        if x.ndim != 4:
            raise InputError(f"method 'rise' explains images (B, C, H, W), got an input of shape {tuple(x.shape)}")
        B, T = int(x.shape[0]), int(ctx.scores.shape[1])
        H, W = (int(v) for v in x.shape[-2:])
        n, p, bs, grid = int(o["n_samples"]), float(o["p"]), int(o["batch_size"]), int(o["grid"])
        fill = perturbation_baseline(x, o["baseline"], float(o["blur_sigma"]), ops)
        bar = _Progress(o["progress"], B * math.ceil(n / bs), "rise")
        out = []
        try:
            for b in range(B):
                acc = {"fm": np.zeros((T, H * W)), "m": np.zeros(H * W)}

                def add(m: np.ndarray, s: np.ndarray) -> None:  # sum_i f_i M_i and sum_i M_i, chunk by chunk
                    flat = m.reshape(m.shape[0], -1).astype(np.float64)
                    acc["fm"] += s.T @ flat
                    acc["m"] += flat.sum(0)

                y = _scores(ctx, b, fill, rise_mask_chunks(n, (H, W), grid, p, int(o["seed"]), bs), bs, bar, add)
                s = (acc["fm"] - y.mean(0)[:, None] * acc["m"][None]) / (n * p)  # sum_i (f_i - mean f) M_i / (N p)
                out.append(s.reshape(T, H, W))
        finally:
            bar.close()
        sal = ops.asarray(np.stack(out).astype(np.float32), like=x)
        return MethodOutput(saliency=xp.astype(sal, xp.float32))


_COMMON = {
    "baseline": Option("mean", _baseline_check, "what hidden pixels show: 'mean' (the image's mean colour), 'blur', "
                       "a number or an image (C, H, W) / (B, C, H, W)"),
    "blur_sigma": Option(5.0, positive_number, "Gaussian std in pixels for baseline='blur'"),
    "batch_size": Option(64, positive_int, "perturbed images per forward"),
    "seed": Option(0, _seed_check, "random seed (NumPy, on the host: the same draws on every backend)"),
    "progress": Option(None, lambda v: None if v is None or isinstance(v, bool) else "None, True or False",
                       "a Rich progress bar on stderr: None = when stderr is a terminal and >= 20 forwards"),
}
_SEGMENTS = {
    "segments": Option("slic", _segments_check, "superpixels: 'slic', 'quickshift', 'felzenszwalb' (scikit-image) or "
                       "int labels (H, W) / (B, H, W)"),
    "coalitions": Option(None, _coalitions_check, "a 0/1 matrix (N, M) of coalitions to use instead of drawing them "
                         "(kernelshap: draws from the kernel's distribution, weight 1 each)"),
}

KERNELSHAP = register(KernelShap(
    name="kernelshap",
    description="KernelSHAP: Shapley values of superpixels by Shapley-kernel weighted least squares (exact for "
                "2^M <= n_samples)",
    cost="n_samples forwards per image, batched; no backward; all targets at once",
    needs_grads=False, needs_layer=False,
    options={**_SEGMENTS, "n_samples": Option(512, positive_int, "forwards per image, the 2 end points included; "
                                              "2^M <= n_samples enumerates every coalition"), **_COMMON},
))
LIME = register(Lime(
    name="lime",
    description="LIME: superpixel weights of a kernel-weighted ridge regression on random coalitions",
    cost="n_samples forwards per image, batched; no backward; all targets at once",
    needs_grads=False, needs_layer=False,
    options={**_SEGMENTS, "n_samples": Option(512, positive_int, "coalitions (forwards) per image"),
             "kernel_width": Option(0.25, positive_number, "width w of exp(-d^2 / (2 w^2)) on the cosine distance"),
             "alpha": Option(1.0, _nonneg, "ridge penalty (0: least squares)"),
             "design": Option("orthogonal", lambda v: None if v in ("orthogonal", "random") else
                              "'orthogonal' or 'random'", "how the random coalitions depend on each other: "
                              "'orthogonal' (randomised orthogonal arrays, folded over when n_samples >= 3 M: "
                              "lower variance) or 'random' (independent, as captum / lime_image)"), **_COMMON},
))
RISE = register(Rise(
    name="rise",
    description="RISE: random smooth masks weighted by the masked images' centred target scores",
    cost="n_samples forwards per image, batched; no backward; all targets at once",
    needs_grads=False, needs_layer=False,
    options={"n_samples": Option(1000, positive_int, "random masks (forwards) per image"),
             "grid": Option(8, positive_int, "mask grid cells per side"),
             "p": Option(0.5, fraction, "probability that a grid cell is kept"),
             **_COMMON, "baseline": Option(0.0, _baseline_check, "what masked pixels show (0: RISE's x * M in the "
                                           "model's input space), 'mean', 'blur', a number or an image")},
))
