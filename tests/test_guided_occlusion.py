"""Input-space methods: guided backprop, guided Grad-CAM and occlusion.

Checked against captum on the same model, input and target; guided ReLUs reached through
functional calls and ReLU6; per-head equivalence on a multi-output model; model state restored.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import camlens

TOL = 1e-5


def _x(b=2, h=64, w=64, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _no_inplace(model):
    """A deep copy with every in-place ReLU made out-of-place (captum's backward hooks need that)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return m


def _module(model, name):
    return dict(model.named_modules())[name]


def _plain_grad(model, x, cls):
    """Ordinary input gradient of logit ``cls`` (summed over the batch), no camlens involved."""
    xi = x.clone().requires_grad_(True)
    return torch.autograd.grad(model(xi)[:, cls].sum(), xi)[0]


# ------------------------------------------------------------------------------ small models

class ModuleNet(nn.Module):
    """ReLUs as modules (one in-place)."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = act(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.act2 = act()
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.act3 = act()
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        x = self.act3(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


class FunctionalNet(ModuleNet):
    """The same network with ReLUs called functionally (F.relu, torch.relu, Tensor.relu_)."""

    def forward(self, x):
        x = self.conv1(x).relu_()
        x = F.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


class FunctionalReLU6Net(ModuleNet):
    def forward(self, x):
        x = F.relu6(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = F.relu6(self.conv3(x), inplace=True)
        return self.fc(x.mean(dim=(2, 3)))


class _GuidedReLU6Fn(torch.autograd.Function):
    """Reference guided ReLU6: ``dx = max(g, 0) * [0 < x < 6]``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp_min(0) * ((x > 0) & (x < 6)).to(g.dtype)


class RefGuidedReLU6(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()

    def forward(self, x):
        return _GuidedReLU6Fn.apply(x)


def _net(cls=ModuleNet, seed=0, **kw):
    torch.manual_seed(seed)
    net = cls(**kw).eval()
    with torch.no_grad():  # a bias so that some units are active and some not
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _twin(src, cls, **kw):
    m = cls(**kw).eval()
    m.load_state_dict(src.state_dict())
    return m


# ------------------------------------------------------------------------------ vs captum

@pytest.mark.parametrize("targets", [[[3], [281]], [3, 281]])
def test_guided_backprop_matches_captum(resnet18, targets):
    from captum.attr import GuidedBackprop

    x = _x()
    exp = camlens.explain(resnet18, x, targets=targets, method="guided_backprop")
    T = exp.pixel.shape[1]
    assert exp.pixel.shape == (2, T, 3, 64, 64) and exp.raw.shape == exp.maps.shape == (2, T, 64, 64)
    ref_model = _no_inplace(resnet18)
    gb = GuidedBackprop(ref_model)
    for t in range(T):
        cls = [row[t] for row in targets] if isinstance(targets[0], list) else targets[t]
        ref = gb.attribute(x, target=cls).detach()
        diff = (exp.pixel[:, t] - ref).abs().max().item()
        assert diff < TOL, diff
    assert torch.equal(exp.raw, exp.pixel.abs().amax(dim=2))
    assert exp.maps.min() >= 0 and exp.maps.amax(dim=(-2, -1)).allclose(torch.ones(2, T))


@pytest.mark.parametrize("layer,mode", [("layer4", "nearest"), ("layer3", "nearest"), ("layer3", "bilinear")])
def test_guided_gradcam_matches_captum(resnet18, layer, mode):
    from captum.attr import GuidedGradCam

    x = _x()
    classes = [3, 281]
    exp = camlens.explain(resnet18, x, targets=[[c] for c in classes], method="guided_gradcam", layer=layer,
                          interpolate=mode)
    ref_model = _no_inplace(resnet18)
    ref = GuidedGradCam(ref_model, _module(ref_model, layer)).attribute(x, target=classes,
                                                                         interpolate_mode=mode).detach()
    assert exp.pixel.shape == (2, 1, 3, 64, 64)
    diff = (exp.pixel[:, 0] - ref).abs().max().item()
    assert diff < TOL, diff
    assert ref.abs().max() > 1e-4  # a non-trivial comparison
    assert torch.equal(exp.raw, exp.pixel.abs().amax(dim=2))
    assert (exp.raw[:, 0] - ref.abs().amax(dim=1)).abs().max().item() < TOL


class OccNet(nn.Module):
    """Small CNN with BatchNorm, in eval mode; six logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 6)
        with torch.no_grad():
            self.fc.weight.mul_(30)  # score drops of order 1e-2 .. 1e-1, well above the tolerance
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _captum_occlusion(model, x, target, patch, stride, baselines=0.0):
    from captum.attr import Occlusion

    kh, kw = (patch, patch) if isinstance(patch, int) else patch
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    return Occlusion(model).attribute(x, sliding_window_shapes=(3, kh, kw), strides=(3, sh, sw),
                                      baselines=baselines, target=target, perturbations_per_eval=16).detach()


@pytest.mark.parametrize("size,patch,stride", [
    ((32, 32), 8, 4),        # windows tile the image exactly
    ((32, 32), 6, 4),        # (32 - 6) / 4 is not an integer: the last window is cut at the border
    ((30, 40), (6, 8), (4, 5)),  # rectangular image, patch and stride; cut windows on both axes
    ((32, 32), 5, 5),        # stride == patch, 32 not a multiple of 5
])
def test_occlusion_matches_captum(size, patch, stride):
    torch.manual_seed(0)
    model = OccNet().eval()
    x = _x(2, *size)
    classes = [1, 4]
    exp = camlens.explain(model, x, targets=[[c] for c in classes], method="occlusion", patch=patch, stride=stride,
                          batch_size=7)
    ref = _captum_occlusion(model, x, classes, patch, stride)
    assert torch.equal(ref[:, 0], ref[:, 1]) and torch.equal(ref[:, 0], ref[:, 2])  # same in every channel
    assert exp.raw.shape == (2, 1, *size)
    diff = (exp.raw[:, 0] - ref[:, 0]).abs().max().item()
    assert diff < TOL, diff
    assert ref.abs().max() > 1e-3


def test_occlusion_matches_captum_resnet18_all_targets_share_forwards(resnet18):
    x = _x(1, 32, 32)
    classes = [3, 281, 7]
    calls = []
    handle = resnet18.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        exp = camlens.explain(resnet18, x, targets=classes, method="occlusion", patch=7, stride=5, batch_size=16)
    finally:
        handle.remove()
    n_windows = (math.ceil((32 - 7) / 5) + 1) ** 2  # 36
    assert calls == [1, 16, 16, 4]  # the engine's forward, then the 36 windows once for all 3 targets
    assert sum(calls[1:]) == n_windows
    for t, c in enumerate(classes):
        ref = _captum_occlusion(resnet18, x, c, 7, 5)
        diff = (exp.raw[:, t] - ref[:, 0]).abs().max().item()
        assert diff < TOL, diff


def test_occlusion_blur_and_tensor_baselines_match_captum():
    from torchvision.transforms.functional import gaussian_blur

    torch.manual_seed(0)
    model = OccNet().eval()
    x = _x(2, 32, 32)
    blurred = gaussian_blur(x, [13, 13], [2.0, 2.0])
    exp = camlens.explain(model, x, targets=[2], method="occlusion", patch=6, stride=3, baseline="blur",
                          blur_sigma=2.0)
    ref = _captum_occlusion(model, x, 2, 6, 3, baselines=blurred)
    assert (exp.raw[:, 0] - ref[:, 0]).abs().max().item() < TOL
    zero = camlens.explain(model, x, targets=[2], method="occlusion", patch=6, stride=3)
    assert not torch.allclose(exp.raw, zero.raw, atol=1e-3)  # the fill really changed
    mean = torch.tensor([0.3, -0.2, 0.1]).view(3, 1, 1)
    exp = camlens.explain(model, x, targets=[2], method="occlusion", patch=6, stride=3, baseline=mean)
    ref = _captum_occlusion(model, x, 2, 6, 3, baselines=mean.expand(3, 32, 32)[None].expand(2, -1, -1, -1))
    assert (exp.raw[:, 0] - ref[:, 0]).abs().max().item() < TOL


@pytest.mark.parametrize("opts,err,msg", [
    ({"patch": 4, "stride": 6}, ValueError, "stride <= patch"),
    ({"patch": 40}, ValueError, "larger than the image"),
    ({"patch": 4, "baseline": "mean"}, ValueError, "'blur'"),
    ({"patch": 0}, TypeError, "positive int"),
    ({"patch": 4, "batch_size": 0}, ValueError, "batch_size"),
])
def test_occlusion_errors(opts, err, msg):
    model = OccNet().eval()
    with pytest.raises(err, match=msg):
        camlens.explain(model, _x(1, 32, 32), targets=[0], method="occlusion", **opts)


def test_guided_gradcam_bad_interpolate():
    with pytest.raises(ValueError, match="interpolate must be one of"):
        camlens.explain(_net(), _x(1, 32, 32), targets=[0], method="guided_gradcam", layer="conv3",
                        interpolate="cubic")


# ------------------------------------------------------------------------------ functional ReLUs

def test_guided_backprop_functional_relu_equals_module_relu():
    from captum.attr import GuidedBackprop

    mod = _net(ModuleNet)
    fun = _twin(mod, FunctionalNet)
    x = _x(2, 32, 32)
    plain_before = _plain_grad(fun, x, 4)
    e_fun = camlens.explain(fun, x, targets=[4, 1], method="guided_backprop")
    e_mod = camlens.explain(mod, x, targets=[4, 1], method="guided_backprop")
    assert torch.equal(e_fun.pixel, e_mod.pixel)
    assert torch.equal(e_fun.maps, e_mod.maps)
    # the guidance is applied: not the plain gradient, and equal to captum's hook-based version
    assert (e_fun.pixel[:, 0] - plain_before).abs().max() > 0.2 * plain_before.abs().max()
    ref = GuidedBackprop(_no_inplace(mod)).attribute(x, target=4).detach()
    assert (e_fun.pixel[:, 0] - ref).abs().max().item() < 1e-6
    # the dispatch mode is gone: plain gradients of the functional model are unchanged
    assert _get_current_dispatch_mode() is None
    assert torch.equal(_plain_grad(fun, x, 4), plain_before)
    g_fun = camlens.explain(fun, x, targets=[4], method="guided_gradcam", layer="conv3")
    g_mod = camlens.explain(mod, x, targets=[4], method="guided_gradcam", layer="conv3")
    assert torch.equal(g_fun.pixel, g_mod.pixel)


@pytest.mark.parametrize("cls", [ModuleNet, FunctionalReLU6Net])
def test_guided_backprop_relu6(cls):
    src = _net(ModuleNet, act=nn.ReLU6)
    net = _twin(src, cls, act=nn.ReLU6)
    with torch.no_grad():  # large activations so that the upper bound 6 matters
        net.conv1.weight.mul_(8)
    ref_net = _twin(net, ModuleNet, act=RefGuidedReLU6)
    x = _x(2, 32, 32)
    with torch.no_grad():
        assert (net.conv1(x) > 6).any()
    exp = camlens.explain(net, x, targets=[2, 5], method="guided_backprop")
    for t, c in enumerate([2, 5]):
        ref = _plain_grad(ref_net, x, c)
        assert (exp.pixel[:, t] - ref).abs().max().item() < 1e-6
        plain = _plain_grad(net, x, c)
        assert (exp.pixel[:, t] - plain).abs().max() > 0.2 * plain.abs().max()


# ------------------------------------------------------------------------------ multi-output

class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)

    def forward(self, x):
        return F.relu(self.conv2(torch.relu(self.conv1(x))))


class TwoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = Trunk()
        self.a = nn.Linear(16, 5)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        f = self.trunk(x).mean(dim=(2, 3))
        return {"a": self.a(f), "b": self.b(f)}


class OneHead(nn.Module):
    def __init__(self, trunk, head):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x):
        return self.head(self.trunk(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("method,opts", [
    ("guided_backprop", {}),
    ("guided_gradcam", {"layer": "trunk.conv2"}),
    ("occlusion", {"patch": 8, "stride": 6, "batch_size": 9}),
])
def test_multi_output_equals_single_head_models(method, opts):
    torch.manual_seed(0)
    two = TwoHead().eval()
    x = _x(2, 32, 32)
    exp = camlens.explain(two, x, targets=["a:2", "b:1"], method=method, **opts)
    assert exp.maps.shape == (2, 2, 32, 32)
    for t, (head, cls) in enumerate([(two.a, 2), (two.b, 1)]):
        single = camlens.explain(OneHead(two.trunk, head), x, targets=[cls], method=method, **opts)
        assert torch.allclose(exp.raw[:, t], single.raw[:, 0], atol=1e-6, rtol=0), method
        assert torch.allclose(exp.maps[:, t], single.maps[:, 0], atol=1e-5, rtol=0), method
        if single.pixel is not None:
            assert torch.allclose(exp.pixel[:, t], single.pixel[:, 0], atol=1e-6, rtol=0), method
    assert not torch.allclose(exp.raw[:, 0], exp.raw[:, 1])  # the heads really differ


# ------------------------------------------------------------------------------ model state

def _snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks)) for m in model.modules()],
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_unchanged(before, model):
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grad"])
    assert after["hooks"] == before["hooks"]
    assert after["grad_enabled"] == before["grad_enabled"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert _get_current_dispatch_mode() is None


class _Bomb(torch.autograd.Function):
    """Identity whose backward raises: fails inside the guided backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom in backward")


class StatefulNet(OccNet):
    """Train-mode BatchNorm + Dropout, one frozen parameter; optional failures."""

    def __init__(self, fail="never"):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fail = fail
        self.features[0].bias.requires_grad_(False)

    def forward(self, x):
        self.calls += 1
        if self.fail == "second forward" and self.calls == 2:
            raise RuntimeError("boom in forward")
        if self.fail == "backward" and torch.is_grad_enabled() and x.requires_grad:
            x = _Bomb.apply(x)
        return self.fc(self.drop(self.features(x).mean(dim=(2, 3))))


METHODS = [("guided_backprop", {}), ("guided_gradcam", {"layer": "features.3"}),
           ("occlusion", {"patch": 8, "stride": 8})]


@pytest.mark.parametrize("method,opts", METHODS)
@pytest.mark.parametrize("fail", ["never", "second forward", "backward"])
def test_model_state_restored(method, opts, fail):
    torch.manual_seed(0)
    model = StatefulNet(fail=fail).train()
    model.features[1].eval()  # mixed modes must come back as they were
    x = _x(2, 32, 32)
    before = _snapshot(model)
    raises = fail == "second forward" or (fail == "backward" and method != "occlusion")
    # one target when the backward fails: Runner.input_gradients retries a failed batched backward
    # target by target, which with T > 1 reports a freed graph instead of the original error
    targets = [1] if fail == "backward" else [1, 3]
    if raises:
        with pytest.raises(RuntimeError, match="boom"):
            camlens.explain(model, x, targets=targets, method=method, **opts)
    else:
        exp = camlens.explain(model, x, targets=targets, method=method, **opts)
        assert torch.isfinite(exp.maps).all()
    _assert_unchanged(before, model)
    model.fail = "never"
    plain = _plain_grad(model.eval(), x, 1)  # plain autograd still works afterwards
    assert torch.isfinite(plain).all() and plain.abs().max() > 0


def test_guided_maps_clip_outliers_but_pixel_is_raw():
    """The display map caps each map at its `clip` quantile; exp.pixel keeps the raw gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = torch.randn(1, 3, 20, 20)
    raw = camlens.explain(model, x, targets=1, method="guided_backprop", clip=1.0)
    clipped = camlens.explain(model, x, targets=1, method="guided_backprop", clip=0.9)
    assert torch.equal(raw.pixel, clipped.pixel)
    sal = raw.pixel.abs().amax(2)[0, 0]
    cap = torch.quantile(sal.flatten(), 0.9)
    expected = (torch.minimum(sal, cap) - sal.min()) / (cap - sal.min())
    assert torch.allclose(clipped.maps[0, 0], expected, atol=1e-6)
    assert (clipped.maps[0, 0] == 1).float().mean() >= 0.09  # the top 10 % saturate
    with pytest.raises(ValueError, match="quantile"):
        camlens.explain(model, x, targets=1, method="guided_backprop", clip=0.0)


@pytest.mark.parametrize("act,name", [(nn.GELU, "GELU"), (nn.SiLU, "SiLU"), (nn.Hardswish, "Hardswish")])
@pytest.mark.parametrize("method", ["guided_backprop", "guided_gradcam"])
def test_guided_backprop_refuses_non_relu_activations(act, name, method):
    """Guided backprop is a ReLU rule: through GELU / SiLU it would be a plain gradient by another name."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), act(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=rf"defined for ReLU networks.*runs {name}.*non_relu='plain'"):
        camlens.explain(net, x, targets=0, method=method, layer="2")
    plain = camlens.explain(net, x, targets=[0, 1], method=method, layer="2", non_relu="plain")
    xi = x.clone().requires_grad_(True)  # by hand: guided at the ReLU, the other activation's gradient plain
    if method == "guided_backprop":
        from camlens.backends.torch.guided import GuidedReLU
        out = net(xi)
        with GuidedReLU():
            g, = torch.autograd.grad(out[0, 1], xi)
        assert torch.allclose(plain.pixel[0, 1], g[0], atol=1e-6)
    assert torch.isfinite(plain.maps).all() and float(plain.maps.std()) > 0
