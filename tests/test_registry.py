"""One registry type for methods and metrics: one lookup rule, duplicate names refused, close-name
hints, third-party plug-ins through entry points, and the `camlens methods` / `camlens metrics` lists."""

import importlib.metadata
import sys
import textwrap
import warnings

import pytest
from typer.testing import CliRunner

import camlens
from camlens import registry
from camlens.core.errors import ConfigError
from camlens.methods import base as methods_base
from camlens.metrics import base as metrics_base


def test_one_lookup_rule_for_methods_and_metrics():
    assert camlens.methods.get_method("Grad-CAM_PP").name == "gradcampp"
    assert camlens.metrics.get_metric("ROAD-MoRF").name == "road_morf"
    assert camlens.metrics.get_metric("roadmorf").name == "road_morf"
    with pytest.raises(ConfigError, match=r"unknown metric 'delet'; did you mean 'deletion'"):
        camlens.metrics.get_metric("delet")
    with pytest.raises(ConfigError, match=r"unknown method 'gradcan'; did you mean 'gradcam'"):
        camlens.methods.get_method("gradcan")
    assert type(methods_base._REGISTRY) is type(metrics_base._METRICS) is registry.Registry


def test_a_name_that_exists_by_the_lookup_rule_is_refused():
    gradcam = camlens.methods.get_method("gradcam")
    import dataclasses

    with pytest.raises(ConfigError, match="method 'Grad_CAM' is already registered .as 'gradcam'"):
        camlens.methods.register(dataclasses.replace(gradcam, name="Grad_CAM"))
    assert "Grad_CAM" not in camlens.available_methods()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "camlens_test_plugin.py").write_text(textwrap.dedent('''
        import camlens
        from camlens.methods.base import GradientMethod

        def doubled(acts, grads):
            return 2 * (grads.mean((-2, -1))[..., None, None] * acts[:, None]).sum(2)

        TWICE = GradientMethod(name="twice_gradcam", description="2 x Grad-CAM (a test plug-in)", cost="as gradcam",
                               fn=doubled)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint("twice", "camlens_test_plugin:TWICE", "camlens.methods"),
           importlib.metadata.EntryPoint("broken", "camlens_no_such_module", "camlens.methods")]
    monkeypatch.setattr(registry, "_entry_points", lambda group: eps if group == "camlens.methods" else [])
    monkeypatch.setattr(methods_base._REGISTRY, "_plugins_loaded", False)
    yield
    methods_base._REGISTRY.pop("twice_gradcam", None)
    sys.modules.pop("camlens_test_plugin", None)


def test_entry_point_plugins_register_and_a_broken_one_only_warns(plugin):
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meth = camlens.methods.get_method("twice-gradcam")
    assert meth.name == "twice_gradcam"
    assert any("'broken'" in str(w.message) and "failed to load" in str(w.message) for w in caught)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = camlens.explain(net, x, targets=[1], layer="1", method="twice_gradcam", relu=False)
    b = camlens.explain(net, x, targets=[1], layer="1", method="gradcam", relu=False)
    torch.testing.assert_close(a.raw, 2 * b.raw)
    torch.testing.assert_close(a.maps, b.maps)  # min-max removes the factor 2
    assert "twice_gradcam" in camlens.available_methods()


def test_cli_lists_methods_and_metrics():
    from camlens.fronts.cli import app

    res = CliRunner().invoke(app, ["metrics"], env={"COLUMNS": "300"})  # Rich's width: rows on one line
    assert res.exit_code == 0, res.output
    for name, m in camlens.metrics.available_metrics().items():
        assert name in res.output
    assert "masks or boxes" in res.output and "↓" in res.output and "↑" in res.output
    last = {ln.split("│")[1].strip(): ln.split("│")[-2].strip() for ln in res.output.splitlines()
            if ln.count("│") >= 6 and ln.split("│")[1].strip()}
    assert last["road"] == "no" and last["deletion"] == "yes"  # the volumes column
    res = CliRunner().invoke(app, ["methods"], terminal_width=200)
    assert res.exit_code == 0 and all(n in res.output for n in camlens.available_methods())


@pytest.mark.parametrize("method, opts, kind, msg", [
    ("scorecam", {"batch_size": 0}, ConfigError, "scorecam batch_size must be a positive int, got 0"),
    ("scorecam", {"max_channels": 2.5}, ConfigError, r"max_channels must be a positive int or None \(all channels\)"),
    ("scorecam", {"weights": "softmax"}, ConfigError, "scorecam weights must be one of 'channel_softmax', "
                                                      "'class_probability', got 'softmax'"),
    ("gradcampp", {"alpha": "sum"}, ConfigError, "gradcampp alpha must be one of 'closed_form', 'spatial_sum'"),
    ("ablationcam", {"ratio": 1.5}, ConfigError, r"ablationcam ratio must be a number in \(0, 1\], got 1.5"),
    ("ablationcam", {"ablation_value": "x"}, ConfigError, "ablation_value must be a number or None"),
    ("occlusion", {"patch": (4, 0)}, TypeError, r"occlusion patch must be a positive int, or \(h, w\) / \(d, h, w\)"),
    ("occlusion", {"baseline": "mean"}, ConfigError, "a number, a tensor or 'blur'"),
    ("occlusion", {"blur_sigma": -1}, ConfigError, "blur_sigma must be a number > 0"),
    ("guided_backprop", {"clip": 0}, ConfigError, r"clip must be a number in \(0, 1\], got 0 \(a quantile"),
    ("guided_gradcam", {"interpolate": "cubic"}, ConfigError, "interpolate must be one of 'nearest', 'bilinear'"),
    ("center", {"sigma": float("nan")}, ConfigError, "center sigma must be a number > 0"),
    ("random", {"random_seed": True}, ConfigError, "random_seed must be an int"),
])
def test_typed_method_options_are_checked_before_any_work(method, opts, kind, msg):
    import torch

    class Boom(torch.nn.Module):  # the model must not run: options are checked first
        def forward(self, x):
            raise AssertionError("the model ran")

    with pytest.raises(kind, match=msg):
        camlens.explain(Boom(), torch.zeros(1, 3, 8, 8), targets=[0], method=method, **opts)


def test_option_defaults_and_metric_options():
    import torch

    assert camlens.methods.get_method("scorecam").defaults == {"batch_size": 32, "max_channels": None,
                                                               "weights": "channel_softmax"}
    assert camlens.methods.get_method("occlusion").defaults["patch"] == 16
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3)).eval()
    x, maps = torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8)
    with pytest.raises(TypeError, match="metric 'deletion' has no option.*'stpe'.*step"):
        camlens.evaluate(net, x, maps, ["deletion"], targets=[0], options={"deletion": {"stpe": 2}})
    with pytest.raises(ConfigError, match="unknown metric 'insertoin'; did you mean 'insertion'"):
        camlens.evaluate(net, x, maps, ["deletion"], targets=[0], options={"insertoin": {"step": 2}})
    s = camlens.evaluate(net, x, maps, ["deletion"], targets=[0], options={"deletion": {"step": 16},
                                                                         "insertion": {"step": 2}})
    assert s.curves["deletion"].shape[-1] == 64 // 16 + 1  # its own option used; insertion's unused


@pytest.mark.parametrize("metric, opts, msg", [
    ("deletion", {"step": 0}, "deletion step must be a number > 0, got 0"),
    ("deletion", {"blur_kernel": 4}, "blur_kernel must be a positive odd int, got 4"),
    ("deletion", {"substrate": "noise"}, "substrate must be a number, 'blur', 'mean' or a tensor"),
    ("road", {"solver": "lu"}, "road solver must be one of 'auto', 'cg', 'spsolve'"),
    ("pointing_game", {"tolerance": -1}, "tolerance must be a number of pixels >= 0"),
    ("mprt", {"max_steps": 0}, "max_steps must be a positive int or None"),
])
def test_typed_metric_options_are_checked_before_any_work(metric, opts, msg):
    import torch

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the model ran")

    maps = torch.rand(1, 1, 8, 8)
    with pytest.raises(ConfigError, match=msg):
        camlens.evaluate(Boom(), torch.zeros(1, 3, 8, 8), maps, [metric], targets=[0], options={metric: opts},
                         masks=torch.ones(1, 8, 8, dtype=torch.bool))
