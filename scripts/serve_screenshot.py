"""The README's picture of ``camlens serve``: ``python scripts/serve_screenshot.py`` (no download; needs
Debian's ``/usr/bin/chromium`` and the ``playwright`` package, never its browser download).

Writes ``docs/serve.png``: the page on the trained two-head toy model ``shapes-2head``, a generated image
uploaded, Grad-CAM and Grad-CAM++ side by side, each head's top class composited in its own hue.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import camlens
from camlens.datasets.shapes import make_shapes
from camlens.fronts.serve import ServeConfig, create_app, in_thread

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CAMLENS_CHROMIUM", "/usr/bin/chromium")


def main() -> Path:
    from playwright.sync_api import sync_playwright

    img = np.asarray(make_shapes(1, seed=7, size=64).images[0]).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(buf, "PNG")
    out = ROOT / "docs" / "serve.png"
    app = create_app({"shapes-2head": camlens.models.load("shapes-2head")}, ServeConfig())
    with tempfile.TemporaryDirectory() as d, in_thread(app) as url, sync_playwright() as p:
        path = Path(d) / "shapes.png"
        path.write_bytes(buf.getvalue())
        br = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = br.new_page(viewport={"width": 1180, "height": 1000})
        pg.goto(url + "/")
        pg.wait_for_selector("html[data-ready='1']")
        pg.set_input_files("#file", str(path))
        pg.wait_for_function("() => +(document.documentElement.dataset.requests || 0) >= 1")
        pg.select_option("#compare", ["gradcampp"])
        pg.wait_for_function("() => +document.documentElement.dataset.requests >= 2 && !document.documentElement.dataset.busy")
        pg.screenshot(path=str(out))
        br.close()
    return out


if __name__ == "__main__":
    print(main())
