"""Every command the README shows runs to the end on real photos.

README.md is parsed when the tests are collected: each ```bash block's ``camlens ...`` line is one
case (a trailing ``# comment`` is dropped), each ```python block is one case. A command added to
the README therefore becomes a case by itself; a README command that crashes fails its case.

* ``make ...`` lines are the set-up itself (they create the venv this test runs in): they are not
  run, but ``test_readme_setup_lines`` checks they are there and name Makefile targets. Any other
  line in a bash block fails ``test_readme_bash_lines_are_known`` (so nothing is silently skipped).
* CLI cases run in-process (``typer.testing.CliRunner`` on ``camlens.fronts.cli.base``) in a fresh folder
  holding real photos under the names the README uses (``PHOTOS``) and the files it refers to that
  cannot exist elsewhere (``resnet50.pth``: a seeded random resnet50 state dict; ``my_model.py``:
  ``MY_MODEL``). Globs (``photos/*.jpg``) are expanded here, as a shell would.
* ``FAST`` rewrites a few commands that would take minutes on 2 CPU cores into cheaper runs of the
  same code path (fewer deletion steps, fewer Score-CAM channels...). Each rewrite must still apply
  to some README line (``test_fast_substitutions_still_apply``).
* Python blocks run with ``exec`` (tracebacks show README.md line numbers). A block that uses names
  it does not define gets them from the earlier block(s) defining them; a block saying "after the
  first Python example" runs after that block; ``SETUP_NAMES`` (see ``_setup_namespace``) supplies
  the generic ``model`` / ``x`` / ``masks`` of the multi-output and metrics examples.
"""

from __future__ import annotations

import ast
import builtins
import glob
import json
import os
import re
import runpy
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from camlens.fronts.cli import app

skimage_data = pytest.importorskip("skimage.data")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# ----------------------------------------------------------------------------------------------
# the files the README's commands name: real photos (scikit-image) and stand-ins for user files
# ----------------------------------------------------------------------------------------------
PHOTOS = {  # README file name -> (skimage.data photo, size (w, h) or None = as shipped)
    "cat.jpg": ("chelsea", None),          # 451 x 300 -> model input 224 x 336
    "coffee.jpg": ("coffee", None),        # 600 x 400 -> 224 x 336
    "dog.png": ("astronaut", None),        # 512 x 512 -> 224 x 224
    "x.png": ("astronaut", None),
    # photos/*.jpg: two photos of different sizes (different model-input sizes and curve lengths)
    "photos/cat.jpg": ("chelsea", None),             # -> 224 x 336
    "photos/astronaut.jpg": ("astronaut", (300, 300)),  # -> 224 x 224
}

# `--model my_model.py:build`: a user's factory file. A small two-head CNN (seeded random weights)
# whose dict output has heads "species" (5 classes) and "colour" (3), enough for
# `--target species:3 --target colour:1`; CATEGORIES names them (used by the Python set-up).
MY_MODEL = '''\
"""A user's two-head model for `camlens explain --model my_model.py:build` (written by the test)."""
import torch
from torch import nn

SPECIES = ["tabby", "tiger cat", "Persian", "Siamese", "Egyptian cat"]
COLOURS = ["red", "green", "blue"]
CATEGORIES = {"species": SPECIES, "colour": COLOURS}


class SpeciesColourNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        )
        self.species = nn.Linear(32, len(SPECIES))
        self.colour = nn.Linear(32, len(COLOURS))

    def forward(self, x):
        p = self.features(x).mean((2, 3))
        return {"species": self.species(p), "colour": self.colour(p)}


def build():
    torch.manual_seed(0)
    return SpeciesColourNet().eval()
'''

# ----------------------------------------------------------------------------------------------
# fast substitutions: README text (a regex on the `camlens ...` line) -> what this test runs.
# Same command, same code path, less work on a 2-core CPU. Each entry must still match a line.
# ----------------------------------------------------------------------------------------------
FAST: Dict[str, Tuple[str, str]] = {
    # 4 generated shapes images instead of 50: each image is evaluated on its own, the same way
    # (50 take 7 s on an idle 2-core box, over a minute on a busy one)
    r"--shapes 50\b": ("--shapes 4", "4 images instead of 50"),
    # evaluate on photos (224 x 336 model inputs): Score-CAM on 8 of EfficientNet's 1280 bn2
    # channels (Faster Score-CAM: the same masked-forward code), deletion with 10x fewer steps
    # (the README's own example), ROAD at 3 removal shares instead of 9. Together 160 s -> 19 s.
    r"^(camlens evaluate (?=.*--method scorecam).*)$": (r"\1 --option scorecam.max_channels=8",
                                                        "Score-CAM on 8 channels"),
    r"^(camlens evaluate (?!--shapes)(?=.*--metric deletion).*)$": (r"\1 --option deletion.step=2240",
                                                                    "10x fewer deletion steps"),
    r"^(camlens evaluate (?=.*--metric road\b).*)$": (r"\1 --option road.percentages=[0.2,0.5,0.8]",
                                                      "ROAD at p = 0.2, 0.5, 0.8"),
    # explain --method all: every method still runs; Score-CAM on 8 channels, Ablation-CAM on 5 %
    # of the channels, occlusion with 56 px patches (24 windows instead of 294). 68 s -> 6 s.
    r"(--method all\b.*)$": (r"\1 --option max_channels=8 --option ratio=0.05 --option patch=56",
                             "Score-CAM 8 channels, Ablation-CAM ratio 0.05, occlusion patch 56"),
    # activation maximisation: the same optimisation, 2 steps on 64 px (128 steps at 224 px: minutes)
    r"^(camlens visualize .*)$": (r"\1 --steps 2 --size 64", "2 steps at 64 px"),
}

# The same for Python blocks: camlens.visualize with 2 steps at 64 px
PY_FAST: Dict[str, Tuple[str, str]] = {
    r"\bsteps=\d+": ("steps=2", "2 optimisation steps"),
    r"\bsize=\d+": ("size=64", "64 px images"),
}

# cases marked slow (over ~5 s on 2 cores, even with FAST); they still run in CI
SLOW = [r"--method all\b", r"^camlens evaluate (?!--shapes)"]

# The names the README's Python blocks use without defining them, with no earlier block defining
# them either (`model`, `x` of "Multi-output models"; `masks` of the metrics example); see
# _setup_namespace. They take precedence over earlier blocks' names of the same spelling.
SETUP_NAMES = ("camlens", "model", "x", "masks")


# ----------------------------------------------------------------------------------------------
# parsing README.md
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # README line of the block's first code line
    heading: str


def _readme_blocks() -> List[Block]:
    blocks, heading, lang, start, buf = [], "", None, 0, []
    for n, raw in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if lang is None:
            if re.match(r"#{1,6} ", raw):
                heading = raw.lstrip("#").strip()
            m = re.match(r"^```(\w+)\s*$", raw)
            if m:
                lang, start, buf = m.group(1).lower(), n + 1, []
            elif raw.startswith("```"):  # an unlabelled block (e.g. the layout tree)
                lang, start, buf = "", n + 1, []
        elif raw.startswith("```"):
            blocks.append(Block(lang, "\n".join(buf) + "\n", start, heading))
            lang = None
        else:
            buf.append(raw)
    assert lang is None, "README.md has an unclosed ``` block"
    return blocks


def _bash_lines() -> List[Tuple[int, str]]:
    """(README line, command without its trailing # comment) of every non-empty bash line."""
    out = []
    for b in _readme_blocks():
        if b.lang not in ("bash", "sh", "shell", "console"):
            continue
        for i, raw in enumerate(b.code.splitlines()):
            words = shlex.split(raw, comments=True)
            if words:
                out.append((b.line + i, " ".join(w if re.fullmatch(r"[\w@%+=:,./*?\[\]-]+", w) else shlex.quote(w)
                                                  for w in words)))
    return out


def _cli_cases() -> List[Tuple[int, str]]:
    return [(n, c) for n, c in _bash_lines() if c.split()[0] == "camlens"]


def _python_blocks() -> List[Block]:
    return [b for b in _readme_blocks() if b.lang == "python"]


def _case_id_cli(line: int, cmd: str) -> str:
    return cmd


def _case_id_py(i: int, b: Block) -> str:
    return f"python#{i + 1} L{b.line} {b.heading}"


def _marks(cmd: str) -> list:
    return [pytest.mark.slow] if any(re.search(p, cmd) for p in SLOW) else []


def _fast(cmd: str) -> str:
    for pattern, (repl, _why) in FAST.items():
        cmd = re.sub(pattern, repl, cmd)
    return cmd


CLI_CASES = _cli_cases()
PY_BLOCKS = _python_blocks()


def test_readme_has_commands():
    assert len(CLI_CASES) >= 5, CLI_CASES
    assert len(PY_BLOCKS) >= 2


def test_readme_setup_lines():
    """`make demo` / `make test` are the README's set-up: not run here (they built this venv), but
    they must be there and name real Makefile targets."""
    makes = [c for _, c in _bash_lines() if c.split()[0] == "make"]
    targets = {c.split()[1] for c in makes}
    assert {"demo", "test"} <= targets, makes
    makefile = (ROOT / "Makefile").read_text()
    for t in targets:
        assert re.search(rf"^{re.escape(t)}:", makefile, re.M), f"`make {t}`: no such Makefile target"


def test_readme_bash_lines_are_known():
    """Every bash line is a `camlens` command (a case) or a `make` set-up line: nothing is skipped."""
    other = [(n, c) for n, c in _bash_lines() if c.split()[0] not in ("camlens", "make")]
    assert not other, f"README bash lines this test does not run: {other}"


def test_fast_substitutions_still_apply():
    """Each FAST rewrite matches a README command (else it is stale and that command runs in full)."""
    for pattern in FAST:
        assert any(re.search(pattern, c) for _, c in CLI_CASES), f"FAST pattern {pattern!r} matches no README line"
    for pattern in PY_FAST:
        assert any(re.search(pattern, b.code) for b in PY_BLOCKS), f"PY_FAST pattern {pattern!r} matches no block"


# ----------------------------------------------------------------------------------------------
# the folder the commands run in
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme_assets")
    for name, (photo, size) in PHOTOS.items():
        img = Image.fromarray(getattr(skimage_data, photo)()).convert("RGB")
        if size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(d / name)
    (d / "my_model.py").write_text(MY_MODEL)
    _write_clip(d / "clip.mp4", np.asarray(Image.fromarray(skimage_data.chelsea()).resize((160, 112))))
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    torch.save(tv.models.resnet50().state_dict(), d / "resnet50.pth")
    return d


def _write_clip(path: Path, photo: np.ndarray, frames: int = 12) -> None:
    """``clip.mp4`` for `camlens video`: the photo panning right, 2 px a frame (12 frames, 10 fps);
    nothing is written without PyAV (the video cases then fail naming the missing file)."""
    try:
        import av
    except ImportError:
        return
    h, w = photo.shape[0], photo.shape[1] - 2 * frames
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        for i in range(frames):
            f = np.ascontiguousarray(photo[:, 2 * i:2 * i + w])
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture
def workdir(assets, tmp_path, monkeypatch) -> Path:
    """A fresh folder per case holding (links to) every asset; the case runs with it as cwd."""
    for src in assets.rglob("*"):
        if src.is_file():
            dst = tmp_path / src.relative_to(assets)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(src, dst)
            except OSError:  # pragma: no cover - no symlinks here
                dst.write_bytes(src.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------------
# CLI cases
# ----------------------------------------------------------------------------------------------
_FILEISH = re.compile(r"\.(jpe?g|png|bmp|gif|tiff?|webp|pth|pt|py|mp4)(:\w+)?$", re.I)


def _params(sub: str) -> Dict[str, object]:
    """{'--out': default, ...}: each option's declared default, read from the Typer app."""
    cmd = typer.main.get_command(app).commands[sub]  # type: ignore[attr-defined]
    return {opt: p.default for p in cmd.params for opt in p.opts}


def _option(words: List[str], *names: str) -> Optional[str]:
    for i, w in enumerate(words):
        for n in names:
            if w == n and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(n + "="):
                return w.split("=", 1)[1]
    return None


def _expand_globs(words: List[str]) -> List[str]:
    out = []
    for w in words:
        if any(ch in w for ch in "*?"):
            hits = sorted(glob.glob(w))
            assert hits, f"the README's {w!r} matches no file: add photos for it to PHOTOS"
            out.extend(hits)
        else:
            out.append(w)
    return out


def _check_inputs_exist(words: List[str]) -> None:
    """The files a command reads (positional images, --weights, --model FILE.py:factory) are here."""
    outs = {i + 1 for i, w in enumerate(words) if w in ("--out", "-o")}
    for i, w in enumerate(words):
        if i in outs or w.startswith("-") or not _FILEISH.search(w):
            continue
        path = w.rsplit(":", 1)[0] if w.rsplit(":", 1)[0].endswith(".py") else w
        assert Path(path).is_file(), f"the README's command reads {path!r}: add it to PHOTOS (or the assets fixture)"


def _run_cli(words: List[str]):
    res = CliRunner().invoke(app, words)
    if res.exit_code != 0:
        tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info and \
            not isinstance(res.exception, SystemExit) else ""
        pytest.fail(f"camlens {shlex.join(words)} -> exit code {res.exit_code}\n--- output ---\n{res.output}"
                    f"\n--- traceback ---\n{tb}", pytrace=False)
    return res


def _check_summary(folder: Path, kind: str) -> dict:
    path = folder / "summary.json"
    assert path.is_file(), f"{kind} wrote no {path}"
    summary = json.loads(path.read_text())
    assert not summary.get("errors"), summary.get("errors")
    for files in summary.get("files", {}).values():
        for f in files:
            assert (folder / f).is_file(), f"summary.json lists {f}, which is missing"
    return summary


def _check_outputs(sub: str, words: List[str], output: str) -> None:
    """The files the README says each command writes are there."""
    if sub not in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        return
    params = _params(sub)
    out = _option(words, "--out", "-o")
    out = Path(out if out is not None else str(params.get("--out", ""))) if "--out" in params else None
    if sub == "explain":
        summary = _check_summary(out, "explain")
        assert summary["images"], summary
        for img in summary["images"]:
            if _option(words, "--method") == "all":
                import camlens

                assert (out / img["methods_grid"]).is_file(), img
                # every method ran, or was skipped with its reason (CAM needs a GAP + Linear head)
                assert set(img["methods"]) | set(img["skipped"]) == set(camlens.available_methods()), img
                assert len(img["methods"]) > len(img["skipped"]), img
            else:
                assert (out / img["grid"]).is_file() and (out / img["maps"]).is_file(), img
                maps = np.load(out / img["maps"])
                assert maps.ndim == 3 and maps.shape[0] == len(img["targets"]) and np.isfinite(maps).all()
    elif sub == "localize":
        summary = _check_summary(out, "localize")
        assert summary["images"], summary
        for img in summary["images"]:
            for t in img["targets"]:
                assert len(t["box"]) == 4 and (out / t["mask"]).is_file()
                if "--cutout" in words:
                    assert (out / t["cutout"]).is_file(), t
    elif sub == "report":
        text = out.read_text(encoding="utf-8")
        assert "<html" in text.lower() and len(text) > 10_000, out
    elif sub == "evaluate":
        for name in ("results.csv", "results.json", "curves.png"):
            assert (out / name).is_file(), f"evaluate wrote no {out / name}"
        rows = json.loads((out / "results.json").read_text())
        assert rows and all(r["n"] > 0 for r in rows), rows
    elif sub == "demo":
        summary = json.loads((out / "summary.json").read_text())
        assert (out / summary["grid"]).is_file()
        assert (out / summary["shapes"]["composite"]).is_file() and (out / summary["shapes"]["report"]).is_file()
    elif sub == "video":  # as many frames as the clip, of its size
        import av

        src = next(w for w in words[1:] if w.endswith(".mp4") and w != str(out))
        with av.open(src) as a, av.open(str(out)) as b:
            ra, rb = a.streams.video[0], b.streams.video[0]
            assert (rb.width, rb.height, rb.average_rate) == (ra.width, ra.height, ra.average_rate)
            assert sum(1 for _ in b.decode(rb)) == sum(1 for _ in a.decode(ra)) > 0
    elif sub == "methods":
        import camlens

        for name in camlens.available_methods():
            assert name in output, f"`camlens methods` does not list {name}"
    elif sub == "models":
        assert "efficientnet-lite0" in output and "shapes-2head" in output, output


@pytest.mark.parametrize("line,cmd", [pytest.param(n, c, id=_case_id_cli(n, c), marks=_marks(c))
                                      for n, c in CLI_CASES])
def test_readme_cli_command(line, cmd, workdir):
    words = _expand_globs(shlex.split(_fast(cmd)))
    assert words[0] == "camlens"
    words = words[1:]
    _check_inputs_exist(words)
    res = _run_cli(words)
    _check_outputs(words[0], words, res.output)


# ----------------------------------------------------------------------------------------------
# Python cases
# ----------------------------------------------------------------------------------------------
def _defined_and_free(code: str) -> Tuple[set, set]:
    """Names a block defines, and names it reads without defining them first (nor builtins)."""
    tree = ast.parse(code)
    defined: set = set()
    free: set = set()
    for stmt in tree.body:  # statement by statement, so `x = f(x)` reads the earlier x
        reads, writes, local = set(), set(), set()
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                (reads if isinstance(node.ctx, ast.Load) else writes).add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                writes.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                writes.add(node.name)
            elif isinstance(node, ast.arg):  # a function's parameter: read inside it, not defined by the block
                local.add(node.arg)
        free |= {n for n in reads - defined if not hasattr(builtins, n)} - writes - local
        defined |= writes - (local if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else set())
    return defined, free


_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5}


def _plan(i: int) -> Tuple[bool, List[int]]:
    """(whether block i needs the set-up namespace, the earlier blocks to run before it, in order)."""
    code = PY_BLOCKS[i].code
    m = re.search(r"after the (\w+) python example", code, re.I)
    if m:  # "# after the first Python example": run in that example's namespace
        j = _ORDINALS.get(m.group(1).lower(), None)
        assert j is not None and j - 1 < i, f"README block {i + 1}: cannot resolve {m.group(0)!r}"
        setup, deps = _plan(j - 1)
        return setup, deps + [j - 1]
    _, free = _defined_and_free(code)
    setup = bool(free & set(SETUP_NAMES))
    deps: set = set()
    for name in sorted(free - set(SETUP_NAMES)):
        definers = [j for j in range(i) if name in _defined_and_free(PY_BLOCKS[j].code)[0]]
        assert definers, (f"README Python block {i + 1} (line {PY_BLOCKS[i].line}) uses {name!r}, which no earlier "
                          f"block defines: add it to SETUP_NAMES / _setup_namespace")
        s, d = _plan(definers[-1])
        setup |= s
        deps |= set(d) | {definers[-1]}
    return setup, sorted(deps)


def _setup_namespace() -> dict:
    """The generic names of the multi-output and metrics examples (SETUP_NAMES), run from the case
    folder:

    * ``model``: ``camlens.models.load("my_model.py:build")``, the same user factory file as the CLI's
      ``--model my_model.py:build`` (a two-head CNN, dict output ``{"species": 5 classes incl. "tabby",
      "colour": red / green / blue}``), given its class names per head (``categories``) so that
      ``"species:tabby"`` resolves;
    * ``x``: ``camlens.datasets.shapes.make_shapes(2, seed=0).images``, a (2, 3, 64, 64) float batch;
    * ``masks``: that batch's grey-object masks ``(2, 64, 64)`` bool (for ``pointing_game``).
    """
    import camlens
    from camlens.datasets.shapes import make_shapes

    model = camlens.models.load("my_model.py:build")
    model.categories = runpy.run_path("my_model.py")["CATEGORIES"]
    data = make_shapes(2, seed=0)
    return {"camlens": camlens, "model": model, "x": data.images, "masks": data.masks["shape"]}


def _exec_block(j: int, ns: dict) -> None:
    b = PY_BLOCKS[j]
    text = b.code
    for pattern, (repl, _why) in PY_FAST.items():
        text = re.sub(pattern, repl, text)
    code = compile("\n" * (b.line - 1) + text, str(README), "exec")  # README.md line numbers in tracebacks
    exec(code, ns)


@pytest.mark.parametrize("i", [pytest.param(i, id=_case_id_py(i, b)) for i, b in enumerate(PY_BLOCKS)])
def test_readme_python_block(i, workdir, capsys):
    setup, deps = _plan(i)
    ns: dict = {"__name__": "__readme__"}
    if setup:
        ns.update(_setup_namespace())
    for j in deps + [i]:
        try:
            _exec_block(j, ns)
        except Exception:
            tb = traceback.format_exc()
            pytest.fail(f"README Python block {j + 1} (README.md line {PY_BLOCKS[j].line}, "
                        f"'{PY_BLOCKS[j].heading}') raised"
                        + (f", run before block {i + 1}" if j != i else "") + f":\n{tb}", pytrace=False)
    defined, _ = _defined_and_free(PY_BLOCKS[i].code)
    missing = [n for n in defined if n not in ns]
    assert not missing, missing
