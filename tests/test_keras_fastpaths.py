"""Issue 13, the Keras backend's fast paths, each equal to the plain way.

1. All T targets' gradients on a Keras graph model come from the part of the graph below the
layers, run once on T tiled copies of the batch (``backends/keras/graph.downstream_cut``), with ONE
backward. The maths must equal the full forward's tape and its Jacobian (the path subclassed models
take) on graphs with what can go wrong: a skip connection across the layer (an upstream output the
part needs), the model input used below the layer, a head that does not depend on the layer, two
layers one below the other, a nested model holding the layer, a shared layer, and more rows than one
backward takes. Ablation-CAM's replaced-layer forwards run the same part.

2. Many score-only forwards (Score-CAM, RISE, deletion curves) run the model's forward compiled
once as a ``tf.function``: the same scores as the layer-by-layer forward."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()

import camlens  # noqa: E402
from camlens.backends.keras import autodiff as ad  # noqa: E402
from camlens.backends.keras import backend as kb  # noqa: E402
from camlens.backends.keras.graph import downstream_cut  # noqa: E402

L = keras.layers


def _skip_model() -> keras.Model:
    """conv1 -> conv2 (the layer) -> add(conv2, conv1) -> conv3 -> concat with the pooled input ->
    GAP -> "cls" (4); a second head "aux" (3) from conv1 only (does not depend on conv2)."""
    keras.utils.set_random_seed(1)
    x = keras.Input((16, 16, 3))
    c1 = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    c2 = L.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(c1)
    s = L.Add(name="add")([c2, c1])
    c3 = L.Conv2D(6, 3, padding="same", activation="relu", name="conv3")(s)
    cat = L.Concatenate(name="cat")([c3, L.AveragePooling2D(1, name="ident")(x)])
    cls = L.Dense(4, name="cls")(L.GlobalAveragePooling2D(name="gap")(cat))
    aux = L.Dense(3, activation="softmax", name="aux")(L.GlobalAveragePooling2D(name="gap1")(c1))
    return keras.Model(x, {"cls": cls, "aux": aux})


def _full_tape(monkeypatch):
    monkeypatch.setattr(kb, "downstream_cut", lambda model, paths: None)


def _spy_cut(m) -> list:
    """Record each call of the TF backward below a cut (``_TF._below_cut``)."""
    used: list = []
    real = ad._TF._below_cut

    def spy(self, *a, **k):
        used.append(1)
        return real(self, *a, **k)

    m.setattr(ad._TF, "_below_cut", spy)
    return used


def _both(model, x, layer, targets, monkeypatch, method="hirescam", fallback=False):
    """(the maps by the cut, by the full forward's tape); the first must not take the tape's path
    unless ``fallback``."""
    with monkeypatch.context() as m:
        used = _spy_cut(m)
        cut = camlens.explain(model, x, targets=targets, layer=layer, method=method, relu=False)
    assert fallback or used, "the cut was not used"
    with monkeypatch.context() as m:
        _full_tape(m)
        full = camlens.explain(model, x, targets=targets, layer=layer, method=method, relu=False)
    return cut, full


def _close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * max(float(np.abs(b).max()), 1e-6))


def test_the_cut_of_a_skip_graph():
    cut = downstream_cut(_skip_model(), ["conv2"])
    assert cut.roots == {"conv2"}
    assert {"add", "conv3", "cat", "gap", "cls"} <= cut.down and "conv1" not in cut.down
    assert "conv1" in cut.keep and "ident" in cut.keep  # the skip and the pooled input, fed from the forward
    assert "aux" in cut.keep and "gap1" not in cut.keep  # the head not below the layer: its recorded output
    assert not cut.input  # (the input reaches the part through "ident", kept)


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "gradcampp"])
def test_skip_graph_equals_the_full_tape(monkeypatch, method):
    model = _skip_model()
    x = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    targets = ["cls:0", "cls:3", "aux:1", lambda out: out["cls"][:, 1] - out["cls"][:, 2]]
    cut, full = _both(model, x, "conv2", targets, monkeypatch, method)
    _close(cut.raw, full.raw)
    _close(cut.scores, full.scores)
    assert np.abs(cut.raw[:, :2]).max() > 0 and np.abs(cut.raw[:, 2]).max() == 0  # "aux" does not see conv2


def test_two_layers_one_below_the_other(monkeypatch):
    model = _skip_model()
    x = np.random.default_rng(1).random((2, 16, 16, 3), dtype=np.float32)
    assert downstream_cut(model, ["conv2", "conv3"]).roots == {"conv2"}  # conv3 is computed from it
    with monkeypatch.context() as m:
        used = _spy_cut(m)
        cut = camlens.explain(model, x, targets=["cls:0", "cls:2"], layer=["conv2", "conv3"], method="hirescam",
                              relu=False)
    assert used
    with monkeypatch.context() as m:
        _full_tape(m)
        full = camlens.explain(model, x, targets=["cls:0", "cls:2"], layer=["conv2", "conv3"], method="hirescam",
                               relu=False)
    for name in ("conv2", "conv3"):
        _close(cut.raws[name], full.raws[name])


def test_input_used_below_the_layer(monkeypatch):
    keras.utils.set_random_seed(2)
    x_in = keras.Input((12, 12, 2))
    c = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x_in)
    m = L.Multiply(name="gate")([c, L.Conv2D(4, 1, name="proj")(x_in)])  # proj(x) is upstream, kept
    out = L.Dense(5)(L.Flatten()(L.Concatenate()([m, x_in])))  # the raw input itself, below the layer
    model = keras.Model(x_in, out)
    assert downstream_cut(model, ["conv"]).input
    x = np.random.default_rng(2).random((2, 12, 12, 2), dtype=np.float32)
    cut, full = _both(model, x, "conv", [0, 1, 4], monkeypatch)
    _close(cut.raw, full.raw)


def test_nested_model_holding_the_layer(monkeypatch):
    keras.utils.set_random_seed(3)
    i = keras.Input((12, 12, 3))
    a = L.Conv2D(6, 3, padding="same", activation="relu", name="a")(i)
    b = L.Conv2D(6, 3, padding="same", activation="relu", name="b")(a)
    inner = keras.Model(i, L.Add()([a, b]), name="backbone")
    x_in = keras.Input((12, 12, 3))
    f = inner(x_in)
    y = L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(L.Add()([f, L.Conv2D(6, 1, name="side")(x_in)])))
    model = keras.Model(x_in, y)
    cut = downstream_cut(model, ["backbone/b"])
    assert cut.roots == {"backbone/b"} and "backbone" in cut.down and {"backbone/a", "side"} <= cut.keep
    x = np.random.default_rng(3).random((2, 12, 12, 3), dtype=np.float32)
    got, full = _both(model, x, "backbone/b", [0, 2, 3], monkeypatch)
    _close(got.raw, full.raw)


def test_shared_layer_above_the_cut_falls_back(monkeypatch):
    keras.utils.set_random_seed(4)
    x_in = keras.Input((10, 10, 3))
    shared = L.Conv2D(4, 3, padding="same", activation="relu", name="shared")
    s1 = shared(x_in)
    s2 = shared(L.Lambda(lambda t: t * 0.5)(x_in))  # called twice: its outputs can't be told apart by name
    c = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(s1)
    y = L.Dense(3)(L.GlobalAveragePooling2D()(L.Add()([c, s2])))
    model = keras.Model(x_in, y)
    x = np.random.default_rng(4).random((2, 10, 10, 3), dtype=np.float32)
    got, full = _both(model, x, "conv", [0, 1, 2], monkeypatch, fallback=True)
    _close(got.raw, full.raw)


def test_more_rows_than_one_backward_takes(monkeypatch):
    model = _skip_model()
    monkeypatch.setattr(ad, "ROWS", 4)  # B = 3 images: one target per backward
    x = np.random.default_rng(5).random((3, 16, 16, 3), dtype=np.float32)
    got, full = _both(model, x, "conv2", ["cls:0", "cls:1", "cls:2"], monkeypatch)
    _close(got.raw, full.raw)


def test_per_image_targets(monkeypatch):
    """Top-1 per image (different classes per row) and a weighted combination."""
    model = _skip_model()
    x = np.random.default_rng(6).random((4, 16, 16, 3), dtype=np.float32)
    got, full = _both(model, x, "conv2", None, monkeypatch)
    _close(got.raw, full.raw)
    got, full = _both(model, x, "conv2", ["cls:0", "cls:1"], monkeypatch)
    c = camlens.explain(model, x, targets=["cls:0", "cls:1"], layer="conv2", method="hirescam", relu=False,
                        combine="sum")
    _close(c.raw[:, 0], got.raw.sum(axis=1))


@pytest.mark.parametrize("layer", ["conv2", "conv1"])
def test_ablation_cam_runs_only_below_the_layer(monkeypatch, layer):
    """Ablation-CAM's replaced-layer forwards run the part below the layer (the skip's upstream output
    from one forward of the image): the same scores as whole forwards with the layer replaced."""
    model = _skip_model()
    x = np.random.default_rng(7).random((2, 16, 16, 3), dtype=np.float32)
    called = []
    real = kb.GraphRun

    def spy(*a, **k):
        run = real(*a, **k)
        called.append(run.only is not None)
        return run

    with monkeypatch.context() as m:
        m.setattr(kb, "GraphRun", spy)
        got = camlens.explain(model, x, targets=["cls:0", "cls:2"], layer=layer, method="ablationcam", relu=False)
    assert any(called)
    with monkeypatch.context() as m:
        _full_tape(m)
        full = camlens.explain(model, x, targets=["cls:0", "cls:2"], layer=layer, method="ablationcam", relu=False)
    _close(got.raw, full.raw)


@pytest.mark.parametrize("method", ["scorecam", "occlusion"])
def test_compiled_forwards_equal_the_layer_by_layer_ones(monkeypatch, method):
    model = _skip_model()
    x = np.random.default_rng(8).random((2, 16, 16, 3), dtype=np.float32)
    with monkeypatch.context() as m:
        m.setattr(kb, "_COMPILE_CHUNKS", 10**9)  # never compiled
        plain = camlens.explain(model, x, targets=["cls:0", "cls:3"], layer="conv2", method=method)
    assert model not in kb._COMPILED or not kb._COMPILED[model]
    with monkeypatch.context() as m:
        m.setattr(kb, "_COMPILE_CHUNKS", 1)
        fast = camlens.explain(model, x, targets=["cls:0", "cls:3"], layer="conv2", method=method)
    assert kb._COMPILED[model]  # built, and kept for the next call
    np.testing.assert_allclose(fast.maps, plain.maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-5, atol=1e-6)


def test_the_compiled_forward_does_not_keep_the_model_alive(monkeypatch):
    monkeypatch.setattr(kb, "_COMPILE_CHUNKS", 1)
    model = _skip_model()
    camlens.explain(model, np.zeros((1, 16, 16, 3), np.float32), targets="cls:0", layer="conv2", method="scorecam")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
