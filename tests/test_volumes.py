"""Volumes and video clips (B, C, D, H, W): the gradient CAM family on 3-D maps, trilinear upsampling,
default layers of 3-D CNNs, refusals, model state, save / load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.backends.numpy import NumpyOps
from camlens.core.errors import CamlensError, ConfigError
from reference import acts_grads


class Med3d(nn.Module):
    """A small medical-style 3-D CNN: (Conv3d, BN, ReLU) x3, GAP, Linear."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
            nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
            nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3, 4)))


@pytest.fixture
def med():
    torch.manual_seed(0)
    net = Med3d().double().eval()
    for m in net.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _vol(b: int = 2, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _reference(name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Raw maps (B, d, h, w) by the papers' formulas over all (d, h, w) positions."""
    dims = (2, 3, 4)
    if name == "gradcam":
        w = g.mean(dims, keepdim=True)
        return (w * a).sum(1)
    if name == "gradcampp":
        g2, g3 = g ** 2, g ** 3
        alpha = g2 / (2 * g2 + a.sum(dims, keepdim=True) * g3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (alpha * g.clamp_min(0)).sum(dims, keepdim=True)
        return (w * a).sum(1)
    if name == "hirescam":
        return (g * a).sum(1)
    if name == "layercam":
        return (g.clamp_min(0) * a).sum(1)
    if name == "xgradcam":
        w = (g * a).sum(dims, keepdim=True) / (a.sum(dims, keepdim=True) + 1e-7)
        return (w * a).sum(1)
    raise AssertionError(name)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam", "layercam", "xgradcam"])
def test_raw_maps_equal_hand_computed_reference(med, method):
    x = _vol()
    exp = camlens.explain(med, x, targets=[1, 2], method=method, layer="features.8")
    assert exp.raw.shape == (2, 2, 8, 16, 16)
    # targets [1, 2] are both targets of each image: target t against the gradient of class t for all images
    for t, cls in enumerate([1, 2]):
        a_t, g_t = acts_grads(med, med.features[8], x, [cls, cls])
        ref_t = _reference(method, a_t, g_t)
        scale = ref_t.abs().max().item()
        assert scale > 0 and torch.isfinite(ref_t).all()
        err = (exp.raw[:, t] - ref_t).abs().max().item()
        assert err < 1e-5 * scale, (err, scale)  # camlens' raws are float32: ~3e-7 relative measured
    # final maps: ReLU, trilinear to (16, 32, 32) as F.interpolate, min-max over each whole volume
    up = F.interpolate(exp.raw.clamp_min(0).float(), size=(16, 32, 32), mode="trilinear", align_corners=False)
    flat = up.flatten(2)
    want = ((flat - flat.amin(-1, keepdim=True)) / (flat.amax(-1, keepdim=True) - flat.amin(-1, keepdim=True)))
    assert exp.maps.shape == (2, 2, 16, 32, 32)
    assert (exp.maps.flatten(2).double() - want.double()).abs().max() < 1e-5


def test_default_layer_is_the_last_3d_map(med):
    x = _vol(1)
    exp = camlens.explain(med, x, targets=0)
    assert exp.layers == ["features"] and exp.maps.shape == (1, 1, 16, 32, 32)
    assert exp.raw.shape == (1, 1, 8, 16, 16)
    assert "D=16" in repr(exp)


def test_gradcam_agrees_with_pytorch_grad_cam_on_raw_scale(med):
    """pytorch-grad-cam min-maxes per volume and then resizes with scipy.ndimage.zoom (cubic splines),
    camlens resizes trilinearly (as F.interpolate) and then min-maxes: so the maps at the layer's own
    grid (camlens upsample=False; pytorch-grad-cam with its target size set to that grid, a zoom by 1)
    are compared."""
    gc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = _vol()
    exp = camlens.explain(med, x, targets=[2], method="gradcam", layer="features.8", upsample=False)
    cam = gc.GradCAM(model=med, target_layers=[med.features[8]])
    cam.get_target_width_height = lambda t: (16, 16, 8)  # (W, H, D) of the layer: reversed to (D, H, W)
    with cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(2), ClassifierOutputTarget(2)])
    assert ref.shape == (2, 8, 16, 16)
    err = np.abs(exp.maps[:, 0].numpy() - ref).max()
    assert err < 2e-5, err


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "cam"])
def test_map_mass_lies_in_the_sub_volume_the_score_reads(method):
    """Ground truth: channel 0 is ReLU(x), channel 1 ReLU(-x); the score is the mean of channel 0
    over a known box, and the volume is positive there only: the map must sit in the box."""

    class Box(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1, bias=False)
            with torch.no_grad():
                self.conv.weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(2, 2)
            with torch.no_grad():
                self.fc.weight[:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
                self.fc.bias.zero_()

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3, 4)))

    torch.manual_seed(0)
    x = -torch.rand(1, 1, 8, 16, 16) - 0.1
    box = (slice(2, 6), slice(4, 10), slice(8, 14))
    x[(0, 0, *box)] = torch.rand(4, 6, 6) + 0.5
    exp = camlens.explain(Box(), x, targets=0, method=method, layer="act")
    m = exp.maps[0, 0]
    inside = m[box].sum() / m.sum()
    assert inside > 0.999, inside.item()


@pytest.mark.parametrize("method", ["attention_rollout", "attention_relevance", "drise"])
def test_methods_without_volume_support_are_refused_clearly(med, method):
    if method not in camlens.methods.available_methods():
        pytest.skip(f"{method} not registered")
    with pytest.raises(ConfigError, match=r"does not explain volumes.*gradcam"):
        camlens.explain(med, _vol(1), method=method)


def test_options_without_volume_support_are_refused(med):
    with pytest.raises(ConfigError, match="tile="):
        camlens.explain(med, _vol(1), tile=16)


def test_a_4d_layer_of_a_volume_input_is_a_clear_error(med):
    class Squash(nn.Module):  # (B, C, D, H, W) -> (B, C*D, H, W): not a 3-D map
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.flat = nn.Flatten(1, 2)

        def forward(self, x):
            return self.net.fc(self.flat(self.net.features(x)).mean((2, 3)).view(x.shape[0], 8, -1).mean(-1))

    with pytest.raises(CamlensError, match="5-D"):
        camlens.explain(Squash(med), _vol(1), layer="flat")


def test_model_state_restored(med):
    med.train()
    med.features[0].weight.requires_grad_(False)
    med.fc.weight.grad = torch.ones_like(med.fc.weight)
    hooks = [len(m._forward_hooks) for m in med.modules()]
    before = {k: v.clone() for k, v in med.state_dict().items()}
    camlens.explain(med, _vol(1), method="gradcampp")
    assert med.training and all(m.training for m in med.modules())
    assert not med.features[0].weight.requires_grad and med.features[3].weight.requires_grad
    assert torch.equal(med.fc.weight.grad, torch.ones_like(med.fc.weight))
    assert med.features[3].weight.grad is None
    assert [len(m._forward_hooks) for m in med.modules()] == hooks
    assert all(torch.equal(before[k], v) for k, v in med.state_dict().items())
    with pytest.raises(ConfigError):  # also after an error
        camlens.explain(med, _vol(1), method="attention_rollout")
    assert med.training and not med.features[0].weight.requires_grad


@pytest.mark.parametrize("size", [(16, 32, 32), (5, 7, 9), (3, 2, 4)])
def test_numpy_trilinear_resize_matches_interpolate(size):
    m = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    ref = F.interpolate(m, size=size, mode="trilinear", align_corners=False).numpy()
    ours = NumpyOps().resize(m.numpy(), size)
    assert ours.shape == (2, 3, *size) and np.abs(ours - ref).max() < 1e-12
    from camlens.backends.base import ops_for

    assert (ops_for(m).resize(m, size) - torch.from_numpy(ref)).abs().max() < 1e-12


def test_save_load_round_trip_of_volume_maps(med, tmp_path):
    exp = camlens.explain(med, _vol(2, torch.float32).to(torch.float64), targets=[0, 1])
    path = exp.save(tmp_path / "vol.npz")
    back = camlens.load(path)
    assert back.maps.shape == (2, 2, 16, 32, 32) and torch.equal(back.maps, exp.maps)
    assert back.raw.shape == (2, 2, 8, 16, 16) and torch.equal(back.raw, exp.raw)
    assert back.layers == exp.layers and back.labels == exp.labels


@pytest.mark.parametrize("arch", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_video_models_default_layer_is_layer4(arch):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(tv.models.video, arch)(weights=None).eval()
    x = torch.randn(1, 3, 8, 56, 56)
    exp = camlens.explain(net, x, targets=3)
    assert exp.layers == ["layer4"]
    # r3d_18 / r2plus1d_18 stride time by 8 (one frame left), mc3_18 keeps its 8 frames (2-D convs after the stem)
    assert exp.maps.shape == (1, 1, 8, 56, 56) and exp.raw.shape == (1, 1, 8 if arch == "mc3_18" else 1, 4, 4)
    assert float(exp.maps.max()) == 1.0


def test_one_volume_without_batch_axis_is_batch_one(med):
    x = _vol(1)
    one = camlens.explain(med, x[0], targets=1)
    full = camlens.explain(med, x, targets=1)
    assert one.maps.shape == (1, 1, 16, 32, 32) and torch.equal(one.maps, full.maps)
    from camlens.backends.base import get_backend

    bk = get_backend(med)
    assert bk.input_rank(med) == 5 and bk.input_rank(nn.Sequential(nn.Conv2d(3, 4, 3))) == 4
    assert bk.input_rank(nn.Linear(3, 4)) is None
    swapped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert bk.input_rank(swapped) == 4
    swapped[0] = nn.Conv3d(3, 4, 3)  # a first conv swapped in later is seen (the memo follows the modules)
    assert bk.input_rank(swapped) == 5


def test_viz_slice_grid_and_gif_have_the_right_frames(med, tmp_path):
    from PIL import Image

    exp = camlens.explain(med, _vol(2, torch.float32).double(), targets=[0, 2])
    assert camlens.viz.volume_slices(16, 4) == [2, 6, 10, 14] and camlens.viz.volume_slices(16, [0, -1]) == [0, 15]
    png = camlens.viz.volume_grid(exp, tmp_path / "grid.png", b=1, t=1, slices=6, cols=3, gap=2)
    with Image.open(png) as im:
        assert im.size == (3 * 32 + 2 * 2, 2 * 32 + 2)
    idx, tiles = camlens.viz.volume_overlays(exp.inputs[1], exp.maps[1, 1], [5])
    want = camlens.viz.overlay(np.repeat(((exp.inputs[1, 0, 5] - exp.inputs[1].min()) / (exp.inputs[1].max()
                                          - exp.inputs[1].min())).numpy()[..., None], 3, -1), exp.maps[1, 1, 5])
    assert idx == [5] and np.array_equal(tiles[0], want)
    gif = camlens.viz.volume_gif(exp, tmp_path / "clip.gif", b=0, t=0)
    with Image.open(gif) as im:
        assert im.n_frames == 16 and im.size == (32, 32)
    with pytest.raises(CamlensError, match="not volume maps"):
        camlens.viz.volume_grid(camlens.explain(_tiny2d(), torch.randn(1, 3, 16, 16)), tmp_path / "x.png")


def _tiny2d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_stream_yields_one_explanation_per_volume(med):
    x = _vol(3)
    full = camlens.explain(med, x, targets=1)
    out = list(camlens.stream(med, [x[0], x[1:3]], targets=1, batch_size=2))
    assert len(out) == 3 and all(e.maps.shape == (1, 1, 16, 32, 32) for e in out)
    for b, e in enumerate(out):
        assert (e.maps - full.maps[b:b + 1]).abs().max() < 1e-6


def test_image_only_metrics_and_image_grids_refuse_volumes_naming_what_to_use(med):
    x = _vol(1)
    exp = camlens.explain(med, x)
    with pytest.raises(ConfigError, match="images only.*volumes are .*deletion"):
        camlens.evaluate(med, x, exp, ["road_morf"])
    with pytest.raises(CamlensError, match="volume_grid"):
        camlens.viz.explanation_grid(exp)


def test_eigencam_is_pytorch_grad_cams_projection_over_the_whole_volume_up_to_sign(med):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    x = _vol()
    exp = camlens.explain(med, x, targets=0, method="eigencam", layer="features.5")
    a, _ = acts_grads(med, med.features[5], x, [0, 0])
    ref = torch.from_numpy(get_2d_projection(a.numpy()))  # (B, d, h, w): the SVD over all d*h*w positions
    assert exp.raw.shape == (2, 1, 8, 16, 16)
    for b in range(2):  # SVD's sign is arbitrary (camlens fixes it towards the channel sum)
        err = min((exp.raw[b, 0] - s * ref[b]).abs().max().item() for s in (1, -1))
        assert err < 1e-4 * ref[b].abs().max().item(), err


def test_two_layers_of_different_grids_fuse_as_for_images(med):
    x = _vol(1)
    exp = camlens.explain(med, x, targets=1, layer=["features.2", "features.8"], fuse="max")
    assert exp.raws["features.2"].shape == (1, 1, 16, 32, 32) and exp.raws["features.8"].shape == (1, 1, 8, 16, 16)

    def norm(m):
        f = m.flatten(1)
        return ((f - f.amin(1, keepdim=True)) / (f.amax(1, keepdim=True) - f.amin(1, keepdim=True))).view_as(m)

    per = [F.interpolate(norm(exp.raws[n][0].clamp_min(0))[None], size=(16, 32, 32), mode="trilinear",
                         align_corners=False)[0] for n in ["features.2", "features.8"]]
    want = norm(torch.maximum(per[0], per[1]))
    assert (exp.maps[0] - want).abs().max() < 1e-6


def test_differentiable_volume_maps_carry_the_graph_as_a_hand_written_create_graph_gradcam():
    class Smooth3d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(),
                                      nn.Conv3d(3, 4, 3, stride=2, padding=1), nn.Tanh())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3, 4)))

    torch.manual_seed(0)
    m = Smooth3d().double().train()
    x = torch.randn(1, 1, 6, 8, 8, dtype=torch.float64)
    R = torch.rand(1, 1, 6, 8, 8, dtype=torch.float64)
    exp = camlens.explain(m, x, targets=1, layer="body", differentiable=True)
    assert m.training and exp.maps.requires_grad
    (g_ours,) = torch.autograd.grad((exp.maps * R).sum(), m.body[0].weight)

    a = m.body(x)
    (g,) = torch.autograd.grad(m.head(a.mean((2, 3, 4)))[:, 1].sum(), a, create_graph=True)
    cam = (g.mean((2, 3, 4), keepdim=True) * a).sum(1, keepdim=True).clamp_min(0)
    up = F.interpolate(cam, size=(6, 8, 8), mode="trilinear", align_corners=False)
    ref = (up - up.min()) / (up.max() - up.min())
    assert exp.maps.dtype == torch.float64 and (exp.maps.detach() - ref.detach()).abs().max() < 1e-12
    (g_ref,) = torch.autograd.grad((ref * R).sum(), m.body[0].weight)
    assert (g_ours - g_ref).abs().max() < 1e-10 * g_ref.abs().max()  # float64 throughout: 0 measured


def test_noise_smoothing_of_volumes_averages_the_raws_of_noisy_copies(med):
    from camlens.backends.base import ops_for

    x = _vol(2)
    exp = camlens.explain(med, x, targets=[1], noise_smooth=3, noise_sigma=0.2, seed=5)
    ops = ops_for(x)
    noise = ops.random((6, *x.shape[1:]), ops.generator(5, x), x, normal=True)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(2, 1, 1, 1, 1)
    noisy = x.repeat(3, 1, 1, 1, 1) + noise * (0.2 * span).repeat(3, 1, 1, 1, 1)
    raws = camlens.explain(med, noisy, targets=[1]).raw  # (6, 1, d, h, w): copy i of volume b at i * 2 + b
    want = raws.view(3, 2, *raws.shape[1:]).mean(0)
    assert exp.raw.shape == (2, 1, 8, 16, 16)
    assert (exp.raw - want).abs().max() < 1e-6 * want.abs().max()
    assert (exp.raw - camlens.explain(med, x, targets=[1]).raw).abs().max() > 1e-3 * want.abs().max()


def test_a_volume_for_a_2d_model_is_a_clear_error():
    from camlens.core.errors import InputError

    with pytest.raises(InputError, match=r"first spatial layer is 2-D.*slices"):
        camlens.explain(_tiny2d(), torch.randn(1, 3, 4, 16, 16))


def test_scorecam_on_volumes_equals_the_formula(med):
    """Score-CAM on a volume: each channel of the (C, d, h, w) layer upsampled TRILINEARLY with
    align_corners=True to (D, H, W), min-maxed (eps 1e-8), masking the input; softmax over the channels
    of the target's scores on the masked inputs; raw = sum_c w_c A_c. By hand, channel by channel."""
    x = _vol(2)
    cls = [1, 2]
    exp = camlens.explain(med, x, targets=[[1], [2]], method="scorecam", layer="features.8", batch_size=3)
    assert exp.raw.shape == (2, 1, 8, 16, 16) and exp.maps.shape == (2, 1, 16, 32, 32)
    a, _ = acts_grads(med, med.features[8], x, cls)
    for b in range(2):
        up = F.interpolate(a[b:b + 1], size=x.shape[-3:], mode="trilinear", align_corners=True)[0]  # (C, D, H, W)
        flat = up.flatten(1)
        masks = (up - flat.min(1).values[:, None, None, None]) / (
            flat.max(1).values - flat.min(1).values + 1e-8)[:, None, None, None]
        with torch.no_grad():
            s = torch.stack([med(x[b:b + 1] * m[None, None])[0, cls[b]] for m in masks])  # (C,)
        w = torch.softmax(s, 0)
        ref = (w[:, None, None, None] * a[b]).sum(0)
        assert torch.allclose(exp.raw[b, 0].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), b


@pytest.mark.parametrize("size", [(16, 32, 32), (3, 2, 5)])
def test_corner_aligned_trilinear_resize_numpy_and_torch(size):
    """Score-CAM's masks: trilinear with align_corners=True, NumPy (separable) = torch = F.interpolate."""
    from camlens.backends.torch.ops import TorchOps

    m = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    want = F.interpolate(m[None], size=size, mode="trilinear", align_corners=True)[0]
    assert np.abs(NumpyOps().resize_corners(m.numpy(), size) - want.numpy()).max() < 1e-12
    assert (TorchOps().resize_corners(m, size) - want).abs().max() < 1e-12


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_volume_video_mp4_decodes_to_the_gif_frames(med, tmp_path, codec):
    """An MP4 of a clip of odd height: PyAV reads back one frame per slice, padded to even size, close to
    the overlays volume_gif writes (yuv420p halves the colour resolution, so not equal)."""
    av = pytest.importorskip("av")
    x = torch.randn(1, 1, 6, 15, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exp = camlens.explain(med, x, targets=[0, 2])
    path = camlens.viz.volume_video(exp, tmp_path / "sub" / "clip.mp4", t=1, fps=5, codec=codec)
    _, want = camlens.viz.volume_overlays(exp.inputs[0], exp.maps[0, 1])
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        # the decoder's name: h264 for libx264's stream
        assert stream.codec_context.name == (codec or ("h264" if "libx264" in av.codecs_available else "mpeg4"))
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(got) == 6 and all(g.shape == (16, 20, 3) for g in got)
    for g, w in zip(got, want):
        even = camlens.viz.volume.even_frame(w)
        assert np.array_equal(even[15], w[14]) and np.array_equal(even[:15], w)  # the padded row repeats the last
        # yuv420p's own round trip (half-resolution colour) vs what the encoder adds to it
        rt = av.VideoFrame.from_ndarray(even, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")
        assert np.abs(g.astype(float) - rt).mean() < 6  # crf 18 on 16 x 20 frames: about 3.5
        assert np.abs(g[:15].astype(float) - w).mean() < 16
    if "libx264" in av.codecs_available and codec is None:  # full colour: close to the overlays themselves
        path = camlens.viz.volume_video(exp, tmp_path / "full.mp4", t=1, pix_fmt="yuv444p", crf=10)
        with av.open(str(path)) as c:
            got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert [g.shape for g in got] == [(15, 20, 3)] * 6
        assert max(np.abs(g.astype(float) - w).mean() for g, w in zip(got, want)) < 8  # of 255


def test_volume_video_without_pyav_names_the_install(med, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    exp = camlens.explain(med, _vol(1))
    with pytest.raises(camlens.errors.MissingDependencyError, match=r"pip install \"camlens\[video\]\".*pip install av"):
        camlens.viz.volume_video(exp, tmp_path / "clip.mp4")
