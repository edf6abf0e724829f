"""Every registered method on a two-head model: per head, the same map as a single-head model of that head."""

import pytest
import torch
from torch import nn

import camlens


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.ReLU())

    def forward(self, x):
        return self.features(x)


class TokenTrunk(nn.Module):
    """For the transformer methods (``needs_attention``): class token + 4x4 patches through one
    ``nn.TransformerEncoderLayer``; the class token out as a (B, 12, 1, 1) map."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 4, stride=4)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, 12))
        self.block = nn.TransformerEncoderLayer(12, 2, dim_feedforward=24, dropout=0.0, batch_first=True)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.block(torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1))[:, 0, :, None, None]


class TwoHead(nn.Module):
    def __init__(self, trunk=None):
        super().__init__()
        self.trunk = trunk if trunk is not None else Trunk()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.shape = nn.Linear(12, 4)
        self.colour = nn.Linear(12, 3)

    def forward(self, x):
        f = self.pool(self.trunk(x)).flatten(1)
        return {"shape": self.shape(f), "colour": self.colour(f)}


class OneHead(nn.Module):
    """The same trunk and one of the heads, sharing the two-head model's modules."""

    def __init__(self, two: TwoHead, head: str):
        super().__init__()
        self.trunk, self.pool, self.fc = two.trunk, two.pool, getattr(two, head)

    def forward(self, x):
        return self.fc(self.pool(self.trunk(x)).flatten(1))


METHODS = sorted(camlens.available_methods())
FAST = {"occlusion": {"patch": 4, "stride": 4}, "scorecam": {"batch_size": 16}, "ablationcam": {"batch_size": 16}}
# RISE (drise on class targets) centres each score over its masks: the two models' float32 scores,
# ~1e-7 apart, differ relatively more once centred (measured 7e-5 on the min-max maps)
ATOL = {"drise": 5e-4}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_per_head_equals_single_head_model(method):
    torch.manual_seed(0)
    two = TwoHead(TokenTrunk() if camlens.methods.get_method(method).needs_attention else None).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    opts = {k: v for k, v in FAST.get(method, {}).items() if k in camlens.methods.get_method(method).options}
    exp = camlens.explain(two, x, targets=["shape:1", "colour:2", "shape:3"], layer="trunk", method=method, **opts)
    assert exp.maps.shape == (2, 3, 16, 16)
    assert torch.isfinite(exp.maps).all()
    for t, (head, cls) in enumerate([("shape", 1), ("colour", 2), ("shape", 3)]):
        single = camlens.explain(OneHead(two, head).eval(), x, targets=cls, layer="trunk", method=method, **opts)
        assert torch.allclose(exp.maps[:, t], single.maps[:, 0], atol=ATOL.get(method, 1e-5)), (method, head,
                                                                             (exp.maps[:, t] - single.maps[:, 0]).abs().max())
        assert torch.allclose(exp.scores[:, t], single.scores[:, 0], atol=1e-6)


def test_methods_are_listed_with_description_and_cost():
    from typer.testing import CliRunner

    from camlens.fronts.cli import app

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0
    for name, m in camlens.available_methods().items():
        assert name in res.output
        assert m.description and m.cost
    expected = {"gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam", "cam",
                "scorecam", "ablationcam", "guided_backprop", "guided_gradcam", "occlusion"}
    assert expected <= set(camlens.available_methods())
