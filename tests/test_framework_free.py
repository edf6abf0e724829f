"""Issue 11 item 1: the maths is framework-free — array-API code (``camlens.backends.base.namespace``)
that runs unchanged on any compliant array library; only ``backends/`` and ``models/`` know torch.

The modules converted so far are listed in ``FRAMEWORK_FREE``; each is checked by its imports (AST)
and, for the methods, by running its maths on NumPy arrays against the same maths on torch tensors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import camlens
from camlens.backends import base
from camlens.methods import cam as cam_mod
from camlens.methods import gradcam as gc
from camlens.methods import gradcam_family as fam

SRC = Path(camlens.__file__).parent
FRAMEWORKS = {"torch", "torchvision", "timm", "tensorflow", "keras", "jax"}
FRAMEWORK_FREE = ["backends/base.py", "methods/base.py", "methods/gradcam.py", "methods/gradcam_family.py",
                  "methods/cam.py"]


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("rel", FRAMEWORK_FREE)
def test_module_imports_no_framework(rel):
    assert not (_imported_roots(SRC / rel) & FRAMEWORKS), f"{rel} imports {(_imported_roots(SRC / rel) & FRAMEWORKS)}"


def _pair(seed: int, B=2, T=3, C=5, h=4, w=6):
    g = np.random.default_rng(seed)
    acts = g.standard_normal((B, C, h, w))
    grads = g.standard_normal((B, T, C, h, w))
    grads[0, 0, 1, 0, 0] = 0.0  # a zero gradient (Grad-CAM++'s alpha is 0 there)
    return acts, grads


@pytest.mark.parametrize("fn", [gc.gradcam, fam.gradcam_pp, fam.xgradcam, fam.hirescam, fam.layercam, fam.eigengradcam])
def test_gradient_methods_give_the_same_maps_on_numpy_and_torch(fn):
    acts, grads = _pair(0)
    if fn is fam.xgradcam:
        acts = np.abs(acts) + 0.1  # its denominator is the activation sum (post-ReLU layers in practice)
    on_np = fn(acts, grads)
    on_torch = fn(torch.from_numpy(acts), torch.from_numpy(grads))
    assert isinstance(on_np, np.ndarray) and on_np.shape == (2, 3, 4, 6)
    tol = 1e-4 if fn is fam.eigengradcam else 1e-10  # Eigen-*: a float32 SVD inside (NumPy's LAPACK vs torch's)
    np.testing.assert_allclose(on_np, on_torch.numpy(), rtol=tol, atol=tol)


def test_gradcam_by_hand_on_numpy():
    acts, grads = _pair(1)
    want = np.einsum("btc,bchw->bthw", grads.mean(axis=(-2, -1)), acts)
    np.testing.assert_allclose(gc.gradcam(acts, grads), want, rtol=1e-12)


def test_eigencam_and_cam_maps_on_numpy_and_torch():
    acts, _ = _pair(2)
    np.testing.assert_allclose(fam.eigencam(acts, 3), fam.eigencam(torch.from_numpy(acts), 3).numpy(), rtol=1e-4,
                               atol=1e-4)
    weight = np.random.default_rng(3).standard_normal((7, 5))
    classes = np.array([[6, 0, 2], [1, 1, 5]])
    want = np.einsum("btc,bchw->bthw", weight[classes], acts)
    np.testing.assert_allclose(cam_mod.cam_maps(acts, weight, classes), want, rtol=1e-12)
    np.testing.assert_allclose(cam_mod.cam_maps(torch.from_numpy(acts), torch.from_numpy(weight),
                                                torch.from_numpy(classes)).numpy(), want, rtol=1e-12)


def test_backend_is_chosen_from_the_model_type():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))

    class Mine(torch.nn.Module):  # a user's module: its base class is torch's
        pass

    assert base.get_backend(net).name == "torch" and base.get_backend(Mine()).name == "torch"
    assert isinstance(base.get_backend(net), base.Backend) and isinstance(base.get_backend(net).ops, base.Ops)
    with pytest.raises(camlens.errors.ConfigTypeError, match="no camlens backend takes a model of type"):
        base.get_backend(object())
    with pytest.raises(TypeError):  # the built-in type it replaces
        base.get_backend(lambda x: x)


def test_the_engine_names_no_method():
    """Methods declare what they need; the engine never tests for a particular method."""
    import camlens.engine
    import camlens.methods

    engine_src = Path(camlens.engine.__file__).read_text()
    for name, meth in camlens.methods.available_methods().items():
        const = type(meth).__name__
        assert f"{const}" not in engine_src and f'"{name}"' not in engine_src, name
    assert "needs_linear_head" in engine_src and "CAM" not in engine_src.replace("CAMs", "")
