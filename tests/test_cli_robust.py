"""The CLI on bad files, many targets and common mistakes: per-file errors, bounded outputs, one-line errors."""

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import camlens
from camlens.fronts.cli import app

SMALL_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
'''

# Tiny LoadedModels (16 px inputs): 2000 classes, and one that (like a ViT) only takes 16 x 16 inputs.
TINY_MODELS = '''
import torch
from torch import nn
from camlens.models import LoadedModel, Preprocess


def many():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2000))
    return LoadedModel(model=net.eval(), preprocess=Preprocess(16, (0.5,) * 3, (0.5,) * 3), categories=None,
                       default_layer="0", name="many", input_size=16)


class Strict(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        assert x.shape[-2:] == (16, 16), f"Input height/width {tuple(x.shape[-2:])} doesn't match model (16, 16)."
        return self.fc(self.conv(x).relu().mean((2, 3)))


def strict():
    return LoadedModel(model=Strict().eval(), preprocess=Preprocess(16, (0.5,) * 3, (0.5,) * 3), categories=None,
                       default_layer="conv", name="strict", input_size=16)
'''


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res, *, max_lines=8):
    """Exit != 0, a short message, no traceback (in the output or as an uncaught exception)."""
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= max_lines, res.output


def _rand_png(path, h, w, seed=0):
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def small(tmp_path):
    (tmp_path / "small.py").write_text(SMALL_MODEL)
    return f"{tmp_path / 'small.py'}:build"


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY_MODELS)
    return str(tmp_path / "tiny.py")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb(path, side=20000, real=False):
    """A PNG claiming side x side pixels: the header alone (~45 bytes), or real 1-bit data (~50 KB)."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1 if real else 8, 0, 0, 0, 0))
    body = b""
    if real:
        co = zlib.compressobj(9)
        row = b"\x00" + bytes(side // 8)
        body = _png_chunk(b"IDAT", b"".join(co.compress(row) for _ in range(side)) + co.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + body + _png_chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------
def test_decompression_bombs_are_per_file_errors(tmp_path, small):
    header = _bomb(tmp_path / "header.png")
    real = _bomb(tmp_path / "real.png", real=True)
    assert len(header.read_bytes()) < 100 and len(real.read_bytes()) < 100_000
    good = _rand_png(tmp_path / "good.png", 20, 24)
    out = tmp_path / "o"
    res = _run("explain", header, good, real, "--model", small, "--target", "1", "--out", out)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    s = json.loads((out / "summary.json").read_text())
    assert [e["image"] for e in s["images"]] == [str(good)]
    assert {e["image"] for e in s["errors"]} == {str(header), str(real)}
    assert all("400,000,000 pixels" in e["error"] and "--max-pixels" in e["error"] for e in s["errors"])
    # the limit is an option: a normal picture over a tiny limit is refused the same way
    res = _run("explain", good, "--model", small, "--max-pixels", 100, "--out", tmp_path / "o2")
    assert res.exit_code == 1 and "exceeds the limit of 100 pixels" in res.output


def test_load_image_max_pixels_replaces_pils_bomb_check(tmp_path, monkeypatch):
    from camlens.io import load_image

    path = _rand_png(tmp_path / "a.png", 60, 50)
    with pytest.raises(ValueError, match="exceeds the limit of 1,000 pixels"):
        load_image(path, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would warn (> 1000) and refuse (> 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert load_image(path).size == (50, 60)  # default limit: 100 megapixels
        assert load_image(path, max_pixels=None).size == (50, 60)
        assert load_image(path, max_pixels=0).size == (50, 60)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ValueError, match="exceeds the limit"):
        load_image(_bomb(tmp_path / "bomb.png"))


def _chelsea_grey():
    data = pytest.importorskip("skimage.data")
    return np.asarray(Image.fromarray(data.chelsea()).convert("L"))


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    from camlens.io import load_image

    g8 = _chelsea_grey()
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # I;16 (or I in older PIL)
    ref = np.asarray(load_image(tmp_path / "g8.png"))
    got = np.asarray(load_image(tmp_path / "g16.png"))
    assert (got == 255).mean() < 0.01  # it was 99.6 % before
    np.testing.assert_array_equal(got, ref)
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2")):
        im = Image.frombytes(mode, g8.shape[::-1], (g8.astype(dtype) * 257).tobytes())
        np.testing.assert_array_equal(np.asarray(load_image(im)), ref)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(g8.astype(np.int32) * 257, "I"))), ref)
    Image.fromarray(g8.astype(np.float32) / 255).save(tmp_path / "f.tif")  # float TIFF, mode F in [0, 1]
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert np.abs(np.asarray(load_image(tmp_path / "f.tif")).astype(int) - ref).max() <= 1
    np.testing.assert_array_equal(np.asarray(load_image(g8.astype(np.uint16) * 257)), ref)  # uint16 arrays too


def test_16bit_photo_gives_the_same_prediction_and_maps_as_8bit(tmp_path):
    data = pytest.importorskip("skimage.data")
    g8 = _chelsea_grey()
    paths = [tmp_path / "g8.png", tmp_path / "g16.png"]
    Image.fromarray(g8).save(paths[0])
    Image.fromarray(g8.astype(np.uint16) * 257).save(paths[1])
    rgb = data.chelsea()
    Image.fromarray(rgb).save(tmp_path / "rgb8.png")
    paths.append(tmp_path / "rgb8.png")
    cv2 = pytest.importorskip("cv2")  # PIL cannot write 16-bit RGB; OpenCV can
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), (rgb.astype(np.uint16) * 257)[..., ::-1])
    paths.append(tmp_path / "rgb16.png")
    out = tmp_path / "o"
    res = _run("explain", *paths, "--out", out)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    g8e, g16e, r8e, r16e = s["images"]
    for a, b in ((g8e, g16e), (r8e, r16e)):
        assert a["targets"][0]["class"] == b["targets"][0]["class"]
        assert a["targets"][0]["prob"] == pytest.approx(b["targets"][0]["prob"], abs=1e-4)
        np.testing.assert_allclose(np.load(out / a["maps"]), np.load(out / b["maps"]), atol=1e-5)


def test_same_stems_and_non_ascii_names_get_their_own_files(tmp_path, small):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    paths = [_rand_png(tmp_path / "a" / "cat.png", 20, 24, 0), _rand_png(tmp_path / "b" / "cat.png", 20, 24, 1),
             _rand_png(tmp_path / "猫.png", 20, 24, 2), _rand_png(tmp_path / "犬.png", 20, 24, 3),
             _rand_png(tmp_path / "cat_01.png", 20, 24, 4)]
    for cmd, out in (("explain", tmp_path / "e"), ("localize", tmp_path / "l")):
        res = _run(cmd, *paths, "--model", small, "--top-k", "2", "--out", out)
        assert res.exit_code == 0, res.output
        s = json.loads((out / "summary.json").read_text())
        assert [e["image"] for e in s["images"]] == [str(p) for p in paths]
        per_image = [e["files"] for e in s["images"]]
        flat = [f for files in per_image for f in files]
        assert len(flat) == len(set(flat)), per_image  # nothing written twice
        assert s["files"] == {str(p): files for p, files in zip(paths, per_image)}
        written = {p.name for p in out.iterdir()} - {"summary.json"}
        assert written == set(flat)
        assert len(per_image[0]) == len(per_image[1]) > 0


def test_safe_name_keeps_non_ascii_names_apart():
    from camlens.fronts.report import safe_name

    assert safe_name("猫") != safe_name("犬") and safe_name("猫") == safe_name("猫")
    assert safe_name("tiger cat") == "tiger_cat" and safe_name("") == "x"


def test_a_models_own_error_is_a_per_file_error_with_a_hint(tmp_path, tiny):
    square = _rand_png(tmp_path / "square.png", 20, 20)
    wide = _rand_png(tmp_path / "wide.png", 20, 30)
    for cmd in ("explain", "localize"):
        out = tmp_path / cmd
        res = _run(cmd, wide, square, "--model", f"{tiny}:strict", "--out", out)
        assert res.exit_code == 1, res.output
        assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError)
        s = json.loads((out / "summary.json").read_text())
        assert [e["image"] for e in s["images"]] == [str(square)]  # the run went on
        (err,) = s["errors"]
        assert err["image"] == str(wide) and "doesn't match model" in err["error"] and "--crop" in err["error"]
    res = _run("explain", wide, square, "--model", f"{tiny}:strict", "--crop", "--out", tmp_path / "c")
    assert res.exit_code == 0, res.output


def test_usage_errors_still_stop_the_run_once(tmp_path, small):
    paths = [_rand_png(tmp_path / f"{i}.png", 20, 24, i) for i in range(3)]
    res = _run("explain", *paths, "--model", small, "--layer", "nope", "--out", tmp_path / "o")
    _one_line_error(res)
    assert res.exit_code == 2 and res.output.count("error") == 1
    res = _run("explain", *paths, "--model", small, "--layer", "6", "--out", tmp_path / "o")  # the Linear head
    _one_line_error(res)


# ------------------------------------------------------------------------------------------
# many targets: bounded memory and outputs
# ------------------------------------------------------------------------------------------
def test_two_thousand_targets_finish_with_bounded_outputs(tmp_path, tiny, monkeypatch):
    import camlens.compare as compare

    def no_full_agreement(*a, **k):
        raise AssertionError("the per-pixel pairwise agreement (pairs x H x W) must not be computed")

    monkeypatch.setattr(compare, "agreement", no_full_agreement)
    img = _rand_png(tmp_path / "a.png", 20, 30)
    out = tmp_path / "o"
    res = _run("explain", img, "--model", f"{tiny}:many", "--top-k", "2000", "--out", out)
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "summary.json").read_text())["images"][0]
    assert len(entry["targets"]) == 2000
    assert len(entry["agreement"]) == 16 * 15 // 2 and "first 16 of 2000" in entry["agreement_note"]
    assert sum(t["overlay"] is not None for t in entry["targets"]) == 64 and "64 of 2000" in entry["overlays_note"]
    assert len(list(out.glob("a_*_*.png"))) == 64
    assert np.load(out / entry["maps"]).shape == (2000, 16, 24)
    w, h = Image.open(out / entry["grid"]).size
    assert w < 3000 and h < 3000, (w, h)  # 8 columns x 8 rows at most (was one row 30056 px wide for 100)


def test_agreement_summary_is_chunked_and_matches_agreement(monkeypatch):
    import camlens.compare as compare

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 30)).eval()
    exp = camlens.explain(net, torch.randn(2, 3, 12, 10), top_k=8, layer="0")
    full = compare.agreement(exp)
    seen = []
    real = compare.pearson
    monkeypatch.setattr(compare, "pearson", lambda a, b: seen.append(a.numel()) or real(a, b))
    rows = compare.agreement_summary(exp, chunk=5)
    assert rows == [full.summary(0), full.summary(1)]
    assert len(seen) == -(-28 // 5) and max(seen) <= 2 * 5 * 12 * 10  # B x chunk x H x W, never all 28 pairs
    assert len(compare.agreement_summary(exp, max_targets=3)[0]) == 3
    assert compare.agreement_summary(exp, max_targets=1) == [[], []]


def test_grids_wrap_and_cap_cells():
    from camlens.viz import grid
    from camlens.viz.grid import explanation_grid

    class Exp:
        maps = torch.rand(1, 100, 8, 8)
        probs = torch.rand(1, 100)
        targets = [[f"t{i}" for i in range(100)]]
        inputs = torch.rand(1, 3, 8, 8)
        display = None

    fig = explanation_grid(Exp(), cell_size=1.0)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 64 and fig.get_size_inches()[0] < 8 * 1.0 + 2
    assert "first 64 of 100 targets" in fig._suptitle.get_text()
    fig = grid([np.zeros((8, 8, 3), np.uint8)], np.zeros((1, 20, 8, 8)), max_cols=5, cell_size=1.0)
    assert sum(bool(ax.images) for ax in fig.axes) == 20 and fig.get_size_inches()[0] < 5 * 1.0 + 2


# ------------------------------------------------------------------------------------------
# common mistakes: one line, no traceback
# ------------------------------------------------------------------------------------------
def test_model_loading_mistakes_are_one_line(tmp_path):
    tv = pytest.importorskip("torchvision")
    img = _rand_png(tmp_path / "a.png", 20, 24)
    torch.save(tv.models.resnet18(), tmp_path / "whole.pt")
    torch.save(tv.models.resnet18().state_dict(), tmp_path / "r18.pt")
    (tmp_path / "notweights.pt").write_text("hello")
    cases = [
        (["--model", "nope"], "unknown model"),
        (["--model", "torchvision:resnet5"], "resnet50"),  # did you mean
        (["--model", "timm:resnet5x"], "unknown timm model"),
        (["--model", "torchvision:resnet18", "--weights", tmp_path / "missing.pt"], "not found"),
        (["--model", "torchvision:resnet18", "--weights", tmp_path / "notweights.pt"], "cannot read weights"),
        (["--model", "torchvision:resnet50", "--weights", tmp_path / "r18.pt"], "missing key"),
        (["--model", "torchvision:resnet18", "--weights", tmp_path / "whole.pt"], "state_dict()"),
        (["--model", f"{tmp_path / 'none.py'}:build"], "not found"),
    ]
    for args, needle in cases:
        res = _run("explain", img, *args, "--out", tmp_path / "o")
        _one_line_error(res, max_lines=3)
        assert needle in res.output, (args, res.output)


def test_option_mistakes_are_caught_before_the_model_loads(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(camlens.models, "load", boom)
    img = _rand_png(tmp_path / "a.png", 20, 24)
    cases = [
        ("explain", ["--cmap", "jett"], "jet"),
        ("explain", ["--alpha", "2"], "[0, 1]"),
        ("explain", ["--method", "gradcm"], "gradcam"),
        ("explain", ["--combine", "avg"], "confidence"),
        ("explain", ["--top-k", "0"], "--top-k"),
        ("explain", ["--device", "nonsense:x"], "device"),
        ("localize", ["--method", "gradcm"], "gradcam"),
        ("report", ["--method", "gradcm"], "gradcam"),
        ("evaluate", ["--method", "gradcm"], "gradcam"),
        ("evaluate", ["--metric", "delet"], "deletion"),
        ("evaluate", ["--metric", "pointing_game"], "--shapes"),
    ]
    for cmd, args, needle in cases:
        res = _run(cmd, img, *args, "--out", tmp_path / "o")
        _one_line_error(res)
        assert needle in res.output, (cmd, args, res.output)
        assert "masks=" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu_is_one_line(tmp_path):
    res = _run("explain", _rand_png(tmp_path / "a.png", 20, 24), "--device", "cuda", "--out", tmp_path / "o")
    _one_line_error(res, max_lines=2)
    assert "cuda" in res.output and "--device cpu" in res.output


def test_random_weights_are_flagged(tmp_path):
    pytest.importorskip("torchvision")
    img = _rand_png(tmp_path / "a.png", 24, 24)
    out = tmp_path / "o"
    res = _run("explain", img, "--model", "torchvision:resnet18", "--out", out)
    assert res.exit_code == 0, res.output
    assert "random weights" in res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["random_weights"] is True
    res = _run("localize", img, "--model", "torchvision:resnet18", "--out", tmp_path / "l")
    assert res.exit_code == 0 and "random weights" in res.output
    assert json.loads((tmp_path / "l" / "summary.json").read_text())["random_weights"] is True


def test_default_model_is_not_flagged(tmp_path, small):
    out = tmp_path / "o"
    res = _run("explain", _rand_png(tmp_path / "a.png", 20, 24), "--model", small, "--out", out)
    assert res.exit_code == 0 and "random weights" not in res.output
    assert json.loads((out / "summary.json").read_text())["random_weights"] is False


# ------------------------------------------------------------------------------------------
# smaller things
# ------------------------------------------------------------------------------------------
def test_target_all_and_head_all(tmp_path, small):
    img = _rand_png(tmp_path / "a.png", 20, 24)
    for spec, n in (("all", 5), ("0:all", 5), ("ALL", 5)):
        out = tmp_path / spec.replace(":", "_")
        res = _run("explain", img, "--model", small, "--target", spec, "--out", out)
        assert res.exit_code == 0, res.output
        entry = json.loads((out / "summary.json").read_text())["images"][0]
        assert [t["class"] for t in entry["targets"]] == list(range(n))
    res = _run("explain", img, "--model", small, "--target", "all", "--target", "1", "--out", tmp_path / "x")
    _one_line_error(res)


def test_boolean_options_are_flags(tmp_path, small):
    import re

    help_text = _run("explain", "--help").output
    crop_row = next(ln for ln in help_text.splitlines() if "--crop" in ln)
    assert "--no-crop" in crop_row and "<bool>" not in crop_row
    img = _rand_png(tmp_path / "a.png", 20, 24)
    res = _run("explain", img, "--model", small, "--crop", "true", "--out", tmp_path / "o")
    _one_line_error(res)
    assert re.search(r"flags\s+take\s+no\s+value", res.output)
    res = _run("explain", img, "--model", small, "--crop", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert np.load(next((tmp_path / "o").glob("*_maps.npy"))).shape[-2:] == (224, 224)


def test_overlays_are_at_the_photos_resolution(tmp_path, small):
    img = _rand_png(tmp_path / "a.png", 300, 450)
    out = tmp_path / "o"
    res = _run("explain", img, "--model", small, "--out", out)
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "summary.json").read_text())["images"][0]
    assert Image.open(out / entry["targets"][0]["overlay"]).size == (450, 300)
    assert entry["overlay_size"] == [300, 450] and entry["input_size"] == [224, 336]
    res = _run("explain", img, "--model", small, "--crop", "--out", tmp_path / "c")
    entry = json.loads((tmp_path / "c" / "summary.json").read_text())["images"][0]
    assert Image.open(tmp_path / "c" / entry["targets"][0]["overlay"]).size == (300, 300)


def test_evaluate_labels_units_and_counts(tmp_path):
    res = _run("evaluate", "--shapes", "2", "--method", "center", "--metric", "average_drop", "--metric",
               "deletion", "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    assert "average_drop (%)" in res.output
    assert "2 image(s)" in res.output and "n = 4" in res.output  # 2 images x 2 heads' targets


def test_method_all_reports_progress_and_real_file_names(tmp_path, small):
    img = _rand_png(tmp_path / "a.png", 20, 24)
    out = tmp_path / "o"
    res = _run("explain", img, "--model", small, "--layer", "3", "--target", "2", "--method", "all", "--out", out)
    assert res.exit_code == 0, res.output
    n = len(camlens.available_methods())
    for i, name in enumerate(camlens.available_methods(), 1):
        assert f"{i}/{n} {name}" in res.output
    assert "_methods.png" in res.output and "_grid.png" not in res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["images"][0]["files"] == [s["images"][0]["methods_grid"]]
    assert {p.name for p in out.iterdir()} == {"summary.json", s["images"][0]["methods_grid"]}


def test_box_labels_do_not_cover_each_other():
    from camlens.analysis.localize import draw_boxes

    img = np.zeros((80, 80, 3), np.uint8)
    red, green = (255, 0, 0), (0, 255, 0)
    boxes = [[10, 30, 60, 70], [10, 30, 60, 70]]  # the same box twice: tabs at the same corner
    out = draw_boxes(img, boxes, ["aaaa", "bbbb"], [red, green])
    assert int((out == red).all(-1).sum()) > 100  # the first label's tab is still visible (it was covered)
    assert int((out == green).all(-1).sum()) > 100
