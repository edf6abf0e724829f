"""Target.region: a class of a segmentation output (B, K, h, w) summed over a mask, a box or the
pixels predicted as that class — against pytorch-grad-cam's SemanticSegmentationTarget on
torchvision FCN, and hand-computed scores on a net whose logits are at 1/4 of the input size."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.backends.base import get_backend
from camlens.core.regions import Region

S = 32  # tiny net input; its output is S/4 = 8


class QuarterSeg(nn.Module):
    """Per-pixel logits ``(B, 4, S/4, S/4)``; ``feat`` is the last (B, 8, S/4, S/4) map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU())
        self.cls = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = self.body(x)
        return {"features": f.mean((2, 3)), "seg": self.cls(f)}


@pytest.fixture(scope="module")
def quarter():
    return QuarterSeg().eval()


def _x(b=2, size=S, seed=0, dtype=torch.float32):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_box_and_mask_scores_at_quarter_resolution(quarter):
    x = _x()
    seg = quarter(x)["seg"].detach()  # (2, 4, 8, 8)
    box = (4, 8, 20, 24)  # input pixels [4, 20) x [8, 24): output centres 4j+2 in it: j = 1..4, i = 2..5
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[3:13, 17:30] = True  # at the input resolution: nearest at pixel centres 4i+2
    exp = camlens.explain(quarter, x, [camlens.Target.region(box, cls=1), camlens.Target.region(mask, cls=3)],
                          layer=quarter.body[3])
    by_box = seg[:, 1, 2:6, 1:5].sum((1, 2))
    by_mask = (seg[:, 3] * mask[2::4, 2::4]).sum((1, 2))
    assert torch.allclose(exp.scores, torch.stack([by_box, by_mask], 1), atol=1e-5)
    near = F.interpolate(mask[None, None].float(), size=(8, 8), mode="nearest-exact")[0, 0]
    assert torch.equal(near.bool(), mask[2::4, 2::4])  # the documented convention is torch's nearest-exact
    assert exp.labels[0] == ["seg: 1 (region)", "seg: 3 (region)"]  # "features" is (B, C): skipped
    # an output-resolution mask is used as it is; a soft (0-1) mask weights the pixels
    soft = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    got = camlens.explain(quarter, x, camlens.Target.region(soft.numpy(), cls=0), layer=quarter.body[3]).scores
    assert torch.allclose(got[:, 0], (seg[:, 0] * soft).sum((1, 2)), atol=1e-5)


def test_gradcam_of_a_region_is_the_gradient_of_the_masked_sum(quarter):
    x = _x(1, seed=2)
    box = (0, 0, 16, 12)
    exp = camlens.explain(quarter, x, camlens.Target.region(box, cls=2), layer=quarter.body[3])
    feats = {}
    h = quarter.body[3].register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    try:
        seg = quarter(x)["seg"]
    finally:
        h.remove()
    a = feats["a"]
    score = seg[0, 2, 0:3, 0:4].sum()  # rows with centres 2, 6, 10 < 12; columns 2, 6, 10, 14 < 16
    g, = torch.autograd.grad(score, a)
    ref = (g.mean((2, 3), keepdim=True) * a).sum(1)[0].detach()
    assert torch.allclose(exp.raw[0, 0], ref, atol=1e-6) and ref.abs().max() > 1e-4


def test_per_image_masks_and_perturbation_methods(quarter):
    """(B, H, W) masks: image b is scored on mask b by every method (Score-CAM and occlusion score
    N perturbed copies of image b alone): the batch gives the maps of each image explained alone."""
    x = _x(2, seed=3)
    masks = np.zeros((2, S, S), dtype=np.float32)
    masks[0, :16] = 1
    masks[1, :, 20:] = 1
    for method, kw in [("gradcam", {}), ("scorecam", {}), ("occlusion", {"patch": 8})]:
        both = camlens.explain(quarter, x, camlens.Target.region(masks, cls=1), layer=quarter.body[3],
                               method=method, **kw)
        for b in range(2):
            one = camlens.explain(quarter, x[b:b + 1], camlens.Target.region(masks[b], cls=1),
                                  layer=quarter.body[3], method=method, **kw)
            assert torch.allclose(both.maps[b], one.maps[0], atol=1e-5), (method, b)
            assert torch.allclose(both.scores[b], one.scores[0], atol=1e-5)
    boxes = [(0, 0, 16, 16), (16, 16, 32, 32)]  # one box per image
    seg = quarter(x)["seg"].detach()
    got = camlens.explain(quarter, x, camlens.Target.region(boxes, cls=0), layer=quarter.body[3]).scores[:, 0]
    assert torch.allclose(got, torch.stack([seg[0, 0, :4, :4].sum(), seg[1, 0, 4:, 4:].sum()]), atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*maps are constant")  # occluding may only raise this score
def test_predicted_region_is_fixed_at_the_explained_forward(quarter):
    x = _x(2, seed=4)
    seg = quarter(x)["seg"].detach()
    c = int(seg.argmax(1).flatten().mode().values)
    exp = camlens.explain(quarter, x, camlens.Target.region(cls=c), layer=quarter.body[3], method="occlusion",
                          patch=8)
    ref = (seg[:, c] * (seg.argmax(1) == c)).sum((1, 2))
    assert torch.allclose(exp.scores[:, 0], ref, atol=1e-5)
    assert exp.labels[0][0] == f"seg: {c} (predicted)"
    down = camlens.explain(quarter, x, camlens.Target.region(cls=c, sign=-1), layer=quarter.body[3])
    assert torch.allclose(down.scores[:, 0], -ref, atol=1e-5) and down.labels[0][0].endswith("(predicted) (decrease)")
    named = camlens.explain(quarter, x, camlens.Target.region(cls="road", head="seg"), layer=quarter.body[3],
                            categories={"seg": ["sky", "road", "car", "tree"]})
    assert named.targets[0][0].cls == 1 and named.labels[0][0] == "seg: road (predicted)"


def test_region_errors_say_what_to_do(quarter):
    x = _x(1)
    layer = quarter.body[3]
    with pytest.raises(camlens.CamlensError, match="covers no pixel of the 8x8 output"):
        camlens.explain(quarter, x, camlens.Target.region((1, 1, 2, 2), cls=0), layer=layer)  # no centre inside
    with pytest.raises(camlens.CamlensError, match=r"fits neither the input \(32x32\) nor the output \(8x8\)"):
        camlens.explain(quarter, x, camlens.Target.region(np.ones((10, 10), bool), cls=0), layer=layer)
    with pytest.raises(camlens.CamlensError, match="class 7 out of range"):
        camlens.explain(quarter, x, camlens.Target.region(cls=7), layer=layer)
    with pytest.raises(camlens.CamlensError, match=r"x1 > x0"):
        camlens.explain(quarter, x, camlens.Target.region((5, 5, 5, 9), cls=0), layer=layer)
    with pytest.raises(camlens.CamlensError, match=r"values in \[0, 2\]"):
        camlens.explain(quarter, x, camlens.Target.region(2.0 * np.eye(8), cls=0), layer=layer)
    with pytest.raises(camlens.CamlensError, match=r"2 boxes for a batch of 1"):
        camlens.explain(quarter, x, camlens.Target.region([(0, 0, 8, 8), (0, 0, 8, 8)], cls=0), layer=layer)
    with pytest.raises(camlens.CamlensError, match=r"explains a \(B, K, h, w\) output"):
        camlens.explain(quarter, x, camlens.Target.region(cls=0, head="features"), layer=layer)
    with pytest.raises(camlens.CamlensError, match="does not combine with tile="):
        camlens.explain(quarter, _x(1, 64), camlens.Target.region(cls=0), layer=layer, tile=32, overlap=8)
    cls_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(camlens.CamlensError, match=r"needs a \(B, K, h, w\) output"):
        camlens.explain(cls_net, x, camlens.Target.region(cls=0), layer=cls_net[1])
    with pytest.raises(camlens.CamlensError, match="Target.region"):  # targets=None on a segmentation model
        camlens.explain(QuarterSegOnly(), x, layer="body.3")
    assert isinstance(camlens.Target.region(cls=0).fn, Region)


class QuarterSegOnly(QuarterSeg):
    def forward(self, x):
        return self.cls(self.body(x))


# ----------------------------------------------------------------------------------------------
# torchvision segmentation models (random weights)


class OutOnly(nn.Module):
    """pytorch-grad-cam needs a tensor output: torchvision's ``["out"]``."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)["out"]


@pytest.mark.slow
def test_fcn_regions_match_pytorch_grad_cam_semantic_segmentation_target():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True).eval().double()
    x = _x(2, 48, seed=0, dtype=torch.float64)
    out = model(x)["out"].detach()
    pred = out.argmax(1).numpy()  # (2, 48, 48)
    c = int(np.bincount(pred.ravel()).argmax())
    box_mask = np.zeros((48, 48), np.float32)
    box_mask[10:40, 20:44] = 1
    before = copy.deepcopy(model.state_dict())
    exp = camlens.explain(model, x, [camlens.Target.region(cls=c), camlens.Target.region((20, 10, 44, 40), cls=2)])
    assert exp.layers == ["backbone.layer4"]  # layer=None: the backbone's last stage, not the classifier
    assert exp.labels[0] == [f"out: {c} (predicted)", "out: 2 (region)"]  # head None: "out", not "aux"
    with GradCAM(model=OutOnly(model), target_layers=[model.backbone.layer4]) as cam:
        ref_pred = cam(input_tensor=x, targets=[SemanticSegmentationTarget(c, (pred[b] == c).astype(np.float32))
                                                for b in range(2)])
        ref_box = cam(input_tensor=x, targets=[SemanticSegmentationTarget(2, box_mask) for _ in range(2)])
    err_pred = np.abs(exp.maps[:, 0].numpy() - ref_pred).max()
    err_box = np.abs(exp.maps[:, 1].numpy() - ref_box).max()
    assert err_pred < 1e-4 and err_box < 1e-4, (err_pred, err_box)
    scores = [[(out[b, c] * torch.from_numpy(pred[b] == c)).sum(), (out[b, 2] * torch.from_numpy(box_mask)).sum()]
              for b in range(2)]
    assert torch.allclose(exp.scores.double(), torch.tensor(scores, dtype=torch.float64), rtol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("name,aux,layer", [("deeplabv3_resnet50", False, "backbone.layer4"),
                                            ("lraspp_mobilenet_v3_large", None, "backbone.16")])
def test_default_layer_of_torchvision_segmentation_models_is_the_backbone(name, aux, layer):
    from torchvision.models import segmentation

    kw = {} if aux is None else {"aux_loss": aux}
    torch.manual_seed(0)
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=5, **kw).eval()
    x = _x(1, 48)
    assert get_backend(model).default_layer(model, x) == layer  # the last stage / block, not the classifier
    exp = camlens.explain(model, x, camlens.Target.region(cls=1), layer=layer)
    assert exp.layers == [layer] and exp.targets[0][0].head == "out"


def test_regions_and_activations_are_framework_free():
    """The same resolution and scores on NumPy outputs as on torch ones (array-API maths only)."""
    from camlens.core.targets import resolve_targets, target_probabilities

    g = np.random.default_rng(0)
    seg = g.standard_normal((2, 3, 8, 8))
    logits = g.standard_normal((2, 4))
    box, mask = (4, 8, 20, 24), g.random((32, 32)) > 0.5
    specs = [camlens.Target.region(box, cls=1, head="seg"), camlens.Target.region(mask, cls=2, head="seg"),
             camlens.Target.region(cls=0, head="seg", sign=-1), ("logits", 3)]
    out = {}
    for name, wrap in (("numpy", np.asarray), ("torch", torch.from_numpy)):
        heads = {"logits": wrap(logits), "seg": wrap(seg)}
        rows = resolve_targets(specs, heads, input_size=(32, 32), activation={"logits": "sigmoid"})
        scores = [[float(tg.score(heads, None)[b]) for tg in row] for b, row in enumerate(rows)]
        probs = np.asarray(target_probabilities(rows, heads), dtype=np.float64)
        out[name] = (np.array(scores), probs)
    np.testing.assert_allclose(out["numpy"][0], out["torch"][0], atol=1e-9)
    np.testing.assert_allclose(out["numpy"][1], out["torch"][1], atol=1e-6, equal_nan=True)
    ref = [seg[:, 1, 2:6, 1:5].sum((1, 2)), (seg[:, 2] * mask[2::4, 2::4]).sum((1, 2)),
           -(seg[:, 0] * (seg.argmax(1) == 0)).sum((1, 2)), logits[:, 3]]
    np.testing.assert_allclose(out["numpy"][0], np.stack(ref, 1), atol=1e-9)
    assert np.isnan(out["numpy"][1][:, :3]).all()  # regions have no probability
    np.testing.assert_allclose(out["numpy"][1][:, 3], 1 / (1 + np.exp(-logits[:, 3])), atol=1e-6)
