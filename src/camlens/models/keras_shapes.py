"""``shapes-2head`` for Keras: the two-head toy model of :mod:`camlens.models.shapes`, as a Functional
``keras.Model`` with dict outputs ``{"shape": (B, 4), "colour": (B, 3)}`` and the same trained weights
(``camlens/data/shapes_2head.weights.h5``, converted from the PyTorch state dict by
``scripts/convert_shapes_keras.py``; the logits agree to 1e-5). No torch needed.

Layers: a nested Sequential ``features`` (5 blocks ``block{i}_pad`` / ``block{i}_conv`` / ``block{i}_bn``
/ ``block{i}_relu``: 5x5/2, 3x3, 3x3/2, 3x3, 1x1; explicit zero padding k // 2 as PyTorch pads, then a
"valid" convolution) -> (B, 16, 16, 48) at a 64x64 input, then global average pooling ``gap`` and two
``Dense`` heads ``shape`` and ``colour`` (logits). Inputs: NHWC images in [0, 1], no normalisation.

>>> model = camlens.models.keras_shapes.shapes_model()
>>> exp = camlens.explain(model, x, targets=["shape:circle", "colour:red"], layer="features")
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

import keras

from ..core.errors import MissingFileError
from ..datasets.shapes import COLOUR_CLASSES, SHAPE_CLASSES

__all__ = ["shapes_model", "build_shapes", "categories", "WEIGHTS", "BLOCKS"]

WEIGHTS = "shapes_2head.weights.h5"
BLOCKS = ((16, 5, 2), (32, 3, 1), (48, 3, 2), (48, 3, 1), (48, 1, 1))  # (channels, kernel, stride)


def build_shapes(size: int = 64) -> Any:
    """The architecture with fresh weights: ``keras.Model`` (B, size, size, 3) -> ``{"shape", "colour"}``."""
    L = keras.layers
    blocks: list = []
    for i, (c, k, s) in enumerate(BLOCKS):
        blocks += [L.ZeroPadding2D(k // 2, name=f"block{i}_pad"),
                   L.Conv2D(c, k, strides=s, padding="valid", use_bias=False, name=f"block{i}_conv"),
                   L.BatchNormalization(epsilon=1e-5, name=f"block{i}_bn"), L.ReLU(name=f"block{i}_relu")]
    features = keras.Sequential([keras.Input((size, size, 3)), *blocks], name="features")
    x = keras.Input((size, size, 3), name="image")
    p = L.GlobalAveragePooling2D(name="gap")(features(x))
    return keras.Model(x, {"shape": L.Dense(len(SHAPE_CLASSES), name="shape")(p),
                           "colour": L.Dense(len(COLOUR_CLASSES), name="colour")(p)}, name="shapes_2head")


def weights_path() -> Optional[Path]:
    """Path of the shipped weights file, or ``None`` when it is missing."""
    p = Path(str(resources.files("camlens") / "data" / WEIGHTS))
    return p if p.is_file() else None


def shapes_model(weights: Optional[str] = None) -> Any:
    """:func:`build_shapes` with the shipped (or given ``.weights.h5``) trained weights."""
    path = weights if weights is not None else weights_path()
    if path is None:
        raise MissingFileError(f"camlens/data/{WEIGHTS} is missing; run scripts/convert_shapes_keras.py")
    model = build_shapes()
    model.load_weights(str(path))
    return model


def categories() -> dict:
    """Class names per head, as the PyTorch model's."""
    return {"shape": list(SHAPE_CLASSES), "colour": list(COLOUR_CLASSES)}
