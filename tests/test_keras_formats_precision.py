"""Issue 13: Keras models in channels_first layout and under mixed precision.

* channels_first (``data_format="channels_first"`` per layer, or ``keras.config.image_data_format()`` at
  build time): the model takes ``(B, C, H, W)``; every path — gradients (the Grad-CAM family), Eigen-CAM,
  Score-CAM, Ablation-CAM (layer outputs replaced), occlusion and the default layer — gives the NHWC
  twin's maps (same weights) within 1e-5; the layout is read from the layers, not from the global setting
  at call time; NHWC images for it are refused with the transpose to make.
* mixed precision (``mixed_float16`` / ``mixed_bfloat16`` policies at build time): float16 / bfloat16 layer
  outputs are read as float32, the scores are computed in float32 on the cast outputs (the Jacobian flows
  back through the cast), maps are float32 and finite, and agree with the float32 model with the same
  weights within the measured tolerances below (maps are min-maxed: absolute on [0, 1]).
* ``precision="fp16"`` / ``"bf16"``: a ConfigError saying to build the model under a mixed policy.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()

import camlens  # noqa: E402
from camlens.core.errors import ConfigError, InputError  # noqa: E402

L = keras.layers
METHODS = {"gradcam": {}, "gradcampp": {}, "layercam": {}, "hirescam": {}, "eigencam": {}, "scorecam": {},
           "ablationcam": {}, "occlusion": {"patch": 8, "stride": 4}}


def _cnn(fmt: str = "channels_last", size: int = 32, data_format: bool = True):
    """conv-BN-ReLU, conv(stride 2)-ReLU, GAP, Dense; ``data_format`` passed per layer (else the global one)."""
    keras.utils.set_random_seed(0)
    df = {"data_format": fmt} if data_format else {}
    first = fmt == "channels_first"
    inp = keras.Input((3, size, size) if first else (size, size, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv1", **df)(inp)
    x = L.BatchNormalization(axis=1 if first else -1, name="bn")(x)
    x = L.Activation("relu", name="relu1")(x)
    x = L.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv2", **df)(x)
    x = L.GlobalAveragePooling2D(name="gap", **df)(x)
    model = keras.Model(inp, L.Dense(5, name="logits", activation="softmax")(x))
    rng = np.random.default_rng(1)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(0, 0.2, 8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 1.5, 8).astype("float32"))
    return model


def _copy(src, dst):
    dst.set_weights(src.get_weights())  # the same kernels: Conv2D's (kh, kw, in, out) in either data_format
    return dst


@pytest.fixture(scope="module")
def twins():
    nhwc = _cnn()
    return nhwc, _copy(nhwc, _cnn("channels_first"))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)


def _nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def test_the_twins_compute_the_same_outputs(twins, images):
    nhwc, nchw = twins
    np.testing.assert_allclose(nchw(_nchw(images)).numpy(), nhwc(images).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("layer", ["conv2", "relu1", None])
def test_channels_first_maps_equal_the_nhwc_twins(twins, images, method, layer):
    nhwc, nchw = twins
    weights = [w.copy() for w in nchw.get_weights()]
    kw = dict(targets=[1, 3], layer=layer, method=method, **METHODS[method])
    a = camlens.explain(nhwc, images, **kw)
    b = camlens.explain(nchw, _nchw(images), **kw)
    assert b.maps.shape == a.maps.shape == (2, 2, 32, 32) and b.layers == a.layers
    np.testing.assert_allclose(b.maps, a.maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b.raw, a.raw, rtol=0, atol=1e-5 * float(np.abs(a.raw).max()))
    assert float(a.maps.max()) == 1.0  # a real map
    assert all(np.array_equal(w, v) for w, v in zip(weights, nchw.get_weights()))  # the model untouched


def test_the_layout_is_the_layers_not_the_global_setting_at_call_time(images):
    old = keras.config.image_data_format()
    try:
        keras.config.set_image_data_format("channels_first")
        built_first = _cnn("channels_first", data_format=False)  # the layers take the global format at build
        keras.config.set_image_data_format("channels_last")
        nhwc = _cnn()
        _copy(nhwc, built_first)
        want = camlens.explain(nhwc, images, targets=[2], layer="conv2", method="gradcam").maps
        got = camlens.explain(built_first, _nchw(images), targets=[2], layer="conv2", method="gradcam").maps
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        keras.config.set_image_data_format("channels_first")  # explained while the global format is the other one
        again = camlens.explain(nhwc, images, targets=[2], layer="conv2", method="gradcam").maps
        np.testing.assert_allclose(again, want, rtol=0, atol=1e-6)
    finally:
        keras.config.set_image_data_format(old)


class _Sub(keras.Model):
    """A subclassed model (its own ``call``: read by wrapping its layers' calls)."""

    def __init__(self, fmt):
        super().__init__()
        self.c1 = L.Conv2D(8, 3, padding="same", activation="relu", data_format=fmt)
        self.c2 = L.Conv2D(6, 3, strides=2, padding="same", data_format=fmt)
        self.gap = L.GlobalAveragePooling2D(data_format=fmt)
        self.fc = L.Dense(4)

    def call(self, x):
        return self.fc(self.gap(self.c2(self.c1(x))))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
def test_a_subclassed_channels_first_model_equals_its_nhwc_twin(images, method):
    keras.utils.set_random_seed(0)
    nhwc, nchw = _Sub("channels_last"), _Sub("channels_first")
    nhwc(images), nchw(_nchw(images))
    nchw.set_weights(nhwc.get_weights())
    kw = dict(targets=[0, 3], method=method, relu=False)
    for layer in ("c2", None):  # None: the default layer, the last conv
        a, b = camlens.explain(nhwc, images, layer=layer, **kw), camlens.explain(nchw, _nchw(images), layer=layer, **kw)
        assert a.raw.shape == b.raw.shape == (2, 2, 16, 16) and float(np.abs(a.raw).max()) > 0
        np.testing.assert_allclose(b.raw, a.raw, rtol=0, atol=1e-5 * float(np.abs(a.raw).max()))


def test_nhwc_images_for_a_channels_first_model_are_refused_with_the_fix(twins, images):
    with pytest.raises(InputError,
                       match=r"takes images \(B, 3, H, W\) \(channels first.*np.transpose\(x, \(0, 3, 1, 2\)\)"):
        camlens.explain(twins[1], images, targets=[1], method="gradcam")


# ------------------------------------------------------------------------------------------------
# mixed precision

# max |maps - float32 model's maps| bounds (maps are min-maxed to [0, 1]); measured on this CNN at conv2 / bn /
# relu1 (ResNet50's below): channel-weighted maps (Grad-CAM, Grad-CAM++, Eigen-CAM, Score-CAM, Ablation-CAM)
# <= 1.9e-3 under float16 and <= 1.2e-2 under bfloat16 (8 bits of mantissa against float16's 11); element-wise
# products of gradients and activations (LayerCAM, HiResCAM) at early layers <= 1.7e-2 / 1.7e-1; occlusion
# (differences of nearby scores) 8.4e-3 / 8.0e-2. camlens adds nothing to that: on the low-precision model
# itself its maps equal a hand-written tape reference (test below).
TOL = {"mixed_float16": {"default": 5e-3, "elementwise": 4e-2, "occlusion": 2e-2},
       "mixed_bfloat16": {"default": 3e-2, "elementwise": 0.3, "occlusion": 0.15}}
ELEMENTWISE = ("layercam", "hirescam")


def _under(policy, build):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return build()
    finally:
        keras.config.set_dtype_policy(old)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_maps_are_float32_and_close_to_the_float32_models(twins, images, policy):
    ref = twins[0]
    low = _copy(ref, _under(policy, _cnn))
    dtype = policy.split("_")[1]
    assert low.get_layer("conv2").compute_dtype == dtype and low.output.dtype == dtype
    weights = [w.copy() for w in low.get_weights()]
    for method, opts in METHODS.items():
        for layer in ("conv2", "bn"):  # bn: negative values (Ablation-CAM's min - 1e7 clipped to float16's range)
            kw = dict(targets=[1, 3], layer=layer, method=method, **opts)
            want, got = camlens.explain(ref, images, **kw), camlens.explain(low, images, **kw)
            assert got.maps.dtype == got.raw.dtype == got.scores.dtype == np.float32
            assert np.isfinite(got.maps).all() and np.isfinite(got.raw).all()
            kind = "elementwise" if method in ELEMENTWISE else method if method in TOL[policy] else "default"
            tol = TOL[policy][kind]
            assert float(np.abs(got.maps - want.maps).max()) <= tol, (method, layer)
            np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=tol * float(np.abs(want.scores).max()))
            np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=tol)
    assert all(np.array_equal(w, v) for w, v in zip(weights, low.get_weights()))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_maps_equal_a_tape_reference_on_the_low_precision_model(images, policy):
    """LayerCAM at ``bn`` by hand: ``A`` = the float16 / bfloat16 output of ``bn``, ``G = d logit_1 / d A``
    through the model's own low-precision layers (the logit from the cast pooled features), then
    ``sum_c ReLU(G) A`` in float32."""
    import tensorflow as tf

    low = _copy(_cnn(), _under(policy, _cnn))
    kernel, bias = low.get_layer("logits").get_weights()
    with tf.GradientTape() as tape:
        a = keras.Model(low.inputs, low.get_layer("bn").output)(images)
        tape.watch(a)
        h = low.get_layer("gap")(low.get_layer("conv2")(low.get_layer("relu1")(a)))
        s = tf.reduce_sum(tf.cast(h, tf.float32) @ kernel + bias, axis=0)[1]
    g = tf.cast(tape.gradient(s, a), tf.float32).numpy()
    want = np.sum(np.maximum(g, 0) * tf.cast(a, tf.float32).numpy(), axis=-1)
    got = camlens.explain(low, images, targets=[1], layer="bn", method="layercam").raw[:, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("policy, tol", [("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)])
def test_mixed_precision_resnet50_gradients(policy, tol):
    """50 layers of float16 gradients: no loss scaling is needed at the last block (measured: maps within
    2.1e-3 under mixed_float16, 2.0e-2 under mixed_bfloat16)."""
    def build():
        keras.utils.set_random_seed(0)
        return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    ref = build()
    low = _copy(ref, _under(policy, build))
    x = 255 * np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    for method in ("gradcam", "layercam"):
        want = camlens.explain(ref, x, targets=[1, 3], method=method)
        got = camlens.explain(low, x, targets=[1, 3], method=method)
        assert got.layers == want.layers == ["conv5_block3_out"]
        assert got.maps.dtype == np.float32 and np.isfinite(got.maps).all()
        assert float(np.abs(got.maps - want.maps).max()) <= tol


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precision_other_than_fp32_says_to_build_under_a_mixed_policy(twins, images, precision):
    with pytest.raises(ConfigError, match=r"precision='(fp16|bf16)'.*mixed_float16.*precision='fp32'"):
        camlens.explain(twins[0], images, targets=[1], method="gradcam", precision=precision)
