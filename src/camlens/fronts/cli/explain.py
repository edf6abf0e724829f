"""``camlens explain``: overlays, a grid, .npy maps and summary.json per image; ``--method all``
puts every method side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from camlens.fronts.cli.base import _fatal, command, console
from camlens.fronts.cli.common import (
    OVERLAY_MAX_SIDE, TARGET_HELP, _check_choice, _check_common, _check_image_args, _check_method, _check_view,
    _cli_targets, _crop_flag, _device_option, _explained, _failed_image, _file_error, _files_by_image, _first_line,
    _flag, _load_model, _max_pixels_option, _model_option, _parse_options, _per_file, _readable_images, _Stems,
    _stream, _weights_option)


@command()
def explain(
    images: List[Path] = typer.Argument(..., help="image files or folders to explain"),
    model: str = _model_option(),
    weights: Optional[Path] = _weights_option(),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s); several are fused"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`; all: every method"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="explain each head's K top classes"),
    out: Path = typer.Option(Path("camlens_out"), "--out", "-o", help="output folder"),
    cmap: str = typer.Option("jet", "--cmap", help="matplotlib colormap"),
    alpha: float = typer.Option(0.5, "--alpha", help="overlay opacity in [0, 1]"),
    device: Optional[str] = _device_option(),
    crop: bool = _crop_flag(),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O",
                                               help="method option KEY=VALUE, e.g. batch_size=64 (repeatable)"),
    combine: str = typer.Option("separate", "--combine",
                                help="separate (a map per target) | mean | confidence | sum (one map per image)"),
    aug_smooth: bool = _flag(False, "--aug-smooth/--no-aug-smooth", "average over flipped / rescaled inputs"),
    noise_smooth: int = typer.Option(0, "--noise-smooth", help="SmoothGrad-style: average over N noisy copies"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 forwards (autocast; fast on GPUs)"),
    sign: int = typer.Option(1, "--sign", help="1: what raises each target's score; -1: what lowers it (regression)"),
    activation: Optional[str] = typer.Option(None, "--activation",
                                             help="softmax | sigmoid (multi-label heads) | none: for probabilities "
                                                  "and --combine confidence (default: softmax for class heads)"),
    max_pixels: int = _max_pixels_option(),
    max_overlays: int = typer.Option(64, "--max-overlays",
                                     help="write overlay PNGs for each image's first N targets (all maps "
                                          "still go to the .npy and summary.json); 0: none"),
) -> None:
    """Explain images: overlays, a grid, .npy maps and summary.json per image in --out.

    Overlays (NAME_TT_LABEL.png) are drawn at the photo's own resolution (the region the model saw,
    at least the model-input size, at most 2048 px on the longer side); the grid (NAME_grid.png:
    at most 8 targets per row, 64 in all) and the maps (NAME_maps.npy) and the peak positions in
    summary.json are at the model-input size (input_size in summary.json). Two inputs with the
    same file name get different names (cat, cat-2, ...); summary.json lists each image's files.

    --method all runs every method on the same targets and writes NAME_methods.png side by side.
    """
    import camlens
    from camlens.backends.base import PRECISION_NAMES
    from camlens.fronts.report import write_explanation
    from camlens.core.targets import COMBINE_MODES

    _check_image_args(images)
    if target and top_k:
        raise typer.BadParameter("give --target or --top-k, not both")
    targets = _cli_targets(target)
    opts = _parse_options(option or [])
    all_methods = method.lower() == "all"
    if not all_methods:
        _check_method(method)
    _check_view(cmap, alpha)
    _check_common(device=device, top_k=top_k, max_pixels=max_pixels)
    _check_choice("--combine", combine, COMBINE_MODES)
    _check_choice("--precision", precision, PRECISION_NAMES)
    if noise_smooth < 0 or max_overlays < 0:
        raise typer.BadParameter("--noise-smooth and --max-overlays must be >= 0")
    if sign not in (1, -1):
        raise typer.BadParameter(f"--sign must be 1 or -1, got {sign}")
    if activation is not None:
        from camlens.core.activations import ACTIVATIONS

        _check_choice("--activation", activation, ACTIVATIONS)
    kw = dict(targets=targets, top_k=top_k, layer=list(layer) if layer else None,
              combine=combine, aug_smooth=aug_smooth, noise_smooth=noise_smooth, precision=precision,
              sign=sign, activation=activation)
    m = _load_model(model, weights, device, crop)
    note = "random weights" if m.random_weights else None
    out.mkdir(parents=True, exist_ok=True)
    results, errors, stems = [], [], _Stems()
    if all_methods:
        for path, img in _readable_images(images, "explaining", errors, max_pixels):
            entry = _compare_methods(m, img, path, kw, opts, out, stems.take(path), cmap, alpha, crop, errors)
            if entry is not None:
                results.append({"image": str(path), **entry})
    for path, img, exp, stem in ([] if all_methods else _explained(m, images, "explaining", errors, max_pixels,
                                                                   crop, stems, method=method, **kw, **opts)):
        try:
            entry = write_explanation(exp, out, stem, cmap=cmap, alpha=alpha, categories=m.categories,
                                      originals=_originals(m, img, exp), note=note,
                                      max_overlays=max_overlays)[0]
        except (OSError, ValueError, MemoryError) as err:
            _file_error(errors, path, err)
            continue
        results.append({"image": str(path), **entry})
        best = entry["targets"][0]
        more = f" (+{len(entry['targets']) - 1} target(s))" if len(entry["targets"]) > 1 else ""
        console.print(f"[green]✓[/] {escape(str(path))}: {escape(best['label'])}"
                      + (f" p={best['prob']:.2f}" if best["prob"] is not None else "") + more
                      + (" [yellow](random weights)[/]" if note else ""), highlight=False)
    summary = {"model": m.name, "random_weights": m.random_weights, "method": method,
               "layers": list(layer) if layer else [m.default_layer] if m.default_layer else [],
               "images": results, "files": _files_by_image(results), "errors": errors}
    if all_methods:
        summary["methods"] = list(camlens.available_methods())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    kinds = "summary.json, *_methods.png" if all_methods else "summary.json, *_grid.png, *_maps.npy, overlays"
    console.print(f"wrote {len(results)} explanation(s) to {out}/ ({kinds})"
                  + (f"; {len(errors)} file(s) failed" if errors else ""))
    if errors:
        raise typer.Exit(code=1)


def _originals(m: Any, img: Any, exp: Any) -> Optional[list]:
    """The picture to draw overlays on: the region of the photo the model saw, at the photo's
    resolution (at most OVERLAY_MAX_SIDE px long), or ``None`` (model-input size) when that is not
    larger than the maps or the model's preprocessing is not camlens'."""
    import numpy as np
    from PIL import Image

    import sys

    # camlens' own (torch) preprocessing only; not imported here, so a Keras model's run needs no torch
    Preprocess = getattr(sys.modules.get("camlens.models.preprocess"), "Preprocess", None)
    pre = m.preprocess
    if Preprocess is None or not isinstance(pre, Preprocess) or exp.maps.shape[0] != 1:
        return None
    view = img
    if pre.crop:
        left, top, right, bottom = pre.source_box(img.height, img.width)
        view = img.crop((round(left), round(top), round(right), round(bottom)))
    H, W = exp.maps.shape[-2:]
    if view.height <= H and view.width <= W:
        return None
    longest = max(view.size)
    if longest > OVERLAY_MAX_SIDE:
        s = OVERLAY_MAX_SIDE / longest
        view = view.resize((max(1, round(view.width * s)), max(1, round(view.height * s))), Image.Resampling.BILINEAR)
    return [np.asarray(view.convert("RGB"))]


def _compare_methods(m: Any, img: Any, path: Path, kw: dict, opts: dict, out: Path, stem: str, cmap: str,
                     alpha: float, crop: bool, errors: list) -> Optional[dict]:
    """Every registered method on the same image and targets (each through :func:`_stream`); one
    grid, methods side by side. A line per method as it finishes (with its time); a method that
    cannot run here (e.g. CAM on a head that is not GAP + Linear) is skipped. When every method
    fails: a per-file error (see :mod:`camlens.fronts.cli.common`) is reported for the image
    (``None``), a usage error stops the run (exit 2)."""
    import time

    import camlens
    from camlens.core.errors import CamlensError
    from camlens.fronts.report import write_method_grid

    exps, skipped, file_errors = {}, {}, []
    names = list(camlens.available_methods().items())
    for n, (name, meth) in enumerate(names, 1):
        own = {k: v for k, v in opts.items() if k in meth.options}
        t0 = time.perf_counter()
        try:
            [res] = _stream(m, [(path, img)], method=name, **kw, **own)
        except CamlensError as err:  # stream raises the errors that are not this input's
            res = camlens.Failure(0, path, err)
        if isinstance(res, camlens.Failure):
            if _per_file(res.error) is not None:
                file_errors.append(res.error)
            elif not isinstance(res.error, CamlensError):  # a bug: the traceback is wanted
                raise res.error
            skipped[name] = _first_line(res.error)
            console.print(f"  [yellow]{n}/{len(names)} {name}: skipped: {escape(skipped[name])}[/]", highlight=False)
            continue
        exps[name] = res
        console.print(f"  {n}/{len(names)} {name}: {time.perf_counter() - t0:.1f} s", highlight=False)
    if not exps:
        if file_errors:
            _failed_image(errors, path, file_errors[0], m, crop)
            return None
        _fatal(f"no method could run: {next(iter(skipped.values()))}")
    try:
        grid = write_method_grid(exps, out, stem, cmap=cmap, alpha=alpha)
        if getattr(m, "random_weights", False):  # say so on the picture too
            import numpy as np
            from PIL import Image

            from camlens.fronts.report import stamp

            with Image.open(out / grid) as im:
                pic = np.asarray(im.convert("RGB"))
            Image.fromarray(stamp(pic, "random weights")).save(out / grid)
    except (OSError, ValueError, MemoryError) as err:
        _file_error(errors, path, err)
        return None
    console.print(f"[green]✓[/] {path}: {len(exps)} methods → {out / grid}", highlight=False)
    return {"methods_grid": grid, "methods": list(exps), "skipped": skipped, "files": [grid]}
