"""Score-CAM and Ablation-CAM: agreement with pytorch-grad-cam, multi-target batching, Faster Score-CAM,
exact shortcuts, model state and multi-head models.

Inputs are small (48-96 px) so that the C masked / ablated forwards per image stay cheap on CPU.
"""

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.backends import torch as backend

TOL = 1e-3


def _x(seed=0, b=1, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def _module(model, name):
    return dict(model.named_modules())[name]


def _pgc(method, model, layer, x, classes, ratio=1.0, batch_size=64):
    """pytorch-grad-cam's final maps (B, H, W) for one target class per image."""
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    mods = [_module(model, layer)]
    if method == "scorecam":
        cam = ScoreCAM(model=model, target_layers=mods)
        cam.batch_size = batch_size
    else:
        cam = AblationCAM(model=model, target_layers=mods, batch_size=batch_size, ratio_channels_to_ablate=ratio)
    with cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    return torch.from_numpy(out)


class Count(list):
    """Batch sizes of the Runner's forwards (the first, hooked forward is not counted); ``rows``: inputs or
    layer outputs scored (for ``scores_with_layer`` the input runs at batch 1 and the batch grows at the layer)."""

    rows = 0


@pytest.fixture
def forwards(monkeypatch):
    count = Count()
    fwd, scores, with_layer = backend.Runner._forward, backend.Runner.scores, backend.Runner.scores_with_layer

    def counting_forward(self, x, *a, **k):
        count.append(int(x.shape[0]))
        return fwd(self, x, *a, **k)

    def counting_scores(self, x, *a, **k):
        count.rows += int(x.shape[0])
        return scores(self, x, *a, **k)

    def counting_with_layer(self, layer, acts, *a, **k):
        count.rows += int(acts.shape[0])
        return with_layer(self, layer, acts, *a, **k)

    monkeypatch.setattr(backend.Runner, "_forward", counting_forward)
    monkeypatch.setattr(backend.Runner, "scores", counting_scores)
    monkeypatch.setattr(backend.Runner, "scores_with_layer", counting_with_layer)
    return count


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# measured max abs differences to pytorch-grad-cam (CPU, torch 2.14): Score-CAM 5.4e-7 / 3.6e-7 / 7.2e-7,
# Ablation-CAM 2.4e-7 / 1.8e-7 / 1.2e-7 (in CASES order). Score-CAM masks upsampled with align_corners=False
# instead would differ by 4e-2 / 1.6e-2 on the resnet18 cases.
CASES = [  # arch, layer, input size, per-image classes
    ("resnet18", "layer4", 48, [7]),  # 2 x 2 maps
    ("resnet18", "layer3", 48, [3, 281]),  # 3 x 3 maps; per-image targets
    ("vgg11", "features.5", 32, [5]),  # MaxPool after the 2nd conv block, 8 x 8 maps
]


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("arch,layer,size,classes", CASES)
def test_matches_pytorch_grad_cam(method, arch, layer, size, classes, request):
    model = request.getfixturevalue(arch)
    x = _x(b=len(classes), size=size)
    exp = camlens.explain(model, x, targets=[[c] for c in classes], layer=layer, method=method)
    ours = exp.maps[:, 0]
    ref = _pgc(method, model, layer, x, classes)
    assert ours.shape == ref.shape == (len(classes), size, size)
    assert (ours - ref).abs().max() < TOL, (ours - ref).abs().max()
    # not a trivial agreement: the weights matter (uniform weights give another map)
    plain = camlens.explain(model, x, targets=[[c] for c in classes], layer=layer, method="gradcam").maps[:, 0]
    assert (ours - plain).abs().max() > 0.05


def _pgc_has_tie_at_boundary(acts, ratio):
    """pytorch-grad-cam breaks ties in its channel ranking with numpy's unstable sort; we break them by index."""
    from pytorch_grad_cam.ablation_layer import AblationLayer

    fg = AblationLayer().objectiveness_mask_from_svd(acts.numpy())
    with np.errstate(invalid="ignore"):
        s = []
        for ch in acts.numpy():
            n = np.abs(ch) - np.abs(ch).min()
            n = n / n.max()
            s.append((fg * n).sum() / n.sum())
    s = np.sort(np.float32(s))
    k, C = int(len(s) * ratio), len(s)
    same = lambda u, v: u == v or (np.isnan(u) and np.isnan(v))  # noqa: E731
    return same(s[k - 1], s[k]) or same(s[C - k - 1], s[C - k])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy 0/0 in pytorch-grad-cam
@pytest.mark.parametrize("arch,layer,size,cls", [("resnet18", "layer3", 96, 3), ("vgg11", "features.10", 48, 7)])
def test_ablation_ratio_matches_pytorch_grad_cam(arch, layer, size, cls, request, forwards):
    from camlens.methods.ablationcam import channels_to_ablate

    model = request.getfixturevalue(arch)
    x = _x(size=size)
    ratio = 0.2
    store = {}
    h = _module(model, layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.no_grad():
        model(x)
    h.remove()
    acts = store["a"][0]
    assert not _pgc_has_tie_at_boundary(acts, ratio)  # a case where the reference is well defined
    from pytorch_grad_cam.ablation_layer import AblationLayer

    assert set(AblationLayer().activations_to_be_ablated(acts.numpy(), ratio).tolist()) == \
        set(torch.nonzero(channels_to_ablate(acts, ratio)).flatten().tolist())
    exp = camlens.explain(model, x, targets=cls, layer=layer, method="ablationcam", ratio=ratio, batch_size=16)
    C = acts.shape[0]
    assert forwards.rows <= 2 * int(C * ratio) < C  # top and bottom picks only, dead channels skipped
    assert len(forwards) == -(-forwards.rows // 16)
    ref = _pgc("ablationcam", model, layer, x, [cls], ratio=ratio)
    assert exp.maps.std() > 0.05  # not an all-zero map
    assert (exp.maps[:, 0] - ref).abs().max() < TOL, (exp.maps[:, 0] - ref).abs().max()


class SmallNet(nn.Module):
    """conv(3->8) relu conv(8->16) relu pool linear; ``dead`` channels of ``features.3`` are always 0."""

    def __init__(self, k=10, dead=0):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, k)
        with torch.no_grad():
            self.features[2].weight[:dead] = 0
            self.features[2].bias[:dead] = -1.0

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_ablation_on_layer_with_negative_values_matches_pytorch_grad_cam():
    """A conv output has negative values: ablated = min - 1e7 (pytorch-grad-cam with batch_size=1, where its
    in-place loop does not lower the value further per copy)."""
    torch.manual_seed(5)
    model = SmallNet().eval()
    x = _x(size=32)
    exp = camlens.explain(model, x, targets=4, layer="features.2", method="ablationcam")
    ref = _pgc("ablationcam", model, "features.2", x, [4], batch_size=1)
    assert (exp.maps[:, 0] - ref).abs().max() < TOL, (exp.maps[:, 0] - ref).abs().max()
    # (0 or min - 1e7 are the same before a ReLU); a positive value is another ablation
    other = camlens.explain(model, x, targets=4, layer="features.2", method="ablationcam", ablation_value=1.0)
    assert (other.maps - exp.maps).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_several_targets_equal_single_calls_and_share_forwards(method, resnet18, forwards):
    x = _x(b=2, size=32)  # layer3: 2 x 2 maps
    targets = [3, 281, 500]
    exp = camlens.explain(resnet18, x, targets=targets, layer="layer3", method=method)
    n_multi = len(forwards)
    assert exp.maps.shape == (2, 3, 32, 32)
    for t, c in enumerate(targets):
        forwards.clear()
        single = camlens.explain(resnet18, x, targets=c, layer="layer3", method=method)
        assert len(forwards) == n_multi  # T targets cost the forwards of one
        assert torch.allclose(exp.raw[:, t], single.raw[:, 0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(exp.maps[:, t], single.maps[:, 0], atol=1e-5)


def test_max_channels_is_close_and_cheaper(resnet18, forwards):
    x = _x(b=2, size=64)
    full = camlens.explain(resnet18, x, targets=[[3], [281]], layer="layer3", method="scorecam")
    n_full, rows_full = len(forwards), sum(forwards)
    forwards.clear()
    fast = camlens.explain(resnet18, x, targets=[[3], [281]], layer="layer3", method="scorecam", max_channels=64)
    assert max(forwards) <= 32 and sum(forwards) <= 2 * 64 < rows_full
    assert (len(forwards), n_full) == (4, 16)  # 2 forwards vs 8 per image (64 vs 256 channels, batch_size=32)
    corr = [_corr(fast.maps[b, 0], full.maps[b, 0]) for b in range(2)]
    assert min(corr) > 0.95, corr  # measured: 0.992 and 0.990 (32 channels: 0.987 / 0.966; 16: 0.86 / 0.87)


def test_constant_channel_shortcut_saves_forwards_exactly(forwards):
    torch.manual_seed(2)
    model = SmallNet(dead=10).eval()  # 10 of 16 channels of features.3 are always 0
    x = _x(b=2, size=32)
    store = {}
    h = model.features[3].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.no_grad():
        model(x)
    h.remove()
    dead = (store["a"].flatten(2).amax(-1) == 0).sum(1)
    assert dead.tolist() == [10, 10]
    exp = camlens.explain(model, x, targets=[[1], [6]], layer="features.3", method="scorecam", batch_size=4)
    assert forwards.rows == sum(forwards) == 2 * (16 - 10 + 1)  # 6 live channels + the all-zero input, not 16
    assert len(forwards) == 2 * 2 and max(forwards) <= 4  # chunks of batch_size: 2 per image, not 4
    ref = _pgc("scorecam", model, "features.3", x, [1, 6], batch_size=4)
    assert (exp.maps[:, 0] - ref).abs().max() < TOL
    # Ablation-CAM skips the dead channels: ablating a zero channel adds w * 0 to the map
    forwards.clear()
    forwards.rows = 0
    abl = camlens.explain(model, x, targets=[[1], [6]], layer="features.3", method="ablationcam", batch_size=4)
    assert forwards.rows == 2 * 6 and len(forwards) == 2 * 2  # not 2 * 16 rows in 2 * 4 forwards
    ref = _pgc("ablationcam", model, "features.3", x, [1, 6], batch_size=4)
    assert (abl.maps[:, 0] - ref).abs().max() < TOL


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_model_state_unchanged(method):
    torch.manual_seed(0)
    model = SmallNet()
    model.train()
    model.features[0].eval()
    model.fc.weight.requires_grad_(False)
    before_modes = [m.training for m in model.modules()]
    before_rg = [p.requires_grad for p in model.parameters()]
    before_params = [p.detach().clone() for p in model.parameters()]
    exp = camlens.explain(model, _x(b=2, size=32), targets=[1, 2], layer="features.3", method=method, batch_size=5)
    assert exp.maps.shape == (2, 2, 32, 32) and torch.isfinite(exp.maps).all()
    assert [m.training for m in model.modules()] == before_modes
    assert [p.requires_grad for p in model.parameters()] == before_rg
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before_params))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


class _Heads(nn.Module):
    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    def forward(self, x):
        f = self.backbone(x)
        out = {k: h(f) for k, h in self.heads.items()}
        return out if len(out) > 1 else next(iter(out.values()))


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_two_head_model_equals_single_head_models(method, forwards):
    torch.manual_seed(4)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                             nn.ReLU())
    head = lambda k: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, k))  # noqa: E731
    species, age = head(5), head(3)
    with torch.no_grad():  # larger logits: a peaked Score-CAM softmax, so the two heads' maps differ clearly
        for h in (species, age):
            h[2].weight.mul_(30)
    two = _Heads(backbone, {"species": species, "age": age}).eval()  # shares weights with the two below
    x = _x(b=2, size=32)
    exp = camlens.explain(two, x, targets=["species:2", "age:1"], layer="backbone.3", method=method)
    n_two = len(forwards)
    for t, (name, h, c) in enumerate([("species", species, 2), ("age", age, 1)]):
        forwards.clear()
        one = _Heads(backbone, {name: h}).eval()
        single = camlens.explain(one, x, targets=c, layer="backbone.3", method=method)
        assert len(forwards) == n_two  # both heads came from one set of forwards
        assert torch.allclose(exp.raw[:, t], single.raw[:, 0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(exp.maps[:, t], single.maps[:, 0], atol=1e-5)
    assert (exp.maps[:, 0] - exp.maps[:, 1]).abs().max() > 0.05  # the heads give different maps


def test_options_are_checked(resnet18):
    x = _x(size=32)
    with pytest.raises(ValueError, match="batch_size"):
        camlens.explain(resnet18, x, targets=1, layer="layer4", method="scorecam", batch_size=0)
    with pytest.raises(ValueError, match="max_channels"):
        camlens.explain(resnet18, x, targets=1, layer="layer4", method="scorecam", max_channels=0)
    with pytest.raises(ValueError, match="ratio"):
        camlens.explain(resnet18, x, targets=1, layer="layer4", method="ablationcam", ratio=1.5)
    with pytest.raises(TypeError, match="options"):
        camlens.explain(resnet18, x, targets=1, layer="layer4", method="ablationcam", max_channels=3)
