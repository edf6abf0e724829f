"""``camlens serve``'s page end to end in headless Chromium (Debian's ``/usr/bin/chromium`` driven by
Playwright; its own browser download is never used): upload → maps shown as the composite formula says; a
toggle and the opacity slider change the pixels without a request; a method switch, a second method side by
side and a layer click recompute; the live view with Chromium's fake camera reports frames and fps."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")

import camlens  # noqa: E402
from camlens.fronts.serve import ServeConfig, create_app  # noqa: E402
from camlens.viz import composite  # noqa: E402
from browser_util import chromium  # noqa: E402
from serve_util import png_bytes, running, shapes_image  # noqa: E402

NAME = "shapes-2head"


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    app = create_app({NAME: camlens.models.load(NAME)}, ServeConfig())
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    yield from chromium(["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])


@pytest.fixture
def page(browser, server, tmp_path):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    ctx.grant_permissions(["camera"], origin=server)
    pg = ctx.new_page()
    errors: list[str] = []
    requests: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(server + "/")
    pg.wait_for_selector("html[data-ready='1']", timeout=15000)
    img = tmp_path / "shapes.png"
    img.write_bytes(png_bytes(shapes_image(3, 64)))
    pg.image_path = str(img)
    yield pg
    assert errors == []
    assert [u for u in requests if not u.startswith((server, "data:", "blob:"))] == []
    ctx.close()


def _requests(pg) -> int:
    return int(pg.get_attribute("html", "data-requests") or 0)


def _wait_requests(pg, n: int) -> None:
    pg.wait_for_function(f"() => +(document.documentElement.dataset.requests || 0) >= {n} && "
                         "!document.documentElement.dataset.busy", timeout=20000)


def _pixels(pg, method: str = "gradcam") -> np.ndarray:
    data = pg.evaluate(f"""() => {{
        const c = document.querySelector('section.panel[data-method="{method}"] canvas.view');
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }}""")
    w, h, px = data
    return np.asarray(px, np.uint8).reshape(h, w, 4)[..., :3]


def _answer(pg, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray, list]:
    """The display image (H, W, 3), the maps (T, H, W) in [0, 1] (8-bit) and colours of the answer shown."""
    res = pg.evaluate(f"() => window.camlensServe.results['{method}']")

    def dec(uri):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    return dec(res["image"])[..., :3], np.stack([dec(m["png"]) for m in res["maps"]]) / 255.0, \
        [m["color"] for m in res["maps"]]


def _close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.98, (diff.max(), (diff == 0).mean())


def _set_opacity(pg, value: int) -> None:
    pg.eval_on_selector("#opacity", """(e, v) => { e.value = v;
        e.dispatchEvent(new Event('input', {bubbles: true})); }""", str(value))


def test_upload_shows_maps_toggles_and_opacity_redraw_without_requests(page):
    page.set_input_files("#file", page.image_path)
    _wait_requests(page, 1)
    img, maps, cols = _answer(page)
    assert maps.shape[0] == 2 and img.shape[:2] == maps.shape[1:]  # shape and colour heads' top classes
    labels = page.eval_on_selector_all("input.map-toggle", "els => els.map(e => e.checked)")
    assert labels == [True, True] and page.input_value("#mode") == "composite"
    base = _pixels(page)
    _close(base, composite(img, maps, colors=[tuple(c / 255 for c in col) for col in cols], alpha=0.5))
    assert np.abs(base.astype(int) - img).max() > 30  # the maps are visible
    renders = int(page.get_attribute('section.panel[data-method="gradcam"] canvas.view', "data-renders"))
    # a toggle: map 1 off -> map 0 alone, no new request
    page.locator('input.map-toggle[data-target="1"]').click()
    one = _pixels(page)
    assert np.abs(one.astype(int) - base).max() > 10
    _close(one, composite(img, maps[:1], colors=[tuple(c / 255 for c in cols[0])], alpha=0.5))
    # the head toggle of "shape" off: the image alone
    page.locator('input.head-toggle[data-head="shape"]').click()
    _close(_pixels(page), img)
    page.locator('input.map-toggle[data-target="0"]').click()
    page.locator('input.map-toggle[data-target="1"]').click()
    _close(_pixels(page), base)
    # opacity: 0 -> the image, 100 -> stronger than 0.5
    _set_opacity(page, 0)
    _close(_pixels(page), img)
    _set_opacity(page, 100)
    full = _pixels(page)
    _close(full, composite(img, maps, colors=[tuple(c / 255 for c in col) for col in cols], alpha=1.0))
    assert np.abs(full.astype(int) - base).max() > 10
    # the colormap mode: overlay of the max through jet
    page.select_option("#mode", "colormap")
    assert not page.is_disabled("#cmap")
    _set_opacity(page, 50)
    cm = _pixels(page)
    lut = np.asarray(camlens.viz.html.lut("jet")).reshape(256, 3)
    m = np.rint(maps.max(0) * 255).astype(int)
    _close(cm, np.rint(0.5 * img + 0.5 * lut[m]).clip(0, 255))
    assert int(page.get_attribute('section.panel[data-method="gradcam"] canvas.view', "data-renders")) > renders + 5
    assert _requests(page) == 1  # all of it in the browser


def test_method_switch_side_by_side_and_layer_recompute(page):
    page.set_input_files("#file", page.image_path)
    _wait_requests(page, 1)
    before = _answer(page)[1]
    page.select_option("#method", "gradcampp")
    _wait_requests(page, 2)
    assert page.eval_on_selector_all("section.panel", "ps => ps.map(p => p.dataset.method)") == ["gradcampp"]
    after = _answer(page, "gradcampp")[1]
    assert after.shape == before.shape and np.abs(after - before).max() > 0.05
    page.select_option("#compare", ["occlusion"])
    _wait_requests(page, 3)
    assert page.eval_on_selector_all("section.panel", "ps => ps.map(p => p.dataset.method)") == ["gradcampp", "occlusion"]
    assert _pixels(page, "occlusion").shape == _pixels(page, "gradcampp").shape
    # the layer tree: the default marked; another layer recomputes
    assert page.eval_on_selector_all("button.layer-node.default", "bs => bs.map(b => b.dataset.path)") == ["features"]
    # open: "features" (the default) shows its children; "shape_head" has none; features.2's are folded
    assert page.is_visible('button.layer-node[data-path="features.2"]')
    assert not page.is_visible('button.layer-node[data-path="features.2.0"]')
    page.click('button.layer-node[data-path="features.2"]')
    _wait_requests(page, 4)
    assert page.evaluate("() => window.camlensServe.results['gradcampp'].layers") == ["features.2"]
    assert "layer features.2" in page.text_content('section.panel[data-method="gradcampp"] .meta')
    # targets: top 2 of the shape head, none of colour
    page.fill('input.topk[data-head="colour"]', "0")
    page.fill('input.topk[data-head="shape"]', "2")
    page.dispatch_event('input.topk[data-head="shape"]', "change")
    page.wait_for_function("() => window.camlensServe.results['gradcampp'].maps.length === 2 && "
                           "window.camlensServe.results['gradcampp'].maps.every(m => m.head === 'shape')", timeout=20000)
    page.fill('input.classes[data-head="colour"]', "green")
    page.dispatch_event('input.classes[data-head="colour"]', "change")
    page.wait_for_function("() => window.camlensServe.results['gradcampp'].maps.map(m => m.label).includes('colour: green')",
                           timeout=20000)


def test_live_view_with_the_fake_camera_reports_frames(page):
    page.click("#live-start")
    page.wait_for_function("() => +document.getElementById('live-view').dataset.frames >= 4", timeout=30000)
    assert float(page.get_attribute("#fps", "data-fps")) > 0
    assert "fps" in page.text_content("#fps")
    px = page.evaluate("""() => { const c = document.getElementById('live-view');
        return [c.width, c.height]; }""")
    assert px[0] > 1 and px[1] > 1
    page.click("#live-stop")


def test_downloads_are_the_panels_and_the_saved_explanations(page, tmp_path):
    page.set_input_files("#file", page.image_path)
    _wait_requests(page, 1)
    with page.expect_download() as d:
        page.click("#download-png")
    png = tmp_path / "panel.png"
    d.value.save_as(png)
    assert d.value.suggested_filename == "camlens-gradcam.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), _pixels(page))
    with page.expect_download() as d:
        page.click("#download-npz")
    npz = tmp_path / "exp.npz"
    d.value.save_as(npz)
    exp = camlens.load(npz)
    _, maps, _ = _answer(page)
    assert np.abs(np.rint(exp.maps[0].numpy() * 255) - maps * 255).max() <= 1


def test_the_page_passes_its_token_on(browser, tmp_path):
    app = create_app({NAME: camlens.models.load(NAME)}, ServeConfig(token="tok-123"))
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(shapes_image(5, 64)))
    with running(app) as url:
        pg = browser.new_page()
        assert pg.goto(url + "/").status == 401
        pg.goto(url + "/?token=tok-123")
        pg.wait_for_selector("html[data-ready='1']", timeout=15000)
        pg.set_input_files("#file", str(img))
        _wait_requests(pg, 1)
        assert pg.get_attribute("html", "data-error") is None
        with pg.expect_download() as d:
            pg.click("#download-npz")
        d.value.save_as(tmp_path / "e.npz")
        assert camlens.load(tmp_path / "e.npz").maps.shape[:2] == (1, 2)
        pg.close()
