"""tile=: large images explained tile by tile, blended with feathered weights (camlens.tiling)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.methods import ActivationMethod
from camlens.methods import base as methods_base
from camlens.engine.tiling import TileCanvas, tile_boxes, tile_size, tile_weights, weight_sum


def _x(b=1, size=256, seed=4):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pearson(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


# ----------------------------------------------------------------------------------------------
# geometry and weights


@pytest.mark.parametrize("H,W,tile,overlap", [(256, 256, 128, 32), (200, 300, 96, 20), (1000, 517, (256, 128), 0),
                                              (50, 170, 64, 8), (2048, 2048, 512, 64), (129, 129, 128, 127)])
def test_tile_boxes_cover_the_image_with_equal_overlapping_tiles_ending_at_the_edge(H, W, tile, overlap):
    th, tw = tile_size(H, W, tile)
    boxes = tile_boxes(H, W, tile, overlap)
    cover = torch.zeros(H, W, dtype=torch.int32)
    for y0, x0 in boxes:
        assert 0 <= y0 and y0 + th <= H and 0 <= x0 and x0 + tw <= W  # equal tiles, never padded
        cover[y0:y0 + th, x0:x0 + tw] += 1
    assert int(cover.min()) >= 1  # every pixel covered
    assert len(set(boxes)) == len(boxes)
    for starts, t, L in ((sorted({y for y, _ in boxes}), th, H), (sorted({x for _, x in boxes}), tw, W)):
        assert starts[0] == 0 and starts[-1] + t == L  # the last tile ends exactly at the edge
        assert all(a + t - b >= overlap for a, b in zip(starts, starts[1:]))  # consecutive overlap >= overlap
    if (H, W, tile) == (2048, 2048, 512):
        assert len(boxes) == 25  # stride 448: starts 0, 448, 896, 1344, 1536


def test_a_tile_larger_than_the_image_is_one_tile_of_the_image():
    assert tile_size(100, 60, 128) == (100, 60)
    assert tile_boxes(100, 60, 128, 32) == [(0, 0)]
    assert tile_boxes(100, 300, (512, 128), 32) == [(0, 0), (0, 96), (0, 172)]
    assert np.array_equal(tile_weights(100, 60, 100, 60, 0, 0, 32), np.ones((100, 60)))  # all borders on the edge


def test_weights_are_positive_everywhere_and_a_partition_of_unity_at_exact_overlaps():
    for H, W, tile, ov in [(200, 300, 96, 20), (256, 256, 128, 32), (300, 170, (100, 64), 40)]:
        th, tw = tile_size(H, W, tile)
        ws = weight_sum(H, W, th, tw, tile_boxes(H, W, tile, ov), ov)
        assert float(ws.min()) >= 1 / (ov + 1) ** 2 - 1e-7  # positive everywhere: no division by zero
    # 224 = 128 + 96: two tiles per axis overlapping by exactly 32 px -> the ramps sum to exactly 1
    ws = weight_sum(224, 224, 128, 128, tile_boxes(224, 224, 128, 32), 32)
    assert np.allclose(ws, np.ones((224, 224)), atol=1e-6)
    # bottom-left tile: ramps at its top and right (interior) borders, 1 at the image's left and bottom edges
    w = tile_weights(224, 224, 128, 128, 96, 0, 32)
    assert w[0, 0] == pytest.approx(1 / 33) and w[31, 5] == pytest.approx(32 / 33) and (w[32:, :96] == 1).all()
    assert w[40, -1] == pytest.approx(1 / 33) and w[-1, 0] == 1


def test_a_constant_map_per_tile_blends_to_that_constant_without_seams():
    H, W, tile, ov = 200, 300, 96, 20
    th, tw = tile_size(H, W, tile)
    boxes = tile_boxes(H, W, tile, ov)
    canvas = TileCanvas(2, (3,), H, W, th, tw, boxes, ov)
    for b in range(2):
        for y0, x0 in boxes:
            canvas.add(b, y0, x0, torch.full((3, th, tw), 2.5))
    out = canvas.result()
    assert out.shape == (2, 3, H, W)
    assert (out - 2.5).abs().max() < 1e-6


def test_a_method_with_a_constant_raw_map_per_tile_gives_that_constant_end_to_end(monkeypatch):
    const = ActivationMethod(name="const_test", description="constant", cost="1 forward",
                             fn=lambda a, T: torch.full((a.shape[0], T, *a.shape[-2:]), 2.5))
    monkeypatch.setitem(methods_base._REGISTRY, "const_test", const)
    model = _TinyFCN()
    exp = camlens.explain(model, _x(2, 200)[..., :150], targets=[0, 1], layer="body", method="const_test",
                          tile=(96, 64), overlap=20, tile_batch=3)
    assert exp.raw.shape == (2, 2, 200, 150)
    assert (exp.raw - 2.5).abs().max() < 1e-6  # the blended canvas, before min-max


# ----------------------------------------------------------------------------------------------
# equivalence with the untiled engine


class _TinyFCN(nn.Module):
    """3 convs (receptive field 7 px) -> GAP -> Linear: fully convolutional, 10 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class _TinyViT(nn.Module):
    """For the transformer methods: 4x4 patches + class token, one encoder layer, no position
    embedding (so any input size runs), head on the class token; 10 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc(self.block(torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1))[:, 0])


@pytest.mark.parametrize("kw", [dict(targets=[3, 9], layer="layer3"), dict(top_k=2, layer="layer4"),
                                dict(targets=[[1], [7]], layer="layer4", method="gradcampp"),
                                dict(targets=5, method="guided_backprop")])
def test_a_tile_covering_the_image_gives_exactly_the_untiled_result(resnet18, kw):
    x = _x(2, 96)[..., :80]  # (2, 3, 96, 80)
    plain = camlens.explain(resnet18, x, **kw)
    tiled = camlens.explain(resnet18, x, tile=128, **kw)
    assert tiled.maps.shape == plain.maps.shape == (2, len(plain.targets[0]), 96, 80)
    assert (tiled.maps - plain.maps).abs().max() < 1e-6
    assert tiled.targets == plain.targets and tiled.layers == plain.layers
    assert torch.allclose(tiled.scores, plain.scores, atol=1e-6)
    assert torch.allclose(tiled.probs, plain.probs, atol=1e-6)
    if plain.pixel is not None:
        assert torch.allclose(tiled.pixel, plain.pixel, atol=1e-6)


def test_tiled_gradcam_is_the_feathered_blend_of_the_per_tile_explanations(resnet18):
    """resnet18 (random weights, seed 0), 256² noise image, 128 tiles, overlap 32, layer4.

    The tiled raw map equals the blend of independent untiled explanations of each crop (ReLU,
    upsample to the tile, weight, sum, divide). Pearson(tiled maps, untiled maps) measured 0.553:
    with random weights the layer4 receptive field (435 px) is far larger than the tile, so each
    tile's map differs from the same crop of the untiled map (Pearson 0.56-0.89 per crop) — a
    property of the model, not of the blend; a model whose receptive field fits the tile agrees
    to 0.9998 (next test).
    """
    x = _x()
    exp = camlens.explain(resnet18, x, targets=3, layer="layer4", tile=128, overlap=32)
    boxes = tile_boxes(256, 256, 128, 32)
    assert len(boxes) == 9
    crops = torch.cat([x[..., y0:y0 + 128, x0:x0 + 128] for y0, x0 in boxes])  # the 9 tiles as one batch
    e = camlens.explain(resnet18, crops, targets=3, layer="layer4")
    m = F.interpolate(e.raw.clamp_min(0), size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
    total = torch.zeros(256, 256)
    for i, (y0, x0) in enumerate(boxes):
        total[y0:y0 + 128, x0:x0 + 128] += torch.from_numpy(tile_weights(256, 256, 128, 128, y0, x0, 32)) * m[i]
    blend = total / torch.from_numpy(weight_sum(256, 256, 128, 128, boxes, 32))
    assert torch.allclose(exp.raw[0, 0], blend, atol=1e-5 * float(blend.abs().max()))
    assert exp.scores[0, 0] == pytest.approx(float(e.scores.mean()), abs=1e-5)
    plain = camlens.explain(resnet18, x, targets=3, layer="layer4")
    assert _pearson(exp.maps, plain.maps) > 0.5  # measured 0.553 (see the docstring)


@pytest.mark.parametrize("kw", [dict(combine="mean"), dict(combine="confidence"), dict(combine="sum", method="layercam"),
                                dict(noise_smooth=3, noise_sigma=0.2, seed=4), dict(aug_smooth=True),
                                dict(aug_smooth=True, noise_smooth=2, combine="mean")])
def test_tiling_composes_with_combine_and_smoothing_exactly_when_a_tile_covers_the_image(resnet18, kw):
    # the wrappers compose: with one tile covering each image, tile= changes nothing (B = tile_batch,
    # so the noise draws are the same as untiled)
    x = _x(2, 96)[..., :80]
    base = dict(targets=[3, 9], layer="layer3", **kw)
    plain = camlens.explain(resnet18, x, **base)
    tiled = camlens.explain(resnet18, x, tile=128, tile_batch=2, **base)
    assert tiled.maps.shape == plain.maps.shape
    assert (tiled.maps - plain.maps).abs().max() < 2e-6, kw
    assert tiled.labels == plain.labels
    if "combine" in kw:
        labels = [[t.label for t in r] for r in tiled.components]
        assert tiled.maps.shape[1] == 1 and labels == [[t.label for t in r] for r in plain.components] == [["3", "9"]] * 2


def test_tiled_combine_and_smoothing_match_untiled_on_a_trained_fully_convolutional_model():
    """The shapes model, 256² mosaic, 128 tiles: combined and smoothed tiled maps stay close to the
    untiled ones (receptive field 21 px), and smoothing changes the map (it is not ignored).

    Measured Pearson r (tiled vs untiled): combine="confidence" 0.979 (the weights come from the
    mean tile outputs, not the whole image's), aug_smooth 0.995 / 0.992, noise_smooth=16 0.938 /
    0.999 — noise draws differ, and untiled runs with two seeds agree no better (0.745 at n=4)."""
    from camlens.datasets.shapes import make_shapes
    from camlens.models.shapes import load_shapes

    net = load_shapes().model
    x = make_shapes(16, seed=3).images.view(4, 4, 3, 64, 64).permute(2, 0, 3, 1, 4).reshape(1, 3, 256, 256)
    kw = dict(targets=["shape:0", "colour:1"], layer="features")
    for extra, floor in ((dict(combine="confidence"), 0.96), (dict(noise_smooth=16), 0.9), (dict(aug_smooth=True), 0.98)):
        plain = camlens.explain(net, x, **kw, **extra)
        tiled = camlens.explain(net, x, **kw, **extra, tile=128, overlap=32)
        assert tiled.maps.shape == plain.maps.shape
        for t in range(plain.maps.shape[1]):
            assert _pearson(tiled.maps[:, t], plain.maps[:, t]) > floor, extra
    smooth = camlens.explain(net, x, **kw, noise_smooth=4, tile=128, overlap=32)
    sharp = camlens.explain(net, x, **kw, tile=128, overlap=32)
    assert (smooth.maps - sharp.maps).abs().max() > 1e-3


def test_tiled_gradcam_matches_untiled_on_a_trained_fully_convolutional_model():
    """The shipped shapes model (trained, receptive field 21 px) on a 256² mosaic of 16 shapes
    images, 128 tiles, overlap 32: Pearson 0.9998 (shape head) / 0.9999 (colour head) measured."""
    from camlens.datasets.shapes import make_shapes
    from camlens.models.shapes import load_shapes

    net = load_shapes().model
    x = make_shapes(16, seed=3).images.view(4, 4, 3, 64, 64).permute(2, 0, 3, 1, 4).reshape(1, 3, 256, 256)
    plain = camlens.explain(net, x, targets=["shape:0", "colour:1"], layer="features")
    tiled = camlens.explain(net, x, targets=["shape:0", "colour:1"], layer="features", tile=128, overlap=32)
    for t in range(2):
        assert _pearson(tiled.maps[:, t], plain.maps[:, t]) > 0.995
    assert (tiled.maps - plain.maps).abs().max() < 0.1


@pytest.mark.filterwarnings("ignore:.*maps are constant")
@pytest.mark.parametrize("method", sorted(camlens.available_methods()))
def test_every_method_runs_tiled_and_gives_full_size_maps(method):
    layer = {"cam": "body", "guided_gradcam": "body.2"}.get(method, ["body.2", "body.4"])  # one-layer methods
    net = _TinyViT() if camlens.methods.get_method(method).needs_attention else _TinyFCN()
    exp = camlens.explain(net, _x(1, 64), targets=[1, 4], layer=layer, method=method, tile=40, overlap=8)
    assert exp.maps.shape == (1, 2, 64, 64) and exp.raw.shape == (1, 2, 64, 64)
    peaks = exp.maps.amax((-2, -1))  # 1, or 0 for a map with no positive evidence (occlusion, target 4)
    assert exp.maps.min() >= 0 and ((peaks - 1).abs() < 1e-6).logical_or(peaks == 0).all() and peaks.max() == 1
    if exp.pixel is not None:
        assert exp.pixel.shape == (1, 2, 3, 64, 64)


# ----------------------------------------------------------------------------------------------
# targets and scores


def test_targets_none_and_top_k_use_the_mean_of_the_tile_logits():
    net = _TinyFCN()
    x = _x(2, 160)
    boxes = tile_boxes(160, 160, 96, 32)
    assert boxes == [(0, 0), (0, 64), (64, 0), (64, 64)]
    with torch.no_grad():
        mean = torch.stack([net(x[..., y0:y0 + 96, x0:x0 + 96]) for y0, x0 in boxes]).mean(0)  # (2, 10)
    full = net(x).detach()
    exp = camlens.explain(net, x, layer="body", tile=96, overlap=32, tile_batch=3)
    top = mean.argmax(1).tolist()
    assert [[t.cls for t in row] for row in exp.targets] == [[c] for c in top]
    assert torch.allclose(exp.scores[:, 0], mean[torch.arange(2), top], atol=1e-6)  # mean of the tile scores
    assert not torch.allclose(exp.scores, full[torch.arange(2), top][:, None], atol=1e-6)  # not the full image's
    assert torch.allclose(exp.heads[0], mean, atol=1e-6)
    assert torch.allclose(exp.probs[:, 0], mean.softmax(1)[torch.arange(2), top], atol=1e-6)
    k3 = camlens.explain(net, x, layer="body", tile=96, overlap=32, top_k=3)
    assert [[t.cls for t in row] for row in k3.targets] == mean.topk(3, dim=1).indices.tolist()
    fixed = camlens.explain(net, x, targets=[[7, 1], [2, 7]], layer="body", tile=96, overlap=32)
    assert torch.allclose(fixed.scores, torch.stack([mean[0, [7, 1]], mean[1, [2, 7]]]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# model state and errors


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.grad is None for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()))


def test_the_model_is_left_unchanged_also_when_a_tiled_call_raises():
    model = _TinyFCN().train()
    model.body[2].eval()
    model.fc.weight.requires_grad_(False)
    before = _state(model)
    exp = camlens.explain(model, _x(1, 100), targets=2, layer="body.2", tile=48, overlap=8)
    assert exp.maps.shape == (1, 1, 100, 100) and _state(model) == before

    def boom(out):
        raise RuntimeError("score failed")

    with pytest.raises(RuntimeError, match="score failed"):
        camlens.explain(model, _x(1, 100), targets=boom, layer="body.2", tile=48, overlap=8)
    assert _state(model) == before
    with pytest.raises(IndexError, match="out of range"):
        camlens.explain(model, _x(1, 100), targets=99, layer="body.2", tile=48, overlap=8)
    assert _state(model) == before


@pytest.mark.parametrize("kw,match", [
    (dict(tile=0), "tile must be positive"),
    (dict(tile=-8), "tile must be positive"),
    (dict(tile=1.5), "positive int or a \\(height, width\\) pair"),
    (dict(tile=(64,)), "positive int or a \\(height, width\\) pair"),
    (dict(tile=True), "positive int"),
    (dict(tile=64, overlap=-1), "overlap must be an int >= 0"),
    (dict(tile=64, overlap=64), "overlap \\(64\\) must be smaller than the tile \\(64, 64\\); e.g. overlap=16"),
    (dict(tile=(64, 32), overlap=40), "smaller than the tile"),
    (dict(tile=64, tile_batch=0), "tile_batch must be an int >= 1"),
    (dict(tile=64, upsample=False), "upsample=False is not available with tile="),
])
def test_invalid_tiling_options_raise_actionable_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        camlens.explain(_TinyFCN(), _x(1, 80), targets=[1, 2], layer="body", **kw)
