"""The command line and the demo, end to end on the real pretrained model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolyPath
from PIL import Image
from typer.testing import CliRunner

import camlens
from camlens.fronts.cli import app

skimage_data = pytest.importorskip("skimage.data")

# Hand-labelled outline of the cat in skimage.data.chelsea() (x, y in the 451 x 300 original):
# everything left of the line from the right ear tip down past the cheek; the background
# (top-right corner, right edge) lies outside.
CAT_OUTLINE = [(0, 0), (375, 0), (390, 40), (372, 140), (352, 230), (335, 300), (0, 300)]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _on_cat(peak_yx, size_hw):
    y, x = peak_yx
    sy, sx = 300 / size_hw[0], 451 / size_hw[1]
    return PolyPath(CAT_OUTLINE).contains_point(((x + 0.5) * sx, (y + 0.5) * sy))


def test_the_old_import_path_is_the_same_cli():
    """``camlens.cli`` (the path before the fronts/ layout) is the package ``camlens.fronts.cli`` itself."""
    import camlens.cli
    import camlens.fronts.cli
    from camlens.cli import app as old_app

    assert old_app is app and camlens.cli is camlens.fronts.cli


def test_outline_is_a_real_test():
    assert _on_cat((112, 168), (224, 336))  # centre of the picture: the cat's face
    assert not _on_cat((10, 330), (224, 336))  # top-right corner: background


@pytest.mark.slow
def test_demo_cat_top_class_and_peak_on_cat(tmp_path):
    from camlens.fronts.demo import run_demo

    summary = run_demo(tmp_path)
    cat = summary["images"][0]
    top = cat["targets"][0]
    assert top["class"] in CAT_CLASSES, top
    assert cat["predictions"]["0"][0]["class"] == top["class"]
    assert _on_cat(top["peak_yx"], cat["input_size"]), top["peak_yx"]
    maps = np.load(tmp_path / cat["maps"])
    assert maps.shape == (3, 224, 336) and 0 <= maps.min() and maps.max() == 1
    assert (tmp_path / "demo_grid.png").exists() and (tmp_path / "summary.json").exists()
    assert Image.open(tmp_path / "demo_grid.png").size[0] > 600
    shapes = summary["shapes"]  # the two-head toy model: composite + HTML report, peaks on the right objects
    assert (tmp_path / shapes["composite"]).exists() and (tmp_path / shapes["report"]).exists()
    assert sum(r["shape_peak_on_object"] and r["colour_peak_on_object"] for r in shapes["images"]) >= 3
    coffee = summary["images"][1]["targets"][0]
    assert coffee["label"] in ("espresso", "cup", "coffee mug", "eggnog", "consomme"), coffee


def _write_images(tmp_path):
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "cat.jpg")
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return [tmp_path / "cat.jpg", tmp_path / "notes.txt", tmp_path / "coffee.png"]


@pytest.mark.slow
def test_cli_explain_writes_outputs_and_survives_bad_files(tmp_path):
    paths = _write_images(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", *map(str, paths), "--target", "tabby", "--target", "0:285",
                                   "--out", str(out), "--cmap", "viridis"])
    assert res.exit_code == 1, res.output  # one unreadable file
    assert "notes.txt" in res.output and "cannot read image" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [e["image"] for e in summary["images"]] == [str(paths[0]), str(paths[2])]
    assert summary["errors"][0]["image"] == str(paths[1])
    cat = summary["images"][0]
    assert [(t["class"], t["label"]) for t in cat["targets"]] == [(281, "tabby"), (285, "Egyptian cat")]
    assert np.load(out / cat["maps"]).shape == (2, 224, 336)
    for t in cat["targets"]:
        assert (out / t["overlay"]).exists()
    assert (out / cat["grid"]).exists()


@pytest.mark.slow
def test_cli_top_k_layer_and_method(tmp_path):
    paths = _write_images(tmp_path)
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["explain", str(paths[0]), "--top-k", "2", "--layer", "blocks.5",
                                   "--layer", "bn2", "--method", "cam", "--out", str(out)])
    assert res.exit_code != 0  # CAM takes one layer
    res = CliRunner().invoke(app, ["explain", str(paths[0]), "--top-k", "2", "--layer", "blocks.5",
                                   "--layer", "bn2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert len(s["images"][0]["targets"]) == 2 and s["layers"] == ["blocks.5", "bn2"]
    res = CliRunner().invoke(app, ["explain", str(paths[0]), "--method", "cam", "--out", str(out)])
    assert res.exit_code == 0, res.output


def test_cli_methods_and_unknown_layer(tmp_path):
    res = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "gradcam" in res.output and "cam" in res.output
    rows = {ln.split("│")[1].strip(): ln.split("│")[-2].strip() for ln in res.output.splitlines()
            if ln.count("│") >= 5 and ln.split("│")[1].strip()}
    assert rows["occlusion"] == "yes" and rows["drise"] == "no" and rows["gradcam"] == "yes"  # the volumes column
    paths = _write_images(tmp_path)
    res = CliRunner().invoke(app, ["explain", str(paths[0]), "--layer", "bn3", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "bn2" in res.output + str(res.exception)  # the closest valid names are listed


def test_readme_example_runs():
    """The README's Python example, as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    exp = ns["exp"]
    assert exp.maps.shape[:2] == (1, 2) and exp.targets[0][0].cls == 281


SMALL_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
'''


def test_cli_method_all_and_options(tmp_path):
    """--method all: every registered method side by side in one grid; --option reaches the method."""
    (tmp_path / "small.py").write_text(SMALL_MODEL)
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'small.py'}:build",
                                   "--layer", "3", "--target", "2", "--method", "all", "--option", "patch=8",
                                   "--option", "batch_size=16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    entry = s["images"][0]
    transformer_only = {n for n, m in camlens.available_methods().items() if m.needs_attention}  # a CNN: skipped
    assert set(entry["methods"]) == set(camlens.available_methods()) - transformer_only and transformer_only
    assert set(entry["skipped"]) == transformer_only
    assert all("no attention call" in why for why in entry["skipped"].values())
    assert Image.open(out / entry["methods_grid"]).size[0] > 800
    res = CliRunner().invoke(app, ["explain", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'small.py'}:build",
                                   "--method", "occlusion", "--option", "nonsense=1", "--out", str(out)])
    assert res.exit_code == 2 and "nonsense" in res.output
    res = CliRunner().invoke(app, ["explain", str(tmp_path / "a.png"), "--method", "nope", "--out", str(out)])
    assert res.exit_code != 0 and "gradcam" in res.output


TWO_HEAD_MODEL = '''
import torch
from torch import nn


class TwoHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.species = nn.Linear(8, 4)
        self.colour = nn.Linear(8, 3)

    def forward(self, x):
        f = self.trunk(x).mean((2, 3))
        return {"species": self.species(f), "colour": self.colour(f)}


def build():
    return TwoHead()
'''


def test_cli_combine_and_agreement(tmp_path):
    (tmp_path / "two.py").write_text(TWO_HEAD_MODEL)
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    base = ["explain", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'two.py'}:build", "--target", "species:1",
            "--target", "colour:2"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "sep")])
    assert res.exit_code == 0, res.output
    entry = json.loads((tmp_path / "sep" / "summary.json").read_text())["images"][0]
    assert [t["label"] for t in entry["targets"]] == ["species: 1", "colour: 2"]
    assert entry["agreement"][0]["targets"] == ["species: 1", "colour: 2"]
    assert -1 <= entry["agreement"][0]["pearson"] <= 1 and 0 <= entry["agreement"][0]["iou"] <= 1
    res = CliRunner().invoke(app, [*base, "--combine", "confidence", "--out", str(tmp_path / "conf")])
    assert res.exit_code == 0, res.output
    entry = json.loads((tmp_path / "conf" / "summary.json").read_text())["images"][0]
    assert [t["label"] for t in entry["targets"]] == ["confidence(species: 1, colour: 2)"]
    assert np.load(tmp_path / "conf" / entry["maps"]).shape == (1, 224, 224)


def test_cli_report_writes_self_contained_html(tmp_path):
    (tmp_path / "two.py").write_text(TWO_HEAD_MODEL)
    rng = np.random.default_rng(2)
    for n in ("a.png", "b.png"):
        Image.fromarray((rng.random((32, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / n)
    (tmp_path / "bad.png").write_text("nope")
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(tmp_path / "a.png"), str(tmp_path / "bad.png"), str(tmp_path / "b.png"),
                                   "--model", f"{tmp_path / 'two.py'}:build", "--top-k", "2", "--out", str(out)])
    assert res.exit_code == 1, res.output  # one unreadable file, the others reported
    html = out.read_text()
    assert "a.png" in html and "b.png" in html and "species" in html and "colour" in html
    assert "http://" not in html and "https://" not in html
    # 2 images x (2 heads x top-2) targets: each picture and each map embedded as a PNG data URI
    assert html.count("data:image/png;base64") == 2 + 2 * 4
    assert 'data-target="3"' in html and 'data-target="4"' not in html


def test_cli_evaluate_on_shapes_with_baselines(tmp_path):
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, ["evaluate", "--shapes", "4", "--method", "gradcam", "--method", "center",
                                   "--metric", "deletion", "--metric", "pointing_game", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "deletion ↓" in res.output and "pointing_game ↑" in res.output
    rows = json.loads((out / "results.json").read_text())
    got = {(r["method"], r["metric"]): r for r in rows}
    assert set(got) == {(m, k) for m in ("gradcam", "center") for k in ("deletion", "pointing_game")}
    assert got[("gradcam", "deletion")]["direction"] == "lower" and got[("gradcam", "deletion")]["n"] == 8
    assert got[("gradcam", "pointing_game")]["mean"] >= 0.75  # each head's peak on its own object
    assert got[("gradcam", "deletion")]["mean"] < got[("center", "deletion")]["mean"]
    assert (out / "results.csv").read_text().startswith("method,metric,direction,mean,sem,n")
    assert Image.open(out / "curves.png").size[0] > 300
    res = CliRunner().invoke(app, ["evaluate", "--shapes", "2", "--metric", "nope", "--out", str(out)])
    assert res.exit_code != 0


def test_cli_explain_a_folder(tmp_path):
    (tmp_path / "small.py").write_text(SMALL_MODEL)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in ("b.png", "a.jpg"):
        Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(folder / n)
    (folder / "notes.txt").write_text("skipped: not an image suffix")
    res = CliRunner().invoke(app, ["explain", str(folder), "--model", f"{tmp_path / 'small.py'}:build", "--target", "1",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [Path(e["image"]).name for e in s["images"]] == ["a.jpg", "b.png"]


def test_cli_precision(tmp_path):
    """--precision reaches explain: bf16 maps close to fp32; a bad value is an error naming the choices."""
    (tmp_path / "small.py").write_text(SMALL_MODEL)
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    base = ["explain", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'small.py'}:build", "--layer", "3",
            "--target", "2"]
    maps = {}
    for prec in ("fp32", "bf16"):
        res = CliRunner().invoke(app, [*base, "--precision", prec, "--out", str(tmp_path / prec)])
        assert res.exit_code == 0, res.output
        maps[prec] = np.load(next((tmp_path / prec).glob("*_maps.npy")))
    assert np.abs(maps["fp32"] - maps["bf16"]).max() < 0.1 and maps["fp32"].max() == 1
    res = CliRunner().invoke(app, [*base, "--precision", "fp8", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "bf16" in res.output


def test_cli_sign_and_activation(tmp_path):
    """--sign -1 explains a decrease (the map of the negated score), --activation sigmoid gives sigmoid
    probabilities in summary.json; bad values name the choices."""
    (tmp_path / "small.py").write_text(SMALL_MODEL)
    Image.fromarray((np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    base = ["explain", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'small.py'}:build", "--layer", "3",
            "--target", "2"]
    res = CliRunner().invoke(app, [*base, "--sign", "-1", "--activation", "sigmoid", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    tg = summary["images"][0]["targets"][0]
    assert "decrease" in tg["label"]
    m = camlens.models.load(f"{tmp_path / 'small.py'}:build")
    x = m.preprocess(Image.open(tmp_path / "a.png"))
    want = camlens.explain(m, x, targets=2, layer="3", sign=-1, activation="sigmoid")
    assert abs(tg["prob"] - float(want.probs[0, 0])) < 1e-5
    assert abs(float(want.probs[0, 0]) - float(torch.sigmoid(m.model(x)[0, 2]))) < 1e-5
    np.testing.assert_allclose(np.load(next((tmp_path / "o").glob("*_maps.npy")))[0], want.maps[0, 0].numpy(),
                               atol=1e-5)
    for bad, word in ((["--sign", "2"], "1 or -1"), (["--activation", "tanh"], "sigmoid")):
        res = CliRunner().invoke(app, [*base, *bad, "--out", str(tmp_path / "bad")])
        assert res.exit_code != 0 and word in res.output, res.output
