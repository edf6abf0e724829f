"""activation=: multi-label (sigmoid) heads for exp.probs and combine="confidence"."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.core.activations import head_activations, model_activation
from camlens.core.targets import _find_head

S = 24


class TwoHeads(nn.Module):
    """``{"attrs": (B, 5) multi-label logits, "species": (B, 3) single-label logits}``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.attrs = nn.Linear(6, 5)
        self.species = nn.Linear(6, 3)

    def forward(self, x):
        f = self.body(x).mean((2, 3))
        return {"attrs": 3 * self.attrs(f), "species": self.species(f)}


class HFLike(nn.Module):
    """A HuggingFace-style classifier: ``config.problem_type`` and an output with ``logits``."""

    def __init__(self, problem_type):
        super().__init__()
        self.config = SimpleNamespace(problem_type=problem_type)
        self.net = TwoHeads()

    def forward(self, x):
        return {"logits": self.net(x)["attrs"]}


@pytest.fixture(scope="module")
def model():
    return TwoHeads().eval()


def _x(b=2, seed=0):
    return torch.randn(b, 3, S, S, generator=torch.Generator().manual_seed(seed))


def test_sigmoid_probs_are_the_gathered_sigmoids(model):
    x = _x()
    logits = model(x)["attrs"].detach()
    exp = camlens.explain(model, x, ["attrs:0", "attrs:3", "attrs:4"], layer=model.body[2], activation="sigmoid")
    ref = torch.sigmoid(logits)[:, [0, 3, 4]]
    assert torch.allclose(exp.probs, ref, atol=1e-6), (exp.probs - ref).abs().max()
    soft = camlens.explain(model, x, ["attrs:0", "attrs:3", "attrs:4"], layer=model.body[2])  # default: softmax
    assert torch.allclose(soft.probs, torch.softmax(logits, 1)[:, [0, 3, 4]], atol=1e-6)
    assert (soft.probs - exp.probs).abs().max() > 0.05  # the two really differ here
    assert torch.allclose(exp.maps, soft.maps)  # the activation never changes what is explained


def test_per_head_activation(model):
    x = _x(seed=1)
    out = {k: v.detach() for k, v in model(x).items()}
    exp = camlens.explain(model, x, ["attrs:1", "species:2", "attrs:2", "species:0"], layer=model.body[2],
                          activation={"attrs": "sigmoid"})  # species keeps its default, softmax
    ref = torch.stack([torch.sigmoid(out["attrs"])[:, 1], torch.softmax(out["species"], 1)[:, 2],
                       torch.sigmoid(out["attrs"])[:, 2], torch.softmax(out["species"], 1)[:, 0]], 1)
    assert torch.allclose(exp.probs, ref, atol=1e-6)
    both = camlens.explain(model, x, ["attrs:1", "species:2"], layer=model.body[2],
                           activation={"attrs": "sigmoid", 1: "none"})  # a head by position, 'none': NaN
    assert torch.allclose(both.probs[:, 0], ref[:, 0], atol=1e-6) and torch.isnan(both.probs[:, 1]).all()


def test_confidence_weights_are_normalised_sigmoids(model):
    x = _x(seed=2)
    tg = ["attrs:0", "attrs:2", "attrs:4"]
    sep = camlens.explain(model, x, tg, layer=model.body[2], activation="sigmoid")
    comb = camlens.explain(model, x, tg, layer=model.body[2], activation="sigmoid", combine="confidence")
    p = torch.sigmoid(model(x)["attrs"].detach())[:, [0, 2, 4]]
    w = p / p.sum(1, keepdim=True)  # (B, T)
    ref = (w[:, :, None, None] * sep.raw).sum(1)  # Grad-CAM's raw map is linear in the gradients
    assert torch.allclose(comb.raw[:, 0], ref, atol=1e-5), (comb.raw[:, 0] - ref).abs().max()
    q = torch.softmax(model(x)["attrs"].detach(), 1)[:, [0, 2, 4]]
    soft = ((q / q.sum(1, keepdim=True))[:, :, None, None] * sep.raw).sum(1)
    assert (soft - ref).abs().max() > 1e-3 * ref.abs().max()  # softmax weights would give another map
    assert torch.allclose(comb.scores[:, 0], (w * sep.scores).sum(1), atol=1e-5)
    with pytest.raises(camlens.CamlensError, match="no probability"):
        camlens.explain(model, x, tg, layer=model.body[2], activation="none", combine="confidence")


def test_top_class_and_top_k_of_a_multilabel_head(model):
    x = _x(3, seed=3)
    logits = model(x)["attrs"].detach()
    exp = camlens.explain(model, x, layer=model.body[2], heads="attrs", activation="sigmoid")
    assert [row[0].cls for row in exp.targets] == logits.argmax(1).tolist()  # the highest probability
    assert torch.allclose(exp.probs[:, 0], torch.sigmoid(logits).max(1).values, atol=1e-6)
    top = camlens.explain(model, x, layer=model.body[2], heads="attrs", activation="sigmoid", top_k=3)
    assert [[t.cls for t in row] for row in top.targets] == torch.sigmoid(logits).topk(3, 1).indices.tolist()
    assert (top.probs[:, :-1] >= top.probs[:, 1:]).all()


def test_problem_type_of_a_hf_style_model_means_sigmoid():
    m = HFLike("multi_label_classification").eval()
    x = _x(seed=4)
    exp = camlens.explain(m, x, [0, 1], layer=m.net.body[2])
    assert torch.allclose(exp.probs, torch.sigmoid(m(x)["logits"].detach())[:, :2], atol=1e-6)
    assert exp.targets[0][0].activation == "sigmoid"
    one = HFLike("single_label_classification").eval()
    one.net.load_state_dict(m.net.state_dict())
    single = camlens.explain(one, x, [0], layer=one.net.body[2])
    assert torch.allclose(single.probs[:, 0], torch.softmax(m(x)["logits"].detach(), 1)[:, 0], atol=1e-6)
    forced = camlens.explain(m, x, [0], layer=m.net.body[2], activation="softmax")  # given beats documented
    assert torch.allclose(forced.probs[:, 0], single.probs[:, 0], atol=1e-6)
    assert model_activation(nn.Linear(2, 2), None) is None  # a module without config: the defaults


def test_binary_logit_with_sigmoid():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()
    x = _x(seed=5)
    exp = camlens.explain(net, x, layer=net[1], activation="sigmoid")  # (B, 1): the value, targets=None
    assert torch.allclose(exp.probs[:, 0], torch.sigmoid(net(x)[:, 0]).detach(), atol=1e-6)
    assert torch.isnan(camlens.explain(net, x, layer=net[1]).probs).all()  # default 'none' for a value


def test_unknown_activation_or_head_is_a_clear_error(model):
    x = _x(1)
    with pytest.raises(camlens.CamlensError, match=r"unknown activation 'softplus'.*'softmax', 'sigmoid', 'none'"):
        camlens.explain(model, x, "attrs:0", layer=model.body[2], activation="softplus")
    with pytest.raises(camlens.CamlensError, match=r"no model output 'colour'.*\['attrs', 'species'\]"):
        camlens.explain(model, x, "attrs:0", layer=model.body[2], activation={"colour": "sigmoid"})
    with pytest.raises(camlens.CamlensError, match="for head 'attrs'"):
        head_activations({"attrs": "relu"}, {"attrs": np.zeros((1, 2))}, _find_head)
    with pytest.raises(camlens.CamlensError, match="takes a name"):
        camlens.explain(model, x, "attrs:0", layer=model.body[2], activation=["sigmoid"])


def test_evaluate_reads_the_targets_activation_and_sign(model):
    """Average Drop, 100 max(0, Y - O) / Y with Y, O the target's probability on x and on x * map:
    the sigmoid for a multi-label target, sigmoid(-z) = 1 - sigmoid(z) for a decrease."""
    x = _x(2, seed=6)
    exp = camlens.explain(model, x, ["attrs:2", camlens.Target("attrs", 3, sign=-1)], layer=model.body[2],
                          activation="sigmoid")
    got = camlens.evaluate(model, x, exp, metrics=["average_drop"])["average_drop"]
    z = model(x)["attrs"].detach()
    ref = torch.zeros(2, 2)
    for t, (c, sgn) in enumerate([(2, 1), (3, -1)]):
        zo = model(x * exp.maps[:, t, None])["attrs"].detach()
        y, o = torch.sigmoid(sgn * z[:, c]), torch.sigmoid(sgn * zo[:, c])
        ref[:, t] = 100 * (y - o).clamp(min=0) / y
    assert torch.allclose(torch.as_tensor(got).float(), ref, atol=1e-4), (got, ref)
    assert (ref > 0.5).all()  # a real drop everywhere, so a wrong probability would show
