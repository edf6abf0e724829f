"""docs/architecture.md stays true: every backend function it names exists, and every
``module.function`` it cites is where it says."""

import importlib
import re
from pathlib import Path

import camlens.backends.torch as backend

DOC = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()


def test_backend_table_names_exist():
    table = DOC.split("## The backend contract")[1].split("##")[0]
    names = set()
    for row in table.splitlines()[4:]:
        cell = row.split("|")[2] if row.count("|") >= 4 else ""
        names |= {n.split("(")[0].split(".")[0] for n in re.findall(r"`([A-Za-z_][\w.]*)", cell)}
    assert {"model_state", "capture", "layer_gradients", "Runner", "Layout", "GuidedReLU"} <= names
    missing = sorted(n for n in names if not hasattr(backend, n))
    assert not missing, f"docs/architecture.md names backend functions that do not exist: {missing}"
    for meth in re.findall(r"`Runner\.(\w+)", table):
        assert hasattr(backend.Runner, meth), meth


def test_cited_module_functions_exist():
    cited = {c for c in re.findall(r"\b(api|engine|tiling|stream|cli|evaluate|postprocess|registry)\.(\w+)", DOC) if c[1] != "py"}
    assert len(cited) >= 8
    missing = [f"{m}.{f}" for m, f in sorted(cited) if not hasattr(importlib.import_module(f"camlens.{m}"), f)]
    assert not missing, missing
