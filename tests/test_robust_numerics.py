"""Numerics that must not depend on the scale of the score, the CPU or the memory layout."""

import warnings

import pytest
import torch

import camlens
from camlens.core.postprocess import normalize


def _x(seed=0, b=1, size=64):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [1e-11, 1e-20, 1e-30])
def test_gradcam_does_not_depend_on_the_scale_of_the_score(resnet18, scale):
    """A map is constant only relative to its own magnitude: a tiny score gives the same map."""
    import copy

    x = _x()
    ref = camlens.explain(resnet18, x, targets=[3], layer="layer3").maps
    small = copy.deepcopy(resnet18)
    with torch.no_grad():
        small.fc.weight.mul_(scale)
        small.fc.bias.mul_(scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "no positive evidence" warning
        got = camlens.explain(small, x, targets=[3], layer="layer3").maps
    assert got.amax() == 1.0
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_tiny_maps_are_normalised_and_constant_maps_are_told_apart():
    m = torch.zeros(1, 3, 4, 4)
    m[0, 0] = torch.linspace(-3e-15, 3e-15, 16).view(4, 4)  # tiny but valid
    m[0, 1] = 0.0  # no positive evidence
    m[0, 2] = 0.25  # numerically flat
    m[0, 2, 0, 0] = 0.25 * (1 + 1e-8)  # below float32 resolution of 0.25: still flat
    with pytest.warns(RuntimeWarning) as rec:
        out = normalize(m)
    msg = str(rec[0].message)
    assert "2 of 3 maps are constant" in msg and "1 have no positive evidence" in msg and "1 are numerically flat" in msg
    assert torch.isfinite(out).all()
    assert out[0, 0].min() == 0 and out[0, 0].max() == 1
    assert torch.allclose(out[0, 0], ((m[0, 0] - m[0, 0].min()) / (m[0, 0].max() - m[0, 0].min())), atol=1e-6)
    assert (out[0, 1:] == 0).all()


def test_subnormal_and_huge_maps_stay_finite():
    m = torch.tensor([[[[0.0, 1e-38], [2e-38, 4e-38]]], [[[-3e38, 0.0], [1e38, 3e38]]]])
    out = normalize(m, warn=False)
    assert torch.isfinite(out).all()
    assert out[0, 0].max() == 1 and out[1, 0].min() == 0 and out[1, 0].max() == 1


def test_efficientnet_b0_gradcam_matches_pytorch_grad_cam():
    """torchvision efficientnet_b0 (random weights) has raw Grad-CAM maps of ~1e-15: still a map."""
    tv = pytest.importorskip("torchvision")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = tv.models.efficientnet_b0().eval()
    x = _x(size=96)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        exp = camlens.explain(model, x, targets=[1], layer="features.8")
    with GradCAM(model=model, target_layers=[model.features[8]]) as cam:
        ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(1)]))
    assert exp.raw.abs().max() < 1e-6  # the case in point: a tiny raw map
    # pytorch-grad-cam's scale_cam_image divides by (max + 1e-7): with a raw map of ~1e-15 its
    # peak lands below 1 (0.46 here); the shape of the map is the same, so compare up to that scale
    assert 0.1 < ref.max() < 1
    ref = ref / ref.max()
    assert torch.allclose(exp.maps[:, 0], ref, atol=1e-5), (exp.maps[:, 0] - ref).abs().max()


def test_guided_backprop_on_mobilenet_v3_large_is_not_zeroed():
    tv = pytest.importorskip("torchvision")
    from captum.attr import GuidedBackprop

    torch.manual_seed(0)
    model = tv.models.mobilenet_v3_large().eval()
    x = _x(size=224)  # random weights: input gradients of ~1e-12, below the old absolute 1e-12 threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no false "no positive evidence" warning
        exp = camlens.explain(model, x, targets=[1], method="guided_backprop", non_relu="plain")
    with pytest.raises(ValueError, match="defined for ReLU networks.*Hardswish"):  # its Hardswish: not by default
        camlens.explain(model, x, targets=[1], method="guided_backprop")
    ref = GuidedBackprop(model).attribute(x.clone(), target=1)  # captum guides the ReLUs only, silently
    scale = ref.abs().max()
    assert 0 < scale < 1e-10  # the case in point: tiny gradients
    assert torch.allclose(exp.pixel[:, 0], ref, atol=1e-5 * float(scale))  # the same gradients as captum
    assert exp.maps.amax() == 1.0 and exp.maps.amin() == 0.0 and torch.isfinite(exp.maps).all()
    assert (exp.maps > 0).float().mean() > 0.1  # a real map, not one hot pixel
