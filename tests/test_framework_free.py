"""Issue 11 item 1: the maths is framework-free — array-API code (``camlens.backends.base.namespace``)
that runs unchanged on any compliant array library; only ``backends/`` and ``models/`` know torch.

Every module outside ``backends/`` and ``models/`` is checked by its imports (AST, function bodies
included); the maths is also run on NumPy arrays against the same maths on torch tensors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import camlens
from camlens.backends import base
from camlens.methods import cam as cam_mod
from camlens.methods import gradcam as gc
from camlens.methods import gradcam_family as fam

SRC = Path(camlens.__file__).parent
FRAMEWORKS = {"torch", "torchvision", "timm", "tensorflow", "keras", "jax"}
OWN_FRAMEWORK = ("backends/torch/", "backends/keras/", "models/")  # the only places that may import a framework
FRAMEWORK_FREE = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                        if not str(p.relative_to(SRC)).startswith(OWN_FRAMEWORK))


def test_the_framework_free_list_is_everything_but_backends_and_models():
    assert len(FRAMEWORK_FREE) >= 40
    assert {"engine/passes.py", "engine/api.py", "core/postprocess.py", "core/targets.py", "core/explanation.py",
            "fronts/report.py", "engine/tiling.py", "engine/evaluate.py", "engine/stream.py", "datasets/shapes.py", "backends/base.py", "backends/numpy.py",
            "methods/gradcam.py", "metrics/road.py", "viz/overlay.py"} <= set(FRAMEWORK_FREE)


def _imported_roots(path: Path) -> set[str]:
    """Top-level packages imported anywhere in the file (module level and inside functions)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


@pytest.mark.parametrize("rel", FRAMEWORK_FREE)
def test_module_imports_no_framework(rel):
    assert not (_imported_roots(SRC / rel) & FRAMEWORKS), f"{rel} imports {(_imported_roots(SRC / rel) & FRAMEWORKS)}"


def _pair(seed: int, B=2, T=3, C=5, h=4, w=6):
    g = np.random.default_rng(seed)
    acts = g.standard_normal((B, C, h, w))
    grads = g.standard_normal((B, T, C, h, w))
    grads[0, 0, 1, 0, 0] = 0.0  # a zero gradient (Grad-CAM++'s alpha is 0 there)
    return acts, grads


@pytest.mark.parametrize("fn", [gc.gradcam, fam.gradcam_pp, fam.xgradcam, fam.hirescam, fam.layercam, fam.eigengradcam])
def test_gradient_methods_give_the_same_maps_on_numpy_and_torch(fn):
    acts, grads = _pair(0)
    if fn is fam.xgradcam:
        acts = np.abs(acts) + 0.1  # its denominator is the activation sum (post-ReLU layers in practice)
    on_np = fn(acts, grads)
    on_torch = fn(torch.from_numpy(acts), torch.from_numpy(grads))
    assert isinstance(on_np, np.ndarray) and on_np.shape == (2, 3, 4, 6)
    tol = 1e-4 if fn is fam.eigengradcam else 1e-10  # Eigen-*: a float32 SVD inside (NumPy's LAPACK vs torch's)
    np.testing.assert_allclose(on_np, on_torch.numpy(), rtol=tol, atol=tol)


def test_gradcam_by_hand_on_numpy():
    acts, grads = _pair(1)
    want = np.einsum("btc,bchw->bthw", grads.mean(axis=(-2, -1)), acts)
    np.testing.assert_allclose(gc.gradcam(acts, grads), want, rtol=1e-12)


def test_eigencam_and_cam_maps_on_numpy_and_torch():
    acts, _ = _pair(2)
    np.testing.assert_allclose(fam.eigencam(acts, 3), fam.eigencam(torch.from_numpy(acts), 3).numpy(), rtol=1e-4,
                               atol=1e-4)
    weight = np.random.default_rng(3).standard_normal((7, 5))
    classes = np.array([[6, 0, 2], [1, 1, 5]])
    want = np.einsum("btc,bchw->bthw", weight[classes], acts)
    np.testing.assert_allclose(cam_mod.cam_maps(acts, weight, classes), want, rtol=1e-12)
    np.testing.assert_allclose(cam_mod.cam_maps(torch.from_numpy(acts), torch.from_numpy(weight),
                                                torch.from_numpy(classes)).numpy(), want, rtol=1e-12)


def test_backend_is_chosen_from_the_model_type():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))

    class Mine(torch.nn.Module):  # a user's module: its base class is torch's
        pass

    assert base.get_backend(net).name == "torch" and base.get_backend(Mine()).name == "torch"
    assert isinstance(base.get_backend(net), base.Backend) and isinstance(base.get_backend(net).ops, base.Ops)
    with pytest.raises(camlens.errors.ConfigTypeError, match="no camlens backend takes it"):
        base.get_backend(object())
    with pytest.raises(TypeError):  # the built-in type it replaces
        base.get_backend(3)
    assert base.get_backend(lambda x: x).name == "callable"  # a black box: NumPy in, scores out


def test_the_engine_names_no_method():
    """Methods declare what they need; the engine never tests for a particular method."""
    import camlens.engine
    import camlens.methods

    engine = Path(camlens.engine.__file__).parent  # the pass, its wrappers and tiling (api.py only has defaults)
    engine_src = "\n".join((engine / f).read_text() for f in ("__init__.py", "passes.py", "tiling.py"))
    for name, meth in camlens.methods.available_methods().items():
        const = type(meth).__name__
        assert f"{const}" not in engine_src and f'"{name}"' not in engine_src, name
    assert "needs_linear_head" in engine_src and "CAM" not in engine_src.replace("CAMs", "")


# --- methods/scorecam, ablationcam, occlusion, baselines, guided

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy 0/0 on the dead channel
def test_ablation_selection_on_numpy_and_torch():
    from camlens.methods import ablationcam as abl

    g = np.random.default_rng(4)
    acts = np.maximum(g.standard_normal((12, 5, 6)), 0).astype(np.float32)
    acts[3] = 0.0  # a dead channel: constant, ranks last (NaN score)
    for ratio in (1.0, 0.3, 0.05, 0.5):
        on_np = abl.channels_to_ablate(acts, ratio)
        on_torch = abl.channels_to_ablate(torch.from_numpy(acts), ratio)
        assert isinstance(on_np, np.ndarray) and on_np.dtype == np.bool_
        np.testing.assert_array_equal(on_np, on_torch.numpy())
        assert on_np.sum() == (12 if ratio >= 0.5 else 2 * int(12 * ratio))
    assert abl.channels_to_ablate(acts, 0.3)[3]  # the NaN score is among the highest
    assert float(abl.ablation_value(acts)) == 0.0 and float(abl.ablation_value(torch.from_numpy(acts))) == 0.0
    neg = acts - 1.5
    assert float(abl.ablation_value(neg)) == float(abl.ablation_value(torch.from_numpy(neg))) == neg.min() - 1e7


def test_occlusion_coverage_and_fill_on_numpy_and_torch():
    import array_api_compat.numpy as xnp
    import array_api_compat.torch as xt

    from camlens.methods import occlusion as occ

    starts = occ.window_starts(11, 4, 3)
    assert starts == [0, 3, 6, 9]  # the last window is cut at the border
    on_np = occ.coverage(xnp, 11, starts, 4, None, xnp.float32)
    on_torch = occ.coverage(xt, 11, starts, 4, None, xt.float32)
    want = np.array([[s <= p < s + 4 for s in starts] for p in range(11)], dtype=np.float32)
    np.testing.assert_array_equal(on_np, want)
    np.testing.assert_array_equal(on_torch.numpy(), want)
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert occ.occlusion_fill(x, 0.5, 1.0).dtype == np.float32 and float(occ.occlusion_fill(x, 0.5, 1.0)) == 0.5
    fill = occ.occlusion_fill(torch.from_numpy(x), np.array([[[0.1]], [[0.2]], [[0.3]]]), 1.0)  # another library
    assert fill.dtype == torch.float32 and fill.shape == (3, 1, 1)
    np.testing.assert_allclose(fill.numpy().ravel(), [0.1, 0.2, 0.3], rtol=1e-6)


def test_baselines_and_guided_maths_on_numpy_and_torch():
    import array_api_compat.numpy as xnp
    import array_api_compat.torch as xt

    from camlens.methods import baselines as bl
    from camlens.methods import guided as gd

    np.testing.assert_allclose(bl.center_map(xnp, 7, 10, 0.3), bl.center_map(xt, 7, 10, 0.3).numpy(),
                               rtol=1e-6)  # (float32 exp: NumPy's and torch's differ in the last bit)
    g = bl.center_map(xnp, 7, 9, 0.3)
    assert g.dtype == np.float32 and g[3, 4] == 1.0 and g.max() == 1.0
    pixel = np.random.default_rng(6).standard_normal((2, 3, 3, 4, 5))
    np.testing.assert_array_equal(gd.channel_saliency(pixel), np.abs(pixel).max(axis=2))
    np.testing.assert_array_equal(gd.channel_saliency(torch.from_numpy(pixel)).numpy(), np.abs(pixel).max(axis=2))


def test_random_baseline_draws_are_those_of_a_seeded_cpu_torch_generator():
    """The random channel weights still come from ``torch.rand`` on a CPU generator seeded with crc32
    (now behind ``Ops.generator`` / ``Ops.random``): the pinned maps do not move."""
    import zlib

    from camlens.methods import baselines as bl
    from camlens.core.targets import Target

    rows = [[Target(cls=3, label="3"), Target(cls=5, label="5")], [Target(cls=3, label="3"), Target(cls=1, label="1")]]
    w = bl.random_weights(rows, 7, 11, 2, like=torch.zeros(1, dtype=torch.float64))
    assert w.shape == (2, 2, 7) and w.dtype == torch.float32

    def old(cls):
        gen = torch.Generator().manual_seed(zlib.crc32(f"random:11:2:cls={cls}".encode()))
        return torch.rand(7, generator=gen) * 2 - 1

    assert torch.equal(w, torch.stack([torch.stack([old(3), old(5)]), torch.stack([old(3), old(1)])]))


def test_scorecam_masks_use_the_aligned_corners_resize_of_the_framework():
    import torch.nn.functional as F

    from camlens.backends.torch.ops import TorchOps
    from camlens.methods import scorecam as sc

    acts = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(7))
    acts[2] = 0.0  # a dead channel: an all-zero mask, exactly
    up = F.interpolate(acts[None], size=(13, 17), mode="bilinear", align_corners=True)[0]
    assert torch.equal(TorchOps().resize_corners(acts, (13, 17)), up)
    assert torch.equal(TorchOps().resize_corners(acts[None], (13, 17))[0], up)
    m = sc.channel_masks(acts, (13, 17))
    flat = up.flatten(1)
    assert torch.equal(m, (up - flat.amin(1)[:, None, None]) / (flat.amax(1) - flat.amin(1) + 1e-8)[:, None, None])
    assert m[2].abs().max() == 0 and m.shape == (5, 13, 17)


# ---------------------------------------------------------------------------------------------- metrics


def _maps(seed: int, shape=(2, 3, 6, 7)) -> np.ndarray:
    g = np.random.default_rng(seed)
    m = g.random(shape)
    m[0, 0] = 0.5  # a constant map: every pixel ties
    m[1, 2, :2] = 0.0  # a run of ties
    return m


def _same(on_np, on_torch, rtol=0.0):
    """``on_np`` (NumPy, not a tensor) equals ``on_torch`` (a tensor), NaN where it is NaN."""
    assert isinstance(on_np, np.ndarray) and isinstance(on_torch, torch.Tensor)
    assert on_np.shape == tuple(on_torch.shape)
    np.testing.assert_allclose(on_np, on_torch.numpy(), rtol=rtol, atol=0, equal_nan=True)


def test_curve_rank_and_sparseness_maths_on_numpy_and_torch():
    from camlens.metrics import auc, mean_sem, order_pixels
    from camlens.metrics.faithfulness import gini
    from camlens.metrics.sanity import average_ranks, spearman

    m = _maps(10)
    _same(auc(m), auc(torch.from_numpy(m)), rtol=1e-12)
    n = m.shape[-1] - 1  # trapezoid on [0, 1] by hand
    np.testing.assert_allclose(auc(m), (m[..., 1:] + m[..., :-1]).sum(-1) / (2 * n), rtol=1e-12)
    _same(order_pixels(m), order_pixels(torch.from_numpy(m)))
    assert order_pixels(m)[0, 0].tolist() == list(range(42))  # constant map: raster order (stable)
    _same(gini(m.reshape(2, 3, -1)), gini(torch.from_numpy(m).reshape(2, 3, -1)))
    assert mean_sem(m) == pytest.approx(mean_sem(torch.from_numpy(m)), rel=1e-12)
    r = m.reshape(6, -1).round(1)  # many ties
    _same(average_ranks(r), average_ranks(torch.from_numpy(r)))
    assert average_ranks(np.array([[3.0, 1.0, 1.0, 5.0]])).tolist() == [[2.0, 0.5, 0.5, 3.0]]
    other = _maps(11)
    _same(spearman(m.round(1), other), spearman(torch.from_numpy(m.round(1)), torch.from_numpy(other)))
    scipy_stats = pytest.importorskip("scipy.stats")
    rho = spearman(m[1, 1].round(1), other[1, 1])
    assert float(rho) == pytest.approx(scipy_stats.spearmanr(m[1, 1].round(1).ravel(), other[1, 1].ravel())[0],
                                       abs=1e-6)


def test_localisation_maths_on_numpy_and_torch():
    from camlens.metrics.localisation import boxes_to_masks, pointing_game, relevance_mass, relevance_rank

    m = _maps(12)
    gt = np.random.default_rng(13).random(m.shape) > 0.7
    gt[0, 1] = False  # an empty mask: NaN
    tm, tg = torch.from_numpy(m), torch.from_numpy(gt)
    for tol in (0.0, 2.5, 15.0):
        (hit, pts), (thit, tpts) = pointing_game(m, gt, tol), pointing_game(tm, tg, tol)
        _same(hit, thit)
        _same(pts, tpts)
    _same(relevance_mass(m - 0.3, gt), relevance_mass(tm - 0.3, tg))
    _same(relevance_rank(m, gt), relevance_rank(tm, tg))
    r = np.maximum(m[1, 0] - 0.3, 0)  # by hand
    assert float(relevance_mass(m[1, 0] - 0.3, gt[1, 0])) == pytest.approx(r[gt[1, 0]].sum() / r.sum(), rel=1e-6)
    assert np.isnan(relevance_mass(m, gt)[0, 1]) and np.isnan(relevance_rank(m, gt)[0, 1])
    boxes = np.array([[1, 2, 4, 5], [0.6, 0.0, 2.5, 1.0]])
    _same(boxes_to_masks(boxes, (6, 7)), boxes_to_masks(torch.from_numpy(boxes), (6, 7)))
    want = np.zeros((6, 7), dtype=bool)
    want[2:5, 1:4] = True
    assert np.array_equal(boxes_to_masks(boxes, (6, 7))[0], want)


def test_road_maths_on_numpy_and_torch():
    from camlens.metrics.road import _neighbour_sum, impute_spsolve, removal_masks

    g = np.random.default_rng(14)
    order = g.permutation(42)
    for most_first in (True, False):
        _same(removal_masks(order, (6, 7), (0.1, 0.5, 0.9), most_first),
              removal_masks(torch.from_numpy(order), (6, 7), (0.1, 0.5, 0.9), most_first))
    v = g.standard_normal((2, 3, 6, 7))
    _same(_neighbour_sum(v), _neighbour_sum(torch.from_numpy(v)))
    assert _neighbour_sum(np.ones((5, 5)))[2, 2] == pytest.approx(1.0)  # interior weights sum to 1
    removed = g.random((6, 7)) < 0.5
    _same(impute_spsolve(v[0], removed), impute_spsolve(torch.from_numpy(v[0]), torch.from_numpy(removed)))
    assert np.array_equal(impute_spsolve(v[0], removed)[:, ~removed], v[0][:, ~removed])  # kept pixels untouched


def test_torch_ops_and_backend_for_metrics():
    """The backend half of the metrics: filters, random streams, layer order, in-place re-initialisation."""
    import torch.nn.functional as F

    from camlens.backends.torch.ops import TorchOps

    ops = TorchOps()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    k = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    want = F.conv2d(F.pad(x.reshape(6, 1, 9, 8), (1, 1, 1, 1), mode="reflect"), (k[:, None] * k[None, :])[None, None])
    assert torch.allclose(ops.separable_filter(x, k, k, "reflect"), want.reshape(2, 3, 9, 8), atol=1e-12)
    ones = torch.ones(1, 5, 5)
    assert torch.equal(ops.box_mean(ones, 2), ones)  # in-image pixels only: a constant stays constant
    assert ops.box_mean(torch.arange(25.0).reshape(5, 5), 1)[0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert ops.device_type(x) == "cpu"
    g1, g2 = ops.generator(4), ops.generator(4)
    a = ops.random((3, 4), g1, x, normal=True)
    assert a.dtype == torch.float64 and torch.equal(a, ops.random((3, 4), g2, x, normal=True))
    assert not torch.equal(ops.random((3, 4), g1, x, normal=True), a)  # a stream: the next draws differ
    assert torch.equal(a, torch.randn(3, 4, generator=torch.Generator().manual_seed(4)).double())

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4 * 7 * 6, 2)  # defined first, runs last
            self.unused = torch.nn.Linear(1, 1)
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())

        def forward(self, x):
            return self.head(self.stem(x).flatten(1))

    net = Net()
    bk = base.get_backend(net)
    assert bk.layer_order(net, x[:1].float()) == ["stem.0", "head"]  # run order; modules that never run left out
    assert not any(m._forward_pre_hooks for m in net.modules())
    copy = bk.randomized_copy(net, [], 0)
    bk.reinitialise_layers(copy, ["head", "stem.0"], 7)
    again = bk.randomized_copy(net, ["head", "stem.0"], 7)
    assert all(torch.equal(p, q) for p, q in zip(copy.parameters(), again.parameters()))
    assert not torch.equal(copy.head.weight, net.head.weight) and torch.equal(copy.unused.weight, net.unused.weight)
    with pytest.raises(camlens.errors.LayerError, match="no layer named"):
        bk.reinitialise_layers(copy, ["nope"], 0)
