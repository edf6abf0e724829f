"""tf-keras-vis' conventions as options, on PyTorch models (the Keras side: tests/test_keras_tf_keras_vis.py):
``gradcampp`` with ``alpha="spatial_sum"`` and ``scorecam`` with ``weights="class_probability"`` equal
hand-written autograd / forward references on a small CNN within 1e-5 of the peak; a target without a class
probability is refused before any masked forward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.core.errors import ConfigError
from reference import forward_capturing


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


def _x(b=2, size=24):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(got, want, tol=1e-5):
    peak = want.abs().max()
    assert peak > 0 and want.std() > 1e-3 * peak
    assert (got - want).abs().max() <= tol * peak, (got - want).abs().max() / peak


def test_gradcampp_spatial_sum_equals_the_formula(net):
    x, classes = _x(), [1, 4]
    exp = camlens.explain(net, x, targets=classes, layer="3", method="gradcampp", alpha="spatial_sum", relu=False)
    out, a = forward_capturing(net, net[3], x)
    for t, c in enumerate(classes):
        g = torch.autograd.grad(out[:, c].sum(), a, retain_graph=True)[0]  # (B, C, h, w)
        alpha = g ** 2 / (2 * g ** 2 + a.sum(dim=(2, 3), keepdim=True) * g ** 3)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        alpha = alpha / alpha.sum(dim=(2, 3), keepdim=True)
        w = (alpha * g.clamp_min(0)).sum(dim=(2, 3))  # (B, C)
        _close(exp.raw[:, t], torch.einsum("bc,bchw->bhw", w, a).detach())
    default = camlens.explain(net, x, targets=classes, layer="3", method="gradcampp", relu=False)
    assert (default.raw - exp.raw).abs().max() > 1e-3 * exp.raw.abs().max()  # a different convention


@pytest.mark.parametrize("max_channels", [None, 4])
def test_scorecam_class_probability_equals_the_masked_probabilities(net, max_channels):
    """``w[t, c] = softmax(model(x * M_c))[class_t]`` (``1 - p`` for a ``sign=-1`` target), masks upsampled with
    aligned corners and min-max'd; with ``max_channels`` only the highest-variance channels, the rest weight 0."""
    x = _x()
    targets = [[1, camlens.Target(cls=3, sign=-1)], [4, camlens.Target(cls=0, sign=-1)]]
    exp = camlens.explain(net, x, targets=targets, layer="3", method="scorecam", weights="class_probability",
                          max_channels=max_channels, relu=False, batch_size=5)
    _, acts = forward_capturing(net, net[3], x)
    acts = acts.detach()
    for b, row in enumerate([(1, 3), (4, 0)]):
        a = acts[b]  # (C, h, w)
        keep = torch.ones(a.shape[0], dtype=torch.bool)
        if max_channels is not None:
            keep = torch.zeros_like(keep)
            keep[a.flatten(1).var(dim=1).topk(max_channels).indices] = True
        up = F.interpolate(a[:, None], size=x.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
        lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
        masks = (up - lo) / (hi - lo + 1e-8)
        with torch.no_grad():
            p = net(x[b:b + 1] * masks[:, None]).softmax(dim=1)  # (C, K)
        for t, (c, sign) in enumerate(zip(row, (1, -1))):
            w = (p[:, c] if sign == 1 else 1 - p[:, c]) * keep
            _close(exp.raw[b, t], torch.einsum("c,chw->hw", w, a))


def test_class_probability_weights_need_class_targets(net):
    with pytest.raises(ConfigError,
                       match=r"weights='class_probability' needs class targets.*weights='channel_softmax'"):
        camlens.explain(net, _x(), targets=[1, lambda out: out[:, 2] - out[:, 0]], layer="3", method="scorecam",
                        weights="class_probability")
