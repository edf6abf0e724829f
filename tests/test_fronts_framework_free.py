"""Issue 11 item 1, the fronts: ``explanation`` (the result type, ``.numpy()``, save / load),
``compare``, ``localize``, ``report``, ``stream``, ``demo`` and the CLI import no framework (checked
by their imports, also inside functions, and by importing them with the frameworks hidden); they work
on NumPy arrays as on torch tensors (the same numbers, results of the input's kind); and an
explanation saved from torch loads as torch tensors, or as NumPy arrays where torch is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import camlens
from camlens import compare, localize, report
from camlens.backends import base
from camlens.backends.numpy import NumpyOps
from camlens.backends.torch.ops import TorchOps
from camlens.core.explanation import Explanation
from camlens.core.targets import ResolvedTarget
from test_framework_free import _imported_roots  # the one AST reader of a file's imports

SRC = Path(camlens.__file__).parent
FRAMEWORKS = {"torch", "torchvision", "timm", "tensorflow", "keras", "jax"}
FRONTS = ["core/explanation.py", "analysis/compare.py", "analysis/localize.py", "engine/stream.py",
          *sorted(str(p.relative_to(SRC)) for p in (SRC / "fronts").rglob("*.py"))]


@pytest.mark.parametrize("rel", FRONTS)
def test_front_imports_no_framework(rel):
    found = _imported_roots(SRC / rel) & FRAMEWORKS
    assert not found, f"{rel} imports {sorted(found)}"


# ---------------------------------------------------------------------------------------------- helpers

def _maps(seed: int, shape=(2, 3, 12, 10)) -> np.ndarray:
    """Continuous random maps in [0, 1] (no ties), float32."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _rows(B: int, T: int) -> list[list[ResolvedTarget]]:
    return [[ResolvedTarget(head=0, cls=t, label=f"{t}: c{t}") for t in range(T)] for _ in range(B)]


def _explanation(seed: int = 0, B: int = 2, T: int = 3, H: int = 12, W: int = 10) -> Explanation:
    """A NumPy explanation: maps in [0, 1], raw maps of two layers, scores, probabilities."""
    g = np.random.default_rng(seed)
    raws = {"a": g.standard_normal((B, T, 3, 5)).astype(np.float32),
            "b": g.standard_normal((B, T, 6, 5)).astype(np.float32)}
    scores = g.standard_normal((B, T)).astype(np.float32)
    return Explanation(maps=_maps(seed, (B, T, H, W)), raw=raws["a"], raws=raws, scores=scores,
                       probs=(1 / (1 + np.exp(-scores))).astype(np.float32), targets=_rows(B, T),
                       inputs=g.standard_normal((B, 3, H, W)).astype(np.float32), layers=["a", "b"], method="gradcam",
                       heads={0: g.standard_normal((B, 5)).astype(np.float32)}, options={"relu": True})


def _on_torch(exp: Explanation) -> Explanation:
    def t(v):
        return torch.from_numpy(v) if isinstance(v, np.ndarray) else v

    raws = {k: t(v) for k, v in exp.raws.items()}
    return dataclasses.replace(exp, maps=t(exp.maps), raw=raws["a"], raws=raws, scores=t(exp.scores),
                               probs=t(exp.probs), inputs=t(exp.inputs), heads={k: t(v) for k, v in exp.heads.items()})


# ---------------------------------------------------------------------------------------------- explanation

def test_numpy_explanation_numpy_save_and_load(tmp_path):
    exp = _explanation()
    exp.maps = exp.maps.astype(np.float64)  # .numpy() gives float32
    arr = exp.numpy()
    assert set(arr) == {"maps", "raw", "scores", "probs", "labels"}
    for k in ("maps", "raw", "scores", "probs"):
        assert isinstance(arr[k], np.ndarray) and arr[k].dtype == np.float32, k
    np.testing.assert_array_equal(arr["maps"], exp.maps.astype(np.float32))
    assert arr["labels"] == [["0: c0", "1: c1", "2: c2"]] * 2
    one = exp.image(1)
    assert one.maps.shape == (1, 3, 12, 10) and np.shares_memory(one.maps, exp.maps)
    got = camlens.load(exp.save(tmp_path / "np"))
    for name in ("maps", "raw", "scores", "probs", "inputs"):
        a, b = getattr(exp, name), getattr(got, name)
        assert isinstance(b, np.ndarray) and b.dtype == a.dtype and np.array_equal(a, b), name
    assert got.raw is got.raws["a"] and list(got.raws) == ["a", "b"] and isinstance(got.heads[0], np.ndarray)
    np.testing.assert_array_equal(got.numpy()["maps"], arr["maps"])


def test_numpy_of_torch_fields_is_unchanged():
    exp = _on_torch(_explanation(1))
    exp.maps = exp.maps.to(torch.bfloat16).requires_grad_()
    arr = exp.numpy()
    assert all(isinstance(arr[k], np.ndarray) and arr[k].dtype == np.float32 for k in ("maps", "raw", "scores"))
    np.testing.assert_array_equal(arr["maps"], exp.maps.detach().float().numpy())
    np.testing.assert_array_equal(arr["scores"], exp.scores.numpy())


def test_torch_explanation_still_loads_as_torch_tensors_bit_for_bit(tmp_path):
    exp = _on_torch(_explanation(2))
    exp.maps = exp.maps.to(torch.bfloat16)
    exp.scores = exp.scores.half()
    got = camlens.load(exp.save(tmp_path / "t"), device=torch.device("cpu"))
    assert isinstance(got.maps, torch.Tensor) and got.maps.dtype == torch.bfloat16
    assert torch.equal(got.maps.view(torch.int16), exp.maps.view(torch.int16))
    assert got.scores.dtype == torch.float16 and torch.equal(got.scores, exp.scores)
    assert isinstance(got.heads[0], torch.Tensor) and torch.equal(got.heads[0], exp.heads[0])


def test_file_entries_through_the_backend_contract():
    ops = TorchOps()
    x = torch.tensor([[1.5, float("nan"), -0.0]], dtype=torch.bfloat16)
    a, dtype, device = ops.to_file(x)
    assert a.dtype == np.float32 and (dtype, device) == ("torch.bfloat16", "cpu")
    back = ops.from_file(a, dtype)
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), x.view(torch.int16))
    c = torch.tensor([1 + 2j], dtype=torch.complex64).conj()  # a lazily conjugated tensor
    a, dtype, _ = ops.to_file(c)
    assert dtype == "torch.complex64" and a[0] == 1 - 2j
    with pytest.raises(LookupError, match="unknown to this PyTorch"):
        ops.from_file(a, "torch.nosuchdtype")
    n = np.arange(3, dtype=np.int16)
    assert NumpyOps().to_file(n)[1:] == ("numpy.int16", "numpy") and NumpyOps().from_file(n, "torch.int16") is n
    with pytest.raises(camlens.errors.ConfigError, match="host memory"):
        NumpyOps().from_file(n, "torch.int16", "cuda")
    assert base.ops_named("torch") is base.ops_named() and isinstance(base.ops_named(), TorchOps)
    assert isinstance(base.ops_named("numpy"), NumpyOps) and isinstance(base.ops_named("no-such-backend"), NumpyOps)
    d = base.default_array([[1, 2], [3, 4]])
    assert isinstance(d, torch.Tensor) and d.dtype == torch.int64 and d.tolist() == [[1, 2], [3, 4]]


def test_top_mask_and_out_of_memory_in_both_backends():
    x = _maps(3, (2, 3, 17))
    for k in (1, 5, 17):
        want = np.zeros(x.shape, bool)
        np.put_along_axis(want, np.argsort(-x, axis=-1)[..., :k], True, axis=-1)
        np.testing.assert_array_equal(NumpyOps().top_mask(x, k), want)
        np.testing.assert_array_equal(TorchOps().top_mask(torch.from_numpy(x), k).numpy(), want)
    assert TorchOps().is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not TorchOps().is_out_of_memory(RuntimeError("x")) and NumpyOps().is_out_of_memory(MemoryError())
    from camlens.fronts.cli import _is_oom

    assert _is_oom(torch.OutOfMemoryError("boom")) and _is_oom(MemoryError()) and not _is_oom(RuntimeError("x"))


# ---------------------------------------------------------------------------------------------- compare

def test_agreement_same_on_numpy_and_torch():
    exp = _explanation(4)
    on_np, on_torch = compare.agreement(exp, top=0.3), compare.agreement(_on_torch(exp), top=0.3)
    assert on_np.pairs == on_torch.pairs == [(0, 1), (0, 2), (1, 2)]
    for f in ("iou", "pearson", "overlap", "only", "conflict"):
        a, b = getattr(on_np, f), getattr(on_torch, f)
        assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor), f
        assert a.dtype == np.float32 and a.shape == tuple(b.shape), f
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6, err_msg=f)
    assert on_np.summary(1) == on_torch.summary(1)
    assert compare.agreement_summary(exp, chunk=2) == compare.agreement_summary(_on_torch(exp), chunk=2)
    # by hand: IoU of the top-30 % masks, Pearson over pixels
    m = exp.maps[0].reshape(3, -1)
    top = [set(np.argsort(-r)[:36].tolist()) for r in m]
    assert on_np.iou[0, 0] == pytest.approx(len(top[0] & top[1]) / len(top[0] | top[1]))
    assert on_np.pearson[0, 1] == pytest.approx(np.corrcoef(m[0], m[2])[0, 1], abs=1e-6)  # pair (0, 2)


def test_top_fraction_mask_and_pearson_on_numpy():
    m = np.arange(10.0).reshape(1, 2, 5)
    assert compare.top_fraction_mask(m, 0.3).ravel().tolist() == [False] * 7 + [True] * 3
    assert compare.pearson(m, 2 * m + 1).item() == pytest.approx(1.0)
    assert compare.pearson(m, np.zeros_like(m)).item() == 0.0


# ---------------------------------------------------------------------------------------------- localize

def test_localize_same_on_numpy_and_torch():
    maps = _maps(5, (2, 3, 20, 25)) ** 4
    maps[0, 1] = 0.0  # degenerate: the whole image, no components, an empty mask
    maps[1, 0, 0, 0] = np.nan
    t = torch.from_numpy(maps)
    for th in (0.2, 0.5):
        for largest in (True, False):
            a, b = localize.boxes_from_maps(maps, th, largest=largest), localize.boxes_from_maps(t, th, largest=largest)
            assert isinstance(a, np.ndarray) and a.dtype == np.int64 and isinstance(b, torch.Tensor)
            np.testing.assert_array_equal(a, b.numpy())
        a, b = localize.masks_from_maps(maps, th), localize.masks_from_maps(t, th)
        assert isinstance(a, np.ndarray) and a.dtype == np.bool_
        np.testing.assert_array_equal(a, b.numpy())
        ca, cb = localize.boxes_all_components(maps, th), localize.boxes_all_components(t, th)
        for ra, rb in zip(ca, cb):
            for x, y in zip(ra, rb):
                assert isinstance(x, np.ndarray) and x.dtype == np.int64 and x.shape[1:] == (4,)
                np.testing.assert_array_equal(x, y.numpy())
    assert localize.boxes_from_maps(maps)[0, 1].tolist() == [0, 0, 25, 20]
    boxes = localize.boxes_from_maps(maps)
    iou_np = localize.box_iou(boxes[:, :, None], boxes[:, None])
    assert isinstance(iou_np, np.ndarray)
    np.testing.assert_allclose(iou_np, localize.box_iou(torch.from_numpy(boxes)[:, :, None],
                                                        torch.from_numpy(boxes)[:, None]).numpy())
    assert np.allclose(np.diagonal(iou_np, axis1=1, axis2=2), 1.0)
    masks = localize.masks_from_maps(maps, 0.3)
    np.testing.assert_allclose(localize.mask_iou(masks, masks[:, :1]),
                               localize.mask_iou(torch.from_numpy(masks), torch.from_numpy(masks[:, :1])).numpy())
    # plain lists: torch tensors, as before (torch is installed here)
    lists = localize.box_iou([0, 0, 10, 10], [[5, 0, 15, 10]])
    assert isinstance(lists, torch.Tensor) and lists.tolist() == pytest.approx([50 / 150])


def test_grabcut_refinement_takes_numpy_maps():
    H, W = 40, 50
    yy, xx = np.mgrid[:H, :W]
    sq = (abs(yy - 20) < 8) & (abs(xx - 25) < 10)
    img = np.where(sq[..., None], 200, 40).astype(np.uint8).repeat(3, axis=-1)
    m = np.exp(-((yy - 20) ** 2 + (xx - 25) ** 2) / 150.0).astype(np.float32)[None, None]
    a = localize.masks_from_maps(m, 0.5, refine="grabcut", images=img)
    b = localize.masks_from_maps(torch.from_numpy(m), 0.5, refine="grabcut", images=torch.from_numpy(img))
    assert isinstance(a, np.ndarray) and np.array_equal(a, b.numpy()) and a[0, 0].any()


# ---------------------------------------------------------------------------------------------- report, cli

def test_mean_curve_on_numpy_and_torch():
    a = np.linspace(1, 0, 5, dtype=np.float32)[None]
    b = np.broadcast_to(np.linspace(1, 0, 9, dtype=np.float32)[None], (2, 9))
    got = report._mean_curve([a, b], points=11)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, report._mean_curve([torch.from_numpy(a), torch.from_numpy(b.copy())],
                                                       points=11).numpy(), atol=1e-7)
    np.testing.assert_allclose(got, np.linspace(1, 0, 11), atol=1e-6)
    assert report._mean_curve([]).shape == (0,)


def test_method_grid_and_evaluation_files_from_numpy(tmp_path):
    exps = {"gradcam": _explanation(6), "gradcam++": _explanation(7)}
    for e in exps.values():
        e.display = (np.random.default_rng(0).random((2, 12, 10, 3)) * 255).astype(np.uint8)
    assert report.write_method_grid(exps, tmp_path, "np") == "np_methods.png"
    one = {k: dataclasses.replace(e, maps=e.maps[:, :1]) for k, e in exps.items()}
    assert (tmp_path / report.write_method_grid(one, tmp_path, "one")).is_file()

    class Met:
        higher_is_better, arrow = False, "↓"

    values = {"gradcam": {"deletion": [np.array([0.25, 0.5]), np.array([0.75])]}}
    curves = {"gradcam": {"deletion": [np.linspace(1, 0, 5)[None], np.linspace(1, 0, 9)[None]]}}
    cells = report.write_evaluation(values, curves, {"deletion": Met()}, tmp_path / "ev")
    assert cells == {"gradcam": {"deletion": "0.5000 ± 0.1443"}}
    assert (tmp_path / "ev" / "curves.png").is_file() and json.loads((tmp_path / "ev" / "results.json").read_text())


def test_cli_shape_masks_take_any_arrays():
    from camlens.fronts.cli import torch_stack_masks

    m = {"shape": np.zeros((2, 4, 5), bool), "colour": np.ones((2, 4, 5), bool)}
    got = torch_stack_masks(types.SimpleNamespace(masks=m), 1)
    assert isinstance(got, np.ndarray) and got.shape == (1, 2, 4, 5) and got[0, 1].all() and not got[0, 0].any()
    t = torch_stack_masks(types.SimpleNamespace(masks={k: torch.from_numpy(v) for k, v in m.items()}), 1)
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), got)


def test_stream_tells_framework_arrays_from_images():
    import importlib

    from camlens.core.targets import is_framework_array  # what stream and prepare ask of an input

    stream = importlib.import_module("camlens.stream")  # (camlens.stream is the function)
    assert is_framework_array(torch.zeros(3, 4, 4)) and not is_framework_array(np.zeros((4, 4, 3), np.uint8))
    assert not is_framework_array("cat.jpg")
    x = stream._concat([torch.ones(1, 3, 2, 2), torch.zeros(2, 3, 2, 2)])
    assert isinstance(x, torch.Tensor) and x.shape == (3, 3, 2, 2)


# ---------------------------------------------------------------------------------------------- without torch

_HIDE = """\
import sys

class _NoFrameworks:
    blocked = ("torch", "torchvision", "timm", "tensorflow", "keras", "jax")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoFrameworks())
"""


def test_fronts_work_without_torch(tmp_path):
    """With the frameworks hidden: the fronts import, a torch-saved explanation loads as NumPy arrays
    of the same values (bfloat16 as float32), and compare / localize / ``.numpy()`` run on it."""
    exp = _on_torch(_explanation(8))
    exp.maps = exp.maps.to(torch.bfloat16)
    path = exp.save(tmp_path / "saved")
    code = _HIDE + f"""
import json
import numpy as np
import camlens.explanation, camlens.compare, camlens.localize, camlens.report, camlens.stream, camlens.demo
from camlens.core.errors import ConfigError
got = camlens.explanation.load({str(path)!r})
ag = camlens.compare.agreement(got)
boxes = camlens.localize.boxes_from_maps(got.maps)
try:
    camlens.explanation.load({str(path)!r}, device="cuda")
    refused = False
except ConfigError:
    refused = True
print(json.dumps({{"kinds": sorted({{type(v).__name__ for v in (got.maps, got.scores, got.raw, ag.iou, boxes)}}),
                   "maps_dtype": str(got.maps.dtype), "maps": got.maps.tolist(), "numpy": got.numpy()["maps"].tolist(),
                   "boxes": boxes.tolist(), "refused": refused,
                   "frameworks": sorted(m for m in sys.modules if m.split(".")[0] in _NoFrameworks.blocked)}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC.parent), os.environ.get("PYTHONPATH"))
                                                        if p)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["frameworks"] == [] and out["kinds"] == ["ndarray"] and out["refused"]
    want = exp.maps.float().numpy()
    assert out["maps_dtype"] == "float32" and np.array_equal(np.array(out["maps"], np.float32), want)
    assert np.array_equal(np.array(out["numpy"], np.float32), want)
    assert out["boxes"] == localize.boxes_from_maps(exp.maps.float()).tolist()
