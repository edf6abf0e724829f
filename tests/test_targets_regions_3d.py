"""Target.region on 3-D segmentation outputs (B, K, d, h, w): per-voxel logits of a volume model summed
over a mask, a 3-D box or the voxels predicted as the class; Grad-CAM against autograd by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.core.errors import TargetError
from reference import forward_capturing


class Seg3d(nn.Module):
    """A small 3-D segmentation net: an encoder at half resolution and a 1x1x1 head to K classes, its
    logits at the encoder's (lower) resolution, as many medical nets return before upsampling."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(),
                                     nn.Conv3d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv3d(8, k, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.fixture
def seg():
    torch.manual_seed(0)
    return Seg3d().double().eval()


def _x(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 1, 8, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _gradcam_by_hand(net: nn.Module, x: torch.Tensor, cls: int, weights: torch.Tensor) -> torch.Tensor:
    """S_b = sum_{z,i,j} M_b * Y_b[cls]; Grad-CAM raws (B, d, h, w) at the encoder by a hook and autograd."""
    out, a = forward_capturing(net, net.encoder, x)
    score = (out[:, cls] * weights).flatten(1).sum(1)
    (g,) = torch.autograd.grad(score.sum(), a)
    return (g.mean((2, 3, 4), keepdim=True) * a).sum(1).detach()


def test_predicted_voxels_default_layer_and_gradcam_by_hand(seg):
    x = _x()
    with torch.no_grad():
        out = seg(x)
    c = int(out.argmax(1).flatten().mode().values)  # a class predicted somewhere
    exp = camlens.explain(seg, x, camlens.Target.region(cls=c))
    assert exp.layers == ["encoder"]  # the backbone, not the head
    m = (out.argmax(1) == c).double()  # (B, 4, 8, 8): the voxels predicted as class c
    assert m.flatten(1).sum(1).min() > 0
    assert exp.scores[:, 0].double().numpy() == pytest.approx((out[:, c] * m).flatten(1).sum(1).numpy(), rel=1e-6)
    ref = _gradcam_by_hand(seg, x, c, m)
    assert exp.raw.shape == (2, 1, 4, 8, 8) and exp.maps.shape == (2, 1, 8, 16, 16)
    assert (exp.raw[:, 0].double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_input_resolution_mask_is_resized_nearest_at_voxel_centres(seg):
    x = _x()
    mask = np.zeros((8, 16, 16), bool)
    mask[2:6, 4:12, 0:8] = True  # at the input's (D, H, W)
    exp = camlens.explain(seg, x, camlens.Target.region(mask, cls=2))
    want = torch.from_numpy(mask[1::2, 1::2, 1::2].copy()).double()  # nearest at centres: floor((i + .5) * 2)
    ref = _gradcam_by_hand(seg, x, 2, want)
    assert (exp.raw[:, 0].double() - ref).abs().max() < 1e-5 * ref.abs().max()
    with torch.no_grad():
        out = seg(x)
    assert exp.scores[:, 0].double().numpy() == pytest.approx((out[:, 2] * want).flatten(1).sum(1).numpy(), rel=1e-6)


def test_a_3d_box_is_x_y_z_and_equals_its_mask(seg):
    x = _x(1)
    mask = np.zeros((8, 16, 16), bool)
    mask[2:6, 4:12, 0:8] = True  # z 2..6, y 4..12, x 0..8
    by_box = camlens.explain(seg, x, camlens.Target.region((0, 4, 2, 8, 12, 6), cls=0))
    by_mask = camlens.explain(seg, x, camlens.Target.region(mask, cls=0))
    assert torch.equal(by_box.raw, by_mask.raw) and torch.equal(by_box.scores, by_mask.scores)
    with pytest.raises(TargetError, match=r"\(x0, y0, z0, x1, y1, z1\)"):
        camlens.explain(seg, x, camlens.Target.region((0, 4, 8, 12), cls=0))
    with pytest.raises(TargetError, match=r"\(D, H, W\) or \(B, D, H, W\)"):
        camlens.explain(seg, x, camlens.Target.region(np.ones((16, 16), bool), cls=0))


def test_region_on_volumes_with_a_perturbation_method_scores_each_volume_on_its_region(seg):
    """Occlusion with 3-D boxes: each occluded copy of volume b is scored on b's own region."""
    x = _x(2)
    with torch.no_grad():
        out = seg(x)
    c = int(out.argmax(1).flatten().mode().values)
    exp = camlens.explain(seg, x, camlens.Target.region(cls=c), method="occlusion", patch=(4, 8, 8))
    with torch.no_grad():
        m = (out.argmax(1) == c).double()
        occ = x[1:2].clone()
        occ[:, :, 0:4, 0:8, 0:8] = 0
        drop = (out[1, c] * m[1]).sum() - (seg(occ)[0, c] * m[1]).sum()
    assert abs(float(drop)) > 0
    # voxel (0, 0, 0) is covered by the one box starting at (0, 0, 0) only (stride = half the patch)
    assert float(exp.raw[1, 0, 0, 0, 0]) == pytest.approx(float(drop), rel=1e-5, abs=1e-6)
