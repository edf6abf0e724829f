"""``camlens report``: one self-contained HTML report of the predictions and maps of many images."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from camlens.fronts.cli.base import _fatal, command, console
from camlens.fronts.cli.common import (
    TARGET_HELP, _check_common, _check_image_args, _check_method, _cli_targets, _crop_flag, _explained, _load_model,
    _max_pixels_option, _model_option, _weights_option)


@command()
def report(
    images: List[Path] = typer.Argument(..., help="image files or folders"),
    out: Path = typer.Option(Path("camlens_report.html"), "--out", "-o", help="the HTML file to write"),
    model: str = _model_option(),
    weights: Optional[Path] = _weights_option(),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s)"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help=TARGET_HELP + " (repeatable)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="each head's K top classes (default 3)"),
    device: Optional[str] = typer.Option(None, "--device"),
    crop: bool = _crop_flag(),
    max_pixels: int = _max_pixels_option(),
) -> None:
    """One self-contained HTML report: predictions per head and an interactive viewer per image
    (toggle each head/target's map, opacity, colormap, per-head colour composite). Works offline."""
    from camlens.viz import write_report

    _check_image_args(images)
    if target and top_k:
        raise typer.BadParameter("give --target or --top-k, not both")
    _check_method(method)
    _check_common(device=device, top_k=top_k, max_pixels=max_pixels)
    m = _load_model(model, weights, device, crop)
    kw = dict(targets=_cli_targets(target), top_k=None if target else (top_k or 3),
              layer=list(layer) if layer else None, method=method)
    exps, paths, errors = [], [], []
    for path, _, exp, _ in _explained(m, images, "explaining", errors, max_pixels, crop, **kw):
        exps.append(exp)
        paths.append(path)
    if not exps:
        _fatal("no image could be explained; nothing to report", code=1)
    names = [p.name for p in paths]
    if len(set(names)) < len(names):  # a/cat.jpg and b/cat.jpg: tell them apart
        names = [str(p) for p in paths]
    title = f"camlens · {m.name} · {method}" + (" (random weights)" if m.random_weights else "")
    path = write_report(exps, out, names=names, categories=m.categories, title=title)
    console.print(f"wrote {path} ({len(exps)} image(s); open it in any browser, no network needed)"
                  + (f"; {len(errors)} file(s) failed" if errors else ""))
    if errors:
        raise typer.Exit(code=1)
