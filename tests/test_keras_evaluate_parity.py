"""Issue 13: ``camlens.evaluate`` on Keras models gives the numbers it gives on the PyTorch twin with
copied weights (tests/test_keras_torch_parity.py's pair): every metric on the same maps within
1e-4, and MPRT — the Keras copy re-initialised by its layers' own initializers — equal to MPRT on
the twin given the same re-drawn weights at every step. MPRT's copy leaves the Keras model, its
variables and the global random state exactly as they were. Skipped without torch or Keras.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from keras_setup import import_keras  # noqa: E402

keras = import_keras()

import camlens  # noqa: E402
from camlens.backends.keras import BACKEND as KERAS  # noqa: E402
from keras.src.backend.common import global_state  # noqa: E402
from camlens.backends.torch.backend import TorchBackend  # noqa: E402
from test_keras_torch_parity import images, pair  # noqa: E402,F401  (the twin fixtures)

# Keras layer -> index of the twin's module, and how its weights map (kernels (kh, kw, in, out) -> (out, in, kh, kw))
TWIN = {"c1": 0, "bn": 1, "c2": 3, "fc": 7}
TARGETS = [0, 3]


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _copy_into_twin(layer, module) -> None:
    """Set torch ``module``'s parameters (and BatchNorm statistics) to Keras ``layer``'s current values."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    w = layer.get_weights()
    with torch.no_grad():
        if isinstance(module, torch.nn.BatchNorm2d):
            for dst, src in zip((module.weight, module.bias, module.running_mean, module.running_var), w):
                dst.copy_(t(src))
            return
        k = w[0].transpose(3, 2, 0, 1) if w[0].ndim == 4 else w[0].T
        module.weight.copy_(t(k))
        module.bias.copy_(t(w[1]))


@pytest.fixture(scope="module")
def masks():
    m = np.zeros((2, 20, 20), dtype=bool)
    m[0, 3:11, 4:13] = True
    m[1, 9:18, 8:16] = True
    return m


ALL = ["deletion", "insertion", "average_drop", "increase_in_confidence", "average_gain", "sparseness",
       "pointing_game", "relevance_mass", "relevance_rank", "road_morf", "road_lerf", "road"]
# ROAD without its imputation noise and tie noise: those are draws of each framework's generator (NumPy's for
# Keras, torch's for the twin), so with them the two differ by the draws, not by the maths
_ROAD = {"percentages": (0.2, 0.5, 0.8), "noise": 0.0, "tie_noise": 0.0}
OPTIONS = {"deletion": {"step": 37}, "insertion": {"step": 37, "substrate": "blur"},
           "road_morf": _ROAD, "road_lerf": _ROAD, "road": _ROAD, "pointing_game": {"tolerance": 2}}


def test_every_metric_equals_the_torch_twins_on_the_same_maps(pair, images, masks):
    km, tm = pair
    exp = camlens.explain(km, images, targets=TARGETS, layer="c2")
    maps = np.asarray(exp.maps)
    assert maps.shape == (2, 2, 20, 20) and float(maps.std()) > 0.05
    sk = camlens.evaluate(km, images, exp, ALL, masks=masks, options=OPTIONS, batch_size=16)
    st = camlens.evaluate(tm, _nchw(images), torch.from_numpy(maps), ALL, targets=TARGETS, masks=torch.from_numpy(masks),
                          options=OPTIONS, batch_size=16)
    for name in ALL:
        got, want = np.asarray(sk[name]), st[name].numpy()
        assert got.shape == want.shape == (2, 2), name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=name)
        if name in st.curves:
            np.testing.assert_allclose(np.asarray(sk.curves[name]), st.curves[name].numpy(), rtol=0, atol=1e-4,
                                       err_msg=name)
    # the curves are not flat: deletion's probability moves, so the comparison can fail
    assert float(np.ptp(np.asarray(sk.curves["deletion"]))) > 1e-3
    # a plain map array on Keras gives the numbers of the Explanation
    plain = camlens.evaluate(km, images, maps, ["deletion", "road"], targets=TARGETS, options=OPTIONS, batch_size=16)
    np.testing.assert_array_equal(np.asarray(plain["deletion"]), np.asarray(sk["deletion"]))
    np.testing.assert_array_equal(np.asarray(plain["road"]), np.asarray(sk["road"]))


def test_mprt_equals_the_twins_given_the_same_redrawn_weights(pair, images, monkeypatch):
    """Keras MPRT with one step per layer (fc, c2, bn, c1); the twin's re-initialisation is replaced by
    the Keras copy's weights after the same step, so both re-explain the same models."""
    km, tm = pair
    snapshots: list[dict] = []
    keras_reinit = type(KERAS).reinitialise_layers

    def record(self, model, layers, seed):
        keras_reinit(self, model, layers, seed)
        snapshots.append({n: model.get_layer(n) for n in TWIN})  # (the copy's layers; values read below)
        snapshots[-1] = {n: [w.copy() for w in layer.get_weights()] for n, layer in snapshots[-1].items()}

    monkeypatch.setattr(type(KERAS), "reinitialise_layers", record)
    opts = {"mprt": {"max_steps": None, "seed": 3}}
    ek = camlens.explain(km, images, targets=TARGETS, layer="c2")
    sk = camlens.evaluate(km, images, ek, ["mprt"], options=opts)
    assert sk.extra["mprt"]["steps"] == ["fc", "c2", "bn", "c1"]
    assert len(snapshots) == 4

    steps = iter(snapshots)

    def twin_reinit(self, model, layers, seed):
        if not layers:  # (randomized_copy's intact copy)
            return
        values = next(steps)
        for name, idx in TWIN.items():
            layer = km.get_layer(name)
            saved = layer.get_weights()
            layer.set_weights(values[name])  # (the user's Keras model, put back at once)
            try:
                _copy_into_twin(layer, model[idx])
            finally:
                layer.set_weights(saved)

    monkeypatch.setattr(TorchBackend, "reinitialise_layers", twin_reinit)
    et = camlens.explain(tm, _nchw(images), targets=TARGETS, layer="4")
    st = camlens.evaluate(tm, _nchw(images), et, ["mprt"], options=opts)
    assert st.extra["mprt"]["steps"] == ["7", "3", "1", "0"]
    np.testing.assert_allclose(np.asarray(sk.curves["mprt"]), st.curves["mprt"].numpy(), rtol=0, atol=1e-4)
    assert float(np.abs(np.asarray(sk.curves["mprt"])).max()) > 0.1  # not all-zero correlations


def _global_rng():
    """Python's, NumPy's and Keras' global random states (Keras': its global SeedGenerator's state)."""
    keras.random.normal((1,))  # (the global SeedGenerator exists from here on)
    gen = global_state.get_global_attribute("global_seed_generator")
    return random.getstate(), np.random.get_state()[1].copy(), gen.state.numpy().copy()


def _assert_same_rng(a, b):
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def _assert_weights(model, before):
    assert len(model.weights) == len(before)
    for (path, value), v in zip(before, model.weights):
        assert v.path == path and np.array_equal(v.numpy(), value), path


def test_mprt_copy_leaves_the_model_and_the_global_rng_as_they_were(pair, images):
    km, _ = pair
    before = [(v.path, v.numpy().copy()) for v in km.weights]
    trainable = [layer.trainable for layer in km.layers]
    rng = _global_rng()
    gen = global_state.get_global_attribute("global_seed_generator")
    net = KERAS.randomized_copy(km, ["c2", "fc"], seed=5)
    now = (random.getstate(), np.random.get_state()[1], gen.state.numpy())
    _assert_same_rng(rng, now)
    _assert_weights(km, before)
    assert [layer.trainable for layer in km.layers] == trainable
    assert not {id(v) for v in net.weights} & {id(v) for v in km.weights}
    # untouched layers copied exactly, the chosen ones re-drawn; the same seed, the same copy
    for name in ("c1", "bn"):
        for a, b in zip(net.get_layer(name).get_weights(), km.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert not np.allclose(net.get_layer("c2").get_weights()[0], km.get_layer("c2").get_weights()[0])
    again = KERAS.randomized_copy(km, ["c2", "fc"], seed=5)
    other = KERAS.randomized_copy(km, ["c2", "fc"], seed=6)
    for name in ("c2", "fc"):
        np.testing.assert_array_equal(net.get_layer(name).get_weights()[0], again.get_layer(name).get_weights()[0])
        assert not np.allclose(net.get_layer(name).get_weights()[0], other.get_layer(name).get_weights()[0])
    # the draws are the layers' own initializers: Glorot-uniform kernels within their limit, zero biases
    k, b = net.get_layer("fc").get_weights()
    limit = np.sqrt(6 / (k.shape[0] + k.shape[1]))
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.5 * limit and not b.any()
    # a whole evaluate: the model's variables and the global random state exactly as before
    exp = camlens.explain(km, images, targets=TARGETS, layer="c2")
    camlens.evaluate(km, images, exp, ["mprt"], options={"mprt": {"max_steps": 2}})
    _assert_weights(km, before)
    _assert_same_rng(rng, (random.getstate(), np.random.get_state()[1], gen.state.numpy()))


def test_reinitialised_batchnorm_is_the_layers_default(pair):
    km, _ = pair
    net = KERAS.randomized_copy(km, ["bn"], seed=0)
    gamma, beta, mean, var = net.get_layer("bn").get_weights()
    np.testing.assert_array_equal(gamma, 1)
    np.testing.assert_array_equal(beta, 0)
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(var, 1)
    assert KERAS.layer_order(km, np.zeros((1, 3, 20, 20), np.float32)) == ["c1", "bn", "c2", "fc"]
