"""The Grad-CAM family agrees with pytorch-grad-cam within 1e-4 on the same model, input, layer and target."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camlens
from camlens.methods.gradcam_family import first_component
from camlens.core.postprocess import normalize
from reference import forward_capturing

TOL = 1e-4
PGC = {"gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM", "layercam": "LayerCAM",
       "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM"}
CASES = [("resnet18", "layer4"), ("resnet18", "layer3"), ("vgg11", "features.20"), ("vgg11", "features.15")]


def _x(b=2, size=128, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pgc(name, model, layer, x, classes):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pytorch_grad_cam, PGC[name])
    with cls(model=model, target_layers=[dict(model.named_modules())[layer]]) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes]))


@pytest.mark.parametrize("arch,layer", CASES)
@pytest.mark.parametrize("method", ["gradcampp", "xgradcam", "hirescam", "layercam"])
def test_family_matches_pytorch_grad_cam(method, arch, layer, request):
    model = request.getfixturevalue(arch)
    x = _x()
    ours = camlens.explain(model, x, targets=[[3], [281]], layer=layer, method=method).maps[:, 0]
    ref = _pgc(method, model, layer, x, [3, 281])
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, diff
    assert ours.amax() == 1 and ref.std() > 0.05  # a real map, not a constant


def _pipeline(raw, size):
    return normalize(F.interpolate(raw.clamp_min(0)[:, None], size=size, mode="bilinear"), warn=False)[:, 0]


@pytest.mark.parametrize("arch,layer", CASES)
@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_eigen_methods_match_pytorch_grad_cam_up_to_the_svd_sign(method, arch, layer, request):
    """SVD's sign is arbitrary; pytorch-grad-cam keeps LAPACK's, camlens fixes it (positive correlation with the
    channel sum). The raw projections agree up to that sign; maps agree wherever the signs agree."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model = request.getfixturevalue(arch)
    x = _x()
    exp = camlens.explain(model, x, targets=[[3], [281]], layer=layer, method=method)
    out, a = forward_capturing(model, dict(model.named_modules())[layer], x)
    if method == "eigengradcam":
        g = torch.stack([torch.autograd.grad(out[b, c], a, retain_graph=True)[0][b] for b, c in enumerate([3, 281])])
        mat = (g * a).detach().numpy()
    else:
        mat = a.detach().numpy()
    ref_raw = torch.from_numpy(get_2d_projection(mat))
    ours_raw = exp.raw[:, 0]
    for b in range(2):
        s = torch.sign((ours_raw[b] * ref_raw[b]).sum())
        scale = ref_raw[b].abs().max()
        assert torch.allclose(ours_raw[b], s * ref_raw[b], atol=1e-4 * scale), (ours_raw[b] - s * ref_raw[b]).abs().max()
        ref_map = _pgc(method, model, layer, x[b:b + 1], [[3, 281][b]])[0] if s > 0 else _pipeline(-ref_raw[b:b + 1], x.shape[-2:])[0]
        assert (exp.maps[b, 0] - ref_map).abs().max() < TOL


def test_eigen_sign_points_towards_activation():
    """first_component's sign: correlated positively with the channel sum, whatever the input's sign flips."""
    torch.manual_seed(0)
    base = torch.zeros(1, 8, 6, 6)
    base[:, :, 2:4, 2:4] = torch.rand(1, 8, 2, 2) + 1  # a blob of activation in the middle
    base += 0.01 * torch.randn_like(base)
    p = first_component(base)[0]
    assert p[2:4, 2:4].mean() > p.mean() + 0.5 * p.std()
    assert torch.equal(first_component(base), first_component(base.clone()))


def test_eigencam_is_class_agnostic_and_needs_no_backward(resnet18, monkeypatch):
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    exp = camlens.explain(resnet18, _x(1), targets=[3, 281, 7], layer="layer4", method="eigencam")
    assert calls == []
    assert torch.equal(exp.maps[:, 0], exp.maps[:, 1]) and torch.equal(exp.maps[:, 0], exp.maps[:, 2])


def test_family_formulas_on_hand_built_tensors():
    """Closed forms on a 1-image, 1-target, 2-channel, 1x2 case computed by hand."""
    from camlens.methods import gradcam_family as fam

    A = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    G = torch.tensor([[[[[0.5, -1.0]], [[2.0, 1.0]]]]])  # (1, 1, 2, 1, 2)
    assert torch.allclose(fam.hirescam(A, G), torch.tensor([[[[0.5 + 4.0, -3.0 + 0.0]]]]))
    assert torch.allclose(fam.layercam(A, G), torch.tensor([[[[0.5 + 4.0, 0.0]]]]))
    w = torch.tensor([(0.5 - 3.0) / 4.0, (4.0 + 0.0) / 2.0])
    assert torch.allclose(fam.xgradcam(A, G), (w[:, None, None] * A[0]).sum(0)[None, None], atol=1e-6)
    # Grad-CAM++: alpha = g^2 / (2 g^2 + sumA g^3), w = sum alpha relu(g)
    def w_pp(g, s):
        return sum((gi ** 2 / (2 * gi ** 2 + s * gi ** 3 + 1e-6)) * max(gi, 0) for gi in g if gi != 0)
    wpp = torch.tensor([w_pp([0.5, -1.0], 4.0), w_pp([2.0, 1.0], 2.0)])
    assert torch.allclose(fam.gradcam_pp(A, G), (wpp[:, None, None] * A[0]).sum(0)[None, None], atol=1e-6)
