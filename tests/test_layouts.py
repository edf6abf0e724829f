"""Layers in other layouts read as (B, C, h, w): channels-last (Swin) and tokens with prefix tokens
(ViT, DeiT, register tokens). Grad-CAM agrees with pytorch-grad-cam + its usual reshape_transform."""

import contextlib

import pytest
import torch
import torchvision
from torch import nn

import camlens
from camlens.backends.base import MapLayout, read_layout
from camlens.core.errors import LayerError
from camlens.core.layouts import to_map

TOL64 = 1e-5  # float64 models: what remains is camlens' float32 maths on their outputs


@pytest.mark.parametrize("shape,size,want", [
    ((2, 197, 768), (224, 224), MapLayout("tokens", (14, 14), 1)),   # ViT-B/16: class token
    ((2, 198, 384), (224, 224), MapLayout("tokens", (14, 14), 2)),   # DeiT distilled: class + distillation
    ((2, 201, 384), (224, 224), MapLayout("tokens", (14, 14), 5)),   # class + 4 register tokens
    ((2, 196, 512), (224, 224), MapLayout("tokens", (14, 14), 0)),   # Mixer: patches only
    ((2, 50, 768), (224, 224), MapLayout("tokens", (7, 7), 1)),      # ViT-B/32
    ((1, 33, 64), (64, 128), MapLayout("tokens", (4, 8), 1)),        # a rectangular grid
    ((2, 7, 7, 768), (224, 224), MapLayout("nhwc", (7, 7), 0)),      # Swin's last stage
])
def test_read_layout_finds_the_grid_and_the_prefix_tokens(shape, size, want):
    assert read_layout(shape, shape[0], size) == want


def test_read_layout_takes_the_models_prefix_count_and_refuses_what_fits_no_grid():
    assert read_layout((2, 197, 8), 2, (224, 224), prefix=1) == MapLayout("tokens", (14, 14), 1)
    assert read_layout((2, 199, 8), 2, (224, 224), prefix=3) == MapLayout("tokens", (14, 14), 3)
    assert read_layout((2, 197, 8), 3, (224, 224)) is None  # not the batch
    assert read_layout((2, 1000), 2, (224, 224)) is None  # a vector per image
    assert read_layout((2, 2000, 8), 2, (32, 32)) is None  # no prefix count leaves a grid that fits
    assert read_layout((2, 64, 7, 7), 2, (224, 224)) is None  # NCHW: nothing to read


def test_to_map_is_the_usual_reshape_transform_for_activations_and_gradients():
    x = torch.randn(2, 17, 5)
    lay = MapLayout("tokens", (4, 4), 1)
    assert torch.equal(to_map(x, lay), x[:, 1:].reshape(2, 4, 4, 5).permute(0, 3, 1, 2))
    g = torch.randn(2, 3, 17, 5)
    assert torch.equal(to_map(g, lay, lead=2), g[:, :, 1:].reshape(2, 3, 4, 4, 5).permute(0, 1, 4, 2, 3))
    n = torch.randn(2, 7, 6, 5)
    assert torch.equal(to_map(n, MapLayout("nhwc", (7, 6))), n.permute(0, 3, 1, 2))


def _pgc(model, layer, x, classes, reshape, method="gradcam"):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus}[method]
    out = []
    for c in classes:
        with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            out.append(torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * x.shape[0])))
    return torch.stack(out, 1)


def _tokens_to_map(grid):
    def rt(t):
        return t[:, 1:, :].reshape(t.size(0), *grid, t.size(2)).permute(0, 3, 1, 2)
    return rt


def _non_degenerate(maps):
    flat = maps.flatten(-2)
    assert bool((flat.amax(-1) == 1).all()) and bool((flat.std(-1) > 0.05).all())


@pytest.fixture(scope="module")
def vit64():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval().double()


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_timm_vit_tokens_agree_with_pytorch_grad_cam(vit64, method):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exp = camlens.explain(vit64, x, targets=[1, 3], layer="blocks.11.norm1", method=method)
    assert exp.raw.shape == (2, 2, 4, 4)
    ref = _pgc(vit64, vit64.blocks[11].norm1, x, [1, 3], _tokens_to_map((4, 4)), method)
    _non_degenerate(exp.maps)
    assert (exp.maps.double() - ref).abs().max() < TOL64


def test_torchvision_swin_channels_last_agrees_with_pytorch_grad_cam():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=5).eval().double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exp = camlens.explain(model, x, targets=[1, 3], layer="features.7")
    assert exp.raw.shape == (1, 2, 7, 7)
    ref = _pgc(model, model.features[7], x, [1, 3], lambda t: t.permute(0, 3, 1, 2))
    _non_degenerate(exp.maps)
    assert (exp.maps.double() - ref).abs().max() < TOL64


def _ablation_reference(model, layer, x, classes, prefix=1, grid=(4, 4)):
    """Ablation-CAM by hand on a token layer: channel c of the PATCH tokens set to 0 (prefix tokens
    kept), one forward per channel; weights (S - S_c) / S; map = sum_c w_c A_c on the patch grid."""
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        s = model(x)[:, classes]
    h.remove()
    a = acts["a"]  # (B, N, C)
    B, N, C = a.shape
    out = torch.zeros(B, len(classes), *grid, dtype=a.dtype)
    for c in range(C):
        def ablate(m, i, o, c=c):
            o = o.clone()
            o[:, prefix:, c] = 0
            return o
        h = layer.register_forward_hook(ablate)
        with torch.no_grad():
            sc = model(x)[:, classes]
        h.remove()
        w = (s - sc) / s  # (B, T)
        out += w[:, :, None, None] * a[:, prefix:, c].reshape(B, 1, *grid)
    return out


def test_torchvision_vit_class_token_from_the_model_and_layout_aware_methods():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5).eval().double()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero: all scores 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = "encoder.layers.encoder_layer_1.ln_1"
    targets = [1, 4]
    exp = camlens.explain(model, x, targets=targets, layer=layer)
    assert exp.raw.shape == (2, 2, 4, 4)
    assert float(exp.raw.abs().max()) > 0
    ref = _pgc(model, model.encoder.layers.encoder_layer_1.ln_1, x, targets, _tokens_to_map((4, 4)))
    assert (exp.maps.double() - ref).abs().max() < TOL64
    sc = camlens.explain(model, x, targets=targets, layer=layer, method="scorecam")  # masks the input: any layout
    assert sc.maps.shape == (2, len(targets), 64, 64) and bool(torch.isfinite(sc.maps).all())
    ab = camlens.explain(model, x, targets=targets, layer=layer, method="ablationcam", ablation_value=0.0)
    assert (ab.raw.double() - _ablation_reference(model, model.encoder.layers.encoder_layer_1.ln_1, x, targets)
            ).abs().max() < 1e-5 * float(ab.raw.abs().max())
    diff = camlens.explain(model.float(), x.float(), targets=targets, layer=layer, differentiable=True)
    diff.maps.sum().backward()  # the graph reaches the weights through the token read
    assert model.conv_proj.weight.grad is not None and bool(model.conv_proj.weight.grad.abs().sum() > 0)
    model.zero_grad(set_to_none=True)


def test_channels_last_module_inside_a_cnn_gives_the_nchw_maps():
    class ToNHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 24, 3, 2, 1))
            self.nhwc = ToNHWC()
            self.fc = nn.Linear(24, 4)

        def forward(self, x):
            return self.fc(self.nhwc(self.conv(x)).mean((1, 2)))

    net = Net().eval()
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    a = camlens.explain(net, x, targets=[0, 2], layer="nhwc")
    b = camlens.explain(net, x, targets=[0, 2], layer="conv")
    assert torch.allclose(a.maps, b.maps, atol=1e-6) and torch.allclose(a.raw, b.raw, atol=1e-6)


# -- explain(layout=..., reshape=...): the user's reading of a layer -----------------------------
def test_reshape_and_layout_overrides_equal_the_automatic_reading(vit64):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kw = dict(targets=[1, 3], layer="blocks.11.norm1")
    auto = camlens.explain(vit64, x, **kw)
    for extra in (dict(reshape=_tokens_to_map((4, 4))),  # a pytorch-grad-cam reshape_transform, unchanged
                  dict(layout="tokens"),
                  dict(layout=camlens.MapLayout("tokens", grid=(4, 4))),  # prefix = N - h*w
                  dict(layout={"blocks.11.norm1": camlens.MapLayout("tokens", (4, 4), prefix=1)})):
        got = camlens.explain(vit64, x, **kw, **extra)
        assert torch.allclose(got.raw, auto.raw, atol=1e-6) and torch.allclose(got.maps, auto.maps, atol=1e-6)
    smooth = camlens.explain(vit64, x, **kw, reshape=_tokens_to_map((4, 4)), noise_smooth=2)  # wrappers too
    assert torch.allclose(smooth.raw, camlens.explain(vit64, x, **kw, noise_smooth=2).raw, atol=1e-6)
    other = camlens.explain(vit64, x, **kw, layout=camlens.MapLayout("tokens", grid=(2, 8), prefix=1))
    assert other.raw.shape == (2, 2, 2, 8)  # the user's grid, however odd, is the one used
    with pytest.raises(LayerError, match=r"ablation|no inverse|reshape"):
        camlens.explain(vit64, x, **kw, reshape=_tokens_to_map((4, 4)), method="ablationcam")


class Ambiguous(nn.Module):
    """A (B, 4, 4, 8) layer on 32x32 inputs: camlens reads it channels-last (a 4x4 grid of 8 channels)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=(8, 4), padding=1)  # (B, 4, 4, 8)
        self.mid = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.mid(self.conv(x)).mean((2, 3)))


def test_layout_nchw_reads_the_layer_as_is():
    net, x = Ambiguous().eval(), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert camlens.explain(net, x, targets=[0, 1], layer="mid").raw.shape == (2, 2, 4, 4)  # guessed NHWC
    nchw = camlens.explain(net, x, targets=[0, 1], layer="mid", layout="nchw")
    assert nchw.raw.shape == (2, 2, 4, 8)
    a = net.conv(x)  # Grad-CAM by hand on the (B, 4, 4, 8) tensor read as 4 channels on a 4x8 grid
    out = net.fc(a.mean((2, 3)))
    ref = []
    for c in (0, 1):
        g, = torch.autograd.grad(out[:, c].sum(), a, retain_graph=True)
        ref.append((g.mean((2, 3), keepdim=True) * a).sum(1))
    assert torch.allclose(nchw.raw, torch.stack(ref, 1).detach(), atol=1e-6)


def test_layout_overrides_say_what_does_not_fit(vit64):
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    kw = dict(targets=1, layer="blocks.11.norm1")
    with pytest.raises(LayerError, match=r"grid 3x3 with 1 prefix tokens does not hold the 17 tokens"):
        camlens.explain(vit64, x, **kw, layout=camlens.MapLayout("tokens", (3, 3), prefix=1))
    with pytest.raises(LayerError, match=r"layout='nhwc' needs a 4-D output.*\(1, 17, 192\)"):
        camlens.explain(vit64, x, **kw, layout="nhwc")
    with pytest.raises(ValueError, match=r"layout= takes one of \('nchw', 'nhwc', 'tokens'\)"):
        camlens.explain(vit64, x, **kw, layout="hwc")
    with pytest.raises(ValueError, match=r"names layers \['blocks.0.norm1'\] that are not explained"):
        camlens.explain(vit64, x, **kw, layout={"blocks.0.norm1": "tokens"})
    with pytest.raises(ValueError, match="both layout= and reshape="):
        camlens.explain(vit64, x, **kw, layout="tokens", reshape=_tokens_to_map((4, 4)))
    with pytest.raises(LayerError, match=r"reshape= must turn the layer output \(B, 17, 192\).*B = 1; it returned \(1, 17, 192\)"):
        camlens.explain(vit64, x, **kw, reshape=lambda t: t)


def test_patch_grid_from_the_model_on_rectangular_dynamic_inputs():
    """timm's patch size (dynamic image size) and torchvision's give the grid: a 224x448 input is 14x28."""
    timm = pytest.importorskip("timm")
    from camlens.backends.torch.probing import patch_grid

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, num_classes=4).eval()
    assert patch_grid(vit, (224, 448)) == (14, 28)
    assert patch_grid(torchvision.models.vit_b_16(), (224, 224)) == (14, 14)
    assert patch_grid(torchvision.models.resnet18(), (224, 224)) is None
    nn.init.normal_(vit.head.weight, std=0.05)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(2))
    exp = camlens.explain(vit, x, targets=[1, 2])
    assert exp.layers == ["blocks.11.norm1"] and exp.raw.shape == (1, 2, 6, 10)
    hand = camlens.explain(vit, x, targets=[1, 2], reshape=_tokens_to_map((6, 10)))
    assert torch.allclose(exp.raw, hand.raw, atol=1e-6)


def test_row_sparse_products_give_the_same_gradients(vit64, monkeypatch):
    """A class-token head's gradients after the last block's attention live on one token row per image:
    the backward's large products skip the zero rows (SparseRows), with the same maps as dense ones."""
    import importlib

    grads_mod = importlib.import_module("camlens.backends.torch.gradients")
    sparse_mod = importlib.import_module("camlens.backends.torch.sparse")
    seen = []

    class Counting(sparse_mod.SparseRows):
        def __exit__(self, *exc):
            seen.append(self.saved)
            return super().__exit__(*exc)

    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(sparse_mod, "MIN_ROWS", 8)  # the 64x64 test ViT's products are small
    monkeypatch.setattr(grads_mod, "SparseRows", Counting)
    got = camlens.explain(vit64, x, targets=list(range(10)), layer="blocks.11.norm1")
    assert seen and seen[0] > 0  # rows were skipped
    monkeypatch.setattr(grads_mod, "SparseRows", contextlib.nullcontext)  # dense products
    want = camlens.explain(vit64, x, targets=list(range(10)), layer="blocks.11.norm1")
    assert torch.allclose(got.raw, want.raw, rtol=1e-5, atol=1e-7 * float(want.raw.abs().max()))
    ref = _pgc(vit64, vit64.blocks[11].norm1, x, [0, 5, 9], _tokens_to_map((4, 4)))
    assert (got.maps[:, [0, 5, 9]].double() - ref).abs().max() < TOL64
