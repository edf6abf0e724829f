"""The ``camlens`` command line: ``explain``, ``localize``, ``report``, ``demo``, ``methods``, ``models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="camlens: where an image model looks, for every output it has.")
console = Console(stderr=True, soft_wrap=True)


@app.command()
def explain(
    images: List[Path] = typer.Argument(..., help="image files or folders to explain"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m",
                              help="efficientnet-lite0 | torchvision:NAME | timm:NAME | path/file.py:factory"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="state-dict file for the model"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s); several are fused"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t",
                                               help="head:class, e.g. 281, species:281, 1:3 or a class name"),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="explain each head's K top classes"),
    out: Path = typer.Option(Path("camlens_out"), "--out", "-o", help="output folder"),
    cmap: str = typer.Option("jet", "--cmap", help="matplotlib colormap"),
    alpha: float = typer.Option(0.5, "--alpha", help="overlay opacity"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    crop: bool = typer.Option(False, "--crop", help="centre-crop to a square (default: keep the whole picture)"),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O",
                                               help="method option KEY=VALUE, e.g. batch_size=64 (repeatable)"),
    combine: str = typer.Option("separate", "--combine",
                                help="separate (a map per target) | mean | confidence | sum (one map per image)"),
    aug_smooth: bool = typer.Option(False, "--aug-smooth", help="average over flipped / rescaled inputs"),
    noise_smooth: int = typer.Option(0, "--noise-smooth", help="SmoothGrad-style: average over N noisy copies"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 forwards (autocast; fast on GPUs)"),
) -> None:
    """Explain images: overlays, a grid, .npy maps and summary.json per image in --out.

    --method all runs every method on the same targets and writes NAME_methods.png side by side.
    """
    import camlens
    from camlens.report import safe_name, write_explanation

    if target and top_k:
        raise typer.BadParameter("give --target or --top-k, not both")
    opts = _parse_options(option or [])
    all_methods = method.lower() == "all"
    if not all_methods:
        try:
            camlens.methods.get_method(method)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    kw = dict(targets=list(target) if target else None, top_k=top_k, layer=list(layer) if layer else None,
              combine=combine, aug_smooth=aug_smooth, noise_smooth=noise_smooth, precision=precision)
    m = camlens.models.load(model, weights=str(weights) if weights else None, device=device, crop=crop)
    out.mkdir(parents=True, exist_ok=True)
    results, errors = [], []
    for path, img in _readable_images(images, "explaining", errors):
        if all_methods:
            entry = _compare_methods(m, img, kw, opts, out, safe_name(path.stem), cmap, alpha)
            results.append({"image": str(path), **entry})
            continue
        exp = _explain_or_exit(m, img, method=method, **kw, **opts)
        try:
            entry = write_explanation(exp, out, safe_name(path.stem), cmap=cmap, alpha=alpha,
                                      categories=m.categories)[0]
            results.append({"image": str(path), **entry})
            best = entry["targets"][0]
            console.print(f"[green]✓[/] {path}: {best['label']}"
                          + (f" p={best['prob']:.2f}" if best["prob"] is not None else ""))
        except (OSError, ValueError) as err:
            errors.append({"image": str(path), "error": str(err)})
            console.print(f"[red]✗ {path}: {err}[/]")
    summary = {"model": m.name, "method": method, "layers": list(layer) if layer else [m.default_layer],
               "images": results, "errors": errors}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {len(results)} explanation(s) to {out}/ (summary.json, *_grid.png, *.npy)")
    if errors:
        raise typer.Exit(code=1)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _expand(paths: List[Path]) -> List[Path]:
    """Folders become their image files (sorted, by suffix); files are kept as given."""
    out: List[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def _readable_images(paths: List[Path], verb: str, errors: list):
    """Yield ``(path, PIL image)`` per readable file (folders expanded) under a progress bar; an
    unreadable file is reported, recorded in ``errors`` and skipped, so the other images are still
    processed."""
    from camlens.io import load_image

    paths = _expand(paths)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(verb, total=len(paths))
        for path in paths:
            progress.update(task, description=f"{verb} {path.name}")
            try:
                img = load_image(path)
            except (OSError, ValueError) as err:
                errors.append({"image": str(path), "error": str(err)})
                console.print(f"[red]✗ {path}: {err}[/]")
            else:
                yield path, img
            progress.advance(task)


def _explain_or_exit(m, img, **kw):
    """``camlens.explain``; a configuration error (layer, target, option) is the same for every image: exit 2."""
    import camlens

    try:
        return camlens.explain(m, img, **kw)
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as err:
        console.print(f"[red]error: {_message(err)}[/]")
        raise typer.Exit(code=2) from None


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _parse_options(items: List[str]) -> dict:
    """``["batch_size=64", "baseline='blur'"]`` -> ``{"batch_size": 64, "baseline": "blur"}``."""
    import ast

    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--option takes KEY=VALUE, got {item!r}")
        try:
            opts[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            opts[key.strip()] = value.strip()  # a bare word: a string
    return opts


def _compare_methods(m, img, kw: dict, opts: dict, out: Path, stem: str, cmap: str, alpha: float) -> dict:
    """Every registered method on the same image and targets; one grid, methods side by side."""
    import camlens
    from camlens.report import write_method_grid

    exps, skipped = {}, {}
    for name, meth in camlens.available_methods().items():
        own = {k: v for k, v in opts.items() if k in meth.options}
        try:
            exps[name] = camlens.explain(m, img, method=name, **kw, **own)
        except (ValueError, RuntimeError, TypeError) as err:  # e.g. CAM on a head that is not GAP + Linear
            skipped[name] = _message(err)
            console.print(f"[yellow]skipped {name}: {_message(err)}[/]")
    if not exps:
        raise typer.Exit(code=2)
    grid = write_method_grid(exps, out, stem, cmap=cmap, alpha=alpha)
    console.print(f"[green]✓[/] {stem}: {len(exps)} methods → {grid}")
    return {"methods_grid": grid, "methods": list(exps), "skipped": skipped}


@app.command()
def localize(
    images: List[Path] = typer.Argument(..., help="image files to localise in"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m",
                              help="efficientnet-lite0 | torchvision:NAME | timm:NAME | path/file.py:factory"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="state-dict file for the model"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s); several are fused"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t",
                                               help="head:class, e.g. 281, species:281, 1:3 or a class name"),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="localise each head's K top classes"),
    threshold: float = typer.Option(0.2, "--threshold",
                                    help="box: keep pixels >= this fraction of the map's max (CAM paper: 0.2)"),
    union: bool = typer.Option(False, "--union",
                               help="box around every component above --threshold, not only the largest"),
    mask_threshold: float = typer.Option(0.5, "--mask-threshold", help="mask: pixels >= this fraction of the max"),
    grabcut: bool = typer.Option(False, "--grabcut", help="refine masks with OpenCV GrabCut seeded by the map"),
    cutout: bool = typer.Option(False, "--cutout", help="also write the foreground as RGBA PNG (alpha = mask)"),
    out: Path = typer.Option(Path("camlens_localize"), "--out", "-o", help="output folder"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    crop: bool = typer.Option(False, "--crop", help="centre-crop to a square (default: keep the whole picture)"),
) -> None:
    """Localise each target from its map: a box, a mask and drawings per image and target in --out.

    Box: the CAM paper's rule, pixels >= --threshold x the map's max, the largest 8-connected
    component's bounding box, (x0, y0, x1, y1) inclusive-exclusive (x0 <= x < x1). Mask: pixels
    >= --mask-threshold x the max (then GrabCut with --grabcut). Coordinates, masks and drawings
    are in the MODEL-INPUT image (the resized picture, input_size in summary.json), not the
    original file. A map with no positive evidence gets the whole image as box and an empty mask.

    Writes NAME_TT_LABEL_mask.png (0/255), NAME_TT_LABEL_box.png (map overlay + box),
    NAME_boxes.png (every target's box on the image), with --cutout NAME_TT_LABEL_cutout.png
    (RGBA), and summary.json.
    """
    import camlens
    from camlens.localize import boxes_from_maps, cutout as make_cutout, draw_boxes, masks_from_maps
    from camlens.report import safe_name
    from camlens.viz import PALETTE, overlay, save_png

    if target and top_k:
        raise typer.BadParameter("give --target or --top-k, not both")
    for name, value in (("--threshold", threshold), ("--mask-threshold", mask_threshold)):
        if not 0.0 <= value <= 1.0:
            raise typer.BadParameter(f"{name} is a fraction of the map's max in [0, 1], got {value}")
    try:
        camlens.methods.get_method(method)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    kw = dict(targets=list(target) if target else None, top_k=top_k, layer=list(layer) if layer else None,
              method=method)
    m = camlens.models.load(model, weights=str(weights) if weights else None, device=device, crop=crop)
    out.mkdir(parents=True, exist_ok=True)
    results, errors = [], []
    for path, img in _readable_images(images, "localising", errors):
        exp = _explain_or_exit(m, img, **kw)
        try:
            display = exp.display if exp.display is not None else m.to_display(exp.inputs)
            boxes = boxes_from_maps(exp.maps, threshold, largest=not union)[0].cpu()
            masks = masks_from_maps(exp.maps, mask_threshold, refine="grabcut" if grabcut else None,
                                    images=display if grabcut else None, low=min(0.1, mask_threshold),
                                    high=max(0.9, mask_threshold))[0].cpu()
            maps = exp.maps[0].detach().float().cpu().numpy()
            H, W = maps.shape[-2:]
            stem = safe_name(path.stem)
            entry = {"image": str(path), "original_size": [img.height, img.width], "input_size": [H, W],
                     "targets": []}
            for t, tg in enumerate(exp.targets[0]):
                base = f"{stem}_{t:02d}_{safe_name(tg.label)}"
                mask = masks[t].numpy()
                save_png(out / f"{base}_mask.png", (mask * 255).astype("uint8"))
                save_png(out / f"{base}_box.png", draw_boxes(overlay(display[0], maps[t], alpha=0.4),
                                                             boxes[t:t + 1], [tg.label], [PALETTE[t % len(PALETTE)]]))
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
                entry["targets"].append(rec)
            labels = [f"{tg.label}" for tg in exp.targets[0]]
            save_png(out / f"{stem}_boxes.png", draw_boxes(display[0], boxes, labels))
            entry["drawing"] = f"{stem}_boxes.png"
            results.append(entry)
            best = entry["targets"][0]
            console.print(f"[green]✓[/] {path}: {best['label']} box {best['box']}")
        except (OSError, ValueError) as err:
            errors.append({"image": str(path), "error": str(err)})
            console.print(f"[red]✗ {path}: {err}[/]")
    summary = {"model": m.name, "method": method, "layers": list(layer) if layer else [m.default_layer],
               "threshold": threshold, "largest_component": not union, "mask_threshold": mask_threshold,
               "grabcut": grabcut,
               "box_format": "x0, y0, x1, y1 in model-input pixels, inclusive-exclusive (x0 <= x < x1)",
               "images": results, "errors": errors}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {len(results)} localisation(s) to {out}/ (summary.json, *_mask.png, *_boxes.png)")
    if errors:
        raise typer.Exit(code=1)


@app.command()
def report(
    images: List[Path] = typer.Argument(..., help="image files"),
    out: Path = typer.Option(Path("camlens_report.html"), "--out", "-o", help="the HTML file to write"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m",
                              help="efficientnet-lite0 | shapes-2head | torchvision:NAME | timm:NAME | file.py:factory"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="state-dict file for the model"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s)"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help="head:class (repeatable)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="each head's K top classes (default 3)"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """One self-contained HTML report: predictions per head and an interactive viewer per image
    (toggle each head/target's map, opacity, colormap, per-head colour composite). Works offline."""
    import camlens
    from camlens.viz import write_report

    m = camlens.models.load(model, weights=str(weights) if weights else None, device=device)
    kw = dict(targets=list(target) if target else None, top_k=None if target else (top_k or 3),
              layer=list(layer) if layer else None, method=method)
    exps, names, errors = [], [], []
    for path, img in _readable_images(images, "explaining", errors):
        exps.append(_explain_or_exit(m, img, **kw))
        names.append(path.name)
    if not exps:
        raise typer.Exit(code=1)
    path = write_report(exps, out, names=names, categories=m.categories, title=f"camlens · {m.name} · {method}")
    console.print(f"wrote {path} ({len(exps)} image(s); open it in any browser, no network needed)")
    if errors:
        raise typer.Exit(code=1)


@app.command()
def evaluate(
    images: Optional[List[Path]] = typer.Argument(None, help="image files or folders (or use --shapes N)"),
    shapes: int = typer.Option(0, "--shapes", help="evaluate on N generated shapes images with their masks "
                                                    "(model shapes-2head, both heads' true classes)"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", help="model (ignored with --shapes)"),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    method: Optional[List[str]] = typer.Option(None, "--method", help="methods (default: gradcam, random, center)"),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help="metrics (default: deletion, insertion, "
                                                                       "average_drop; + pointing_game, relevance_mass "
                                                                       "with --shapes)"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help="head:class (default: top class)"),
    batch_size: int = typer.Option(64, "--batch-size"),
    out: Path = typer.Option(Path("camlens_eval"), "--out", "-o", help="folder for results.csv/json, curves.png"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Compare methods with faithfulness / localisation metrics: a table (mean ± s.e., direction arrows),
    results.csv, results.json and deletion/insertion curves per method. `random` and `center` are the
    chance baselines."""
    import camlens
    from camlens.io import load_image
    from camlens.report import write_evaluation

    methods = list(method) if method else ["gradcam", "random", "center"]
    metrics = list(metric) if metric else ["deletion", "insertion", "average_drop"] + (
        ["pointing_game", "relevance_mass"] if shapes else [])
    for name in methods:
        camlens.methods.get_method(name)
    for name in metrics:
        camlens.metrics.get_metric(name)
    items = []  # (name, input or image, targets, masks)
    if shapes:
        from camlens.datasets.shapes import make_shapes

        m = camlens.models.load("shapes-2head", device=device)
        data = make_shapes(shapes, seed=2024)
        for b in range(shapes):
            masks = torch_stack_masks(data, b)
            items.append((f"shapes#{b}", data.images[b:b + 1], data.targets()[b], masks))
    else:
        if not images:
            raise typer.BadParameter("give image files or --shapes N")
        m = camlens.models.load(model, weights=str(weights) if weights else None, device=device)
        for path in _expand(images):
            try:
                items.append((path.name, load_image(path), list(target) if target else None, None))
            except (OSError, ValueError) as err:
                console.print(f"[red]✗ {path}: {err}[/]")
    values: dict = {meth: {met: [] for met in metrics} for meth in methods}
    curves: dict = {meth: {} for meth in methods}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(items) * len(methods))
        for name, img, tg, masks in items:
            for meth in methods:
                progress.update(task, description=f"{name} · {meth}")
                try:
                    exp = camlens.explain(m, img, targets=tg, layer=list(layer) if layer else None, method=meth)
                    sc = camlens.evaluate(m, exp.inputs, exp, metrics=metrics, masks=masks, batch_size=batch_size)
                except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as err:
                    console.print(f"[red]error ({meth} on {name}): {_message(err)}[/]")
                    raise typer.Exit(code=2) from None
                for met in metrics:
                    values[meth][met].append(sc[met].flatten().cpu())
                for met, c in sc.curves.items():
                    curves[meth].setdefault(met, []).append(c.flatten(0, 1).cpu())
                progress.advance(task)
    table_rows = write_evaluation(values, curves, {n: camlens.metrics.get_metric(n) for n in metrics}, out)
    table = Table("method", *[f"{n} {camlens.metrics.get_metric(n).arrow}" for n in metrics],
                  title=f"{m.name} · {len(items)} image(s) · mean ± standard error")
    for meth in methods:
        table.add_row(meth, *[table_rows[meth][n] for n in metrics])
    Console().print(table)
    console.print(f"wrote {out}/results.csv, results.json, curves.png")


def torch_stack_masks(data, b: int):
    """(1, 2, H, W) bool masks of image b's two objects, in head order (shape, colour)."""
    import torch

    return torch.stack([data.masks["shape"][b], data.masks["colour"][b]])[None]


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="output folder"),
    device: Optional[str] = typer.Option(None, "--device"),
    top_k: int = typer.Option(3, "--top-k", "-k"),
) -> None:
    """Explain scikit-image's cat and coffee photos with the default model (top-3 classes each)."""
    from camlens.demo import run_demo

    with console.status("running the demo (EfficientNet-Lite0, Grad-CAM)..."):
        summary = run_demo(out, top_k=top_k, device=device)
    for img in summary["images"]:
        t = img["targets"][0]
        console.print(f"{img['image']}: top class {t['label']} p={t['prob']:.2f}, map peak at (y, x) = {t['peak_yx']}")
    sh = summary["shapes"]
    hits = sum(r["shape_peak_on_object"] and r["colour_peak_on_object"] for r in sh["images"])
    console.print(f"two-head shapes model: both heads' peaks on their own object in {hits}/{len(sh['images'])} images")
    console.print(f"[bold]demo outputs in {out.resolve()}/[/]: {summary['grid']} (the grid), per-target overlays, "
                  f".npy maps, summary.json; {sh['composite']} (per-head composite), {sh['report']} (open in a browser)")


@app.command()
def methods() -> None:
    """List the available methods, what they do and what they cost."""
    import camlens

    table = Table("method", "what it does", "cost per call")
    for name, m in sorted(camlens.available_methods().items()):
        table.add_row(name, m.description, m.cost)
    Console().print(table)


@app.command()
def models() -> None:
    """List the built-in models and the loader forms."""
    import camlens

    for name in camlens.models.list_models():
        print(name)
    print("torchvision:NAME  timm:NAME  path/to/file.py:factory  (random init unless --weights FILE)")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
