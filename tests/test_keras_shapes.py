"""Issue 13: the README's worked multi-output Keras example — ``shapes-2head`` as a Keras Functional model
with dict outputs (:mod:`camlens.models.keras_shapes`, the shipped weights converted from the PyTorch
model's). Its logits and its Grad-CAM maps per head equal the PyTorch model's, and the maps point at
the objects the heads name (ground truth of the synthetic images)."""

from __future__ import annotations

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()
torch = pytest.importorskip("torch")

import camlens  # noqa: E402
from camlens.datasets.shapes import make_shapes  # noqa: E402
from camlens.models import keras_shapes  # noqa: E402


@pytest.fixture(scope="module")
def data():
    d = make_shapes(12, seed=777)
    x = np.asarray(d.images, dtype=np.float32)  # (N, 3, 64, 64) in [0, 1]
    return d, x, np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def models():
    return keras_shapes.shapes_model(), camlens.models.load("shapes-2head")


def test_logits_equal_the_pytorch_model(models, data):
    km, tm = models
    _, x, xk = data
    got = km(xk, training=False)
    with torch.no_grad():
        want = tm.model(torch.from_numpy(x))
    for head in ("shape", "colour"):
        np.testing.assert_allclose(np.asarray(got[head]), want[head].numpy(), rtol=0, atol=1e-4)


def test_grad_cam_per_head_equals_the_pytorch_model(models, data):
    km, tm = models
    _, x, xk = data
    targets = ["shape:circle", "colour:red", "shape:cross"]
    got = camlens.explain(km, xk, targets=targets, layer="features", categories=keras_shapes.categories())
    want = camlens.explain(tm, torch.from_numpy(x), targets=targets, layer="features")
    assert got.maps.shape == (12, 3, 64, 64)
    np.testing.assert_allclose(got.maps, want.maps.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.scores, want.scores.numpy(), rtol=0, atol=1e-4)
    assert [t.label for t in got.targets[0]] == [t.label for t in want.targets[0]]


def test_each_head_points_at_an_object(models, data):
    """Top class per head: the map's peak lies on one of the two objects in most images (the
    trained model's heads each learned to use one; pointing game, 2 px tolerance)."""
    km, _ = models
    d, _, xk = data
    exp = camlens.explain(km, xk, targets=None, layer="features",  # each head's top class
                          categories=keras_shapes.categories())
    masks = np.asarray(d.masks["shape"]) | np.asarray(d.masks["colour"])  # (N, 64, 64): either object
    hits = 0
    for b in range(xk.shape[0]):
        for t in range(exp.maps.shape[1]):
            i, j = np.unravel_index(np.argmax(exp.maps[b, t]), exp.maps.shape[-2:])
            hits += bool(masks[b, max(i - 2, 0):i + 3, max(j - 2, 0):j + 3].any())
    assert hits / (xk.shape[0] * exp.maps.shape[1]) >= 0.8
