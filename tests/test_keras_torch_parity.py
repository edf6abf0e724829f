"""Issue 13: the same small CNN built in Keras and in PyTorch with copied weights gives the same
explanations — every gradient method, Eigen-CAM, Score-CAM, Ablation-CAM, occlusion, CAM, guided
backprop and Guided Grad-CAM, and the tf-keras-vis conventions of Grad-CAM++ / Score-CAM — within
1e-4, and the same raw input gradients (plain and guided). Runs where both torch and Keras (on
TensorFlow) are importable; skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_setup import import_keras

torch = pytest.importorskip("torch")
import torch._dynamo  # noqa: E402,F401  (before TensorFlow: torch's guided backprop imports it, and after TF it can segfault)

keras = import_keras()

import camlens  # noqa: E402

L = keras.layers
METHODS = ["gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam", "scorecam",
           "ablationcam", "occlusion", "cam", "guided_backprop", "guided_gradcam"]


@pytest.fixture(scope="module")
def pair():
    """``(keras model, torch model)``: conv-BN-ReLU, conv(stride 2)-ReLU, GAP, dense; the same weights
    (Keras kernels ``(kh, kw, in, out)`` -> torch ``(out, in, kh, kw)``), BatchNorm statistics and epsilon."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((20, 20, 3))
    x = L.Conv2D(6, 3, name="c1")(inp)
    x = L.BatchNormalization(epsilon=1e-3, name="bn")(x)
    x = L.Activation("relu", name="r1")(x)
    x = L.Conv2D(5, 3, strides=2, activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    km = keras.Model(inp, L.Dense(4, name="fc")(x))
    bn = km.get_layer("bn")
    rng = np.random.default_rng(1)
    bn.gamma.assign(rng.uniform(0.5, 1.5, 6).astype("float32"))
    bn.beta.assign(rng.normal(0, 0.1, 6).astype("float32"))
    bn.moving_mean.assign(rng.normal(0, 0.2, 6).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 1.5, 6).astype("float32"))

    tm = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6, eps=1e-3), torch.nn.ReLU(),
                             torch.nn.Conv2d(6, 5, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                             torch.nn.Flatten(), torch.nn.Linear(5, 4)).eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        for i, name in ((0, "c1"), (3, "c2")):
            k, b = km.get_layer(name).get_weights()
            tm[i].weight.copy_(t(k.transpose(3, 2, 0, 1)))
            tm[i].bias.copy_(t(b))
        gamma, beta, mean, var = bn.get_weights()
        tm[1].weight.copy_(t(gamma)); tm[1].bias.copy_(t(beta))  # noqa: E702
        tm[1].running_mean.copy_(t(mean)); tm[1].running_var.copy_(t(var))  # noqa: E702
        k, b = km.get_layer("fc").get_weights()
        tm[7].weight.copy_(t(k.T)); tm[7].bias.copy_(t(b))  # noqa: E702
    return km, tm


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).random((2, 20, 20, 3), dtype=np.float32)


def test_the_two_models_compute_the_same_logits(pair, images):
    km, tm = pair
    want = tm(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).detach().numpy()
    np.testing.assert_allclose(km(images, training=False).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options", [(m, {}) for m in METHODS] + [
    ("gradcampp", {"alpha": "spatial_sum"}), ("scorecam", {"weights": "class_probability"})])
def test_maps_agree_with_the_torch_twin(pair, images, method, options):
    """Also tf-keras-vis' conventions (Grad-CAM++'s spatially normalised alphas, Score-CAM's class-probability
    weights): the options are backend-free maths, the same on both."""
    km, tm = pair
    kw = {"targets": [0, 3], "method": method, **options}
    if method in ("scorecam", "ablationcam", "occlusion"):
        kw["batch_size"] = 16
    ek = camlens.explain(km, images, layer="c2", **kw)
    et = camlens.explain(tm, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), layer="4", **kw)
    assert ek.maps.shape == tuple(et.maps.shape) == (2, 2, 20, 20)
    np.testing.assert_allclose(ek.maps, et.maps.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ek.scores, et.scores.numpy(), rtol=1e-5, atol=1e-5)


def _pixels(exp):
    return np.asarray(exp.pixel.numpy() if hasattr(exp.pixel, "numpy") else exp.pixel)


@pytest.mark.parametrize("method", ["input_gradient", "guided_backprop", "guided_gradcam"])
def test_raw_input_gradients_agree_with_the_torch_twin(pair, images, method, input_gradient_method):
    km, tm = pair
    name = input_gradient_method if method == "input_gradient" else method
    ek = camlens.explain(km, images, targets=[0, 3], layer="c2", method=name)
    et = camlens.explain(tm, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), targets=[0, 3], layer="4",
                         method=name)
    want = _pixels(et)
    assert _pixels(ek).shape == want.shape == (2, 2, 3, 20, 20)
    np.testing.assert_allclose(_pixels(ek), want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(ek.maps, et.maps.numpy(), rtol=0, atol=1e-4)


def test_cam_raw_maps_agree_with_the_torch_twin(pair, images):
    km, tm = pair
    ek = camlens.explain(km, images, targets=[1, 2], layer="c2", method="cam", relu=False)
    et = camlens.explain(tm, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), targets=[1, 2], layer="4",
                         method="cam", relu=False)
    want = et.raw.numpy()
    np.testing.assert_allclose(ek.raw, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("method", ["kernelshap", "lime", "rise"])
def test_perturbation_methods_agree_with_the_torch_twin(pair, images, method):
    """Issue 14: lime / kernelshap (SLIC superpixels of the same input) and rise draw on the host with
    NumPy, so the twins see the same coalitions / masks; maps and per-segment weights agree."""
    km, tm = pair
    kw = {"targets": [0, 3], "method": method, "n_samples": 48, "batch_size": 16, "seed": 3}
    ek = camlens.explain(km, images, **kw)
    et = camlens.explain(tm, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), **kw)
    np.testing.assert_allclose(ek.maps, et.maps.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ek.raw, et.raw.numpy(), rtol=0, atol=1e-4 * np.abs(et.raw.numpy()).max())
    if method != "rise":
        np.testing.assert_array_equal(ek.segments, et.segments)
        np.testing.assert_allclose(ek.weights, et.weights, rtol=0, atol=1e-4 * np.nanmax(np.abs(et.weights)))
