"""README "What camlens guarantees about your model", bullet by bullet, for every method family:
``.grad`` untouched, eval mode and frozen parameters during the call only, where the autograd graph
starts, and tensors on the model's device."""

import pytest
import torch
from torch import nn

import camlens


class Spy(nn.Module):
    """Records, at each call, grad mode, its own training flag and the first parameter's requires_grad."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x):
        p = next(self.inner.parameters())
        self.seen.append((torch.is_grad_enabled(), self.training, p.requires_grad))
        return self.inner(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Spy(nn.Conv2d(3, 6, 3, padding=1))
        self.body = Spy(nn.Sequential(nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()))
        self.head = Spy(nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


METHODS = ["gradcam", "gradcampp", "layercam", "cam", "scorecam", "ablationcam", "eigencam",
           "guided_backprop", "guided_gradcam", "occlusion"]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().train()


def _x():
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS)
def test_grad_untouched_modes_and_flags_restored(net, method):
    # some parameters carry a .grad from the user's own training step, others have none
    net.stem.inner.weight.grad = torch.full_like(net.stem.inner.weight, 0.5)
    net.head.inner.weight.requires_grad_(False)
    before = {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}
    kw = {"patch": 5, "stride": 5} if method == "occlusion" else {}
    exp = camlens.explain(net, _x(), targets=[1, 3], layer="body", method=method, **kw)
    assert exp.maps.shape == (2, 2, 10, 10) and exp.maps.device == _x().device
    for n, p in net.named_parameters():
        rg, g = before[n]
        assert p.requires_grad == rg, n
        assert (p.grad is None) == (g is None), n
        if g is not None:
            assert torch.equal(p.grad, g), n
    assert all(m.training for m in net.modules()) and torch.is_grad_enabled()
    # during the call: eval mode and frozen parameters in every forward
    seen = net.stem.seen + net.body.seen + net.head.seen
    assert seen and all(not training and not rg for _, training, rg in seen)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "hirescam", "xgradcam", "eigengradcam"])
def test_layer_methods_record_no_graph_before_the_layer(net, method):
    camlens.explain(net, _x(), targets=[1, 3], layer="body", method=method)
    assert net.stem.seen and not any(g for g, _, _ in net.stem.seen)  # the forward before the layer: no graph
    assert any(g for g, _, _ in net.head.seen)  # after it: the graph for the gradients


def test_perturbation_methods_record_no_graph(net):
    for method in ("scorecam", "ablationcam", "occlusion", "cam", "eigencam"):
        kw = {"patch": 5, "stride": 5} if method == "occlusion" else {}
        for s in (net.stem, net.body, net.head):
            s.seen.clear()
        camlens.explain(net, _x(), targets=[1, 3], layer="body", method=method, **kw)
        seen = net.stem.seen + net.body.seen + net.head.seen
        assert seen and not any(g for g, _, _ in seen), method


def test_input_gradient_methods_record_from_the_input(net):
    camlens.explain(net, _x(), targets=[1, 3], method="guided_backprop")
    assert any(g for g, _, _ in net.stem.seen)
