"""Issue 13: camlens on Keras agrees with tf-keras-vis (0.8.7) on keras.applications.ResNet50 with
random weights (no download): Grad-CAM and LayerCAM at the layer's grid, ReLU'd, before any
normalisation or resizing, within 1e-4 of the map's peak. tf-keras-vis runs on a clone whose final
softmax is replaced by a linear activation (``ReplaceToLinear``); camlens explains the same logits on
the model itself.

Not compared (different definitions, to settle in a later slice): tf-keras-vis' Grad-CAM++ divides
each channel's alphas by their spatial sum (camlens follows the paper's closed form, as
pytorch-grad-cam), its Score-CAM weights are the target's softmax probability over classes (camlens':
the softmax over channels of the target's score, as pytorch-grad-cam), and its maps are resized with
``scipy.ndimage.zoom`` (corner-aligned) where camlens resizes with half-pixel centres.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()
pytest.importorskip("tf_keras_vis")

import camlens  # noqa: E402
from tf_keras_vis.gradcam import Gradcam  # noqa: E402
from tf_keras_vis.layercam import Layercam  # noqa: E402
from tf_keras_vis.utils.model_modifiers import ReplaceToLinear  # noqa: E402


@pytest.fixture(scope="module")
def resnet50():
    keras.utils.set_random_seed(0)
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)


@pytest.mark.parametrize("peer, method", [(Gradcam, "gradcam"), (Layercam, "layercam")])
def test_agrees_with_tf_keras_vis(resnet50, peer, method):
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    vis = peer(resnet50, model_modifier=ReplaceToLinear(), clone=True)
    exp = camlens.explain(resnet50, x, targets=[1, 7], layer="conv5_block3_out", method=method, relu=False)
    for t, c in enumerate((1, 7)):
        want = np.asarray(vis(lambda out, c=c: out[:, c], x, penultimate_layer="conv5_block3_out",
                              seek_penultimate_conv_layer=False, expand_cam=False, normalize_cam=False))
        got = np.maximum(exp.raw[:, t], 0)
        assert got.shape == want.shape == (2, 2, 2)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    assert resnet50.layers[-1].activation.__name__ == "softmax"  # the model itself keeps its softmax
