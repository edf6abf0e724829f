"""Fast paths of issue 6: one-pass upsample+normalise, mixed precision, channels_last inputs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import camlens
from camlens import postprocess as P


def _two_step(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return P.normalize(F.interpolate(m, size=size, mode="bilinear", align_corners=False), warn=False)


SIZES = [((7, 7), (224, 224)), ((14, 14), (224, 224)), ((7, 10), (225, 333)), ((3, 5), (17, 4)),
         ((1, 5), (30, 30)), ((50, 40), (20, 10)), ((2, 2), (64, 64))]


@pytest.mark.parametrize("src,dst", SIZES)
def test_upsample_matches_interpolate(src, dst):
    torch.manual_seed(0)
    m = torch.randn(2, 3, *src)
    ref = F.interpolate(m, size=dst, mode="bilinear", align_corners=False)
    assert (P.upsample(m, dst) - ref).abs().max() < 2e-6 * (1 + m.abs().max())


@pytest.mark.parametrize("fused", [True, False])  # both paths, whatever the size threshold between them
@pytest.mark.parametrize("src,dst", SIZES)
def test_upsample_normalize_equals_two_steps_with_exact_extremes(src, dst, fused, monkeypatch):
    monkeypatch.setattr(P, "FUSED_MIN_PIXELS", 0 if fused else 1 << 62)
    torch.manual_seed(1)
    for k in range(10):
        m = torch.randn(2, 3, *src).clamp_min(0) if k % 2 else torch.rand(2, 3, *src) ** 4
        ours = P.upsample_normalize(m, dst, warn=False)
        assert ours.shape == (2, 3, *dst)
        assert (ours - _two_step(m, dst)).abs().max() < 3e-6
        flat = ours.flatten(-2)
        live = m.flatten(-2).amax(-1) > m.flatten(-2).amin(-1)  # constant maps come back all zero
        assert (flat.amax(-1)[live] == 1).all() and (flat.amin(-1) == 0).all()  # exactly, not 1 - 6e-8
        assert (flat.amax(-1)[~live] == 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_upsample_normalize_constant_maps_are_zero_with_warning(fused, monkeypatch):
    monkeypatch.setattr(P, "FUSED_MIN_PIXELS", 0 if fused else 1 << 62)
    m = torch.zeros(1, 3, 7, 7)
    m[0, 1] = 3.0
    m[0, 2] = torch.rand(7, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = P.upsample_normalize(m, (50, 60))
    assert torch.isfinite(out).all() and out[0, :2].abs().max() == 0 and out[0, 2].max() == 1
    assert any("2 of 3 maps are constant" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_maps_plain_path_equals_general_path(dtype):
    """Up to SMALL_MAP_COUNT plain maps are min-maxed as ``(t - lo) / (hi - lo)``: the same maps as
    the general scale-free path (to float rounding) at magnitudes 1e-30 ... 1e20, extremes exactly 0
    and 1; constant, non-finite and extreme-magnitude maps are left to the general path."""
    torch.manual_seed(2)
    scales = torch.tensor([1.0, 1e-11, 1e-30, 1e20, 3.0, 1e-3], dtype=torch.float64).view(1, 6, 1, 1)
    m = ((torch.rand(2, 6, 7, 9, dtype=torch.float64) - 0.25) * scales).to(dtype)
    flat = m.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    got = P._min_max_few(flat, lo, hi, True)
    assert got is not None and not got[1].any()
    old_count, P.SMALL_MAP_COUNT = P.SMALL_MAP_COUNT, 0
    try:
        ref, ref_const = P._min_max(flat, lo, hi, True)
    finally:
        P.SMALL_MAP_COUNT = old_count
    assert got[0].dtype == dtype and not ref_const.any()
    assert (got[0] - ref).abs().max() <= 8 * torch.finfo(dtype).eps
    assert (got[0].amax(-1) == 1).all() and (got[0].amin(-1) == 0).all()
    for bad in (0.0, 5.0, float("inf"), float("nan")):  # all-zero, constant, non-finite
        c = flat.clone()
        c[1, 2] = bad
        assert P._min_max_few(c, c.amin(-1, keepdim=True), c.amax(-1, keepdim=True), False) is None
    tiny = flat * 1e-300 if dtype == torch.float64 else flat * 1e-36  # spans near underflow
    assert P._min_max_few(tiny, tiny.amin(-1, keepdim=True), tiny.amax(-1, keepdim=True), False) is None
    half = flat.half().clamp(-100, 100)
    assert P._min_max_few(half, half.amin(-1, keepdim=True), half.amax(-1, keepdim=True), False) is None


def test_constant_and_graph_maps_take_the_general_path():
    m = torch.rand(1, 3, 5, 5)
    m[0, 1, 0, 0] = float("inf")
    m[0, 2] = 0.0
    with pytest.warns(RuntimeWarning, match="2 of 3 maps are constant: 1 have no positive evidence"):
        out = P.normalize(m)
    assert out[0, 0].max() == 1 and (out[0, 1:] == 0).all()
    g = torch.rand(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: P.normalize(t), (g,))  # min and max stay in the graph


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


# about 10 ulps of each format's epsilon (fp16 9.8e-4, bf16 7.8e-3): CPUs differ in their half kernels
@pytest.mark.parametrize("precision,tol", [("fp16", 1e-2), ("bf16", 5e-2)])
@pytest.mark.parametrize("method", ["gradcam", "cam", "layercam"])
def test_half_precision_maps_match_fp32(resnet18, precision, tol, method):
    torch.manual_seed(2)
    # measured: fp16 max diff 2.0e-3 (5.8e-3 on a CPU with AVX512-FP16 / AMX), bf16 2.6e-2; correlation >= 0.9998
    x = torch.randn(2, 3, 224, 224)
    ref = camlens.explain(resnet18, x, targets=[1, 4], layer="layer4", method=method)
    half = camlens.explain(resnet18, x, targets=[1, 4], layer="layer4", method=method, precision=precision)
    assert half.maps.dtype == torch.float32 and half.scores.dtype == torch.float32
    assert (half.maps - ref.maps).abs().max() < tol
    assert (half.scores - ref.scores).abs().max() < 20 * tol * ref.scores.abs().max()
    corr = torch.corrcoef(torch.stack([half.maps.flatten(), ref.maps.flatten()]))[0, 1]
    assert corr > 0.999
    assert all(p.dtype == torch.float32 for p in resnet18.parameters())  # the model is not cast


def test_precision_is_validated(resnet18):
    with pytest.raises(ValueError, match="fp32.*fp16.*bf16"):
        camlens.explain(resnet18, torch.randn(1, 3, 64, 64), targets=1, precision="half")
    with pytest.raises(ValueError, match="channels_last"):
        camlens.explain(resnet18, torch.randn(1, 3, 64, 64), targets=1, channels_last="yes")


class _Recorder(nn.Module):
    """A small conv net that records the memory layout of every input batch it sees."""

    def __init__(self, view_input: bool = False):
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.fc = nn.Linear(8, 5)
        self.view_input = view_input
        self.layouts: list[tuple[int, bool]] = []

    def forward(self, x):
        self.layouts.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] > 1))
        if self.view_input:
            x = x.view(x.shape[0], -1).view(x.shape)  # breaks on NHWC memory
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_channels_last_auto_for_batched_forwards_on_cpu_same_maps():
    model = _Recorder()
    x = torch.randn(1, 3, 16, 16)
    auto = camlens.explain(model, x, targets=[0, 2], layer="features.1", method="scorecam", batch_size=4)
    seen = model.layouts[:]
    assert seen[0] == (1, False)  # the batch-1 forward stays NCHW
    assert all(cl for n, cl in seen[1:] if n > 1) and any(n > 1 for n, _ in seen[1:])
    model.layouts.clear()
    nchw = camlens.explain(model, x, targets=[0, 2], layer="features.1", method="scorecam", batch_size=4,
                           channels_last=False)
    assert not any(cl for _, cl in model.layouts)
    assert (auto.maps - nchw.maps).abs().max() < 1e-5
    assert all(p.is_contiguous() for p in model.parameters())  # weights never converted


def test_channels_last_auto_falls_back_for_models_that_view_their_input():
    model = _Recorder(view_input=True)
    x = torch.randn(1, 3, 16, 16)
    ref = camlens.explain(model, x, targets=1, layer="features.1", method="scorecam", batch_size=4,
                          channels_last=False)
    auto = camlens.explain(model, x, targets=1, layer="features.1", method="scorecam", batch_size=4)
    assert torch.allclose(auto.maps, ref.maps, atol=1e-6)
    with pytest.raises(RuntimeError, match="view"):
        camlens.explain(model, torch.randn(2, 3, 16, 16), targets=1, layer="features.1", channels_last=True)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.a, self.b = nn.Linear(6, 7), nn.Linear(6, 3)

    def forward(self, x):
        f = self.features(x).mean(dim=(2, 3))
        return {"a": self.a(f), "b": self.b(f)}


def test_all_class_targets_scored_by_gather_equal_the_logits_and_probs():
    model = _TwoHeads().eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        out = model(x)
    exp = camlens.explain(model, x, targets="a:all", layer="features.1", method="cam")
    assert torch.allclose(exp.scores, out["a"], atol=1e-6) and torch.allclose(exp.probs, out["a"].softmax(1))
    mixed = [["a:6", "b:0", "a:1"], ["b:2", "a:0", "b:1"]]  # per image, heads interleaved
    exp = camlens.explain(model, x, targets=mixed, layer="features.1", method="cam")
    want = torch.tensor([[out["a"][0, 6], out["b"][0, 0], out["a"][0, 1]],
                         [out["b"][1, 2], out["a"][1, 0], out["b"][1, 1]]])
    assert torch.allclose(exp.scores, want, atol=1e-6)
    probs = torch.tensor([[out["a"].softmax(1)[0, 6], out["b"].softmax(1)[0, 0], out["a"].softmax(1)[0, 1]],
                          [out["b"].softmax(1)[1, 2], out["a"].softmax(1)[1, 0], out["b"].softmax(1)[1, 1]]])
    assert torch.allclose(exp.probs, probs)
    grad = camlens.explain(model, x, targets=mixed, layer="features.1", method="gradcam")
    for b in range(2):  # each map equals the single-target map of the same head and class
        for t, tg in enumerate(mixed[b]):
            one = camlens.explain(model, x[b:b + 1], targets=tg, layer="features.1", method="cam")
            assert torch.allclose(exp.maps[b, t], one.maps[0, 0], atol=1e-6)
            one_g = camlens.explain(model, x[b:b + 1], targets=tg, layer="features.1", method="gradcam")
            assert torch.allclose(grad.maps[b, t], one_g.maps[0, 0], atol=1e-5)


def test_batchnorm_folded_copy_for_score_only_forwards(resnet18):
    from camlens.backends.torch import Layout, Runner

    x = torch.randn(4, 3, 64, 64)
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    layout = Layout(resnet18)
    out = layout.run(x, score_only=True)
    assert layout._folded is not False and not any(
        isinstance(m, nn.BatchNorm2d) for m in layout._folded.modules())  # the copy has no BatchNorm left
    with torch.no_grad():
        ref = resnet18(x)
    assert (out - ref).abs().max() < 1e-4 * (1 + ref.abs().max())
    assert all(torch.equal(v, resnet18.state_dict()[k]) for k, v in before.items())  # model untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet18.modules())
    # not folded: a hook on the model, training mode, fold_bn=False, batch of one
    h = resnet18.layer1.register_forward_hook(lambda *a: None)
    try:
        hooked = Layout(resnet18)
        hooked.run(x, score_only=True)
        assert hooked._folded is False
    finally:
        h.remove()
    off = Layout(resnet18, fold_bn=False)
    off.run(x, score_only=True)
    assert off._folded is False
    single = Layout(resnet18)
    single.run(x[:1], score_only=True)
    assert single._folded is None
    train = Layout(copy.deepcopy(resnet18).train())  # a copy: train-mode forwards update BN statistics
    train.run(x, score_only=True)
    assert train._folded is False
    runner = Runner(resnet18, lambda o, b: o[:, [3, 7]])
    assert torch.allclose(runner.scores(x, 0, batch_size=2), ref[:, [3, 7]], atol=1e-4)


def test_scorecam_same_map_with_and_without_folding(resnet18):
    import camlens.backends.torch.layout as backend  # (where the folding lives)

    x = torch.randn(1, 3, 64, 64)
    fast = camlens.explain(resnet18, x, targets=[3, 9], layer="layer3", method="scorecam")
    orig = backend._fold_batchnorm
    backend._fold_batchnorm = lambda *a: False
    backend._FOLDS.clear()  # (the copy of the first call is kept for the next calls)
    try:
        plain = camlens.explain(resnet18, x, targets=[3, 9], layer="layer3", method="scorecam")
    finally:
        backend._fold_batchnorm = orig
        backend._FOLDS.clear()
    assert (fast.maps - plain.maps).abs().max() < 1e-4


def test_batchnorm_folded_copy_is_kept_across_calls_until_the_model_changes(resnet18):
    import camlens.backends.torch.layout as backend
    from camlens.backends.torch import Layout

    model = copy.deepcopy(resnet18)
    x = torch.randn(3, 3, 32, 32)
    assert model not in backend._FOLDS
    first = Layout(model)
    first.run(x, score_only=True)
    second = Layout(model)
    second.run(x, score_only=True)
    assert first._folded is not False and second._folded is first._folded  # built once
    with torch.no_grad():
        model.fc.weight.mul_(2.0)  # in place: a new version of the tensor
    changed = Layout(model)
    out = changed.run(x, score_only=True)
    assert changed._folded is not first._folded
    with torch.no_grad():
        ref = model(x)
    assert (out - ref).abs().max() < 1e-4 * (1 + ref.abs().max())  # the copy follows the new weights
    h = model.layer2.register_forward_hook(lambda *a: None)
    try:
        hooked = Layout(model)
        hooked.run(x, score_only=True)
        assert hooked._folded is False  # a hook added since: the model itself runs
    finally:
        h.remove()
    again = Layout(model)
    again.run(x, score_only=True)
    assert again._folded is not False
    model.eval()  # (mode unchanged: the copy stays)
    assert Layout(model)._inference_model(x) is again._folded
    model.layer1.train()
    assert Layout(model)._inference_model(x) is model  # a module in training mode: not folded
    model.eval()
    assert model in backend._FOLDS
    n = len(backend._FOLDS)
    del model, first, second, changed, hooked, again
    import gc

    gc.collect()
    assert len(backend._FOLDS) == n - 1  # the copy went with its model


# ---- the per-call fast paths of the overhead case (benchmarks: tiny-cnn-overhead)

@pytest.mark.parametrize("shape,size", [((1, 1, 16, 16), (64, 64)), ((16, 16), (40, 50)), ((1, 7, 7), (9, 9)),
                                        ((1, 1, 1, 5, 5), (10, 10)), ((2, 3, 7, 7), (30, 31))])
def test_resize_of_one_map_and_of_many_match_interpolate(shape, size):
    from camlens.backends.torch.ops import TorchOps

    m = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = TorchOps().resize(m, size)
    ref = F.interpolate(m.reshape(-1, 1, *shape[-2:]), size=size, mode="bilinear", align_corners=False)
    assert got.shape == (*shape[:-2], *size)
    assert (got - ref.reshape(got.shape)).abs().max() < 2e-6 * (1 + m.abs().max())
    flat = m.reshape(-1, *shape[-2:])  # one map alone (2-D products) = the same map in a batch of two
    pair = TorchOps().resize(torch.stack([flat[0], flat[0]]), size)
    assert torch.allclose(TorchOps().resize(flat[:1], size)[0], pair[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_map_min_max_on_host_scalars_is_bit_equal_to_the_tensor_formula(dtype):
    t = torch.rand(1, 1, 4096, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 3 - 1
    lo, hi = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
    out, const = P._min_max_few(t, lo, hi, True)
    assert torch.equal(out, (t - lo) / (hi - lo)) and not bool(const.any())
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0


def test_xp_clip_is_clamp_for_float_bounds_and_the_compat_rules_otherwise():
    from array_api_compat import torch as compat

    from camlens.backends.torch import xp

    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    for lo, hi in [(0, None), (None, 1.0), (-1, 1), (0.25, 0.25)]:
        assert torch.equal(xp.clip(x, min=lo, max=hi), compat.clip(x, min=lo, max=hi))
    nan = float("nan")
    assert bool(xp.clip(x, min=nan).isnan().all())  # a NaN bound: the compat rule (all NaN), not clamp's
    i = torch.tensor([-5, 0, 300], dtype=torch.int16)
    assert torch.equal(xp.clip(i, min=-1, max=10**6), compat.clip(i, min=-1, max=10**6))
    assert xp.clip(x, min=0) is not x


def test_xp_fast_paths_skip_the_compat_wrappers_and_agree_with_them(monkeypatch):
    """The per-call reductions and clip of the torch namespace call torch directly (the compat
    namespace also exports ``int``/``float`` dtypes that once shadowed the built-ins in the bound
    test, so every clip went through the wrapper), and give the compat numbers in every case."""
    from array_api_compat import torch as compat

    from camlens.backends.torch import xp

    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    want = {(name, axis, keep): getattr(compat, name)(x, axis=axis, keepdims=keep)
            for name in ("sum", "mean", "max", "min") for axis in (None, 1, (2, 3), (), -1) for keep in (False, True)}
    want_clip = [compat.clip(x, min=lo, max=hi) for lo, hi in [(0, None), (None, 1.0), (-1, 1)]]
    for name in ("sum", "mean", "max", "min", "clip"):  # the fast paths never reach the wrappers
        monkeypatch.setattr(xp._compat, name, lambda *a, _n=name, **k: pytest.fail(f"compat {_n} called"))
    for lo_hi, w in zip([(0, None), (None, 1.0), (-1, 1)], want_clip):
        assert torch.equal(xp.clip(x, min=lo_hi[0], max=lo_hi[1]), w)
    for (name, axis, keep), w in want.items():
        if axis == () or (axis is None and keep and name in ("sum", "mean")):
            continue  # the wrappers' own cases
        got = getattr(xp, name)(x, axis=axis, keepdims=keep)
        assert got.shape == w.shape and torch.allclose(got, w, atol=1e-6, rtol=0), (name, axis, keep)
    monkeypatch.undo()
    for (name, axis, keep), w in want.items():  # and the wrappers' cases still give their numbers
        got = getattr(xp, name)(x, axis=axis, keepdims=keep)
        assert got.shape == w.shape and torch.allclose(got, w, atol=1e-6, rtol=0), (name, axis, keep)
    i = torch.arange(6).reshape(2, 3)
    assert torch.equal(xp.sum(i), compat.sum(i)) and xp.sum(i).dtype == compat.sum(i).dtype


def test_probabilities_are_computed_on_first_read_and_kept():
    from camlens.core.explanation import Deferred
    from camlens.core.targets import target_probabilities

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    exp = camlens.explain(model, x, targets=[1, 3], layer="1")
    assert isinstance(exp.__dict__["_probs"], Deferred)  # nothing computed yet
    want = torch.softmax(model(x), 1)[:, [1, 3]]
    assert torch.allclose(exp.probs, want, atol=1e-6)
    assert exp.probs is exp.probs and not isinstance(exp.__dict__["_probs"], Deferred)
    assert torch.equal(exp.probs, target_probabilities(exp.targets, exp.heads))
    one = camlens.explain(model, x, targets=[1, 3], layer="1").image(1)  # replace() reads it through the property
    assert torch.allclose(one.probs, want[1:], atol=1e-6)
    exp.probs = torch.zeros(2, 2)  # a plain field to set
    assert float(exp.probs.abs().sum()) == 0.0


def test_session_module_walk_is_modules_in_order_with_shared_modules_once():
    from camlens.backends.torch.state import all_modules

    shared = nn.Conv2d(3, 3, 1)
    inner = nn.Sequential(shared, nn.ReLU(), nn.Sequential(nn.Identity(), shared))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), inner, shared, nn.ModuleDict({"a": inner, "b": nn.Linear(2, 2)}))
    model.add_module("none", None)
    want = list(model.modules())
    got = all_modules(model)
    assert len(want) == 9 and [id(m) for m in got] == [id(m) for m in want]


def test_one_map_normalize_is_the_general_formula_and_falls_back_on_constant_maps():
    m = torch.rand(1, 1, 9, 7, generator=torch.Generator().manual_seed(3)) * 5 - 2
    lo, hi = float(m.min()), float(m.max())
    out = P.normalize(m)
    assert torch.equal(out, (m - lo) / (hi - lo)) and float(out.max()) == 1.0 and float(out.min()) == 0.0
    assert torch.equal(P.normalize(m[0, 0]), out[0, 0])  # (H, W) too
    many = P.normalize(torch.cat([m, m], 1))  # the batched path: the same numbers
    assert torch.allclose(many[:, :1], out, atol=1e-6, rtol=0)
    with pytest.warns(RuntimeWarning, match="constant"):
        z = P.normalize(torch.full((1, 1, 4, 4), 3.0))
    assert float(z.abs().max()) == 0.0
    n = P.normalize(np.asarray(m.numpy(), dtype=np.float64))
    assert np.allclose(n, out.double().numpy(), atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "scorecam"])
def test_a_call_leaves_no_reference_cycles(method):
    """What a call allocates is freed by reference counting when the result is dropped: no cycle
    of camlens' own waits for the garbage collector, and none holds an array (activations,
    gradients, maps). (torch's vmap leaves a few cycles of its pytree helpers, without arrays.)"""
    import gc
    import os

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    camlens.explain(model, x, targets=[1, 3], layer="1", method=method)  # warm: lazy imports, caches
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        exp = camlens.explain(model, x, targets=[1, 3], layer="1", method=method)
        assert exp.maps.shape == (2, 2, 16, 16)
        del exp
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    root = os.path.dirname(camlens.__file__)
    ours = [o for o in garbage if callable(o) and getattr(getattr(o, "__code__", None), "co_filename", "").startswith(root)]
    assert not ours, f"reference cycles through camlens functions: {ours}"
    assert not [o for o in garbage if isinstance(o, (torch.Tensor, nn.Module))]


# ---- capture inside the layer's forward (no Module.__call__ hook path) where a hook would do the same

def _tap_module():
    from importlib import import_module

    return import_module("camlens.backends.torch.capture")


def test_forward_tap_gives_the_hooks_maps_and_leaves_every_module_as_it_was(monkeypatch):
    cap = _tap_module()
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    tapped = []
    orig_tap = cap._ForwardTap

    class Spy(orig_tap):
        def __init__(self, module, hook):
            tapped.append(module)
            super().__init__(module, hook)

    monkeypatch.setattr(cap, "_ForwardTap", Spy)
    fast = camlens.explain(model, x, targets=[1, 4], layer=["layer3", "layer4.1"], method="gradcampp")
    assert [id(m) for m in tapped] == [id(model.layer3), id(model.layer4[1])]
    monkeypatch.setattr(cap, "_can_tap", lambda *a: False)  # the hook path
    hooked = camlens.explain(model, x, targets=[1, 4], layer=["layer3", "layer4.1"], method="gradcampp")
    assert torch.equal(fast.maps, hooked.maps) and torch.equal(fast.scores, hooked.scores)
    for n, m in model.named_modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
        assert m.__dict__.keys() == before[n].keys()


def test_forward_tap_is_removed_when_the_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            f = self.conv(x)
            raise ValueError("after the layer")

    model = Boom().eval()
    with pytest.raises(ValueError, match="after the layer"):
        camlens.explain(model, torch.randn(1, 3, 16, 16), targets=[0], layer="conv")
    assert "forward" not in model.conv.__dict__ and not model.conv._forward_hooks


def test_layers_with_user_hooks_scripted_or_replicated_are_captured_by_hooks():
    cap = _tap_module()
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4)).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert cap._can_tap(model, "1", model[1])
    plain = camlens.explain(model, x, targets=[2], layer="1")
    h = model[1].register_forward_hook(lambda m, i, o: o * 2.0)  # the user's hook changes the output
    try:
        assert not cap._can_tap(model, "1", model[1])
        doubled = camlens.explain(model, x, targets=[2], layer="1")
        # camlens sees the output after the user's hook, as a hook registered after it does
        assert torch.allclose(doubled.raw, 2.0 * plain.raw, rtol=1e-5, atol=1e-6)
        assert list(model[1]._forward_hooks.values())[0] is not None and len(model[1]._forward_hooks) == 1
    finally:
        h.remove()
    dp = nn.DataParallel(model)  # replicas copy modules per call: hooks
    assert not cap._can_tap(dp, "module.1", dp.module[1])
    assert torch.equal(camlens.explain(dp, x, targets=[2], layer="module.1").maps, plain.maps)
    scripted = nn.Sequential(torch.jit.script(nn.Conv2d(3, 6, 3, padding=1)), nn.ReLU())
    assert not cap._can_tap(scripted, "0", scripted[0])
