"""Issue 13, first slice: the Keras 3 (TensorFlow) backend.

``camlens.explain(keras_model, x_nhwc, ...)`` on Functional, Sequential, nested and multi-output
models: raw Grad-CAM equals a hand-written ``tf.GradientTape`` reference (1e-5), T targets from one
Jacobian equal T separate tapes, a final softmax is bypassed (the logits are explained) without
touching the model, the model is unchanged after success and after errors, unknown layers name
close ones, and torch is never imported. Skipped where Keras is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from keras_setup import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

import camlens  # noqa: E402
from camlens.core.errors import CamlensError, LayerNotFoundError, ModelTypeError, TargetError  # noqa: E402
from camlens.methods import gradcam_family as fam  # noqa: E402

L = keras.layers


def _images(B=2, H=16, W=16, C=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((B, H, W, C), dtype=np.float32)


def _cnn(classes=5, softmax=False, name="cnn"):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), name="img")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, activation="softmax" if softmax else None, name="logits")(x)
    model = keras.Model(inp, out, name=name)
    _perturb_bn(model)
    return model


def _perturb_bn(model):
    """Non-trivial BatchNorm moving statistics (so a training-mode forward would differ)."""
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            mean, var = layer.moving_mean, layer.moving_variance
            mean.assign(np.linspace(-0.2, 0.3, mean.shape[0]).astype("float32"))
            var.assign(np.linspace(0.5, 1.5, var.shape[0]).astype("float32"))


def _tape_grads(fn, x, targets):
    """Reference: per target t, ``a = A(x)``, ``g = d sum_b score_t(fn_rest(a)) / d a`` (one tape each)."""
    acts, grads = None, []
    for t in targets:
        with tf.GradientTape() as tape:
            a, out = fn(tf.constant(x), tape)
            s = tf.reduce_sum(t(out))
        grads.append(tape.gradient(s, a).numpy())
        acts = a.numpy()
    return acts, np.stack(grads, axis=1)  # (B, h, w, C), (B, T, h, w, C)


def _gradcam_ref(acts, grads):
    """Grad-CAM by hand on channels-last arrays: ``sum_c mean_hw(g[b, t, :, :, c]) a[b, :, :, c]``."""
    w = grads.mean(axis=(2, 3))  # (B, T, C)
    return np.einsum("btc,bhwc->bthw", w, acts)


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1e-12, float(np.abs(want).max())))


def _chain(*layers_after):
    """``fn(x, tape)`` calling the given layer groups in order: ``(before..., [captured], after...)``."""
    def fn(x, tape):
        before, after = layers_after
        a = x
        for layer in before:
            a = layer(a, training=False)
        tape.watch(a)
        y = a
        for layer in after:
            y = layer(y, training=False)
        return a, y
    return fn


def _state(model):
    """Everything that must not change: weights (BatchNorm moving stats included), trainable flags, activations."""
    return ([w.copy() for w in model.get_weights()], [(v.path, bool(v.trainable)) for v in model.variables],
            [(l.name, bool(l.trainable), getattr(getattr(l, "activation", None), "__name__", None))
             for l in model._flatten_layers()])


def _same_state(a, b):
    assert len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1] == b[1] and a[2] == b[2]


# ----------------------------------------------------------------------------------------------

def test_get_backend_picks_keras_models():
    from camlens.backends.base import get_backend

    assert get_backend(_cnn()).name == "keras"


def test_gradcam_on_a_functional_cnn_equals_a_tape_reference():
    m = _cnn()
    x = _images()
    exp = camlens.explain(m, x, targets=3, layer="conv2", method="gradcam", relu=False)
    g = {l.name: l for l in m.layers}
    acts, grads = _tape_grads(_chain([g["conv1"], g["bn"], g["conv2"]], [g["gap"], g["logits"]]), x,
                              [lambda o: o[:, 3]])
    assert exp.raw.shape == (2, 1, 8, 8) and exp.maps.shape == (2, 1, 16, 16)
    _close(exp.raw, _gradcam_ref(acts, grads))
    _close(exp.scores[:, 0], m(x, training=False).numpy()[:, 3])


def test_three_targets_from_one_jacobian_equal_three_tapes():
    m = _cnn()
    x = _images(B=3)
    exp = camlens.explain(m, x, targets=[0, 2, 4], layer="conv2", method="gradcam", relu=False)
    g = {l.name: l for l in m.layers}
    acts, grads = _tape_grads(_chain([g["conv1"], g["bn"], g["conv2"]], [g["gap"], g["logits"]]), x,
                              [lambda o, t=t: o[:, t] for t in (0, 2, 4)])
    assert exp.raw.shape == (3, 3, 8, 8)
    _close(exp.raw, _gradcam_ref(acts, grads))
    assert [t.label for t in exp.targets[0]] == ["0", "2", "4"]


def test_the_gradient_family_and_eigencam_equal_their_formulas_on_the_reference_arrays():
    m = _cnn()
    x = _images()
    g = {l.name: l for l in m.layers}
    acts, grads = _tape_grads(_chain([g["conv1"], g["bn"], g["conv2"]], [g["gap"], g["logits"]]), x,
                              [lambda o, t=t: o[:, t] for t in (1, 2)])
    a = np.transpose(acts, (0, 3, 1, 2)).astype(np.float64)  # (B, C, h, w)
    gr = np.transpose(grads, (0, 1, 4, 2, 3)).astype(np.float64)  # (B, T, C, h, w)
    want = {"hirescam": np.einsum("btchw,bchw->bthw", gr, a),
            "layercam": np.einsum("btchw,bchw->bthw", np.maximum(gr, 0), a),
            "xgradcam": np.einsum("btc,bchw->bthw", (gr * a[:, None]).sum((-2, -1))
                                  / (a.sum((-2, -1))[:, None] + 1e-7), a),
            "gradcampp": fam.gradcam_pp(a, gr)}
    for method, ref in want.items():
        exp = camlens.explain(m, x, targets=[1, 2], layer="conv2", method=method, relu=False)
        _close(exp.raw, ref, tol=1e-4)
    exp = camlens.explain(m, x, targets=[1, 2], layer="conv2", method="eigencam", relu=False)
    _close(exp.raw, fam.eigencam(a.astype(np.float32), 2), tol=1e-4)


def test_a_sequential_model():
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((16, 16, 3)), L.Conv2D(4, 3, activation="relu", name="c1"),
                          L.Conv2D(5, 3, activation="relu", name="c2"), L.Flatten(name="flat"),
                          L.Dense(3, name="out")])
    x = _images()
    exp = camlens.explain(m, x, targets=[0, 2], layer="c2", method="gradcam", relu=False)
    acts, grads = _tape_grads(_chain([m.layers[0], m.layers[1]], m.layers[2:]), x,
                              [lambda o: o[:, 0], lambda o: o[:, 2]])
    _close(exp.raw, _gradcam_ref(acts, grads))
    assert camlens.explain(m, x).layers == ["c2"]  # layer=None: the last spatial map


def _nested():
    keras.utils.set_random_seed(2)
    i = keras.Input((16, 16, 3))
    y = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(i)
    y = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv_b")(y)
    inner = keras.Model(i, y, name="backbone")
    o_in = keras.Input((16, 16, 3))
    z = inner(o_in)
    z = L.Conv2D(5, 1, activation="relu", name="head_conv")(z)
    z = L.GlobalAveragePooling2D(name="gap")(z)
    z = L.Dense(4, name="logits")(z)
    return keras.Model(o_in, z, name="outer"), inner


def test_a_layer_inside_a_nested_model_is_reached_through_the_outer_graph():
    m, inner = _nested()
    x = _images()
    # the trap a side model falls into: the inner layer's symbolic output is not on the outer graph
    with pytest.raises(ValueError):
        keras.Model(m.inputs, inner.get_layer("conv").output)
    exp = camlens.explain(m, x, targets=[1, 3], layer="backbone/conv", method="gradcam", relu=False)
    li, lo = {l.name: l for l in inner.layers}, {l.name: l for l in m.layers}
    acts, grads = _tape_grads(_chain([li["conv"]], [li["conv_b"], lo["head_conv"], lo["gap"], lo["logits"]]), x,
                              [lambda o: o[:, 1], lambda o: o[:, 3]])
    assert exp.layers == ["backbone/conv"]
    _close(exp.raw, _gradcam_ref(acts, grads))
    same = camlens.explain(m, x, targets=[1, 3], layer="conv", method="gradcam", relu=False)  # unique bare name
    assert same.layers == ["backbone/conv"]
    np.testing.assert_array_equal(same.raw, exp.raw)
    by_object = camlens.explain(m, x, targets=[1, 3], layer=inner.get_layer("conv"), method="gradcam", relu=False)
    assert by_object.layers == ["backbone/conv"]
    np.testing.assert_array_equal(by_object.raw, exp.raw)
    assert camlens.explain(m, x).layers == ["head_conv"]  # layer=None, nested models entered


def _two_heads():
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3))
    f = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    p = L.GlobalAveragePooling2D(name="gap")(f)
    shape = L.Dense(3, name="shape")(p)
    colour = L.Dense(4, activation="softmax", name="colour")(p)
    return keras.Model(inp, {"shape": shape, "colour": colour})


def test_a_dict_output_model_with_head_class_targets():
    m = _two_heads()
    x = _images()
    exp = camlens.explain(m, x, targets=["shape:1", "colour:2", "colour:0"], layer="conv", method="gradcam",
                          relu=False)
    g = {l.name: l for l in m.layers}
    col = g["colour"]

    def fn(xx, tape):
        a = g["conv"](xx)
        tape.watch(a)
        pooled = g["gap"](a)
        return a, {"shape": g["shape"](pooled), "colour": pooled @ col.kernel + col.bias}  # colour's logits

    acts, grads = _tape_grads(fn, x, [lambda o: o["shape"][:, 1], lambda o: o["colour"][:, 2],
                                      lambda o: o["colour"][:, 0]])
    _close(exp.raw, _gradcam_ref(acts, grads))
    assert [t.label for t in exp.targets[0]] == ["shape: 1", "colour: 2", "colour: 0"]
    assert set(exp.heads) == {"shape", "colour"}
    top = camlens.explain(m, x, layer="conv")  # targets=None: the top class of every head
    assert [t.head for t in top.targets[0]] == ["shape", "colour"]


def test_a_list_output_model_names_heads_by_their_output_layers():
    keras.utils.set_random_seed(4)
    inp = keras.Input((16, 16, 3))
    f = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    p = L.GlobalAveragePooling2D()(f)
    m = keras.Model(inp, [L.Dense(3, name="species")(p), L.Dense(2, name="age")(p)])
    x = _images()
    by_name = camlens.explain(m, x, targets=["age:1", "species:2"], layer="conv", relu=False)
    by_pos = camlens.explain(m, x, targets=[(1, 1), (0, 2)], layer="conv", relu=False)
    np.testing.assert_array_equal(by_name.raw, by_pos.raw)
    out = m(x, training=False)
    _close(by_name.scores, np.stack([out[1][:, 1], out[0][:, 2]], axis=1))


def test_the_target_language_is_the_same_as_on_torch():
    m = _cnn()
    x = _images()
    sep = camlens.explain(m, x, targets=[1, 2], layer="conv2", relu=False)
    mean = camlens.explain(m, x, targets=[1, 2], layer="conv2", relu=False, combine="mean")
    _close(mean.raw[:, 0], sep.raw.mean(axis=1))  # Grad-CAM is linear in the gradients
    diff = camlens.explain(m, x, targets=lambda out: out[:, 1] - out[:, 2], layer="conv2", relu=False)
    _close(diff.raw[:, 0], sep.raw[:, 0] - sep.raw[:, 1])
    names = camlens.explain(m, x, targets=["cat", "dog"], categories=["a", "cat", "dog", "e", "f"], layer="conv2",
                            relu=False)
    np.testing.assert_array_equal(names.raw, sep.raw)
    per = camlens.explain(m, x, targets=[[1, 2], [2, 1]], layer="conv2", relu=False)  # per image
    _close(per.raw[1], sep.raw[1, ::-1])
    down = camlens.explain(m, x, targets=1, layer="conv2", relu=False, sign=-1)
    _close(down.raw[:, 0], -sep.raw[:, 0])
    conf = camlens.explain(m, x, targets=[1, 2], layer="conv2", relu=False, combine="confidence")
    w = sep.probs / sep.probs.sum(axis=1, keepdims=True)  # each target weighted by its softmax confidence
    _close(conf.raw[:, 0], (sep.raw * w[:, :, None, None]).sum(axis=1), tol=1e-4)
    assert [t.label for t in camlens.explain(m, x, top_k=2, layer="conv2").targets[0]] == [
        str(c) for c in np.argsort(-m(x[:1]).numpy()[0])[:2]]


def test_a_final_softmax_is_bypassed_in_the_computation_not_in_the_model():
    soft = _cnn(softmax=True, name="soft")
    plain = _cnn(softmax=False, name="plain")
    plain.set_weights(soft.get_weights())
    x = _images()
    before = _state(soft)
    e_soft = camlens.explain(soft, x, targets=[1, 4], layer="conv2", relu=False)
    e_plain = camlens.explain(plain, x, targets=[1, 4], layer="conv2", relu=False)
    _close(e_soft.raw, e_plain.raw, tol=1e-6)
    _close(e_soft.scores, plain(x, training=False).numpy()[:, [1, 4]], tol=1e-6)  # logits, not probabilities
    _close(e_soft.probs, soft(x, training=False).numpy()[:, [1, 4]], tol=1e-5)
    _same_state(before, _state(soft))
    assert soft.get_layer("logits").activation.__name__ == "softmax"

    # an Activation("softmax") layer at the end: its input is explained
    keras.utils.set_random_seed(5)
    inp = keras.Input((16, 16, 3))
    f = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    z = L.Dense(3, name="dense")(L.GlobalAveragePooling2D()(f))
    act = keras.Model(inp, L.Activation("softmax", name="prob")(z))
    logits = keras.Model(inp, z)
    _close(camlens.explain(act, x, targets=2, layer="conv", relu=False).raw,
           camlens.explain(logits, x, targets=2, layer="conv", relu=False).raw, tol=1e-6)


def test_a_sigmoid_head_explains_its_logits_and_its_probs_are_the_models():
    keras.utils.set_random_seed(6)
    inp = keras.Input((16, 16, 3))
    f = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    p = L.GlobalAveragePooling2D()(f)
    m = keras.Model(inp, {"attrs": L.Dense(4, activation="sigmoid", name="attrs")(p),
                          "kind": L.Dense(3, activation="softmax", name="kind")(p)})
    x = _images()
    exp = camlens.explain(m, x, targets=["attrs:0", "attrs:3", "kind:1"], layer="conv")
    out = m(x, training=False)
    want = np.stack([out["attrs"][:, 0], out["attrs"][:, 3], out["kind"][:, 1]], axis=1)
    _close(exp.probs, want, tol=1e-5)
    k = m.get_layer("attrs")
    logits = keras.Model(inp, p)(x, training=False) @ k.kernel + k.bias  # the attrs head without its sigmoid
    _close(exp.scores[:, :2], logits.numpy()[:, [0, 3]], tol=1e-5)


def test_the_backend_has_every_method_of_the_protocol():
    from camlens.backends import base
    from camlens.backends.keras import KerasBackend

    proto = {n for n in dir(base.Backend) if not n.startswith("_")}
    assert not [n for n in proto if not hasattr(KerasBackend, n)]


def test_the_model_is_unchanged_after_success_and_after_errors():
    m = _cnn(softmax=True)
    m.get_layer("conv1").trainable = False  # a mix of flags, which must stay as they are
    x = _images()
    before = _state(m)
    for method in ("gradcam", "gradcampp", "layercam", "eigencam"):
        camlens.explain(m, x, targets=[0, 1], layer=["conv1", "conv2"], method=method)
    _same_state(before, _state(m))
    with pytest.raises(LayerNotFoundError):
        camlens.explain(m, x, layer="conv_3")
    with pytest.raises(TargetError):  # fails after the forward, inside the capture
        camlens.explain(m, x, targets=9, layer="conv2")
    with pytest.raises(TargetError):
        camlens.explain(m, x, targets=lambda out: out[:, :2], layer="conv2")
    _same_state(before, _state(m))
    bn = m.get_layer("bn")  # the BatchNorm moving statistics in particular (a training-mode call would move them)
    assert float(bn.moving_mean.numpy()[0]) == pytest.approx(-0.2) and float(bn.moving_variance.numpy()[-1]) == 1.5


def test_an_unknown_layer_names_close_ones_and_what_to_do():
    m, _ = _nested()
    with pytest.raises(LayerNotFoundError) as err:
        camlens.explain(m, _images(), layer="backbone/con")
    msg = str(err.value)
    assert "'backbone/con'" in msg and "backbone/conv" in msg and "/" in msg and "layer_index" in msg


class Block(keras.layers.Layer):
    """A custom layer holding layers of its own: conv -> BatchNorm -> ReLU (keras.ops)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.conv = L.Conv2D(6, 3, padding="same")
        self.bn = L.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))


class Net(keras.Model):
    """A subclassed model (its own call(), no graph) ending in a softmax."""

    def __init__(self):
        super().__init__(name="net")
        self.block = Block(name="block")
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.fc = L.Dense(4, activation="softmax", name="fc")

    def call(self, x, training=None):
        return self.fc(self.gap(self.block(x, training=training)))


def _net():
    keras.utils.set_random_seed(7)
    net = Net()
    net(_images(B=1))
    _perturb_bn(net.block)
    return net


def _net_ref(net, x, targets):
    def fn(xx, tape):
        a = net.block.conv(xx)
        tape.watch(a)
        y = keras.ops.relu(net.block.bn(a, training=False))
        return a, net.gap(y) @ net.fc.kernel + net.fc.bias  # the logits
    return _tape_grads(fn, x, [lambda o, t=t: o[:, t] for t in targets])


def test_a_subclassed_model_by_wrapping_its_layers_calls_for_the_block():
    net = _net()
    x = _images()
    before = _state(net)
    path = net.block.conv.name
    exp = camlens.explain(net, x, targets=[0, 3], layer=f"block/{path}", method="gradcam", relu=False)
    acts, grads = _net_ref(net, x, (0, 3))
    _close(exp.raw, _gradcam_ref(acts, grads))
    _close(exp.probs, net(x, training=False).numpy()[:, [0, 3]], tol=1e-5)  # logits explained, probs the model's
    same = camlens.explain(net, x, targets=[0, 3], layer="block.conv", method="gradcam", relu=False)  # attributes
    assert same.layers == [f"block/{path}"]
    np.testing.assert_array_equal(same.raw, exp.raw)
    assert camlens.explain(net, x).layers == ["block"]  # layer=None: the block, after its own layers
    with pytest.raises(LayerNotFoundError):
        camlens.explain(net, x, layer="block/conv9")
    with pytest.raises(TargetError):
        camlens.explain(net, x, targets=7, layer="block")
    for method in ("scorecam", "ablationcam"):  # extra forwards: the layer replaced inside the block
        maps = camlens.explain(net, x, targets=[0, 3], layer="block", method=method).maps
        assert maps.shape == (2, 2, 16, 16) and 0 <= maps.min() and maps.max() <= 1
    _same_state(before, _state(net))
    assert not [l.name for l in net._flatten_layers() if "call" in l.__dict__]  # every wrapper removed


def test_a_custom_layer_inside_a_functional_model_is_read_inside():
    keras.utils.set_random_seed(8)
    inp = keras.Input((16, 16, 3))
    blk = Block(name="blk")
    y = L.GlobalAveragePooling2D(name="gap")(blk(inp))
    m = keras.Model(inp, L.Dense(3, name="fc")(y))
    x = _images()
    exp = camlens.explain(m, x, targets=[2], layer="blk/" + blk.conv.name, relu=False)

    def fn(xx, tape):
        a = blk.conv(xx)
        tape.watch(a)
        return a, m.get_layer("fc")(m.get_layer("gap")(keras.ops.relu(blk.bn(a, training=False))))

    acts, grads = _tape_grads(fn, x, [lambda o: o[:, 2]])
    _close(exp.raw, _gradcam_ref(acts, grads))
    assert "call" not in blk.conv.__dict__


def test_a_subclassed_model_never_called_is_refused_clearly():
    with pytest.raises(ModelTypeError) as err:
        camlens.explain(Net(), _images(), layer="block")
    assert "never called" in str(err.value) and "model(x)" in str(err.value)


def test_inputs_tf_tensors_and_nhwc_only():
    m = _cnn()
    x = _images()
    a = camlens.explain(m, x, targets=1, layer="conv2")
    b = camlens.explain(m, tf.constant(x), targets=1, layer="conv2")
    np.testing.assert_array_equal(a.maps, b.maps)
    with pytest.raises(CamlensError):
        camlens.explain(m, (x * 255).astype(np.uint8), targets=1, layer="conv2")


def test_resnet50_default_layer_is_conv5_block3_out():
    apps = pytest.importorskip("keras.applications")
    keras.utils.set_random_seed(0)
    net = apps.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    x = _images(B=1, H=64, W=64, seed=3)
    exp = camlens.explain(net, x, targets=[1, 7], method="gradcam")
    assert exp.layers == ["conv5_block3_out"] and exp.maps.shape == (1, 2, 64, 64)
    side = keras.Model(net.inputs, [net.get_layer("conv5_block3_out").output, net.get_layer("predictions").input])
    k, bias = net.get_layer("predictions").kernel, net.get_layer("predictions").bias

    def fn(xx, tape):
        a, pooled = side(xx, training=False)
        return a, pooled @ k + bias

    acts, grads = _tape_grads(fn, x, [lambda o: o[:, 1], lambda o: o[:, 7]])
    raw = camlens.explain(net, x, targets=[1, 7], method="gradcam", relu=False, layer="conv5_block3_out").raw
    _close(raw, _gradcam_ref(acts, grads), tol=1e-4)


_NO_TORCH = ("import sys, importlib.abc\n"
             "class _NoTorch(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):\n"
             "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)', name=name)\n"
             "        return None\n"
             "sys.meta_path.insert(0, _NoTorch())\n")  # as on a machine without torch


@pytest.mark.parametrize("blocked", [False, True])
def test_explaining_a_keras_model_never_imports_torch(blocked):
    """In a fresh interpreter: torch is never imported, and with torch made unimportable (a meta-path
    finder, as on a machine without it) the same Keras explanation works."""
    code = ((_NO_TORCH if blocked else "") +
            "import os, sys\nos.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\nimport numpy as np, keras, camlens\n"
            "inp = keras.Input((8, 8, 3)); f = keras.layers.Conv2D(3, 3, name='c')(inp)\n"
            "m = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(f)))\n"
            "e = camlens.explain(m, np.random.rand(1, 8, 8, 3).astype('float32'), targets=[0, 1])\n"
            "assert e.maps.shape == (1, 2, 8, 8), e.maps.shape\n"
            "for meth in ('cam', 'guided_backprop', 'guided_gradcam'):  # input gradients and the linear head too\n"
            "    x = np.random.rand(1, 8, 8, 3).astype('float32')\n"
            "    assert camlens.explain(m, x, targets=[0, 1], method=meth).maps.shape == (1, 2, 8, 8), meth\n"
            "assert camlens.visualize(m, [0, 'c:1'], steps=2).floats.shape == (2, 8, 8, 3)  # activation maximisation\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
