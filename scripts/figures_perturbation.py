"""The README's pictures of model-agnostic maps and per-filter maps: ``python scripts/figures_perturbation.py``.

Writes, for the cat photo (``skimage.data.chelsea``) on the shipped pretrained EfficientNet-Lite0
(no download):

* ``docs/perturbation_grid.png``: Grad-CAM, LIME, KernelSHAP and RISE of the model's top class, side
  by side (SLIC superpixels, mean-colour baseline, 512 evaluations each; RISE 4000 masks, as its paper
  on ResNet50), with each method's time;
* ``docs/filters_grid.png``: the 8 channels of ``blocks.5`` with the highest Grad-CAM weight x mean
  activation for that class (``camlens.filters(..., order="contribution")``).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage import data  # noqa: E402

import camlens  # noqa: E402
from camlens.viz import save_png  # noqa: E402
from camlens.viz.grid import filter_grid  # noqa: E402
from camlens.viz.overlay import overlay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    lm = camlens.models.load("efficientnet-lite0")
    photo = data.chelsea()
    top = camlens.explain(lm, [photo], method="gradcam")
    cls = int(top.targets[0][0].cls)
    name = top.targets[0][0].label
    panels = []
    for method, kw in (("gradcam", {}), ("lime", {"n_samples": 512}), ("kernelshap", {"n_samples": 512}),
                       ("rise", {"n_samples": 4000})):
        t0 = time.perf_counter()
        e = camlens.explain(lm, [photo], targets=cls, method=method, **kw)
        panels.append((method, time.perf_counter() - t0, e))
    shown = panels[0][2].display[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0))
    for ax, (method, dt, e) in zip(axes, panels):
        ax.imshow(overlay(shown, np.asarray(e.maps[0, 0]), alpha=0.5))
        ax.set_title(f"{method} ({dt:.1f} s)", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"EfficientNet-Lite0 (pretrained), {name}: Grad-CAM and three model-agnostic maps", fontsize=9)
    fig.tight_layout()
    out = save_png(ROOT / "docs" / "perturbation_grid.png", fig)
    plt.close(fig)
    print(f"wrote {out}: " + ", ".join(f"{m} {dt:.1f} s" for m, dt, _ in panels))
    f = camlens.filters(lm, [photo], layer="blocks.5", top=8, order="contribution", target=cls)
    fig = filter_grid(f)
    out = save_png(ROOT / "docs" / "filters_grid.png", fig)
    plt.close(fig)
    print(f"wrote {out}: channels {np.asarray(f.indices)[0].tolist()}")


if __name__ == "__main__":
    main()
