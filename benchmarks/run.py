"""Side-by-side timing of camlens and pytorch-grad-cam (first cases of issue 6; more to come).

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--threads 2]

Every case runs the SAME model, input, layer and targets through camlens and the peer, checks the
maps agree (a fast wrong map does not count), then times them interleaved in one process after a
warm-up and reports medians, the spread (interquartile range) and the ratio peer / camlens. The
lower bound (a plain forward + ``autograd.grad`` to the layer) shows how close camlens is to the limit.
Writes ``benchmarks/results/<device>.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def _timeit(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Interleaved timing: each repeat runs every function once, in turn (noise hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def _iqr(v: list[float]) -> float:
    q = statistics.quantiles(v, n=4)
    return q[2] - q[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import camlens

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(dev)
    x = torch.randn(1, 3, 224, 224, device=dev)
    repeats = 5 if args.quick else 15
    rows = []
    for layer_name, T in [("layer4", 1), ("layer4", 10), ("layer3", 10)]:
        layer = dict(model.named_modules())[layer_name]
        classes = list(range(0, 100 * T, 100))[:T]

        def ours() -> torch.Tensor:
            return camlens.explain(model, x, targets=classes, layer=layer_name).maps

        cam = GradCAM(model=model, target_layers=[layer])

        def peer() -> torch.Tensor:  # pytorch-grad-cam's best way for T targets: a batch of copies
            xb = x.expand(T, -1, -1, -1)
            return torch.from_numpy(cam(input_tensor=xb, targets=[ClassifierOutputTarget(c) for c in classes]))

        store = {}
        hook = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))

        def bound() -> None:  # the limit: one forward + autograd.grad to the layer for one target
            out = model(x)
            torch.autograd.grad(out[0, classes[0]], store["a"])

        # the maps must agree before anything is timed
        diff = (ours()[0].cpu() - peer()).abs().max().item()
        if diff > 1e-4:
            raise SystemExit(f"maps disagree ({layer_name}, T={T}): max diff {diff}")
        try:
            times = _timeit({"camlens": ours, "pytorch-grad-cam": peer, "forward+grad": bound}, repeats, sync)
        finally:
            hook.remove()
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((f"resnet50 224² Grad-CAM {layer_name}, {T} target(s)", med, {k: _iqr(v) for k, v in times.items()},
                     diff))
        print(f"{rows[-1][0]}: camlens {med['camlens'] * 1e3:.1f} ms, pytorch-grad-cam "
              f"{med['pytorch-grad-cam'] * 1e3:.1f} ms (×{med['pytorch-grad-cam'] / med['camlens']:.2f}), "
              f"forward+grad {med['forward+grad'] * 1e3:.1f} ms (camlens / bound {med['camlens'] / med['forward+grad']:.2f})")
        cam.activations_and_grads.release()

    out = Path(__file__).parent / "results" / f"{dev.type}.md"
    out.parent.mkdir(exist_ok=True)
    lines = [f"# camlens vs pytorch-grad-cam — {dev.type}", "",
             f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
             f"{repeats} interleaved repeats after warm-up; median (IQR) in ms. Maps checked equal (max abs diff).", "",
             "| case | camlens | pytorch-grad-cam | peer / camlens | forward+grad (1 target) | camlens / bound | max diff |",
             "|---|---|---|---|---|---|---|"]
    for name, med, iqr, diff in rows:
        lines.append(f"| {name} | {med['camlens'] * 1e3:.1f} ({iqr['camlens'] * 1e3:.1f}) | "
                     f"{med['pytorch-grad-cam'] * 1e3:.1f} ({iqr['pytorch-grad-cam'] * 1e3:.1f}) | "
                     f"{med['pytorch-grad-cam'] / med['camlens']:.2f} | {med['forward+grad'] * 1e3:.1f} | "
                     f"{med['camlens'] / med['forward+grad']:.2f} | {diff:.1e} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
