"""exp.save(path) / camlens.load(path): one versioned .npz file, tensors bit for bit, never unpickled."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.core.explanation import FORMAT, FORMAT_VERSION, META_KEY, LoadedTarget
from camlens.core.targets import ResolvedTarget, Target


class Trunk(nn.Module):
    def __init__(self, name2: str = "c2"):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.add_module(name2, nn.Conv2d(6, 8, 3, padding=1, stride=2))
        self.name2 = name2

    def forward(self, x):
        return torch.relu(getattr(self, self.name2)(self.act(self.c1(x))))


class DictTwoHead(nn.Module):
    """``{"shape": (B, 4), key2: (B, 3)}`` on a shared trunk."""

    def __init__(self, key2: str = "colour", name2: str = "c2"):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = Trunk(name2)
        self.shape = nn.Linear(8, 4)
        self.other = nn.Linear(8, 3)
        self.key2 = key2

    def forward(self, x):
        f = self.trunk(x).mean((2, 3))
        return {"shape": self.shape(f), self.key2: self.other(f)}


class TupleTwoHead(DictTwoHead):
    """The same, as a tuple: head keys 0 and 1 (ints)."""

    def forward(self, x):
        out = super().forward(x)
        return out["shape"], out[self.key2]


def _x(b: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().flatten().view(torch.uint8)


def assert_same_tensor(a, b, what: str) -> None:
    assert isinstance(b, torch.Tensor), what
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert tuple(a.shape) == tuple(b.shape), (what, a.shape, b.shape)
    assert b.device.type == "cpu", what
    assert torch.equal(_bits(a), _bits(b)), f"{what} differs bitwise"


def _target_fields(t):
    return (t.head, type(t.head), t.cls, t.label, t.head_only)


def assert_same_explanation(exp, got) -> None:
    for name in ("maps", "raw", "scores", "probs", "inputs"):
        assert_same_tensor(getattr(exp, name), getattr(got, name), name)
    assert list(got.raws) == list(exp.raws)
    for k in exp.raws:
        assert_same_tensor(exp.raws[k], got.raws[k], f"raws[{k!r}]")
    assert list(got.heads) == list(exp.heads) and [type(k) for k in got.heads] == [type(k) for k in exp.heads]
    for k in exp.heads:
        assert_same_tensor(exp.heads[k], got.heads[k], f"heads[{k!r}]")
    if exp.pixel is None:
        assert got.pixel is None
    else:
        assert_same_tensor(exp.pixel, got.pixel, "pixel")
    if exp.display is None:
        assert got.display is None
    else:
        assert got.display.dtype == exp.display.dtype and np.array_equal(got.display, exp.display)
    assert got.layers == exp.layers and got.method == exp.method and got.options == exp.options
    for rows_a, rows_b in [(exp.targets, got.targets), (exp.components, got.components)]:
        if rows_a is None:
            assert rows_b is None
            continue
        assert [[_target_fields(t) for t in r] for r in rows_a] == [[_target_fields(t) for t in r] for r in rows_b]
        for ra, rb in zip(rows_a, rows_b):
            for ta, tb in zip(ra, rb):
                assert tb.fn is None
                if ta.fn is None:
                    assert type(tb) is ResolvedTarget and tb == ta  # class targets compare equal
                else:
                    assert isinstance(tb, LoadedTarget) and tb.has_fn
    assert got.labels == exp.labels


def _meta(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z[META_KEY].tobytes().decode("utf-8"))


def _rewrite(path: Path, out: Path, meta: dict = None, **extra) -> None:
    """Copy a saved file with other metadata / extra entries (saved with pickling allowed)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if meta is not None:
        arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays.update(extra)
    with open(out, "wb") as f:
        np.savez(f, **arrays)


# ----------------------------------------------------------------------------------------------
# round trips


def test_gradcam_two_head_dict_combined_with_callable_round_trip(tmp_path):
    net = DictTwoHead().eval()
    x = _x()
    fn = lambda out: out["colour"][:, 1] - out["shape"][:, 0]  # noqa: E731
    exp = camlens.explain(net, x, targets=["shape:2", ("colour", 0), Target(head="colour", fn=lambda h: h[:, 2]), fn],
                          combine="mean")
    assert exp.maps.shape == (2, 1, 16, 16) and exp.components is not None and len(exp.components[0]) == 4
    path = exp.save(tmp_path / "exp.npz")
    assert path == tmp_path / "exp.npz" and path.is_file()
    got = camlens.load(path)
    assert_same_explanation(exp, got)
    # numbers: the combined score is the mean of the 4 component scores, and the maps are in [0, 1]
    with torch.no_grad():
        out = net(x)
    comp = torch.stack([out["shape"][:, 2], out["colour"][:, 0], out["colour"][:, 2],
                        out["colour"][:, 1] - out["shape"][:, 0]], 1)
    torch.testing.assert_close(got.scores[:, 0], comp.mean(1), rtol=1e-5, atol=1e-6)
    assert float(got.maps.min()) == 0.0 and float(got.maps.max()) == 1.0
    assert torch.isnan(got.probs).all()  # a combined target has no single class
    # the score functions are flagged, not saved
    t = got.targets[0][0]
    assert isinstance(t, LoadedTarget) and t.fn is None and t.has_fn and not t.head_only
    assert t.label == exp.targets[0][0].label and t.label.startswith("mean(")
    c = got.components[0]
    assert [type(ct) for ct in c] == [ResolvedTarget, ResolvedTarget, LoadedTarget, LoadedTarget]
    assert (c[0].head, c[0].cls, c[1].head, c[1].cls) == ("shape", 2, "colour", 0)
    assert c[2].head == "colour" and c[2].head_only and c[2].cls is None
    assert not c[3].head_only
    with pytest.raises(camlens.errors.TargetError, match="score function was not saved"):
        t.score(got.heads, None)
    meta = _meta(path)
    assert meta["format"] == FORMAT == "camlens.explanation" and meta["format_version"] == 1
    assert meta["camlens_version"] == camlens.__version__ and meta["method"] == "gradcam"
    assert meta["heads"] == ["shape", "colour"] and meta["raws"] == ["trunk"] and meta["raw"] == "raws/0"
    assert [d["has_fn"] for d in meta["components"][0]] == [False, False, True, True]
    assert meta["arrays"]["maps"] == {"dtype": "torch.float32", "device": "cpu", "shape": [2, 1, 16, 16],
                                      "stored_as": "float32"}


def test_int_heads_separate_targets_round_trip(tmp_path):
    net = TupleTwoHead().eval()
    x = _x(3)
    exp = camlens.explain(net, x, targets=[1, "1:2", (0, 3), Target(head=1, cls=0, label="ünïcødé ✓ 猫")])
    got = camlens.load(exp.save(tmp_path / "tuple"))
    assert_same_explanation(exp, got)
    assert list(got.heads) == [0, 1] and all(type(k) is int for k in got.heads)
    assert [(t.head, t.cls) for t in got.targets[0]] == [(0, 1), (1, 2), (0, 3), (1, 0)]
    assert got.targets[2][3].label == "ünïcødé ✓ 猫" and got.components is None
    with torch.no_grad():
        a, b = net(x)
    expected = torch.stack([a[:, 1], b[:, 2], a[:, 3], b[:, 0]], 1)
    torch.testing.assert_close(got.scores, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.probs[:, 1], b.softmax(1)[:, 2], rtol=1e-5, atol=1e-6)
    assert _meta(tmp_path / "tuple.npz")["heads"] == [0, 1]


def test_multi_layer_raws_keep_order_and_shapes(tmp_path):
    net = DictTwoHead().eval()
    exp = camlens.explain(net, _x(), targets=["shape:1", "colour:2"], layer=["trunk.c2", "trunk.c1"])
    assert list(exp.raws) == ["trunk.c2", "trunk.c1"]
    got = camlens.load(exp.save(str(tmp_path / "multi.npz")))
    assert_same_explanation(exp, got)
    assert list(got.raws) == ["trunk.c2", "trunk.c1"] and got.layers == ["trunk.c2", "trunk.c1"]
    assert got.raws["trunk.c2"].shape == (2, 2, 8, 8) and got.raws["trunk.c1"].shape == (2, 2, 16, 16)
    assert got.raw is got.raws["trunk.c2"]  # stored once, restored as the first layer's maps
    meta = _meta(tmp_path / "multi.npz")
    assert meta["raws"] == ["trunk.c2", "trunk.c1"] and set(meta["arrays"]) >= {"raws/0", "raws/1"}
    assert "raw" not in meta["arrays"]


def test_raw_distinct_from_first_layer_is_stored_separately(tmp_path):
    exp = camlens.explain(DictTwoHead().eval(), _x(), targets="shape:0")
    exp.raw = exp.raw * 2
    got = camlens.load(exp.save(tmp_path / "r"))
    assert_same_explanation(exp, got)
    assert _meta(tmp_path / "r.npz")["raw"] == "raw"
    torch.testing.assert_close(got.raw, 2 * got.raws["trunk"])


def test_guided_backprop_pixel_and_options(tmp_path):
    exp = camlens.explain(DictTwoHead().eval(), _x(), targets=["shape:1", "colour:0"], method="guided_backprop")
    assert exp.pixel is not None and exp.pixel.shape == (2, 2, 3, 16, 16) and exp.raws == {}
    assert exp.options == {"clip": 0.995, "non_relu": "error"}
    got = camlens.load(exp.save(tmp_path / "gbp.npz"))
    assert_same_explanation(exp, got)
    assert got.options == {"clip": 0.995, "non_relu": "error"} and got.layers == [] and got.raws == {}
    assert _meta(tmp_path / "gbp.npz")["raw"] == "raw"
    assert float(got.pixel.abs().sum()) > 0


def test_options_resolved_by_explain_and_tiling(tmp_path):
    net = DictTwoHead().eval()
    exp = camlens.explain(net, _x(), targets="shape:0", method="scorecam", max_channels=3)
    assert exp.options == {"batch_size": 32, "max_channels": 3, "weights": "channel_softmax"}
    tiled = camlens.explain(net, _x(size=24), targets="shape:0", method="occlusion", patch=4, tile=16, overlap=8)
    assert tiled.options == {"patch": 4, "stride": None, "baseline": 0.0, "blur_sigma": 5.0, "batch_size": 32}
    got = camlens.load(tiled.save(tmp_path / "tiled"))
    assert_same_explanation(tiled, got)
    assert got.options["stride"] is None and got.options["patch"] == 4


def test_unserialisable_options_are_stored_as_repr(tmp_path):
    exp = camlens.explain(DictTwoHead().eval(), _x(), targets="shape:0")
    exp.options = {"baseline": torch.tensor([1.5]), "scales": (1.0, 0.5), "nan": float("nan"), "name": "é"}
    got = camlens.load(exp.save(tmp_path / "o"))
    assert got.options["baseline"] == repr(torch.tensor([1.5])) and got.options["scales"] == [1.0, 0.5]
    assert np.isnan(got.options["nan"]) and got.options["name"] == "é"
    assert _meta(tmp_path / "o.npz")["options_repr"] == ["baseline"]


def test_loaded_model_with_display(tmp_path):
    from camlens.datasets.shapes import make_shapes

    m = camlens.models.load("shapes-2head")
    data = make_shapes(2, seed=3)
    images = (data.images * 255).round().to(torch.uint8)  # uint8 images: camlens preprocesses them
    exp = camlens.explain(m, images, top_k=2)
    assert exp.display is not None and exp.display.dtype == np.uint8 and exp.display.shape == (2, 64, 64, 3)
    got = camlens.load(exp.save(tmp_path / "shapes.npz"))
    assert_same_explanation(exp, got)
    assert list(got.heads) == ["shape", "colour"] and got.heads["shape"].shape == (2, 4)
    assert got.maps.shape == (2, 4, 64, 64) and got.layers == ["features"]
    # labels carry the class names; probs are the softmax of the saved heads
    names = {*m.categories["shape"], *m.categories["colour"]}
    assert all(any(n in lb for n in names) for lb in got.labels[0])
    for t, tg in enumerate(got.targets[0]):
        torch.testing.assert_close(got.probs[0, t], got.heads[tg.head][0].softmax(0)[tg.cls])
    assert _meta(tmp_path / "shapes.npz")["arrays"]["display"]["dtype"] == "numpy.uint8"


def test_bf16_and_fp16_keep_dtype_bit_for_bit(tmp_path):
    exp = camlens.explain(DictTwoHead().eval(), _x(), targets=["shape:0", "colour:1"])
    exp.maps = exp.maps.to(torch.bfloat16)
    exp.maps[0, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16)
    exp.raws = {k: v.to(torch.bfloat16) for k, v in exp.raws.items()}
    exp.raw = next(iter(exp.raws.values()))
    exp.scores = exp.scores.half()
    exp.heads = {k: v.double() for k, v in exp.heads.items()}
    path = exp.save(tmp_path / "bf16")
    got = camlens.load(path)
    assert_same_explanation(exp, got)
    assert got.maps.dtype == torch.bfloat16 and got.scores.dtype == torch.float16
    assert got.heads["shape"].dtype == torch.float64
    assert torch.isnan(got.maps[0, 0, 0, 0]) and str(got.maps[0, 0, 0, 1].item()) == "-0.0"
    meta = _meta(path)
    assert meta["arrays"]["maps"]["dtype"] == "torch.bfloat16" and meta["arrays"]["maps"]["stored_as"] == "float32"
    assert meta["arrays"]["scores"]["stored_as"] == "float16"
    with np.load(path, allow_pickle=False) as z:  # readable without camlens: float32 values of the bf16 maps
        assert z["maps"].dtype == np.float32
        np.testing.assert_array_equal(z["maps"][1], exp.maps[1].float().numpy())


def test_non_ascii_labels_layers_and_heads(tmp_path):
    net = DictTwoHead(key2="цвет", name2="couche_é").eval()
    exp = camlens.explain(net, _x(), targets=[Target(head="shape", cls=1, label="形 · 1"), "цвет:2"],
                          layer="trunk.couche_é")
    assert exp.layers == ["trunk.couche_é"]
    path = exp.save(tmp_path / "ünï")
    assert path.name == "ünï.npz"
    got = camlens.load(tmp_path / "ünï")
    assert_same_explanation(exp, got)
    assert got.labels[0][0] == "形 · 1" and list(got.heads) == ["shape", "цвет"]
    assert got.targets[1][1].head == "цвет"
    assert list(got.raws) == ["trunk.couche_é"]


def test_suffix_and_device(tmp_path):
    exp = camlens.explain(DictTwoHead().eval(), _x(), targets="shape:0")
    p = exp.save(str(tmp_path / "sub" / "dir" / "e"))
    assert p == tmp_path / "sub" / "dir" / "e.npz" and isinstance(p, Path) and p.is_file()
    assert not (tmp_path / "sub" / "dir" / "e").exists() and not list(p.parent.glob("*.part"))
    for arg in (p, str(p), tmp_path / "sub" / "dir" / "e", str(tmp_path / "sub" / "dir" / "e")):
        assert_same_tensor(exp.maps, camlens.load(arg).maps, str(arg))
    other = tmp_path / "renamed.bin"  # an existing file of exactly that name is read as is
    other.write_bytes(p.read_bytes())
    assert_same_tensor(exp.maps, camlens.load(other, device="cpu").maps, "renamed")
    assert camlens.load(p, device=torch.device("cpu")).maps.device.type == "cpu"
    if torch.cuda.is_available():
        g = camlens.load(p, device="cuda")
        assert g.maps.device.type == "cuda" and torch.equal(g.maps.cpu(), exp.maps)


def test_load_is_exported_and_documented():
    assert "load" in camlens.__all__ and camlens.load is camlens.explanation.load
    assert camlens.load is not camlens.models.load
    assert "camlens.models.load" in camlens.load.__doc__


# ----------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def saved(tmp_path) -> Path:
    return camlens.explain(DictTwoHead().eval(), _x(), targets="shape:0").save(tmp_path / "ok.npz")


def test_newer_format_version_is_refused(saved, tmp_path):
    meta = _meta(saved)
    meta["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.npz"
    _rewrite(saved, newer, meta)
    with pytest.raises(ValueError, match=rf"newer\.npz has format_version {FORMAT_VERSION + 1}.*up to "
                                         rf"{FORMAT_VERSION}; upgrade camlens"):
        camlens.load(newer)


def test_other_format_is_refused(saved, tmp_path):
    meta = _meta(saved)
    meta["format"] = "something.else"
    bad = tmp_path / "other.npz"
    _rewrite(saved, bad, meta)
    with pytest.raises(ValueError, match=r"other\.npz is not a camlens explanation: its format is 'something.else'"):
        camlens.load(bad)


def test_random_npz_is_refused(tmp_path):
    p = tmp_path / "random.npz"
    np.savez(p, a=np.arange(3), b=np.ones(2))
    with pytest.raises(ValueError, match=r"random\.npz is not a camlens explanation: it has no '__meta__' entry "
                                         r"\(its arrays: a, b\)"):
        camlens.load(p)


def test_text_and_npy_files_are_refused(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, not an explanation\n")
    with pytest.raises(ValueError, match=r"notes\.txt is not a camlens explanation: not an \.npz \(zip\) file "
                                         r"\(it starts with b'hell'\)"):
        camlens.load(txt)
    npy = tmp_path / "a.npy"
    np.save(npy, np.arange(4))
    with pytest.raises(ValueError, match=r"a\.npy is not a camlens explanation"):
        camlens.load(npy)
    zf = tmp_path / "plain.npz"  # a zip that holds no arrays
    with zipfile.ZipFile(zf, "w") as z:
        z.writestr("readme.txt", "x")
    with pytest.raises(ValueError, match=r"plain\.npz is not a camlens explanation: it has no '__meta__'"):
        camlens.load(zf)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no saved explanation at .*nothing or .*nothing\.npz"):
        camlens.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"nothing\.npz$"):
        camlens.load(tmp_path / "nothing.npz")


def test_object_arrays_are_never_unpickled(saved, tmp_path, monkeypatch):
    evil = tmp_path / "evil.npz"
    _rewrite(saved, evil, maps=np.array([{"a": 1}, None], dtype=object))  # np.savez pickles object arrays
    import pickle

    def boom(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    with pytest.raises(ValueError, match=r"evil\.npz: cannot be read without unpickling.*allow_pickle=False"):
        camlens.load(evil)
    # and np.load is always called with allow_pickle=False
    calls = []
    real = np.load

    def spy(*a, **k):
        calls.append(k.get("allow_pickle"))
        return real(*a, **k)

    monkeypatch.setattr(np, "load", spy)
    camlens.load(saved)
    assert calls == [False]


def test_damaged_metadata(saved, tmp_path):
    meta = _meta(saved)
    meta["arrays"]["maps"]["shape"] = [9, 9]
    bad = tmp_path / "shape.npz"
    _rewrite(saved, bad, meta)
    with pytest.raises(ValueError, match=r"shape\.npz: entry 'maps' has shape \[2, 1, 16, 16\], but the metadata"):
        camlens.load(bad)
    meta = _meta(saved)
    meta["arrays"]["extra"] = {"dtype": "torch.float32", "device": "cpu", "shape": [1], "stored_as": "float32"}
    _rewrite(saved, bad, meta)
    with pytest.raises(ValueError, match=r"entries \['extra'\] named in its metadata are missing"):
        camlens.load(bad)
    junk = tmp_path / "junk.npz"
    _rewrite(saved, junk, None, **{META_KEY: np.frombuffer(b"\xff\xfe{", dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"junk\.npz is not a camlens explanation: its '__meta__' entry is not"):
        camlens.load(junk)


def test_unsavable_head_key(tmp_path):
    exp = camlens.explain(DictTwoHead().eval(), _x(), targets="shape:0")
    exp.heads = {("a", 1): exp.heads["shape"]}
    with pytest.raises(TypeError, match=r"only int and str head keys can be saved"):
        exp.save(tmp_path / "k")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# the HTML report reads saved explanations


def test_write_report_accepts_saved_paths(tmp_path):
    from camlens.viz import write_report

    exp = camlens.explain(TupleTwoHead().eval(), _x(3), targets=[0, "1:1"])
    saved = exp.save(tmp_path / "for_report")
    out = write_report(saved, tmp_path / "one.html")
    page = out.read_text(encoding="utf-8")
    assert len(re.findall(r'<canvas[^>]*id="view-\d+"', page)) == 3
    out2 = write_report([str(saved), exp, tmp_path / "for_report"], tmp_path / "three.html", names=["a", "b", "c"])
    page2 = out2.read_text(encoding="utf-8")
    assert len(re.findall(r'<canvas[^>]*id="view-\d+"', page2)) == 9
    assert page.count("data:image/png;base64") == page2.count("data:image/png;base64") // 3
