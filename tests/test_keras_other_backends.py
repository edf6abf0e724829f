"""Issue 13: the same Keras 3 models explained under ``KERAS_BACKEND=jax`` and ``KERAS_BACKEND=torch``
by the same code path give the same maps as under TensorFlow.

Keras reads ``KERAS_BACKEND`` once, at import, so each backend runs in a child interpreter
(``tests/keras_backends_child.py``: the models of its ``PLAN``, weights from a NumPy seed set with
``set_weights``) that writes its maps and scores to ``.npy`` files; the three children run at once and
the parent compares: Grad-CAM, Grad-CAM++, LayerCAM, XGrad-CAM, Eigen-Grad-CAM, Score-CAM,
Ablation-CAM and occlusion maps within 1e-4 (and scores within 1e-5 relative) on Functional,
Sequential, nested, dict-output and subclassed models, with class, head, per-image, callable and
combined targets; every model left untouched (weights, BatchNorm statistics, trainable flags,
layer attributes; on torch no ``.grad`` written, ``requires_grad`` as given), also after errors; the
camlens backend is Keras' (a Keras model under torch is an ``nn.Module`` too); TensorFlow is not
imported under JAX or torch. A Keras backend that is not installed is skipped (the dev extra installs
all three, so CI runs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras_backends_child import PLAN

SLOW = pytest.mark.slow  # three interpreters, each importing its framework (~20-60 s at once)

CHILD = Path(__file__).with_name("keras_backends_child.py")
OTHERS = ("jax", "torch")
_NEEDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def _missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here (``None``: it can)."""
    for mod in ("keras", _NEEDS[backend]):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed, so Keras cannot run on {backend} here (pip install 'camlens[dev]')"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """``{backend: (out folder, returncode, stderr tail)}``: the children, run in parallel."""
    if _missing("tensorflow"):
        pytest.skip(f"the reference is Keras on TensorFlow: {_missing('tensorflow')}")
    procs = {}
    for backend in ("tensorflow", *OTHERS):
        if _missing(backend):
            continue
        out = tmp_path_factory.mktemp(backend)
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                              os.environ.get("PYTHONPATH", "")])}
        procs[backend] = (out, subprocess.Popen([sys.executable, str(CHILD), str(out)], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    done = {}
    for backend, (out, p) in procs.items():
        _, err = p.communicate(timeout=600)
        done[backend] = (out, p.returncode, err[-4000:])
    return done


def _run(runs: dict, backend: str) -> Path:
    why = _missing(backend)
    if why:
        pytest.skip(why)
    out, rc, err = runs[backend]
    assert rc == 0, f"the {backend} child failed:\n{err}"
    return out


@SLOW
@pytest.mark.parametrize("backend", ["tensorflow", *OTHERS])
def test_the_child_ran_keras_on_its_backend_and_left_every_model_untouched(runs, backend):
    checks = json.loads((_run(runs, backend) / "checks.json").read_text())
    assert checks["keras_backend"] == backend
    assert checks["camlens_backends"] == ["keras"]  # (under torch: not the torch backend, though an nn.Module)
    assert checks["untouched"] and all(checks["untouched"].values()), checks["untouched"]
    assert checks["errors"] == ["TargetIndexError", "TargetError"]
    if backend != "tensorflow":
        assert "tensorflow" not in checks["imported"]
    if backend == "torch":
        assert checks["inference_mode_same"] is True  # explain inside torch.inference_mode()


@SLOW
@pytest.mark.parametrize("backend", OTHERS)
def test_maps_and_scores_equal_tensorflows(runs, backend):
    ref, got = _run(runs, "tensorflow"), _run(runs, backend)
    ref_checks, got_checks = (json.loads((d / "checks.json").read_text()) for d in (ref, got))
    assert got_checks["layers"] == ref_checks["layers"]  # default layers too
    worst = {}
    for key, _, _ in PLAN:
        want, maps = np.load(ref / f"{key}.npy"), np.load(got / f"{key}.npy")
        assert maps.shape == want.shape and maps.shape[-2:] == (20, 20), key
        assert float(want.max()) > 0, f"{key}: the reference maps are all zero (a test that cannot fail)"
        np.testing.assert_allclose(maps, want, rtol=0, atol=1e-4, err_msg=key)
        s_want, s_got = np.load(ref / f"{key}.scores.npy"), np.load(got / f"{key}.scores.npy")
        np.testing.assert_allclose(s_got, s_want, rtol=1e-5, atol=1e-5 * float(np.abs(s_want).max()), err_msg=key)
        worst[key] = float(np.abs(maps - want).max())
    assert max(worst.values()) < 1e-4, worst


def test_get_backend_lets_the_most_derived_class_decide(monkeypatch):
    """A class of framework A subclassing one of framework B (a ``keras.Model`` under Keras' torch
    backend is an ``nn.Module``) gets A's backend, whichever backend was registered first."""
    import types

    from camlens.backends import base

    class Owner:
        def __init__(self, name):
            self.name = name

        def owns(self, model):
            return True

    for name in ("fw_b", "fw_a"):  # B registered first, as torch is before keras
        mod = types.ModuleType(f"camlens_test_{name}")
        mod.BACKEND = Owner(name)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setitem(base._BACKENDS, name, ((f"{name}root",), mod.__name__))
    monkeypatch.setattr(base, "_LOADED", {})
    monkeypatch.setattr(base, "_BY_TYPE", {})
    Base = type("Module", (), {"__module__": "fw_broot.nn"})
    Model = type("Model", (Base,), {"__module__": "fw_aroot.models"})
    User = type("UserModel", (Model,), {"__module__": "__main__"})
    assert base.get_backend(User()).name == "fw_a"
    assert base.get_backend(Base()).name == "fw_b"
