"""Combining targets across heads (mean / confidence / sum) and agreement / conflict analysis,
on tiny hand-built models whose right answers are computed by hand."""

import pytest
import torch
from torch import nn

import camlens
from camlens.analysis.compare import pearson, top_fraction_mask


class Linear2Head(nn.Module):
    """A = (x, 2x) (a 1x1 conv), f = GAP(A), heads a = Wa f, b = Wb f (no bias).

    For class k of head h, dS/dA_c = W[k, c] / (h*w), so Grad-CAM's raw map is
    (W[k, 0] + 2 W[k, 1]) * x / (h*w): a known multiple of the input.
    """

    def __init__(self):
        super().__init__()
        self.trunk = nn.Conv2d(1, 2, 1, bias=False)
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.trunk.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.a.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 0.2]]))
            self.b.weight.copy_(torch.tensor([[0.3, 0.1], [-2.0, 0.5], [0.0, -0.4]]))

    def forward(self, x):
        f = self.trunk(x).mean((2, 3))
        return {"a": self.a(f), "b": self.b(f)}


def coef(model, head, k):
    w = getattr(model, head).weight[k]
    return float(w[0] + 2 * w[1])


def _x():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 4, 5, generator=g) + 0.1  # positive inputs


def test_separate_raw_maps_are_the_hand_computed_multiples():
    model = Linear2Head().eval()
    x = _x()
    exp = camlens.explain(model, x, targets=["a:0", "b:1"], layer="trunk")
    assert torch.allclose(exp.raw[:, 0], coef(model, "a", 0) * x[:, 0] / 20, atol=1e-6)
    assert torch.allclose(exp.raw[:, 1], coef(model, "b", 1) * x[:, 0] / 20, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "sum", "confidence"])
def test_combined_modes_by_hand(mode):
    model = Linear2Head().eval()
    x = _x()
    specs = ["a:0", "b:1", "b:2"]
    exp = camlens.explain(model, x, targets=specs, layer="trunk", combine=mode)
    assert exp.maps.shape == (2, 1, 4, 5)
    assert exp.targets[0][0].label == f"{mode}(a: 0, b: 1, b: 2)"
    assert [t.label for t in exp.components[0]] == ["a: 0", "b: 1", "b: 2"]
    c = torch.tensor([coef(model, "a", 0), coef(model, "b", 1), coef(model, "b", 2)])
    out = model(x)
    if mode == "mean":
        w = torch.full((2, 3), 1 / 3)
    elif mode == "sum":
        w = torch.ones(2, 3)
    else:
        p = torch.stack([out["a"].softmax(1)[:, 0], out["b"].softmax(1)[:, 1], out["b"].softmax(1)[:, 2]], 1)
        w = p / p.sum(1, keepdim=True)
    expected_raw = (w @ c)[:, None, None] * x[:, 0] / 20
    assert torch.allclose(exp.raw[:, 0], expected_raw, atol=1e-6)
    expected_score = (w * torch.stack([out["a"][:, 0], out["b"][:, 1], out["b"][:, 2]], 1)).sum(1)
    assert torch.allclose(exp.scores[:, 0], expected_score.detach(), atol=1e-6)


def test_confidence_weights_favour_the_confident_head():
    """Two targets whose raw maps have opposite signs: the combined map follows the more confident one."""
    model = Linear2Head().eval()
    x = _x()
    out = model(x)
    pa, pb = out["a"].softmax(1)[:, 0], out["b"].softmax(1)[:, 1]
    exp = camlens.explain(model, x, targets=["a:0", "b:1"], layer="trunk", combine="confidence")
    sign = torch.sign(exp.raw[:, 0].mean((1, 2)))
    expected = torch.sign(pa * coef(model, "a", 0) + pb * coef(model, "b", 1))
    assert torch.equal(sign, expected)


def test_combine_works_for_every_method_family():
    model = Linear2Head().eval()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) + 0.1
    for method, kw in [("gradcampp", {}), ("scorecam", {}), ("occlusion", {"patch": 2, "stride": 2})]:
        mean = camlens.explain(model, x, targets=["a:0", "b:1"], layer="trunk", method=method, combine="mean", **kw)
        fn = lambda o: 0.5 * (o["a"][:, 0] + o["b"][:, 1])  # noqa: E731 - the same combined score, by hand
        ref = camlens.explain(model, x, targets=fn, layer="trunk", method=method, **kw)
        assert torch.allclose(mean.maps, ref.maps, atol=1e-5), method


def test_confidence_needs_class_targets():
    model = Linear2Head().eval()
    with pytest.raises(ValueError, match="confidence"):
        camlens.explain(model, _x(), targets=["a:0", lambda o: o["b"][:, 0]], layer="trunk", combine="confidence")
    with pytest.raises(ValueError, match="combine must be one of"):
        camlens.explain(model, _x(), targets=["a:0"], layer="trunk", combine="median")


def test_agreement_iou_pearson_and_conflict_by_hand():
    model = Linear2Head().eval()
    x = _x()
    # a:0 has coefficient +2.0 (pushes where x is large), b:1 has -1.0 (suppresses there)
    exp = camlens.explain(model, x, targets=["a:0", "b:1", "a:0"], layer="trunk", relu=False)
    ag = camlens.agreement(exp, top=0.25)
    assert ag.pairs == [(0, 1), (0, 2), (1, 2)]
    assert torch.allclose(ag.iou[:, 1], torch.ones(2)) and torch.allclose(ag.pearson[:, 1], torch.ones(2))
    assert torch.allclose(ag.pearson[:, 0], -torch.ones(2), atol=1e-5)  # opposite maps
    assert torch.allclose(ag.iou[:, 0], torch.zeros(2))  # top quarter of x vs top quarter of -x
    # conflict: target 0 pushes everywhere (x > 0) and target 1 suppresses everywhere: positive, = min(r0+, r1-)
    r0 = x[:, 0] / x[:, 0].flatten(1).amax(1)[:, None, None]
    assert torch.allclose(ag.conflict[:, 0], r0, atol=1e-5)
    assert torch.allclose(ag.conflict[:, 2], -r0, atol=1e-5)
    assert torch.allclose(ag.conflict[:, 1], torch.zeros_like(r0))
    assert torch.allclose(ag.overlap[:, 1], exp.maps[:, 0])
    s = ag.summary(0)
    assert s[0]["targets"] == ["a: 0", "b: 1"] and s[0]["pearson"] == pytest.approx(-1.0, abs=1e-4)


def test_top_fraction_and_pearson_helpers():
    m = torch.arange(10.0).view(1, 2, 5)
    assert top_fraction_mask(m, 0.3).flatten().tolist() == [False] * 7 + [True] * 3
    assert pearson(m, 2 * m + 1).item() == pytest.approx(1.0)
    assert pearson(m, torch.zeros_like(m)).item() == 0.0


@pytest.mark.parametrize("scale", [1e-14, 1e-20])
def test_conflict_does_not_depend_on_the_score_scale(scale):
    # raw maps of ~1e-15 (a score multiplied by 1e-14): the conflict map is that of the unscaled model;
    # an absolute floor on the peak (it was 1e-12) shrank it towards 0
    model, tiny = Linear2Head().eval(), Linear2Head().eval()
    with torch.no_grad():
        tiny.a.weight.mul_(scale)
        tiny.b.weight.mul_(scale)
    x, kw = _x(), dict(targets=["a:0", "b:1"], layer="trunk", relu=False)
    ref, got = camlens.agreement(camlens.explain(model, x, **kw)), camlens.agreement(camlens.explain(tiny, x, **kw))
    assert ref.conflict.abs().amax() > 0.5
    assert torch.allclose(got.conflict, ref.conflict, atol=1e-5)
    rows = camlens.compare.agreement_summary(camlens.explain(tiny, x, **kw))
    assert rows[0][0]["conflict_mass"] == pytest.approx(ref.summary(0)[0]["conflict_mass"], abs=2e-4)
