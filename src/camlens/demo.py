"""``camlens demo``: the default model on scikit-image's photos, top-3 classes each, one grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["DEMO_IMAGES", "run_demo"]

DEMO_IMAGES = ("chelsea", "coffee")


def demo_images() -> dict[str, np.ndarray]:
    """The demo photos (uint8 RGB) from ``skimage.data``, shipped with scikit-image (no download)."""
    try:
        import skimage.data as data
    except ImportError as err:  # pragma: no cover - scikit-image is a demo/dev dependency
        raise RuntimeError("the demo needs scikit-image: pip install 'camlens[demo]'") from err
    return {name: getattr(data, name)() for name in DEMO_IMAGES}


def run_demo(out_dir: Path, *, model: str = "efficientnet-lite0", top_k: int = 3, device: Optional[str] = None,
             method: str = "gradcam") -> dict[str, Any]:
    """Explain the demo photos' top-k classes; write ``demo_grid.png``, per-image outputs and ``summary.json``.

    Returns the summary (also written as JSON), including each image's top class and map peak.
    """
    import camlens
    from camlens.report import write_explanation
    from camlens.viz import explanation_grid, save_png

    out_dir = Path(out_dir)
    m = camlens.models.load(model, device=device)
    images = demo_images()
    x = m.preprocess(list(images.values()))  # the demo photos share one size after resizing (224 x 336)
    exp = camlens.explain(m, x, top_k=top_k, method=method)
    display = m.to_display(x)
    exp.display = display
    per_image = write_explanation(exp, out_dir, "demo", categories=m.categories)
    grid_path = save_png(out_dir / "demo_grid.png",
                         explanation_grid(exp, suptitle=f"camlens {method} · {m.name} · layer {exp.layers[0]}"))
    summary = {"model": m.name, "method": method, "layers": exp.layers, "grid": grid_path.name,
               "images": [{"image": f"skimage.data.{name}()", **entry} for name, entry in zip(images, per_image)]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
