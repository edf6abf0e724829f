"""Issue 14: the perturbation methods lime, kernelshap and rise — KernelSHAP with every coalition equals
the Shapley values by enumeration, LIME and KernelSHAP fed the same coalitions equal captum's ``Lime`` /
``KernelShap``, RISE equals its closed form on a linear model, seeds, and exp.segments / exp.weights
through save / load. (The Keras twins: tests/test_keras_torch_parity.py.)"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import camlens  # noqa: E402
from camlens.methods.perturbation import kernelshap_coalitions, lime_kernel, rise_masks  # noqa: E402

S = 16


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 4, 3),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(16, 3)).eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))


def grid_segments(rows: int, cols: int) -> np.ndarray:
    """``rows x cols`` rectangular segments of an S x S image, labelled row by row."""
    r = np.arange(S) * rows // S
    c = np.arange(S) * cols // S
    return (r[:, None] * cols + c[None, :]).astype(np.int64)


def perturbed(x1: torch.Tensor, base: torch.Tensor, seg: np.ndarray, Z: np.ndarray) -> torch.Tensor:
    """``base + z[seg] (x - base)`` for each coalition z of Z (N, M), built independently of camlens."""
    m = torch.from_numpy(Z[:, seg].astype(np.float32))[:, None]
    return base + m * (x1 - base)


def test_kernelshap_with_every_coalition_is_the_exact_shapley_values(net, x):
    seg = grid_segments(2, 4)  # M = 8, 2^8 = 256 coalitions
    M = 8
    exp = camlens.explain(net, x, targets=[0, 2], method="kernelshap", segments=seg, n_samples=2 ** M)
    all_z = np.array([[(i >> m) & 1 for m in range(M)] for i in range(2 ** M)], dtype=np.uint8)
    for b in range(2):
        base = x[b:b + 1].mean(dim=(2, 3), keepdim=True)  # baseline="mean"
        with torch.no_grad():
            f = net(perturbed(x[b:b + 1], base, seg, all_z)).double().numpy()[:, [0, 2]]  # (2^M, T)
        index = {z.tobytes(): i for i, z in enumerate(all_z)}
        phi = np.zeros((2, M))
        for m in range(M):
            others = [j for j in range(M) if j != m]
            for k in range(M):
                w = math.factorial(k) * math.factorial(M - k - 1) / math.factorial(M)
                for S_ in combinations(others, k):
                    z = np.zeros(M, np.uint8)
                    z[list(S_)] = 1
                    without = f[index[z.tobytes()]]
                    z[m] = 1
                    phi[:, m] += w * (f[index[z.tobytes()]] - without)
        np.testing.assert_allclose(exp.weights[b], phi, rtol=0, atol=1e-5)
        assert np.abs(phi).max() > 1e-3  # the values are not all ~0
        np.testing.assert_allclose(exp.raw[b].numpy(), phi[:, seg], rtol=0, atol=1e-5)  # the map: weights per pixel
        np.testing.assert_array_equal(exp.segments[b], seg)


def test_kernelshap_sampling_is_paired_distinct_and_weights_the_kernel_mass():
    rng = np.random.default_rng(0)
    M = 12
    Z, w = kernelshap_coalitions(M, 300, rng)
    assert Z.shape[0] == 298 and len({z.tobytes() for z in Z}) == 298  # n_samples - 2 distinct coalitions
    keys = {z.tobytes() for z in Z}
    assert sum((1 - z).astype(np.uint8).tobytes() in keys for z in Z) >= 296  # paired with their complements
    sizes = Z.sum(1)
    assert ((sizes > 0) & (sizes < M)).all()
    k = np.arange(1, M)
    np.testing.assert_allclose(w.sum(), ((M - 1) / (k * (M - k))).sum())  # all of the kernel's mass
    assert (sizes == 1).sum() == M and (sizes == M - 1).sum() == M  # the outer sizes enumerated completely


def test_kernelshap_and_lime_equal_captum_on_the_same_coalitions(net, x):
    captum_attr = pytest.importorskip("captum.attr")
    from captum._utils.models.linear_model import SkLearnRidge

    seg = grid_segments(3, 3)  # M = 9
    M, N = 9, 60
    rng = np.random.default_rng(3)
    sizes = np.arange(1, M)
    p = (M - 1) / (sizes * (M - sizes))
    Z = np.zeros((N, M), np.uint8)  # draws from the Shapley kernel's size distribution (captum's sampler)
    for i in range(N):
        Z[i, rng.choice(M, size=rng.choice(sizes, p=p / p.sum()), replace=False)] = 1
    ZL = (rng.random((N, M)) < 0.5).astype(np.uint8)
    fm = torch.from_numpy(seg)[None, None]
    targets = [0, 1]
    eks = camlens.explain(net, x, targets=targets, method="kernelshap", segments=seg, coalitions=Z, baseline=0.25)
    el = camlens.explain(net, x, targets=targets, method="lime", segments=seg, coalitions=ZL, baseline=0.25)

    def feed(rows, ends):
        def gen(original_inp, **kwargs):
            if ends:  # captum's KernelShap sampler starts with the end points
                yield torch.ones(1, M, dtype=torch.long)
                yield torch.zeros(1, M, dtype=torch.long)
            for z in rows:
                yield torch.from_numpy(z.astype(np.int64))[None]
        return gen

    def kernel(_, __, interp, **kwargs):  # camlens' LIME kernel on the interpretable sample
        return float(lime_kernel(interp.numpy().astype(np.uint8), 0.25)[0])

    worst = 0.0
    for b in range(1):  # (captum runs one perturbation per forward: one image keeps this test fast)
        ks = captum_attr.KernelShap(net)
        ks.perturb_func = feed(Z, True)
        lime = captum_attr.Lime(net, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=kernel,
                                perturb_func=feed(ZL, False))
        for t, cls in enumerate(targets):
            kw = dict(target=cls, baselines=0.25, feature_mask=fm, return_input_shape=False)
            want_ks = ks.attribute(x[b:b + 1], n_samples=N + 2, **kw).numpy()[0]
            want_l = lime.attribute(x[b:b + 1], n_samples=N, **kw).numpy()[0]
            np.testing.assert_allclose(eks.weights[b, t], want_ks, rtol=0, atol=1e-4)
            np.testing.assert_allclose(el.weights[b, t], want_l, rtol=0, atol=1e-4)
            worst = max(worst, np.abs(eks.weights[b, t] - want_ks).max(), np.abs(el.weights[b, t] - want_l).max())
            assert np.abs(want_ks).max() > 1e-3 and np.abs(want_l).max() > 1e-3
    print(f"captum agreement: max |diff| {worst:.2e}")


def test_rise_equals_its_closed_form_on_a_linear_model(x):
    torch.manual_seed(2)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * S * S, 3)).eval()
    n, grid, p, seed, base = 96, 4, 0.5, 5, 0.1
    exp = camlens.explain(lin, x, targets=[0, 2], method="rise", n_samples=n, grid=grid, p=p, seed=seed,
                          baseline=base, batch_size=40, relu=False)
    masks = rise_masks(n, (S, S), grid, p, seed).reshape(n, -1).astype(np.float64)  # (N, H*W)
    W = lin[1].weight.detach().double().numpy().reshape(3, 3, S * S)[[0, 2]]  # (T, C, H*W)
    for b in range(2):
        g = (W * (x[b].double().numpy().reshape(3, -1) - base)[None]).sum(1)  # (T, H*W): f(M) = c + g . M
        cov = (masks - masks.mean(0)).T @ masks / n  # (H*W, H*W)
        want = (g @ cov / p).reshape(2, S, S)  # sum_i (f_i - mean f) M_i / (N p)
        np.testing.assert_allclose(exp.raw[b].numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("method", ["kernelshap", "lime", "rise"])
def test_seeds_reproduce_and_differ(net, x, method):
    kw = dict(targets=[1], method=method, n_samples=40, batch_size=16)
    a = camlens.explain(net, x, seed=7, **kw)  # explain's seed= is the method's seed
    b = camlens.explain(net, x, seed=7, **kw)
    c = camlens.explain(net, x, seed=8, **kw)
    np.testing.assert_array_equal(a.raw.numpy(), b.raw.numpy())
    assert np.abs(a.raw.numpy() - c.raw.numpy()).max() > 1e-6


def test_segments_and_weights_survive_save_and_load(net, x, tmp_path):
    seg = np.stack([grid_segments(2, 2), grid_segments(2, 3)])  # M = 4 and 6: weights NaN-padded
    exp = camlens.explain(net, x, targets=[0, 1], method="kernelshap", segments=seg, n_samples=64)
    assert exp.weights.shape == (2, 2, 6) and np.isnan(exp.weights[0, :, 4:]).all()
    assert not np.isnan(exp.weights[1]).any()
    back = camlens.load(exp.save(tmp_path / "e"))
    np.testing.assert_array_equal(back.segments, exp.segments)
    np.testing.assert_array_equal(back.weights, exp.weights)
    assert back.segments.dtype == np.int32 and back.weights.dtype == np.float32
    one = exp.image(1)
    assert one.segments.shape == (1, S, S) and one.weights.shape == (1, 2, 6)


def test_named_superpixels_and_baselines(net, x):
    for how in ("slic", "quickshift", "felzenszwalb"):
        e = camlens.explain(net, x, targets=[0], method="lime", segments=how, n_samples=16)
        assert e.segments.shape == (2, S, S) and e.segments.min() == 0
        M = int(e.segments[0].max()) + 1
        assert 2 <= M and np.isfinite(e.weights[0, 0, :M]).all()
    for base in ("blur", 0.5, torch.zeros(3, S, S)):
        e = camlens.explain(net, x, targets=[0], method="kernelshap", segments=grid_segments(2, 2), n_samples=16,
                            baseline=base)
        assert np.isfinite(e.weights).all()


def test_wrong_options_say_what_is_expected(net, x):
    with pytest.raises(ValueError, match="segments"):
        camlens.explain(net, x, method="lime", segments="watershed")
    with pytest.raises(ValueError, match="segments must be an int array"):
        camlens.explain(net, x, method="lime", segments=np.zeros((5, 5), int))
    with pytest.raises(ValueError, match="coalitions has 3 columns"):
        camlens.explain(net, x, method="kernelshap", segments=grid_segments(2, 2), coalitions=np.eye(3, dtype=int))
