"""``import camlens`` and ``camlens --help`` work without PyTorch (the ``[torch]`` extra); a command
that needs it says which extra to install instead of a traceback.

The torch-free cases run in a subprocess (``sys.executable``, ``PYTHONPATH`` = this checkout's src)
whose ``-c`` prelude puts a ``sys.meta_path`` finder first that makes ``import torch`` (and
torchvision, timm, tensorflow, keras) raise ``ModuleNotFoundError``, as on a machine without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BLOCKED = ("torch", "torchvision", "timm", "tensorflow", "keras")

PRELUDE = f"""\
import sys

class _NoFrameworks:
    \"\"\"A finder that reports the deep-learning frameworks as not installed.\"\"\"
    blocked = {BLOCKED!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NoFrameworks())
"""

# an expression, in the subprocess, for the framework modules it has imported
LOADED = f"sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})"

# `camlens ARGS` as the console script runs it (pyproject: camlens = "camlens.fronts.cli:app")
CLI = "import sys\nfrom camlens.fronts.cli import app\napp(sys.argv[1:], prog_name='camlens')\n"


def _python(code: str, *args: str, block: bool = True, cwd: Path = ROOT,
            timeout: float = 120) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-c", (PRELUDE if block else "") + code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, (f"exit code {res.returncode}\n--- stdout ---\n{res.stdout}"
                                 f"\n--- stderr ---\n{res.stderr}")
    return res.stdout


def test_the_prelude_really_hides_torch():
    res = _python("import torch\n")
    assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, res.stderr


def test_import_camlens_without_torch():
    out = _ok(_python(
        "import json, sys\n"
        "import camlens, camlens.errors\n"
        "assert camlens.__version__\n"
        "assert issubclass(camlens.errors.CamlensError, Exception)\n"
        "assert camlens.CamlensError is camlens.errors.CamlensError\n"
        "assert set(camlens.__all__) <= set(dir(camlens))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(BLOCKED) + ")))\n"))
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_the_framework_free_api_resolves_without_torch_and_models_names_the_extra():
    """Everything but the model loaders is framework-free (issue 11): it resolves without torch and
    imports no framework; ``camlens.models.load`` of a torch model names the extra; a model no
    backend takes is a clear ConfigTypeError (also a TypeError) listing the backends."""
    out = _ok(_python(
        "import json, sys\n"
        "import numpy as np\n"
        "import camlens\n"
        "from camlens.errors import ConfigTypeError, MissingDependencyError\n"
        "ok = [n for n in camlens.__all__ if n != 'models' and getattr(camlens, n) is not None]\n"
        "try:\n"
        "    camlens.models.load('efficientnet-lite0')  # (camlens.models itself imports: keras: models need no torch)\n"
        "except MissingDependencyError as err:\n"
        "    assert isinstance(err, ImportError)\n"
        "    models = str(err)\n"
        "try:\n"
        "    camlens.explain(object(), np.zeros((1, 3, 8, 8), np.float32))\n"
        "except ConfigTypeError as err:\n"
        "    assert isinstance(err, TypeError)\n"
        "    bad = str(err)\n"
        "methods = sorted(camlens.available_methods())\n"
        "print(json.dumps({'ok': ok, 'models': models, 'bad': bad, 'methods': methods, 'frameworks': "
        + LOADED + "}))\n"))
    got = json.loads(out.strip().splitlines()[-1])
    assert set(got["ok"]) == set(__import__("camlens").__all__) - {"models"}
    assert "camlens[torch]" in got["models"]
    assert "no camlens backend takes it" in got["bad"] and "torch" in got["bad"]
    assert {"gradcam", "cam", "scorecam", "occlusion"} <= set(got["methods"])
    assert got["frameworks"] == []


def test_cli_help_without_torch():
    out = _ok(_python(
        "import json, sys\n"
        "import typer\n"
        "from typer.testing import CliRunner\n"
        "from camlens.fronts.cli import app\n"
        "names = sorted(typer.main.get_command(app).commands)\n"
        "runs = {name: CliRunner().invoke(app, ([name] if name else []) + ['--help'], prog_name='camlens')\n"
        "        for name in [''] + names}\n"
        "print(json.dumps({'commands': names, 'frameworks': " + LOADED + ",\n"
        "                  'runs': {k: [r.exit_code, r.output, repr(r.exception)] for k, r in runs.items()}}))\n"))
    got = json.loads(out.strip().splitlines()[-1])
    assert {"explain", "evaluate", "localize", "report", "demo", "methods", "metrics", "models"} <= set(got["commands"])
    for name, (code, output, exc) in got["runs"].items():
        assert code == 0, f"camlens {name} --help: exit code {code}, {exc}\n{output}"
        assert "Usage: camlens" in output, output
        assert "Traceback" not in output
    assert got["frameworks"] == []


def test_cli_console_script_help_without_torch():
    for args in (["--help"], ["explain", "--help"]):
        out = _ok(_python(CLI, *args))
        assert "Usage: camlens" in out, out


@pytest.mark.parametrize("args", [["methods"], ["metrics"]])
def test_listing_commands_work_without_torch(args, tmp_path):
    res = _python(CLI, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("gradcam" if args == ["methods"] else "deletion") in res.stdout


@pytest.mark.parametrize("args", [["explain", "some.png"], ["models"],
                                  ["evaluate", "--shapes", "2"], ["localize", "some.png"], ["report", "some.png"],
                                  ["demo", "--out", "demo_out"]])
def test_cli_command_without_torch_names_the_extra(args, tmp_path):
    res = _python(CLI, *args, cwd=tmp_path)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text
    assert "camlens[torch]" in text, text
    assert "Traceback" not in text and "ModuleNotFoundError" not in text, text
    assert not list(tmp_path.iterdir()), "a command that cannot run wrote files"


# ---------------------------------------------------------------------------------------------
# with torch: the lazy package exposes exactly the objects it used to
# ---------------------------------------------------------------------------------------------
def test_every_public_name_resolves():
    import camlens

    assert set(camlens.__all__) <= set(dir(camlens))
    for name in camlens.__all__:
        assert getattr(camlens, name) is not None, name
    with pytest.raises(AttributeError):
        camlens.no_such_name  # noqa: B018


def test_public_names_are_the_submodules_objects():
    import importlib

    import camlens
    from camlens import errors

    def mod(name: str) -> types.ModuleType:
        return importlib.import_module(f"camlens.{name}")

    assert camlens.explain is mod("api").explain
    assert camlens.stream is mod("stream").stream and camlens.Failure is mod("stream").Failure
    assert camlens.load is mod("explanation").load and camlens.Explanation is mod("explanation").Explanation
    assert camlens.evaluate is mod("evaluate").evaluate and camlens.Scores is mod("evaluate").Scores
    assert camlens.agreement is mod("compare").agreement and camlens.Agreement is mod("compare").Agreement
    assert camlens.Target is mod("targets").Target
    assert camlens.available_methods is mod("methods").available_methods
    assert camlens.CamlensError is errors.CamlensError and camlens.errors is errors
    for name in ("methods", "metrics", "postprocess", "models", "viz", "localize"):
        assert getattr(camlens, name) is mod(name), name
    # the functions, not the submodules of the same name
    assert isinstance(camlens.evaluate, types.FunctionType) and isinstance(camlens.stream, types.FunctionType)
    assert isinstance(camlens.__version__, str)


def test_functions_win_over_their_submodules_whatever_the_import_order():
    """``camlens.evaluate`` / ``camlens.stream`` stay the functions even when the submodules of the
    same name are first imported directly (the import system then binds them on the package)."""
    out = _ok(_python(
        "import sys, types\n"
        "import camlens\n"
        "assert 'torch' not in sys.modules\n"
        "import camlens.evaluate, camlens.stream\n"
        "from camlens.evaluate import Scores\n"
        "from camlens import evaluate, stream\n"
        "for f in (camlens.evaluate, camlens.stream, evaluate, stream):\n"
        "    assert isinstance(f, types.FunctionType), f\n"
        "assert camlens.evaluate is sys.modules['camlens.evaluate'].evaluate\n"
        "assert camlens.stream is sys.modules['camlens.stream'].stream\n"
        "assert camlens.Scores is Scores\n"
        "print('ok')\n", block=False))
    assert out.strip().endswith("ok")
