"""``camlens localize``: a box, a mask and drawings per image and target, from each target's map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from camlens.fronts.cli.base import command, console
from camlens.fronts.cli.common import (
    TARGET_HELP, _check_common, _check_image_args, _check_method, _cli_targets, _crop_flag, _device_option, _explained,
    _file_error, _files_by_image, _flag, _load_model, _max_pixels_option, _model_option, _Stems, _weights_option)


@command()
def localize(
    images: List[Path] = typer.Argument(..., help="image files to localise in"),
    model: str = _model_option(),
    weights: Optional[Path] = _weights_option(),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s); several are fused"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="localise each head's K top classes"),
    threshold: float = typer.Option(0.2, "--threshold",
                                    help="box: keep pixels >= this fraction of the map's max (CAM paper: 0.2)"),
    union: bool = _flag(False, "--union/--largest",
                        "box around every component above --threshold, not only the largest"),
    mask_threshold: float = typer.Option(0.5, "--mask-threshold", help="mask: pixels >= this fraction of the max"),
    grabcut: bool = _flag(False, "--grabcut/--no-grabcut", "refine masks with OpenCV GrabCut seeded by the map"),
    cutout: bool = _flag(False, "--cutout/--no-cutout", "also write the foreground as RGBA PNG (alpha = mask)"),
    out: Path = typer.Option(Path("camlens_localize"), "--out", "-o", help="output folder"),
    device: Optional[str] = _device_option(),
    crop: bool = _crop_flag(),
    max_pixels: int = _max_pixels_option(),
) -> None:
    """Localise each target from its map: a box, a mask and drawings per image and target in --out.

    Box: the CAM paper's rule, pixels >= --threshold x the map's max, the largest 8-connected
    component's bounding box, (x0, y0, x1, y1) inclusive-exclusive (x0 <= x < x1). Mask: pixels
    >= --mask-threshold x the max (then GrabCut with --grabcut). Coordinates, masks and drawings
    are in the MODEL-INPUT image (the resized picture, input_size in summary.json), not the
    original file. A map with no positive evidence gets the whole image as box and an empty mask.

    Writes NAME_TT_LABEL_mask.png (0/255), NAME_TT_LABEL_box.png (map overlay + box),
    NAME_boxes.png (every target's box on the image), with --cutout NAME_TT_LABEL_cutout.png
    (RGBA), and summary.json (with each image's list of files).
    """
    import numpy as np

    from camlens.analysis.localize import boxes_from_maps, cutout as make_cutout, draw_boxes, masks_from_maps
    from camlens.backends.base import ops_for
    from camlens.fronts.report import safe_name, stamp
    from camlens.viz import PALETTE, overlay, save_png

    _check_image_args(images)
    if target and top_k:
        raise typer.BadParameter("give --target or --top-k, not both")
    for name, value in (("--threshold", threshold), ("--mask-threshold", mask_threshold)):
        if not 0.0 <= value <= 1.0:
            raise typer.BadParameter(f"{name} is a fraction of the map's max in [0, 1], got {value}")
    _check_method(method)
    _check_common(device=device, top_k=top_k, max_pixels=max_pixels)
    kw = dict(targets=_cli_targets(target), top_k=top_k, layer=list(layer) if layer else None, method=method)
    m = _load_model(model, weights, device, crop)
    note = "random weights" if m.random_weights else None

    def mark(pic):
        return stamp(pic, note) if note else pic

    out.mkdir(parents=True, exist_ok=True)
    results, errors, stems = [], [], _Stems()
    for path, img, exp, stem in _explained(m, images, "localising", errors, max_pixels, crop, stems, **kw):
        try:
            display = exp.display if exp.display is not None else m.to_display(exp.inputs)
            host = ops_for(exp.maps).to_numpy  # (torch tensors or NumPy arrays: a Keras model's)
            boxes = host(boxes_from_maps(exp.maps, threshold, largest=not union)[0])
            masks = host(masks_from_maps(exp.maps, mask_threshold, refine="grabcut" if grabcut else None,
                                         images=display if grabcut else None, low=min(0.1, mask_threshold),
                                         high=max(0.9, mask_threshold))[0])
            maps = np.asarray(host(exp.maps[0]), dtype=np.float32)
            H, W = maps.shape[-2:]
            entry = {"image": str(path), "original_size": [img.height, img.width], "input_size": [H, W],
                     "targets": []}
            files = []
            for t, tg in enumerate(exp.targets[0]):
                base = f"{stem}_{t:02d}_{safe_name(tg.label)}"
                mask = masks[t]
                save_png(out / f"{base}_mask.png", (mask * 255).astype("uint8"))
                save_png(out / f"{base}_box.png", mark(draw_boxes(overlay(display[0], maps[t], alpha=0.4),
                                                                  boxes[t:t + 1], [tg.label],
                                                                  [PALETTE[t % len(PALETTE)]])))
                files += [f"{base}_mask.png", f"{base}_box.png"]
                x0, y0, x1, y1 = boxes[t].tolist()
                p = float(exp.probs[0, t])
                rec = {"head": tg.head if isinstance(tg.head, int) else str(tg.head), "class": tg.cls,
                       "label": tg.label, "score": round(float(exp.scores[0, t]), 5),
                       "prob": None if p != p else round(p, 5), "box": [x0, y0, x1, y1],
                       "box_area": round((x1 - x0) * (y1 - y0) / (H * W), 4),
                       "mask": f"{base}_mask.png", "mask_area": round(float(mask.mean()), 4),
                       "box_drawing": f"{base}_box.png"}
                if cutout:
                    save_png(out / f"{base}_cutout.png", make_cutout(display[0], mask))
                    rec["cutout"] = f"{base}_cutout.png"
                    files.append(rec["cutout"])
                entry["targets"].append(rec)
            labels = [f"{tg.label}" for tg in exp.targets[0]]
            save_png(out / f"{stem}_boxes.png", mark(draw_boxes(display[0], boxes, labels)))
            entry["drawing"] = f"{stem}_boxes.png"
            entry["files"] = files + [entry["drawing"]]
            results.append(entry)
            best = entry["targets"][0]
            console.print(f"[green]✓[/] {escape(str(path))}: {escape(best['label'])} box {best['box']}"
                          + (" [yellow](random weights)[/]" if note else ""), highlight=False)
        except (OSError, ValueError, MemoryError) as err:
            _file_error(errors, path, err)
    summary = {"model": m.name, "random_weights": m.random_weights, "method": method,
               "layers": list(layer) if layer else [m.default_layer] if m.default_layer else [],
               "threshold": threshold, "largest_component": not union, "mask_threshold": mask_threshold,
               "grabcut": grabcut,
               "box_format": "x0, y0, x1, y1 in model-input pixels, inclusive-exclusive (x0 <= x < x1)",
               "images": results, "files": _files_by_image(results), "errors": errors}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {len(results)} localisation(s) to {out}/ (summary.json, *_mask.png, *_box.png, "
                  f"*_boxes.png{', *_cutout.png' if cutout else ''})"
                  + (f"; {len(errors)} file(s) failed" if errors else ""))
    if errors:
        raise typer.Exit(code=1)
