"""Post-processing and targets are framework-free (issue 11 item 1): the same maps / scores /
probabilities from torch tensors and NumPy arrays, on every path (few maps, many maps, fused
upsample + normalise, constant maps, fusion, quantile clipping; one head, several heads), and
their modules import no framework."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from camlens import postprocess as P
from camlens import targets as T
from camlens.backends.base import bilinear_matrix, ops_for


@pytest.mark.parametrize("module", [P, T])
def test_module_imports_no_framework(module):
    tree = ast.parse(Path(module.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not roots & {"torch", "tensorflow", "keras", "jax"}


@pytest.mark.parametrize("shape,size", [((1, 1, 7, 7), (64, 64)), ((2, 3, 5, 9), (40, 30)),
                                        ((4, 20, 7, 7), (224, 224)),  # > SMALL_MAP_COUNT maps, fused path
                                        ((2, 2, 14, 14), (14, 14))])
def test_process_same_maps_on_numpy_and_torch(shape, size):
    raw = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    raw[0, 0] = -1.0  # a constant (all <= 0 after ReLU) map: all zero with a warning, on both
    with warnings.catch_warnings(record=True) as w_np:
        warnings.simplefilter("always")
        got = P.process([raw], size)
    with warnings.catch_warnings(record=True) as w_t:
        warnings.simplefilter("always")
        want = P.process([torch.from_numpy(raw)], size).numpy()
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (*shape[:2], *size)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert [str(x.message) for x in w_np] == [str(x.message) for x in w_t] and len(w_np) == 1
    live = got.reshape(*shape[:2], -1).max(-1) > 0
    assert live.sum() == np.prod(shape[:2]) - 1 and (got.reshape(*shape[:2], -1).max(-1)[live] == 1).all()


def test_multi_layer_fusion_and_quantile_clip_on_numpy_and_torch():
    g = np.random.default_rng(1)
    raws = [g.standard_normal((2, 3, 7, 7)), g.standard_normal((2, 3, 14, 14))]
    for how in ("mean", "max"):
        got = P.process(raws, (28, 28), fuse=how)
        want = P.process([torch.from_numpy(r) for r in raws], (28, 28), fuse=how).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)
    x = g.random((2, 3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(P.clip_quantile(x, 0.9), P.clip_quantile(torch.from_numpy(x), 0.9).numpy(), atol=1e-6)


def test_resize_matrices_are_pytorch_bilinear():
    m = torch.rand(2, 3, 5, 9, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(m, size=(12, 7), mode="bilinear", align_corners=False)
    ours = torch.from_numpy(bilinear_matrix(5, 12).copy()) @ m @ torch.from_numpy(bilinear_matrix(9, 7).copy()).T
    assert (ours - ref).abs().max() < 1e-12
    np.testing.assert_allclose(ops_for(m.numpy()).resize(m.numpy().astype(np.float32), (12, 7)), ref.float().numpy(),
                               atol=2e-6)


def test_targets_scores_and_probabilities_on_numpy_and_torch():
    g = np.random.default_rng(4)
    out = {"a": g.standard_normal((2, 5)).astype(np.float32), "b": g.standard_normal((2, 3)).astype(np.float32),
           "age": g.standard_normal((2,)).astype(np.float32)}
    heads_np = T.split_outputs(out)
    heads_t = T.split_outputs({k: torch.from_numpy(v) for k, v in out.items()})
    assert list(heads_np) == ["a", "b", "age"] and T.class_heads(heads_np) == T.class_heads(heads_t) == ["a", "b"]
    for spec in (["a:4", "b:0", "age:"], ["a:1", "a:3"]):
        rows_np = T.resolve_targets(spec, heads_np, out)
        rows_t = T.resolve_targets(spec, heads_t, out)
        s_np = np.stack([tg.score(heads_np, out) for tg in rows_np[0]], axis=1)
        s_t = torch.stack([tg.score(heads_t, out) for tg in rows_t[0]], dim=1)
        np.testing.assert_allclose(s_np, s_t.numpy(), rtol=1e-6)
        p_np, p_t = T.target_probabilities(rows_np, heads_np), T.target_probabilities(rows_t, heads_t)
        np.testing.assert_allclose(p_np, p_t.numpy(), rtol=1e-6, equal_nan=True)
    want = torch.from_numpy(out["a"]).softmax(1)[:, 4]
    np.testing.assert_allclose(T.target_probabilities(
        T.resolve_targets(["a:4", "age:"], heads_np, out), heads_np)[:, 0], want.numpy(), rtol=1e-6)
    assert np.isnan(T.target_probabilities(T.resolve_targets(["a:4", "age:"], heads_np, out), heads_np)[:, 1]).all()
    top = T.resolve_targets(None, heads_np, out, top_k=2)
    assert [[tg.cls for tg in row if tg.head == "a"] for row in top] == np.argsort(-out["a"], axis=1)[:, :2].tolist()


def test_numpy_ops_implement_every_op_like_torch_ops():
    """NumpyOps has every Ops method, and each agrees with TorchOps on the same data."""
    import inspect

    from camlens.backends.base import Ops
    from camlens.backends.numpy import NumpyOps
    from camlens.backends.torch.ops import TorchOps

    names = [n for n, _ in inspect.getmembers(Ops, inspect.isfunction) if not n.startswith("_")]
    assert isinstance(NumpyOps(), Ops) and isinstance(TorchOps(), Ops)
    assert all(callable(getattr(NumpyOps, n, None)) for n in names)
    n, t = NumpyOps(), TorchOps()
    x = np.random.default_rng(5).random((2, 3, 9, 11)).astype(np.float32)
    xt = torch.from_numpy(x)
    k = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    kh = np.array([0.1, 0.2, 0.4, 0.2, 0.1], dtype=np.float32)
    for pad in ("reflect", "replicate"):
        np.testing.assert_allclose(n.separable_filter(x, k, kh, pad),
                                   t.separable_filter(xt, torch.from_numpy(k), torch.from_numpy(kh), pad).numpy(),
                                   atol=1e-6)
    for r in (1, 3):
        np.testing.assert_allclose(n.box_mean(x, r), t.box_mean(xt, r).numpy(), atol=1e-6)
    np.testing.assert_allclose(n.resize_corners(x, (20, 7)), t.resize_corners(xt, (20, 7)).numpy(), atol=1e-6)
    np.testing.assert_allclose(n.resize(x, (20, 7)), t.resize(xt, (20, 7)).numpy(), atol=1e-6)
    np.testing.assert_allclose(n.softmax(x, axis=1), t.softmax(xt, axis=1).numpy(), atol=1e-6)
    np.testing.assert_allclose(n.quantile(x, 0.9, axis=-1), t.quantile(xt, 0.9, axis=-1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(n.topk(x, 3, axis=-1)[1], t.topk(xt, 3, axis=-1)[1].numpy())
    assert n.to_list(x[0, 0, 0]) == t.to_list(xt[0, 0, 0]) and n.device_type(x) == t.device_type(xt) == "cpu"
    g = n.generator(3)
    a, b = n.random((4,), g, x), n.random((4,), g, x)
    assert a.dtype == np.float32 and not np.array_equal(a, b) and np.array_equal(a, n.random((4,), n.generator(3), x))
