"""``camlens.visualize`` on Keras 3 models (TensorFlow here; JAX and torch in child interpreters): the
objectives rise far above the starting and random images on a small CNN with random weights, the
values are the model's own numbers, a batch gives what each objective alone gives, the model comes
back exactly as it came, the converted Keras shapes-2head gives the PyTorch model's images (same
weights, same draws), its class images are classified as their class, a loaded model's
preprocessing (BGR, caffe) is honoured, and the CLI runs on a ``.keras`` file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()

import camlens  # noqa: E402
from camlens.core.errors import LayerError, ModelError, TargetError  # noqa: E402
from camlens.datasets.shapes import COLOUR_CLASSES, SHAPE_CLASSES  # noqa: E402
from camlens.models import keras_shapes  # noqa: E402

L = keras.layers
# class 2, a channel's mean, a neuron at the centre (alive at the start: not a dead ReLU), a given neuron
OBJECTIVES = [2, "c2:1", ("c2", 5, None, None), ("c1", 0, 5, 7)]


def _cnn(seed: int = 0, size: int = 24):
    """A small CNN with random weights drawn from a NumPy seed (He-scaled kernels, BatchNorm with
    non-trivial statistics); the global random state is not touched."""
    inp = keras.Input((size, size, 3), name="img")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    model = keras.Model(inp, L.Dense(5, name="logits")(L.GlobalAveragePooling2D(name="gap")(x)), name="cnn")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (L.Conv2D, L.Dense)):
            k = layer.kernel.shape
            layer.kernel.assign((rng.standard_normal(k) * np.sqrt(2 / np.prod(k[:-1]))).astype("float32"))
            layer.bias.assign((0.1 * rng.standard_normal(layer.bias.shape)).astype("float32"))
        elif isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign((1 + 0.1 * rng.standard_normal(c)).astype("float32"))
            layer.beta.assign((0.1 * rng.standard_normal(c)).astype("float32"))
            layer.moving_mean.assign((0.1 * rng.standard_normal(c)).astype("float32"))
            layer.moving_variance.assign(np.linspace(0.5, 1.5, c).astype("float32"))
    return model


@pytest.fixture(scope="module")
def cnn():
    return _cnn()


def _objective_values(model, x: np.ndarray, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The four OBJECTIVES of each image of ``x`` ``(N, H, W, 3)`` in [0, 1], read off the model itself."""
    feat = keras.Model(model.input, [model.get_layer("c1").output, model.get_layer("c2").output, model.output])
    a1, a2, lo = (np.asarray(t) for t in feat((x - np.asarray(mean)) / np.asarray(std), training=False))
    h, w = a2.shape[1:3]
    return np.stack([lo[:, 2], a2[..., 1].mean((1, 2)), a2[:, h // 2, w // 2, 5], a1[:, 5, 7, 0]], 1)


@pytest.fixture(scope="module")
def random_values(cnn):
    """The four OBJECTIVES on 64 uniform random images (the same size): their spread and maximum."""
    return _objective_values(cnn, np.random.default_rng(1).random((64, 24, 24, 3), dtype=np.float32))


@pytest.mark.parametrize("param", ["fourier", "pixels"])
def test_objectives_rise_far_above_the_start_and_any_random_image(cnn, random_values, param):
    """Without transforms (a neuron stays on its receptive field): 24 steps take every objective above
    all 64 random images and many of their standard deviations above the starting image."""
    vis = camlens.visualize(cnn, OBJECTIVES, param=param, steps=24, size=24, seed=0, transforms=None)
    start = camlens.visualize(cnn, OBJECTIVES, param=param, steps=0, size=24, seed=0, transforms=None).values
    gain = (vis.values - start) / random_values.std(0)
    # measured, (class, channel, centre neuron, given neuron), fourier / pixels: value - best random image
    # (0.55, 0.48, 3.2, 1.4) / (0.67, 0.57, 1.2, 0.23); gain in random-image std (22, 27, 12, 6.8) / (26, 31, 6.3, 3.6)
    assert (vis.values > random_values.max(0)).all(), (vis.values, random_values.max(0))
    assert (gain > np.array([10.0, 10.0, 3.0, 2.0])).all(), gain
    assert vis.history.shape == (24, 4) and (vis.history[-1] > vis.history[0]).all()


def test_with_the_default_transforms_classes_and_channels_still_beat_every_random_image(cnn, random_values):
    vis = camlens.visualize(cnn, OBJECTIVES, steps=24, size=24, seed=0)  # fourier, pad / jitter / scale / rotate
    start = camlens.visualize(cnn, OBJECTIVES, steps=0, size=24, seed=0).values
    gain = (vis.values - start) / random_values.std(0)
    # measured: class / channel 0.21 / 0.16 above the best random image, gains (11, 14, 1.7, 1.4): a neuron's
    # receptive field moves under the jitter, so it rises more slowly (it does rise)
    assert (vis.values[:2] > random_values.max(0)[:2]).all(), (vis.values, random_values.max(0))
    assert (gain > np.array([6.0, 6.0, 0.7, 0.7])).all(), gain


def test_values_are_the_models_own_numbers_and_the_images_are_nhwc_in_0_1(cnn):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    vis = camlens.visualize(cnn, OBJECTIVES, steps=6, size=24, mean=mean, std=std, seed=2)
    assert vis.floats.shape == (4, 24, 24, 3) and vis.floats.dtype == np.float32
    assert 0.0 <= vis.floats.min() and vis.floats.max() <= 1.0
    np.testing.assert_array_equal(vis.images, np.round(vis.floats * 255).astype(np.uint8))
    want = _objective_values(cnn, vis.floats, mean, std)[range(4), range(4)]
    np.testing.assert_allclose(vis.values, want, rtol=1e-5, atol=1e-5)
    assert vis.labels == ["2", "c2:1", "c2:5 centre", "c1:0 (5, 7)"]
    # a weighted sum is the sum of its terms, on the same image
    kw = dict(steps=0, size=24, seed=5)
    a, b = camlens.visualize(cnn, [2, "c2:1"], **kw).values
    both = camlens.visualize(cnn, {2: 1.5, "c2:1": -2.0}, **kw).values[0]
    assert both == pytest.approx(1.5 * a - 2.0 * b, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("param", ["fourier", "pixels"])
def test_a_batch_gives_what_each_objective_alone_gives(cnn, param):
    # 8 steps: eager, equal; 32 (fourier): the step is one tf.function (other kernels per batch size, Adam
    # amplifies their rounding)
    runs = ((8, OBJECTIVES, 1e-5),) + (((32, OBJECTIVES[1:3], 2e-2),) if param == "fourier" else ())
    for steps, objs, atol in runs:
        both = camlens.visualize(cnn, objs, param=param, steps=steps, size=24, seed=3)
        for i, obj in enumerate(objs):
            one = camlens.visualize(cnn, obj, param=param, steps=steps, size=24, seed=3)
            np.testing.assert_allclose(both.floats[i], one.floats[0], atol=atol, rtol=0)
            assert both.values[i] == pytest.approx(one.values[0], rel=1e-3, abs=1e-4)
    a = camlens.visualize(cnn, OBJECTIVES[:2], param=param, steps=4, size=24, seed=3)
    b = camlens.visualize(cnn, OBJECTIVES[:2], param=param, steps=4, size=24, seed=3)
    c = camlens.visualize(cnn, OBJECTIVES[:2], param=param, steps=4, size=24, seed=4)
    assert np.array_equal(a.floats, b.floats) and not np.array_equal(a.floats, c.floats)


def _state(model):
    return ([v.numpy().copy() for v in model.variables], [layer.trainable for layer in model._flatten_layers()],
            [v.trainable for v in model.variables], [type(v.value).__name__ for v in model.variables])


def _same(before, model) -> None:
    values, flags, vflags, kinds = before
    now = _state(model)
    assert all(np.array_equal(a, b) for a, b in zip(values, now[0])) and len(values) == len(now[0])
    assert (flags, vflags, kinds) == now[1:]


def test_the_model_comes_back_exactly_as_it_came_also_after_errors():
    model = _cnn(seed=1)
    model.get_layer("c1").trainable = False  # a mix of flags
    before = _state(model)
    camlens.visualize(model, OBJECTIVES, steps=3, size=24)
    camlens.visualize(model, OBJECTIVES[:2], param="pixels", steps=32, size=24)  # the compiled step
    _same(before, model)
    for bad, err, match in ((("c2", 9), LayerError, "channel 9 out of range: layer 'c2' has 6"),
                            (("c2", 0, 30, 1), LayerError, r"neuron \(30, 1\) is outside layer 'c2''s 12x12 map"),
                            ("logits:1", LayerError, r"gives \(1, 5\), not a \(B, h, w, C\) map"),
                            (7, TargetError, "7"),
                            ("c22:1", TargetError, r"nor is 'c22' a layer.*'c2'")):
        with pytest.raises(err, match=match):
            camlens.visualize(model, bad, steps=2, size=24)
        _same(before, model)


def test_a_fixed_size_model_says_which_size_to_give():
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    model = keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(x)))
    with pytest.raises(ModelError, match=r"takes 16x16 images.*40x40.*transforms=\{'pad': 0\}"):
        camlens.visualize(model, 1, steps=1)  # the default size is the model's: 16 + 2 x 12
    vis = camlens.visualize(model, [1, "conv:2"], steps=3, transforms={"pad": 0})
    assert vis.floats.shape == (2, 16, 16, 3)


def test_a_loaded_model_with_caffe_preprocessing_gets_bgr_inputs(cnn):
    """A KerasLoadedModel's preprocess_input (caffe: RGB -> BGR, minus the ImageNet means in 0-255) read as
    mean / std / channel order: the values are the model's on preprocess_input(255 · image)."""
    from camlens.backends.keras.loading import affine_preprocessing
    from camlens.models.keras_loaded import KerasLoadedModel, KerasPreprocess

    def caffe(a: np.ndarray) -> np.ndarray:
        return np.asarray(keras.applications.resnet50.preprocess_input(np.array(a, dtype=np.float32)))

    pre = KerasPreprocess((24, 24), caffe, 24)
    pre.affine = affine_preprocessing(caffe)
    lm = KerasLoadedModel(model=cnn, preprocess=pre, categories=None, name="cnn-caffe", input_size=24)
    mean, std, channels = lm.input_normalisation()
    assert channels == (2, 1, 0) and std == pytest.approx((1 / 255,) * 3)
    assert mean == pytest.approx((123.68 / 255, 116.779 / 255, 103.939 / 255))
    vis = camlens.visualize(lm, [2, "c2:1"], steps=4, seed=1)
    assert vis.floats.shape == (2, 24, 24, 3)
    out = np.asarray(cnn(caffe(255.0 * vis.floats), training=False))
    assert vis.values[0] == pytest.approx(float(out[0, 2]), rel=1e-4, abs=1e-4)
    # the uint8 images, given back to the loaded model, are classified from the same inputs
    exp = camlens.explain(lm, list(vis.images), targets=[2], layer="c2", relu=False)
    assert float(exp.scores[0, 0]) == pytest.approx(float(out[0, 2]), abs=0.05)


# ---------------------------------------------------------------------------------------------
# the shipped shapes-2head: the Keras model converted from the PyTorch one (same weights)

@pytest.fixture(scope="module")
def shapes():
    """The Keras shapes-2head (shipped weights) and, where torch is installed, the PyTorch one."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return keras_shapes.shapes_model(), None
    return keras_shapes.shapes_model(), camlens.models.load("shapes-2head")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the comparison (two OpenMP pools, TF's and torch's, on 2 busy cores make
    torch's steps 20x slower), restored after."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("param", ["fourier", "pixels"])
def test_the_keras_shapes_model_gives_the_pytorch_models_images(shapes, param, one_torch_thread):
    km, tm = shapes
    k_objs, t_objs = ["shape:circle", "features/block4_relu:3"], ["shape:circle", "features.4:3"]
    kw = dict(param=param, size=64, seed=0)
    # the same start, the same transforms, the same maths: equal to float rounding for the first steps
    k = camlens.visualize(km, k_objs, steps=2, categories=keras_shapes.categories(), **kw)
    t = camlens.visualize(tm, t_objs, steps=2, **kw)
    np.testing.assert_allclose(k.floats, t.floats, atol=1e-4, rtol=0)
    np.testing.assert_allclose(k.history, t.history, rtol=1e-4, atol=1e-3)
    # then Adam's sign-like steps on near-zero gradients amplify the rounding: comparable, not equal
    k = camlens.visualize(km, k_objs, steps=40, categories=keras_shapes.categories(), **kw)
    t = camlens.visualize(tm, t_objs, steps=40, **kw)
    np.testing.assert_allclose(k.values, t.values, rtol=0.02)  # measured: within 0.3 %
    r = np.corrcoef(k.floats.ravel(), t.floats.ravel())[0, 1]
    assert r > 0.9, r  # measured 0.98 (fourier), 1.0 (pixels)


def test_shapes_2head_class_images_are_classified_as_their_class(shapes):
    km, _ = shapes
    objs = [f"shape:{c}" for c in SHAPE_CLASSES] + [f"colour:{c}" for c in COLOUR_CLASSES]
    heads = [("shape", i) for i in range(len(SHAPE_CLASSES))] + [("colour", i) for i in range(len(COLOUR_CLASSES))]
    before = [w.copy() for w in km.get_weights()]

    def probs(images: np.ndarray) -> np.ndarray:
        out = km(images.astype(np.float32) / 255, training=False)  # the uint8 images, as saved
        return np.array([float(keras.ops.softmax(out[h], axis=-1)[i, c]) for i, (h, c) in enumerate(heads)])

    vis = camlens.visualize(km, objs, steps=32, categories=keras_shapes.categories(), seed=0)  # all 7 in one batch
    start = camlens.visualize(km, objs, steps=0, categories=keras_shapes.categories(), seed=0)
    assert vis.labels == [f"shape: {c}" for c in SHAPE_CLASSES] + [f"colour: {c}" for c in COLOUR_CLASSES]
    p, p0 = probs(vis.images), probs(start.images)
    assert (p >= 0.99).all(), dict(zip(objs, p))  # measured: >= 0.999999 (shape: square 0.9999994)
    assert (p0 < 0.5).sum() >= 5, p0  # from a start that is not that class (measured: 6 of 7 below 0.45)
    assert all(np.array_equal(a, b) for a, b in zip(before, km.get_weights()))


def test_cli_visualize_runs_on_a_keras_model_file(shapes, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from camlens.fronts.cli import app

    path = tmp_path / "shapes.keras"
    shapes[0].save(path)
    out = tmp_path / "vis"
    res = CliRunner().invoke(app, ["visualize", "--model", f"keras:{path}", "--class", "shape:1", "--channel",
                                   "features/block4_relu:3", "--steps", "24", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert [o["objective"] for o in s["objectives"]] == ["shape: 1", "features/block4_relu:3"]
    assert 0.99 <= s["objectives"][0]["prob"] <= 1.0 and "prob" not in s["objectives"][1]  # measured 0.99993
    assert s["options"]["size"] == [64, 64] and s["options"]["channels"] == [0, 1, 2]
    assert Image.open(out / "row.png").size == (128, 64)


# ---------------------------------------------------------------------------------------------
# Keras' JAX and torch backends, in child interpreters (Keras reads KERAS_BACKEND once, at import)

_CHILD = """
import json, sys
import numpy as np, keras, camlens
from camlens.models import keras_shapes
km = keras_shapes.shapes_model()
before = [w.copy() for w in km.get_weights()]
out = {"backend": keras.backend.backend()}
for param in ("fourier", "pixels"):
    v = camlens.visualize(km, ["shape:circle", "features/block4_relu:3"], param=param, steps=3,
                          categories=keras_shapes.categories())
    out[param] = {"values": v.values.tolist(), "history": v.history.tolist(), "floats": v.floats.ravel()[::97].tolist()}
out["untouched"] = all(np.array_equal(a, b) for a, b in zip(before, km.get_weights()))
out["tensorflow_imported"] = "tensorflow" in sys.modules
print(json.dumps(out))
"""


@pytest.mark.slow  # two interpreters importing JAX / torch and tracing (about 20 s at once)
def test_keras_jax_and_torch_backends_give_the_tensorflow_images(shapes):
    import importlib.util

    procs = {}
    for backend in ("jax", "torch"):
        if importlib.util.find_spec(backend) is None:
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                              os.environ.get("PYTHONPATH", "")])}
        procs[backend] = subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
    if not procs:
        pytest.skip("neither jax nor torch is installed")
    km = shapes[0]
    for backend, proc in procs.items():
        so, se = proc.communicate(timeout=600)
        assert proc.returncode == 0, se[-3000:]
        got = json.loads(so.strip().splitlines()[-1])
        assert got["backend"] == backend and got["untouched"] and not got["tensorflow_imported"]
        for param in ("fourier", "pixels"):
            want = camlens.visualize(km, ["shape:circle", "features/block4_relu:3"], param=param, steps=3,
                                     categories=keras_shapes.categories())
            np.testing.assert_allclose(got[param]["values"], want.values, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(got[param]["history"], want.history, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(got[param]["floats"], want.floats.ravel()[::97], atol=1e-4)
