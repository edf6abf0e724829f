"""camlens.errors: every error camlens raises on purpose is a CamlensError of one kind, and also the
built-in type it replaced (user code that caught ValueError / KeyError / ... keeps working); the CLI
turns them into one line and exit code 2 in one place, and lets a bug's traceback through."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import camlens
from camlens import errors as E

SRC = Path(camlens.__file__).resolve().parent


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class MaxNet(Net):
    """Global max pooling: CAM needs GAP + Linear."""

    def forward(self, x):
        return self.fc(self.body(x).amax((2, 3)))


def _x(b=2):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind, builtin", [
    (E.ConfigError, ValueError), (E.ConfigTypeError, TypeError), (E.MissingFileError, FileNotFoundError),
    (E.ModelError, ValueError), (E.ModelTypeError, TypeError), (E.ModelRuntimeError, RuntimeError),
    (E.NonFiniteScoresError, FloatingPointError), (E.LayerError, ValueError), (E.LayerNotFoundError, KeyError),
    (E.LayerTypeError, TypeError), (E.LayerRuntimeError, RuntimeError), (E.TargetError, ValueError),
    (E.TargetTypeError, TypeError), (E.TargetIndexError, IndexError), (E.TargetKeyError, KeyError),
    (E.InputError, ValueError), (E.InputTypeError, TypeError), (E.InputFileNotFoundError, FileNotFoundError),
    (E.MissingDependencyError, ImportError),
])
def test_every_kind_is_a_camlens_error_and_its_builtin(kind, builtin):
    err = kind("what was seen; what to do")
    assert isinstance(err, E.CamlensError) and isinstance(err, builtin)
    assert str(err) == "what was seen; what to do"  # no KeyError-style quoting
    assert kind.__name__ in E.__all__


def test_real_errors_have_their_kind(tmp_path):
    net, x = Net().eval(), _x()
    cases = [
        (E.LayerNotFoundError, lambda: camlens.explain(net, x, targets=1, layer="bodyy")),
        (E.LayerError, lambda: camlens.explain(net, x, targets=1, layer="fc")),  # a vector, not a map
        (E.TargetIndexError, lambda: camlens.explain(net, x, targets=50, layer="body")),
        (E.TargetError, lambda: camlens.explain(net, x, targets="tabby", layer="body")),
        (E.TargetTypeError, lambda: camlens.explain(net, x, targets=True, layer="body")),
        (E.InputError, lambda: camlens.explain(net, x * float("nan"), targets=1, layer="body")),
        (E.InputTypeError, lambda: camlens.explain(net, (x * 255).to(torch.uint8), targets=1, layer="body")),
        (E.ConfigTypeError, lambda: camlens.explain(net, x, targets=1, layer="body", nope=3)),
        (E.ConfigError, lambda: camlens.explain(net, x, targets=1, layer="body", method="gradcamm")),
        (E.ConfigError, lambda: camlens.explain(net, x, targets=1, layer="body", precision="fp8")),
        (E.ConfigError, lambda: camlens.models.load("resnet-9000")),
        (E.MissingFileError, lambda: camlens.models.load("torchvision:resnet18", weights=tmp_path / "no.pth")),
        (E.InputFileNotFoundError, lambda: camlens.io.load_image(tmp_path / "no.jpg")),
        (E.ConfigError, lambda: camlens.metrics.get_metric("delet")),
        (E.ModelError, lambda: camlens.explain(MaxNet().eval(), x, targets=1, layer="body", method="cam")),
    ]
    for kind, call in cases:
        with pytest.raises(kind):
            call()


# raises of built-in types that are not user errors: internal invariants and programming errors
ALLOWED_BUILTIN = {
    ("__init__.py", "AttributeError"),  # module __getattr__
    ("models/__init__.py", "AttributeError"),  # the same (lazy torch-side names)
    ("methods/base.py", "NotImplementedError"),  # a Method without compute()
    ("engine/passes.py", "RuntimeError"),  # a method returned no / wrong maps: a bug in the method
    ("methods/guided.py", "RuntimeError"),  # the same
    ("viz/composite.py", "IndexError"),
    ("datasets/shapes.py", "RuntimeError"),
}
BUILTINS = {n for n in dir(__builtins__ if isinstance(__builtins__, dict) else __builtins__)} | {
    n for n in dir(__import__("builtins")) if n.endswith(("Error", "Exception"))}


def test_camlens_raises_camlens_errors():
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).as_posix()
        if rel == "cli.py" or rel.startswith("fronts/cli/"):  # typer's own BadParameter / Exit
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name = node.exc.func.id
                if name.endswith(("Error", "Exception")) and name in dir(__import__("builtins")) \
                        and (rel, name) not in ALLOWED_BUILTIN:
                    bad.append(f"{rel}:{node.lineno} raise {name}(...)")
    assert not bad, "raise a camlens.errors kind instead (it also subclasses the built-in): " + "; ".join(bad)


def test_cli_turns_camlens_errors_into_one_line_and_lets_bugs_through(tmp_path, monkeypatch):
    from PIL import Image

    from camlens.fronts.cli import app

    img = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(img)
    res = CliRunner().invoke(app, ["explain", str(img), "--model", "shapes-2head", "--layer", "featurez",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert any("no layer named 'featurez'" in ln and ln.startswith("error:") for ln in lines), res.output
    assert "Traceback" not in res.output

    def boom(*a, **k):
        raise ZeroDivisionError("a bug, not a usage error")

    monkeypatch.setattr(camlens, "explain", boom)
    monkeypatch.setattr(camlens.api, "explain", boom)  # what camlens.stream (the CLI's loop) calls
    res = CliRunner().invoke(app, ["explain", str(img), "--model", "shapes-2head", "--out", str(tmp_path / "p")])
    assert isinstance(res.exception, ZeroDivisionError)  # not disguised as a one-line usage error
