"""camlens.viz.write_report: one offline HTML file, checked as text and driven in headless Chromium.

The browser tests need the Debian packages ``chromium`` (``/usr/bin/chromium``, or set
``CAMLENS_CHROMIUM``) and the Python package ``playwright`` (its own browser download is never used);
they are skipped when either is missing.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import camlens
from browser_util import chromium
from camlens.viz import PALETTE, composite, overlay, write_report

H, W = 32, 48


class TwoHead(nn.Module):
    """A small conv trunk with two dict heads (species: 5 classes, colour: 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                                   nn.ReLU())
        self.species = nn.Linear(16, 5)
        self.colour = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x).mean((2, 3))
        return {"species": self.species(f), "colour": self.colour(f)}


def _pictures(b: int = 2) -> np.ndarray:
    """(b, H, W, 3) uint8: a colour gradient with a bright disc at a different place per image."""
    yy, xx = np.mgrid[:H, :W]
    out = []
    for i in range(b):
        img = np.stack([xx / W, yy / H, 0.5 + 0.0 * xx], -1) * 180
        img[(yy - 12 - 6 * i) ** 2 + (xx - 16 - 14 * i) ** 2 < 60] = (250, 240, 60)
        out.append(img)
    return np.rint(out).astype(np.uint8)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(1)  # a seed where all 7 maps have positive evidence (none constant)
    model = TwoHead()
    pics = _pictures()
    x = torch.from_numpy(pics).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    exp = camlens.explain(model, x, targets=["species:1", "colour:2", "species:3"], layer="trunk.2")
    single = camlens.explain(model, x[:1], targets=["colour:0"], layer="trunk.2", method="gradcampp")
    assert (exp.maps.amax((2, 3)) == 1).all() and (single.maps.amax() == 1)
    assert (exp.maps[:, 0] - exp.maps[:, 1]).abs().amax() > 0.5  # the targets look at different places
    path = write_report([exp, single], tmp_path_factory.mktemp("report") / "sub" / "r.html", images=[pics, None],
                        names=["pics", "one"], categories={"colour": ["red", "green", "blue"]})
    return {"path": path, "exp": exp, "single": single, "pics": pics, "x": x, "text": path.read_text("utf-8")}


def _quantised(maps: torch.Tensor) -> np.ndarray:
    """Maps as the report stores them: round(255 m) / 255."""
    return np.rint(maps.detach().numpy().astype(np.float64) * 255.0) / 255.0


def _data_uris(text: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))))
            for u in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


# --- the file itself ----------------------------------------------------------------------------


def test_report_is_self_contained(case) -> None:
    text = case["text"]
    assert case["path"].exists() and text.startswith("<!DOCTYPE html>")
    no_comments = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    for ref in ("http://", "https://", 'src="//', "src='//", "@import", "<link", "<iframe"):
        assert ref not in no_comments, ref
    for tag in re.findall(r"<(?:img|script)\b[^>]*>", no_comments):
        src = re.search(r"\bsrc\s*=\s*[\"']?([^\"' >]+)", tag)
        assert src is None or src.group(1).startswith("data:"), tag
    assert re.findall(r"url\(", no_comments) == []
    # 3 viewers (2 images of the first explanation, 1 of the second); image + one grey PNG per map
    assert len(re.findall(r'<section class="viewer"', text)) == 3
    assert len(_data_uris(text)) == (1 + 3) * 2 + (1 + 1)


def test_embedded_images_and_maps_are_exact(case) -> None:
    arrays = _data_uris(case["text"])
    exp, single = case["exp"], case["single"]
    for b in range(2):
        img, *maps = arrays[4 * b:4 * b + 4]
        np.testing.assert_array_equal(img, case["pics"][b])
        for t, m in enumerate(maps):
            assert m.dtype == np.uint8 and m.shape == (H, W)
            np.testing.assert_array_equal(m, np.rint(exp.maps[b, t].numpy().astype(np.float64) * 255))
    # the second explanation has no display images: its inputs min-max rescaled
    x = case["x"][0].permute(1, 2, 0).double().numpy()
    np.testing.assert_array_equal(arrays[8], np.rint((x - x.min()) / (x.max() - x.min()) * 255))
    np.testing.assert_array_equal(arrays[9], np.rint(single.maps[0, 0].numpy().astype(np.float64) * 255))


def _section(text: str, v: int) -> str:
    return text.split('<section class="viewer"')[v + 1]


def test_predictions_per_head_are_top5_softmax(case) -> None:
    exp = case["exp"]
    for b in range(2):
        sec = _section(case["text"], b)
        for head, k in (("species", 5), ("colour", 3)):
            table = re.search(rf'<table class="pred" data-head="{head}">(.*?)</table>', sec).group(1)
            assert f"<caption>{head}</caption>" in table
            cls = [int(c) for c in re.findall(r'<td class="cls">(\d+)</td>', table)]
            ps = [float(p) for p in re.findall(r'<td class="p">([0-9.]+)</td>', table)]
            top = exp.heads[head][b].softmax(0).topk(k)
            assert cls == top.indices.tolist()
            np.testing.assert_allclose(ps, top.values.numpy(), atol=5e-4)
        # class names from `categories` for the colour head
        colour = re.search(r'data-head="colour">(.*?)</table>', sec).group(1)
        assert sorted(re.findall(r'<td class="name">(\w+)</td>', colour)) == ["blue", "green", "red"]
    # layer labels "head: class p=0.93" with the swatch of the composite palette
    labels = re.findall(r'<span class="layer-label">([^<]*)</span>', _section(case["text"], 0))
    assert labels == [f"{tg.label} p={p:.2f}" for tg, p in zip(exp.targets[0], exp.probs[0].tolist())]
    assert labels[0].startswith("species: 1 p=0.") and labels[1].startswith("colour: 2 p=0.")
    assert f"background:rgb{PALETTE[1]}".replace(" ", "") in _section(case["text"], 0)


class OneHead(nn.Module):
    """A plain tensor output: one unnamed head (4 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class TupleHeads(OneHead):
    def forward(self, x: torch.Tensor):
        z = super().forward(x)
        return z, -z


def test_prediction_headings(tmp_path, case) -> None:
    # a single unnamed head (plain tensor output): headed "predictions", not "0"
    exp = camlens.explain(OneHead(), case["x"][:1], targets=[2], layer="conv")
    text = write_report(exp, tmp_path / "one.html").read_text()
    sec = _section(text, 0)
    assert re.findall(r"<caption>([^<]*)</caption>", sec) == ["predictions"]
    assert "<caption>0</caption>" not in sec and sec.count("predictions") == 1
    # unnamed heads of a tuple output: "output 0", "output 1" under one "predictions" heading
    exp = camlens.explain(TupleHeads(), case["x"][:1], targets=["0:1", "1:2"], layer="conv")
    sec = _section(write_report(exp, tmp_path / "two.html").read_text(), 0)
    assert re.findall(r"<caption>([^<]*)</caption>", sec) == ["output 0", "output 1"]
    assert "<h3>predictions</h3>" in sec
    # named heads keep their names
    assert re.findall(r"<caption>([^<]*)</caption>", _section(case["text"], 0)) == ["species", "colour"]


def test_default_mode_shows_one_map(case) -> None:
    sec = _section(case["text"], 0)
    assert re.search(r'<option value="single" selected>', sec)
    checked = re.findall(r'class="layer-toggle" data-viewer="0" data-target="(\d)"( checked)?', sec)
    assert checked == [("0", " checked"), ("1", ""), ("2", "")]
    assert re.findall(r'id="cbar-ticks-0"><span>([^<]*)</span><span>([^<]*)</span><span>([^<]*)</span>', sec) == [
        ("0", "0.5", "1")]


def test_bad_arguments(tmp_path, case) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        write_report([case["exp"]], tmp_path / "a.html", mode="hues")
    with pytest.raises(ValueError, match="unknown colormap"):
        write_report([case["exp"]], tmp_path / "a.html", cmaps=("nope",))
    with pytest.raises(ValueError, match="one entry per explanation"):
        write_report([case["exp"]], tmp_path / "a.html", images=[None, None])
    # a single Explanation is accepted, with title escaping
    text = write_report(case["single"], tmp_path / "b.html", title="<x> & y").read_text()
    assert "<title>&lt;x&gt; &amp; y</title>" in text and text.count('<section class="viewer"') == 1


# --- in the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture
def page(browser, case):
    pg = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(case["path"].resolve().as_uri())
    pg.wait_for_selector("html[data-ready='1']", timeout=15000)
    yield pg
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # nothing from the network
    pg.close()


def _pixels(pg, v: int = 0) -> np.ndarray:
    data = pg.evaluate(f"""() => {{
        const c = document.getElementById('view-{v}');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }}""")
    return np.asarray(data, np.uint8).reshape(-1, 4)[:, :3].reshape(H, W, 3)


def _renders(pg, v: int = 0) -> int:
    return int(pg.get_attribute(f"canvas#view-{v}", "data-renders"))


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Browser vs NumPy: float sums in another order may flip a rounding at .5."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def _set_opacity(pg, v: int, value: int) -> None:
    pg.eval_on_selector(f"#opacity-{v}", """(e, v) => { e.value = v;
        e.dispatchEvent(new Event('input', {bubbles: true})); }""", str(value))


def _checked(pg, v: int = 0) -> list[bool]:
    return pg.eval_on_selector_all(f"#viewer-{v} input.layer-toggle", "els => els.map(e => e.checked)")


def _composite_all(pg, v: int = 0) -> None:
    """Switch viewer v to the composite mode with every map checked."""
    pg.select_option(f"#mode-{v}", "composite")
    pg.click(f"#viewer-{v} button.layers-all")


def test_viewer_default_is_one_map_through_a_colormap(page, case) -> None:
    maps = _quantised(case["exp"].maps)
    # every viewer starts with one map (the first target) through the first colormap at opacity 0.5
    for v in range(3):
        assert page.input_value(f"#mode-{v}") == "single" and page.input_value(f"#cmap-{v}") == "jet"
        assert page.input_value(f"#opacity-{v}") == "50"
    assert _checked(page) == [True, False, False]
    base = _pixels(page)
    _close(base, overlay(case["pics"][0], maps[0, 0], "jet", 0.5))
    # clearly visible: the overlay moves the picture a long way where the map is high
    hot = maps[0, 0] > 0.8
    assert np.abs(base.astype(int) - case["pics"][0])[hot].mean() > 40
    _close(_pixels(page, 1), overlay(case["pics"][1], maps[1, 0], "jet", 0.5))  # its own maps
    assert page.is_disabled("#viewer-0 button.layers-all") and not page.is_disabled("#cmap-0")
    # checking another map shows that map alone
    page.locator('#viewer-0 input.layer-toggle[data-target="1"]').click()
    assert _checked(page) == [False, True, False]
    _close(_pixels(page), overlay(case["pics"][0], maps[0, 1], "jet", 0.5))
    page.click('#viewer-0 button.layer-solo[data-target="2"]')
    _close(_pixels(page), overlay(case["pics"][0], maps[0, 2], "jet", 0.5))
    page.locator('#viewer-0 input.layer-toggle[data-target="2"]').click()  # off: the image alone
    np.testing.assert_array_equal(_pixels(page), case["pics"][0])
    # composite with all maps is still there; back to "single" keeps only the first checked map
    _composite_all(page)
    _close(_pixels(page), composite(case["pics"][0], maps[0], alpha=0.5))
    page.select_option("#mode-0", "single")
    assert _checked(page) == [True, False, False]
    _close(_pixels(page), overlay(case["pics"][0], maps[0, 0], "jet", 0.5))
    single = case["single"]
    x = case["x"][0].permute(1, 2, 0).double().numpy()
    disp = np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    _close(_pixels(page, 2), overlay(disp, _quantised(single.maps)[0, 0], "jet", 0.5))


def test_colorbar_has_tick_labels(page, case) -> None:
    bar = page.locator("#cbar-0").bounding_box()
    spans = page.locator("#cbar-ticks-0 span")
    assert [spans.nth(i).text_content() for i in range(3)] == ["0", "0.5", "1"]
    boxes = [spans.nth(i).bounding_box() for i in range(3)]
    assert bar["width"] == pytest.approx(384, abs=2)  # as wide as the picture
    for bx in boxes:  # under the bar, readable
        assert bx["y"] >= bar["y"] + bar["height"] - 1 and bx["height"] >= 8 and bx["width"] > 0
    assert boxes[0]["x"] == pytest.approx(bar["x"], abs=2)
    assert boxes[1]["x"] + boxes[1]["width"] / 2 == pytest.approx(bar["x"] + bar["width"] / 2, abs=2)
    assert boxes[2]["x"] + boxes[2]["width"] == pytest.approx(bar["x"] + bar["width"], abs=2)
    # the bar's pixels are the colormap, low on the left
    lut = np.asarray(camlens.viz.html._lut("jet")).reshape(256, 3)
    row = np.asarray(page.evaluate("""() => { const c = document.getElementById('cbar-0');
        return Array.from(c.getContext('2d').getImageData(0, 0, 256, 1).data); }"""), np.uint8).reshape(256, 4)
    np.testing.assert_array_equal(row[:, :3], lut)
    visible = "e => getComputedStyle(e.parentNode).visibility"
    assert page.eval_on_selector("#cbar-0", visible) == "visible"
    page.select_option("#mode-0", "composite")  # no colormap, no colorbar
    assert page.eval_on_selector("#cbar-0", visible) == "hidden"


def test_toggle_layer_off_and_on(page, case) -> None:
    maps = _quantised(case["exp"].maps)
    _composite_all(page)
    base = _pixels(page)
    n = _renders(page)
    other = _pixels(page, 1)
    toggle = page.locator('#viewer-0 input.layer-toggle[data-target="0"]')
    toggle.click()
    assert not toggle.is_checked() and _renders(page) == n + 1
    off = _pixels(page)
    assert np.abs(off.astype(int) - base).sum() > 100
    colors = [np.array(PALETTE[t]) / 255 for t in (1, 2)]
    _close(off, composite(case["pics"][0], maps[0, 1:], colors=colors, alpha=0.5))
    np.testing.assert_array_equal(_pixels(page, 1), other)  # other viewers untouched
    toggle.click()
    np.testing.assert_array_equal(_pixels(page), base)
    # "none" shows the image alone; "only" keeps one layer
    page.click("#viewer-0 button.layers-none")
    np.testing.assert_array_equal(_pixels(page), case["pics"][0])
    page.click('#viewer-0 button.layer-solo[data-target="2"]')
    checked = page.eval_on_selector_all("#viewer-0 input.layer-toggle", "els => els.map(e => e.checked)")
    assert checked == [False, False, True]
    _close(_pixels(page), composite(case["pics"][0], maps[0, 2:], colors=[np.array(PALETTE[2]) / 255], alpha=0.5))
    page.click("#viewer-0 button.layers-all")
    np.testing.assert_array_equal(_pixels(page), base)


def test_opacity_colormap_and_mode(page, case, tmp_path) -> None:
    maps = _quantised(case["exp"].maps)
    _composite_all(page)
    base = _pixels(page)
    _set_opacity(page, 0, 90)
    assert page.text_content("#opacity-value-0") == "0.90"
    strong = _pixels(page)
    assert np.abs(strong.astype(int) - base).sum() > 100
    _close(strong, composite(case["pics"][0], maps[0], alpha=0.9))
    _set_opacity(page, 0, 0)
    np.testing.assert_array_equal(_pixels(page), case["pics"][0])
    _set_opacity(page, 0, 90)

    assert page.is_disabled("#cmap-0")  # the colormap only applies to the colormap mode
    page.select_option("#mode-0", "colormap")
    jet = _pixels(page)
    assert np.abs(jet.astype(int) - strong).sum() > 100
    _close(jet, overlay(case["pics"][0], maps[0].max(0), "jet", 0.9))
    page.select_option("#cmap-0", "viridis")
    viridis = _pixels(page)
    assert np.abs(viridis.astype(int) - jet).sum() > 100
    _close(viridis, overlay(case["pics"][0], maps[0].max(0), "viridis", 0.9))
    page.locator('#viewer-0 input.layer-toggle[data-target="1"]').click()  # max of the two others
    _close(_pixels(page), overlay(case["pics"][0], maps[0, [0, 2]].max(0), "viridis", 0.9))
    page.select_option("#mode-0", "composite")
    assert np.abs(_pixels(page).astype(int) - viridis).sum() > 100

    shot = page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    img = np.asarray(Image.open(tmp_path / "report.png").convert("RGB"))
    assert len(shot) > 10_000 and img.shape[0] > 500 and img.shape[1] >= 1000
    codes = img.reshape(-1, 3).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
    assert len(np.unique(codes)) > 500  # pictures, not a blank page
    # the canvas is on screen, upscaled (48 px wide -> 384 CSS px)
    box = page.locator("#view-0").bounding_box()
    assert box["width"] == pytest.approx(384, abs=2) and box["height"] == pytest.approx(256, abs=2)
