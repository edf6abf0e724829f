"""camlens.evaluate on volumes / clips (B, C, D, H, W): deletion / insertion staircases by hand on a model
that reads a known sub-cube, Average Drop, sparseness, relevance mass / rank with masks and 3-D boxes,
the pointing game's voxel ball, MPRT re-explaining a 3-D CNN, and ROAD's clear refusal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import camlens
from camlens.core.errors import ConfigError, InputError
from camlens.metrics.faithfulness import _substrate, gaussian_blur
from camlens.metrics.localisation import boxes_to_masks


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


CUBE = (slice(1, 3), slice(1, 3), slice(1, 3))  # 8 of the 4 x 4 x 4 = 64 voxels


class SubCube(nn.Module):
    """Two logits ``(s, 0)``, ``s = 0.125 Σ_{c, voxels in CUBE} x``: P(class 0) = sigmoid(s); on ones
    (2 channels) s = 2, and every cube voxel (both channels) carries 0.25 of it."""

    def forward(self, x):
        s = 0.125 * x[(slice(None), slice(None), *CUBE)].sum((1, 2, 3, 4))
        return torch.stack([s, torch.zeros_like(s)], 1)


ONES = torch.ones(1, 2, 4, 4, 4)
PERFECT = torch.zeros(1, 1, 4, 4, 4)
PERFECT[(0, 0, *CUBE)] = 1.0
REVERSED = 1.0 - PERFECT


def _auc(c: list[float]) -> float:
    return (sum(c) - c[0] / 2 - c[-1] / 2) / (len(c) - 1)


def test_deletion_staircase_by_hand_perfect_vs_reversed_map():
    opts = {"deletion": {"step": 4}}  # 4 voxels a step: n = 64 / 4 = 16 steps
    s = camlens.evaluate(SubCube(), ONES, torch.cat([PERFECT, REVERSED], 1), ["deletion"], targets=[[0, 0]],
                         options=opts)
    perfect = [sig(2), sig(1)] + [0.5] * 15  # the cube's 8 voxels go first, 4 (0.25 of s each) a step
    reversed_ = [sig(2)] * 15 + [sig(1), 0.5]  # the 56 outside voxels first: 14 steps change nothing
    assert s.curves["deletion"].shape == (1, 2, 17)
    assert torch.allclose(s.curves["deletion"][0, 0], torch.tensor(perfect), atol=1e-6)
    assert torch.allclose(s.curves["deletion"][0, 1], torch.tensor(reversed_), atol=1e-6)
    assert s["deletion"][0].tolist() == pytest.approx([_auc(perfect), _auc(reversed_)], abs=1e-6)
    assert s["deletion"][0, 0] < s["deletion"][0, 1]
    assert torch.allclose(s.extra["deletion"]["fractions"], torch.arange(17) / 16)


def test_insertion_and_step_not_dividing_the_voxels():
    s = camlens.evaluate(SubCube(), ONES, PERFECT, ["insertion"], targets=[0],
                         options={"insertion": {"step": 5, "substrate": 0.0}})
    # n = ceil(64 / 5) = 13: after step 1, 5 cube voxels shown (s = 1.25), after step 2 all 8 (s = 2)
    curve = [0.5, sig(1.25)] + [sig(2)] * 12
    assert torch.allclose(s.curves["insertion"][0, 0], torch.tensor(curve), atol=1e-6)
    assert s["insertion"].item() == pytest.approx(_auc(curve), abs=1e-6)


def test_ties_are_ranked_in_raster_order_over_the_whole_volume():
    """A constant map removes voxels in (depth, row, col) raster order: the first cube voxel
    (1, 1, 1) is voxel 16 + 4 + 1 = 21, so step=22 removes exactly one of them."""
    s = camlens.evaluate(SubCube(), ONES, torch.full((1, 1, 4, 4, 4), 0.5), ["deletion"], targets=[0],
                         options={"deletion": {"step": 22}})
    # n = ceil(64 / 22) = 3. After 22 voxels (0..21) only (1, 1, 1) of the cube is gone; after 44
    # (0..43 = depth 0, depth 1, depth 2 rows 0..2) all 8 are; then the rest.
    assert torch.allclose(s.curves["deletion"][0, 0], torch.tensor([sig(2), sig(1.75), 0.5, 0.5]), atol=1e-6)


def test_blur_substrate_blurs_each_slice_and_mean_is_over_the_volume():
    x = torch.randn(2, 3, 5, 12, 12, generator=torch.Generator().manual_seed(0))
    ref = _substrate(x, "blur", 5, 2.0)
    for d in range(5):
        assert torch.allclose(ref[:, :, d], gaussian_blur(x[:, :, d], 5, 2.0), atol=1e-6)
    mean = _substrate(x, "mean", 5, 2.0)
    assert torch.allclose(mean, x.mean((2, 3, 4), keepdim=True).expand_as(x))


def test_average_drop_multiplies_voxel_by_voxel_and_sparseness_is_over_all_voxels():
    half = 0.5 * PERFECT
    s = camlens.evaluate(SubCube(), ONES, torch.cat([PERFECT, half], 1), ["average_drop", "sparseness"],
                         targets=[[0, 0]], options={"average_drop": {"normalize": False}})
    y = sig(2)
    assert s["average_drop"][0].tolist() == pytest.approx([0.0, (y - sig(1)) / y * 100], abs=1e-4)
    assert s["sparseness"][0].tolist() == pytest.approx([56 / 64, 56 / 64], abs=1e-6)  # k equal of n: (n - k) / n
    # normalize=True min-maxes over the whole volume: the half map becomes the perfect one
    s2 = camlens.evaluate(SubCube(), ONES, half, ["average_drop"], targets=[0])
    assert s2["average_drop"].item() == pytest.approx(0.0, abs=1e-4)


def test_relevance_mass_and_rank_with_masks_and_3d_boxes():
    m = 0.5 + 0.5 * PERFECT  # 1 in the cube, 0.5 outside
    cube_mask = PERFECT[:, 0] > 0  # (B, D, H, W)
    s = camlens.evaluate(SubCube(), ONES, m, ["relevance_mass", "relevance_rank"], targets=[0], masks=cube_mask)
    assert s["relevance_mass"].item() == pytest.approx(8 / (8 + 56 * 0.5), abs=1e-6)
    assert s["relevance_rank"].item() == 1.0
    first_slice = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)  # (B, T, D, H, W): the cube's depth-1 half
    first_slice[0, 0, 1, 1:3, 1:3] = True
    s = camlens.evaluate(SubCube(), ONES, PERFECT, ["relevance_mass", "relevance_rank"], targets=[0],
                         masks=first_slice)
    assert s["relevance_mass"].item() == pytest.approx(0.5, abs=1e-6)
    assert s["relevance_rank"].item() == 1.0  # the top 4 (ties in raster order) are depth 1's
    # a box (x0, y0, z0, x1, y1, z1) covering the cube is the cube's mask
    box = torch.tensor([[1.0, 1.0, 1.0, 3.0, 3.0, 3.0]])
    assert torch.equal(boxes_to_masks(box, (4, 4, 4))[0], cube_mask[0])
    b = camlens.evaluate(SubCube(), ONES, m, ["relevance_mass"], targets=[0], boxes=box)
    assert b["relevance_mass"].item() == pytest.approx(8 / 36, abs=1e-6)
    # an anisotropic box: x 0..1, y 2..3, z 3 only
    one = boxes_to_masks(torch.tensor([0.0, 2.0, 3.0, 2.0, 4.0, 4.0]), (4, 4, 4))
    want = torch.zeros(4, 4, 4, dtype=torch.bool)
    want[3, 2:4, 0:2] = True
    assert torch.equal(one, want)
    with pytest.raises(InputError, match="6"):
        camlens.evaluate(SubCube(), ONES, m, ["relevance_mass"], targets=[0], boxes=torch.tensor([[1.0, 1, 3, 3]]))


def test_pointing_game_in_voxels_with_a_ball_tolerance():
    m = torch.zeros(1, 1, 4, 4, 4)
    m[0, 0, 3, 0, 0] = 1.0  # the point (slice 3, row 0, col 0); nearest cube voxel (2, 1, 1) at sqrt(3)
    mask = PERFECT[:, 0] > 0
    got = {}
    for tol in (0, 1.7, 1.8):
        s = camlens.evaluate(SubCube(), ONES, m, ["pointing_game"], targets=[0], masks=mask,
                             options={"pointing_game": {"tolerance": tol}})
        got[tol] = s["pointing_game"].item()
        assert s.extra["pointing_game"]["points"].tolist() == [[[3, 0, 0]]]
    assert got == {0: 0.0, 1.7: 0.0, 1.8: 1.0}
    s = camlens.evaluate(SubCube(), ONES, PERFECT, ["pointing_game"], targets=[0], masks=mask,
                         options={"pointing_game": {"tolerance": 0}})
    assert s["pointing_game"].item() == 1.0  # first maximum in raster order: (1, 1, 1), in the cube
    empty = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    assert math.isnan(camlens.evaluate(SubCube(), ONES, m, ["pointing_game"], targets=[0], masks=empty)
                      ["pointing_game"].item())


class Small3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3, 4)))


def test_explanation_of_a_3d_cnn_default_metrics_and_mprt():
    torch.manual_seed(0)
    net = Small3d().eval()
    x = torch.randn(2, 1, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    exp = camlens.explain(net, x, targets=[1, 2])
    s = camlens.evaluate(net, x, exp, ["deletion", "insertion", "average_drop", "sparseness", "mprt"],
                         options={"deletion": {"step": 48}, "insertion": {"step": 48}, "mprt": {"max_steps": 2}})
    assert all(s[k].shape == (2, 2) for k in s)
    assert s.curves["deletion"].shape == (2, 2, 9)  # 384 voxels / 48 + 1
    assert torch.isfinite(s["deletion"]).all() and torch.isfinite(s["mprt"]).all()
    assert s.curves["mprt"].shape == (2, 2, 2)
    assert torch.allclose(s.extra["mprt"]["reference_correlation"], torch.ones(2, 2), atol=1e-5)
    # the plain map tensor gives the same numbers as the Explanation
    p = camlens.evaluate(net, x, exp.maps, ["deletion"], targets=[[1, 2], [1, 2]], options={"deletion": {"step": 48}})
    assert torch.allclose(p["deletion"], s["deletion"], atol=1e-6)


def test_road_and_misshapen_maps_on_volumes_are_clear_errors():
    with pytest.raises(ConfigError, match=r"images only.*deletion.*pointing_game"):
        camlens.evaluate(SubCube(), ONES, PERFECT, ["deletion", "road"], targets=[0])
    assert "road_morf" not in camlens.engine.evaluate.volume_metrics()
    with pytest.raises(InputError, match=r"\(B, T, D, H, W\) = \(1, T, 4, 4, 4\)"):
        camlens.evaluate(SubCube(), ONES, PERFECT[:, :, 0], ["deletion"], targets=[0])
