"""What the ``camlens`` commands share: option declarations, reading the inputs, the checks made
before the model loads, the loop that explains the inputs (:func:`_explained`, on
:func:`camlens.stream`) and the one rule for errors.

The rule, the same in every command (:func:`_failed_image` applies it):

* **Per file**: reported as one line (``✗ PATH: message``), recorded in the command's list of
  errors (``summary.json``), and the run goes on with the other inputs; the command then ends with
  exit code 1. These are: a file that cannot be read or decoded, or is over ``--max-pixels``
  (:func:`_readable_images`); an output that cannot be written for it; and, while explaining or
  evaluating it, running out of memory, its own values (:class:`~camlens.errors.InputError`,
  :class:`~camlens.errors.NonFiniteScoresError`), or the model's own error on it (raised inside
  the model's forward, not by camlens; with a hint about the input size).
* **Usage**: any other :class:`~camlens.errors.CamlensError` (an unknown layer, a bad target,
  option or device) is the same for every input: it stops the run, as one line and exit code 2
  (:func:`camlens.fronts.cli.base.command`). So does a mistake the checks find before the model
  loads (``typer.BadParameter``).
* Anything else is a bug: raised with its traceback.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from camlens.fronts.cli.base import _fatal, console

# ------------------------------------------------------------------------------------------
# shared option declarations
# ------------------------------------------------------------------------------------------
MODEL_HELP = ("efficientnet-lite0 | shapes-2head | torchvision:NAME | timm:NAME | path/file.py:factory | "
              "keras:path/model.keras (.h5) | keras:applications.NAME[@SIZE]")
TARGET_HELP = ("head:class, e.g. 281, species:281, 1:3, a class name, or all / HEAD:all (every class "
               "of a head)")
MAX_PIXELS_HELP = ("refuse image files larger than this many pixels (width x height) before decoding "
                   "them (decompression bombs); 0: no limit")
OVERLAY_MAX_SIDE = 2048  # overlays at the photo's resolution, at most this long on the longer side


def _flag(default: bool, decls: str, help: str) -> Any:
    """A boolean ``--x/--no-x`` flag (shown as a flag in --help, never takes a value)."""
    return typer.Option(default, decls, help=help, metavar="")


def _model_option() -> Any:
    """``--model / -m``, as explain, localize and report take it."""
    return typer.Option("efficientnet-lite0", "--model", "-m", help=MODEL_HELP)


def _weights_option() -> Any:
    """``--weights FILE``: a state dict for the model."""
    return typer.Option(None, "--weights", help="state-dict file for the model (keras: models: a .weights.h5 / .h5 file)")


def _device_option() -> Any:
    """``--device``: where the model runs."""
    return typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...")


def _crop_flag() -> Any:
    """``--crop/--no-crop``: centre-crop each picture to a square."""
    return _flag(False, "--crop/--no-crop", "centre-crop to a square (default: keep the whole picture)")


def _max_pixels_option() -> Any:
    """``--max-pixels``: the decompression-bomb limit for image files."""
    return typer.Option(100_000_000, "--max-pixels", help=MAX_PIXELS_HELP)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
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


def _progress() -> Progress:
    """The commands' progress bar (on stderr, gone when done)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _readable_images(paths: List[Path], verb: str, errors: list, max_pixels: Optional[int] = None):
    """Yield ``(path, PIL image)`` per readable file (folders expanded) under a progress bar; an
    unreadable file (or one over ``max_pixels``, a decompression bomb) is reported, recorded in
    ``errors`` and skipped, so the other images are still processed."""
    from camlens.io import DEFAULT_MAX_PIXELS, load_image

    paths = _expand(paths)
    with _progress() as progress:
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
    """An unknown ``--method`` (the message lists close names)."""
    import camlens
    from camlens.core.errors import ConfigError

    try:
        camlens.methods.get_method(name)
    except ConfigError as err:
        raise typer.BadParameter(_first_line(err)) from None


def _check_choice(option: str, value: str, choices: Iterable[str]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise typer.BadParameter(f"{option} must be one of {', '.join(choices)}; got {value!r}")


def _check_view(cmap: str, alpha: float) -> None:
    """A matplotlib colormap name (close names suggested) and an opacity in [0, 1]."""
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
    """``--device``, ``--top-k`` and ``--max-pixels``, as every command takes them."""
    if top_k is not None and top_k < 1:
        raise typer.BadParameter(f"--top-k must be >= 1, got {top_k}")
    if max_pixels is not None and max_pixels < 0:
        raise typer.BadParameter(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
    if device is not None:  # (torch's devices; imported only then, so keras: models run without torch)
        from camlens.models.loading import check_device

        check_device(device)  # a ConfigError: one line, exit 2 (see command)


def _cli_targets(target: Optional[List[str]]) -> Any:
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


def _load_model(model: str, weights: Optional[Path], device: Optional[str], crop: bool = False) -> Any:
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


# ------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------
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
        """The stem for ``path``'s outputs (its file name made safe, ``-2``, ``-3`` ... if taken)."""
        from camlens.fronts.report import safe_name

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


# ------------------------------------------------------------------------------------------
# explaining: every command's loop runs on camlens.stream
# ------------------------------------------------------------------------------------------
def _stream(m: Any, items: Iterable[tuple], **kw: Any) -> Iterator[Any]:
    """:func:`camlens.stream` as the commands run it: ``(key, input)`` pairs in, one single-image
    Explanation per input out (``exp.source`` is the key), a :class:`camlens.Failure` in the place
    of each input that could not be explained (report it with :func:`_failed_image`). One image per
    explain call: the photos' sizes differ, and peak memory stays one image's. ``kw`` (method,
    layer, method options ...) goes to :func:`camlens.explain` as ``options=``, so an option named
    like a parameter of ``stream`` (Score-CAM's ``batch_size``) reaches the method."""
    import camlens

    targets = kw.pop("targets", None)
    return camlens.stream(m, items, targets, keyed=True, batch_size=1, on_error="yield", options=kw)


def _explained(m: Any, images: List[Path], verb: str, errors: list, max_pixels: Optional[int], crop: bool,
               stems: Optional[_Stems] = None, **kw: Any) -> Iterator[tuple]:
    """The explain / localize / report loop: read the files (a progress bar; unreadable ones
    reported) and explain them (:func:`_stream`); yields ``(path, decoded image, single-image
    Explanation, stem)``. An image that cannot be explained is reported (:func:`_failed_image`) and
    skipped; ``stems`` (if given) names each input's outputs in order, failures included (else the
    stem is ``None``)."""
    import camlens

    read: collections.deque = collections.deque()  # the decoded photos, in order, until their result comes

    def photos() -> Iterator[tuple]:
        for path, img in _readable_images(images, verb, errors, max_pixels):
            read.append(img)
            yield path, img

    for res in _stream(m, photos(), **kw):
        path, img = res.source, read.popleft()
        stem = stems.take(path) if stems is not None else None
        if isinstance(res, camlens.Failure):
            _failed_image(errors, path, res.error, m, crop)
            continue
        yield path, img, res, stem


# ------------------------------------------------------------------------------------------
# the error rule (see the module docstring)
# ------------------------------------------------------------------------------------------
def _per_file(err: BaseException) -> Optional[str]:
    """Why ``err`` belongs to the one input it was raised for: ``"memory"`` (out of memory),
    ``"input"`` (its values: :data:`camlens.errors.PER_INPUT_ERRORS`) or ``"model"`` (the model's
    own error); ``None``: a usage error (another CamlensError) or a bug, to be raised."""
    from camlens.core.errors import PER_INPUT_ERRORS, CamlensError

    if _is_oom(err):
        return "memory"
    if isinstance(err, PER_INPUT_ERRORS):
        return "input"
    if _is_model_error(err) and not isinstance(err, CamlensError):
        return "model"
    return None


def _failed_image(errors: list, path: Path, err: BaseException, m: Any = None, crop: Optional[bool] = False,
                  step: Optional[str] = None) -> None:
    """Report ``err``, raised for the input ``path``, if it is a per-file error (:func:`_per_file`):
    one line, recorded in ``errors``; the run goes on. Anything else is raised: a usage error ends
    the run (one line, exit 2: see ``command``), a bug with its traceback.

    The line says what happened: ``out of memory on this image``, the model failed on it (with a
    hint from the model ``m``'s input size and ``crop``; ``crop=None`` for a command without
    ``--crop``), or just the error for its values; with
    ``step`` (e.g. ``"gradcam: evaluation"``), ``STEP failed on this image``."""
    kind = _per_file(err)
    if kind is None:
        raise err
    prefix, suffix = "", ""
    if step is not None:
        prefix = f"{step} failed on this image: "
    elif kind == "memory":
        prefix = "out of memory on this image: "
    elif kind == "model":
        prefix, suffix = "the model failed on this image: ", _hint(m, crop)
    _file_error(errors, path, err, prefix=prefix, suffix=suffix)


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
    """``str(err)``, without the quotes a KeyError puts around its message."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


# where a framework calls a model's layers: an error raised below one of these is the model's own
_MODEL_CALLS = ("torch/nn/modules/module.py", "keras/src/layers/layer.py", "keras/src/ops/operation.py")


def _is_model_error(err: BaseException) -> bool:
    """Whether ``err`` was raised inside the model's own forward (a module camlens called), not by
    camlens (layer names, targets, options): the innermost camlens frame of the traceback calls
    into ``torch.nn.Module.__call__`` (or a Keras layer's ``__call__``) and the error comes from there. Followed through ``raise ...
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
        if any(f.replace("\\", "/").endswith(_MODEL_CALLS) for f in frames[inner + 1:]):
            return True
        err = err.__cause__
    return False


def _is_oom(err: BaseException) -> bool:
    """Out of memory: a MemoryError, a loaded backend's (torch.OutOfMemoryError), or says so."""
    from camlens.backends.base import is_out_of_memory

    return isinstance(err, MemoryError) or is_out_of_memory(err) or "out of memory" in str(err).lower()


def _hint(m: Any, crop: Optional[bool]) -> str:
    """What to try when the model failed on an image: its input size (and ``--crop`` where the
    command has it: ``crop`` False; ``None``: it has none)."""
    size = getattr(m, "input_size", None)
    if not size:
        return ""
    if crop is False:
        return f" (hint: the model may need {size}x{size} inputs: try --crop)"
    return f" (the model's input is {size}x{size})"
