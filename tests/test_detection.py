"""Object detectors: raw outputs for callables, box targets, top-k detections, the default layer,
boxes on overlays and in saved files, and Grad-CAM agreement with pytorch-grad-cam on Faster R-CNN.

A synthetic detector (``Quadrants``) with a known answer keeps most tests fast; torchvision's
detectors (random weights, small inputs) check the default layer and the reference agreement.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.core.detection import BoxScore, box_iou
from camlens.core.errors import TargetError
from camlens.core.targets import RawHeads, split_outputs
from reference import forward_capturing

S = 32  # the synthetic detector's input side
QUADS = [(0.0, 0.0, 16.0, 16.0), (16.0, 0.0, 32.0, 16.0), (0.0, 16.0, 16.0, 32.0), (16.0, 16.0, 32.0, 32.0)]


class Quadrants(nn.Module):
    """A detector whose boxes are the four quadrants of a 32x32 image: the score of class k in
    quadrant q is ``sigmoid(mean of head channel k over q)``; detections above ``thresh``, best
    first, as torchvision's list of dicts. A box's score depends on its own quadrant's pixels (and
    the 1-pixel rim the 3x3 conv reads) only."""

    def __init__(self, classes: int = 3, thresh: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(6, classes, 1)
        self.thresh = thresh

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        f = self.head(self.body(x))  # (B, K, 32, 32)
        out = []
        for fb in f:
            scores = torch.stack([fb[:, int(y0):int(y1), int(x0):int(x1)].mean(dim=(1, 2))
                                  for x0, y0, x1, y1 in QUADS], dim=1).sigmoid()  # (K, 4)
            k, q = torch.meshgrid(torch.arange(scores.shape[0]), torch.arange(4), indexing="ij")
            s, k, q = scores.reshape(-1), k.reshape(-1), q.reshape(-1)
            keep = s > self.thresh
            order = torch.argsort(s[keep].detach(), descending=True)
            boxes = torch.tensor(QUADS)[q[keep][order]]
            out.append({"boxes": boxes, "labels": k[keep][order], "scores": s[keep][order]})
        return out


@pytest.fixture(scope="module")
def quad():
    torch.manual_seed(0)
    return Quadrants().eval()


@pytest.fixture(scope="module")
def xq():
    torch.manual_seed(1)
    return torch.rand(2, 3, S, S)


def _dets(model, x):
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------
# raw outputs and callables


def test_split_outputs_keeps_the_raw_output_it_cannot_flatten(quad, xq):
    out = _dets(quad, xq)
    heads = split_outputs(out)
    assert isinstance(heads, RawHeads) and len(heads) == 0 and heads.output is out and heads.batch == 2
    nested = (torch.zeros(2, 5), {"aux": torch.zeros(2, 3)})
    h = split_outputs(nested)
    assert isinstance(h, RawHeads) and list(h) == [0] and h.batch == 2  # the top-level tensor stays a head
    assert type(split_outputs({"a": torch.zeros(2, 3)})) is dict  # flattenable outputs as before


def test_callable_receives_the_raw_list_of_dicts(quad, xq):
    seen = []

    def first_detection(output):
        seen.append(output)
        return torch.stack([d["scores"][0] for d in output])

    exp = camlens.explain(quad, xq, first_detection, layer="body")
    assert all(isinstance(o, list) and set(o[0]) == {"boxes", "labels", "scores"} for o in seen)
    want = [float(d["scores"][0]) for d in _dets(quad, xq)]
    assert exp.scores[:, 0].tolist() == pytest.approx(want, abs=1e-6)
    assert exp.maps.shape == (2, 1, S, S) and float(exp.maps.amax()) == pytest.approx(1.0)


def test_class_target_on_a_detector_says_what_to_use(quad, xq):
    for t in (1, "0:1", "all"):
        with pytest.raises(TargetError, match=r"list of 2 dicts.*Target\.box.*callable") as e:
            camlens.explain(quad, xq, t, layer="body")
        assert "boxes" in str(e.value)


# ----------------------------------------------------------------------------------------------
# box targets


def test_box_target_score_is_the_matched_detection_score(quad, xq):
    out = _dets(quad, xq)
    # image 0: the top-right quadrant's class-2 detection; image 1: the bottom-left's class-0 one,
    # each given as a box shifted by 2 pixels (IoU < 1)
    picks = []
    for b, (q, c) in enumerate([(1, 2), (2, 0)]):
        i = next(i for i, (bx, lb) in enumerate(zip(out[b]["boxes"].tolist(), out[b]["labels"].tolist()))
                 if tuple(bx) == QUADS[q] and lb == c)
        picks.append((i, float(out[b]["scores"][i])))
    shifted = [tuple(v + 2 for v in QUADS[1]), tuple(v - 2 for v in QUADS[2])]
    targets = [[camlens.Target.box(shifted[0], cls=2)], [camlens.Target.box(shifted[1], cls=0, iou=0.5)]]
    exp = camlens.explain(quad, xq, targets, layer="body", categories=["cat", "dog", "owl"])
    assert exp.scores[:, 0].tolist() == pytest.approx([s for _, s in picks], abs=1e-6)
    for b, (i, s) in enumerate(picks):
        d = exp.targets[b][0].detection
        assert d.index == i and d.box == QUADS[(1, 2)[b]] and d.score == pytest.approx(s)
    assert exp.labels == [[f"owl {picks[0][1]:.2f}"], [f"cat {picks[1][1]:.2f}"]]
    assert torch.isnan(exp.probs).all()  # a detection's score is its own; no softmax over a head


def test_box_matching_rules():
    d = {"boxes": torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.], [1., 1., 11., 11.], [20., 20., 30., 30.]]),
         "labels": torch.tensor([1, 1, 2, 1]), "scores": torch.tensor([0.3, 0.6, 0.9, 0.8])}
    assert BoxScore((0, 0, 10, 10), 1, 0.5).match(d) == (1, 1.0)  # IoU tie: the higher score
    i, best = BoxScore((0, 0, 10, 10), 2, 0.5).match(d)  # only class 2 counts
    assert i == 2 and best == pytest.approx(81 / 119)
    assert BoxScore((0, 0, 10, 10), 2, 0.7).match(d) == (None, pytest.approx(81 / 119))
    assert BoxScore((0, 0, 10, 10), None, 0.5).match(d)[0] == 1
    assert box_iou((0, 0, 2, 2), np.array([[1, 1, 3, 3], [5, 5, 6, 6]])).tolist() == pytest.approx([1 / 7, 0.0])
    s = BoxScore((20, 20, 30, 30), 1, 0.5)([d, {k: v[:3] for k, v in d.items()}])  # 0 where nothing matches
    assert s.tolist() == pytest.approx([0.8, 0.0])


def _state(m):
    return (m.training, [(p.requires_grad, p.grad) for p in m.parameters()],
            [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in m.modules()],
            {k: v.clone() for k, v in m.state_dict().items()})


def test_box_target_no_match_is_a_clear_error(quad, xq):
    before = _state(quad)
    with pytest.raises(TargetError) as e:
        camlens.explain(quad, xq, [[camlens.Target.box(QUADS[0], cls=1)],
                                   [camlens.Target.box((0, 0, 4, 4), cls=1, iou=0.5)]],
                        layer="body", categories=["cat", "dog", "owl"])
    msg = str(e.value)
    assert "image 1" in msg and "(0.0, 0.0, 4.0, 4.0)" in msg and "class 1 (dog)" in msg
    assert "best IoU 0.062" in msg  # 16 / 256: the 4x4 box inside the 16x16 quadrant
    top = _dets(quad, xq)[1]
    assert f"{['cat', 'dog', 'owl'][int(top['labels'][0])]} {float(top['scores'][0]):.2f}" in msg
    assert "12 detections" in msg
    after = _state(quad)  # the model as it came, also after the error
    assert after[:3] == before[:3] and all(torch.equal(after[3][k], v) for k, v in before[3].items())
    with pytest.raises(TargetError, match="empty"):
        camlens.Target.box((5, 5, 5, 9))
    with pytest.raises(TargetError, match="iou"):
        camlens.Target.box((0, 0, 5, 9), iou=0)


def test_box_target_on_a_classifier_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(TargetError, match="box target.*not a list of per-image dicts"):
        camlens.explain(net, torch.rand(1, 3, 16, 16), camlens.Target.box((0, 0, 4, 4)), layer="0")


def test_occlusion_rematches_the_box_on_each_perturbed_input(quad, xq):
    """A quadrant's score reads its own pixels and the conv's 1-pixel rim: occluding elsewhere
    changes nothing, so the occlusion map of the top-left box is 0 beyond 16 + 1 pixels."""
    out = _dets(quad, xq)
    c = int(out[0]["labels"][(out[0]["boxes"] == torch.tensor(QUADS[0])).all(1)][0])
    exp = camlens.explain(quad, xq[:1], camlens.Target.box(QUADS[0], cls=c), method="occlusion", patch=4, stride=4,
                          relu=False)
    raw = exp.raw[0, 0]
    assert float(raw[:16, :16].abs().amax()) > 1e-5
    assert float(raw[20:, :].abs().amax()) == 0.0 and float(raw[:, 20:].abs().amax()) == 0.0


# ----------------------------------------------------------------------------------------------
# targets=None: the top detections


def test_top_k_detections_are_labelled_class_and_score(quad, xq):
    names = ["cat", "dog", "owl"]
    exp = camlens.explain(quad, xq, layer="body", top_k=2, categories=names)
    for b, d in enumerate(_dets(quad, xq)):
        want = [f"{names[int(d['labels'][i])]} {float(d['scores'][i]):.2f}" for i in range(2)]
        assert exp.labels[b] == want
        assert exp.scores[b].tolist() == pytest.approx(d["scores"][:2].tolist(), abs=1e-6)
        assert [tg.detection.box for tg in exp.targets[b]] == [tuple(d["boxes"][i].tolist()) for i in range(2)]
    one = camlens.explain(quad, xq, layer="body")  # top_k defaults to 1
    assert [r[0].label for r in one.targets] == [f"{r[0].cls} {r[0].detection.score:.2f}" for r in one.targets]


def test_top_k_beyond_the_detections_names_the_images(xq):
    torch.manual_seed(0)
    few = Quadrants().eval()
    few.thresh = float(torch.cat([d["scores"] for d in _dets(few, xq)]).median())
    counts = [len(d["scores"]) for d in _dets(few, xq)]
    assert min(counts) >= 1
    with pytest.raises(TargetError, match=r"top \d+ detection.*smaller top_k.*score threshold") as e:
        camlens.explain(few, xq, layer="body", top_k=max(counts) + 1)
    assert all(f"image {b}: {n}" in str(e.value) for b, n in enumerate(counts))
    short = min(counts)
    with pytest.raises(TargetError) as e:
        camlens.explain(few, xq, layer="body", top_k=short + 1)
    assert [f"image {b}: {n}" in str(e.value) for b, n in enumerate(counts)] == [n == short for n in counts]


# ----------------------------------------------------------------------------------------------
# boxes on pictures and in files


def test_grid_draws_each_detection_box_and_save_load_keeps_it(quad, xq, tmp_path):
    from matplotlib.patches import Rectangle

    from camlens.viz import explanation_grid

    exp = camlens.explain(quad, xq, layer="body", top_k=2, categories=["cat", "dog", "owl"])
    fig = explanation_grid(exp)
    cells = [ax for ax in fig.axes if ax.images]
    rects = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in cells]
    assert [len(r) for r in rects] == [1, 1, 1, 1]
    for ax, r, tg in zip(cells, rects, [t for row in exp.targets for t in row]):
        x0, y0, x1, y1 = tg.detection.box
        assert (r[0].get_x(), r[0].get_y(), r[0].get_width(), r[0].get_height()) == pytest.approx(
            (x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0))
        assert tg.label in [t.get_text() for t in ax.texts]
    back = camlens.load(exp.save(tmp_path / "det"))
    assert [[t.detection for t in row] for row in back.targets] == [[t.detection for t in row] for row in exp.targets]
    assert back.labels == exp.labels
    plain = camlens.load(camlens.explain(quad, xq, lambda o: torch.stack([d["scores"][0] for d in o]),
                                         layer="body").save(tmp_path / "fn"))
    assert plain.targets[0][0].detection is None and plain.targets[0][0].has_fn


def test_report_overlay_draws_the_box(quad, xq, tmp_path):
    from PIL import Image

    from camlens.fronts.report import write_explanation

    exp = camlens.explain(quad, xq[:1], camlens.Target.box(QUADS[3]), layer="body")
    summary = write_explanation(exp, tmp_path, "det")
    entry = summary[0]["targets"][0]
    assert entry["box"] == list(QUADS[3])
    pic = np.asarray(Image.open(tmp_path / entry["overlay"]))
    from camlens.viz.grid import display_from_inputs

    plain = camlens.viz.overlay(display_from_inputs(exp.inputs)[0], exp.maps[0, 0])
    changed = (pic != plain).any(-1)
    assert changed[31, 16:32].all() and changed[16:32, 31].all()  # the box's bottom and right edges
    assert not changed[17:, :15].any() and not changed[:4].any()  # nothing beside it, nothing above its tab


# ----------------------------------------------------------------------------------------------
# torchvision detectors (random weights)

def _small(name: str, **kw):
    """A torchvision detector with random weights, few classes, a small input size and a score
    threshold of 0, so that random weights still give detections."""
    tvd = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    base = dict(weights=None, weights_backbone=None, num_classes=5)
    if name.startswith("ssd"):
        base.update(score_thresh=0.0)
    elif name in ("retinanet_resnet50_fpn", "fcos_resnet50_fpn"):
        base.update(min_size=64, max_size=64, score_thresh=0.0)
    else:
        base.update(min_size=64, max_size=64, box_score_thresh=0.0, rpn_post_nms_top_n_test=20)
    base.update(kw)
    return getattr(tvd, name)(**base).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, layer", [
    ("fasterrcnn_resnet50_fpn", "backbone.body.layer4"),
    ("maskrcnn_resnet50_fpn", "backbone.body.layer4"),
    ("retinanet_resnet50_fpn", "backbone.body.layer4"),
    ("fcos_resnet50_fpn", "backbone.body.layer4"),
    ("ssdlite320_mobilenet_v3_large", "backbone.features.1"),
])
def test_default_layer_of_torchvision_detectors(name, layer):
    from camlens.backends.base import get_backend

    m = _small(name)
    x = torch.rand(1, 3, 64, 64)
    assert get_backend(m).default_layer(m, x) == layer


def _faster_rcnn(dtype=torch.float64):
    """Faster R-CNN (random weights) whose box regression is zeroed: its detection boxes are the
    RPN proposals, which torchvision detaches, so pytorch-grad-cam's extra IoU term has no
    gradient and its score gradient is the detection score's alone; class logits scaled by 0.1 so
    the softmax scores are not saturated."""
    m = _small("fasterrcnn_resnet50_fpn", min_size=128, max_size=128, rpn_pre_nms_top_n_test=100,
               rpn_post_nms_top_n_test=20, box_detections_per_img=10)
    with torch.no_grad():
        m.roi_heads.box_predictor.bbox_pred.weight.zero_()
        m.roi_heads.box_predictor.bbox_pred.bias.zero_()
        m.roi_heads.box_predictor.cls_score.weight.mul_(0.1)
    return m.to(dtype)


@pytest.mark.slow
def test_gradcam_box_target_matches_pytorch_grad_cam_on_faster_rcnn():
    """Grad-CAM of ``Target.box`` on ``backbone.body.layer4`` equals pytorch-grad-cam's GradCAM +
    FasterRCNNBoxScoreTarget (float64). Each image's box is its top detection's own box, so exactly
    one detection is the best match for both (pgc matches by IoU over all classes, first index on
    ties: the top one) and pgc's IoU term is constant (see _faster_rcnn)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    m = _faster_rcnn()
    torch.manual_seed(3)
    x = torch.rand(2, 3, 128, 128, dtype=torch.float64)
    out = _dets(m, x)
    boxes = [d["boxes"][0].tolist() for d in out]
    labels = [int(d["labels"][0]) for d in out]
    state = copy.deepcopy(m.state_dict())
    exp = camlens.explain(m, x, [[camlens.Target.box(b, cls=c)] for b, c in zip(boxes, labels)])
    assert exp.layers == ["backbone.body.layer4"]  # the default layer
    assert exp.scores[:, 0].tolist() == pytest.approx([float(d["scores"][0]) for d in out], rel=1e-6)  # (float32)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())

    ref = copy.deepcopy(m)
    layer = ref.backbone.body.layer4
    cam = GradCAM(model=ref, target_layers=[layer])
    targets = [FasterRCNNBoxScoreTarget(labels=[c], bounding_boxes=[np.array(b)]) for b, c in zip(boxes, labels)]
    final = cam(x, targets=targets)  # (B, H, W): ReLU, min-max, cv2 resize
    a, g = (t[0].cpu().numpy() for t in (cam.activations_and_grads.activations, cam.activations_and_grads.gradients))
    raw = cam.get_cam_image(x, layer, targets, a, g)  # (B, h, w): pgc's weighted sum before its ReLU
    cam.activations_and_grads.release()
    ours = exp.raw[:, 0].double().numpy()
    assert float(np.abs(raw).max()) > 0
    np.testing.assert_allclose(ours, raw, rtol=1e-6, atol=1e-6 * float(np.abs(raw).max()))
    # camlens' map: ReLU, bilinear upsample, min-max; pgc's: ReLU, min-max, cv2 resize (the same
    # bilinear sampling; measured 9e-7 apart, camlens' results being float32)
    np.testing.assert_allclose(exp.maps[:, 0].double().numpy(), final, atol=1e-5)


def test_tiling_a_detector_is_a_clear_error(quad, xq):
    from camlens.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tile=.*a list of \d+ dicts with keys \[.boxes."):
        camlens.explain(quad, xq, layer="body", tile=16, overlap=4)


# ----------------------------------------------------------------------------------------------
# D-RISE


def _positive_quadrants() -> Quadrants:
    """Every weight >= 0: each quadrant's scores grow with its own pixels (and nothing else's)."""
    torch.manual_seed(0)
    m = Quadrants().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.abs_()
    return m


def test_drise_equals_its_formula_on_the_masked_detections(xq):
    from camlens.backends.torch.ops import TorchOps
    from camlens.methods.drise import drise_masks

    m = _positive_quadrants()
    box = (2.0, 1.0, 17.0, 15.0)  # overlaps quadrant 0 with IoU 196 / 241
    exp = camlens.explain(m, xq, camlens.Target.box(box, cls=1), method="drise", n_masks=64, grid=4, p=0.5,
                          batch_size=32, mask_seed=5)
    ops = TorchOps()
    gen = ops.generator(5, xq)
    for b in range(2):
        masks = drise_masks(64, (S, S), 4, 0.5, ops, gen, xq)
        assert masks.shape == (64, S, S) and 0 <= float(masks.min()) and float(masks.max()) <= 1
        with torch.no_grad():
            outs = m(xq[b:b + 1] * masks[:, None])
        w = []
        for d in outs:  # by hand: max_j IoU(L_t, L_j) * s_j * [l_j == 1], L_t the explained detection's box
            iou = box_iou(QUADS[0], d["boxes"].numpy())
            w.append(float(np.max(iou * d["scores"].numpy() * (d["labels"].numpy() == 1))))
        assert exp.targets[b][0].detection.box == QUADS[0]
        want = torch.einsum("n,nhw->hw", torch.tensor(w), masks) / (64 * 0.5)
        torch.testing.assert_close(exp.raw[b, 0], want, rtol=1e-5, atol=1e-6)


def test_drise_finds_the_quadrant_a_detection_reads():
    """Quadrant 3's scores read its own pixels only (sigmoid(4 * mean(x) - 2) there): the D-RISE map
    of its detection peaks inside it and is higher there than in the far corner (8 mask seeds
    checked: margin 0.24 to 0.64, peak always inside)."""
    m = Quadrants().eval()
    with torch.no_grad():
        m.body[0].weight.zero_()
        m.body[0].bias.zero_()
        for i in range(3):
            m.body[0].weight[i, i, 1, 1] = 1.0  # the pixels themselves
        m.head.weight.zero_()
        m.head.weight[:, :3] = 4.0 / 3
        m.head.bias.fill_(-2.0)
    torch.manual_seed(4)
    x = torch.rand(1, 3, S, S)
    exp = camlens.explain(m, x, camlens.Target.box(QUADS[3], cls=0), method="drise", n_masks=300, grid=4, mask_seed=1)
    sal = exp.maps[0, 0]
    inside, far = float(sal[16:, 16:].mean()), float(sal[:8, :8].mean())
    assert inside > far + 0.2, (inside, far)
    peak = divmod(int(sal.argmax()), S)
    assert peak[0] >= 16 and peak[1] >= 16, peak  # the map's peak lies in the box


def test_drise_on_a_classifier_is_rise():
    """A class target's mask weight is its score centred over the masks: the map is
    sum_i (S(x * M_i) - mean_j S(x * M_j)) M_i / (N p)."""
    from camlens.backends.torch.ops import TorchOps
    from camlens.methods.drise import drise_masks

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(1, 3, 16, 16)
    exp = camlens.explain(net, x, [2, 0], method="drise", n_masks=32, grid=4, mask_seed=2, relu=False)
    ops = TorchOps()
    masks = drise_masks(32, (16, 16), 4, 0.5, ops, ops.generator(2, x), x)
    with torch.no_grad():
        s = net(x * masks[:, None])[:, [2, 0]]  # (N, T)
    want = torch.einsum("nt,nhw->thw", s - s.mean(0), masks) / 16
    assert float(want.abs().max()) > 1e-4
    torch.testing.assert_close(exp.raw[0], want, rtol=1e-4, atol=1e-6)


def test_nested_outputs_keep_their_top_level_tensor_heads():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            f = self.body(x)
            return self.fc(f.mean((2, 3))), {"aux": [f.sum((1, 2, 3))]}

    torch.manual_seed(0)
    net, x = Nested().eval(), torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        logits = net(x)[0]
    exp = camlens.explain(net, x, ["0:3", 3], layer="body")  # the tensor item is still head 0
    torch.testing.assert_close(exp.scores, logits[:, [3, 3]], atol=1e-6, rtol=0)
    top = camlens.explain(net, x, layer="body")
    assert [r[0].cls for r in top.targets] == logits.argmax(1).tolist()
    aux = camlens.explain(net, x, lambda out: out[1]["aux"][0], layer="body")  # the raw output
    assert aux.scores[:, 0].tolist() == pytest.approx(net(x)[1]["aux"][0].tolist(), rel=1e-5)
    with pytest.raises(TargetError, match=r"no output head 'aux'.*a tuple.*callable"):
        camlens.explain(net, x, "aux:0", layer="body")


def test_evaluate_scores_a_detection_map_by_the_matched_detection_score(quad, xq):
    """camlens.evaluate on a detector: the 'probability' of a box target is the score of the detection
    matched again on each perturbed input (detectors give scores as probabilities). Average Drop of the
    quadrant's own mask and of its complement equals the formula on the model's detections by hand."""
    box = QUADS[1]
    target = camlens.Target.box(box, cls=2)
    inside = torch.zeros(2, 1, S, S)
    inside[:, :, 0:16, 16:32] = 1.0
    maps = torch.cat([inside, 1 - inside], dim=1)  # (B, 2, H, W): the quadrant, and everything else
    scores = camlens.evaluate(quad, xq, maps, metrics=["average_drop", "deletion"], targets=[target, target])

    def matched(x):  # the class-2 detection on the quadrant's box, per image
        out = _dets(quad, x)
        return torch.stack([d["scores"][[i for i, (bx, lb) in enumerate(zip(d["boxes"].tolist(), d["labels"].tolist()))
                                         if tuple(bx) == box and lb == 2][0]] for d in out])

    Y = matched(xq)
    for t in range(2):
        O = matched(xq * maps[:, t:t + 1])
        want = (Y - O).clamp_min(0) / Y * 100
        assert scores["average_drop"][:, t].tolist() == pytest.approx(want.tolist(), abs=1e-4)
    # the quadrant's own mask keeps the detection (only the 1-pixel rim changes); its complement does not
    assert (scores["average_drop"][:, 0] < scores["average_drop"][:, 1]).all()
    assert (scores["deletion"][:, 0] < scores["deletion"][:, 1]).all()


def _fpn_transform(x, take_abs: bool = True, to: str = "pool"):
    """pytorch-grad-cam's ``fasterrcnn_reshape_transform`` (its Faster R-CNN tutorial's), written out:
    every FPN level (``abs`` of it) resized bilinearly to the 'pool' level's grid, concatenated."""
    size = x[to].shape[-2:]
    return torch.cat([torch.nn.functional.interpolate(v.abs() if take_abs else v, size, mode="bilinear")
                      for v in x.values()], dim=1)


@pytest.mark.slow
def test_fpn_dict_output_with_pgc_reshape_transform_eigencam_matches_pytorch_grad_cam():
    """The layer ``backbone`` returns an OrderedDict of FPN levels: pgc's tutorial's reshape_transform
    works unchanged, and Eigen-CAM equals pgc's EigenCAM (its tutorial's method) at the layer grid, up to
    the SVD's sign."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    m = _faster_rcnn()
    torch.manual_seed(4)
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64)
    out = _dets(m, x)
    target = camlens.Target.box(out[0]["boxes"][0].tolist(), cls=int(out[0]["labels"][0]))
    exp = camlens.explain(m, x, [target], method="eigencam", layer="backbone", reshape=_fpn_transform)
    with torch.no_grad():
        _, a = forward_capturing(m, m.backbone, x, read=_fpn_transform)
    ref = torch.from_numpy(get_2d_projection(a.numpy()))  # pgc's EigenCAM before its scaling
    assert exp.raw.shape == (1, 1, *ref.shape[-2:]) and float(ref.abs().max()) > 0
    err = min((exp.raw[0, 0].double() - s * ref[0]).abs().max().item() for s in (1, -1))
    assert err < 1e-4 * ref.abs().max().item(), err


@pytest.mark.slow
def test_fpn_dict_output_gradcam_equals_per_level_gradients_read_by_the_transform():
    """Grad-CAM on a dict layer: each level's gradient of the box score (one batched backward; the 'pool'
    level only feeds the detached proposals: zero), read by the same function as the activations."""
    m = _faster_rcnn()
    torch.manual_seed(5)
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64)
    out = _dets(m, x)
    box, cls = out[0]["boxes"][0].tolist(), int(out[0]["labels"][0])
    # linear (no abs), so gradients read alike; on the finest level's grid, where this small box's RoI
    # pooling puts its whole gradient
    linear = lambda d: _fpn_transform(d, take_abs=False, to="0")  # noqa: E731
    exp = camlens.explain(m, x, [camlens.Target.box(box, cls=cls)], layer="backbone", reshape=linear)
    d, levels = forward_capturing(m, m.backbone, x, read=dict)
    score = BoxScore(tuple(box), cls)(d)[0]
    grads = torch.autograd.grad(score, list(levels.values()), allow_unused=True)
    g = {k: torch.zeros_like(v) if gk is None else gk for (k, v), gk in zip(levels.items(), grads)}
    A, G = linear({k: v.detach() for k, v in levels.items()}), linear(g)
    ref = (G.mean((2, 3), keepdim=True) * A).sum(1)[0]
    assert float(ref.abs().max()) > 0
    assert (exp.raw[0, 0].double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_a_dict_layer_without_reshape_is_a_clear_error():
    class TwoLevels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def body(self, x):
            return {"fine": self.conv(x), "coarse": self.conv(x)[..., ::2, ::2]}

        def forward(self, x):
            return self.fc(self.levels(x)["coarse"].mean((2, 3)))

    net = TwoLevels()
    net.levels = _Levels(net)
    with pytest.raises(camlens.core.errors.LayerError, match=r"dict of 2 tensors.*'fine': \(1, 4, 8, 8\).*reshape="):
        camlens.explain(net, torch.rand(1, 3, 8, 8), targets=0, layer="levels")
    exp = camlens.explain(net, torch.rand(1, 3, 8, 8), targets=0, layer="levels", reshape=lambda d: d["coarse"])
    assert exp.raw.shape == (1, 1, 4, 4)


class _Levels(nn.Module):
    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self._owner = [owner]  # not a submodule

    def forward(self, x):
        return self._owner[0].body(x)
