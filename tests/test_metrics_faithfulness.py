"""Faithfulness and complexity metrics: hand-computed cases, ordering on a linear model, agreement with
pytorch-grad-cam, torchcam, Quantus and a plain RISE loop, and camlens.evaluate's batching / multi-output."""

import contextlib
import math

import pytest
import torch
from torch import nn

import camlens
from camlens.metrics import auc, get_metric
from camlens.metrics.faithfulness import gaussian_blur, gini


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


class LinearPixels(nn.Module):
    """Two logits ``z_k = Σ w_k ⊙ x``: softmax P(class 0) = sigmoid(Σ (w_0 - w_1) ⊙ x)."""

    def __init__(self, w: torch.Tensor):  # w (2, C, H, W)
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.w)


def tiny_model() -> LinearPixels:
    # one channel, 2 x 2 pixels, x = 1: per-pixel logit difference d = w_0 - w_1 = [2, 1, 0, -1]
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0] = torch.tensor([[2.0, 1.0], [0.0, -1.0]])
    return LinearPixels(w).eval()


ONES = torch.ones(1, 1, 2, 2)
HAND_MAP = torch.tensor([[[[0.9, 0.1], [0.5, 0.3]]]])  # order: p0, p2, p3, p1


# ------------------------------------------------------------------------------------ hand-computed cases


def test_deletion_by_hand_one_pixel_per_step():
    s = camlens.evaluate(tiny_model(), ONES, HAND_MAP, ["deletion"], targets=[0], options={"deletion": {"step": 1}})
    # removing p0 (d=2), p2 (0), p3 (-1), p1 (1): logit 2 -> 0 -> 0 -> 1 -> 0
    curve = [sig(2), 0.5, 0.5, sig(1), 0.5]
    assert s.curves["deletion"].shape == (1, 1, 5)
    assert torch.allclose(s.curves["deletion"][0, 0], torch.tensor(curve), atol=1e-6)
    expected = (sum(curve) - curve[0] / 2 - curve[-1] / 2) / 4
    assert s["deletion"].item() == pytest.approx(expected, abs=1e-6)
    # class 1 is the complement
    s1 = camlens.evaluate(tiny_model(), ONES, HAND_MAP, ["deletion"], targets=[1], options={"deletion": {"step": 1}})
    assert torch.allclose(s1.curves["deletion"][0, 0], 1 - torch.tensor(curve), atol=1e-6)


def test_deletion_step_not_dividing_pixels_and_ties_in_raster_order():
    # step 3 on 4 pixels: n = ceil(4 / 3) = 2 steps, moving 3 then 1 pixels
    s = camlens.evaluate(tiny_model(), ONES, HAND_MAP, ["deletion"], targets=[0], options={"deletion": {"step": 3}})
    curve = [sig(2), sig(1), 0.5]  # after p0, p2, p3 only p1 (d=1) is left
    assert torch.allclose(s.curves["deletion"][0, 0], torch.tensor(curve), atol=1e-6)
    assert s["deletion"].item() == pytest.approx((curve[0] / 2 + curve[1] + curve[2] / 2) / 2, abs=1e-6)
    assert torch.allclose(s.extra["deletion"]["fractions"], torch.tensor([0.0, 0.75, 1.0]))
    # a constant map: pixels leave in raster order p0, p1, p2, p3: logit 2 -> 0 -> -1 -> -1 -> 0
    flat = torch.full((1, 1, 2, 2), 0.5)
    s = camlens.evaluate(tiny_model(), ONES, flat, ["deletion"], targets=[0], options={"deletion": {"step": 1}})
    assert torch.allclose(s.curves["deletion"][0, 0], torch.tensor([sig(2), 0.5, sig(-1), sig(-1), 0.5]), atol=1e-6)


def test_deletion_substrate_constant_and_insertion_by_hand():
    # substrate 1.0 on x = 2: a deleted pixel keeps half its contribution
    x = 2 * ONES
    s = camlens.evaluate(tiny_model(), x, HAND_MAP, ["deletion"], targets=[0],
                         options={"deletion": {"step": 1, "substrate": 1.0}})
    assert torch.allclose(s.curves["deletion"][0, 0], torch.tensor([sig(4), sig(2), sig(2), sig(3), sig(2)]), atol=1e-6)
    # insertion from a zero start: revealing p0, p2, p3, p1: logit 0 -> 2 -> 2 -> 1 -> 2
    s = camlens.evaluate(tiny_model(), ONES, HAND_MAP, ["insertion"], targets=[0],
                         options={"insertion": {"step": 1, "substrate": 0.0}})
    curve = [0.5, sig(2), sig(2), sig(1), sig(2)]
    assert torch.allclose(s.curves["insertion"][0, 0], torch.tensor(curve), atol=1e-6)
    assert s["insertion"].item() == pytest.approx((sum(curve) - curve[0] / 2 - curve[-1] / 2) / 4, abs=1e-6)


def test_confidence_change_by_hand():
    # map keeps only p1 (d=1): class 0 drops from sigmoid(2) to sigmoid(1); class 1 rises
    m = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]).expand(1, 2, 2, 2)
    s = camlens.evaluate(tiny_model(), ONES, m, ["average_drop", "increase_in_confidence", "average_gain"],
                         targets=[0, 1])
    y0, o0 = sig(2), sig(1)
    y1, o1 = 1 - y0, 1 - o0
    assert s["average_drop"][0].tolist() == pytest.approx([(y0 - o0) / y0 * 100, 0.0], abs=1e-4)
    assert s["increase_in_confidence"][0].tolist() == [0.0, 1.0]
    assert s["average_gain"][0].tolist() == pytest.approx([0.0, (o1 - y1) / (1 - y1) * 100], abs=1e-4)
    assert torch.allclose(s.extra["average_drop"]["Y"], torch.tensor([[y0, y1]]), atol=1e-6)
    # the map is min-maxed first (normalize=True): an affine copy gives the same numbers
    s2 = camlens.evaluate(tiny_model(), ONES, 0.5 * m + 0.2, ["average_drop"], targets=[0, 1])
    assert torch.allclose(s2["average_drop"], s["average_drop"], atol=1e-5)
    s3 = camlens.evaluate(tiny_model(), ONES, 0.5 * m + 0.2, ["average_drop"], targets=[0, 1],
                          options={"average_drop": {"normalize": False}})
    o0_raw = sig(2 * 0.2 + 1 * 0.7 - 1 * 0.2)  # E = x * (0.5 m + 0.2)
    assert s3["average_drop"][0, 0].item() == pytest.approx((y0 - o0_raw) / y0 * 100, abs=1e-4)


def test_gini_known_vectors():
    assert gini(torch.full((10,), 0.3)).item() == pytest.approx(0.0, abs=1e-7)
    assert gini(torch.zeros(10)).item() == 0.0
    for n in (2, 5, 64):
        onehot = torch.zeros(n)
        onehot[n // 2] = 0.7
        assert gini(onehot).item() == pytest.approx((n - 1) / n, abs=1e-7)
    assert gini(torch.tensor([0.0, 1.0, 0.0, 1.0])).item() == pytest.approx(0.5, abs=1e-7)  # (1 + 3) / (4 * 2)
    assert gini(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx((-2 * 1 + 0 * 2 + 2 * 3) / (3 * 6), abs=1e-7)
    v = torch.rand(3, 50)
    assert torch.allclose(gini(v), gini(5 * v[:, torch.randperm(50)]), atol=1e-6)  # scale and order invariant
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0] = 1.0
    maps[0, 1, 1, 2] = 1.0
    model = LinearPixels(torch.zeros(2, 1, 4, 4)).eval()
    s = camlens.evaluate(model, torch.ones(1, 1, 4, 4), maps, ["sparseness"], targets=[0, 1])
    assert s["sparseness"][0].tolist() == pytest.approx([0.0, 15 / 16], abs=1e-6)


@pytest.mark.slow  # importing Quantus takes ~7 s
def test_gini_agrees_with_quantus(quantus):
    a = torch.rand(6, 1, 12, 12) ** 3
    ref = quantus.Sparseness(disable_warnings=True).evaluate_batch(x_batch=None, a_batch=a.numpy().astype("float64"))
    ours = gini(a.flatten(1))
    assert torch.allclose(ours.double(), torch.as_tensor(ref), atol=1e-4)  # Quantus adds 1e-7 to every entry


def test_directions_and_categories():
    want = {"deletion": False, "insertion": True, "average_drop": False, "increase_in_confidence": True,
            "average_gain": True, "sparseness": True}
    for name, hib in want.items():
        m = get_metric(name)
        assert m.higher_is_better is hib, name
        assert m.category == ("complexity" if name == "sparseness" else "faithfulness")
        assert m.arrow == ("↑" if hib else "↓")


# ------------------------------------------------------------------------------ ordering on a linear model


def test_ordering_gradient_x_input_random_inverted():
    """For P = sigmoid(Σ_p c_p) with a constant second logit, removing the pixels of largest
    contribution c_p = Σ_c w_c x_c first gives the pointwise lowest deletion curve (zero substrate),
    and revealing them first the highest insertion curve (zero start): gradient x input is optimal."""
    torch.manual_seed(0)
    C, H, W, B = 3, 16, 16, 4
    w = torch.zeros(2, C, H, W)
    w[0] = 0.05 * torch.randn(C, H, W)  # logit 1 is 0
    model = LinearPixels(w).eval()
    x = torch.randn(B, C, H, W)
    xg = x.clone().requires_grad_(True)
    g = torch.autograd.grad(model(xg)[:, 0].sum(), xg)[0]
    gxi = (g * x).sum(1)  # (B, H, W)
    maps = torch.stack([gxi, torch.rand(B, H, W), -gxi], dim=1)  # T = 3 maps of the same target
    rows = [[0, 0, 0]] * B
    opts = {"deletion": {"step": 8}, "insertion": {"step": 8, "substrate": 0.0}}
    s = camlens.evaluate(model, x, maps, ["deletion", "insertion"], targets=rows, options=opts)
    d, i = s["deletion"], s["insertion"]
    assert (d[:, 0] < d[:, 1]).all() and (d[:, 1] < d[:, 2]).all(), d
    assert (i[:, 0] > i[:, 1]).all() and (i[:, 1] > i[:, 2]).all(), i
    cd, ci = s.curves["deletion"], s.curves["insertion"]
    assert (cd[:, 0] <= cd[:, 1] + 1e-6).all() and (cd[:, 0] <= cd[:, 2] + 1e-6).all()
    assert (ci[:, 0] >= ci[:, 1] - 1e-6).all() and (ci[:, 0] >= ci[:, 2] - 1e-6).all()
    # with the default blurred start, the optimal insertion map is w ⊙ (x - blur(x)) summed over channels
    opt_map = (w[0] * (x - gaussian_blur(x))).sum(1)
    maps = torch.stack([opt_map, torch.rand(B, H, W), -opt_map], dim=1)
    s = camlens.evaluate(model, x, maps, ["insertion"], targets=rows, options={"insertion": {"step": 8}})
    i = s["insertion"]
    assert (i[:, 0] > i[:, 1]).all() and (i[:, 1] > i[:, 2]).all(), i


# --------------------------------------------------------------------------------------------- peers


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                                      nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def cnn_case():
    torch.manual_seed(3)
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    rows = [[0, 3], [5, 1], [2, 2]]
    exp = camlens.explain(model, x, targets=rows, layer="features.0")
    return model, x, rows, exp


def test_confidence_change_agrees_with_pytorch_grad_cam(cnn_case):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.cam_mult_image import (CamMultImageConfidenceChange, DropInConfidence,
                                                         IncreaseInConfidence)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, rows, exp = cnn_case
    s = camlens.evaluate(model, x, exp, ["average_drop", "increase_in_confidence", "average_gain"])
    Y = s.extra["average_drop"]["Y"]
    inc_seen = 0
    for t in range(2):
        tg = [ClassifierOutputSoftmaxTarget(rows[b][t]) for b in range(3)]
        cams = exp.maps[:, t].numpy()
        diff = torch.as_tensor(CamMultImageConfidenceChange()(x, cams, tg, model))  # O - Y
        drop = torch.as_tensor(DropInConfidence()(x, cams, tg, model))  # max(0, Y - O)
        inc = torch.as_tensor(IncreaseInConfidence()(x, cams, tg, model))
        assert torch.allclose(s["average_drop"][:, t] / 100, drop / Y[:, t], atol=1e-4)
        assert torch.equal(s["increase_in_confidence"][:, t], inc.float())
        gain = diff.clamp_min(0) / (1 - Y[:, t])
        assert torch.allclose(s["average_gain"][:, t] / 100, gain, atol=1e-4)
        inc_seen += int(inc.sum())
    assert 0 < inc_seen < 6  # both branches exercised


class FixedCams:
    """A torchcam CAM extractor stand-in that returns given maps ``(B, H, W)``."""

    def __init__(self, model, cams):
        self.model, self.cams = model, cams

    def __call__(self, class_idx=None, scores=None, normalized=True, **kw):
        return [self.cams]

    def fuse_cams(self, cams):
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self):
        yield


def test_drop_increase_and_deletion_insertion_agree_with_torchcam(cnn_case):
    tm = pytest.importorskip("torchcam.metrics")
    tvf = pytest.importorskip("torchvision.transforms.functional")
    model, x, rows, exp = cnn_case
    step = 64  # divides 32 * 32: 16 steps, the same points as torchcam's steps=16
    s = camlens.evaluate(model, x, exp, ["average_drop", "increase_in_confidence", "deletion", "insertion"],
                         options={"deletion": {"step": step}, "insertion": {"step": step}})
    softmax = lambda z: z.softmax(-1)  # noqa: E731
    blur = lambda z: tvf.gaussian_blur(z, [11, 11], [5.0, 5.0])  # noqa: E731
    for t in range(2):
        cls = [rows[b][t] for b in range(3)]
        cm = tm.ClassificationMetric(FixedCams(model, exp.maps[:, t]), softmax)
        cm.update(x, class_idx=cls)
        ref = cm.summary()
        assert ref["avg_drop"] == pytest.approx(s["average_drop"][:, t].mean().item() / 100, abs=1e-4)
        assert ref["conf_increase"] == pytest.approx(s["increase_in_confidence"][:, t].mean().item(), abs=1e-6)
        for b in range(3):  # per image: torchcam only reports means
            dm = tm.DeletionInsertionMetric(FixedCams(model, exp.maps[b:b + 1, t]), softmax, steps=32 * 32 // step)
            dm.update(x[b:b + 1], class_idx=[cls[b]])
            im = tm.DeletionInsertionMetric(FixedCams(model, exp.maps[b:b + 1, t]), softmax, steps=32 * 32 // step,
                                            baseline=blur)
            im.update(x[b:b + 1], class_idx=[cls[b]])
            assert dm.summary()["deletion_auc"] == pytest.approx(s["deletion"][b, t].item(), abs=1e-4)
            assert im.summary()["insertion_auc"] == pytest.approx(s["insertion"][b, t].item(), abs=1e-4)


def rise_curve(model, start, finish, saliency, cls, step):
    C, H, W = start.shape
    hw = H * W
    n = (hw + step - 1) // step
    order = sorted(range(hw), key=lambda p: -float(saliency.flatten()[p]))  # Python's sort is stable
    img = start.clone().reshape(C, hw)
    fin = finish.reshape(C, hw)
    scores = []
    for i in range(n + 1):
        with torch.no_grad():
            scores.append(model(img.reshape(1, C, H, W)).softmax(-1)[0, cls].item())
        if i < n:
            idx = order[step * i:step * (i + 1)]
            img[:, idx] = fin[:, idx]
    arr = torch.tensor(scores)
    return arr, (arr.sum() - arr[0] / 2 - arr[-1] / 2) / n


def test_deletion_insertion_agree_with_a_plain_rise_loop(cnn_case):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    model, x, rows, exp = cnn_case
    step = 300  # does not divide 1024: 4 steps, the last one moves 124 pixels
    s = camlens.evaluate(model, x, exp, ["deletion", "insertion"], batch_size=7,
                         options={"deletion": {"step": step, "substrate": "blur"}, "insertion": {"step": step}})
    assert s.curves["deletion"].shape == (3, 2, 5)
    for b in range(3):
        blurred = tvf.gaussian_blur(x[b:b + 1], [11, 11], [5.0, 5.0])[0]
        for t in range(2):
            cd, ad = rise_curve(model, x[b], blurred, exp.maps[b, t], rows[b][t], step)
            ci, ai = rise_curve(model, blurred, x[b], exp.maps[b, t], rows[b][t], step)
            assert torch.allclose(s.curves["deletion"][b, t], cd, atol=1e-5)
            assert torch.allclose(s.curves["insertion"][b, t], ci, atol=1e-5)
            assert s["deletion"][b, t].item() == pytest.approx(ad.item(), abs=1e-5)
            assert s["insertion"][b, t].item() == pytest.approx(ai.item(), abs=1e-5)


def test_gaussian_blur_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.randn(2, 3, 32, 24)
    assert torch.allclose(gaussian_blur(x, 11, 5.0), tvf.gaussian_blur(x, [11, 11], [5.0, 5.0]), atol=1e-6)
    assert torch.allclose(gaussian_blur(x, 5, 1.5), tvf.gaussian_blur(x, [5, 5], [1.5, 1.5]), atol=1e-6)
    tiny = gaussian_blur(torch.randn(1, 1, 3, 3))  # smaller than the kernel: replicate padding, no error
    assert tiny.shape == (1, 1, 3, 3) and torch.isfinite(tiny).all()


# ------------------------------------------------------------------------- evaluate(): API, batching, state


def test_explanation_and_plain_tensor_agree(cnn_case):
    model, x, rows, exp = cnn_case
    names = ["deletion", "insertion", "average_drop", "increase_in_confidence", "average_gain", "sparseness"]
    opts = {"deletion": {"step": 128}, "insertion": {"step": 128}}
    a = camlens.evaluate(model, x, exp, names, options=opts)
    b = camlens.evaluate(model, x, exp.maps, names, targets=rows, options=opts)
    for n in names:
        assert a[n].shape == (3, 2)
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    assert a.curves["deletion"].shape == a.curves["insertion"].shape == (3, 2, 32 * 32 // 128 + 1)
    assert set(a.curves) == {"deletion", "insertion"}
    # curve ends: deletion starts at the model's probability, insertion ends there
    p = model(x).softmax(-1).detach()
    probs = torch.stack([p[b, rows[b]] for b in range(3)])
    assert torch.allclose(a.curves["deletion"][..., 0], probs, atol=1e-6)
    assert torch.allclose(a.curves["insertion"][..., -1], probs, atol=1e-6)
    assert torch.allclose(a.extra["average_drop"]["Y"], probs, atol=1e-6)


def test_batch_size_invariance_and_forward_count(cnn_case):
    model, x, rows, exp = cnn_case
    names = ["deletion", "insertion", "average_drop", "average_gain"]
    opts = {"deletion": {"step": 200}, "insertion": {"step": 200}}
    seen = []
    h = model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        small = camlens.evaluate(model, x, exp, ["deletion"], batch_size=3, options=opts)
    finally:
        h.remove()
    n = math.ceil(32 * 32 / 200)
    assert sum(seen) == 3 * (2 + 2 * (n - 1))  # per image: start and end shared by targets, T (n - 1) interior
    assert max(seen) <= 3
    small = camlens.evaluate(model, x, exp, names, batch_size=3, options=opts)
    big = camlens.evaluate(model, x, exp, names, batch_size=64, options=opts)
    for n_ in names:
        assert torch.allclose(small[n_], big[n_], atol=1e-6), n_
    assert torch.allclose(small.curves["deletion"], big.curves["deletion"], atol=1e-6)


def test_model_state_unchanged(cnn_case):
    model, x, rows, exp = cnn_case
    model.train()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        camlens.evaluate(model, x, exp, ["deletion", "average_drop", "sparseness"],
                         options={"deletion": {"step": 256}})
        assert model.training and all(m.training for m in model.modules())
        assert not model.fc.weight.requires_grad and model.fc.bias.requires_grad
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()
        model.fc.weight.requires_grad_(True)


class TwoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.shape = nn.Linear(8, 4)
        self.colour = nn.Linear(8, 3)

    def forward(self, x):
        f = self.trunk(x).mean((2, 3))
        return {"shape": self.shape(f), "colour": self.colour(f)}


class OneHead(nn.Module):
    def __init__(self, two: TwoHead, head: str):
        super().__init__()
        self.trunk, self.fc = two.trunk, getattr(two, head)

    def forward(self, x):
        return self.fc(self.trunk(x).mean((2, 3)))


def test_multi_output_heads_match_single_head_models():
    torch.manual_seed(5)
    two = TwoHead().eval()
    x = torch.randn(2, 3, 32, 32)
    targets = ["shape:1", "colour:2"]
    exp = camlens.explain(two, x, targets=targets, layer="trunk")
    names = ["deletion", "insertion", "average_drop", "increase_in_confidence", "average_gain"]
    opts = {"deletion": {"step": 128}, "insertion": {"step": 128}}
    s = camlens.evaluate(two, x, exp, names, options=opts)
    for t, (head, cls) in enumerate([("shape", 1), ("colour", 2)]):
        single = camlens.evaluate(OneHead(two, head).eval(), x, exp.maps[:, t:t + 1], names, targets=[cls],
                                  options=opts)
        for n in names:
            assert torch.allclose(s[n][:, t], single[n][:, 0], atol=1e-6), (n, head)
    # the curves start at each head's own softmax probability
    out = two(x)
    assert torch.allclose(s.curves["deletion"][:, 0, 0], out["shape"].softmax(-1)[:, 1].detach(), atol=1e-6)
    assert torch.allclose(s.curves["deletion"][:, 1, 0], out["colour"].softmax(-1)[:, 2].detach(), atol=1e-6)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="substrate"):
        camlens.evaluate(tiny_model(), ONES, HAND_MAP, ["deletion"], targets=[0],
                         options={"deletion": {"substrate": "noise"}})
    with pytest.raises(ValueError, match="step"):
        camlens.evaluate(tiny_model(), ONES, HAND_MAP, ["insertion"], targets=[0], options={"insertion": {"step": 0}})
    assert auc(torch.tensor([1.0, 0.0])).item() == 0.5
