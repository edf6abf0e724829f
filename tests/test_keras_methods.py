"""Issue 13: every registered method on Keras 3 (TensorFlow) models.

The whole registry runs on a small Keras CNN: each method gives finite, non-constant maps of the
right shape, or (the methods listed in ``NOT_ON_KERAS``) a camlens error that names Keras — a new
method cannot slip in untested. Input gradients equal a hand-written ``tf.GradientTape`` (1e-5);
guided backprop equals guided backprop written out in NumPy on a dense ReLU / ReLU6 network; CAM
equals ``sum_c W[k, c] A[c]`` by hand through GAP, a Flatten of the pooled 1x1 map, a pooled nested
backbone and a subclassed model, and refuses other heads; models with GELU / swish / a raw
``tf.nn.relu`` are refused for guided backprop (``non_relu="plain"`` opts in); the model and
Keras' own functions are left as they were, also after errors. Skipped where Keras is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402
from test_keras_backend import _same_state, _state  # noqa: E402

import camlens  # noqa: E402
from camlens.core.errors import CamlensError, ModelError  # noqa: E402
from camlens.methods.base import _REGISTRY  # noqa: E402

L = keras.layers

#: Registered methods that cannot run on a Keras model, and why (their error must name Keras).
NOT_ON_KERAS = {"attention_rollout": "transformers' attention probabilities are read from PyTorch models only",
                "attention_relevance": "the same"}

#: Options that make each method meaningful on 16x16 images.
OPTIONS = {"scorecam": {"batch_size": 16}, "ablationcam": {"batch_size": 16}, "drise": {"n_masks": 64},
           "occlusion": {"patch": 4, "stride": 2, "batch_size": 64}}


def _images(B=2, H=16, W=16, C=3, seed=0):
    return np.random.default_rng(seed).random((B, H, W, C), dtype=np.float32)


def _cnn(head="gap"):
    """conv(relu) - conv(stride 2, relu) - GAP - Dense(4); ``head="flatten1x1"``: GAP(keepdims) ->
    Flatten -> Dropout -> Dense; ``"flatten"``: Flatten of the 8x8 map -> Dense (no CAM)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2D(5, 3, strides=2, padding="same", name="c2")(x)
    x = L.Activation("relu", name="r2")(x)
    if head == "gap":
        x = L.GlobalAveragePooling2D(name="gap")(x)
    elif head == "flatten1x1":
        x = L.Dropout(0.5, name="drop")(L.Flatten(name="flat")(L.GlobalAveragePooling2D(keepdims=True, name="gap")(x)))
    else:
        x = L.Flatten(name="flat")(x)
    return keras.Model(inp, L.Dense(4, name="fc")(x))


def _plain_grads(model, x, classes):
    """Reference: ``d sum_b y[b, k] / dx`` ``(B, T, C, H, W)`` with one tape per class."""
    out = []
    for k in classes:
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            s = tf.reduce_sum(model(xt, training=False)[:, k])
        out.append(np.transpose(tape.gradient(s, xt).numpy(), (0, 3, 1, 2)))
    return np.stack(out, axis=1)


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(_REGISTRY.available()))
def test_every_registered_method_works_on_keras_or_says_why(method):
    model, x = _cnn(), _images()
    meth = _REGISTRY.get_item(method)
    before = _state(model)
    kw = {"layer": "r2"} if meth.needs_layer else {}
    if method in NOT_ON_KERAS:
        with pytest.raises(CamlensError, match="Keras"):
            camlens.explain(model, x, targets=[0, 3], method=method, **kw, **OPTIONS.get(method, {}))
    else:
        exp = camlens.explain(model, x, targets=[0, 3], method=method, **kw, **OPTIONS.get(method, {}))
        maps = np.asarray(exp.maps)
        assert maps.shape == (2, 2, 16, 16)
        assert np.isfinite(maps).all()
        assert all(np.ptp(maps[b, t]) > 0.5 for b in range(2) for t in range(2)), method
    _same_state(before, _state(model))


def test_plain_input_gradients_equal_a_tape_for_every_target(input_gradient_method):
    model, x = _cnn(), _images(B=3)
    exp = camlens.explain(model, x, targets=[0, 2, 3], method=input_gradient_method)
    want = _plain_grads(model, x, [0, 2, 3])
    assert exp.pixel.shape == (3, 3, 3, 16, 16)
    _close(exp.pixel, want)
    _close(exp.scores, model(x, training=False).numpy()[:, [0, 2, 3]])


def _dense_relu6(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4, 4, 2))
    h = L.Dense(12, name="d1")(L.Flatten(name="flat")(inp))
    h = L.ReLU(max_value=6.0, name="relu6")(h)
    h = L.Dense(10, activation="relu", name="d2")(h)
    m = keras.Model(inp, L.Dense(3, name="out")(h))
    k1, b1 = m.get_layer("d1").get_weights()
    m.get_layer("d1").set_weights([k1 * 6, b1 + 1])  # some inputs above 6: the ReLU6's upper edge matters
    return m


def _guided_numpy(m, x, k):
    """Guided backprop by hand: forward Flatten -> d1 -> relu6 -> d2 -> relu -> out; backward from
    ``e_k`` with ``g <- max(g, 0) * [in the linear range]`` at each ReLU."""
    (W1, b1), (W2, b2), (W3, _) = (m.get_layer(n).get_weights() for n in ("d1", "d2", "out"))
    f = x.reshape(len(x), -1)
    z1 = f @ W1 + b1
    z2 = np.clip(z1, 0, 6) @ W2 + b2
    g = np.tile(W3[:, k], (len(x), 1))  # d y_k / d relu(z2)
    g = np.maximum(g, 0) * (z2 > 0)
    g = g @ W2.T
    g = np.maximum(g, 0) * ((z1 > 0) & (z1 < 6))
    return (g @ W1.T).reshape(x.shape), z1


def test_guided_backprop_equals_the_rule_written_out_on_a_relu6_relu_network():
    m = _dense_relu6()
    x = _images(B=2, H=4, W=4, C=2, seed=3) * 2 - 1
    exp = camlens.explain(m, x, targets=[0, 2], method="guided_backprop")
    for t, k in enumerate([0, 2]):
        want, z1 = _guided_numpy(m, x, k)
        _close(exp.pixel[:, t], np.transpose(want, (0, 3, 1, 2)))
    assert (z1 > 6).any() and (z1 < 0).any()  # both edges of the ReLU6 are exercised
    plain = _plain_grads(m, x, [0])[:, 0]
    assert not np.allclose(exp.pixel[:, 0], plain, atol=1e-3)  # the guided rule changed something


@pytest.mark.parametrize("act, name", [("gelu", "GELU"), ("swish", "SiLU"), ("elu", "ELU"), ("hard_silu", "hard_swish"),
                                       ("hard_sigmoid", "hard_sigmoid")])
def test_guided_backprop_refuses_other_activations_unless_plain(act, name):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation=act, name="c")(inp)
    m = keras.Model(inp, L.Dense(3, name="fc")(L.GlobalAveragePooling2D()(x)))
    before, relu = _state(m), keras.src.backend.tensorflow.nn.relu
    x = _images(H=8, W=8)
    with pytest.raises(ModelError, match=f"(?s)Keras model.*{name}.*non_relu='plain'") as err:
        camlens.explain(m, x, targets=1, method="guided_backprop")
    assert ("hard_sigmoid" in str(err.value)) == (act == "hard_sigmoid")  # hard swish's own gate not named twice
    _same_state(before, _state(m))
    assert keras.src.backend.tensorflow.nn.relu is relu  # Keras' own functions are back
    exp = camlens.explain(m, x, targets=1, method="guided_backprop", non_relu="plain")
    _close(exp.pixel[:, 0], _plain_grads(m, x, [1])[:, 0])  # no ReLU to guide: the plain gradient


def test_guided_backprop_refuses_relus_keras_cannot_see():
    class RawRelu(L.Layer):
        def call(self, x):
            return tf.nn.relu(x)

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    m = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(RawRelu()(L.Conv2D(4, 3)(inp)))))
    with pytest.raises(ModelError, match="tf.nn.relu"):
        camlens.explain(m, _images(H=8, W=8), targets=0, method="guided_backprop")


def test_guided_backprop_refuses_prelu_and_restores_keras_after_an_error_in_the_forward():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    m = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(L.PReLU()(L.Conv2D(4, 3)(inp)))))
    with pytest.raises(ModelError, match="PReLU"):
        camlens.explain(m, _images(H=8, W=8), targets=0, method="guided_backprop")

    class Boom(L.Layer):
        def call(self, x):
            if getattr(self, "armed", False):
                raise RuntimeError("boom")
            return keras.ops.relu(x)

    boom = Boom()
    m = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(boom(L.Conv2D(4, 3)(inp)))))
    nn = keras.src.backend.tensorflow.nn
    saved = (nn.relu, nn.relu6, nn.gelu)
    exp = camlens.explain(m, _images(H=8, W=8), targets=0, method="guided_backprop")  # keras.ops.relu: guided
    assert np.isfinite(exp.pixel).all()
    boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        camlens.explain(m, _images(H=8, W=8), targets=0, method="guided_backprop")
    assert (nn.relu, nn.relu6, nn.gelu) == saved


def test_guided_backprop_on_a_subclassed_model_equals_its_functional_twin():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.c1 = L.Conv2D(5, 3, padding="same", activation="relu")
            self.act = L.ReLU(6.0)
            self.c2 = L.Conv2D(4, 3, strides=2, padding="same")
            self.gap = L.GlobalAveragePooling2D()
            self.fc = L.Dense(3)

        def call(self, x):
            return self.fc(self.gap(self.act(self.c2(self.c1(x)))))

    keras.utils.set_random_seed(4)
    net, x = Net(), _images() * 4
    net(x)
    inp = keras.Input((16, 16, 3))
    twin = keras.Model(inp, net.fc(net.gap(net.act(net.c2(net.c1(inp))))))
    a = camlens.explain(net, x, targets=[0, 2], method="guided_backprop")
    b = camlens.explain(twin, x, targets=[0, 2], method="guided_backprop")
    _close(a.pixel, b.pixel)
    assert not np.allclose(a.pixel, _plain_grads(twin, x, [0, 2]), atol=1e-4)


def test_guided_gradcam_is_guided_backprop_times_the_upsampled_gradcam():
    model, x = _cnn(), _images()
    gg = camlens.explain(model, x, targets=[1, 2], layer="r2", method="guided_gradcam")
    gb = camlens.explain(model, x, targets=[1, 2], method="guided_backprop")
    cam = camlens.explain(model, x, targets=[1, 2], layer="r2", method="gradcam", relu=False).raw
    up = np.repeat(np.repeat(np.maximum(cam, 0), 2, axis=2), 2, axis=3)  # nearest 8x8 -> 16x16
    _close(gg.pixel, gb.pixel * up[:, :, None])


def _acts(model, x, path):
    """Layer ``path``'s output ``(B, C, h, w)`` from a side model (top-level or one nested level)."""
    parts = path.split("/")
    if len(parts) == 1:
        a = keras.Model(model.inputs[0], model.get_layer(path).output)(x)
    else:
        inner = model.get_layer(parts[0])
        a = keras.Model(inner.inputs[0], inner.get_layer(parts[1]).output)(x)
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _cam_ref(acts, dense, classes):
    W = dense.get_weights()[0]  # (C, K)
    return np.einsum("ck,bchw->bkhw", W, acts)[:, classes]


@pytest.mark.parametrize("head", ["gap", "flatten1x1"])
def test_cam_is_the_dense_kernel_on_the_layer(head):
    m, x = _cnn(head), _images()
    before = _state(m)
    exp = camlens.explain(m, x, targets=[0, 3], layer="r2", method="cam", relu=False)
    _close(exp.raw, _cam_ref(_acts(m, x, "r2"), m.get_layer("fc"), [0, 3]))
    _same_state(before, _state(m))


def test_cam_through_a_pooled_nested_backbone_and_a_softmax_head():
    keras.utils.set_random_seed(1)
    binp = keras.Input((16, 16, 3))
    feat = L.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv")(binp)
    backbone = keras.Model(binp, L.GlobalAveragePooling2D()(feat), name="backbone")
    inp = keras.Input((16, 16, 3))
    m = keras.Model(inp, L.Dense(5, activation="softmax", name="fc")(backbone(inp)))
    x = _images()
    exp = camlens.explain(m, x, targets=[4, 1], layer="backbone/conv", method="cam", relu=False)
    _close(exp.raw, _cam_ref(_acts(m, x, "backbone/conv"), m.get_layer("fc"), [4, 1]))


def test_cam_on_a_subclassed_model_equals_its_functional_twin():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = L.Conv2D(5, 3, padding="same", activation="relu")
            self.gap = L.GlobalAveragePooling2D()
            self.fc = L.Dense(4)

        def call(self, x):
            return self.fc(self.gap(self.conv(x)))

    keras.utils.set_random_seed(2)
    net, x = Net(), _images()
    net(x)
    exp = camlens.explain(net, x, targets=[2], layer="conv", method="cam", relu=False)
    acts = np.transpose(net.conv(x).numpy(), (0, 3, 1, 2))
    _close(exp.raw, _cam_ref(acts, net.fc, [2]))


def test_cam_refuses_heads_that_are_not_gap_and_dense():
    m, x = _cnn("flatten"), _images()
    before = _state(m)
    with pytest.raises(ModelError, match="global average pool of layer 'r2'"):
        camlens.explain(m, x, targets=0, layer="r2", method="cam")
    with pytest.raises(ModelError, match="global average pool"):  # a layer before the last one
        camlens.explain(_cnn(), x, targets=0, layer="c1", method="cam")
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    f = L.GlobalAveragePooling2D()(L.Conv2D(4, 3, name="c")(inp))
    scaled = keras.Model(inp, L.Rescaling(2.0)(L.Dense(3, name="fc")(f)))
    with pytest.raises(ModelError, match="straight from a keras.layers.Dense"):
        camlens.explain(scaled, x, targets=0, layer="c", method="cam")
    _same_state(before, _state(m))


def test_the_readme_method_table_marks_what_runs_on_keras():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("| method | what | cost per call | Keras |")[1].split("\n\n")[0].splitlines()[2:]
    keras_col = {row.split("|")[1].strip().strip("`"): row.split("|")[4].strip() for row in table}
    assert {m for m, v in keras_col.items() if v.startswith("no")} == set(NOT_ON_KERAS)
    assert all(v.startswith(("yes", "no")) for v in keras_col.values())
    assert set(keras_col) <= set(_REGISTRY.available())


def test_graphs_with_bare_operations_work():
    """``x + 3.0`` on Keras tensors (MobileNetV3's hard sigmoid) is an operation, not a layer."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    a = L.Conv2D(4, 3, padding="same", name="c")(inp)
    a = L.ReLU(6.0, name="r6")(a + 3.0) * (1.0 / 6.0)
    m = keras.Model(inp, L.Dense(3, name="fc")(L.GlobalAveragePooling2D()(a)))
    x = _images()
    exp = camlens.explain(m, x, targets=[0, 2], layer="c", method="gradcam", relu=False)
    c, r6, fc = (m.get_layer(n) for n in ("c", "r6", "fc"))
    A = c(tf.constant(x))
    with tf.GradientTape(persistent=True) as tape:  # the same maths by hand
        tape.watch(A)
        y = fc(tf.reduce_mean(r6(A + 3.0) / 6.0, axis=(1, 2)))
        s0, s2 = tf.reduce_sum(y[:, 0]), tf.reduce_sum(y[:, 2])
    g = np.stack([tape.gradient(s0, A).numpy(), tape.gradient(s2, A).numpy()], axis=1)  # (B, T, h, w, C)
    _close(exp.raw, np.einsum("btc,bhwc->bthw", g.mean(axis=(2, 3)), A.numpy()))
