"""Black-box models (issue 14): any callable images -> scores, NumPy in, NumPy out, explained with the
methods that score perturbed inputs (:mod:`camlens.backends.callable`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import camlens
from camlens.backends import base
from camlens.errors import ConfigTypeError, ModelError


def _cnn(k: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, k)).eval()


class Recorder:
    """A callable wrapping a torch model that records the batches it was given."""

    def __init__(self, net: torch.nn.Module, nhwc: bool = False) -> None:
        self.net, self.nhwc, self.shapes = net, nhwc, []

    def __call__(self, a: np.ndarray) -> np.ndarray:
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous
        self.shapes.append(a.shape)
        t = torch.from_numpy(a)
        with torch.no_grad():
            return self.net(t.permute(0, 3, 1, 2) if self.nhwc else t).numpy()


def test_occlusion_on_a_callable_equals_occlusion_on_the_torch_model():
    net = _cnn()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = camlens.explain(net, x, targets=[1, 3], method="occlusion", patch=8, batch_size=8)
    fn = Recorder(net)
    got = camlens.explain(camlens.CallableModel(fn, batch_size=5), x.numpy(), targets=[1, 3], method="occlusion",
                          patch=8, batch_size=8)
    assert isinstance(got.maps, np.ndarray) and got.maps.shape == (2, 2, 32, 32)
    np.testing.assert_allclose(got.raw, want.raw.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.maps, want.maps.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.scores, want.scores.numpy(), atol=1e-6, rtol=0)
    assert max(s[0] for s in fn.shapes) <= 5 and all(s[1:] == (3, 32, 32) for s in fn.shapes)
    # a plain callable taking channels-last images: the layout read from the inputs, given back as it came
    fh = Recorder(net, nhwc=True)
    xh = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    got_h = camlens.explain(fh, xh, targets=[1, 3], method="occlusion", patch=8, batch_size=8)
    np.testing.assert_allclose(got_h.raw, want.raw.numpy(), atol=1e-5, rtol=0)
    assert all(s[1:] == (32, 32, 3) for s in fh.shapes) and max(s[0] for s in fh.shapes) <= 8
    assert base.get_backend(fh).name == "callable"
    # camlens.stream: one channels-last image at a time, the same maps
    outs = list(camlens.stream(fh, [xh[0], xh[1]], [1, 3], method="occlusion", options={"patch": 8,
                                                                                         "batch_size": 8}))
    np.testing.assert_allclose(np.concatenate([o.raw for o in outs]), want.raw.numpy(), atol=1e-5, rtol=0)


def test_rise_on_a_callable_equals_its_sum_over_the_masks():
    """RISE (drise's class targets): ``S = sum_n (f(x M_n) - mean_n f) M_n / (N p)``, with the masks the
    method draws (NumPy's stream for a NumPy model) and the callable's own scores."""
    from camlens.backends.numpy import NumpyOps
    from camlens.methods.drise import drise_masks

    net = _cnn()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)).numpy()
    fn = Recorder(net)
    got = camlens.explain(camlens.CallableModel(fn, batch_size=8), x, targets=[0, 2], method="drise", n_masks=40,
                          grid=4, batch_size=16)
    assert max(s[0] for s in fn.shapes) <= 8
    ops = NumpyOps()
    masks = drise_masks(40, (32, 32), 4, 0.5, ops, ops.generator(0, x), x)  # (N, H, W)
    f = fn(np.ascontiguousarray(x * masks[:, None], dtype=np.float32))[:, [0, 2]]  # (N, 2)
    want = np.einsum("nt,nhw->thw", f - f.mean(0), masks) / (40 * 0.5)
    np.testing.assert_allclose(got.raw[0], want, atol=1e-6, rtol=1e-4)


def _occlusion_by_hand(x: np.ndarray, w: np.ndarray, k: int, s: int) -> np.ndarray:
    """Occlusion (baseline 0) of the linear score ``w . x``: each window's drop is ``sum_window w x``,
    each pixel the mean drop of the windows covering it. ``x`` (C, H, W), ``w`` (C, H, W) -> (H, W)."""
    C, H, W = x.shape
    total, count = np.zeros((H, W)), np.zeros((H, W))
    for i in range(0, H - k + 1, s):
        for j in range(0, W - k + 1, s):
            drop = float((w * x)[:, i:i + k, j:j + k].sum())
            total[i:i + k, j:j + k] += drop
            count[i:i + k, j:j + k] += 1
    return total / count


@pytest.mark.filterwarnings("ignore:.*maps are constant")
def test_a_scikit_learn_pipeline_on_pixels():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.random((60, 3, 8, 8), dtype=np.float32)
    y = (X[:, 0, :4].mean(axis=(1, 2)) > X[:, 0, 4:].mean(axis=(1, 2))).astype(int) + (X[:, 1].mean((1, 2)) > .5) * 1
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X.reshape(60, -1), y)
    with pytest.raises(ConfigTypeError, match="predict_proba"):  # the pipeline itself is no callable
        camlens.explain(pipe, X[:1], method="occlusion")
    fn = lambda a: pipe.decision_function(a.reshape(len(a), -1))  # (N, 3) scores, linear in the pixels
    x = X[:2]
    exp = camlens.explain(fn, x, targets="b", categories=["a", "b", "c"], method="occlusion", patch=4, stride=2,
                          baseline=0.0)
    scaler, lr = pipe[0], pipe[1]
    w = (lr.coef_[1] / scaler.scale_).reshape(3, 8, 8)  # d score_b / d pixel
    for b in range(2):
        np.testing.assert_allclose(exp.raw[b, 0], _occlusion_by_hand(x[b], w, 4, 2), rtol=1e-4, atol=1e-4)
    assert exp.targets[0][0].label == "b"
    # probabilities through predict_proba: top-2 classes, their scores are the pipeline's own
    proba = lambda a: pipe.predict_proba(a.reshape(len(a), -1))
    e2 = camlens.explain(proba, x, top_k=2, method="occlusion", patch=4)
    p = proba(x)
    np.testing.assert_allclose(e2.scores, np.sort(p, axis=1)[:, ::-1][:, :2], rtol=1e-6)


def test_dict_outputs_regression_and_the_target_language():
    rng = np.random.default_rng(3)
    Wa, Wb, Wr = (rng.normal(size=(3 * 8 * 8, k)).astype(np.float32) for k in (4, 3, 1))

    def heads(a: np.ndarray) -> dict:
        f = a.reshape(len(a), -1)
        return {"shape": f @ Wa, "colour": f @ Wb}

    x = rng.random((2, 3, 8, 8), dtype=np.float32)
    exp = camlens.explain(heads, x, targets=["shape:2", "colour:1"], method="occlusion", patch=4)
    flat = x.reshape(2, -1)
    np.testing.assert_allclose(exp.scores, np.stack([(flat @ Wa)[:, 2], (flat @ Wb)[:, 1]], 1), rtol=1e-5)
    for b in range(2):
        np.testing.assert_allclose(exp.raw[b, 1], _occlusion_by_hand(x[b], Wb[:, 1].reshape(3, 8, 8), 4, 2),
                                   rtol=1e-4, atol=1e-4)
    summed = camlens.explain(heads, x, targets=["shape:2", "colour:1"], combine="sum", method="occlusion", patch=4)
    np.testing.assert_allclose(summed.raw[:, 0], exp.raw.sum(axis=1), rtol=1e-4, atol=1e-4)
    by_fn = camlens.explain(heads, x, targets=lambda out: out["shape"][:, 0] - out["shape"][:, 1],
                            method="occlusion", patch=4)
    want = _occlusion_by_hand(x[0], (Wa[:, 0] - Wa[:, 1]).reshape(3, 8, 8), 4, 2)
    np.testing.assert_allclose(by_fn.raw[0, 0], want, rtol=1e-4, atol=1e-4)
    # a (B,) regression output: explained without a target; a JSON-like nested list output works too
    reg = camlens.explain(lambda a: (a.reshape(len(a), -1) @ Wr)[:, 0].tolist(), x, method="occlusion", patch=4)
    np.testing.assert_allclose(reg.raw[1, 0], _occlusion_by_hand(x[1], Wr[:, 0].reshape(3, 8, 8), 4, 2),
                               rtol=1e-4, atol=1e-4)


def test_layer_and_gradient_methods_are_refused_before_the_model_runs():
    calls = []

    def fn(a):
        calls.append(a.shape)
        return a.reshape(len(a), -1)[:, :4]

    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    ok = sorted(n for n, m in camlens.available_methods().items() if m.score_only)
    assert {"occlusion", "drise", "center"} <= set(ok) and not {"gradcam", "scorecam", "cam", "guided_backprop",
                                                                 "ablationcam", "random"} & set(ok)
    for method in ("gradcam", "layercam", "scorecam", "cam", "ablationcam", "guided_backprop", "guided_gradcam",
                   "eigencam", "attention_rollout"):
        with pytest.raises(ModelError, match="black-box callable") as err:
            camlens.explain(fn, x, method=method)
        assert "occlusion" in str(err.value) and "drise" in str(err.value) and method in str(err.value)
    with pytest.raises(ModelError, match=r"black-box callable.*optimise an image for it \(camlens.visualize"):
        camlens.visualize(fn, 0, steps=2, size=16)
    assert calls == []
    with pytest.raises(ModelError, match="black-box callable.*MPRT"):
        exp = camlens.explain(fn, x, targets=0, method="center")
        camlens.evaluate(fn, x, exp, metrics=["mprt"])
    with pytest.raises(ModelError, match=r"returned shape \(4,\) .* batch of 1"):  # not one row per image
        camlens.explain(lambda a: np.zeros(4), x, method="occlusion")
    with pytest.raises(ConfigTypeError, match="callable images -> scores"):
        camlens.explain(object(), x, method="occlusion")


def test_deletion_and_insertion_equal_those_of_the_torch_model():
    net = _cnn()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    exp = camlens.explain(net, x, targets=[2], method="occlusion", patch=8)
    want = camlens.evaluate(net, x, exp, metrics=["deletion", "insertion", "average_drop"], batch_size=16)
    fn = Recorder(net)
    got = camlens.evaluate(camlens.CallableModel(fn, batch_size=6), x.numpy(), exp.maps.numpy(), targets=[2],
                           metrics=["deletion", "insertion", "average_drop"], batch_size=16)
    for name in ("deletion", "insertion", "average_drop"):
        np.testing.assert_allclose(got[name], want[name].numpy(), atol=1e-5, rtol=1e-5)
    assert max(s[0] for s in fn.shapes) <= 6


@pytest.mark.parametrize("method", ["kernelshap", "lime", "rise"])
def test_perturbation_methods_on_a_callable_equal_those_on_the_torch_model(method):
    """LIME / KernelSHAP / RISE read only scores: on a black-box callable wrapping a torch CNN they give
    the torch model's maps and segment weights (the same seeded draws, NumPy on the host)."""
    net = _cnn()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    seg = (np.arange(32)[:, None] // 8 * 4 + np.arange(32)[None, :] // 8).astype(np.int64)  # 16 squares
    kw = dict(targets=[0, 2], method=method, n_samples=96, seed=5)
    if method != "rise":
        kw.update(segments=seg, baseline=0.25)
    want = camlens.explain(net, x, **kw)
    got = camlens.explain(Recorder(net), x.numpy(), **kw)
    np.testing.assert_allclose(got.maps, want.maps.numpy(), atol=1e-5, rtol=0)
    if method != "rise":
        np.testing.assert_allclose(got.weights, np.asarray(want.weights), atol=1e-5, rtol=1e-5)
        assert np.abs(np.asarray(want.weights)).max() > 0
