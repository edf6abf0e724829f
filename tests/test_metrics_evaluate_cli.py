"""`camlens evaluate` on real photos of different sizes: every image is evaluated on its own and the
table is printed (it used to stack the per-image deletion curves, whose lengths differ with the
image size, and crash in report.py before printing anything)."""

import json
import re

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from camlens.fronts.cli import app
from camlens.fronts.report import _mean_curve

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    # 300 x 451 -> 224 x 336; 150 x 200 -> 224 x 299: different input sizes, different curve lengths
    Image.fromarray(skimage_data.chelsea()).save(d / "cat.jpg")
    Image.fromarray(skimage_data.astronaut()).resize((200, 150)).save(d / "astronaut.jpg")
    Image.fromarray(skimage_data.coffee()).resize((300, 200)).save(d / "coffee.png")
    return d


def test_evaluate_photos_of_different_sizes(photos, tmp_path):
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["evaluate", str(photos / "cat.jpg"), str(photos / "astronaut.jpg"),
                                   str(photos / "coffee.png"), "--method", "gradcam", "--method", "random",
                                   "--metric", "deletion", "--metric", "average_drop",
                                   "--option", "deletion.step=4480", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "deletion" in res.output and "gradcam" in res.output and "random" in res.output
    assert "3 image(s)" in res.output
    records = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["metric"]) for r in records} == {(m, n) for m in ("gradcam", "random")
                                                             for n in ("deletion", "average_drop")}
    assert all(r["n"] == 3 for r in records)
    assert (out / "curves.png").stat().st_size > 1000


def test_evaluate_option_errors(photos, tmp_path):
    base = ["evaluate", str(photos / "cat.jpg"), "--method", "gradcam", "--metric", "deletion", "--out",
            str(tmp_path / "e")]
    def run(*opt):
        res = CliRunner().invoke(app, base + list(opt))
        return res.exit_code, " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())

    code, text = run("--option", "deletion.nope=3")
    assert code == 2 and "no option 'nope'" in text
    code, text = run("--option", "insertion.step=3")
    assert code == 2 and "not one of the methods" in text
    code, text = run("--option", "step=3")
    assert code == 2 and "NAME.KEY=VALUE" in text


def test_mean_curve_of_different_lengths():
    a = torch.linspace(1, 0, 5)[None]  # (1, 5): a straight line
    b = torch.linspace(1, 0, 9)[None].expand(2, 9)  # (2, 9): the same line, more steps
    m = _mean_curve([a, b], points=11)
    assert torch.allclose(m, torch.linspace(1, 0, 11), atol=1e-6)
    same = _mean_curve([a, 2 * a])
    assert torch.allclose(same, 1.5 * a[0])
