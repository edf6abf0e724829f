"""How many model evaluations KernelSHAP and LIME need — camlens vs captum — measured against ground truth.

    python -m benchmarks.perturbation [--smoke] [--seeds 5] [--out DIR]

The algorithmic comparison of issue 14, which holds on any hardware: a small CNN (random weights,
seed 0) on one 32x32 image cut into M = 16 square segments (4 x 4, 8 x 8 pixels each), hidden
segments set to 0. The exact Shapley values of the logit of class 0 come from ALL 2^16 = 65,536
coalitions (:func:`exact_shapley`). Then, for a ladder of evaluation budgets n:

* KernelSHAP: the Pearson r of the estimated segment values with the exact ones, mean over seeds,
  for camlens (``kernelshap``: the outer coalition sizes enumerated while the budget covers them, the
  rest sampled by the kernel's size distribution in complementary pairs, each coalition evaluated
  once) and captum 0.9's ``KernelShap`` (independent draws); both with ``n_samples=n`` evaluations.
  Reported: the smallest n whose mean r >= 0.95, and the ratio captum / camlens.
* LIME: stability across seeds (there is no ground truth for LIME's surrogate): the mean pairwise
  Pearson r of the segment weights of different seeds, for camlens' ``lime`` and captum's ``Lime``
  given camlens' surrogate (ridge, alpha 1) and kernel (exponential on the cosine distance of the
  coalition, width 0.25): captum's defaults (Lasso, alpha 0.01) zero every weight on this model.
  Both keep each segment with probability 1/2.

Writes ``<out>/perturbation-cpu.md`` and ``.json`` (default ``benchmarks/results``; ``--smoke``: 8
segments, 2 seeds, a short ladder, a temporary folder).

``--wall``: wall time at equal evaluations and segments instead — torchvision ResNet18 (random
weights) on one 224x224 image, 50 SLIC superpixels, 512 evaluations, one target: camlens' ``kernelshap``
and ``lime`` (batch size 64) against captum's ``KernelShap`` / ``Lime`` with their default
``perturbations_per_eval=1`` and with 64, interleaved, medians of 3 (``--smoke``: resnet18 at 64x64,
64 evaluations, 1 repeat). Writes ``perturbation-wall-cpu.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import camlens

TARGET_R = 0.95
LADDER = (24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


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
def coalition_values(model: nn.Module, x: torch.Tensor, seg: np.ndarray, cls: int, batch: int = 2048) -> np.ndarray:
    """``f(z)`` for every coalition z of the M segments (index bits: segment i kept iff bit i), ``(2^M,)``."""
    M = int(seg.max()) + 1
    n = 1 << M
    seg_t = torch.from_numpy(seg)
    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        keep = ((idx[:, None] >> torch.arange(M)) & 1).to(x.dtype)  # (k, M)
        masks = keep[:, seg_t]  # (k, H, W)
        out[s:s + len(idx)] = model(x * masks[:, None]).double()[:, cls].numpy()
    return out


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


def estimators(model: nn.Module, x: torch.Tensor, seg: np.ndarray, cls: int) -> dict[str, Callable[[int, int], np.ndarray]]:
    """name -> ``(n evaluations, seed) -> segment values (M,)``."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import KernelShap, Lime

    from camlens.methods.perturbation import lime_kernel

    def kernel(_: Any, __: Any, interp: torch.Tensor, **kw: Any) -> float:  # camlens' LIME kernel, on z
        return float(lime_kernel(interp.numpy().astype(np.uint8), 0.25)[0])

    mask = torch.from_numpy(seg)[None, None].expand(1, 3, *seg.shape)

    def ours(method: str) -> Callable[[int, int], np.ndarray]:
        def run(n: int, seed: int) -> np.ndarray:
            e = camlens.explain(model, x, targets=cls, method=method, segments=seg, baseline=0.0, n_samples=n,
                                seed=seed, upsample=True)
            return np.asarray(e.weights)[0, 0, :int(seg.max()) + 1]
        return run

    def theirs(cls_: type) -> Callable[[int, int], np.ndarray]:
        def run(n: int, seed: int) -> np.ndarray:
            torch.manual_seed(seed)
            explainer = cls_(model) if cls_ is KernelShap else \
                cls_(model, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=kernel)
            attr = explainer.attribute(x, baselines=0.0, target=cls, feature_mask=mask, n_samples=n,
                                         perturbations_per_eval=64)
            a = attr[0, 0].numpy()
            return np.array([a[seg == i].mean() for i in range(int(seg.max()) + 1)])
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


def wall(smoke: bool, out: Path, command: str) -> dict[str, Any]:
    """The ``--wall`` comparison (module docstring); returns the result written to ``out``."""
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
    times = _timeit(fns, reps, lambda: None, warmup=0 if smoke else 1)
    st = {k: _stats(v) for k, v in times.items()}
    res = {"meta": {"model": "resnet18 (random weights)", "size": size, "segments": int(seg.max()) + 1, "n_samples": n,
                    "repeats": reps, "smoke": smoke, "command": command, "torch": torch.__version__}, "times": st}
    (out / "perturbation-wall-cpu.json").write_text(json.dumps(res, indent=1))
    lines = ["# Wall time at equal evaluations: KernelSHAP and LIME, camlens vs captum", "",
             f"ResNet18 (random weights), one {size}x{size} image, {res['meta']['segments']} SLIC segments, {n} "
             f"evaluations, one target; interleaved, median of {reps} (s). `{command}`"
             f"{' (smoke: not a measurement)' if smoke else ''}.", "",
             "| method | camlens (batch 64) | captum, perturbations_per_eval=1 (default) | captum, =64 |",
             "|---|---|---|---|"]
    for kind, c in (("kernelshap", "KernelShap"), ("lime", "Lime")):
        ours_s = st[f"camlens {kind}"]["median_s"]
        d, b = st[f"captum {c} (ppe=1)"]["median_s"], st[f"captum {c} (ppe=64)"]["median_s"]
        lines.append(f"| {kind} | {ours_s:.2f} | {d:.2f} (x{d / ours_s:.2f}) | {b:.2f} (x{b / ours_s:.2f}) |")
    (out / "perturbation-wall-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="8 segments, 2 seeds, a short ladder (not a measurement)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--wall", action="store_true", help="wall time at equal evaluations instead (module docstring)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.wall:
        out = args.out or (Path(tempfile.mkdtemp(prefix="camlens-bench-pert-")) if args.smoke
                           else Path(__file__).parent / "results")
        out.mkdir(parents=True, exist_ok=True)
        wall(args.smoke, out, "python -m benchmarks.perturbation " + " ".join(sys.argv[1:] if argv is None else argv))
        return 0
    seeds = 2 if args.smoke else args.seeds
    seg = grid_segments(32, 2, 4) if args.smoke else grid_segments(32, 4, 4)
    M = int(seg.max()) + 1
    ladder = (8, 16, 32, 64, 256) if args.smoke else LADDER  # (256 = 2^8: every coalition)
    ladder = tuple(n for n in ladder if n <= (1 << M)) or (1 << M,)
    model, cls = small_cnn(), 0
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    phi = exact_shapley(coalition_values(model, x, seg, cls), M)
    exact_s = time.perf_counter() - t0
    est = estimators(model, x, seg, cls)
    curves: dict[str, dict[int, float]] = {}
    for name in ("camlens kernelshap", "captum KernelShap"):
        curves[name] = {n: float(np.mean([_pearson(est[name](n, s), phi) for s in range(seeds)])) for n in ladder}
        print(name, {n: round(r, 3) for n, r in curves[name].items()}, flush=True)
    for name in ("camlens lime", "captum Lime"):
        curve = {}
        for n in ladder:
            ws = [est[name](n, s) for s in range(seeds)]
            curve[n] = float(np.mean([_pearson(a, b) for a, b in itertools.combinations(ws, 2)]))
        curves[name] = curve
        print(name, "(seed stability)", {n: round(r, 3) for n, r in curve.items()}, flush=True)
    need = {k: needed(v) for k, v in curves.items()}
    ratio = {kind: (need[f"captum {c}"] / need[f"camlens {kind}"] if need[f"captum {c}"] and need[f"camlens {kind}"]
                    else None) for kind, c in (("kernelshap", "KernelShap"), ("lime", "Lime"))}
    stricter = {str(t): {k: needed(v, t) for k, v in curves.items()} for t in (0.99, 0.999)}
    res = {"meta": {"segments": M, "seeds": seeds, "ladder": list(ladder), "target_r": TARGET_R, "smoke": args.smoke,
                    "exact_coalitions": 1 << M, "exact_s": exact_s, "torch": torch.__version__,
                    "command": "python -m benchmarks.perturbation " + " ".join(sys.argv[1:] if argv is None else argv)},
           "curves": curves, "needed": need, "captum_over_camlens": ratio,
           "needed_stricter": stricter}
    out = args.out or (Path(tempfile.mkdtemp(prefix="camlens-bench-pert-")) if args.smoke
                       else Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "perturbation-cpu.json").write_text(json.dumps(res, indent=1))
    _markdown(res, out / "perturbation-cpu.md")
    print(f"needed for r >= {TARGET_R}: {need}; captum / camlens: {ratio}; wrote {out}/perturbation-cpu.md")
    return 0


def _markdown(res: dict[str, Any], path: Path) -> None:
    meta, curves = res["meta"], res["curves"]
    ladder = meta["ladder"]
    lines = ["# Evaluations to reach the same quality: KernelSHAP and LIME, camlens vs captum", "",
             f"A small CNN (random weights), one 32x32 image, M = {meta['segments']} square segments set to 0 when "
             f"hidden; exact Shapley values from all {meta['exact_coalitions']} coalitions. KernelSHAP: Pearson r "
             f"with the exact values; LIME: mean pairwise r between {meta['seeds']} seeds (stability). Mean over "
             f"{meta['seeds']} seeds. `{meta['command']}`{' (smoke: not a measurement)' if meta['smoke'] else ''}.", "",
             "| estimator | " + " | ".join(f"n={n}" for n in ladder) + f" | n for r >= {meta['target_r']} |",
             "|---|" + "---|" * (len(ladder) + 1)]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{curve[n]:.3f}" for n in ladder) + f" | {res['needed'][name]} |")
    r = res["captum_over_camlens"]

    def fmt(v: Optional[float]) -> str:
        return "not reached" if v is None else f"{v:.1f}x"

    lines += ["", f"captum's evaluations / camlens' to reach r >= {meta['target_r']}: KernelSHAP {fmt(r['kernelshap'])}"
                  f" · LIME {fmt(r['lime'])}."]
    for t, need in res["needed_stricter"].items():
        lines.append(f"Evaluations for r >= {t}: " + ", ".join(f"{k} {v}" for k, v in need.items()) + ".")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
