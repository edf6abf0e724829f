"""camlens.stream: one single-image Explanation per input, batched internally (consecutive inputs
of one shape), in order, lazily; per-input errors as Failure records with on_error="yield"."""

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens import api
from camlens.datasets.shapes import make_shapes
from camlens.core.errors import ConfigError, InputError, LayerNotFoundError


@pytest.fixture(scope="module")
def shapes_model():
    return camlens.models.load("shapes-2head")


@pytest.fixture(scope="module")
def pictures():
    data = make_shapes(6, seed=3)
    return [np.asarray(camlens.models.load("shapes-2head").to_display(data.images[i:i + 1])[0]) for i in range(6)]


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = api.explain
    assert camlens.explain is real  # camlens' lazy name resolved before the patch: the tests' own calls are real

    def spy(model, x, *a, **k):
        seen.append(int(x.shape[0]))
        return real(model, x, *a, **k)

    monkeypatch.setattr(api, "explain", spy)
    return seen


def test_results_equal_single_image_explanations_in_order(shapes_model, pictures, tmp_path, calls):
    paths = []
    for i, pic in enumerate(pictures):
        if i == 3:  # a different size in the middle: its own group
            pic = np.asarray(Image.fromarray(pic).resize((96, 80)))
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(pic).save(paths[-1])
    # NCHW for batches too (the automatic NHWC of batches differs from batch 1 by float32 rounding)
    kw = dict(targets=["shape:0", "colour:1"], channels_last=False)
    out = list(camlens.stream(shapes_model, paths, batch_size=2, **kw))
    assert [r.source for r in out] == [str(p) for p in paths]
    assert calls == [2, 1, 1, 2]  # [0 1] [2] | [3] | [4 5]: a size change flushes the group
    for r, p in zip(out, paths):
        ref = camlens.explain(shapes_model, str(p), **kw)
        assert r.maps.shape == ref.maps.shape and r.maps.shape[0] == 1
        torch.testing.assert_close(r.maps, ref.maps, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.scores, ref.scores, atol=1e-5, rtol=1e-5)
        assert r.labels == ref.labels and r.display.shape == (1, *ref.maps.shape[-2:], 3)
        np.testing.assert_array_equal(r.display, ref.display)


def test_tensors_batches_progress_and_laziness(shapes_model, calls):
    x = make_shapes(5, seed=0).images
    seen = []
    out = list(camlens.stream(shapes_model.model, [x[:3], x[3], x[4]], targets=[1], layer="features",
                              batch_size=4, progress=lambda d, t, s: seen.append((d, t, s)), channels_last=False))
    assert [r.source for r in out] == [(0, 0), (0, 1), (0, 2), 1, 2]
    assert calls == [4, 1]
    ref = camlens.explain(shapes_model.model, x, targets=[1], layer="features", channels_last=False)
    torch.testing.assert_close(torch.cat([r.maps for r in out]), ref.maps, atol=1e-5, rtol=0)
    assert seen == [(1, 3, 0), (2, 3, 1), (3, 3, 2)]  # per input: the batch of 3 is one input of the 3
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield x[i % 5]

    it = camlens.stream(shapes_model.model, gen(), targets=[1], layer="features", batch_size=2)
    first = next(it)
    assert first.source == 0 and len(pulled) <= 3  # lazy: it did not read the whole generator


def test_one_bad_input_costs_only_itself(shapes_model, pictures, tmp_path, calls):
    good = tmp_path / "good.png"
    Image.fromarray(pictures[0]).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    nan = shapes_model.preprocess(pictures[1])
    nan[0, 0, 3, 3] = float("nan")
    items = [("a", str(good)), ("b", str(bad)), ("c", pictures[2]), ("d", nan), ("e", pictures[3])]
    out = list(camlens.stream(shapes_model, items, keyed=True, targets=["shape:0"], on_error="yield",
                              batch_size=4))
    assert [r.source for r in out] == ["a", "b", "c", "d", "e"]
    assert [type(r).__name__ for r in out] == ["Explanation", "Failure", "Explanation", "Failure", "Explanation"]
    assert isinstance(out[1].error, InputError) and "cannot read image" in str(out[1].error) and out[1].index == 1
    assert isinstance(out[3].error, InputError) and "NaN" in str(out[3].error)
    assert calls == [4, 1, 1, 1, 1]  # a, c, d, e in one batch (b waits in its place); d fails it: one by one
    with pytest.raises(InputError, match="cannot read image"):
        list(camlens.stream(shapes_model, [str(good), str(bad)], targets=["shape:0"]))


def test_usage_errors_are_raised_whatever_on_error(shapes_model, pictures):
    with pytest.raises(LayerNotFoundError):
        list(camlens.stream(shapes_model, pictures[:2], layer="nope", on_error="yield"))
    with pytest.raises(ConfigError, match="same targets for every input"):
        list(camlens.stream(shapes_model, pictures[:2], targets=[[0], [1]]))
    with pytest.raises(ConfigError, match="preprocessed tensors"):
        list(camlens.stream(shapes_model.model, ["cat.jpg"]))
    with pytest.raises(ConfigError, match="batch_size"):
        list(camlens.stream(shapes_model, pictures[:2], batch_size=0))
    with pytest.raises(ConfigError, match="on_error"):
        list(camlens.stream(shapes_model, pictures[:2], on_error="skip"))


def test_explanation_image_slices_every_batched_field(shapes_model):
    x = make_shapes(3, seed=1).images
    exp = camlens.explain(shapes_model.model, x, targets=["shape:0", "colour:2"], layer="features",
                          combine="mean")
    one = exp.image(-1)
    assert one.maps.shape[0] == 1 and torch.equal(one.maps, exp.maps[2:])
    assert torch.equal(one.raw, exp.raw[2:]) and torch.equal(one.inputs, exp.inputs[2:])
    assert all(torch.equal(one.heads[k], exp.heads[k][2:]) for k in exp.heads)
    assert one.targets == [exp.targets[2]] and one.components == [exp.components[2]]
    with pytest.raises(InputError, match="out of range"):
        exp.image(3)


@pytest.mark.parametrize("command, out", [("explain", "o"), ("report", "r.html"), ("localize", "loc")])
def test_the_cli_runs_through_stream(shapes_model, pictures, tmp_path, monkeypatch, command, out):
    from typer.testing import CliRunner

    from camlens.fronts.cli import app

    for i in range(2):
        Image.fromarray(pictures[i]).save(tmp_path / f"s{i}.png")
    (tmp_path / "bad.png").write_text("nope")
    used = []
    real = camlens.stream
    monkeypatch.setattr(camlens, "stream", lambda *a, **k: used.append(k.get("on_error")) or real(*a, **k))
    res = CliRunner().invoke(app, [command, str(tmp_path / "s0.png"), str(tmp_path / "bad.png"), str(tmp_path / "s1.png"),
                                   "--model", "shapes-2head", "--out", str(tmp_path / out)])
    assert used == ["yield"] and res.exit_code == 1, res.output  # the bad file reported, the others done
    assert (tmp_path / out).exists()
    if command != "report":
        import json

        summary = json.loads((tmp_path / out / "summary.json").read_text())
        assert [e["image"] for e in summary["images"]] == [str(tmp_path / f"s{i}.png") for i in range(2)]
        assert [e["image"] for e in summary["errors"]] == [str(tmp_path / "bad.png")]


def test_method_options_named_like_streams_own_parameters_pass_through_options():
    """Score-CAM's ``batch_size`` (masked inputs per forward) is also stream's (images per call):
    ``options=`` hands it to the method untouched; a name given both ways is refused."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()
    xs = [torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    got = list(camlens.stream(net, xs, [1], layer="1", method="scorecam", batch_size=2, options={"batch_size": 4}))
    want = camlens.explain(net, torch.stack(xs), targets=[1], layer="1", method="scorecam", batch_size=4)
    assert [e.options["batch_size"] for e in got] == [4, 4, 4]
    assert torch.allclose(torch.cat([e.maps for e in got]), want.maps, atol=1e-6)
    with pytest.raises(ConfigError, match="scorecam.*batch_size|batch_size.*scorecam"):  # the method's own check
        list(camlens.stream(net, xs, [1], layer="1", method="scorecam", options={"batch_size": 0}))
    with pytest.raises(ConfigError, match="both in options= and as keyword"):
        list(camlens.stream(net, xs, [1], layer="1", method="scorecam", options={"layer": "1"}))
