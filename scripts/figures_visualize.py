"""The README's row of class visualisations: ``python scripts/figures_visualize.py`` (no download).

Writes ``docs/class_visualizations.png``: ``camlens.visualize`` on the shipped pretrained
EfficientNet-Lite0 for the 10 classes of tests/test_visualize.py, optimised in ONE batch (Fourier
parameterisation, decorrelated colour, the default transformation robustness), each titled with the
model's probability of its class on the saved uint8 image and, after a random crop + rescale the
optimisation never saw, that probability and whether the class is still top-5. Prints the numbers
and the time per image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import camlens  # noqa: E402
from camlens.viz import save_png  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_visualize import CLASSES, unseen_crop  # noqa: E402  (the listed classes, the unseen crop)


def main(size: int, steps: int) -> Path:
    lm = camlens.models.load("efficientnet-lite0")
    idx = [[c.lower() for c in lm.categories].index(c) for c in CLASSES]
    t0 = time.perf_counter()
    vis = camlens.visualize(lm, CLASSES, steps=steps, size=size, seed=0)
    per_image = (time.perf_counter() - t0) / len(CLASSES)
    m, s = torch.tensor(lm.mean).view(1, 3, 1, 1), torch.tensor(lm.std).view(1, 3, 1, 1)
    x = torch.from_numpy(vis.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        p = F.softmax(lm.model((x - m) / s), 1)[range(len(idx)), idx]
        pc = F.softmax(lm.model((unseen_crop(x, torch.Generator().manual_seed(123)) - m) / s), 1)
    top5 = [idx[i] in pc[i].topk(5).indices.tolist() for i in range(len(idx))]
    fig, axes = plt.subplots(1, len(CLASSES), figsize=(1.9 * len(CLASSES), 2.5))
    for i, ax in enumerate(axes):
        ax.imshow(vis.images[i])
        ax.set_title(f"{CLASSES[i]}\np={float(p[i]):.3f}  crop p={float(pc[i, idx[i]]):.2f}"
                     f"{'' if top5[i] else ' (not top-5)'}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"camlens.visualize on EfficientNet-Lite0 (pretrained): {size} px, {steps} steps, Fourier + "
                 "decorrelated colour, 10 classes in one batch", fontsize=8)
    fig.tight_layout()
    out = save_png(ROOT / "docs" / "class_visualizations.png", fig)
    print(f"wrote {out}; {per_image:.2f} s per image on this machine; p = {[round(float(v), 4) for v in p]}; "
          f"min p {float(p.min()):.4f}; top-5 after the unseen crop: {sum(top5)}/10 {top5}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    a = ap.parse_args()
    main(a.size, a.steps)
