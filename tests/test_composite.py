"""camlens.viz.composite: several targets' maps in one picture, each in its own hue."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from camlens.viz import PALETTE, composite, composite_figure, explanation_composite


def _img(h: int = 2, w: int = 3, rgb=(10, 20, 30)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def test_single_target_at_one_is_blend_of_image_and_its_colour() -> None:
    maps = np.zeros((1, 2, 3))
    maps[0, 0, 1] = 1.0
    out = composite(_img(), maps, ["a"], alpha=0.6)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    # PALETTE[0] = (31, 119, 180): 0.4 * (10, 20, 30) + 0.6 * (31, 119, 180) = (22.6, 79.4, 120.0)
    np.testing.assert_array_equal(out[0, 1], [23, 79, 120])
    mask = np.ones((2, 3), bool)
    mask[0, 1] = False
    np.testing.assert_array_equal(out[mask], _img()[mask])  # map 0 elsewhere: image untouched


def test_two_targets_at_one_give_the_average_colour() -> None:
    maps = np.ones((2, 1, 1))
    out = composite(np.zeros((1, 1, 3), np.uint8), maps, alpha=1.0)
    # (PALETTE[0] + PALETTE[1]) / 2 = ((31 + 255) / 2, (119 + 127) / 2, (180 + 14) / 2)
    np.testing.assert_array_equal(out[0, 0], [143, 123, 97])
    # unequal maps mix in proportion: (1 * red + 0.5 * blue) / 1.5, opacity alpha * max = 1
    out = composite(np.zeros((1, 1, 3), np.uint8), np.array([[[1.0]], [[0.5]]]), colors=["red", "blue"], alpha=1.0)
    np.testing.assert_array_equal(out[0, 0], [170, 0, 85])
    # opacity follows the strongest map: both at 0.5 over white, alpha 0.8 -> a = 0.4
    out = composite(_img(1, 1, (255, 255, 255)), np.full((2, 1, 1), 0.5), colors=["red", "blue"], alpha=0.8)
    np.testing.assert_array_equal(out[0, 0], np.rint([0.6 * 255 + 0.4 * 127.5, 0.6 * 255, 0.6 * 255 + 0.4 * 127.5]))


def test_zero_maps_and_threshold_leave_image_unchanged() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(composite(img, np.zeros((3, 5, 7)), alpha=1.0), img)
    np.testing.assert_array_equal(composite(img, np.full((2, 5, 7), 0.2), threshold=0.3), img)
    assert not np.array_equal(composite(img, np.full((2, 5, 7), 0.2), threshold=0.1), img)
    # float images in [0, 1] and torch maps are accepted
    out = composite(img / 255.0, torch.zeros(1, 5, 7))
    np.testing.assert_array_equal(out, img)


def test_maps_resized_to_image_and_shape_errors() -> None:
    maps = np.ones((1, 2, 2))
    out = composite(_img(4, 6), maps, alpha=1.0)
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, np.broadcast_to(np.array(PALETTE[0], np.uint8), (4, 6, 3)))
    with pytest.raises(ValueError, match="labels"):
        composite(_img(), np.zeros((2, 2, 3)), ["only one"])
    with pytest.raises(ValueError, match="alpha"):
        composite(_img(), np.zeros((1, 2, 3)), alpha=1.5)


def test_more_targets_than_palette_is_a_clear_error() -> None:
    n = len(PALETTE) + 1
    with pytest.raises(ValueError, match=f"{n} targets but only {len(PALETTE)} colours"):
        composite(_img(), np.zeros((n, 2, 3)))
    colors = [f"C{i % 10}" for i in range(n)]  # explicit colours lift the limit
    assert composite(_img(), np.zeros((n, 2, 3)), colors=colors).shape == (2, 3, 3)


def test_figure_has_legend_with_labels_and_colours() -> None:
    labels = ["species: tabby p=0.93", "colour: orange p=0.71"]
    fig = composite_figure(_img(8, 12), np.random.default_rng(1).random((2, 8, 12)), labels, title="t")
    assert isinstance(fig, Figure)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == labels
    faces = [to_hex(h.get_facecolor()) for h in getattr(legend, "legend_handles", None) or legend.legendHandles]
    assert faces == [to_hex(np.array(c) / 255) for c in PALETTE[:2]]
    fig.canvas.draw()  # renders without pyplot
    assert fig.axes[0].images[0].get_array().shape == (8, 12, 3)


def test_explanation_composite_labels_probs_and_display() -> None:
    B, T, H, W = 2, 3, 4, 5
    maps = torch.zeros(B, T, H, W)
    maps[1, 2, 0, 0] = 1.0
    exp = SimpleNamespace(
        maps=maps, probs=torch.tensor([[0.1, 0.2, 0.3], [0.93, float("nan"), 0.5]]),
        targets=[[SimpleNamespace(label=f"h: c{t}") for t in range(T)] for _ in range(B)],
        display=np.full((B, H, W, 3), 100, np.uint8), inputs=torch.zeros(B, 3, H, W))
    fig = explanation_composite(exp, 1, alpha=1.0)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["h: c0 p=0.93", "h: c1", "h: c2 p=0.50"]
    arr = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(arr[0, 0], PALETTE[2])
    np.testing.assert_array_equal(arr[1, 1], [100, 100, 100])
    fig = explanation_composite(exp, 1, targets=[2], colors=["red"], alpha=1.0)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["h: c2 p=0.50"]
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array()[0, 0], [255, 0, 0])
    # without display: inputs min-max rescaled
    exp.display = None
    exp.inputs = torch.zeros(B, 3, H, W)
    exp.inputs[1, :, 0, 1] = 1.0
    arr = explanation_composite(exp, 1).axes[0].images[0].get_array()
    np.testing.assert_array_equal(arr[0, 1], [255, 255, 255])
    with pytest.raises(IndexError):
        explanation_composite(exp, 2)
