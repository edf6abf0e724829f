"""Tests for camlens.viz (numpy/matplotlib only, no core modules)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from camlens.viz import colorize, explanation_grid, grid, overlay, save_png


def _image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images]


# --- colorize ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jet", "viridis", "gray"])
def test_colorize_endpoints_match_matplotlib(name: str) -> None:
    cm = matplotlib.colormaps[name]
    out = colorize(np.array([[0.0, 1.0]]), name)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out[0, 0], np.asarray(cm(0.0, bytes=True))[:3])
    np.testing.assert_array_equal(out[0, 1], np.asarray(cm(1.0, bytes=True))[:3])


def test_colorize_clips_and_accepts_colormap_and_tensor() -> None:
    cm = matplotlib.colormaps["viridis"]
    out = colorize(torch.tensor([[-3.0, 7.0]]), cm)
    np.testing.assert_array_equal(out, colorize(np.array([[0.0, 1.0]]), "viridis"))


def test_colorize_unknown_cmap_lists_names() -> None:
    with pytest.raises(ValueError, match="viridis"):
        colorize(np.zeros((2, 2)), "not_a_cmap")


def test_colorize_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((1, 2, 2)))


# --- overlay -------------------------------------------------------------------


def test_overlay_alpha_extremes() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    m = rng.random((5, 6))
    np.testing.assert_array_equal(overlay(img, m, alpha=0.0), img)
    np.testing.assert_array_equal(overlay(img, m, alpha=1.0), colorize(m))


def test_overlay_pixel_formula() -> None:
    # jet(1.0) = (0.5, 0, 0) -> (127, 0, 0) in uint8 (matplotlib truncates 0.5 * 255).
    assert tuple(colorize(np.ones((1, 1)))[0, 0]) == (127, 0, 0)
    img = np.array([[[10, 200, 255]]], dtype=np.uint8)
    out = overlay(img, np.ones((1, 1)), alpha=0.25)
    # 0.75 * (10, 200, 255) + 0.25 * (127, 0, 0) = (39.25, 150, 191.25) -> rounded
    assert tuple(int(v) for v in out[0, 0]) == (39, 150, 191)


def test_overlay_float_and_grey_images() -> None:
    m = np.zeros((3, 4))
    grey = np.full((3, 4), 0.5)  # float [0, 1] grey -> 127.5
    out = overlay(grey, m, alpha=0.0)
    assert out.shape == (3, 4, 3)
    assert np.all(out == 128)  # rint(127.5) = 128
    rgb = torch.full((3, 4, 3), 1.0)
    assert np.all(overlay(rgb, m, alpha=0.0) == 255)


def test_overlay_resizes_map() -> None:
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    m = np.array([[0.0, 1.0]])  # (1, 2) -> (4, 4): columns 0, 0.25, 0.75, 1
    out = overlay(img, m, cmap="gray", alpha=1.0)
    assert out.shape == (4, 4, 3)
    # gray(v, bytes=True) via matplotlib's 256-entry LUT
    expected = [matplotlib.colormaps["gray"](v, bytes=True)[0] for v in (0.0, 0.25, 0.75, 1.0)]
    np.testing.assert_array_equal(out[2, :, 0], expected)
    assert out[0, 1, 0] == 64 and out[0, 3, 0] == 255  # gray(0.25) = 64/255


def test_overlay_resize_matches_torch_interpolate() -> None:
    rng = np.random.default_rng(1)
    m = rng.random((5, 7))
    ref = torch.nn.functional.interpolate(
        torch.tensor(m)[None, None], size=(11, 13), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    img = np.zeros((11, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(img, m, alpha=1.0), colorize(ref))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_overlay_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2)), alpha=alpha)


def test_overlay_bad_image_shape() -> None:
    with pytest.raises(ValueError, match="permute"):
        overlay(np.zeros((3, 8, 8), np.float32), np.zeros((8, 8)))


# --- grid ------------------------------------------------------------------------


def test_grid_axes_and_titles() -> None:
    B, T = 2, 3
    images = np.zeros((B, 8, 8, 3), dtype=np.uint8)
    maps = torch.rand(B, T, 4, 4)
    titles = [[f"img{b} t{t}" for t in range(T)] for b in range(B)]
    fig = grid(images, maps, titles, suptitle="hello")
    assert isinstance(fig, Figure)
    axes = _image_axes(fig)
    assert len(axes) == B * T
    assert [ax.get_title() for ax in axes] == [t for row in titles for t in row]
    assert all(not ax.axison for ax in axes)
    assert len(fig.axes) == B * T + 1  # plus the shared colorbar
    assert fig._suptitle.get_text() == "hello"
    assert axes[0].images[0].get_array().shape == (8, 8, 3)


def test_grid_wraps_long_titles() -> None:
    long = "a very long class label " * 6
    fig = grid([np.zeros((4, 4, 3), np.uint8)], np.zeros((1, 1, 4, 4)), [[long]], cell_size=2.0)
    assert "\n" in _image_axes(fig)[0].get_title()


def test_grid_shape_errors() -> None:
    imgs = [np.zeros((4, 4, 3), np.uint8)] * 3
    with pytest.raises(ValueError, match="maps has B=2 but 3 images were given"):
        grid(imgs, np.zeros((2, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        grid(imgs, np.zeros((3, 1, 1, 4, 4)))
    with pytest.raises(ValueError, match="titles has 2 rows"):
        grid(imgs, np.zeros((3, 2, 4, 4)), [["a", "b"]] * 2)
    with pytest.raises(ValueError, match=r"titles\[1\].*T=2"):
        grid(imgs, np.zeros((3, 2, 4, 4)), [["a", "b"], ["a"], ["a", "b"]])


# --- save_png ------------------------------------------------------------------


def test_save_png_array(tmp_path) -> None:
    arr = np.zeros((7, 9, 3), dtype=np.uint8)
    arr[2, 3] = (255, 10, 20)
    p = save_png(tmp_path / "sub" / "dir" / "x.png", arr)
    assert p.exists() and p.parent.name == "dir"
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (9, 7)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), arr)


def test_save_png_figure(tmp_path) -> None:
    fig = grid([np.zeros((4, 4, 3), np.uint8)], np.zeros((1, 2, 4, 4)), [["a", "b"]])
    p = save_png(tmp_path / "fig.png", fig, dpi=50)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50


# --- explanation_grid ----------------------------------------------------------


def _fake_exp(display: bool) -> SimpleNamespace:
    B, T = 2, 2
    return SimpleNamespace(
        maps=torch.rand(B, T, 4, 4),
        targets=[[SimpleNamespace(label=f"{b * T + t}: cls{t}") for t in range(T)] for b in range(B)],
        probs=torch.tensor([[0.123, float("nan")], [0.5, 0.999]]),
        inputs=torch.randn(B, 3, 8, 8),
        display=np.full((B, 8, 8, 3), 200, np.uint8) if display else None,
    )


def test_explanation_grid_titles_and_nan() -> None:
    fig = explanation_grid(_fake_exp(display=True))
    titles = [ax.get_title() for ax in _image_axes(fig)]
    assert titles == ["0: cls0 p=0.12", "1: cls1", "2: cls0 p=0.50", "3: cls1 p=1.00"]
    assert "p=" not in titles[1]


def test_explanation_grid_display_sources() -> None:
    exp = _fake_exp(display=True)
    fig = explanation_grid(exp, alpha=0.0)
    assert np.all(_image_axes(fig)[0].images[0].get_array() == 200)

    exp = _fake_exp(display=False)
    fig = explanation_grid(exp, alpha=0.0)
    shown = np.asarray(_image_axes(fig)[0].images[0].get_array())
    assert shown.shape == (8, 8, 3)
    assert shown.min() == 0 and shown.max() == 255  # per-image min-max rescale

    given = [np.full((6, 6, 3), 7, np.uint8)] * 2
    fig = explanation_grid(exp, images=given, alpha=0.0)
    assert np.all(_image_axes(fig)[3].images[0].get_array() == 7)


def test_explanation_grid_bad_targets() -> None:
    exp = _fake_exp(display=True)
    exp.targets = exp.targets[:1]
    with pytest.raises(ValueError, match="B=2"):
        explanation_grid(exp)
    assert math.isnan(float(_fake_exp(True).probs[0, 1]))
