"""Grad-CAM and CAM agree with pytorch-grad-cam and captum on the same model, input, layer and target.

The comparisons with peers run the models in float64. A Grad-CAM map is only piecewise smooth in
the input: ReLU masks and max-pool argmaxes after the layer decide where the gradient flows, and
random-weight models have near-ties there (vgg11, input seed 0, class 3: a ReLU input of -4.4e-7
at features.14 on a scale of 1.7, a max-pool window at features.20 whose two largest entries are
1e-6 apart). In float32 any change of summation order (NHWC vs NCHW kernels, CPU ISA, threads)
can flip such a tie and move the map by up to 5e-3 — measured: a 2e-7 relative perturbation of
the input does the same, and on some seeds the NCHW map is the one 4e-4 away from float64 while
NHWC matches. In float64 no tie is within reach of rounding, so the maps agree to 1e-5 on any
x86-64 CPU, whatever kernels run, and a real difference of convention would still show.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camlens
from camlens.core.postprocess import normalize

TOL = 1e-4
TOL64 = 1e-5  # float64 models: the remaining difference is camlens' float32 maths on their outputs


@pytest.fixture(scope="module")
def models64(resnet18, vgg11):
    """float64 copies of the session's models (same weights)."""
    return {"resnet18": copy.deepcopy(resnet18).double(), "vgg11": copy.deepcopy(vgg11).double()}


def _x(seed=0, b=2, size=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def _pgc_gradcam(model, layer_modules, x, classes):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=layer_modules) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    return torch.from_numpy(out)


def _captum_gradcam(model, layer_module, x, classes):
    from captum.attr import LayerAttribution, LayerGradCam

    attr = LayerGradCam(model, layer_module).attribute(x, target=list(classes), relu_attributions=True)
    up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return normalize(up.detach(), warn=False)[:, 0]


def _module(model, name):
    return dict(model.named_modules())[name]


CASES = [
    ("resnet18", "layer4", 0),
    ("resnet18", "layer3", 0),
    ("resnet18", "layer2.1", 0),  # inner layer
    ("vgg11", "features.20", 0),  # last MaxPool
    ("vgg11", "features.12", 0),  # inner ReLU (in-place); float32 NHWC flips a tie on some CPUs
    ("vgg11", "features.12", 1),  # float32: NHWC 3.5e-3 from NCHW on an AVX2 EPYC (a flipped tie)
]


@pytest.mark.parametrize("arch,layer,seed", CASES)
def test_gradcam_matches_pytorch_grad_cam_and_captum(arch, layer, seed, models64, request):
    model = models64[arch]
    x = _x(seed).double()  # a batch of 2 on CPU: camlens' auto layout runs it channels_last
    classes = [3, 281]
    exp = camlens.explain(model, x, targets=[[3], [281]], layer=layer)
    ours = exp.maps[:, 0]
    ref = _pgc_gradcam(model, [_module(model, layer)], x, classes).float()
    assert ours.shape == ref.shape == (2, 224, 224)
    assert torch.allclose(ours, ref, atol=TOL64), (ours - ref).abs().max()
    cap = _captum_gradcam(model, _module(model, layer), x, classes).float()
    assert torch.allclose(ours, cap, atol=TOL64), (ours - cap).abs().max()
    # the memory layout is no part of the result: auto (NHWC) equals NCHW to rounding
    nchw = camlens.explain(model, x, targets=[[3], [281]], layer=layer, channels_last=False).maps[:, 0]
    assert torch.allclose(ours, nchw, atol=TOL64), (ours - nchw).abs().max()
    # the maps are not trivially equal to anything: different classes give different maps
    fp32 = request.getfixturevalue(arch)
    other = camlens.explain(fp32, x.float(), targets=[[5], [7]], layer=layer).maps[:, 0]
    assert (other - ours).abs().max() > 0.05


def test_multi_target_equals_single_target_calls(models64):
    resnet18 = models64["resnet18"]  # float64: batched and single backwards may round differently
    x = _x(b=2, size=112).double()
    targets = [3, 281, 500, 999]
    exp = camlens.explain(resnet18, x, targets=targets, layer="layer3")
    assert exp.maps.shape == (2, 4, 112, 112)
    for t, c in enumerate(targets):
        single = camlens.explain(resnet18, x, targets=c, layer="layer3")
        assert torch.allclose(exp.maps[:, t], single.maps[:, 0], atol=1e-5)
        assert torch.allclose(exp.raw[:, t], single.raw[:, 0], atol=1e-5, rtol=1e-4)
        ref = _pgc_gradcam(resnet18, [resnet18.layer3], x, [c, c]).float()
        assert torch.allclose(exp.maps[:, t], ref, atol=TOL64)


def test_fused_layers_match_pytorch_grad_cam(models64):
    resnet18 = models64["resnet18"]
    x = _x(b=1).double()
    exp = camlens.explain(resnet18, x, targets=7, layer=["layer3", "layer4"], fuse="mean")
    ref = _pgc_gradcam(resnet18, [resnet18.layer3, resnet18.layer4], x, [7]).float()
    assert torch.allclose(exp.maps[:, 0], ref, atol=TOL64), (exp.maps[:, 0] - ref).abs().max()
    assert set(exp.raws) == {"layer3", "layer4"} and exp.raws["layer3"].shape[-1] == 14
    mx = camlens.explain(resnet18, x, targets=7, layer=["layer3", "layer4"], fuse="max")
    a14 = normalize(exp.raws["layer3"].clamp_min(0), warn=False)
    a = F.interpolate(a14, size=(224, 224), mode="bilinear")
    b = F.interpolate(normalize(exp.raws["layer4"].clamp_min(0), warn=False), size=(224, 224), mode="bilinear")
    assert torch.allclose(mx.maps, normalize(torch.maximum(a, b)), atol=1e-5)


def test_raw_is_weighted_sum_formula(resnet18):
    """raw = sum_c mean_ij(dS/dA) * A, computed by hand with a hook and autograd."""
    x = _x(b=1)
    store = {}
    h = resnet18.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = resnet18(x)
    finally:
        h.remove()
    a = store["a"]
    g, = torch.autograd.grad(out[:, 42].sum(), a)
    raw = (g.mean((2, 3), keepdim=True) * a).sum(1).detach()
    exp = camlens.explain(resnet18, x, targets=42, layer="layer4")
    assert torch.allclose(exp.raw[:, 0], raw, atol=1e-5, rtol=1e-4)
    assert torch.allclose(exp.scores[0, 0], out[0, 42].detach(), atol=1e-5)
    p = out.softmax(1)[0, 42]
    assert torch.allclose(exp.probs[0, 0], p, atol=1e-6)
    manual = normalize(F.interpolate(raw.clamp_min(0)[:, None], size=(224, 224), mode="bilinear",
                                     align_corners=False), warn=False)
    assert torch.allclose(exp.maps, manual, atol=1e-5)


class GapFc(torch.nn.Module):
    def __init__(self, k=10):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, k)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_cam_equals_gradcam_for_all_classes():
    torch.manual_seed(3)
    model = GapFc(10).eval()
    x = _x(b=2, size=32)
    cam = camlens.explain(model, x, targets="all", layer="features", method="cam")
    grad = camlens.explain(model, x, targets="all", layer="features", method="gradcam")
    assert cam.maps.shape == (2, 10, 32, 32)
    # raw CAM = h*w * raw Grad-CAM for a GAP+FC head
    hw = cam.raw.shape[-1] * cam.raw.shape[-2]
    assert torch.allclose(cam.raw, grad.raw * hw, atol=1e-5, rtol=1e-4)
    assert torch.allclose(cam.maps, grad.maps, atol=1e-5)
    # and the raw map averages to logit - bias
    logits = model(x).detach()
    assert torch.allclose(cam.raw.mean((2, 3)) + model.fc.bias, logits, atol=1e-5)


def test_cam_matches_torchcam_on_resnet18(resnet18):
    torchcam = pytest.importorskip("torchcam.methods")
    x = _x(b=1)
    # torchcam's CAM keeps negative evidence (no ReLU), like the CAM paper
    exp = camlens.explain(resnet18, x, targets=[281, 3], layer="layer4", method="cam", upsample=False, relu=False)
    with torchcam.CAM(resnet18, target_layer="layer4", fc_layer="fc") as extractor:
        out = resnet18(x)
        ref = [extractor(c, out)[0] for c in (281, 3)]
    for t in range(2):
        assert torch.allclose(exp.maps[0, t], ref[t][0], atol=TOL), (exp.maps[0, t] - ref[t][0]).abs().max()


def test_cam_explains_why_not_on_non_gap_model(vgg11):
    with pytest.raises(ValueError, match="global average pool|Linear"):
        camlens.explain(vgg11, _x(b=1), targets=1, layer="features", method="cam")
