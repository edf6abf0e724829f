"""Every third-party module that camlens' own code imports is a declared dependency: a runtime one
in ``[project] dependencies``, or (for the demo photos only) the ``demo`` extra."""

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"skimage": "demo"}  # imported lazily, with an error that names the extra


def _imported_top_modules() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in sorted((ROOT / "src" / "camlens").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], []).append(f.relative_to(ROOT).as_posix())
    return found


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(spec: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0]) for s in spec}


def test_every_imported_third_party_module_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _declared(meta["dependencies"])
    extras = {k: _declared(v) for k, v in meta["optional-dependencies"].items()}
    dists = md.packages_distributions()
    missing = []
    for mod, files in _imported_top_modules().items():
        if mod in sys.stdlib_module_names or mod in ("camlens", "__future__"):
            continue
        owners = {_norm(d) for d in dists.get(mod, [])}
        assert owners, f"{mod} (imported in {files[0]}) is not installed: cannot tell its distribution"
        where = extras.get(OPTIONAL[mod], set()) if mod in OPTIONAL else runtime
        if not owners & where:
            missing.append(f"{mod} (from {sorted(owners)}; imported in {sorted(set(files))[:3]})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)
    # the demo extra really is optional: the demo says which extra to install
    assert "camlens[demo]" in (ROOT / "src" / "camlens" / "demo.py").read_text()
