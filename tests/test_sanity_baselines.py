"""MPRT (cascading parameter randomisation) on a small trained CNN; the random and center baselines."""

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.methods import Method, MethodContext, MethodOutput, available_methods, get_method, register
from camlens.metrics import get_metric
from camlens.metrics.sanity import average_ranks, randomisation_steps, spearman

S = 32


def squares(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with an 8x8 square, red (class 0) or green (class 1), anywhere: (n, 3, 32, 32), (n,)."""
    x = 0.3 * torch.randn(n, 3, S, S, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    r, c = torch.randint(0, S - 8, (n,), generator=g), torch.randint(0, S - 8, (n,), generator=g)
    i = torch.arange(S)
    rows = (i >= r[:, None]) & (i < r[:, None] + 8)
    cols = (i >= c[:, None]) & (i < c[:, None] + 8)
    colour = torch.zeros(n, 3)
    colour[torch.arange(n), y] = 1.5
    return x + colour[:, :, None, None] * (rows[:, :, None] & cols[:, None, :])[:, None].float(), y


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def trained():
    """The CNN trained for 60 Adam steps (about a second on one core) to 100 % test accuracy."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only adds contention on a shared machine
    try:
        for _ in range(60):
            x, y = squares(32, g)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    for p in net.parameters():
        p.grad = None
    xt, yt = squares(128, g)
    with torch.no_grad():
        assert (net(xt).argmax(1) == yt).float().mean() > 0.95
    return net, xt[:4]


@dataclass(frozen=True)
class _Edges(Method):
    """Test-only method: Sobel gradient magnitude of the channel-mean image (ignores the model)."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        gray = ctx.inputs.mean(1, keepdim=True)
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])[None, None]
        gx, gy = F.conv2d(gray, kx, padding=1), F.conv2d(gray, kx.transpose(-1, -2), padding=1)
        mag = (gx ** 2 + gy ** 2).sqrt()  # (B, 1, H, W)
        return MethodOutput(saliency=mag.expand(-1, ctx.scores.shape[1], -1, -1).clone())


if "test_edges" not in available_methods():
    register(_Edges(name="test_edges", description="test only: Sobel edges", cost="none", needs_grads=False,
                    needs_layer=False))


def test_spearman_ties_and_constants():
    x = torch.tensor([[3.0, 1.0, 1.0, 5.0]])
    assert average_ranks(x).tolist() == [[2.0, 0.5, 0.5, 3.0]]
    a = torch.rand(2, 3, 8, 8)
    assert torch.allclose(spearman(a, a ** 3 + 1), torch.ones(2, 3))  # monotone transform
    assert torch.allclose(spearman(a, -a), -torch.ones(2, 3))
    z = torch.zeros(1, 1, 8, 8)
    assert spearman(a[:1, :1], z).item() == 0.0 and spearman(z, z).item() == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    b = torch.rand(8, 8).round(decimals=1)  # many ties
    c = torch.rand(8, 8)
    assert spearman(b, c).item() == pytest.approx(scipy_stats.spearmanr(b.flatten(), c.flatten())[0], abs=1e-6)


def test_mprt_gradcam_falls_edges_stay(trained):
    net, x = trained
    before = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    exp = camlens.explain(net, x, layer="features.7", method="gradcam")
    s = camlens.evaluate(net, x, exp, ["mprt"])
    steps = s.extra["mprt"]["steps"]
    assert steps == ["fc", "features.6", "features.3", "features.0"]  # top (output side) first
    curve = s.curves["mprt"]
    assert curve.shape == (4, 1, 4)
    assert torch.allclose(s.extra["mprt"]["reference_correlation"], torch.ones(4, 1))  # intact copy = exp.maps
    # Grad-CAM of the trained model: rho = 1 before; after re-initialising the logits layer it is gone
    assert curve.mean(0)[0, 0] < 0.0
    assert s["mprt"].mean() < 0.3 and s["mprt"].abs().max() < 0.5
    assert curve.abs().mean() < 0.35
    # a map that ignores the model does not move at all
    edges = camlens.explain(net, x, method="test_edges")
    e = camlens.evaluate(net, x, edges, ["mprt"])
    assert torch.allclose(e.curves["mprt"], torch.ones(4, 1, 4))
    # the user's model is untouched (weights, mode, flags) and the global RNG too
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net.training and torch.equal(torch.get_rng_state(), rng)
    assert get_metric("mprt").higher_is_better is False and get_metric("mprt").category == "randomisation"


def test_mprt_seeded_and_max_steps(trained):
    net, x = trained
    exp = camlens.explain(net, x[:2], layer="features.7", method="gradcampp")
    a = camlens.evaluate(net, x[:2], exp, ["mprt"], options={"mprt": {"max_steps": 2}})
    b = camlens.evaluate(net, x[:2], exp, ["mprt"], options={"mprt": {"max_steps": 2}})
    assert a.extra["mprt"]["steps"] == ["fc", "features"]  # grouped by top-level block
    assert torch.equal(a.curves["mprt"], b.curves["mprt"])
    full = camlens.evaluate(net, x[:2], exp, ["mprt"])
    # default max_steps (12) >= 4 modules: one step per module
    assert full.curves["mprt"].shape[-1] == 4 and a.curves["mprt"].shape[-1] == 2


def test_randomisation_steps_grouping():
    mods = {n: nn.Linear(1, 1) for n in ["head", "blocks.3.b", "blocks.3.a", "blocks.2.b", "blocks.2.a", "blocks.1.a",
                                         "blocks.0.a", "stem"]}
    units = list(mods.items())  # already top first
    assert [n for n, _ in randomisation_steps(units, None)] == list(mods)
    assert [n for n, _ in randomisation_steps(units, 6)] == ["head", "blocks.3", "blocks.2", "blocks.1", "blocks.0",
                                                             "stem"]
    assert [n for n, _ in randomisation_steps(units, 3)] == ["head", "blocks", "stem"]
    two = randomisation_steps(units, 2)  # even top-level blocks are too many: merged chunks
    assert [n for n, _ in two] == ["head … blocks", "stem"]
    assert sum(len(m) for _, m in two) == len(units)


def _neighbour_corr(m: torch.Tensor) -> float:
    """Pearson correlation of horizontally adjacent pixels of maps (..., H, W)."""
    a, b = m[..., :, :-1].flatten(), m[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_random_baseline_is_smooth_and_seeded(trained):
    net, x = trained
    layer = "features.4"  # 16 x 16 for a 32 x 32 input
    m0 = camlens.explain(net, x, targets=[0, 1], layer=layer, method="random").maps
    m0b = camlens.explain(net, x, targets=[0, 1], layer=layer, method="random", random_seed=0).maps
    m1 = camlens.explain(net, x, targets=[0, 1], layer=layer, method="random", random_seed=1).maps
    assert m0.shape == (4, 2, S, S) and torch.equal(m0, m0b)
    assert (m0 - m1).abs().mean() > 0.05  # another seed, another map
    assert (m0[:, 0] - m0[:, 1]).abs().mean() > 0.05  # each target its own weights
    assert (m0.flatten(2).amax(-1) == 1).all() and (m1.flatten(2).amax(-1) == 1).all()  # never all-zero
    assert _neighbour_corr(m0) > 0.9  # smooth: a CAM's spatial structure
    assert _neighbour_corr(torch.rand(4, 2, S, S)) < 0.1  # unlike per-pixel noise
    # a target's map depends on the seed, the image and its class only: not on the batch or the other targets
    alone = camlens.explain(net, x[2:], targets=[1], layer=layer, method="random").maps
    assert torch.allclose(alone[:, 0], m0[2:, 1])
    assert not get_method("random").needs_grads and get_method("random").needs_layer


def test_center_baseline_peaks_at_the_centre(trained):
    net, x = trained
    m = camlens.explain(net, x[:2], targets=[0, 1], method="center").maps
    assert m.shape == (2, 2, S, S)
    assert torch.equal(m[0, 0], m[1, 1])
    c = S // 2
    assert m[0, 0, c - 1:c + 1, c - 1:c + 1].min() == pytest.approx(1.0)  # peak at the centre (32: between pixels)
    assert m[0, 0, 0, 0] < 0.01 and torch.allclose(m[0, 0], m[0, 0].flip(-1)) and torch.allclose(m[0, 0], m[0, 0].T)
    wide = camlens.explain(net, x[:1], targets=[0], method="center", sigma=0.5).maps
    assert wide[0, 0, c, 0] > m[0, 0, c, 0] + 0.1  # mid-edge (corners are 0 after min-max)
    assert not get_method("center").needs_layer
