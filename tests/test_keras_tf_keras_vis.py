"""Issue 13: camlens on Keras agrees with tf-keras-vis (0.8.7) on keras.applications models with random
weights (no download): ResNet50 (64 px), MobileNetV2 (96 px) and EfficientNetB0 (64 px), each built once
(a module-scoped fixture). Random weights are made to behave like trained ones in scale: every BatchNorm's
moving statistics are set to the batch statistics of the test images (one training-mode forward with
momentum 0: at random init MobileNetV2's last activations span ~1e-12, where Score-CAM's mask epsilon
would decide everything; variances floored, see ``calibrate``), and the classifier's kernel is scaled so
that the logits spread over a few units (else every class probability is ~1/K and Score-CAM's weights
carry nothing). Targets: the two images' top classes.

Compared at the layer's grid (the last conv layer and an inner one), before any resizing (tf-keras-vis:
``expand_cam=False, normalize_cam=False``), within 1e-4 of the map's peak (measured: within 2e-6):

* ``Gradcam`` and ``Layercam`` = camlens' ``gradcam`` / ``layercam``, before ReLU;
* ``GradcamPlusPlus`` = camlens' ``gradcampp`` with ``alpha="spatial_sum"`` (its alphas divided by their
  spatial sum), ReLU'd, times ``exp(S)`` (tf-keras-vis keeps the factor ``Y = exp(S)`` of its first derivative in
  the weights: a positive factor per target, the same map after min-max);
* ``Scorecam(max_N=N)`` = camlens' ``scorecam`` with ``weights="class_probability"`` and
  ``max_channels=N`` (the N channels of largest spatial variance — tf-keras-vis ranks by the standard
  deviation, the same order; its masks are ``scipy.ndimage.zoom(order=1)``, corner-aligned bilinear, as
  camlens' ``align_corners=True`` masks), one image per call: with a batch tf-keras-vis scores the union
  of the images' top-N channels for every image, camlens each image's own N; all channels of an early
  layer (large masks) with both images in one call.

tf-keras-vis runs on a clone whose final softmax is replaced by a linear activation (``ReplaceToLinear``);
camlens explains the same logits on the model itself; the clone runs eagerly (see ``Case``). camlens'
default Grad-CAM++ (the closed form) differs from tf-keras-vis' by far more (the last test).
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()
pytest.importorskip("tf_keras_vis")

import camlens  # noqa: E402
from tf_keras_vis.gradcam import Gradcam  # noqa: E402
from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus  # noqa: E402
from tf_keras_vis.layercam import Layercam  # noqa: E402
from tf_keras_vis.scorecam import Scorecam  # noqa: E402
from tf_keras_vis.utils.model_modifiers import ReplaceToLinear  # noqa: E402

A = keras.applications
# name: (builder, its preprocess_input, input size, last conv layer, an inner layer with a larger grid)
MODELS = {
    "resnet50": (lambda: A.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10),
                 A.resnet50.preprocess_input, 64, "conv5_block3_out", "conv4_block6_out"),
    "mobilenetv2": (lambda: A.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10),
                    A.mobilenet_v2.preprocess_input, 96, "out_relu", "block_13_expand_relu"),
    "efficientnetb0": (lambda: A.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=10),
                       A.efficientnet.preprocess_input, 64, "top_activation", "block6a_expand_activation"),
}
TOL = 1e-4


def calibrate(model, x) -> None:
    """BatchNorm moving statistics := the batch statistics of ``x`` and of 6 copies of ``x[0]`` under random
    smooth masks, as Score-CAM makes (momentum 0 for one training-mode forward, then restored), the variances
    raised by their mean, so that activations are O(1) as in a trained network, also on masked inputs, and
    the logits are not a thousand times more sensitive to the input's rounding than the input itself."""
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in bns]
    for layer in bns:
        layer.momentum = 0.0
    H, W = x.shape[1:3]
    masks = np.random.default_rng(1).random((6, 4, 4, 1), dtype=np.float32)
    masks = np.repeat(np.repeat(masks, -(-H // 4), axis=1), -(-W // 4), axis=2)[:, :H, :W]
    model(np.concatenate([x, x[:1] * masks]), training=True)
    for layer, m in zip(bns, momenta):
        layer.momentum = m
        var = layer.moving_variance  # + a floor: a near-constant channel would amplify float32 rounding x1e3
        var.assign(var + float(np.mean(var.numpy())))


def spread_logits(model, x, std: float = 3.0) -> None:
    """Scale the final ``predictions`` Dense's kernel so that the logits of ``x`` have standard deviation
    ``std`` (the test's model only: a random-weight model's logits are all near 0)."""
    dense = model.get_layer("predictions")
    feats = keras.Model(model.inputs, dense.input)(x, training=False).numpy()
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * (std / float(np.std(feats @ kernel + bias))), bias])


class Case:
    """A model, its images ``x`` (B = 2), the two images' top classes, its layers, and the twin tf-keras-vis
    runs on (a clone with the final softmax replaced by a linear activation, made once)."""

    def __init__(self, name):
        build, preprocess, size, self.last, self.inner = MODELS[name]
        keras.utils.set_random_seed(0)
        self.model = build()
        self.x = preprocess(255 * np.random.default_rng(0).random((2, size, size, 3), dtype=np.float32))
        calibrate(self.model, self.x)
        spread_logits(self.model, self.x)
        self.linear = keras.models.clone_model(self.model)
        self.linear.set_weights(self.model.get_weights())
        ReplaceToLinear()(self.linear)
        # Scorecam scores its masked inputs with `model.predict`: compiled, that graph's fused kernels move
        # ResNet50's logits by up to 2e-4 from the eager forward camlens runs (maps up to 5e-4 of the peak);
        # eagerly the two forwards are the same arithmetic
        self.linear.run_eagerly = True
        order = np.argsort(-self.linear(self.x, training=False).numpy(), axis=1)
        self.classes = (int(order[0, 0]), int(order[1, 0]) if order[1, 0] != order[0, 0] else int(order[1, 1]))

    def peer(self, peer, layer, x, c, **kw):
        """tf-keras-vis' map ``(B, h, w)`` of class ``c``, not resized or normalised (ReLU'd unless
        ``activation_modifier=None``)."""
        vis = peer(self.linear, clone=False)
        return np.asarray(vis(lambda out: out[:, c], x, penultimate_layer=layer, seek_penultimate_conv_layer=False,
                              expand_cam=False, normalize_cam=False, **kw))


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    return Case(request.param)


def _close(got, want, tol=TOL):
    """``got`` within ``tol`` of ``want``'s peak; ``want`` a real map, not a constant. Returns the distance."""
    peak = float(np.abs(want).max())
    assert peak > 0 and float(want.std()) > 1e-3 * peak
    dist = float(np.abs(got - want).max()) / peak
    assert dist <= tol, dist
    return dist


@pytest.mark.parametrize("which", ["last", "inner"])
@pytest.mark.parametrize("peer, method, options", [
    (Gradcam, "gradcam", {}), (Layercam, "layercam", {}), (GradcamPlusPlus, "gradcampp", {"alpha": "spatial_sum"})])
def test_gradient_methods_agree_with_tf_keras_vis(case, which, peer, method, options):
    layer = case.last if which == "last" else case.inner
    exp = camlens.explain(case.model, case.x, targets=list(case.classes), layer=layer, method=method, relu=False,
                          **options)
    for t, c in enumerate(case.classes):
        if method == "gradcampp":  # ReLU'd (its activation_modifier is also its ReLU of the gradients); exp(S)
            want = case.peer(peer, layer, case.x, c)
            got = np.maximum(exp.raw[:, t], 0) * np.exp(exp.scores[:, t])[:, None, None]
        else:  # the raw maps, before ReLU
            want, got = case.peer(peer, layer, case.x, c, activation_modifier=None), exp.raw[:, t]
        assert got.shape == want.shape and got.shape[1] > 1
        _close(got, want)
    assert case.model.layers[-1].activation.__name__ == "softmax"  # the model itself keeps its softmax


@pytest.mark.parametrize("which", ["last", "inner"])
def test_scorecam_with_class_probability_weights_agrees_with_tf_keras_vis(case, which):
    """Faster Score-CAM, 16 channels, each image with its own top class (one image per tf-keras-vis call)."""
    layer = case.last if which == "last" else case.inner
    exp = camlens.explain(case.model, case.x, targets=[[c] for c in case.classes], layer=layer, method="scorecam",
                          relu=False, weights="class_probability", max_channels=16)
    for b, c in enumerate(case.classes):
        _close(np.maximum(exp.raw[b, 0], 0), case.peer(Scorecam, layer, case.x[b:b + 1], c, max_N=16)[0])


def test_scorecam_with_all_channels_and_large_masks_agrees_with_tf_keras_vis(case):
    """Every channel of an early layer (24 or 64 channels on a 16x16-32x32 grid: the masks' corner-aligned
    upsampling matters), both images in one call (no channel selection: tf-keras-vis' batch is the same)."""
    layer, c = _early(case), case.classes[0]
    exp = camlens.explain(case.model, case.x, targets=[c], layer=layer, method="scorecam", relu=False,
                          weights="class_probability")
    _close(np.maximum(exp.raw[:, 0], 0), case.peer(Scorecam, layer, case.x, c))


def _minmax(a):
    lo, hi = a.min(axis=(-2, -1), keepdims=True), a.max(axis=(-2, -1), keepdims=True)
    return (a - lo) / (hi - lo)


def _early(case):
    names = {layer.name for layer in case.model.layers}
    return next(n for n in ("conv1_relu", "block_2_add", "block2a_project_bn") if n in names)


def test_camlens_default_gradcampp_differs_from_tf_keras_vis(case):
    """Grad-CAM++'s closed form (camlens' and pytorch-grad-cam's default) differs from tf-keras-vis' spatially
    normalised alphas by far more than the option's 1e-4: 1.1e-2 to 1.8e-1 of the min-max'd maps on these
    models (README, Keras section, with Score-CAM's default)."""
    c = case.classes[0]
    d = []
    for layer in (case.last, case.inner):
        pp = camlens.explain(case.model, case.x, targets=[c], layer=layer, method="gradcampp", relu=False)
        d.append(float(np.abs(_minmax(np.maximum(pp.raw[:, 0], 0))
                              - _minmax(case.peer(GradcamPlusPlus, layer, case.x, c))).max()))
    assert min(d) > 5e-3, d
