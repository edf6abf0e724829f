"""How many model evaluations KernelSHAP and LIME need — camlens vs captum — measured against ground truth.

    python -m benchmarks.perturbation [--smoke] [--seeds 10] [--images 6] [--lite0] [--cache DIR] [--out DIR]

The algorithmic comparison of issue 14, which holds on any hardware. A *game* is one image, one target
and M = 16 square segments (a 4 x 4 grid) hidden by a baseline; its exact Shapley values come from ALL
2^16 = 65,536 coalitions (:func:`exact_shapley`), evaluated by the real model once. The games:

* ``shapes-2head · shape``: the shipped, trained shapes CNN (camlens' small CNN, 60 k parameters), the
  shape head's predicted class, on ``--images`` images of ``make_shapes(8, seed=3)`` (64 x 64, black
  baseline). The shape of an object is a configuration of several segments: interactions.
* ``shapes-2head · colour``: the same images, the colour head (colour is spread over the object's pixels:
  close to additive).
* ``random CNN``: a small CNN with random weights on a random 32 x 32 image (near-additive).
* ``EfficientNet-Lite0`` (with ``--lite0``): the shipped ImageNet model on the cat (skimage ``chelsea``,
  224 x 224 centre crop, mean-colour baseline), its top class; its 65,536 forwards take ~40 min on 2 CPU
  cores the first time (the games' values are cached: ``--cache``).

Every estimator then asks for the values of its coalitions through a table of those 2^16 values — the
numbers the model gives, without paying its forwards again (checked: camlens on the real random CNN
equals camlens on its table). For a ladder of budgets n (model evaluations, the two end points included
as captum counts them):

* KernelSHAP: the Pearson r of the estimated segment values with the exact ones, mean over seeds, for
  camlens (``kernelshap``: the outer coalition sizes enumerated while the budget covers them, an
  orthogonal Sylvester-Hadamard start, then kernel-distributed complementary pairs, each coalition
  evaluated once; see :mod:`camlens.methods.perturbation`) and captum 0.9's ``KernelShap`` (independent
  draws from the kernel's distribution), both with ``n_samples=n``.
* LIME: stability across seeds (LIME has no ground truth): the mean pairwise Pearson r of the segment
  weights of different seeds, for camlens' ``lime`` (randomised orthogonal arrays, folded over from 3 M)
  and captum's ``Lime`` given camlens' surrogate (ridge, alpha 1) and kernel (exponential on the cosine
  distance of the coalition, width 0.25): captum's defaults (Lasso, alpha 0.01) zero every weight here.
  Both keep each segment with probability 1/2.

Reported per game and per group (the mean curve over a group's games): the smallest n whose mean r
stays >= 0.95 (and 0.99, 0.999), and the ratio captum / camlens. Writes ``<out>/perturbation-cpu.md``
and ``.json`` (default ``benchmarks/results``; ``--smoke``: M = 8, 2 seeds, 2 images, no Lite0, a short
ladder, a temporary folder, no cache).

``--wall``: wall time at equal evaluations and segments instead (see :func:`wall`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import camlens

TARGET_R = 0.95
LADDER = (18, 20, 24, 28, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10)).eval()


def grid_segments(size: int, rows: int, cols: int) -> np.ndarray:
    """``(size, size)`` labels 0..rows*cols-1 of a rows x cols grid of rectangles."""
    r, c = np.arange(size) * rows // size, np.arange(size) * cols // size
    return (r[:, None] * cols + c[None, :]).astype(np.int64)


@torch.no_grad()
def coalition_values(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, base: torch.Tensor,
                     seg: np.ndarray, batch: int = 512) -> np.ndarray:
    """``score(base + z[seg] (x - base))`` ``(2^M, G)`` float64 for every coalition z of the M segments
    (index bits: segment i kept iff bit i); ``score`` maps a batch to ``(k, G)`` (G games at once)."""
    M = int(seg.max()) + 1
    n = 1 << M
    seg_t = torch.from_numpy(seg)
    out = []
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        keep = ((idx[:, None] >> torch.arange(M)) & 1).to(x.dtype)  # (k, M)
        masks = keep[:, seg_t][:, None]  # (k, 1, H, W)
        out.append(score(base + masks * (x - base)).double().numpy())
    return np.concatenate(out)


def exact_shapley(f: np.ndarray, M: int) -> np.ndarray:
    """Shapley values from all coalition values ``f`` ``(2^M,)``: phi_i = sum_{S not i} |S|!(M-|S|-1)!/M!
    (f(S + i) - f(S))."""
    idx = np.arange(1 << M)
    size = np.array([bin(i).count("1") for i in idx])
    w = np.array([math.factorial(k) * math.factorial(M - k - 1) / math.factorial(M) for k in range(M)])
    phi = np.zeros(M)
    for i in range(M):
        without = idx[(idx >> i) & 1 == 0]
        phi[i] = np.sum(w[size[without]] * (f[without | (1 << i)] - f[without]))
    return phi


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d > 0 else 0.0


@dataclass
class Game:
    """One image and target: ``f`` ``(2^M,)`` its value on every coalition, ``phi`` the exact Shapley values."""

    name: str
    group: str
    f: np.ndarray
    M: int

    @property
    def phi(self) -> np.ndarray:
        return exact_shapley(self.f, self.M)


def _cached(cache: Optional[Path], key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()`` (a game's coalition values ``(2^M, G)``), or its copy saved under ``cache`` by an
    earlier run with the same ``key`` (``None``: no cache)."""
    if cache is None:
        return compute()
    path = cache / (key.replace("/", "_").replace(" ", "_") + ".npy")
    if path.is_file():
        print(f"exact values: {key} (cached: {path})", flush=True)
        return np.load(path)
    f = compute()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, f)
    tmp.replace(path)  # never half-written
    return f


def build_games(M_side: tuple[int, int], images: int, lite0: bool, cache: Optional[Path] = None) -> list[Game]:
    """The games of the module docs (``M_side``: the segment grid's rows and columns); ``cache``: a folder
    for the games' coalition values (the expensive part: ~40 s a shapes image, ~10 min EfficientNet-Lite0
    on 2 quiet cores), reused by later runs."""
    from camlens.datasets.shapes import make_shapes

    rows, cols = M_side
    M = rows * cols
    games: list[Game] = []
    net = small_cnn()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    f = _cached(cache, f"random-cnn-{rows}x{cols}",
                lambda: coalition_values(lambda b: net(b)[:, :1], x, torch.zeros(()), grid_segments(32, rows, cols)))
    games.append(Game("random CNN, class 0", "random CNN", f[:, 0], M))
    lm = camlens.models.load("shapes-2head")
    xs = lm.preprocess(make_shapes(8, seed=3).images)
    seg = grid_segments(64, rows, cols)
    for i in range(images):
        xi = xs[i:i + 1]
        with torch.no_grad():
            out = lm.model(xi)
        cls = {h: int(out[h].argmax()) for h in ("shape", "colour")}
        f = _cached(cache, f"shapes-2head-{i}-{rows}x{cols}", lambda: coalition_values(
            lambda b: torch.stack([lm.model(b)[h][:, cls[h]] for h in ("shape", "colour")], 1), xi, torch.zeros(()),
            seg))
        for j, h in enumerate(("shape", "colour")):
            games.append(Game(f"shapes-2head image {i}, {h} {lm.categories[h][cls[h]]}", f"shapes-2head · {h}",
                              f[:, j], M))
        print(f"exact values: shapes image {i}", flush=True)
    if lite0:
        from skimage import data

        lm = camlens.models.load("efficientnet-lite0")
        x = lm.preprocess(data.chelsea())
        w0 = (x.shape[-1] - x.shape[-2]) // 2
        x = x[..., w0:w0 + x.shape[-2]].contiguous()  # the 224 x 224 centre
        with torch.no_grad():
            cls = int(lm.model(x).argmax())
        t0 = time.perf_counter()
        f = _cached(cache, f"efficientnet-lite0-cat-{rows}x{cols}", lambda: coalition_values(
            lambda b: lm.model(b)[:, cls:cls + 1], x, x.mean((2, 3), keepdim=True),
            grid_segments(x.shape[-1], rows, cols), batch=128))
        games.append(Game(f"EfficientNet-Lite0 cat, {lm.categories[cls]}", "EfficientNet-Lite0", f[:, 0], M))
        print(f"exact values: EfficientNet-Lite0 ({time.perf_counter() - t0:.0f} s)", flush=True)
    return games


def _lookup(f: np.ndarray, M: int) -> Callable[[np.ndarray], np.ndarray]:
    """The table as a model: images ``(N, ...)`` whose M pixels are the coalition ``z`` -> ``f(z)`` ``(N, 1)``."""
    bits = 1 << np.arange(M)

    def fn(images: np.ndarray) -> np.ndarray:
        z = np.asarray(images).reshape(len(images), M) > 0.5
        return f[z.astype(np.int64) @ bits][:, None].astype(np.float32)
    return fn


def estimators(game: Game) -> dict[str, Callable[[int, int], np.ndarray]]:
    """name -> ``(n evaluations, seed) -> segment values (M,)``, every one querying ``game``'s table."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import KernelShap, Lime

    from camlens.methods.perturbation import lime_kernel

    M = game.M
    table = _lookup(game.f, M)
    model = camlens.CallableModel(table, layout="nchw", batch_size=256)
    ones = np.ones((1, 1, 1, M), np.float32)
    seg = np.arange(M)[None]

    def kernel(_: Any, __: Any, interp: torch.Tensor, **kw: Any) -> float:  # camlens' LIME kernel, on z
        return float(lime_kernel(interp.numpy().astype(np.uint8), 0.25)[0])

    def ours(method: str) -> Callable[[int, int], np.ndarray]:
        def run(n: int, seed: int) -> np.ndarray:
            e = camlens.explain(model, ones, targets=0, method=method, segments=seg, baseline=0.0, n_samples=n,
                                seed=seed, batch_size=256)
            return np.asarray(e.weights)[0, 0, :M]
        return run

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(table(inp.numpy())[:, 0])

    def theirs(cls_: type) -> Callable[[int, int], np.ndarray]:
        def run(n: int, seed: int) -> np.ndarray:
            torch.manual_seed(seed)
            explainer = cls_(forward) if cls_ is KernelShap else \
                cls_(forward, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=kernel)
            attr = explainer.attribute(torch.ones(1, M), baselines=0.0, feature_mask=torch.arange(M)[None],
                                       n_samples=n, perturbations_per_eval=64)
            return attr[0].numpy().astype(np.float64)
        return run

    return {"camlens kernelshap": ours("kernelshap"), "captum KernelShap": theirs(KernelShap),
            "camlens lime": ours("lime"), "captum Lime": theirs(Lime)}


def needed(curve: dict[int, float], target: float = TARGET_R) -> Optional[int]:
    """The smallest budget whose mean r reaches ``target`` (and every larger one measured too)."""
    ns = sorted(curve)
    for i, n in enumerate(ns):
        if all(curve[m] >= target for m in ns[i:]):
            return n
    return None


def _check_table(games: list[Game], rows: int, cols: int) -> float:
    """camlens' KernelSHAP on the real random CNN minus camlens' on its table (max abs over segments)."""
    net = small_cnn()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seg = grid_segments(32, rows, cols)
    real = camlens.explain(net, x, targets=0, method="kernelshap", segments=seg, baseline=0.0, n_samples=64).weights
    table = estimators(games[0])["camlens kernelshap"](64, 0)
    return float(np.abs(np.asarray(real)[0, 0] - table).max() / max(np.abs(table).max(), 1e-12))


def curves_of(game: Game, ladder: tuple[int, ...], seeds: int) -> dict[str, dict[int, float]]:
    """Each estimator's mean r per budget on one game (KernelSHAP: with the exact values; LIME: between seeds)."""
    est, phi = estimators(game), game.phi
    out: dict[str, dict[int, float]] = {}
    for name in ("camlens kernelshap", "captum KernelShap"):
        out[name] = {n: float(np.mean([_pearson(est[name](n, s), phi) for s in range(seeds)])) for n in ladder}
    for name in ("camlens lime", "captum Lime"):
        curve = {}
        for n in ladder:
            ws = [est[name](n, s) for s in range(seeds)]
            curve[n] = float(np.mean([_pearson(a, b) for a, b in itertools.combinations(ws, 2)]))
        out[name] = curve
    return out


PAIRS = (("kernelshap", "KernelShap"), ("lime", "Lime"))


def summarise(curves: dict[str, dict[int, float]]) -> dict[str, Any]:
    need = {str(t): {k: needed(v, t) for k, v in curves.items()} for t in (TARGET_R, 0.99, 0.999)}
    ratio = {}
    for kind, c in PAIRS:
        a, b = need[str(TARGET_R)][f"camlens {kind}"], need[str(TARGET_R)][f"captum {c}"]
        ratio[kind] = b / a if a and b else None
    return {"needed": need, "captum_over_camlens": ratio}


def wall(smoke: bool, out: Path, command: str) -> dict[str, Any]:
    """Wall time at equal evaluations and segments: torchvision ResNet18 (random weights) on one
    224x224 image, its SLIC superpixels (``n_segments=50``; the count SLIC gives is reported), 512
    evaluations, one target — camlens' ``kernelshap`` and
    ``lime`` (batch size 64) against captum's ``KernelShap`` / ``Lime`` with their default
    ``perturbations_per_eval=1`` and with 64, and shap's Partition explainer (``max_evals=512``,
    ``batch_size=64``, a blur masker; its own pixel hierarchy instead of superpixels, and the
    evaluations it actually made are counted and reported); interleaved, medians of 3, after one
    warm-up call each (numba compiles shap's code on its first call). ``--smoke``: 64x64, 64
    evaluations, 1 repeat. Writes ``perturbation-wall-cpu.md`` / ``.json``."""
    import torchvision
    from captum.attr import KernelShap, Lime

    from camlens.methods.perturbation import superpixels

    from .timing import _stats, _timeit

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    size, n, reps = (64, 64, 1) if smoke else (224, 512, 3)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    seg = superpixels(x.numpy(), "slic")[0]
    mask = torch.from_numpy(seg.astype(np.int64))[None, None].expand(1, 3, size, size)
    cls = 1

    def ours(method: str) -> Callable[[], Any]:
        return lambda: camlens.explain(model, x, targets=cls, method=method, segments=seg, baseline=0.0, n_samples=n,
                                       batch_size=64).weights

    def theirs(cls_: type, ppe: int) -> Callable[[], Any]:
        return lambda: cls_(model).attribute(x, baselines=0.0, target=cls, feature_mask=mask, n_samples=n,
                                             perturbations_per_eval=ppe)

    fns = {"camlens kernelshap": ours("kernelshap"), "captum KernelShap (ppe=1)": theirs(KernelShap, 1),
           "captum KernelShap (ppe=64)": theirs(KernelShap, 64), "camlens lime": ours("lime"),
           "captum Lime (ppe=1)": theirs(Lime, 1), "captum Lime (ppe=64)": theirs(Lime, 64)}
    shap_evals: list[int] = []
    try:
        import shap

        counter = {"n": 0}

        @torch.no_grad()
        def f(a: np.ndarray) -> np.ndarray:  # shap's images are (N, H, W, C)
            counter["n"] += len(a)
            return model(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(0, 3, 1, 2)).numpy()

        img = x[0].permute(1, 2, 0).numpy()
        explainer = shap.Explainer(f, shap.maskers.Image("blur(16,16)", img.shape))

        def partition() -> Any:
            counter["n"] = 0
            v = explainer(img[None], max_evals=n, batch_size=64, outputs=[cls], silent=True).values
            shap_evals.append(counter["n"])
            return v
        fns["shap Partition"] = partition
        shap_version = shap.__version__
    except ImportError:  # shap is in the dev extra; without it the row is left out
        shap_version = None
    times = _timeit(fns, reps, lambda: None, warmup=0 if smoke else 1)
    st = {k: _stats(v) for k, v in times.items()}
    res = {"meta": {"model": "resnet18 (random weights)", "size": size, "segments": int(seg.max()) + 1, "n_samples": n,
                    "repeats": reps, "smoke": smoke, "command": command, "torch": torch.__version__,
                    "shap": shap_version, "shap_evaluations": shap_evals[-1] if shap_evals else None},
           "times": st}
    (out / "perturbation-wall-cpu.json").write_text(json.dumps(res, indent=1))
    lines = ["# Wall time at equal evaluations: KernelSHAP and LIME, camlens vs captum and shap", "",
             f"ResNet18 (random weights), one {size}x{size} image, {res['meta']['segments']} SLIC segments, {n} "
             f"evaluations, one target, CPU ({torch.get_num_threads()} threads); interleaved, median of {reps} (s); "
             f"ratios are the peer's time / camlens'. `{command}`{' (smoke: not a measurement)' if smoke else ''}.", "",
             "| method | camlens (batch 64) | captum, perturbations_per_eval=1 (default) | captum, =64 |",
             "|---|---|---|---|"]
    for kind, c in PAIRS:
        ours_s = st[f"camlens {kind}"]["median_s"]
        d, b = st[f"captum {c} (ppe=1)"]["median_s"], st[f"captum {c} (ppe=64)"]["median_s"]
        lines.append(f"| {kind} | {ours_s:.2f} | {d:.2f} (x{d / ours_s:.2f}) | {b:.2f} (x{b / ours_s:.2f}) |")
    if "shap Partition" in st:
        p_s, k_s = st["shap Partition"]["median_s"], st["camlens kernelshap"]["median_s"]
        lines += ["", f"shap {shap_version} Partition explainer (`max_evals={n}`, `batch_size=64`, blur masker; it made "
                      f"{res['meta']['shap_evaluations']} evaluations): {p_s:.2f} s, x{p_s / k_s:.2f} camlens' "
                      f"kernelshap."]
    (out / "perturbation-wall-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="M = 8, 2 seeds, 2 images, no Lite0 (not a measurement)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--images", type=int, default=6, help="shapes images (each gives a shape and a colour game)")
    ap.add_argument("--lite0", action="store_true", help="add the EfficientNet-Lite0 game (its 65,536 forwards at "
                    "224 px take ~40 min on 2 CPU cores, once: cached)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "camlens-bench" / "perturbation",
                    help="folder for the games' exact coalition values, reused by later runs ('' : none)")
    ap.add_argument("--wall", action="store_true", help="wall time at equal evaluations instead (module docstring)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    command = "python -m benchmarks.perturbation " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="camlens-bench-pert-")) if args.smoke
                       else Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.wall:
        wall(args.smoke, out, command)
        return 0
    seeds = 2 if args.smoke else args.seeds
    grid = (2, 4) if args.smoke else (4, 4)
    M = grid[0] * grid[1]
    ladder = (8, 10, 16, 32, 64, 256) if args.smoke else LADDER  # (256 = 2^8: every coalition)
    ladder = tuple(n for n in ladder if n <= (1 << M)) or (1 << M,)
    t0 = time.perf_counter()
    cache = None if args.smoke or str(args.cache) == "." else args.cache  # (--cache "" parses as Path("."))
    games = build_games(grid, 2 if args.smoke else args.images, lite0=args.lite0 and not args.smoke, cache=cache)
    exact_s = time.perf_counter() - t0
    check = _check_table(games, *grid)
    assert check < 1e-4, f"camlens on the table differs from camlens on the model by {check:.2e}"
    per_game = {}
    for g in games:
        per_game[g.name] = {"group": g.group, "curves": curves_of(g, ladder, seeds)}
        per_game[g.name].update(summarise(per_game[g.name]["curves"]))
        print(g.name, per_game[g.name]["needed"][str(TARGET_R)], flush=True)
    groups: dict[str, Any] = {}
    for grp in dict.fromkeys(g.group for g in games):
        members = [v["curves"] for v in per_game.values() if v["group"] == grp]
        mean = {k: {n: float(np.mean([m[k][n] for m in members])) for n in ladder} for k in members[0]}
        groups[grp] = {"games": len(members), "curves": mean, **summarise(mean)}
    allc = [v["curves"] for v in per_game.values()]
    groups["all games"] = {"games": len(allc), "curves": {k: {n: float(np.mean([m[k][n] for m in allc]))
                                                                for n in ladder} for k in allc[0]}}
    groups["all games"].update(summarise(groups["all games"]["curves"]))
    res = {"meta": {"segments": M, "seeds": seeds, "ladder": list(ladder), "target_r": TARGET_R, "smoke": args.smoke,
                    "exact_coalitions": 1 << M, "exact_s": exact_s, "table_check_rel": check,
                    "torch": torch.__version__, "command": command},
           "groups": groups, "games": per_game}
    (out / "perturbation-cpu.json").write_text(json.dumps(res, indent=1))
    _markdown(res, out / "perturbation-cpu.md")
    print((out / "perturbation-cpu.md").read_text())
    return 0


def _fmt_ratio(v: Optional[float]) -> str:
    return "not reached" if v is None else f"{v:.1f}x"


def _markdown(res: dict[str, Any], path: Path) -> None:
    meta = res["meta"]
    ladder = meta["ladder"]
    t = str(meta["target_r"])
    lines = ["# Evaluations to reach the same quality: KernelSHAP and LIME, camlens vs captum", "",
             f"M = {meta['segments']} square segments; exact Shapley values of each game from all "
             f"{meta['exact_coalitions']} coalitions of its real model (then read from a table: camlens on the table "
             f"equals camlens on the model within {meta['table_check_rel']:.0e}). KernelSHAP: Pearson r with the exact "
             f"values; LIME: mean pairwise r between {meta['seeds']} seeds (stability). Means over {meta['seeds']} "
             f"seeds, and over a group's games. `{meta['command']}`"
             f"{' (smoke: not a measurement)' if meta['smoke'] else ''}.", "",
             "## Evaluations for r >= 0.95 (0.99, 0.999) per group", "",
             "| group | games | camlens kernelshap | captum KernelShap | captum / camlens | camlens lime | captum Lime "
             "| captum / camlens |", "|---|---|---|---|---|---|---|---|"]

    top = max(ladder)

    def cell(need: dict[str, dict[str, Optional[int]]], k: str) -> str:
        v = [need[x][k] if need[x][k] is not None else f"> {top}" for x in (t, "0.99", "0.999")]
        return f"{v[0]} ({v[1]}, {v[2]})"

    for grp, g in res["groups"].items():
        n, r = g["needed"], g["captum_over_camlens"]
        lines.append(f"| {grp} | {g['games']} | {cell(n, 'camlens kernelshap')} | {cell(n, 'captum KernelShap')} | "
                     f"{_fmt_ratio(r['kernelshap'])} | {cell(n, 'camlens lime')} | {cell(n, 'captum Lime')} | "
                     f"{_fmt_ratio(r['lime'])} |")
    lines += ["", "## Per game: evaluations for r >= 0.95", "",
              "| game | camlens kernelshap | captum KernelShap | ratio | camlens lime | captum Lime | ratio |",
              "|---|---|---|---|---|---|---|"]
    for name, g in res["games"].items():
        n, r = g["needed"][t], g["captum_over_camlens"]
        n = {k: v if v is not None else f"> {top}" for k, v in n.items()}
        lines.append(f"| {name} | {n['camlens kernelshap']} | {n['captum KernelShap']} | {_fmt_ratio(r['kernelshap'])}"
                     f" | {n['camlens lime']} | {n['captum Lime']} | {_fmt_ratio(r['lime'])} |")
    for grp, g in res["groups"].items():
        lines += ["", f"## Mean r per budget: {grp}", "",
                  "| estimator | " + " | ".join(f"n={n}" for n in ladder) + " |", "|---|" + "---|" * len(ladder)]
        for name, curve in g["curves"].items():
            lines.append(f"| {name} | " + " | ".join(f"{curve[n]:.3f}" for n in ladder) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
