"""aug_smooth and noise smoothing: defined averages, usable with any gradient method."""

import pytest
import torch
import torch.nn.functional as F

import camlens
from camlens.core.postprocess import normalize, process


def _x(b=2, size=64):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "hirescam"])
def test_noise_smoothing_is_the_average_raw_over_noisy_copies(resnet18, method):
    x = _x()
    exp = camlens.explain(resnet18, x, targets=[3, 9], layer="layer3", method=method, noise_smooth=3,
                          noise_sigma=0.2, seed=7)
    gen = torch.Generator().manual_seed(7)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(2, 1, 1, 1)
    noisy = x.repeat(3, 1, 1, 1)
    noisy = noisy + torch.randn(noisy.shape, generator=gen) * (0.2 * span).repeat(3, 1, 1, 1)
    raws = [camlens.explain(resnet18, noisy[i * 2:(i + 1) * 2], targets=[3, 9], layer="layer3", method=method).raw
            for i in range(3)]
    mean_raw = torch.stack(raws).mean(0)
    assert torch.allclose(exp.raw, mean_raw, atol=1e-5, rtol=1e-4)
    assert torch.allclose(exp.maps, process([mean_raw], (64, 64)), atol=1e-5)
    plain = camlens.explain(resnet18, x, targets=[3, 9], layer="layer3", method=method)
    assert (plain.maps - exp.maps).abs().max() > 1e-3  # the noise really changed something
    assert torch.allclose(exp.scores, plain.scores)  # scores are the clean image's


def test_noise_smoothing_with_zero_sigma_is_the_plain_map(resnet18):
    x = _x()
    a = camlens.explain(resnet18, x, top_k=2, layer="layer4", noise_smooth=4, noise_sigma=0.0)
    b = camlens.explain(resnet18, x, top_k=2, layer="layer4")
    assert torch.allclose(a.maps, b.maps, atol=1e-5)
    assert [[t.cls for t in r] for r in a.targets] == [[t.cls for t in r] for r in b.targets]


def test_aug_smooth_is_the_average_of_augmented_maps_mapped_back(resnet18):
    x = _x(1)
    exp = camlens.explain(resnet18, x, targets=5, layer="layer3", aug_smooth=True)
    total = camlens.explain(resnet18, x, targets=5, layer="layer3").maps
    for flip in (False, True):
        for scale in (1.0, 1.1, 0.9):
            if not flip and scale == 1.0:
                continue
            xa = torch.flip(x, dims=(-1,)) if flip else x
            if scale != 1.0:
                xa = F.interpolate(xa, size=(round(64 * scale),) * 2, mode="bilinear")
            m = camlens.explain(resnet18, xa, targets=5, layer="layer3").maps
            m = F.interpolate(m, size=(64, 64), mode="bilinear") if m.shape[-1] != 64 else m
            total = total + (torch.flip(m, dims=(-1,)) if flip else m)
    assert torch.allclose(exp.maps, normalize(total / 6, warn=False), atol=1e-5)


def test_aug_smooth_of_a_flip_symmetric_model_keeps_a_symmetric_map():
    """A model that is mirror-symmetric on a mirror-symmetric image: the smoothed map stays symmetric."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)  # mirror-symmetric kernels
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).eval()
    x = _x(1, 32)
    x = (x + x.flip(-1)) / 2
    exp = camlens.explain(model, x, targets=1, layer="1", aug_smooth=True)
    assert torch.allclose(exp.maps, exp.maps.flip(-1), atol=1e-5)
