"""The README's Keras picture: ``python scripts/figures_keras.py`` (no download).

Writes ``docs/keras_shapes.png``: the trained two-head toy model ``shapes-2head`` as a Keras Functional
model with dict outputs (:mod:`camlens.models.keras_shapes`; weights converted from the shipped
PyTorch ones), four generated images, Grad-CAM of each head's top class at the nested layer
``features`` in ONE call (one forward, one backward for both heads' targets), titled with the
head, the class and its probability.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import numpy as np  # noqa: E402

import camlens  # noqa: E402
from camlens.datasets.shapes import make_shapes  # noqa: E402
from camlens.models import keras_shapes  # noqa: E402
from camlens.viz.grid import explanation_grid, save_png  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> Path:
    data = make_shapes(4, seed=2024)
    images = np.ascontiguousarray(np.asarray(data.images, dtype=np.float32).transpose(0, 2, 3, 1))  # NHWC [0, 1]
    model = keras_shapes.shapes_model()
    exp = camlens.explain(model, images, targets=None, layer="features", categories=keras_shapes.categories())
    display = (images * 255).round().astype(np.uint8)
    fig = explanation_grid(exp, display, max_cols=2)
    fig.suptitle("camlens on a Keras model: shapes-2head (dict outputs), Grad-CAM of each head's top class",
                 fontsize=9)
    out = save_png(ROOT / "docs" / "keras_shapes.png", fig)
    print(f"wrote {out}; targets {[[t.label for t in row] for row in exp.targets]}")
    return out


if __name__ == "__main__":
    main()
