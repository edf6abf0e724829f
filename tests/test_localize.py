"""Localisation from maps: boxes, masks, GrabCut refinement, IoU, and ``camlens localize``."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from camlens.fronts.cli import app
from camlens.viz import PALETTE
from camlens.analysis.localize import (box_iou, boxes_all_components, boxes_from_maps, cutout, draw_boxes, masks_from_maps,
                              mask_iou)


def _blobs(H=40, W=50):
    """Two blobs: a big one (rows 5..19, cols 4..23, value 1.0) and a small, weaker one (0.6)."""
    m = torch.zeros(H, W)
    m[5:20, 4:24] = 1.0       # 15 x 20 = 300 px
    m[28:34, 35:45] = 0.6     # 6 x 10 = 60 px
    return m


# ------------------------------------------------------------------------------------ boxes
def test_largest_component_box_and_union():
    maps = _blobs()[None, None]
    assert boxes_from_maps(maps, 0.2).tolist() == [[[4, 5, 24, 20]]]             # inclusive-exclusive
    assert boxes_from_maps(maps, 0.2, largest=False).tolist() == [[[4, 5, 45, 34]]]
    # the area, not the peak, decides: make the small blob the brightest
    maps2 = maps.clone()
    maps2[0, 0, 28:34, 35:45] = 2.0
    assert boxes_from_maps(maps2, 0.2).tolist() == [[[4, 5, 24, 20]]]
    comps = boxes_all_components(maps, 0.2)
    assert comps[0][0].tolist() == [[4, 5, 24, 20], [35, 28, 45, 34]]           # sorted by area


def test_threshold_is_a_fraction_of_the_max():
    maps = _blobs()[None, None] * 0.5                                            # max 0.5, small blob 0.3
    # 0.7 * 0.5 = 0.35 > 0.3: the small blob drops out even of the union box
    assert boxes_from_maps(maps, 0.7, largest=False).tolist() == [[[4, 5, 24, 20]]]
    # 0.6 * 0.5 = 0.30 <= 0.3: kept (>=)
    assert boxes_from_maps(maps, 0.6, largest=False).tolist() == [[[4, 5, 45, 34]]]
    # a ramp 0..1 along x: threshold t keeps columns with x / (W - 1) >= t
    ramp = torch.linspace(0, 1, 11).repeat(6, 1)[None, None]                     # (1, 1, 6, 11)
    assert boxes_from_maps(ramp, 0.5).tolist() == [[[5, 0, 11, 6]]]
    assert boxes_from_maps(ramp, 0.95).tolist() == [[[10, 0, 11, 6]]]


def test_diagonal_pixels_are_one_component_and_batching():
    m = torch.zeros(2, 3, 8, 8)
    m[0, 0, 1, 1] = m[0, 0, 2, 2] = m[0, 0, 3, 3] = 1.0                        # 8-connected diagonal: 3 px
    m[0, 0, 6, 0] = m[0, 0, 6, 1] = 1.0                                          # 2 px
    m[1, 2, 4:6, 5:8] = 0.3
    out = boxes_from_maps(m, 0.5)
    assert out.shape == (2, 3, 4) and out.dtype == torch.long
    assert out[0, 0].tolist() == [1, 1, 4, 4]
    assert out[1, 2].tolist() == [5, 4, 8, 6]
    assert out[0, 1].tolist() == [0, 0, 8, 8]                                    # all-zero map: whole image


def test_degenerate_maps_fallback():
    maps = torch.stack([torch.zeros(6, 9), torch.full((6, 9), 0.4), torch.full((6, 9), float("nan"))])[None]
    assert boxes_from_maps(maps, 0.2).tolist() == [[[0, 0, 9, 6]] * 3]
    masks = masks_from_maps(maps, 0.5)
    assert masks.dtype == torch.bool
    assert masks.sum((-1, -2)).tolist() == [[0, 54, 0]]                          # zero / NaN map: empty mask
    assert [len(c) for c in boxes_all_components(maps, 0.2)[0]] == [0, 1, 0]
    with pytest.raises(ValueError):
        boxes_from_maps(maps[0], 0.2)                                            # not (B, T, H, W)
    with pytest.raises(ValueError):
        boxes_from_maps(maps, 1.5)


# ------------------------------------------------------------------------------------ masks
def test_masks_threshold():
    ramp = torch.linspace(0, 1, 11).repeat(4, 1)[None, None] * 2                 # max 2
    mask = masks_from_maps(ramp, 0.5)
    assert mask.shape == (1, 1, 4, 11)
    assert mask[0, 0, 0].tolist() == [False] * 5 + [True] * 6
    assert masks_from_maps(_blobs()[None, None], 0.7).sum().item() == 300


def _square_scene(seed=0, H=64, W=64):
    """A noisy red square on a noisy blue background, and a blurred, shifted map of the square."""
    rng = np.random.default_rng(seed)
    sq = np.zeros((H, W), bool)
    sq[20:44, 16:40] = True
    img = np.empty((H, W, 3))
    img[:] = (30, 60, 200)
    img[sq] = (220, 50, 40)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    m = ndimage.shift(ndimage.gaussian_filter(sq.astype(float), 6), (3, -4), order=1)
    return img, torch.tensor(m / m.max(), dtype=torch.float32), torch.from_numpy(sq)


def test_grabcut_improves_iou_over_thresholding():
    img, m, sq = _square_scene()
    maps = m[None, None]
    for th in (0.3, 0.5, 0.7):
        plain = mask_iou(masks_from_maps(maps, th)[0, 0], sq).item()
        refined = mask_iou(masks_from_maps(maps, th, refine="grabcut", images=img[None])[0, 0], sq).item()
        assert plain < 0.65, (th, plain)
        assert refined > 0.95 and refined > plain + 0.3, (th, plain, refined)
    # the same with tensors and a second (background) target whose map is the complement
    both = torch.stack([m, 1 - m])[None]
    out = masks_from_maps(both, 0.5, refine="grabcut", images=torch.from_numpy(img)[None])
    assert mask_iou(out[0, 0], sq).item() > 0.95 and mask_iou(out[0, 1], ~sq).item() > 0.95
    with pytest.raises(ValueError, match="needs images"):
        masks_from_maps(maps, 0.5, refine="grabcut")
    with pytest.raises(ValueError, match="match"):
        masks_from_maps(maps, 0.5, refine="grabcut", images=img[None, :32])
    # an all-zero map cannot seed GrabCut: it keeps its (empty) threshold mask
    assert not masks_from_maps(torch.zeros(1, 1, 64, 64), 0.5, refine="grabcut", images=img[None]).any()


# ------------------------------------------------------------------------------------ IoU
def test_box_iou_hand_cases():
    a = torch.tensor([0, 0, 10, 10])
    assert box_iou(a, a).item() == 1.0
    assert box_iou(a, torch.tensor([5, 0, 15, 10])).item() == pytest.approx(50 / 150)
    assert box_iou(a, torch.tensor([10, 0, 20, 10])).item() == 0.0                 # touching: no overlap
    assert box_iou(a, torch.tensor([2, 2, 4, 4])).item() == pytest.approx(4 / 100)
    assert box_iou(torch.tensor([3, 3, 3, 3]), torch.tensor([3, 3, 3, 3])).item() == 0.0  # empty
    # broadcasting: (2, 1, 4) vs (3, 4) -> (2, 3)
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 5, 5], [20, 20, 30, 30]])
    out = box_iou(torch.stack([a, torch.tensor([0, 0, 5, 5])])[:, None], boxes)
    assert out.shape == (2, 3)
    assert torch.allclose(out, torch.tensor([[1.0, 0.25, 0.0], [0.25, 1.0, 0.0]]))


def test_mask_iou_hand_cases():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True          # 8 px
    b[0, 1:3] = True         # 8 px, 4 shared
    a[1, 0, 0] = True
    out = mask_iou(a, b)
    assert out.tolist() == pytest.approx([4 / 12, 0.0])
    assert mask_iou(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool)).item() == 0.0
    assert mask_iou(a[0], a[0]).item() == 1.0


def test_draw_boxes_and_cutout():
    img = np.zeros((20, 30, 3), np.uint8)
    out = draw_boxes(img, torch.tensor([[5, 4, 15, 12]]), colors=[(255, 0, 0)], width=1)
    assert out.shape == img.shape and img.sum() == 0                              # copy, not in place
    assert tuple(out[4, 5]) == tuple(out[11, 14]) == (255, 0, 0)                  # corners x0,y0 / x1-1,y1-1
    assert out[12, 15].sum() == 0 and out[8, 10].sum() == 0                       # outside / interior
    tall = np.zeros((60, 30, 3), np.uint8)
    labelled = draw_boxes(tall, [[5, 30, 25, 50]], ["cat"], colors=[(0, 255, 0)])
    assert (labelled[:30, 5:25] != 0).any() and not (labelled[:30, 25:] != 0).any()  # label tab above the box
    top = draw_boxes(tall, [[5, 0, 25, 50]], ["cat"], colors=[(0, 255, 0)], width=1)
    assert (top[1:10, 6:24] != 0).any()                                           # no room above: inside
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:9] = True
    rgba = cutout(np.full((20, 30, 3), 7, np.uint8), mask)
    assert rgba.shape == (20, 30, 4) and (rgba[..., 3] == mask * 255).all() and (rgba[..., :3] == 7).all()


# ------------------------------------------------------------------------------------ CLI
# A model whose Grad-CAM is known: layer "conv" outputs the normalised red channel, class 0 is the
# mean of its ReLU and class 1 minus it. So class 0's map is the red square (1 there, 0 elsewhere)
# and class 1's map the blue background.
MODEL_PY = textwrap.dedent('''
    import torch
    from torch import nn
    from camlens.models import LoadedModel, Preprocess

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 1, bias=False)
            self.fc = nn.Linear(1, 2, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
                self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def build():
        return LoadedModel(model=Net().eval(), preprocess=Preprocess(32, (0.5,) * 3, (0.5,) * 3),
                           categories=["square", "ground"], default_layer="conv", name="tiny",
                           mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32)
''')


def test_cli_localize_end_to_end(tmp_path):
    (tmp_path / "tiny.py").write_text(MODEL_PY)
    img = np.zeros((32, 40, 3), np.uint8)
    img[:] = (20, 40, 220)
    img[8:20, 10:26] = (230, 40, 30)                       # the square: box (10, 8, 26, 20)
    Image.fromarray(img).save(tmp_path / "scene.png")
    (tmp_path / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["localize", str(tmp_path / "scene.png"), str(tmp_path / "broken.jpg"),
                                   "--model", f"{tmp_path / 'tiny.py'}:build", "--target", "0:0", "--target", "0:1",
                                   "--grabcut", "--cutout", "--out", str(out)])
    assert res.exit_code == 1, res.output                  # one unreadable file, the other still done
    assert "broken.jpg" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"][0]["image"].endswith("broken.jpg") and len(summary["images"]) == 1
    entry = summary["images"][0]
    assert entry["input_size"] == [32, 40] and entry["original_size"] == [32, 40]
    sq_t, bg_t = entry["targets"]
    assert [(t["class"], t["label"]) for t in entry["targets"]] == [(0, "square"), (1, "ground")]
    assert summary["threshold"] == 0.2 and summary["grabcut"] is True
    assert sq_t["box"] == [10, 8, 26, 20]
    assert bg_t["box"] == [0, 0, 40, 32]                   # the background surrounds the square
    assert sq_t["box_area"] == pytest.approx(16 * 12 / (32 * 40), abs=1e-4)
    assert sq_t["score"] > 0 > bg_t["score"]

    truth = np.zeros((32, 40), bool)
    truth[8:20, 10:26] = True
    for t, expected in ((sq_t, truth), (bg_t, ~truth)):
        mask = np.asarray(Image.open(out / t["mask"]))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert ((mask == 255) == expected).all()
        assert t["mask_area"] == pytest.approx(expected.mean(), abs=1e-4)
        rgba = Image.open(out / t["cutout"])
        assert rgba.mode == "RGBA"
        rgba = np.asarray(rgba)
        assert (rgba[..., 3] == mask).all()                # alpha == mask * 255
        assert np.abs(rgba[..., :3].astype(int) - img).max() <= 1   # the picture itself (model-input space)
        drawing = np.asarray(Image.open(out / t["box_drawing"]))
        assert drawing.shape == (32, 40, 3)
    boxes_png = np.asarray(Image.open(out / entry["drawing"]))
    assert boxes_png.shape == (32, 40, 3)
    assert tuple(boxes_png[19, 25]) == PALETTE[0]          # square's box corner (x1 - 1, y1 - 1)
    assert tuple(boxes_png[31, 39]) == PALETTE[1]          # background's box: the image border
    assert (boxes_png != img).any()


# ------------------------------------------------------------------------- camlens.localize names
def test_camlens_localize_is_the_module_after_import_camlens():
    """The README's `camlens.localize` is the module, reachable after a plain `import camlens` (loaded
    on first use, like camlens.models / camlens.viz), and every import form gives the same module."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys, types, torch
        import camlens
        assert "camlens.localize" not in sys.modules          # lazy: SciPy only when used
        assert "camlens.analysis.localize" not in sys.modules
        L = camlens.localize
        assert isinstance(L, types.ModuleType) and L.__name__ == "camlens.analysis.localize"
        import camlens.localize
        import camlens.localize as L2
        from camlens.analysis.localize import boxes_from_maps
        from camlens import localize as L3
        assert L is L2 is L3 is camlens.localize and boxes_from_maps is L.boxes_from_maps
        assert "localize" in camlens.__all__
        maps = torch.zeros(1, 1, 8, 10)
        maps[0, 0, 2:5, 3:7] = 1
        print(L.boxes_from_maps(maps, 0.2).tolist(), int(L.masks_from_maps(maps, 0.5).sum()))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[[[3,", "2,", "7,", "5]]]", "12"]
