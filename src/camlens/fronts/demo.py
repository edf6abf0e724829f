"""``camlens demo``: the default model on scikit-image's photos, top-3 classes each, one grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..backends.base import namespace, ops_for, to_float32
from ..core.errors import MissingDependencyError

__all__ = ["DEMO_IMAGES", "run_demo"]

DEMO_IMAGES = ("chelsea", "coffee")


def demo_images() -> dict[str, np.ndarray]:
    """The demo photos (uint8 RGB) from ``skimage.data``, shipped with scikit-image (no download)."""
    try:
        import skimage.data as data
    except ImportError as err:  # pragma: no cover - scikit-image is a demo/dev dependency
        raise MissingDependencyError("the demo needs scikit-image: pip install 'camlens[demo]'") from err
    return {name: getattr(data, name)() for name in DEMO_IMAGES}


def run_demo(out_dir: Path, *, model: str = "efficientnet-lite0", top_k: int = 3, device: Optional[str] = None,
             method: str = "gradcam") -> dict[str, Any]:
    """Explain the demo photos' top-k classes; write ``demo_grid.png``, per-image outputs and ``summary.json``.

    Returns the summary (also written as JSON), including each image's top class and map peak.
    """
    import camlens
    from camlens.fronts.report import write_explanation
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
    summary["shapes"] = run_shapes_demo(out_dir, device=device)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_shapes_demo(out_dir: Path, *, n: int = 4, seed: int = 123, device: Optional[str] = None) -> dict[str, Any]:
    """The two-head toy model (``shapes-2head``) on ``n`` generated images: each head's top class in
    one call, a per-head colour composite (``shapes_composite.png``) and an HTML report
    (``shapes_report.html``). Returns the per-image pointing results against the known object masks."""
    import camlens
    from camlens.datasets.shapes import make_shapes
    from camlens.metrics import pointing_game
    from camlens.viz import composite_figure, save_png, write_report

    out_dir = Path(out_dir)
    m = camlens.models.load("shapes-2head", device=device)
    data = make_shapes(n, seed=seed)
    x = m.preprocess(data.images)
    exp = camlens.explain(m, x)  # targets=None: the top class of every head
    display = m.to_display(x)
    exp.display = display
    xp = namespace(data.masks["shape"])
    masks = xp.stack([xp.stack([data.masks[str(tg.head)][b] for tg in exp.targets[b]]) for b in range(n)])
    hits, _ = pointing_game(exp.maps, masks, tolerance=0)  # (n, T): the map's maximum on the object
    rows = []
    for b in range(n):
        row = {"truth": data.label_names(b), "predicted": {}}
        for t, tg in enumerate(exp.targets[b]):
            row["predicted"][str(tg.head)] = tg.label
            row[f"{tg.head}_peak_on_object"] = bool(hits[b, t] == 1)
        rows.append(row)
    labels = [f"{tg.label} p={float(exp.probs[0, t]):.2f}" for t, tg in enumerate(exp.targets[0])]
    big = np.kron(display[0], np.ones((4, 4, 1), dtype=np.uint8))  # 64 px -> 256 px for the picture
    first = to_float32(exp.maps[:1])
    ops = ops_for(first)
    maps = ops.resize(first, (4 * first.shape[-2], 4 * first.shape[-1]))[0]  # bilinear, half-pixel centres
    save_png(out_dir / "shapes_composite.png", composite_figure(big, ops.to_numpy(maps), labels,
                                                                 title="shapes-2head: one hue per head"))
    write_report([exp], out_dir / "shapes_report.html", names=["shapes"],
                 categories=m.categories, title="camlens · shapes-2head · Grad-CAM per head")
    return {"composite": "shapes_composite.png", "report": "shapes_report.html", "images": rows}
