"""Default layer choice (layer=None) and layer-output layout checks (issue: robustness items 3 and 4).

Models are random-weight torchvision / timm builds (never downloaded) or tiny synthetic modules.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.engine import run_pass
from camlens.backends.torch import Layout, guess_layer, layout_problem, looks_channels_last, probe_layers
from camlens.methods import Method, MethodOutput, available_methods

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

LAYER_METHODS = sorted(n for n, m in available_methods().items() if m.needs_layer)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant-map warnings of random-weight models
        yield


def _x(b: int = 1, s: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(b * 1000 + s))


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


# -- synthetic models ----------------------------------------------------------------------------
class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class ChannelsLast(nn.Module):
    """conv (B, 16, 8, 8) -> permute to (B, 8, 8, 16) -> LayerNorm over C -> pool -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.nhwc = Permute(0, 2, 3, 1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.norm(self.nhwc(self.conv(x))).mean((1, 2)))


class Tokens(nn.Module):
    """conv (B, 16, 8, 8) -> tokens (B, 64, 16) -> Linear per token -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.tokens = nn.Flatten(2)
        self.mix = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.mix(self.tokens(self.conv(x)).transpose(1, 2)).mean(1))


class RoiCrop(nn.Module):
    """Cuts each feature map into 4 crops: (B, C, h, w) -> (4B, C, h/2, w/2) (like RoI pooling)."""

    def forward(self, f):
        B, C, h, w = f.shape
        return f.unfold(2, h // 2, h // 2).unfold(3, w // 2, w // 2).permute(0, 2, 3, 1, 4, 5).reshape(
            -1, C, h // 2, w // 2)


class Proposals(nn.Module):
    """A trunk, then a per-crop conv whose batch axis is crops, not images; output (B, 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU())
        self.crop = RoiCrop()
        self.roi_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        B = x.shape[0]
        r = self.roi_conv(self.crop(self.trunk(x)))  # (4B, 8, 8, 8)
        return self.fc(r.mean((2, 3)).view(B, 4, -1).mean(1))


class ReusedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))


class TinySeg(nn.Module):
    """The whole network is one Sequential ending in the 3-class logits conv; output upsampled."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return {"out": F.interpolate(self.net(x), size=x.shape[-2:], mode="bilinear", align_corners=False)}


def _seg_target(out):
    return out["out"][:, 1].mean((1, 2))


# -- the shape rules -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape,size,nhwc", [
    ((1, 7, 7, 768), (224, 224), True), ((1, 768, 7, 7), (224, 224), False),
    ((1, 56, 56, 96), (224, 224), True), ((1, 96, 56, 56), (224, 224), False),
    ((1, 16, 14, 14), (224, 224), False), ((1, 3, 224, 224), (224, 224), False),
    ((1, 7, 10, 768), (224, 320), True), ((1, 768, 7, 10), (224, 320), False),
    ((2, 2048, 1, 1), (32, 32), False), ((1, 8, 8, 16), (32, 32), True),
])
def test_looks_channels_last(shape, size, nhwc):
    assert looks_channels_last(shape, size) is nhwc


def test_layout_problem_names_what_was_seen():
    assert layout_problem((2, 64, 7, 7), 2, (224, 224)) is None
    assert "batch" in layout_problem((300, 256, 7, 7), 2, (224, 224))
    assert "vector" in layout_problem((2, 1000), 2, (224, 224))
    assert "tokens" in layout_problem((2, 197, 192), 2, (224, 224))
    assert "channels-last" in layout_problem((2, 7, 7, 768), 2, (224, 224))


# -- item 3: layer=None ----------------------------------------------------------------------------
def test_default_layers_of_cnns_unchanged():
    torch.manual_seed(0)
    assert guess_layer(tv.models.resnet18(weights=None).eval(), _x(1, 64)) == "layer4"
    assert guess_layer(tv.models.mobilenet_v3_small(weights=None).eval(), _x(1, 64)) == "features"
    assert guess_layer(_timm("efficientnet_b0"), _x(1, 64)) == "bn2"
    assert guess_layer(tv.models.swin_t(weights=None).eval(), _x(1, 224)) == "features.7"  # its last stage, not the permute after it


def test_resnet50_small_input_picks_a_layer_that_runs_once():
    """At 32x32 layer4 is 1x1; the last 2x2 module was layer4.0.relu, which runs 3 times."""
    torch.manual_seed(0)
    net = tv.models.resnet50(weights=None).eval()
    x = _x(2, 32)
    assert guess_layer(net, x) == "layer3"
    exp = camlens.explain(net, x, targets=0)
    assert exp.layers == ["layer3"] and exp.maps.shape == (2, 1, 32, 32)


def test_reused_module_is_never_guessed():
    assert guess_layer(ReusedRelu().eval(), _x()) == "c2"
    exp = camlens.explain(ReusedRelu().eval(), _x(), targets=0)
    assert exp.layers == ["c2"]


@pytest.mark.parametrize("b", [1, 2])
def test_layer_with_other_leading_dim_is_never_guessed(b):
    net = Proposals().eval()
    assert guess_layer(net, _x(b)) == "trunk"
    exp = camlens.explain(net, _x(b), targets=0)
    assert exp.layers == ["trunk"] and exp.maps.shape == (b, 1, 32, 32)


def test_explicit_layer_with_other_leading_dim_is_refused():
    with pytest.raises(ValueError, match=r"'roi_conv'.*\(4, 8, 8, 8\).*not the batch of the input \(1\).*'trunk'"):
        camlens.explain(Proposals().eval(), _x(1), targets=0, layer="roi_conv")


class DetLogits(nn.Module):
    """torchvision Faster R-CNN (mobilenet 320 FPN) returning per-image mean box-head class logits (B, 5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.det = tv.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                                             num_classes=5)

    def forward(self, x):
        d = self.det
        images, _ = d.transform(list(x))
        feats = d.backbone(images.tensors)
        props, _ = d.rpn(images, feats)
        box = d.roi_heads.box_head(d.roi_heads.box_roi_pool(feats, props, images.image_sizes))
        logits, _ = d.roi_heads.box_predictor(box)
        return torch.stack([lg.mean(0) for lg in logits.split([len(p) for p in props])])


@pytest.fixture(scope="module")
def det() -> nn.Module:
    return DetLogits().eval()


@pytest.mark.parametrize("b", [1, 2])
def test_detection_never_picks_roi_pool(det, b):
    x = _x(b, 64)
    exp = camlens.explain(det, x, targets=1)
    assert exp.layers[0].startswith("det.backbone.") and "roi" not in exp.layers[0]
    assert exp.maps.shape == (b, 1, 64, 64)
    with pytest.raises(ValueError, match=r"box_roi_pool.*not the batch of the input"):
        camlens.explain(det, x, targets=1, layer="det.roi_heads.box_roi_pool")


def test_maps_with_wrong_batch_are_an_error():
    class Bad(Method):
        def compute(self, ctx):
            a = ctx.acts[ctx.layers[0]]
            return MethodOutput(raws={ctx.layers[0]: a[:, :1].repeat(3, 1, 1, 1)})

    net = ReusedRelu().eval()
    bad = Bad(name="bad", description="", cost="", needs_grads=False)
    with pytest.raises(RuntimeError, match=r"batch of 2"):
        run_pass(net, _x(2), 0, [("c2", net.c2)], bad, {}, None, None, layout=Layout(net))


def test_segmentation_head_is_never_guessed():
    net = TinySeg().eval()
    assert guess_layer(net, _x()) == "net.3"  # the ReLU before the logits conv, not net / net.4
    exp = camlens.explain(net, _x(), targets=_seg_target)
    assert exp.layers == ["net.3"] and exp.maps.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("name,want", [("lraspp_mobilenet_v3_large", "backbone.16"),
                                       ("fcn_resnet50", "backbone.layer4")])
def test_torchvision_segmentation_picks_the_backbone(name, want):
    torch.manual_seed(0)
    net = getattr(tv.models.segmentation, name)(weights=None, weights_backbone=None).eval()
    p = probe_layers(net, _x(1, 64))
    assert p.layer == want
    assert all(not c.startswith("classifier") for c in p.candidates(8))
    head = next(r for r in p.records if r.name == "classifier")
    assert "output head" in head.reason


@pytest.mark.parametrize("build,want,family", [
    (lambda: _timm("vit_tiny_patch16_224"), "blocks.11.norm1", "vit"),
    (lambda: _timm("deit_tiny_distilled_patch16_224"), "blocks.11.norm1", "vit"),
    (lambda: _timm("cait_xxs24_224"), "blocks_token_only.1.norm1", "vit"),  # class-attention blocks
    (lambda: _timm("xcit_nano_12_p16_224"), "cls_attn_blocks.1.norm1", "vit"),  # convs inside every block
    (lambda: _timm("mixer_s32_224"), "norm", "tokens"),  # no attention: the deepest token layer
    (lambda: _timm("swin_tiny_patch4_window7_224"), "layers.3", "swin"),
    (lambda: tv.models.swin_t(weights=None).eval(), "features.7", "swin"),  # not its trailing NCHW permute
    (lambda: tv.models.vit_b_32(weights=None).eval(), "encoder.layers.encoder_layer_11.ln_1", "vit"),
], ids=["timm-vit", "timm-deit-distilled", "timm-cait", "timm-xcit", "timm-mixer", "timm-swin", "tv-swin", "tv-vit"])
def test_transformers_get_the_recommended_layer(build, want, family):
    """layer=None: the input norm of the last attention block (ViT-like), the last stage (Swin-like),
    the deepest token layer (no attention) -- and the map is not blank."""
    net = build()
    p = probe_layers(net, _x(1, 224))
    assert (p.layer, p.family) == (want, family)
    torch.manual_seed(1)
    for name, mod in net.named_modules():  # timm and torchvision zero-init some heads: no gradient at all
        if name.startswith("head") and isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
    exp = camlens.explain(net, _x(1, 224), targets=[0, 1])
    assert exp.layers == [want] and exp.maps.shape == (1, 2, 224, 224)
    assert float(exp.maps.std()) > 0.05


def test_timm_vit_attention_internals_are_not_candidates():
    p = probe_layers(_timm("vit_tiny_patch16_224"), _x(1, 224))
    k = next(r for r in p.records if r.name == "blocks.11.attn.k_norm")
    assert k.shape == (2, 3, 197, 64) and "attention" in k.reason
    assert p.candidates()[0] == "blocks.11.norm1" and "blocks.11.attn.k_norm" not in p.candidates(50)


# -- item 4: layouts -------------------------------------------------------------------------------
class Back(nn.Module):
    """Wraps a model so that one of its channels-last / token tensors also passes through an NCHW
    module ``back`` (same values): explaining ``back`` is reading that tensor by hand."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind
        self.back = Permute(0, 3, 1, 2) if kind == "nhwc" else nn.Unflatten(2, (8, 8))

    def forward(self, x):
        n = self.net
        if self.kind == "nhwc":
            f = self.back(n.norm(n.nhwc(n.conv(x))))  # (B, C, h, w)
            return n.fc(f.mean((2, 3)))
        t = n.mix(n.tokens(n.conv(x)).transpose(1, 2))  # (B, 64, 16)
        f = self.back(t.transpose(1, 2))  # (B, 16, 8, 8)
        return n.fc(f.flatten(2).mean(2))


@pytest.mark.parametrize("kind,layer", [("nhwc", "norm"), ("tokens", "mix")])
@pytest.mark.parametrize("method", LAYER_METHODS)
def test_every_method_reads_channels_last_and_tokens_as_the_nchw_map(method, kind, layer):
    net = (ChannelsLast() if kind == "nhwc" else Tokens()).eval()
    x = _x(2)
    got = camlens.explain(net, x, targets=[0, 2], layer=layer, method=method)
    want = camlens.explain(Back(net, kind).eval(), x, targets=[0, 2], layer="back", method=method)
    assert got.raw.shape == want.raw.shape == ((2, 2, 32, 32) if method == "guided_gradcam" else (2, 2, 8, 8))
    assert torch.allclose(got.raw, want.raw, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.maps, want.maps, atol=1e-5)
    assert torch.allclose(got.scores, want.scores, atol=1e-6)


def test_channels_last_model_guesses_the_conv():
    assert guess_layer(ChannelsLast().eval(), _x()) == "conv"


def test_swin_channels_last_layers_are_read():
    net = _timm("swin_tiny_patch4_window7_224")
    for layer in ("layers.3", "norm"):
        exp = camlens.explain(net, _x(1, 224), targets=0, layer=layer)
        assert exp.raw.shape == (1, 1, 7, 7) and bool(torch.isfinite(exp.maps).all())
    tvs = tv.models.swin_t(weights=None).eval()
    nn.init.normal_(tvs.head.weight, std=0.05)
    x = _x(1, 224)
    nhwc = camlens.explain(tvs, x, targets=[0, 3], layer="norm")  # (1, 7, 7, 768), read channels-last
    nchw = camlens.explain(tvs, x, targets=[0, 3], layer="permute")  # its own NCHW view of the same tensor
    assert nchw.layers == ["permute"] and torch.allclose(nhwc.raw, nchw.raw, atol=1e-5, rtol=1e-4)
    assert camlens.explain(tvs, x, targets=0).layers == ["features.7"]  # layer=None: the last stage


@pytest.mark.parametrize("layer", ["classifier", "global_pool"])
@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam"])
def test_vector_layers_are_refused(layer, method):
    with pytest.raises(ValueError, match=rf"'{layer}'.*\(1, \d+\): it is a vector.*such as 'bn2'"):
        camlens.explain(_timm("efficientnet_b0"), _x(1, 64), targets=0, layer=layer, method=method)


def test_vit_attention_internals_are_refused():
    with pytest.raises(ValueError, match=r"k_norm.*\(1, 3, 197, 64\).*inside attention block 'blocks.11.attn'"):
        camlens.explain(_timm("vit_tiny_patch16_224"), _x(1, 224), targets=0, layer="blocks.11.attn.k_norm")


class ConvThenSequence(nn.Module):
    """A CNN, then a few token-layout layers (like a CRNN): the CNN's output is a feature layer, not a stem."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(*[m for i in range(4) for m in (nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1),
                                                                    nn.ReLU())])
        self.seq = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(8, 8), nn.ReLU())])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.seq(self.trunk(x).flatten(2).transpose(1, 2)).mean(1))


def test_cnn_followed_by_a_few_token_layers_is_not_a_stem():
    assert guess_layer(ConvThenSequence().eval(), _x()) == "trunk"


def test_default_layer_is_probed_once_per_model_and_input_shape(monkeypatch):
    """layer=None probes the model (about two forwards) once per model, input shape, dtype and device;
    a submodule swapped in probes again."""
    import importlib

    backend = importlib.import_module("camlens.backends.torch.backend")
    calls = []
    real = backend.guess_layer
    monkeypatch.setattr(backend, "guess_layer", lambda m, x: calls.append(tuple(x.shape)) or real(m, x))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    for _ in range(3):
        assert camlens.explain(net, _x(2), targets=0).layers == ["3"]
    assert calls == [(2, 3, 32, 32)]
    camlens.explain(net, _x(1), targets=0)  # another batch size: same (C, H, W), no new probe
    camlens.explain(net, _x(1, 48), targets=0)  # another size: probed
    assert calls == [(2, 3, 32, 32), (1, 3, 48, 48)]
    net[3] = nn.ReLU()  # another module object: probed again
    assert camlens.explain(net, _x(1), targets=0).layers == ["3"]
    assert len(calls) == 3


@pytest.mark.parametrize("name,size,want,family", [
    ("swinv2_tiny_window8_256", 256, "layers.3", "swin"),  # blocks in a ModuleList (never called itself)
    ("twins_pcpvt_small", 224, "norm", "vit-pooled"),  # no class token: the head averages every token
    ("efficientformer_l1", 224, "norm", "vit-pooled"),  # CNN stages, then a token stage with attention
    ("edgenext_xx_small", 224, "norm_pre", "cnn"),  # attention inside NCHW stages: still a CNN's layer
])
def test_transformer_families_beyond_vit(name, size, want, family):
    torch.manual_seed(0)
    p = probe_layers(timm.create_model(name, pretrained=False).eval(), _x(1, size))
    assert (p.layer, p.family) == (want, family)
