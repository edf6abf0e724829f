"""Localisation metrics: pointing game at the tolerance's edge, relevance mass / rank on hand maps,
boxes as masks, agreement with Quantus, and camlens.evaluate's ground-truth handling."""

import math

import pytest
import torch
from torch import nn

import camlens
from camlens.metrics import get_metric
from camlens.metrics.localisation import boxes_to_masks


H = W = 40


class Flat(nn.Module):
    """Two logits from the pixel sum: the localisation metrics never run it beyond target resolution."""

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, -s], 1)


def run(maps, names, masks=None, boxes=None, options=None, targets=None):
    B, T = maps.shape[:2]
    x = torch.zeros(B, 1, *maps.shape[-2:])
    return camlens.evaluate(Flat(), x, maps, names, targets=targets or [0] * T, masks=masks, boxes=boxes,
                            options=options)


def peak_map(r: int, c: int) -> torch.Tensor:
    m = torch.rand(1, 1, H, W) * 0.5
    m[0, 0, r, c] = 1.0
    return m


def pixel_mask(*pixels) -> torch.Tensor:
    m = torch.zeros(1, H, W, dtype=torch.bool)
    for r, c in pixels:
        m[0, r, c] = True
    return m


# ---------------------------------------------------------------------------------------- pointing game


def test_pointing_game_tolerance_edges():
    m = peak_map(10, 10)
    cases = [  # (mask pixel, distance to the peak, hit at tolerance 15?)
        ((10, 25), 15.0, False),  # exactly 15 px: outside the open disc
        ((10, 24), 14.0, True),
        ((19, 22), 15.0, False),  # 9^2 + 12^2 = 15^2
        ((19, 21), math.hypot(9, 11), True),
        ((10, 10), 0.0, True),
        ((30, 30), math.hypot(20, 20), False),
    ]
    for px, dist, hit in cases:
        s = run(m, ["pointing_game"], masks=pixel_mask(px))
        assert s["pointing_game"].item() == float(hit), (px, dist)
    # tolerance 0: only the peak itself; tolerance 16 takes the 15-px pixel
    assert run(m, ["pointing_game"], masks=pixel_mask((10, 11)), options={"pointing_game": {"tolerance": 0}})[
        "pointing_game"].item() == 0.0
    assert run(m, ["pointing_game"], masks=pixel_mask((10, 10)), options={"pointing_game": {"tolerance": 0}})[
        "pointing_game"].item() == 1.0
    assert run(m, ["pointing_game"], masks=pixel_mask((10, 25)), options={"pointing_game": {"tolerance": 16}})[
        "pointing_game"].item() == 1.0


def test_pointing_game_ties_use_the_first_maximum_and_empty_masks_give_nan():
    m = torch.zeros(1, 1, H, W)
    m[0, 0, 5, 30] = 1.0  # first in raster order
    m[0, 0, 35, 2] = 1.0
    opts = {"pointing_game": {"tolerance": 0}}
    s = run(m, ["pointing_game"], masks=pixel_mask((5, 30)), options=opts)
    assert s["pointing_game"].item() == 1.0
    assert s.extra["pointing_game"]["points"].tolist() == [[[5, 30]]]
    assert run(m, ["pointing_game"], masks=pixel_mask((35, 2)), options=opts)["pointing_game"].item() == 0.0
    s = run(m, ["pointing_game"], masks=torch.zeros(1, H, W, dtype=torch.bool))
    assert math.isnan(s["pointing_game"].item())
    assert s.summary()[0]["n"] == 0  # NaN left out of the summary


def test_pointing_game_batched_per_target_masks_and_boxes():
    B, T = 3, 2
    maps = torch.rand(B, T, H, W) * 0.5
    peaks = [[(3, 4), (20, 20)], [(39, 39), (0, 0)], [(15, 5), (15, 35)]]
    for b in range(B):
        for t in range(T):
            maps[b, t, peaks[b][t][0], peaks[b][t][1]] = 1.0
    boxes = torch.tensor([[[0, 0, 8, 8], [30, 30, 40, 40]],  # (x0, y0, x1, y1)
                          [[30, 30, 40, 40], [0, 0, 1, 1]],
                          [[0, 0, 10, 40], [0, 0, 10, 40]]], dtype=torch.float)  # columns 0 .. 9
    s = run(maps, ["pointing_game"], boxes=boxes, targets=[0, 1], options={"pointing_game": {"tolerance": 0}})
    assert s["pointing_game"].tolist() == [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]
    # (20, 20) to the box's nearest pixel (30, 30): sqrt(200) ~ 14.1 < 15 -> hit at the default tolerance
    s = run(maps, ["pointing_game"], boxes=boxes, targets=[0, 1])
    assert s["pointing_game"].tolist() == [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]  # (15, 35) is 26 px from col 9
    masks = boxes_to_masks(boxes, (H, W))
    s2 = run(maps, ["pointing_game"], masks=masks, targets=[0, 1])
    assert torch.equal(s["pointing_game"], s2["pointing_game"])


def test_boxes_to_masks_pixel_centres():
    m = boxes_to_masks(torch.tensor([1, 2, 4, 5]), (6, 6))
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[2:5, 1:4] = True  # rows y0 .. y1 - 1, cols x0 .. x1 - 1
    assert torch.equal(m, want)
    # fractional: a pixel is in when its centre (c + 0.5) is within [x0, x1]
    m = boxes_to_masks(torch.tensor([[0.6, 0.0, 2.5, 1.0]]), (2, 4))
    assert m.tolist() == [[[False, True, True, False], [False, False, False, False]]]


# ---------------------------------------------------------------------------------- relevance mass / rank


HAND = torch.tensor([[[[0.9, 0.0, 0.1, 0.0],
                       [0.5, 0.2, 0.0, 0.0],
                       [0.0, 0.0, 0.3, 0.0],
                       [0.0, 0.0, 0.0, 0.0]]]])
HAND_MASK = torch.zeros(1, 4, 4, dtype=torch.bool)
HAND_MASK[0, 1, :2] = True  # the 0.5 and 0.2 pixels
HAND_MASK[0, 3, 3] = True  # a zero pixel: K = 3


def test_relevance_mass_and_rank_by_hand():
    s = run(HAND, ["relevance_mass", "relevance_rank"], masks=HAND_MASK)
    assert s["relevance_mass"].item() == pytest.approx(0.7 / 2.0, abs=1e-6)
    # top 3: 0.9 (out), 0.5 (in), 0.3 (out) -> 1 / 3
    assert s["relevance_rank"].item() == pytest.approx(1 / 3, abs=1e-6)
    # negative values carry no mass
    neg = HAND.clone()
    neg[0, 0, 3, :] = -1.0
    assert run(neg, ["relevance_mass"], masks=HAND_MASK)["relevance_mass"].item() == pytest.approx(0.35, abs=1e-6)
    # all-zero map: no mass -> 0; its top-K are the first K pixels in raster order (ties)
    zero = torch.zeros(1, 1, 4, 4)
    first = torch.zeros(1, 4, 4, dtype=torch.bool)
    first[0, 0, :2] = True
    first[0, 3, 3] = True
    s = run(zero, ["relevance_mass", "relevance_rank"], masks=first)
    assert s["relevance_mass"].item() == 0.0
    assert s["relevance_rank"].item() == pytest.approx(2 / 3, abs=1e-6)
    s = run(HAND, ["relevance_mass", "relevance_rank"], masks=torch.zeros(1, 4, 4, dtype=torch.bool))
    assert math.isnan(s["relevance_mass"].item()) and math.isnan(s["relevance_rank"].item())
    # a perfect map
    perfect = HAND_MASK[:, None].float()
    s = run(perfect, ["relevance_mass", "relevance_rank", "pointing_game"], masks=HAND_MASK)
    assert [s[n].item() for n in ("relevance_mass", "relevance_rank", "pointing_game")] == [1.0, 1.0, 1.0]


def test_agreement_with_quantus(quantus):
    g = torch.Generator().manual_seed(0)
    B = 8
    a = torch.rand(B, 1, 24, 24, generator=g)  # continuous: no ties
    s_np = torch.zeros(B, 1, 24, 24)
    for b in range(B):
        r, c = torch.randint(0, 16, (2,), generator=g).tolist()
        s_np[b, 0, r:r + 8, c:c + 6] = 1
    masks = s_np[:, 0].bool()
    a[0, 0, 2, 2] = 5.0  # make one image's maximum miss and another's hit
    a[1, 0] = a[1, 0] * (1 - s_np[1, 0]) * 0.5 + s_np[1, 0]
    ours = run(a, ["relevance_mass", "relevance_rank", "pointing_game"], masks=masks,
               options={"pointing_game": {"tolerance": 0}})
    kw = {"disable_warnings": True}
    x = torch.zeros(B, 1, 24, 24).numpy()
    mass = quantus.RelevanceMassAccuracy(**kw).evaluate_batch(a_batch=a.numpy().copy(), s_batch=s_np.numpy())
    rank = quantus.RelevanceRankAccuracy(**kw).evaluate_batch(a_batch=a.numpy().copy(), s_batch=s_np.numpy())
    point = quantus.PointingGame(**kw).evaluate_batch(x_batch=x, a_batch=a.numpy().copy(), s_batch=s_np.numpy())
    assert torch.allclose(ours["relevance_mass"][:, 0].double(), torch.as_tensor(mass).double(), atol=1e-6)
    assert torch.allclose(ours["relevance_rank"][:, 0].double(), torch.as_tensor(rank).double(), atol=1e-6)
    assert ours["pointing_game"][:, 0].tolist() == [float(v) for v in point]
    assert 0 < sum(point) < B


# ------------------------------------------------------------------------------------------- evaluate()


def test_requires_ground_truth_directions_and_shared_masks():
    maps = torch.rand(2, 3, 16, 16)
    for name in ("pointing_game", "relevance_mass", "relevance_rank"):
        m = get_metric(name)
        assert m.higher_is_better is True and m.category == "localisation" and m.arrow == "↑"
        with pytest.raises(ValueError, match="masks or boxes"):
            run(maps, [name])
    # one mask per image applies to all T targets, the same as repeating it per target
    masks = torch.rand(2, 16, 16) > 0.7
    names = ["pointing_game", "relevance_mass", "relevance_rank"]
    a = run(maps, names, masks=masks, targets=[0, 1, 0])
    b = run(maps, names, masks=masks[:, None].expand(2, 3, 16, 16), targets=[0, 1, 0])
    for n in names:
        assert a[n].shape == (2, 3)
        assert torch.equal(a[n], b[n])
        assert ((a[n] >= 0) & (a[n] <= 1)).all()
    # masks win over boxes when both are given
    c = run(maps, names, masks=masks, boxes=torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]), targets=[0, 1, 0])
    assert all(torch.equal(a[n], c[n]) for n in names)


def test_on_an_explanation_of_a_real_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4)).eval()
    x = torch.randn(2, 3, 32, 32)
    exp = camlens.explain(model, x, targets=[1, 3], layer="0")
    boxes = torch.tensor([[4, 4, 20, 20], [10, 0, 32, 16]])
    s = camlens.evaluate(model, x, exp, ["pointing_game", "relevance_mass", "relevance_rank"], boxes=boxes)
    gt = boxes_to_masks(boxes, (32, 32))[:, None].expand(2, 2, 32, 32)
    r = exp.maps.clamp_min(0)
    want_mass = (r * gt).flatten(2).sum(-1) / r.flatten(2).sum(-1)
    assert torch.allclose(s["relevance_mass"], want_mass, atol=1e-6)
    pts = s.extra["pointing_game"]["points"]
    assert pts.shape == (2, 2, 2)
    flat = exp.maps.flatten(2)
    assert torch.equal(flat.gather(-1, (pts[..., 0] * 32 + pts[..., 1])[..., None])[..., 0], flat.amax(-1))
