"""The package layout shows the data path, and imports go one way (issue 11, item 8).

Layers, bottom to top: ``core`` (types, targets, registry, errors, map maths) and ``backends`` (the
only code that knows a framework) · ``io``, ``datasets`` · ``methods``, ``metrics``, ``models`` ·
``engine`` (the pass, its wrappers, explain / stream / evaluate) · ``viz`` (pictures of maps) ·
``analysis`` (what is done with maps: agreement, boxes and masks, which it can draw) · ``fronts``
(command line, report, demo). A module imports camlens modules of
its own layer or below, never above; the old flat module paths still import (the same objects).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import camlens

SRC = Path(camlens.__file__).parent
LAYER = {"core": 0, "backends": 0, "io": 1, "datasets": 1, "methods": 2, "metrics": 2, "models": 2,
         "engine": 3, "viz": 4, "analysis": 5, "fronts": 6}
# what a bottom-layer package may take from its neighbour: core uses the backend contract only
# (backends/base.py), backends use core's errors only
NEIGHBOURS = {("core", "backends"): {"camlens.backends.base"}, ("backends", "core"): {"camlens.core.errors"}}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The camlens modules ``name`` imports (module level and inside functions), absolute."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("camlens"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)  # "from . import x" names modules
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("camlens"))
    return found


def _canonical(mod: str) -> str:
    """``mod`` with an old flat path (``camlens.targets``) replaced by the module it names now."""
    for old in sorted(camlens._MOVED, key=len, reverse=True):
        if mod == old or mod.startswith(old + "."):
            return camlens._MOVED[old] + mod[len(old):]
    return mod


def _package(mod: str) -> str | None:
    parts = _canonical(mod).split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else None


def test_every_module_lives_in_a_layer_folder():
    loose = sorted(n for n, p in _modules().items() if n.count(".") == 1 and n.split(".")[1] not in LAYER)
    assert loose == [], f"modules outside the layer folders: {loose}"


def test_imports_never_go_up_a_layer():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        here = _package(name)
        if here is None:
            continue
        for imp in _imports(name, path):
            there = _package(imp)
            if there is None or there == here:
                continue
            allowed = NEIGHBOURS.get((here, there))
            if LAYER[there] > LAYER[here] or (LAYER[there] == LAYER[here] and (
                    allowed is None or not any(imp == a or imp.startswith(a + ".") for a in allowed))):
                bad.append(f"{name} -> {imp}")
    assert bad == [], "imports that go up (or sideways) a layer:\n" + "\n".join(sorted(bad))


def test_camlens_itself_imports_the_new_paths_only():
    """The old flat paths are for users' code; inside the package every import names the module
    where it lives (so the layer rule above reads each import as it is written)."""
    old = [f"{name} -> {imp}" for name, path in _modules().items() if name != "camlens"
           for imp in _imports(name, path) if _canonical(imp) != imp]
    assert old == [], "imports of old module paths:\n" + "\n".join(sorted(old))


@pytest.mark.parametrize("old", sorted(camlens._MOVED))
def test_old_module_paths_import_the_moved_modules(old):
    new = camlens._MOVED[old]
    a, b = importlib.import_module(old), importlib.import_module(new)
    assert a is b
    assert a.__name__ == new and a.__spec__.name == new  # the module keeps its own identity


def test_old_paths_leave_the_public_functions_in_place():
    import camlens.evaluate  # noqa: F401  (the moved module's old name)
    import camlens.stream  # noqa: F401

    assert callable(camlens.evaluate) and callable(camlens.stream)
    assert camlens.evaluate.__module__ == "camlens.engine.evaluate"
