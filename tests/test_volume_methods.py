"""Perturbation, input-gradient and baseline methods on volumes and clips (B, C, D, H, W): Ablation-CAM,
occlusion, guided backprop, Guided Grad-CAM, the random / centre baselines and test-time augmentation,
each against the formula computed by hand on a small 3-D CNN."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.core.errors import ConfigError
from reference import acts_grads, forward_capturing
from test_volumes import Med3d, _vol


@pytest.fixture
def med():
    torch.manual_seed(0)
    net = Med3d().double().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _scores_with(net: nn.Module, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The model's outputs with ``layer``'s output replaced by ``out`` (a forward hook)."""
    with torch.no_grad():
        return forward_capturing(net, layer, x.expand(out.shape[0], *x.shape[1:]), replace=out)[0]


def test_ablationcam_on_volumes_equals_the_formula(med):
    """raw[t] = sum_c (S - S_c) / S * A_c with channel c of the (C, d, h, w) layer set to 0 (the layer
    is post-ReLU: pytorch-grad-cam's ablation value is 0), each S_c from a forward with the layer replaced."""
    x = _vol(2)
    exp = camlens.explain(med, x, targets=[0, 2], method="ablationcam", layer="features.8", batch_size=3)
    assert exp.raw.shape == (2, 2, 8, 16, 16) and exp.maps.shape == (2, 2, 16, 32, 32)
    layer = med.features[8]
    for b in range(2):
        a, _ = acts_grads(med, layer, x[b:b + 1], [0])
        with torch.no_grad():
            S = med(x[b:b + 1])[0]
        copies = a.repeat(a.shape[1], 1, 1, 1, 1)  # (C, C, d, h, w): copy c has channel c ablated
        for c in range(a.shape[1]):
            copies[c, c] = 0
        Sc = _scores_with(med, layer, x[b:b + 1], copies)  # (C, K)
        for t, cls in enumerate([0, 2]):
            w = (S[cls] - Sc[:, cls]) / S[cls]
            ref = (w[:, None, None, None] * a[0]).sum(0)
            err = (exp.raw[b, t].double() - ref).abs().max().item()
            assert err < 1e-5 * ref.abs().max().item(), (b, t, err)


def test_ablationcam_on_volumes_with_ratio_ablates_fewer_channels(med):
    """ratio < 1 ranks channels over all d*h*w positions: fewer forwards, a different but finite map."""
    x = _vol(1)
    full = camlens.explain(med, x, targets=0, method="ablationcam", layer="features.8")
    part = camlens.explain(med, x, targets=0, method="ablationcam", layer="features.8", ratio=0.25)
    assert torch.isfinite(part.raw).all() and not torch.allclose(part.raw, full.raw)


def _occlusion_by_hand(net: nn.Module, x: torch.Tensor, cls: int, patch: tuple, stride: tuple,
                       fill: float = 0.0) -> torch.Tensor:
    """captum's window rule per axis, one window at a time: the average drop over covering boxes."""
    D, H, W = x.shape[-3:]
    starts = [list(range(0, max(n - k, 0) + s, s))[: -(-(n - k) // s) + 1] for n, k, s in zip((D, H, W), patch, stride)]
    total = torch.zeros(D, H, W, dtype=torch.float64)
    count = torch.zeros(D, H, W, dtype=torch.float64)
    with torch.no_grad():
        base = net(x)[0, cls]
        for z, y, xx in itertools.product(*starts):
            occ = x.clone()
            sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(xx, xx + patch[2]))
            occ[(0, slice(None), *sl)] = fill
            total[sl] += base - net(occ)[0, cls]
            count[sl] += 1
    assert (count > 0).all()
    return total / count


@pytest.mark.parametrize("patch,stride", [((4, 8, 8), (2, 4, 4)), ((3, 5, 6), (3, 5, 6)), ((2, 6, 5), (1, 4, 3))])
def test_occlusion_on_volumes_equals_the_window_loop(med, patch, stride):
    x = _vol(1)[..., :8, :12, :12]
    exp = camlens.explain(med, x, targets=1, method="occlusion", patch=patch, stride=stride, batch_size=7)
    ref = _occlusion_by_hand(med, x, 1, patch, stride)
    assert exp.raw.shape == (1, 1, 8, 12, 12) and exp.maps.shape == (1, 1, 8, 12, 12)
    err = (exp.raw[0, 0].double() - ref).abs().max().item()
    assert err < 1e-5 * ref.abs().max().item(), err


def test_occlusion_matches_captum_on_a_volume(med):
    """captum's Occlusion with a (C, kd, kh, kw) window: its attribution (the same in every channel) is
    camlens' raw map."""
    captum = pytest.importorskip("captum.attr")
    x = _vol(1)[..., :8, :12, :12]
    exp = camlens.explain(med, x, targets=2, method="occlusion", patch=(4, 6, 6), stride=(2, 3, 3))
    ref = captum.Occlusion(med).attribute(x, target=2, sliding_window_shapes=(1, 4, 6, 6), strides=(1, 2, 3, 3),
                                          baselines=0.0)
    err = (exp.raw[0, 0].double() - ref[0, 0]).abs().max().item()
    assert err < 1e-5 * ref.abs().max().item(), err


def test_occlusion_int_patch_on_a_short_clip_covers_all_frames(med):
    """An int patch k is the box min(k, D) x k x k: a default patch of 16 on a 4-frame clip is one window
    along time; a pair is refused for a volume, naming the triple."""
    x = _vol(1)[..., :4, :, :]  # (1, 1, 4, 32, 32)
    exp = camlens.explain(med, x, targets=0, method="occlusion", patch=16)
    ref = _occlusion_by_hand(med, x, 0, (4, 16, 16), (2, 8, 8))
    assert ref.std() > 0
    assert (exp.raw[0, 0].double() - ref).abs().max() < 1e-5 * ref.abs().max()
    with pytest.raises(ConfigError, match=r"\(d, h, w\)"):
        camlens.explain(med, x, targets=0, method="occlusion", patch=(4, 4))


def test_occlusion_blur_baseline_blurs_each_slice(med):
    from camlens.core.postprocess import gaussian_blur
    from camlens.methods.occlusion import occlusion_fill

    x = _vol(2)[..., :6, :16, :16]
    fill = occlusion_fill(x, "blur", 2.0)
    for d in range(6):
        assert torch.allclose(fill[:, :, d], gaussian_blur(x[:, :, d], (13, 13), 2.0), atol=1e-12)
    exp = camlens.explain(med, x, targets=0, method="occlusion", patch=(3, 8, 8), baseline="blur", blur_sigma=2.0)
    assert torch.isfinite(exp.maps).all() and exp.maps.shape == (2, 1, 6, 16, 16)


def _guided_by_hand(net: nn.Module, x: torch.Tensor, cls: int) -> torch.Tensor:
    """Guided backprop by module hooks (independent of camlens' dispatch mode): every nn.ReLU passes
    back only positive gradients where its input was positive."""
    hooks = [m.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp_min(0),))
             for m in net.modules() if isinstance(m, nn.ReLU)]
    try:
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xi)[:, cls].sum(), xi)
    finally:
        for h in hooks:
            h.remove()
    return g


def test_guided_backprop_on_volumes_equals_hooked_relus(med):
    x = _vol(2)
    exp = camlens.explain(med, x, targets=[1], method="guided_backprop")
    g = _guided_by_hand(med, x, 1)  # (B, C, D, H, W)
    assert exp.pixel.shape == (2, 1, 1, 16, 32, 32) and exp.maps.shape == (2, 1, 16, 32, 32)
    assert (exp.pixel[:, 0].double() - g).abs().max() < 1e-6 * g.abs().max()
    # maps: max_c |g|, capped at the 0.995 quantile of each whole volume, min-maxed per volume
    sal = g.abs().amax(1).float().flatten(1)
    cap = torch.quantile(sal, 0.995, dim=1, keepdim=True)
    sal = torch.minimum(sal, cap)
    want = (sal - sal.amin(1, keepdim=True)) / (sal.amax(1, keepdim=True) - sal.amin(1, keepdim=True))
    assert (exp.maps[:, 0].flatten(1) - want).abs().max() < 1e-5


@pytest.mark.parametrize("interpolate,mode", [("nearest", "nearest"), ("bilinear", "trilinear")])
def test_guided_gradcam_on_volumes_is_guided_times_upsampled_gradcam(med, interpolate, mode):
    x = _vol(1)
    exp = camlens.explain(med, x, targets=2, method="guided_gradcam", layer="features.8", interpolate=interpolate)
    a, gr = acts_grads(med, med.features[8], x, [2])
    cam = (gr.mean((2, 3, 4), keepdim=True) * a).sum(1, keepdim=True).clamp_min(0)  # (1, 1, d, h, w)
    kw = {"align_corners": False} if mode == "trilinear" else {}
    up = F.interpolate(cam, size=(16, 32, 32), mode=mode, **kw)
    want = _guided_by_hand(med, x, 2) * up  # (1, 1, D, H, W): one input channel
    assert (exp.pixel[0, 0].double() - want[0]).abs().max() < 1e-5 * want.abs().max()


def test_guided_gradcam_agrees_with_captum_on_a_volume(med):
    captum = pytest.importorskip("captum.attr")
    x = _vol(1)
    exp = camlens.explain(med, x, targets=0, method="guided_gradcam", layer="features.8")
    ref = captum.GuidedGradCam(med, med.features[8]).attribute(x, target=0)
    assert (exp.pixel[0, 0].double() - ref[0]).abs().max() < 1e-5 * ref.abs().max()


def test_center_baseline_on_volumes_is_a_separable_3d_gaussian(med):
    x = _vol(1)[..., :6, :8, :10]
    exp = camlens.explain(med, x, targets=[0, 1], method="center", sigma=0.3)
    z, y, w = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in (6, 8, 10))
    g = torch.exp(-(z[:, None, None] ** 2 / (2 * (0.3 * 6) ** 2) + y[None, :, None] ** 2 / (2 * (0.3 * 8) ** 2)
                    + w[None, None] ** 2 / (2 * (0.3 * 10) ** 2)))
    assert exp.raw.shape == (1, 2, 6, 8, 10)
    assert (exp.raw[0, 1].double() - g).abs().max() < 1e-6


def test_random_baseline_on_volumes_is_centred_over_the_whole_volume(med):
    """raw = sum_c w_c A_c minus its mean over all d*h*w positions (not per slice)."""
    x = _vol(1)
    exp = camlens.explain(med, x, targets=0, method="random", layer="features.8", random_seed=3)
    assert exp.raw.shape == (1, 1, 8, 16, 16)
    assert abs(exp.raw.double().mean().item()) < 1e-6 * exp.raw.abs().max().item()
    assert exp.raw[0, 0].double().mean((1, 2)).std() > 1e-3 * exp.raw.abs().max().item()  # slices differ
    other = camlens.explain(med, x, targets=0, method="random", layer="features.8", random_seed=4)
    assert not torch.allclose(exp.raw, other.raw)


def test_aug_smooth_on_volumes_averages_flipped_and_rescaled_maps_mapped_back(med):
    """Test-time augmentation of a volume: W-flip and x1.1 / x0.9 of H and W (D kept), each map mapped
    back (resized trilinearly, flipped back), the six averaged and min-maxed per volume."""
    x = _vol(1)
    exp = camlens.explain(med, x, targets=1, layer="features.8", aug_smooth=True)
    D, H, W = x.shape[-3:]
    total = torch.zeros(1, 1, D, H, W, dtype=torch.float64)
    for flip in (False, True):
        for s in (1.0, 1.1, 0.9):
            xa = x.flip(-1) if flip else x
            if s != 1.0:
                xa = F.interpolate(xa, size=(D, round(H * s), round(W * s)), mode="trilinear", align_corners=False)
            m = camlens.explain(med, xa, targets=1, layer="features.8").maps.double()
            m = F.interpolate(m, size=(D, H, W), mode="trilinear", align_corners=False) if s != 1.0 else m
            total += m.flip(-1) if flip else m
    flat = total.flatten(2)
    want = (flat - flat.amin(-1, keepdim=True)) / (flat.amax(-1, keepdim=True) - flat.amin(-1, keepdim=True))
    assert exp.maps.shape == (1, 1, D, H, W)
    assert (exp.maps.flatten(2).double() - want).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["ablationcam", "occlusion", "guided_backprop"])
def test_volume_methods_leave_the_model_as_it_came(med, method):
    med.train()
    med.features[0].weight.requires_grad_(False)
    med.fc.weight.grad = torch.ones_like(med.fc.weight)
    before = {k: v.clone() for k, v in med.state_dict().items()}
    kw = {"patch": (4, 8, 8)} if method == "occlusion" else {}
    camlens.explain(med, _vol(1), targets=0, method=method, **kw)
    assert med.training and all(m.training for m in med.modules())
    assert not med.features[0].weight.requires_grad and med.features[3].weight.requires_grad
    assert torch.equal(med.fc.weight.grad, torch.ones_like(med.fc.weight)) and med.features[3].weight.grad is None
    assert all(torch.equal(before[k], v) for k, v in med.state_dict().items())
    assert all(not m._forward_hooks and not m._backward_hooks for m in med.modules())


def test_numpy_nearest_resize_of_volumes_matches_interpolate():
    from camlens.backends.numpy import NumpyOps
    from camlens.backends.torch.ops import TorchOps

    m = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    for size in [(7, 5, 9), (2, 3, 4), (16, 32, 32)]:
        want = F.interpolate(m.reshape(1, -1, 4, 5, 6), size=size, mode="nearest").reshape(2, 3, *size)
        assert np.array_equal(NumpyOps().resize(m.numpy(), size, "nearest"), want.numpy())
        assert torch.equal(TorchOps().resize(m, size, "nearest"), want)


def test_layout_and_reshape_override_the_reading_of_a_volume_layer(med):
    """layout='nchw' / 'volume' reads a 3-D map as it is (the same raws as camlens' own reading); a
    reshape= function returning (B, C, d, h, w) (here: a channels-last copy permuted back) is read like
    one, its gradients alike; a wrong rank is a clear error."""
    x = _vol(1)
    own = camlens.explain(med, x, targets=[0, 1], layer="features.8")
    for lay in ("nchw", "volume", camlens.MapLayout("volume"), {"features.8": "nchw"}):
        same = camlens.explain(med, x, targets=[0, 1], layer="features.8", layout=lay)
        assert torch.equal(same.raw, own.raw)
    twice = camlens.explain(med, x, targets=[0, 1], layer="features.8", reshape=lambda a: a.flip(2).flip(2))
    assert torch.allclose(twice.raw, own.raw, atol=1e-7 * own.raw.abs().max().item())
    half = camlens.explain(med, x, targets=[0, 1], layer="features.8", reshape=lambda a: a[:, :, ::2])  # every 2nd slice
    a, g = acts_grads(med, med.features[8], x, [1])
    a, g = a[:, :, ::2], g[:, :, ::2]
    ref = (g.mean((2, 3, 4), keepdim=True) * a).sum(1)[0]
    assert half.raw.shape == (1, 2, 4, 16, 16)
    assert (half.raw[0, 1].double() - ref).abs().max() < 1e-5 * ref.abs().max()
    with pytest.raises(camlens.core.errors.LayerError, match=r"\(B, C, d, h, w\).*returned \(1, 8, 16, 16\)"):
        camlens.explain(med, x, targets=0, layer="features.8", reshape=lambda a: a[:, :, 0])
    with pytest.raises(ConfigError, match="does not read a volume layer"):
        camlens.explain(med, x, targets=0, layer="features.8", layout=camlens.MapLayout("reshape"))


def test_tokens_layout_of_a_volume_layer_takes_a_3d_grid():
    """A clip model whose layer emits tokens (B, 1 + t*h*w, C) camlens cannot place: layout= with the
    (t, h, w) grid reads it; the raws equal the hand-made reshape."""

    class ClipTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv3d(3, 6, (2, 4, 4), stride=(2, 4, 4))
            self.cls = nn.Parameter(torch.randn(1, 1, 6))
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (B, t*h*w, C)
            t = self.mix(torch.cat([self.cls.expand(len(t), 1, 6), t], 1)).relu()
            return self.head(t.mean(1))

    torch.manual_seed(0)
    net = ClipTokens().double().eval()
    x = torch.randn(1, 3, 4, 16, 16, dtype=torch.float64)
    grid = camlens.MapLayout("tokens", grid=(2, 4, 4), prefix=1)
    exp = camlens.explain(net, x, targets=2, layer="mix", layout=grid)
    a, g = acts_grads(net, net.mix, x, [2])
    read = lambda t: t[:, 1:].transpose(1, 2).reshape(1, 6, 2, 4, 4)  # noqa: E731
    ref = (read(g).mean((2, 3, 4), keepdim=True) * read(a)).sum(1)[0]
    assert exp.raw.shape == (1, 1, 2, 4, 4)
    assert (exp.raw[0, 0].double() - ref).abs().max() < 1e-5 * ref.abs().max()
    by_fn = camlens.explain(net, x, targets=2, layer="mix", reshape=read)
    assert torch.allclose(by_fn.raw, exp.raw)
    with pytest.raises(camlens.core.errors.LayerError, match=r"grid=\(t, h, w\)"):
        camlens.explain(net, x, targets=2, layer="mix", layout="tokens")
