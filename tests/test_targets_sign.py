"""sign=-1: explaining a DECREASE of a target's score (regression outputs, "what lowers this logit").

Ground truth: a model whose output is (mean of the left half) - (mean of the right half) of the
image, with a layer whose two channels see only the left / only the right half, so every
method's evidence for an increase lies on the left and for a decrease on the right. And for every
method: sign=-1 gives exactly the maps and scores of the same model with its output negated.
"""

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.methods import available_methods

S = 32


class Halves(nn.Module):
    """``y = mean_left(gray) - mean_right(gray)``; ``feat`` is ``(B, 2, S, S)``: gray on the left
    half (channel 0) and on the right half (channel 1), zero elsewhere."""

    def __init__(self, shape="B"):
        super().__init__()
        self.shape = shape
        self.gray = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.gray.weight, 1 / 3)
        left = torch.zeros(1, 1, S, S)
        left[..., : S // 2] = 1
        self.register_buffer("halves", torch.cat([left, 1 - left], 1))
        self.feat = nn.Identity()

    def forward(self, x):
        a = self.feat(self.gray(x) * self.halves)  # (B, 2, S, S)
        y = 2 * (a[:, 0].mean((1, 2)) - a[:, 1].mean((1, 2)))  # (B,)
        if self.shape == "B1":
            return y[:, None]
        if self.shape == "BK":
            return torch.stack([0.5 * y, y, -y], 1)  # a continuous (B, 3) head
        return y


class Neg(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        out = self.m(x)
        return {k: -v for k, v in out.items()} if isinstance(out, dict) else -out


def _x(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.5 * torch.rand(b, 3, S, S, generator=g)  # positive images: occluding with 0 lowers a half


def _half_mass(maps):
    """Share of the map's mass on the left half, per map: ``(B, T)``."""
    m = maps.clamp(min=0)
    return (m[..., : S // 2].sum((-2, -1)) / m.sum((-2, -1)).clamp(min=1e-12)).numpy()


@pytest.mark.parametrize("method,share", [("gradcam", 0.99), ("occlusion", 0.99),
                                          ("scorecam", 0.85)])  # Score-CAM: softmax weights keep some of both
def test_sign_moves_the_evidence_to_the_other_half(method, share):
    model = Halves().eval()
    x = _x()
    kw = {"patch": 8} if method == "occlusion" else {}
    up = camlens.explain(model, x, layer=model.feat, method=method, **kw)
    down = camlens.explain(model, x, layer=model.feat, method=method, sign=-1, **kw)
    assert (_half_mass(up.maps) > share).all(), _half_mass(up.maps)  # increase: the left half
    assert (_half_mass(down.maps) < 1 - share).all(), _half_mass(down.maps)  # decrease: the right half
    y = model(x)
    assert torch.allclose(up.scores[:, 0], y, atol=1e-6)
    assert torch.allclose(down.scores[:, 0], -y, atol=1e-6)  # scores hold the explained (signed) score
    assert down.labels[0][0].endswith("(decrease)") and not up.labels[0][0].endswith("(decrease)")


def test_ablationcam_is_sign_invariant_by_its_normalisation():
    """Ablation-CAM divides each drop by the score itself (pytorch-grad-cam's convention):
    ``(S - S_c) / S`` is the same for ``-S``, so its map does not change with the sign."""
    model = Halves().eval()
    x = _x()
    up = camlens.explain(model, x, layer=model.feat, method="ablationcam")
    down = camlens.explain(model, x, layer=model.feat, method="ablationcam", sign=-1)
    assert torch.allclose(up.raw, down.raw, atol=1e-6) and up.raw.abs().max() > 0.1
    assert torch.allclose(down.scores, -up.scores)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return net


# CAM reads the Linear head: tested below; the attention methods need a transformer (tests/test_attention_methods.py)
METHODS = [m for m, meth in available_methods().items() if m != "cam" and not getattr(meth, "needs_attention", False)]


@pytest.mark.filterwarnings("ignore:.*maps are constant")  # occlusion: some targets only gain from occluding
@pytest.mark.parametrize("method", METHODS)
def test_sign_minus_one_equals_the_negated_model_for_every_method(method, tiny):
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    kw = {"patch": 8} if method == "occlusion" else {}
    a = camlens.explain(tiny, x, [1, 2], layer=tiny[3], method=method, sign=-1, **kw)
    b = camlens.explain(Neg(tiny), x, [1, 2], layer=tiny[3], method=method, **kw)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    assert torch.allclose(a.scores, -tiny(x)[:, [1, 2]], atol=1e-6)
    assert torch.allclose(a.maps, b.maps, atol=1e-6), (a.maps - b.maps).abs().max()
    if a.raw is not None and method not in ("random", "center"):
        assert torch.allclose(a.raw, b.raw, atol=1e-6)


@pytest.mark.parametrize("shape", ["B", "B1", "BK"])
def test_regression_heads_raw_gradcam_is_the_negated_models(shape):
    model = Halves(shape).eval()
    x = _x(3, seed=2)
    tg = None if shape != "BK" else [1, 2]
    if tg is None:
        a = camlens.explain(model, x, camlens.Target(sign=-1), layer=model.feat)
        b = camlens.explain(Neg(model), x, camlens.Target(), layer=model.feat)
    else:
        a = camlens.explain(model, x, tg, layer=model.feat, sign=-1)
        b = camlens.explain(Neg(model), x, tg, layer=model.feat)
    assert torch.allclose(a.raw, b.raw, atol=1e-6) and a.raw.abs().max() > 1e-4
    assert torch.allclose(a.raw, -camlens.explain(model, x, tg if tg else camlens.Target(), layer=model.feat).raw,
                          atol=1e-6)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    assert all(lab.endswith("(decrease)") for lab in a.labels[0])
    assert torch.isnan(a.probs).all() if shape != "BK" else True  # no probability for a regression value


def test_target_sign_overrides_the_call_sign(tiny):
    x = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(4))
    y = tiny(x)[0]
    exp = camlens.explain(tiny, x, [camlens.Target(cls=0, sign=1), 1, camlens.Target(cls=2, sign=-1)],
                          layer=tiny[3], sign=-1)
    assert torch.allclose(exp.scores[0], torch.stack([y[0], -y[1], -y[2]]), atol=1e-6)
    assert exp.labels[0] == ["0", "1 (decrease)", "2 (decrease)"]
    exp = camlens.explain(tiny, x, [camlens.Target(cls=0, sign=-1), 1], layer=tiny[3])  # mixed: no fast path
    assert torch.allclose(exp.scores[0], torch.stack([-y[0], y[1]]), atol=1e-6)
    lab = camlens.explain(tiny, x, camlens.Target(cls=3, sign=-1, label="drop"), layer=tiny[3]).labels[0][0]
    assert lab == "drop"  # a label of the user's own is kept as given
    fn = camlens.explain(tiny, x, lambda out: out[:, 3], layer=tiny[3], sign=-1)  # a score function too
    assert torch.allclose(fn.scores[0, 0], -y[3], atol=1e-6)


def test_sign_all_classes_and_combined(tiny):
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(5))
    y = tiny(x)
    exp = camlens.explain(tiny, x, "all", layer=tiny[3], sign=-1)  # the one-gather fast path, negated
    assert torch.allclose(exp.scores, -y, atol=1e-6)
    sep = camlens.explain(tiny, x, [0, 3], layer=tiny[3], sign=-1)
    mean = camlens.explain(tiny, x, [0, 3], layer=tiny[3], sign=-1, combine="mean")
    assert torch.allclose(mean.raw[:, 0], sep.raw.mean(1), atol=1e-6)  # the components carry the sign once
    assert torch.allclose(mean.scores[:, 0], -(y[:, 0] + y[:, 3]) / 2, atol=1e-6)


def test_cam_with_sign_negates_the_class_map(tiny):
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(6))
    up = camlens.explain(tiny, x, [1, 2], layer=tiny[3], method="cam")
    down = camlens.explain(tiny, x, [camlens.Target(cls=1, sign=-1), 2], layer=tiny[3], method="cam")
    assert torch.allclose(down.raw[:, 0], -up.raw[:, 0], atol=1e-6)
    assert torch.allclose(down.raw[:, 1], up.raw[:, 1], atol=1e-6)


def test_bad_sign_is_a_clear_error(tiny):
    x = torch.randn(1, 3, S, S)
    with pytest.raises(camlens.CamlensError, match=r"sign must be \+1 .* or -1"):
        camlens.explain(tiny, x, 0, layer=tiny[3], sign=0)
    with pytest.raises(camlens.CamlensError, match="sign must be"):
        camlens.Target(cls=0, sign=2)


def test_sign_and_activation_survive_save_and_load(tiny, tmp_path):
    x = torch.randn(1, 3, S, S)
    exp = camlens.explain(tiny, x, [0, 1], layer=tiny[3], sign=-1, activation="sigmoid")
    back = camlens.load(exp.save(tmp_path / "e.npz") or tmp_path / "e.npz")
    assert [t.sign for t in back.targets[0]] == [-1, -1]
    assert [t.activation for t in back.targets[0]] == ["sigmoid", "sigmoid"]
    np.testing.assert_allclose(back.probs.numpy(), torch.sigmoid(tiny(x)[:, :2]).detach().numpy(), atol=1e-6)
