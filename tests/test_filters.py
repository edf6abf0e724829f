"""Per-filter activation maps (issue 14): :func:`camlens.filters` — a layer's top channels by mean
activation or by Grad-CAM weight x mean activation — against hand computations with forward hooks
(torch) and a ``tf.GradientTape`` (Keras), and the ``camlens filters`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (before TensorFlow, which the Keras test imports: after it, dynamo can segfault)
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import camlens
from camlens.errors import ConfigError, ModelError


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()


def _by_hand(net: torch.nn.Module, x: torch.Tensor, layer: str, cls: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Activations ``(B, C, h, w)`` of ``layer`` (a forward hook) and each channel's weight ``(B, C)``:
    its mean activation, times Grad-CAM's mean gradient of logit ``cls`` when ``cls`` is given."""
    got = {}
    h = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: got.setdefault("a", o))
    try:
        xg = x.clone()
        out = net(xg)
    finally:
        h.remove()
    a = got["a"]
    w = a.mean(dim=(2, 3))
    if cls is not None:
        g, = torch.autograd.grad(out[:, cls].sum(), a)
        w = g.mean(dim=(2, 3)) * w
    return a.detach().numpy(), w.detach().double().numpy()


def _check(f, a: np.ndarray, w: np.ndarray, top: int, size: tuple[int, int]) -> None:
    want = np.argsort(-w, axis=1, kind="stable")[:, :top]
    np.testing.assert_array_equal(f.indices, want)
    np.testing.assert_allclose(f.weights, np.take_along_axis(w, want, 1), rtol=1e-5, atol=1e-9)
    raw = np.stack([a[b, want[b]] for b in range(a.shape[0])])
    np.testing.assert_allclose(np.asarray(f.raw), raw, rtol=1e-6, atol=1e-7)
    up = F.interpolate(torch.from_numpy(raw), size=size, mode="bilinear", align_corners=False).numpy()
    lo, hi = up.min(axis=(2, 3), keepdims=True), up.max(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(f.maps), (up - lo) / (hi - lo), atol=1e-5)


@pytest.mark.parametrize("order", ["activation", "contribution"])
def test_top_channels_equal_a_hand_computation_with_hooks(order):
    net = _cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    f = camlens.filters(net, x, layer="2", top=5, order=order, target=3 if order == "contribution" else None)
    a, w = _by_hand(net, x, "2", 3 if order == "contribution" else None)
    assert f.maps.shape == (2, 5, 32, 32) and f.raw.shape == (2, 5, 16, 16) and f.channels == 12 and f.layer == "2"
    _check(f, a, w, 5, (32, 32))
    if order == "contribution":
        assert f.targets == ["3", "3"]
        # the weights of all channels sum to the mean of Grad-CAM's map before its ReLU
        full = camlens.filters(net, x, layer="2", top=12, order=order, target=3)
        cam = camlens.explain(net, x, targets=3, layer="2", relu=False, upsample=False)
        np.testing.assert_allclose(full.weights.sum(1), cam.raw[:, 0].mean(dim=(1, 2)).double().numpy(), rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.requires_grad for p in net.parameters()) and not net.training
    d = f.to_dict()
    assert d["images"][1]["indices"] == f.indices[1].tolist() and d["order"] == order
    fig = camlens.viz.filter_grid(f)
    assert len([ax for ax in fig.axes if ax.images]) == 10 and "top 5 of 12" in fig._suptitle.get_text()


def test_errors_say_what_to_do():
    net = _cnn()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="ONE target"):
        camlens.filters(net, x, layer="2", order="contribution", target=[1, 2])
    with pytest.raises(ConfigError, match="order= takes one of"):
        camlens.filters(net, x, order="gradient")
    with pytest.raises(ConfigError, match="ONE layer"):
        camlens.filters(net, x, layer=["0", "2"])
    with pytest.raises(ModelError, match="black-box callable"):
        camlens.filters(lambda a: a.reshape(len(a), -1)[:, :3], x.numpy())
    f = camlens.filters(net, x, top=50)  # more than C: all channels, the default layer
    assert f.indices.shape == (1, 12) and f.layer == "3"  # (the last ReLU)


def test_keras_model_equals_a_tape_computation():
    from keras_setup import import_keras

    keras = import_keras()
    import tensorflow as tf

    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((24, 24, 3))
    h = L.Conv2D(6, 3, activation="relu", name="c1")(inp)
    h = L.Conv2D(10, 3, strides=2, name="c2")(h)  # (no ReLU: no dead channels tying at 0)
    km = keras.Model(inp, L.Dense(4, name="fc")(L.GlobalAveragePooling2D()(h)))
    x = np.random.default_rng(2).random((2, 24, 24, 3), dtype=np.float32)
    before = [w.copy() for w in km.get_weights()]
    two = keras.Model(inp, [km.get_layer("c2").output, km.output])
    with tf.GradientTape() as tape:
        a, out = two(x, training=False)
        s = tf.reduce_sum(out[:, 1])
    g = tape.gradient(s, a).numpy().transpose(0, 3, 1, 2)
    a = a.numpy().transpose(0, 3, 1, 2)  # (B, C, h, w)
    for order, w in (("activation", a.mean((2, 3))), ("contribution", g.mean((2, 3)) * a.mean((2, 3)))):
        f = camlens.filters(km, x, layer="c2", top=4, order=order, target=1)
        assert isinstance(f.maps, np.ndarray) and f.maps.shape == (2, 4, 24, 24)
        _check(f, a, w.astype(np.float64), 4, (24, 24))
    assert all(np.array_equal(u, v) for u, v in zip(before, km.get_weights()))


SMALL_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
'''


def test_cli_writes_the_grid_and_the_json(tmp_path):
    from camlens.fronts.cli import app

    (tmp_path / "small.py").write_text(SMALL_MODEL)
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["filters", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'small.py'}:build",
                                   "--layer", "2", "--top", "4", "--order", "contribution", "--target", "1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "filters.json").read_text())
    entry = s["images"][0]
    m = camlens.models.load(f"{tmp_path / 'small.py'}:build")
    f = camlens.filters(m, Image.open(tmp_path / "a.png").convert("RGB"), layer="2", top=4, order="contribution",
                        target=1)
    assert entry["indices"] == f.indices[0].tolist() and entry["target"] == "1" and s["layer"] == "2"
    np.testing.assert_allclose(entry["weights"], f.weights[0], rtol=1e-5)
    assert Image.open(out / entry["grid"]).size[0] > 300 and s["channels"] == 8 and s["order"] == "contribution"
    res = CliRunner().invoke(app, ["filters", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'small.py'}:build",
                                   "--order", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "activation" in res.output
