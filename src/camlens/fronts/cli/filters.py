"""``camlens filters``: a layer's top channels per image, as a labelled grid and their indices / weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from camlens.fronts.cli.base import command, console
from camlens.fronts.cli.common import (
    TARGET_HELP, _check_choice, _check_common, _check_image_args, _cli_targets, _crop_flag, _device_option,
    _failed_image, _file_error, _load_model, _max_pixels_option, _model_option, _readable_images, _Stems,
    _weights_option)


@command()
def filters(
    images: List[Path] = typer.Argument(..., help="image files"),
    model: str = _model_option(),
    weights: Optional[Path] = _weights_option(),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="the layer (default: the model's CAM layer)"),
    top: int = typer.Option(16, "--top", help="how many channels"),
    order: str = typer.Option("activation", "--order",
                              help="activation (mean activation) | contribution (Grad-CAM weight x mean activation "
                                   "for --target)"),
    target: Optional[str] = typer.Option(None, "--target", "-t",
                                         help=f"with --order contribution: {TARGET_HELP} (default: the top class)"),
    out: Path = typer.Option(Path("camlens_filters"), "--out", "-o", help="output folder"),
    device: Optional[str] = _device_option(),
    crop: bool = _crop_flag(),
    max_pixels: int = _max_pixels_option(),
) -> None:
    """The --top channels of --layer per image: by mean activation, or (--order contribution) by
    Grad-CAM weight x mean activation for --target, each map upsampled and min-maxed.

    Writes NAME_filters.png (the grid, cells titled "#channel  w=weight", largest first) and
    filters.json (model, layer, order, per image its target, channel indices and weights, and its file).
    """
    import camlens
    from camlens.viz import filter_grid, save_png

    _check_image_args(images)
    from camlens.engine.filters import FILTER_ORDERS

    _check_choice("--order", order, FILTER_ORDERS)
    if top < 1:
        raise typer.BadParameter(f"--top must be >= 1, got {top}")
    _check_common(device=device, max_pixels=max_pixels)
    if target and order != "contribution":
        raise typer.BadParameter("--target ranks channels by their contribution to it: add --order contribution")
    m = _load_model(model, weights, device, crop)
    out.mkdir(parents=True, exist_ok=True)
    results, errors, stems = [], [], _Stems()
    for path, img in _readable_images(images, "filters of", errors, max_pixels):
        stem = stems.take(path)
        try:
            f = camlens.filters(m, img, layer=layer, top=top, order=order, target=_cli_targets([target] if target
                                                                                              else None))
        except Exception as err:  # noqa: BLE001 - the per-file rule decides (usage errors stop the run)
            _failed_image(errors, path, err, m, crop)
            continue
        try:
            fig = filter_grid(f, suptitle=f.title() + (" (random weights: meaningless)" if m.random_weights else ""))
            pic = f"{stem}_filters.png"
            save_png(out / pic, fig)
        except (OSError, ValueError, MemoryError) as err:
            _file_error(errors, path, err)
            continue
        entry = {"image": str(path), **f.to_dict()["images"][0], "grid": pic, "files": [pic]}
        results.append((f, entry))
        console.print(f"[green]✓[/] {escape(str(path))}: channels {entry['indices'][:8]}"
                      + (" ..." if len(entry["indices"]) > 8 else ""), highlight=False)
    first = results[0][0] if results else None
    summary = {"model": m.name, "random_weights": m.random_weights, "layer": first.layer if first else layer,
               "channels": first.channels if first else None, "order": order, "top": top,
               "weights": ("mean activation" if order == "activation" else
                           "Grad-CAM weight (mean gradient) x mean activation"),
               "images": [e for _, e in results], "errors": errors}
    (out / "filters.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {len(results)} filter grid(s) to {out}/ (filters.json, *_filters.png)"
                  + (f"; {len(errors)} file(s) failed" if errors else ""))
    if errors:
        raise typer.Exit(code=1)

