"""The ``camlens`` command line: ``explain``, ``localize``, ``report``, ``evaluate``, ``demo``, ``methods``,
``metrics``, ``models``."""

from __future__ import annotations

import collections
import functools
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="camlens: where an image model looks, for every output it has.")
console = Console(stderr=True, soft_wrap=True)


def command(*args, **kwargs):
    """``app.command`` that turns a :class:`camlens.errors.CamlensError` reaching the command (an error
    camlens raises on purpose: unknown layer, bad target or option, device) into one line and exit
    code 2. This is the one place the CLI catches them; per-file problems (an unreadable image, the
    model's own error on one image) are reported where they happen and the run goes on.

    A package of a camlens extra that is not installed (PyTorch without ``camlens[torch]``) is a
    :class:`camlens.errors.MissingDependencyError` naming the extra, reported the same way. Only the
    commands import camlens' torch-backed modules, so ``camlens --help`` needs no PyTorch."""
    def deco(fn):
        name = (args[0] if args else kwargs.get("name")) or fn.__name__.replace("_", "-")

        @functools.wraps(fn)
        def run(*a, **k):
            from camlens import _missing_dependency
            from camlens.errors import CamlensError

            try:
                try:
                    return fn(*a, **k)
                except ImportError as err:  # torch missing, found by the command or by a camlens.NAME
                    missing = _missing_dependency(err, f"camlens {name}")
                    if missing is None:
                        raise
                    raise missing from err
            except CamlensError as err:
                _fatal(_first_line(err))
        return app.command(*args, **kwargs)(run)
    return deco


# ------------------------------------------------------------------------------------------
# shared option declarations
# ------------------------------------------------------------------------------------------
MODEL_HELP = "efficientnet-lite0 | shapes-2head | torchvision:NAME | timm:NAME | path/file.py:factory"
TARGET_HELP = ("head:class, e.g. 281, species:281, 1:3, a class name, or all / HEAD:all (every class "
               "of a head)")
MAX_PIXELS_HELP = ("refuse image files larger than this many pixels (width x height) before decoding "
                   "them (decompression bombs); 0: no limit")
OVERLAY_MAX_SIDE = 2048  # overlays at the photo's resolution, at most this long on the longer side


def _flag(default: bool, decls: str, help: str):
    """A boolean ``--x/--no-x`` flag (shown as a flag in --help, never takes a value)."""
    return typer.Option(default, decls, help=help, metavar="")


@command()
def explain(
    images: List[Path] = typer.Argument(..., help="image files or folders to explain"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="state-dict file for the model"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s); several are fused"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`; all: every method"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="explain each head's K top classes"),
    out: Path = typer.Option(Path("camlens_out"), "--out", "-o", help="output folder"),
    cmap: str = typer.Option("jet", "--cmap", help="matplotlib colormap"),
    alpha: float = typer.Option(0.5, "--alpha", help="overlay opacity in [0, 1]"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    crop: bool = _flag(False, "--crop/--no-crop", "centre-crop to a square (default: keep the whole picture)"),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O",
                                               help="method option KEY=VALUE, e.g. batch_size=64 (repeatable)"),
    combine: str = typer.Option("separate", "--combine",
                                help="separate (a map per target) | mean | confidence | sum (one map per image)"),
    aug_smooth: bool = _flag(False, "--aug-smooth/--no-aug-smooth", "average over flipped / rescaled inputs"),
    noise_smooth: int = typer.Option(0, "--noise-smooth", help="SmoothGrad-style: average over N noisy copies"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 forwards (autocast; fast on GPUs)"),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", help=MAX_PIXELS_HELP),
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
    from camlens.report import write_explanation
    from camlens.targets import COMBINE_MODES

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
    kw = dict(targets=targets, top_k=top_k, layer=list(layer) if layer else None,
              combine=combine, aug_smooth=aug_smooth, noise_smooth=noise_smooth, precision=precision)
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


def _readable_images(paths: List[Path], verb: str, errors: list, max_pixels: Optional[int] = None):
    """Yield ``(path, PIL image)`` per readable file (folders expanded) under a progress bar; an
    unreadable file (or one over ``max_pixels``, a decompression bomb) is reported, recorded in
    ``errors`` and skipped, so the other images are still processed."""
    from camlens.io import DEFAULT_MAX_PIXELS, load_image

    paths = _expand(paths)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(verb, total=len(paths))
        for path in paths:
            progress.update(task, description=f"{verb} {path.name}")
            try:
                img = load_image(path, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else (max_pixels or None))
            except (OSError, ValueError, MemoryError) as err:
                _file_error(errors, path, err)
            else:
                yield path, img
            progress.advance(task)


def _file_error(errors: list, path: Path, err: BaseException, prefix: str = "", suffix: str = "") -> None:
    """Record and print a per-file error (one line); the run goes on."""
    msg = prefix + _first_line(err) + suffix
    errors.append({"image": str(path), "error": msg})
    console.print(f"[red]✗ {escape(str(path))}: {escape(msg)}[/]", highlight=False)


def _first_line(err: BaseException, limit: int = 400) -> str:
    """A one-line message of ``err`` (its first line, at most ``limit`` characters)."""
    text = _message(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    if not text or len(line) < 8:
        line = f"{type(err).__name__}: {line}" if text else line
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


# ------------------------------------------------------------------------------------------
# errors while explaining: per image (the model's own) or for the whole run (camlens usage)
# ------------------------------------------------------------------------------------------
def _is_model_error(err: BaseException) -> bool:
    """Whether ``err`` was raised inside the model's own forward (a module camlens called), not by
    camlens (layer names, targets, options): the innermost camlens frame of the traceback calls
    into ``torch.nn.Module.__call__`` and the error comes from there. Followed through ``raise ...
    from`` chains."""
    import camlens

    root = str(Path(camlens.__file__).resolve().parent)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        frames = []
        tb = err.__traceback__
        while tb is not None:
            frames.append(str(Path(tb.tb_frame.f_code.co_filename).resolve()) if tb.tb_frame.f_code.co_filename
                          else "")
            tb = tb.tb_next
        inner = max((i for i, f in enumerate(frames) if f.startswith(root)), default=-1)
        if any(f.replace("\\", "/").endswith("torch/nn/modules/module.py") for f in frames[inner + 1:]):
            return True
        err = err.__cause__
    return False


def _is_oom(err: BaseException) -> bool:
    from camlens.backends.base import is_out_of_memory  # MemoryError, or a loaded backend's (torch.OutOfMemoryError)

    return isinstance(err, MemoryError) or is_out_of_memory(err) or "out of memory" in str(err).lower()


def _hint(m, crop: bool) -> str:
    size = getattr(m, "input_size", None)
    if not size:
        return ""
    if not crop:
        return f" (hint: the model may need {size}x{size} inputs: try --crop)"
    return f" (the model's input is {size}x{size})"


def _explained(m, images: List[Path], verb: str, errors: list, max_pixels: Optional[int], crop: bool,
               stems: Optional["_Stems"] = None, **kw):
    """The CLI's one loop: read the files (a progress bar; unreadable ones reported) and explain them
    through :func:`camlens.stream`; yields ``(path, decoded image, single-image Explanation, stem)``.
    An image that cannot be explained is reported (:func:`_failed_image`) and skipped; ``stems`` (if
    given) names each input's outputs in order, failures included (else the stem is ``None``)."""
    import camlens

    read: collections.deque = collections.deque()  # the decoded photos, in order, until their result comes

    def photos():
        for path, img in _readable_images(images, verb, errors, max_pixels):
            read.append(img)
            yield path, img

    for res in camlens.stream(m, photos(), keyed=True, batch_size=1, on_error="yield", **kw):
        path, img = res.source, read.popleft()
        stem = stems.take(path) if stems is not None else None
        if isinstance(res, camlens.Failure):
            _failed_image(errors, path, res.error, m, crop)
            continue
        yield path, img, res, stem


def _failed_image(errors: list, path: Path, err: BaseException, m, crop: bool) -> None:
    """Report an image ``camlens.stream`` could not explain: out of memory, its own values
    (:class:`~camlens.errors.InputError`), or the model's own error (with a hint). Anything else is a
    bug: raised with its traceback."""
    from camlens.errors import CamlensError, InputError, NonFiniteScoresError

    if _is_oom(err):
        _file_error(errors, path, err, prefix="out of memory on this image: ")
    elif isinstance(err, (InputError, NonFiniteScoresError)):
        _file_error(errors, path, err)
    elif _is_model_error(err) and not isinstance(err, CamlensError):
        _file_error(errors, path, err, prefix="the model failed on this image: ", suffix=_hint(m, crop))
    else:
        raise err


def _explain_image(m, img, path: Path, errors: list, crop: bool, **kw):
    """``camlens.explain`` on one image. The model's own error (e.g. a ViT given a non-224 picture)
    or running out of memory is a per-file error: recorded, printed with a hint, ``None`` returned.
    So is a :class:`~camlens.errors.InputError` (this image's values, e.g. NaN pixels). Any other
    camlens error (unknown layer, bad target or option) is the same for every image: it propagates
    to :func:`command` (one line, exit 2)."""
    import camlens

    try:
        return camlens.explain(m, img, **kw)
    except Exception as err:  # noqa: BLE001 - classified by _failed_image (it re-raises the others)
        _failed_image(errors, path, err, m, crop)
        return None


def _fatal(msg: str, code: int = 2):
    console.print(f"[red]error: {escape(msg)}[/]", highlight=False)
    raise typer.Exit(code=code)


# ------------------------------------------------------------------------------------------
# validation before the model is loaded
# ------------------------------------------------------------------------------------------
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _check_image_args(images: Optional[List[Path]]) -> None:
    """A positional argument that is literally true/false (and no such file) is a flag's value
    given by mistake (``--crop true``): say so instead of reading it as an image."""
    for p in images or []:
        if str(p).lower() in _BOOL_WORDS and not p.exists():
            raise typer.BadParameter(f"{str(p)!r} is not an image file; flags take no value: write --crop, "
                                     "not --crop true (and --no-crop to turn one off)")


def _check_method(name: str) -> None:
    import camlens

    from camlens.errors import ConfigError

    try:
        camlens.methods.get_method(name)
    except ConfigError as err:
        raise typer.BadParameter(_first_line(err)) from None


def _check_choice(option: str, value: str, choices) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise typer.BadParameter(f"{option} must be one of {', '.join(choices)}; got {value!r}")


def _check_view(cmap: str, alpha: float) -> None:
    import difflib

    import matplotlib

    if cmap not in matplotlib.colormaps:
        close = difflib.get_close_matches(cmap, list(matplotlib.colormaps), n=3)
        raise typer.BadParameter(f"unknown colormap {cmap!r}"
                                 + (f"; did you mean {', '.join(close)}?" if close else
                                    "; e.g. jet, viridis, inferno, turbo (matplotlib colormaps)"))
    if not 0.0 <= alpha <= 1.0:
        raise typer.BadParameter(f"--alpha is an opacity in [0, 1], got {alpha}")


def _check_common(*, device: Optional[str] = None, top_k: Optional[int] = None,
                  max_pixels: Optional[int] = None) -> None:
    from camlens.models.loading import check_device

    if top_k is not None and top_k < 1:
        raise typer.BadParameter(f"--top-k must be >= 1, got {top_k}")
    if max_pixels is not None and max_pixels < 0:
        raise typer.BadParameter(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
    check_device(device)  # a ConfigError: one line, exit 2 (see command)


def _cli_targets(target: Optional[List[str]]):
    """``--target`` values for ``camlens.explain``: a list, or the string ``"all"`` / ``"HEAD:all"``."""
    if not target:
        return None
    alls = [t for t in target if t.strip().lower() == "all" or t.strip().lower().endswith(":all")]
    if alls:
        if len(target) > 1:
            raise typer.BadParameter("--target all (or HEAD:all) explains every class of a head; give it alone")
        t = alls[0].strip()
        return "all" if t.lower() == "all" else t[:-3] + "all"
    return list(target)


def _load_model(model: str, weights: Optional[Path], device: Optional[str], crop: bool = False):
    """``camlens.models.load`` with any failure (unknown name, bad or mismatched weights file, a
    factory file that does not import) as one line and exit 2; warns about random weights."""
    import camlens

    try:
        m = camlens.models.load(model, weights=str(weights) if weights else None, device=device, crop=crop)
    except Exception as err:  # noqa: BLE001 - any loading failure is one line, not a traceback
        _fatal(f"cannot load model {model!r}: {_first_line(err, limit=600)}")
    if getattr(m, "random_weights", False):
        console.print(f"[yellow]warning: {m.name} has random weights (no --weights given): its predictions "
                      "and maps are meaningless[/]", highlight=False)
    return m


def _originals(m, img, exp):
    """The picture to draw overlays on: the region of the photo the model saw, at the photo's
    resolution (at most OVERLAY_MAX_SIDE px long), or ``None`` (model-input size) when that is not
    larger than the maps or the model's preprocessing is not camlens'."""
    import numpy as np
    from PIL import Image

    from camlens.models.preprocess import Preprocess

    pre = m.preprocess
    if not isinstance(pre, Preprocess) or exp.maps.shape[0] != 1:
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


class _Stems:
    """Output-name stems, one per input, never shared: ``a/cat.jpg`` and ``b/cat.jpg`` become
    ``cat`` and ``cat-2`` (compared case-insensitively, for case-insensitive file systems). A stem
    that another's files could spell (``cat`` and ``cat_01``: ``cat_01_x.png``) is renamed too."""

    def __init__(self) -> None:
        self.used: list = []

    def _clash(self, cand: str) -> bool:
        import re

        for u in self.used:
            if cand == u:
                return True
            a, b = (u, cand) if len(u) < len(cand) else (cand, u)
            if re.fullmatch(re.escape(a) + r"_\d\d(_.*)?", b):
                return True
        return False

    def take(self, path: Path) -> str:
        from camlens.report import safe_name

        base = safe_name(path.stem)
        cand, k = base, 1
        while self._clash(cand.lower()):
            k += 1
            cand = f"{base}-{k}"
        self.used.append(cand.lower())
        return cand


def _files_by_image(results: list) -> dict:
    """``{input path: [files written for it]}`` for summary.json."""
    out: dict = {}
    for r in results:
        out.setdefault(r["image"], []).extend(r.get("files", []))
    return out


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


def _compare_methods(m, img, path: Path, kw: dict, opts: dict, out: Path, stem: str, cmap: str, alpha: float,
                     crop: bool, errors: list) -> Optional[dict]:
    """Every registered method on the same image and targets; one grid, methods side by side.
    A line per method as it finishes (with its time); a method that cannot run here (e.g. CAM on
    a head that is not GAP + Linear) is skipped. When every method fails: the model's own error
    is a per-file error (``None``), anything else stops the run (exit 2)."""
    import time

    import camlens
    from camlens.errors import CamlensError
    from camlens.report import write_method_grid

    exps, skipped, model_errors = {}, {}, []
    names = list(camlens.available_methods().items())
    for n, (name, meth) in enumerate(names, 1):
        own = {k: v for k, v in opts.items() if k in meth.options}
        t0 = time.perf_counter()
        try:
            exps[name] = camlens.explain(m, img, method=name, **kw, **own)
        except Exception as err:  # noqa: BLE001 - classified below
            if _is_oom(err) or (_is_model_error(err) and not isinstance(err, CamlensError)):
                model_errors.append(err)
            elif not isinstance(err, CamlensError):  # a bug: the traceback is wanted
                raise
            skipped[name] = _first_line(err)
            console.print(f"  [yellow]{n}/{len(names)} {name}: skipped: {escape(skipped[name])}[/]", highlight=False)
            continue
        console.print(f"  {n}/{len(names)} {name}: {time.perf_counter() - t0:.1f} s", highlight=False)
    if not exps:
        if model_errors:
            hint = "" if _is_oom(model_errors[0]) else _hint(m, crop)
            _file_error(errors, path, model_errors[0], prefix="the model failed on this image: ", suffix=hint)
            return None
        _fatal(f"no method could run: {next(iter(skipped.values()))}")
    try:
        grid = write_method_grid(exps, out, stem, cmap=cmap, alpha=alpha)
        if getattr(m, "random_weights", False):  # say so on the picture too
            import numpy as np
            from PIL import Image

            from camlens.report import stamp

            with Image.open(out / grid) as im:
                pic = np.asarray(im.convert("RGB"))
            Image.fromarray(stamp(pic, "random weights")).save(out / grid)
    except (OSError, ValueError, MemoryError) as err:
        _file_error(errors, path, err)
        return None
    console.print(f"[green]✓[/] {path}: {len(exps)} methods → {out / grid}", highlight=False)
    return {"methods_grid": grid, "methods": list(exps), "skipped": skipped, "files": [grid]}


@command()
def localize(
    images: List[Path] = typer.Argument(..., help="image files to localise in"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="state-dict file for the model"),
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
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    crop: bool = _flag(False, "--crop/--no-crop", "centre-crop to a square (default: keep the whole picture)"),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", help=MAX_PIXELS_HELP),
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
    from camlens.localize import boxes_from_maps, cutout as make_cutout, draw_boxes, masks_from_maps
    from camlens.report import safe_name, stamp
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
            boxes = boxes_from_maps(exp.maps, threshold, largest=not union)[0].cpu()
            masks = masks_from_maps(exp.maps, mask_threshold, refine="grabcut" if grabcut else None,
                                    images=display if grabcut else None, low=min(0.1, mask_threshold),
                                    high=max(0.9, mask_threshold))[0].cpu()
            maps = exp.maps[0].detach().float().cpu().numpy()
            H, W = maps.shape[-2:]
            entry = {"image": str(path), "original_size": [img.height, img.width], "input_size": [H, W],
                     "targets": []}
            files = []
            for t, tg in enumerate(exp.targets[0]):
                base = f"{stem}_{t:02d}_{safe_name(tg.label)}"
                mask = masks[t].numpy()
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


@command()
def report(
    images: List[Path] = typer.Argument(..., help="image files or folders"),
    out: Path = typer.Option(Path("camlens_report.html"), "--out", "-o", help="the HTML file to write"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="state-dict file for the model"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s)"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help=TARGET_HELP + " (repeatable)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="each head's K top classes (default 3)"),
    device: Optional[str] = typer.Option(None, "--device"),
    crop: bool = _flag(False, "--crop/--no-crop", "centre-crop to a square (default: keep the whole picture)"),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", help=MAX_PIXELS_HELP),
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


@command()
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
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", help=MAX_PIXELS_HELP),
    option: Optional[List[str]] = typer.Option(
        None, "--option", "-O", help="NAME.KEY=VALUE for one of the methods or metrics (repeatable), e.g. "
        "deletion.step=2240 (fewer, coarser deletion steps), scorecam.max_channels=64, road.percentages=[0.2,0.5,0.8]"),
) -> None:
    """Compare methods with faithfulness / localisation metrics: a table (mean ± s.e. over n values:
    one per image and target, direction arrows; percent metrics marked %), results.csv,
    results.json and deletion/insertion curves per method. `random` and `center` are the chance
    baselines. Localisation metrics (pointing_game, relevance_mass, ...) need ground-truth masks:
    the CLI has them only with --shapes N."""
    import camlens
    from camlens.errors import CamlensError, ConfigError, InputError
    from camlens.report import write_evaluation

    _check_image_args(images)
    methods = list(method) if method else ["gradcam", "random", "center"]
    metrics = list(metric) if metric else ["deletion", "insertion", "average_drop"] + (
        ["pointing_game", "relevance_mass"] if shapes else [])
    for name in methods:
        _check_method(name)
    for name in metrics:
        try:
            met = camlens.metrics.get_metric(name)
        except ConfigError as err:
            raise typer.BadParameter(_first_line(err)) from None
        needs = {n for need in met.requires for n in need.split("|")} & {"masks", "boxes"}
        if needs and not shapes:
            raise typer.BadParameter(f"metric {name!r} needs ground-truth {' or '.join(sorted(needs))}, which the "
                                     "CLI has only for --shapes N; drop it or use --shapes")
    if shapes < 0 or batch_size < 1:
        raise typer.BadParameter("--shapes must be >= 0 and --batch-size >= 1")
    method_opts, metric_opts = _evaluate_options(option or [], methods, metrics)
    _check_common(device=device, max_pixels=max_pixels)
    items = []  # (name, input or image, targets, masks)
    errors: list = []
    if shapes:
        from camlens.datasets.shapes import make_shapes

        m = _load_model("shapes-2head", None, device)
        data = make_shapes(shapes, seed=2024)
        for b in range(shapes):
            masks = torch_stack_masks(data, b)
            items.append((f"shapes#{b}", data.images[b:b + 1], data.targets()[b], masks))
    else:
        if not images:
            raise typer.BadParameter("give image files or --shapes N")
        m = _load_model(model, weights, device)
        for path, img in _readable_images(images, "reading", errors, max_pixels):
            items.append((str(path), img, _cli_targets(target), None))
    values: dict = {meth: {met: [] for met in metrics} for meth in methods}
    curves: dict = {meth: {} for meth in methods}
    done = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(items) * len(methods))
        for name, img, tg, masks in items:
            got = {}
            for meth in methods:
                progress.update(task, description=f"{Path(name).name} · {meth}")
                exp = _explain_image(m, img, Path(name), errors, False, targets=tg,
                                     layer=list(layer) if layer else None, method=meth, **method_opts.get(meth, {}))
                if exp is None:
                    break
                try:
                    got[meth] = camlens.evaluate(m, exp.inputs, exp, metrics=metrics, masks=masks,
                                                 batch_size=batch_size, options=metric_opts)
                except Exception as err:  # noqa: BLE001 - classified as in explain
                    if _is_oom(err) or isinstance(err, InputError) or \
                            (_is_model_error(err) and not isinstance(err, CamlensError)):
                        _file_error(errors, Path(name), err, prefix=f"{meth}: evaluation failed on this image: ")
                        break
                    raise  # a CamlensError: one line, exit 2 (see command)
                progress.advance(task)
            else:  # every method ran: the image counts (the same images for every method)
                done += 1
                for meth, sc in got.items():
                    for met in metrics:
                        values[meth][met].append(sc[met].flatten().cpu())
                    for met, c in sc.curves.items():
                        curves[meth].setdefault(met, []).append(c.flatten(0, 1).cpu())
    if not done:
        _fatal("no image could be evaluated", code=1)
    table_rows = write_evaluation(values, curves, {n: camlens.metrics.get_metric(n) for n in metrics}, out)
    n_values = sum(int(v.numel()) for v in values[methods[0]][metrics[0]])

    def header(n: str) -> str:
        met = camlens.metrics.get_metric(n)
        return f"{n}{' (%)' if '%' in met.description else ''} {met.arrow}"

    title = (f"{m.name}{' (random weights)' if m.random_weights else ''} · {done} image(s), "
             f"n = {n_values} (image, target) value(s) per cell · mean ± standard error")
    table = Table("method", *[header(n) for n in metrics], title=title)
    for meth in methods:
        table.add_row(meth, *[table_rows[meth][n] for n in metrics])
    Console().print(table)
    console.print(f"wrote {out}/results.csv, results.json, curves.png"
                  + (f"; {len(errors)} file(s) failed" if errors else ""))
    if errors:
        raise typer.Exit(code=1)


def _evaluate_options(items: List[str], methods: List[str], metrics: List[str]) -> tuple:
    """``evaluate --option NAME.KEY=VALUE``: per-method and per-metric options, checked against
    the options each method / metric declares."""
    import camlens

    meths = {camlens.methods.get_method(n).name: camlens.methods.get_method(n) for n in methods}
    mets = {camlens.metrics.get_metric(n).name: camlens.metrics.get_metric(n) for n in metrics}
    method_opts: dict = {}
    metric_opts: dict = {}
    for full, value in _parse_options(items).items():
        owner, dot, key = full.partition(".")
        if not dot or not key:
            raise typer.BadParameter(f"evaluate --option takes NAME.KEY=VALUE (NAME a method or metric), got {full!r}")
        if owner in mets or owner in metrics:
            met = camlens.metrics.get_metric(owner)
            if key not in met.defaults:
                raise typer.BadParameter(f"metric {met.name!r} has no option {key!r}; it has: "
                                         f"{', '.join(sorted(met.defaults)) or 'none'}")
            metric_opts.setdefault(met.name, {})[key] = value
        elif owner in meths or owner in methods:
            meth = camlens.methods.get_method(owner)  # explain() itself rejects an unknown key
            for given in methods:
                if camlens.methods.get_method(given).name == meth.name:
                    method_opts.setdefault(given, {})[key] = value
        else:
            raise typer.BadParameter(f"--option {full!r}: {owner!r} is not one of the methods ({', '.join(methods)}) "
                                     f"or metrics ({', '.join(metrics)}) being evaluated")
    return method_opts, metric_opts


def torch_stack_masks(data, b: int):
    """(1, 2, H, W) bool masks of image b's two objects, in head order (shape, colour)."""
    from camlens.backends.base import namespace

    pair = [data.masks["shape"][b], data.masks["colour"][b]]
    return namespace(*pair).stack(pair)[None, ...]


@command()
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


@command()
def methods() -> None:
    """List the available methods, what they do and what they cost."""
    import camlens

    table = Table()
    table.add_column("method", no_wrap=True)
    for col in ("what it does", "cost per call"):
        table.add_column(col)
    for name, m in sorted(camlens.available_methods().items()):
        table.add_row(name, m.description, m.cost)
    Console().print(table)


@command()
def metrics() -> None:
    """List the available metrics: direction, kind, what they need beyond the model and maps."""
    import camlens

    table = Table()
    table.add_column("metric", no_wrap=True)
    for col in ("", "kind", "needs", "what it measures"):
        table.add_column(col)
    for name, m in sorted(camlens.metrics.available_metrics().items()):
        needs = ", ".join(r.replace("|", " or ") for r in m.requires) or "-"
        table.add_row(name, m.arrow, m.category, needs, m.description)
    Console().print(table)


@command()
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
