"""Issue 13: everything after ``camlens.explain`` on Keras models, without torch.

``camlens.stream`` over NumPy / TF batches (the maps of one explain call, bit for bit),
``Explanation.save`` / ``camlens.load``, boxes and masks from Keras maps, grids / overlays and the
HTML report, ``camlens.models.load("keras:...")`` (saved files, ``keras.applications`` by name with
their own ``preprocess_input``, weights files, ImageNet names, the errors), and the CLI commands
with ``--model keras:...`` — in a fresh interpreter with torch unimportable. Skipped without Keras.
(The metric numbers against the PyTorch twin: tests/test_keras_evaluate_parity.py.)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import camlens  # noqa: E402
from camlens.backends.keras.loading import affine_preprocessing  # noqa: E402
from camlens.core.errors import ConfigError, MissingFileError, ModelRuntimeError  # noqa: E402
from camlens.localize import boxes_from_maps, masks_from_maps  # noqa: E402
from test_keras_backend import _NO_TORCH  # noqa: E402  (torch made unimportable, as on a machine without it)

L = keras.layers
TARGETS = [1, 2]


def _small(seed=0, classes=4):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2D(8, 3, strides=2, activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(classes, activation="softmax", name="fc")(x), name="small")


@pytest.fixture(scope="module")
def model():
    return _small()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def whole(model, images):
    return camlens.explain(model, images, targets=TARGETS)


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    """A saved model, its weights, another model's weights, and two photos (40 x 50, uint8)."""
    d = tmp_path_factory.mktemp("keras_files")
    model.save(d / "small.keras")
    model.save_weights(d / "small.weights.h5")
    _small(seed=1, classes=7).save_weights(d / "other.weights.h5")
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).save(d / f"img{i}.png")
    return d


def test_stream_over_numpy_and_tf_batches_gives_the_maps_of_one_call(model, images, whole):
    items = [images[:2], tf.constant(images[2:4]), images[4]]  # batches (NumPy, TF) and one image (H, W, C)
    res = list(camlens.stream(model, items, TARGETS, batch_size=2))
    assert [r.source for r in res] == [(0, 0), (0, 1), (1, 0), (1, 1), 2]
    for b, r in enumerate(res):
        assert r.maps.shape == (1, 2, 32, 32)
        np.testing.assert_array_equal(r.maps, whole.maps[b:b + 1])
        np.testing.assert_array_equal(r.scores, whole.scores[b:b + 1])
    bad = list(camlens.stream(model, [images[0, 0]], TARGETS, on_error="yield"))  # (32, 3): no image
    assert isinstance(bad[0], camlens.Failure) and "(H, W, C)" in str(bad[0].error)


def test_save_and_load_round_trip(whole, tmp_path):
    path = whole.save(tmp_path / "keras_exp")
    back = camlens.load(path)
    assert isinstance(back.maps, np.ndarray) and back.maps.dtype == np.float32
    for name in ("maps", "raw", "scores", "probs", "inputs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(whole, name), err_msg=name)
    assert back.labels == whole.labels == [["1", "2"]] * 5
    assert (back.method, back.layers) == ("gradcam", ["c2"])


def test_boxes_and_masks_from_keras_maps(whole):
    maps = np.asarray(whole.maps)
    masks = masks_from_maps(whole.maps, 0.5)
    assert isinstance(masks, np.ndarray) and masks.shape == (5, 2, 32, 32)
    np.testing.assert_array_equal(masks, maps >= 0.5 * maps.max(axis=(-2, -1), keepdims=True))
    boxes = boxes_from_maps(whole.maps, 0.5, largest=False)  # the box around every pixel of the mask
    assert isinstance(boxes, np.ndarray) and boxes.shape == (5, 2, 4)
    for b in range(5):
        for t in range(2):
            ys, xs = np.nonzero(masks[b, t])
            np.testing.assert_array_equal(boxes[b, t], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_grid_overlay_and_html_report(whole, tmp_path):
    from camlens.viz import colorize, explanation_grid, overlay, write_report

    fig = explanation_grid(whole)
    assert len([ax for ax in fig.axes if ax.images]) == 10  # B * T cells
    img = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    got = overlay(img, whole.maps[0, 0], alpha=0.4)
    want = np.round(0.6 * img.astype(np.float64) + 0.4 * colorize(whole.maps[0, 0]).astype(np.float64))
    assert np.abs(got.astype(np.float64) - want).max() <= 1
    out = write_report([whole.image(b) for b in range(5)], tmp_path / "report.html", names=[f"im{b}" for b in range(5)])
    html = out.read_text()
    assert out.stat().st_size > 5000 and "im4" in html and "<html" in html.lower()


def test_keras_application_by_name_preprocesses_as_keras(tmp_path):
    m = camlens.models.load("keras:applications.MobileNetV2@32")
    assert isinstance(m.model, keras.Model) and m.random_weights and m.input_size == 32
    assert m.categories[281] == "tabby" and len(m.categories) == 1000
    photo = (np.random.default_rng(2).random((40, 50, 3)) * 255).astype(np.uint8)
    x = m.preprocess(photo)
    resized = np.asarray(Image.fromarray(photo).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    want = keras.applications.mobilenet_v2.preprocess_input(resized.copy()[None])
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(m.to_display(x)[0], resized.astype(np.uint8))
    e = camlens.explain(m, photo, top_k=2)
    assert e.maps.shape == (1, 2, 32, 32) and len(e.layers) == 1  # (at 32 px the last maps are 1 x 1: an earlier one)
    np.testing.assert_array_equal(e.display[0], resized.astype(np.uint8))
    np.testing.assert_allclose(e.scores, camlens.explain(m.model, x, targets=[t.cls for t in e.targets[0]]).scores,
                               rtol=0, atol=0)


def test_preprocessing_inverses_for_every_family():
    """caffe (BGR minus means), tf ([-1, 1]), torch ((x/255 - mean)/std) and none: the affine form found."""
    apps = keras.applications
    for pre, perm in ((apps.resnet50.preprocess_input, [2, 1, 0]), (apps.mobilenet_v2.preprocess_input, [0, 1, 2]),
                      (apps.densenet.preprocess_input, [0, 1, 2]), (apps.efficientnet.preprocess_input, [0, 1, 2])):
        got = affine_preprocessing(lambda a, p=pre: np.asarray(p(np.array(a, copy=True))))
        assert got is not None and list(got[0]) == perm
        x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32) * 255
        y = np.asarray(pre(x.copy()))
        np.testing.assert_allclose(got[1] * x[..., got[0]] + got[2], y, rtol=1e-5, atol=1e-3)


def test_imagenet_names_are_torchvisions():
    """The torch-free copy equals the list torchvision ships (read from its source, torch not imported)."""
    names = camlens.models.keras_loaded.imagenet_names()
    assert len(names) == 1000 and names[0] == "tench" and names[281] == "tabby" and names[999] == "toilet tissue"
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchvision is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "models" / "_meta.py"
    tree = ast.parse(src.read_text())
    value = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", None) == "_IMAGENET_CATEGORIES")
    assert names == ast.literal_eval(value)


def test_keras_model_files_weights_and_errors(files, model, images):
    m = camlens.models.load(f"keras:{files / 'small.keras'}")
    assert not m.random_weights and m.categories is None and m.input_size == 32
    for a, b in zip(m.model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = m.preprocess(str(files / "img0.png"))  # a saved model: pixels / 255
    want = np.asarray(Image.open(files / "img0.png").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR),
                      dtype=np.float32)[None] / 255
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-7)
    m2 = camlens.models.load(f"keras:{files / 'small.keras'}", weights=files / "small.weights.h5")
    np.testing.assert_array_equal(m2.model.get_weights()[0], model.get_weights()[0])
    with pytest.raises(ConfigError, match=r"close names: \['MobileNetV2'"):
        camlens.models.load("keras:applications.MobilNetV2")
    with pytest.raises(MissingFileError, match="not found"):
        camlens.models.load(f"keras:{files / 'missing.keras'}")
    with pytest.raises(MissingFileError, match="weights file not found"):
        camlens.models.load(f"keras:{files / 'small.keras'}", weights=files / "nope.weights.h5")
    with pytest.raises(ModelRuntimeError, match="do not fit"):
        camlens.models.load(f"keras:{files / 'small.keras'}", weights=files / "other.weights.h5")
    with pytest.raises(ConfigError, match="int >= 32"):
        camlens.models.load("keras:applications.ResNet50@big")
    with pytest.raises(ConfigError, match="for PyTorch models"):
        camlens.models.load(f"keras:{files / 'small.keras'}", device="cpu")


def test_evaluate_and_mprt_on_a_loaded_keras_model(files):
    m = camlens.models.load(f"keras:{files / 'small.keras'}")
    e = camlens.explain(m, str(files / "img0.png"), targets=TARGETS)
    s = camlens.evaluate(m, e.inputs, e, ["deletion", "mprt"], options={"deletion": {"step": 100}})
    assert s["deletion"].shape == (1, 2) and s.extra["mprt"]["steps"] == ["fc", "c2", "c1"]
    np.testing.assert_allclose(s.extra["mprt"]["reference_correlation"], 1.0, atol=1e-6)


@pytest.mark.slow
def test_cli_commands_on_keras_models_without_torch(files, model, tmp_path):
    """explain, localize, report and evaluate with --model keras:FILE in one fresh interpreter where
    torch cannot be imported; explain's .npy maps equal camlens.explain on the same preprocessed photo."""
    out = tmp_path / "cli"
    cmds = [["explain", "img0.png", "img1.png", "--model", "keras:small.keras", "--target", "1", "-o", str(out / "ex")],
            ["localize", "img0.png", "--model", "keras:small.keras", "-o", str(out / "loc")],
            ["report", "img0.png", "--model", "keras:small.keras", "-o", str(out / "rep")],
            ["evaluate", "img0.png", "img1.png", "--model", "keras:small.keras", "--metric", "deletion", "--metric",
             "mprt", "--method", "gradcam", "--option", "deletion.step=200", "-o", str(out / "ev")],
            ["explain", "img0.png", "--model", "keras:applications.MobileNetV2@32", "--top-k", "1", "-o",
             str(out / "app")],
            ["explain", "img0.png", "--model", "keras:applications.MobilNetV2", "-o", str(out / "bad")]]
    code = (_NO_TORCH + "import os\nos.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\nfrom typer.testing import CliRunner\n"
            "from camlens.fronts.cli import app\n"
            f"for cmd in {cmds!r}:\n"
            "    r = CliRunner().invoke(app, cmd)\n"
            "    print('EXIT', r.exit_code, r.output.replace(chr(10), ' ')[-300:])\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm')))\n")
    src = str(Path(camlens.__file__).resolve().parents[1])  # this camlens, whatever the working directory
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=files, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    exits = [ln for ln in lines if ln.startswith("EXIT")]
    assert [int(ln.split()[1]) for ln in exits] == [0, 0, 0, 0, 0, 2], exits
    assert "close names: ['MobileNetV2'" in exits[-1]
    assert lines[-1] == "[]"  # torch never imported
    summary = json.loads((out / "ex" / "summary.json").read_text())
    assert len(summary["results"] if "results" in summary else summary["images"]) == 2
    maps = np.load(out / "ex" / "img0_maps.npy")
    m = camlens.models.load(f"keras:{files / 'small.keras'}")
    want = camlens.explain(m, str(files / "img0.png"), targets=[1]).maps
    np.testing.assert_allclose(maps.reshape(want.shape), want, rtol=0, atol=1e-6)
    assert (out / "rep").exists() and any((out / "loc").glob("img0_*_mask.png"))
    rows = json.loads((out / "ev" / "results.json").read_text())
    assert {(r["method"], r["metric"]) for r in rows} >= {("gradcam", "deletion"), ("gradcam", "mprt")}
