"""ROAD: noisy linear imputation by hand, MoRF/LeRF behaviour, agreement with pytorch-grad-cam."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.metrics import get_metric
from camlens.metrics.road import (NEIGHBOURS, impute_cg, impute_spsolve, noisy_linear_impute, removal_masks)

W_DIRECT, W_DIAG = 1 / 6, 1 / 12


def residual(out: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``d_i x_i - sum_j w_ij x_j`` at every removed pixel, by explicit loops (independent of road.py)."""
    C, H, W = out.shape
    res = []
    for i, j in zip(*np.nonzero(removed.numpy())):
        d, s = 0.0, torch.zeros(C, dtype=out.dtype)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di or dj) and 0 <= i + di < H and 0 <= j + dj < W:
                    w = W_DIRECT if di == 0 or dj == 0 else W_DIAG
                    d += w
                    s += w * out[:, i + di, j + dj]
        res.append(d * out[:, i, j] - s)
    return torch.stack(res)


def test_neighbour_weights_sum_to_one():
    assert sum(w for *_, w in NEIGHBOURS) == pytest.approx(1.0)
    assert sorted(w for *_, w in NEIGHBOURS) == pytest.approx([W_DIAG] * 4 + [W_DIRECT] * 4)


@pytest.mark.parametrize("pos", [(3, 4), (0, 0), (0, 5), (7, 7)])
def test_single_pixel_in_constant_image_is_the_constant(pos):
    img = torch.full((3, 8, 8), 0.7, dtype=torch.float64)
    img[:, pos[0], pos[1]] = -5.0
    removed = torch.zeros(8, 8, dtype=torch.bool)
    removed[pos] = True
    for out in (impute_spsolve(img, removed), impute_cg(img[None], removed[None])[0]):
        assert torch.allclose(out, torch.full_like(img, 0.7), atol=1e-12)


def test_single_pixel_is_weighted_mean_of_its_neighbours():
    torch.manual_seed(0)
    img = torch.randn(2, 6, 6, dtype=torch.float64)
    removed = torch.zeros(6, 6, dtype=torch.bool)
    removed[2, 3] = True  # interior: 4 direct (1/6) + 4 diagonal (1/12) neighbours, weights sum to 1
    removed[0, 0] = True  # corner: 2 direct + 1 diagonal, weights sum to 5/12 -> normalised
    out = impute_spsolve(img, removed)
    v = img
    interior = (W_DIRECT * (v[:, 1, 3] + v[:, 3, 3] + v[:, 2, 2] + v[:, 2, 4])
                + W_DIAG * (v[:, 1, 2] + v[:, 1, 4] + v[:, 3, 2] + v[:, 3, 4]))
    corner = (W_DIRECT * (v[:, 0, 1] + v[:, 1, 0]) + W_DIAG * v[:, 1, 1]) / (5 / 12)
    assert torch.allclose(out[:, 2, 3], interior, atol=1e-12)
    assert torch.allclose(out[:, 0, 0], corner, atol=1e-12)
    keep = ~removed
    assert torch.equal(out[:, keep], img[:, keep])  # kept pixels untouched


def test_removed_block_solves_the_linear_system():
    torch.manual_seed(1)
    img = torch.randn(3, 12, 10, dtype=torch.float64)
    removed = torch.zeros(12, 10, dtype=torch.bool)
    removed[3:8, 2:6] = True  # a block: neighbours of neighbours are unknown too
    removed[0, :4] = True  # along the border
    removed[10, 9] = True
    out = impute_spsolve(img, removed)
    assert residual(out, removed).abs().max() < 1e-12
    assert torch.equal(out[:, ~removed], img[:, ~removed])
    # the jointly solved block is not a one-pass neighbour mean (that would leave a residual)
    one_pass = img.clone()
    one_pass[:, removed] = 0
    assert residual(one_pass, removed).abs().max() > 0.1
    # the batched CG solver agrees with the sparse LU
    cg = impute_cg(img[None], removed[None], tol=1e-10)[0]
    assert (cg - out).abs().max() < 1e-8
    assert residual(cg, removed).abs().max() < 1e-8


def test_noise_only_on_removed_pixels_and_seeded():
    torch.manual_seed(2)
    img = torch.randn(2, 3, 32, 32)
    removed = torch.rand(2, 32, 32) < 0.5
    clean = noisy_linear_impute(img, removed, noise=0.0, solver="spsolve")
    a = noisy_linear_impute(img, removed, 0.05, torch.Generator().manual_seed(7), solver="spsolve")
    b = noisy_linear_impute(img, removed, 0.05, torch.Generator().manual_seed(7), solver="spsolve")
    c = noisy_linear_impute(img, removed, 0.05, torch.Generator().manual_seed(8), solver="spsolve")
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep = ~removed[:, None].expand_as(img)
    assert torch.equal(a[keep], img[keep])
    d = (a - clean)[~keep]
    assert abs(float(d.std()) - 0.05) < 0.003 and abs(float(d.mean())) < 0.003


def test_removal_masks_counts_and_orders():
    m = torch.arange(20.0)  # pixel i has relevance i
    order = m.argsort(descending=True)
    morf = removal_masks(order, (4, 5), (0.1, 0.5, 0.9), most_first=True).flatten(1)
    lerf = removal_masks(order, (4, 5), (0.1, 0.5, 0.9), most_first=False).flatten(1)
    assert morf.sum(1).tolist() == [2, 10, 18] == lerf.sum(1).tolist()
    assert morf[0].nonzero().flatten().tolist() == [18, 19]  # most relevant removed
    assert lerf[0].nonzero().flatten().tolist() == [0, 1]  # least relevant removed


class PixelLinear(nn.Module):
    """Two logits ``±<w, x>``: the gradient x input of logit 0 is ``w * x`` (exact contributions)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        s = (self.w * x).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_morf_lerf_grad_x_input_beats_random_on_a_linear_model():
    g = torch.Generator().manual_seed(0)
    B, S = 3, 32
    x = torch.randn(B, 3, S, S, generator=g)  # iid pixels: the neighbour fill carries no information
    w = torch.randn(3, S, S, generator=g) * 0.005  # clean probabilities ~0.6
    model = PixelLinear(w)
    target = [[int(c)] for c in model(x).argmax(1)]  # predicted class per image
    sign = torch.tensor([1.0 if t[0] == 0 else -1.0 for t in target]).view(B, 1, 1)
    gxi = (sign * (w * x).sum(1))[:, None]  # (B, 1, H, W) contribution to the target's logit margin / 2
    rnd = torch.rand(B, 1, S, S, generator=g)
    metrics = ["road_morf", "road_lerf", "road"]
    good = camlens.evaluate(model, x, gxi, metrics, targets=target)
    bad = camlens.evaluate(model, x, rnd, metrics, targets=target)
    assert good.curves["road_morf"].shape == (B, 1, 9)
    # removing the most contributing pixels first destroys the prediction; random removal barely does
    assert (good["road_morf"] < bad["road_morf"] - 0.2).all()
    assert (good["road_lerf"] > bad["road_lerf"] + 0.05).all()
    assert (good["road"] > bad["road"] + 0.1).all()
    # at every p; MoRF drops well below the clean probability (~0.6) at once
    assert (good.curves["road_morf"] < bad.curves["road_morf"]).all()
    assert (good.curves["road_lerf"] > bad.curves["road_lerf"]).all()
    assert (good.curves["road_morf"][..., 0] < good.extra["road_morf"]["base"] - 0.4).all()
    # combined = (LeRF - MoRF) / 2, mean over p
    ex = good.extra["road"]
    assert torch.allclose(good["road"], ((ex["lerf"] - ex["morf"]) / 2).mean(-1))
    assert torch.allclose(ex["morf"], good.curves["road_morf"]) and torch.allclose(ex["lerf"], good.curves["road_lerf"])
    assert get_metric("road_morf").higher_is_better is False and get_metric("road_lerf").higher_is_better


def test_seeded_and_cached():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 16, 16, generator=g)
    model = PixelLinear(torch.randn(3, 16, 16, generator=g) * 0.1)
    maps = torch.rand(1, 1, 16, 16, generator=g)
    a = camlens.evaluate(model, x, maps, ["road_morf"], targets=[0])
    b = camlens.evaluate(model, x, maps, ["road_morf"], targets=[0])
    c = camlens.evaluate(model, x, maps, ["road_morf"], targets=[0], options={"road_morf": {"seed": 1}})
    assert torch.equal(a["road_morf"], b["road_morf"]) and not torch.equal(a["road_morf"], c["road_morf"])
    both = camlens.evaluate(model, x, maps, ["road_morf", "road"], targets=[0])
    assert torch.equal(both["road_morf"], a["road_morf"])  # same options -> the same (cached) curves
    assert torch.equal(both.extra["road"]["morf"], a.curves["road_morf"])


def _grad_cam_road():
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                  RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    return PerturbationConfidenceMetric, RemoveMostRelevantFirst, RemoveLeastRelevantFirst, NoisyLinearImputer, \
        ClassifierOutputSoftmaxTarget


def test_imputation_equals_pytorch_grad_cam():
    _, _, _, NoisyLinearImputer, _ = _grad_cam_road()
    g = torch.Generator().manual_seed(4)
    img = torch.randn(3, 24, 20, generator=g)
    keep = (torch.rand(24, 20, generator=g) > 0.6).float()  # theirs: 1 = kept
    keep[5:15, 4:12] = 0
    theirs = NoisyLinearImputer(noise=0.0)(img, keep)
    ours = impute_spsolve(img, keep == 0)
    assert (ours - theirs).abs().max() < 1e-5


def test_road_agrees_with_pytorch_grad_cam():
    """Same masks (40 x 40: p * H * W is an integer for every p, so np.percentile's strict threshold and
    camlens' exact count remove the same pixels), noise off: every p within 1e-5 in probability."""
    Metric, MoRF, LeRF, Imputer, SoftmaxTarget = _grad_cam_road()
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(30)  # confident predictions, so removal moves the probabilities
    x = torch.randn(2, 3, 40, 40, generator=g)
    cams = F.interpolate(torch.rand(2, 1, 5, 5, generator=g), size=(40, 40), mode="bicubic", align_corners=False)[:, 0]
    cams = cams + 1e-4 * torch.rand(2, 40, 40, generator=g)  # no ties
    cls = model(x).argmax(1).tolist()
    pcts = [0.1 * i for i in range(1, 10)]
    opts = {"noise": 0.0, "solver": "spsolve", "tie_noise": 0.0}
    s = camlens.evaluate(model, x, cams[:, None], ["road_morf", "road_lerf", "road"], targets=[[c] for c in cls],
                         options={m: opts for m in ("road_morf", "road_lerf", "road")})
    targets = [SoftmaxTarget(c) for c in cls]
    cam_np = cams.numpy().astype(np.float32)
    base = s.extra["road_morf"]["base"][:, 0]
    halves = []
    for i, p in enumerate(pcts):
        q = round(100 * (1 - p))  # pytorch-grad-cam's percentile = share kept
        theirs_m = Metric(MoRF(q, Imputer(noise=0.0)))(x, cam_np, targets, model)
        theirs_l = Metric(LeRF(q, Imputer(noise=0.0)))(x, cam_np, targets, model)
        ours_m = s.curves["road_morf"][:, 0, i] - base  # theirs is the change from the clean image
        ours_l = s.curves["road_lerf"][:, 0, i] - base
        assert np.abs(ours_m.numpy() - theirs_m).max() < 1e-5
        assert np.abs(ours_l.numpy() - theirs_l).max() < 1e-5
        assert np.abs(theirs_m).max() > 1e-3  # the comparison is not vacuous
        halves.append((theirs_l - theirs_m) / 2)
    # ROADCombined = mean over p of (LeRF - MoRF) / 2 (it hard-codes noise 0.01, so rebuilt noise-free here)
    assert np.abs(s["road"][:, 0].numpy() - np.mean(halves, axis=0)).max() < 1e-5
