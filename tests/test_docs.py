"""docs/architecture.md stays true: every backend function it names exists, and every
``module.function`` it cites is where it says."""

import importlib
import re
from pathlib import Path

from camlens.backends import base
from camlens.backends.numpy import NumpyOps
from camlens.backends.torch.backend import TorchBackend
from camlens.backends.torch.ops import TorchOps

DOC = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()


def test_backend_table_names_exist_in_the_protocol_and_the_torch_backend():
    names: set[str] = set()
    table = DOC.split("| need | Backend method |")[1].split("\n\n")[0]
    for row in table.splitlines()[2:]:
        names |= {n.split("(")[0] for n in re.findall(r"`([A-Za-z_]\w*)\(", row.split("|")[2])}
    assert {"session", "capture", "target_gradients", "runner", "layout", "linear_head", "randomized_copy"} <= names
    proto = {n for n in dir(base.Backend) if not n.startswith("_")}
    assert names <= proto, f"docs/architecture.md names Backend methods the protocol lacks: {sorted(names - proto)}"
    assert proto - {"name", "xp", "ops"} <= names, f"Backend methods missing from the doc's table: {sorted(proto - names)}"
    missing = sorted(n for n in proto if not hasattr(TorchBackend, n))
    assert not missing, f"TorchBackend lacks {missing}"


def test_ops_table_names_exist_in_every_ops():
    table = DOC.split("| Ops | for |")[1].split("\n\n")[0]
    names = {n for row in table.splitlines()[2:] for n in re.findall(r"`(\w+)`", row.split("|")[1])}
    proto = {n for n in dir(base.Ops) if not n.startswith("_")}
    assert names == proto, f"the doc's Ops table and the Ops protocol differ: {sorted(names ^ proto)}"
    for impl in (TorchOps, NumpyOps):
        assert not [n for n in proto if not hasattr(impl, n)], impl


def test_cited_module_functions_exist():
    cited = {c for c in re.findall(r"\b(api|engine|tiling|stream|cli|evaluate|postprocess|registry)\.(\w+)", DOC) if c[1] != "py"}
    assert len(cited) >= 8
    missing = [f"{m}.{f}" for m, f in sorted(cited) if not hasattr(importlib.import_module(f"camlens.{m}"), f)]
    assert not missing, missing
