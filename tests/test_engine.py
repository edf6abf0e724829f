"""The engine's guarantees: model state restored, one forward, batched targets, clear errors."""

import collections
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import camlens
from camlens import Target


def snapshot(model):
    """Everything camlens promises to leave unchanged."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_backward_pre_hooks", {}))) for m in model.modules()],
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same(a, b):
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    assert a["hooks"] == b["hooks"]
    assert a["grad_enabled"] == b["grad_enabled"]
    for ga, gb in zip(a["grad"], b["grad"]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.unused = nn.Conv2d(16, 16, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.bn(self.conv1(x)))))


class DictTwoHead(nn.Module):
    """Two heads on a shared trunk, returned as a dict."""

    def __init__(self):
        super().__init__()
        self.trunk = Trunk()
        self.species = nn.Linear(16, 5)
        self.colour = nn.Linear(16, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        f = self.trunk.drop(self.trunk(x).mean((2, 3)))
        return {"species": self.species(f), "colour": self.colour(f)}


class TupleTwoHead(DictTwoHead):
    def forward(self, x):
        out = super().forward(x)
        return out["species"], out["colour"]


Heads = collections.namedtuple("Heads", ["species", "colour"])


class NamedTupleTwoHead(DictTwoHead):
    def forward(self, x):
        return Heads(**super().forward(x))


@dataclasses.dataclass
class Out:
    species: torch.Tensor
    colour: torch.Tensor
    extra: object = None


class DataclassTwoHead(DictTwoHead):
    def forward(self, x):
        return Out(**super().forward(x))


def _x(b=2, s=16):
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def test_state_restored_after_call_and_after_error():
    model = DictTwoHead().train()
    model.trunk.conv1.weight.requires_grad_(False)
    model.species.weight.grad = torch.ones_like(model.species.weight)
    model.trunk.bn.running_mean.fill_(0.3)
    before = snapshot(model)
    exp = camlens.explain(model, _x(), targets=["species:1", "colour:2"], layer="trunk.conv2")
    assert exp.maps.shape == (2, 2, 16, 16)
    assert_same(before, snapshot(model))
    assert model.species.bias.grad is None
    # an error after the forward (class out of range) and one inside the forward
    with pytest.raises(IndexError, match="out of range"):
        camlens.explain(model, _x(), targets="species:9", layer="trunk.conv2")
    assert_same(before, snapshot(model))
    with pytest.raises(RuntimeError):
        camlens.explain(model, torch.randn(2, 4, 16, 16), targets=0, layer="trunk.conv2")
    assert_same(before, snapshot(model))
    with torch.no_grad():
        camlens.explain(model, _x(), targets=0, layer="trunk")
    assert torch.is_grad_enabled()


def test_model_in_train_mode_is_explained_in_eval_mode():
    model = DictTwoHead()
    x = _x()
    ref = camlens.explain(model.eval(), x, targets=0, layer="trunk").maps
    model.train()
    got = camlens.explain(model, x, targets=0, layer="trunk").maps  # dropout and batch-stat BN off
    assert torch.allclose(ref, got)
    assert model.training and model.trunk.drop.training


@pytest.mark.parametrize("cls", [DictTwoHead, TupleTwoHead, NamedTupleTwoHead, DataclassTwoHead])
def test_multi_head_targets_in_one_forward_equal_separate_calls(cls):
    torch.manual_seed(0)
    model = cls().eval()
    named = cls is not TupleTwoHead
    h0, h1 = ("species", "colour") if named else (0, 1)
    specs = [f"{h0}:1", (h1, 2), Target(head=h0, cls=4), f"{h1}:0"]
    x = _x()
    model.calls = 0
    exp = camlens.explain(model, x, targets=specs, layer="trunk.conv2")
    assert model.calls == 1  # ONE forward for all targets, across heads
    assert exp.maps.shape == (2, 4, 16, 16)
    assert [t.head for t in exp.targets[0]] == [h0, h1, h0, h1]
    assert [t.cls for t in exp.targets[0]] == [1, 2, 4, 0]
    for t, spec in enumerate(specs):
        single = camlens.explain(model, x, targets=spec, layer="trunk.conv2")
        assert torch.allclose(exp.maps[:, t], single.maps[:, 0], atol=1e-6)
        assert torch.allclose(exp.raw[:, t], single.raw[:, 0], atol=1e-6)
    # the scores are the heads' logits
    out = model(x)
    species = out["species"] if isinstance(out, dict) else (out[0] if not named or cls is NamedTupleTwoHead else out.species)
    assert torch.allclose(exp.scores[:, 0], species[:, 1].detach(), atol=1e-6)


def test_one_backward_for_all_targets(monkeypatch):
    model = DictTwoHead().eval()
    calls = []
    real = torch.autograd.grad

    def counting(*a, **k):
        calls.append(k.get("is_grads_batched", False))
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    camlens.explain(model, _x(), targets=["species:0", "species:1", "colour:2"], layer="trunk.conv2")
    assert calls == [True]


def test_top_k_per_head_and_probabilities():
    model = DictTwoHead().eval()
    x = _x()
    exp = camlens.explain(model, x, top_k=2, layer="trunk")
    assert exp.maps.shape == (2, 4, 16, 16)
    out = model(x)
    for b in range(2):
        assert [t.cls for t in exp.targets[b][:2]] == out["species"][b].topk(2).indices.tolist()
        assert [t.cls for t in exp.targets[b][2:]] == out["colour"][b].topk(2).indices.tolist()
        p = out["species"][b].softmax(0)
        assert torch.allclose(exp.probs[b, 0], p[exp.targets[b][0].cls], atol=1e-6)


def test_callable_target_and_per_image_targets():
    model = DictTwoHead().eval()
    x = _x()
    fn = lambda out: out["species"][:, 1] - out["colour"][:, 0]  # noqa: E731
    exp = camlens.explain(model, x, targets=fn, layer="trunk")
    out = model(x)
    assert torch.allclose(exp.scores[:, 0], (out["species"][:, 1] - out["colour"][:, 0]).detach(), atol=1e-6)
    per = camlens.explain(model, x, targets=[["species:1"], ["colour:2"]], layer="trunk")
    assert torch.allclose(per.maps[0, 0], camlens.explain(model, x[:1], targets="species:1", layer="trunk").maps[0, 0], atol=1e-6)
    assert torch.allclose(per.maps[1, 0], camlens.explain(model, x[1:], targets="colour:2", layer="trunk").maps[0, 0], atol=1e-6)
    with pytest.raises(ValueError, match="2 images"):
        camlens.explain(model, x, targets=[["species:1"]], layer="trunk")  # shorter than the batch
    with pytest.raises(ValueError, match="same non-zero length"):
        camlens.explain(model, x, targets=[["species:1"], ["species:1", "colour:0"]], layer="trunk")


def test_class_names_in_targets():
    model = DictTwoHead().eval()
    cats = {"species": ["cat", "dog", "cow", "eel", "owl"], "colour": ["red", "green", "blue"]}
    exp = camlens.explain(model, _x(), targets=["species:dog", "colour:blue"], layer="trunk", categories=cats)
    assert [(t.head, t.cls, t.label) for t in exp.targets[0]] == [("species", 1, "species: dog"),
                                                                  ("colour", 2, "colour: blue")]
    with pytest.raises(ValueError, match="no class named 'do'.*dog"):
        camlens.explain(model, _x(), targets="species:do", layer="trunk", categories=cats)


def test_errors_are_actionable():
    model = DictTwoHead().eval()
    with pytest.raises(KeyError, match="trunk.conv2"):
        camlens.explain(model, _x(), targets=0, layer="trunk.conv3")
    with pytest.raises(RuntimeError, match="never called"):
        camlens.explain(model, _x(), targets=0, layer="trunk.unused")
    with pytest.raises(KeyError, match="species.*colour"):
        camlens.explain(model, _x(), targets="shape:1", layer="trunk")
    with pytest.raises(RuntimeError, match="do not depend on"):
        camlens.explain(model, _x(), targets=lambda out: out["species"][:, 0].detach() * 0 + 1, layer="trunk")


class ReusedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))


def test_layer_called_twice_is_an_error():
    with pytest.raises(RuntimeError, match="called 2 times"):
        camlens.explain(ReusedRelu().eval(), _x(), targets=0, layer="act")


def test_inplace_ops_after_captured_layer(resnet18):
    """layer4.1.bn2's output is modified in place (+= identity, ReLU(inplace)); we capture its true value."""
    x = _x(1, 64)
    store = {}
    h = resnet18.layer4[1].bn2.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.clone()))
    try:
        exp = camlens.explain(resnet18, x, targets=3, layer="layer4.1.bn2")
    finally:
        h.remove()
    assert torch.isfinite(exp.maps).all() and exp.maps.max() == 1
    # raw = sum_c w_c A_c with the pre-in-place activations: recompute w from the model's linear tail
    a = store["a"].requires_grad_(True)
    block = resnet18.layer4[1]
    with torch.no_grad():
        identity = resnet18.layer4[0](resnet18.layer3(resnet18.layer2(resnet18.layer1(
            resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))))))
    y = resnet18.fc(torch.relu(a + identity).mean((2, 3)))
    g, = torch.autograd.grad(y[0, 3], a)
    raw = (g.mean((2, 3), keepdim=True) * a).sum(1).detach()
    assert torch.allclose(exp.raw[:, 0], raw, atol=1e-5, rtol=1e-4)
    assert block.relu.inplace


def test_constant_maps_are_zero_with_warning():
    model = DictTwoHead().eval()
    with torch.no_grad():
        model.species.weight.zero_()
    with pytest.warns(RuntimeWarning, match="constant"):
        exp = camlens.explain(model, _x(), targets="species:0", layer="trunk")
    assert torch.equal(exp.maps, torch.zeros_like(exp.maps))
    assert torch.isfinite(exp.maps).all()


def test_regression_head_and_default_layer():
    class Reg(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = Trunk()
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            return {"age": self.head(self.trunk(x).mean((2, 3))).squeeze(1)}

    exp = camlens.explain(Reg().eval(), _x(), targets="age:", layer=None)
    assert exp.layers == ["trunk"]
    assert exp.targets[0][0].cls is None and exp.maps.shape == (2, 1, 16, 16)


def test_numpy_copies():
    exp = camlens.explain(DictTwoHead().eval(), _x(), targets=["species:0"], layer="trunk")
    n = exp.numpy()
    assert n["maps"].shape == (2, 1, 16, 16) and n["maps"].dtype.name == "float32"
    assert n["labels"] == [["species: 0"], ["species: 0"]]
    assert 0.0 <= n["maps"].min() and n["maps"].max() <= 1.0


class ModelOutput(collections.OrderedDict):
    """A stand-in for transformers' ModelOutput: an OrderedDict whose None fields are absent."""

    def __getattr__(self, k):
        return self[k]


class HFStyle(DictTwoHead):
    def forward(self, x):
        out = super().forward(x)
        return ModelOutput(logits=out["species"], colour_logits=out["colour"])


def test_hf_style_output_and_layer_as_module():
    model = HFStyle().eval()
    x = _x()
    exp = camlens.explain(model, x, targets=["logits:1", "colour_logits:2", "1:2"], layer=model.trunk.conv2)
    assert exp.layers == ["trunk.conv2"]
    assert [t.head for t in exp.targets[0]] == ["logits", "colour_logits", "colour_logits"]
    assert torch.allclose(exp.maps[:, 1], exp.maps[:, 2])
    ref = camlens.explain(model, x, targets="logits:1", layer="trunk.conv2")
    assert torch.allclose(exp.maps[:, 0], ref.maps[:, 0])
    with pytest.raises(ValueError, match="not a submodule"):
        camlens.explain(model, x, targets=0, layer=nn.Conv2d(3, 3, 1))


def test_loop_fallback_when_vmap_is_unavailable(monkeypatch):
    """Ops without a vmap rule: the engine falls back to one backward per target, same maps."""
    model = DictTwoHead().eval()
    x = _x()
    specs = ["species:0", "species:3", "colour:1"]
    batched = camlens.explain(model, x, targets=specs, layer="trunk.conv2")
    real = torch.autograd.grad
    calls = []

    def no_vmap(*a, **k):
        calls.append(k.get("is_grads_batched", False))
        if k.get("is_grads_batched"):
            raise RuntimeError("vmap: batching rule not implemented for aten::some_op")
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = camlens.explain(model, x, targets=specs, layer="trunk.conv2")
    assert calls == [True, False, False, False]
    assert torch.allclose(batched.maps, looped.maps, atol=1e-6)
    assert torch.allclose(batched.raw, looped.raw, atol=1e-6)
