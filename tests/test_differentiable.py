"""explain(differentiable=True): maps that carry the autograd graph back to the model's parameters
and input (CAM losses in training). Checked with torch.autograd.gradcheck in float64 and against a
hand-written create_graph Grad-CAM; the model keeps its own mode and requires_grad."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.core.errors import ConfigError


class Functional(nn.Module):
    """A tiny CNN whose weights are plain tensors handed in (gradcheck's inputs), smooth (tanh)."""

    def __init__(self, w1, w2, fc):
        super().__init__()
        self.w1, self.w2, self.fc = w1, w2, fc
        self.feat = nn.Identity()

    def forward(self, x):
        a = torch.tanh(F.conv2d(x, self.w1, padding=1))
        a = self.feat(torch.tanh(F.conv2d(a, self.w2, padding=1)))
        return a.mean((2, 3)) @ self.fc.T


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return mk(3, 2, 3, 3), mk(4, 3, 3, 3), mk(3, 4), mk(2, 2, 5, 6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "xgradcam"])
@pytest.mark.parametrize("upsample", [False, True])
def test_gradcheck_maps_wrt_weights_and_input(method, upsample):
    w1, w2, fc, x = _weights()

    def f(w1, w2, fc, x):
        exp = camlens.explain(Functional(w1, w2, fc), x, targets=[0, 2], layer="feat", method=method,
                              differentiable=True, relu=False, upsample=upsample)
        return exp.maps

    maps = f(w1, w2, fc, x)
    assert maps.dtype == torch.float64 and maps.requires_grad and maps.shape == (2, 2, 5, 6)
    assert torch.autograd.gradcheck(f, (w1, w2, fc, x), eps=1e-6, atol=1e-5, rtol=1e-4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def _hand_gradcam(net, x, classes):
    """Grad-CAM by hand with create_graph: ReLU, bilinear upsample, min-max."""
    acts = {}
    h = net.body.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    logits = net(x)
    h.remove()
    a = acts["a"]
    maps = []
    for c in classes:
        g, = torch.autograd.grad(logits[:, c].sum(), a, create_graph=True)
        raw = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))  # (B, h, w)
        up = F.interpolate(raw[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
        maps.append((up - lo) / (hi - lo))
    return torch.stack(maps, 1), logits


def test_same_maps_and_parameter_gradients_as_by_hand_and_model_kept_as_it_came():
    torch.manual_seed(0)
    net = Net().train()  # a training step: train mode, BatchNorm statistics update once
    net.fc.bias.requires_grad_(False)  # the user's own freezing is kept
    ref_net = copy.deepcopy(net)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    exp = camlens.explain(net, x, targets=[1, 3], layer="body", differentiable=True)
    ref, ref_logits = _hand_gradcam(ref_net, x, [1, 3])
    torch.testing.assert_close(exp.maps, ref, atol=2e-5, rtol=0)
    assert all(m.training for m in net.modules()) and not net.fc.bias.requires_grad
    assert all(p.requires_grad for n, p in net.named_parameters() if n != "fc.bias")
    assert all(p.grad is None for p in net.parameters())  # autograd.grad: .grad untouched
    # BatchNorm statistics as after one plain training-mode forward (the hand-written one)
    torch.testing.assert_close(net.stem[1].running_mean, ref_net.stem[1].running_mean)
    assert int(net.stem[1].num_batches_tracked) == int(ref_net.stem[1].num_batches_tracked) == 1
    # the heads keep their graph: one forward gives a classification loss and a map loss
    torch.testing.assert_close(exp.heads[0], ref_logits)
    mask = torch.zeros(12, 12)
    mask[:, :6] = 1  # "look left": penalise map mass on the right half
    loss = F.cross_entropy(exp.heads[0], torch.tensor([1, 3])) + (exp.maps * (1 - mask)).mean()
    ref_loss = F.cross_entropy(ref_logits, torch.tensor([1, 3])) + (ref * (1 - mask)).mean()
    grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])
    ref_grads = torch.autograd.grad(ref_loss, [p for p in ref_net.parameters() if p.requires_grad])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    conv1 = dict(zip([n for n, p in net.named_parameters() if p.requires_grad], grads))["stem.0.weight"]
    assert conv1.abs().sum() > 0  # the graph reaches parameters BEFORE the explained layer


def test_default_maps_have_no_graph_and_the_model_is_frozen_during_the_call():
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 3, 12, 12)
    exp = camlens.explain(net, x, targets=[1, 3], layer="body")
    assert not exp.maps.requires_grad and not exp.scores.requires_grad
    assert not any(h.requires_grad for h in exp.heads.values())


def test_a_multi_target_batched_backward_matches_one_target_at_a_time():
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 3, 12, 12)
    both = camlens.explain(net, x, targets=[1, 3], layer="body", differentiable=True, method="layercam")
    one = [camlens.explain(net, x, targets=[t], layer="body", differentiable=True, method="layercam") for t in (1, 3)]
    torch.testing.assert_close(both.maps, torch.cat([o.maps for o in one], 1))
    g_both = torch.autograd.grad(both.maps.square().sum(), net.body[0].weight)[0]
    g_one = sum(torch.autograd.grad(o.maps.square().sum(), net.body[0].weight)[0] for o in one)
    torch.testing.assert_close(g_both, g_one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw, msg", [
    ({"method": "scorecam"}, "cannot return differentiable maps"),
    ({"method": "eigengradcam"}, "cannot return differentiable maps"),
    ({"tile": 8}, "does not combine with tile="),
    ({"aug_smooth": True}, "aug_smooth"),
    ({"noise_smooth": 2}, "noise_smooth"),
])
def test_unsupported_combinations_are_clear_errors(kw, msg):
    net, x = Net().eval(), torch.randn(1, 3, 12, 12)
    with pytest.raises(ConfigError, match=msg) as ei:
        camlens.explain(net, x, targets=[1], layer="body", differentiable=True, **kw)
    if "method" in kw:
        assert "gradcam" in str(ei.value) and "layercam" in str(ei.value)


def test_hooks_and_grad_mode_restored_also_after_an_error():
    torch.manual_seed(0)
    net, x = Net().train(), torch.randn(2, 3, 12, 12)
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()]
    with pytest.raises(IndexError):
        camlens.explain(net, x, targets=[50], layer="body", differentiable=True)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()] == hooks
    assert torch.is_grad_enabled() and all(m.training for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
