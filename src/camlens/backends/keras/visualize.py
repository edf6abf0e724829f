"""Activation maximisation on Keras 3 models (:func:`camlens.visualize`), on Keras' TensorFlow, JAX or
PyTorch backend: the maths of the torch backend (:mod:`camlens.backends.torch.visualize`, which
documents it), in ``keras.ops`` on NHWC images ``(N, H, W, 3)`` in ``[0, 1]``.

* ``"fourier"``: ``x = sigmoid(irfft2(s ⊙ A) · Mᵀ)``, the inverse real FFT as real matrix products
  (:func:`camlens.backends.maximise.irfft2_matrices`: no complex dtypes, the same on every Keras
  backend); ``s`` ``(N, 3, H, W//2+1, 2)`` as on torch. ``"pixels"``: ``x`` itself, clamped to
  ``[0, 1]`` after each step, with ``tv · TV(x) + l2 · ||x - 0.5||²`` subtracted.
* Transforms: pad (grey 0.5), then the step's bilinear resampling as a gather of four taps per
  output pixel (:func:`~camlens.backends.maximise.bilinear_taps`, computed on the host: equal to
  torch's ``grid_sample`` with border padding).
* The colour matrix, frequency grid, initial image and every transform come from
  :mod:`camlens.backends.maximise` (NumPy, seeded): a Keras model and a torch model with the same
  weights start from the same image and see the same transforms.
* Model input: ``((T(x) - mean) / std)`` (RGB), its channels reordered by ``channels`` (``(2, 1, 0)``:
  BGR, the caffe models of ``keras.applications``), NCHW for a ``channels_first`` model; the forward
  is camlens' own (:func:`~.autodiff.model_output`: every layer ``training=False``, a final
  softmax / sigmoid left out, so class objectives are logits, as ``explain`` scores them).
* Gradients: :meth:`.autodiff.Autodiff.value_and_grad` w.r.t. the image parameter only (TF: a tape
  watching it; JAX: ``jax.value_and_grad``; torch: ``autograd.grad``); Adam as ``torch.optim.Adam``
  computes it (β = 0.9, 0.999, ε = 1e-8). On TensorFlow a graph model's whole step (image, transform,
  forward, objectives, gradient, Adam) is one ``tf.function`` from :data:`COMPILE_STEPS` steps on.

The model is left exactly as given: nothing is assigned to any variable, no ``trainable`` flag or
layer attribute is set, no variable is watched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import keras
import numpy as np
from keras import ops

from ...core.errors import ConfigError, LayerError, ModelError
from .. import maximise as shared
from ..maximise import Draws, Term, as_term, as_transforms, bilinear_taps, map_reading
from .autodiff import autodiff, host, model_output
from .graph import GraphRun, graph_of, require_model, resolve_paths
from .scores import target_scores

__all__ = ["maximise", "total_variation"]

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


def total_variation(x: Any) -> Any:
    """``TV(x)`` per image ``(N,)`` of ``x`` ``(N, H, W, 3)``: mean ``|x[i+1, j] - x[i, j]|`` plus mean
    ``|x[i, j+1] - x[i, j]|``."""
    dy = ops.mean(ops.abs(x[:, 1:] - x[:, :-1]), axis=(1, 2, 3))
    dx = ops.mean(ops.abs(x[:, :, 1:] - x[:, :, :-1]), axis=(1, 2, 3))
    return dy + dx


def _const(a: np.ndarray) -> Any:
    return ops.convert_to_tensor(np.ascontiguousarray(a, dtype=np.float32))


class _Fourier:
    """``x = sigmoid(irfft2(s ⊙ A, norm="ortho") · Mᵀ)`` ``(N, H, W, 3)`` from ``p`` ``(N, 3, H, W//2+1, 2)``."""

    def __init__(self, n: int, h: int, w: int, draws: Draws, decorrelate: bool, decay: float) -> None:
        a = shared.fourier_scale(h, w, decay)
        cr, ci, er, ei = shared.irfft2_matrices(h, w)
        k = 1.0 / np.sqrt(h * w)
        self.a, self.cr, self.ci = _const(a), _const(cr), _const(ci)
        self.er, self.ei = _const(er * k), _const(ei * k)
        self.m = _const(shared.color_matrix() if decorrelate else np.eye(3))
        self.init = np.repeat(draws.spectrum(h, w)[None], n, axis=0)

    def image(self, p: Any) -> Any:
        sr, si = p[..., 0] * self.a, p[..., 1] * self.a  # (N, 3, H, W//2+1)
        zr = ops.einsum("yk,nckf->ncyf", self.cr, sr) - ops.einsum("yk,nckf->ncyf", self.ci, si)
        zi = ops.einsum("yk,nckf->ncyf", self.cr, si) + ops.einsum("yk,nckf->ncyf", self.ci, sr)
        y = ops.einsum("ncyf,xf->nyxc", zr, self.er) - ops.einsum("ncyf,xf->nyxc", zi, self.ei)  # (N, H, W, 3)
        return ops.sigmoid(ops.einsum("nyxc,dc->nyxd", y, self.m))

    def project(self, p: Any) -> Any:
        return p


class _Pixels:
    """``x = p`` ``(N, H, W, 3)``, clamped to ``[0, 1]`` after each step."""

    def __init__(self, n: int, h: int, w: int, draws: Draws) -> None:
        self.init = np.repeat(draws.pixels(h, w).transpose(1, 2, 0)[None], n, axis=0)

    def image(self, p: Any) -> Any:
        return p

    def project(self, p: Any) -> Any:
        return ops.clip(p, 0.0, 1.0)


def _pad(x: Any, pad: int) -> Any:
    return ops.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=0.5) if pad else x


def _resample(x: Any, index: Any, weight: Any) -> Any:
    """``x`` ``(N, H, W, 3)`` resampled by the taps ``index`` ``(4·H·W,)`` / ``weight`` ``(4, H·W, 1)``
    (:func:`~camlens.backends.maximise.bilinear_taps` flattened; one for all images): one gather."""
    n, h, w, c = x.shape
    taps = ops.reshape(ops.take(ops.reshape(x, (n, h * w, c)), index, axis=1), (n, 4, h * w, c))
    return ops.reshape(ops.sum(taps * weight[None], axis=1), (n, h, w, c))


# TF graph models: from this many steps on, the whole step is one tf.function (its trace costs about
# 35 eager steps of a small CNN: 1-2 s; then each step runs 3-4x faster)
COMPILE_STEPS = 32


class _Run:
    """One optimisation: the image parameterisation, the forward, the objectives, and Adam's step
    ``update(p, m, v, t, *taps) -> (p, m, v, values)`` — tensors in and out, no Python state
    changed, so TensorFlow can trace it once (:data:`COMPILE_STEPS`)."""

    def __init__(self, model: Any, rows: list, img: Any, *, last: bool, mean: Any, std: Any, order: Optional[list],
                 path: dict, pad: int, tv: float, l2: float, lr: float, ad: Any) -> None:
        self.model, self.rows, self.img, self.last, self.order, self.path = model, rows, img, last, order, path
        self.m, self.s, self.pad, self.tv, self.l2, self.lr = mean, std, pad, tv, l2, lr
        self.wanted = frozenset(path.values())
        self.n = len(rows)
        self.resolved: dict[int, Any] = {}  # id(term) -> the resolved target of a class term (set by _check)
        self.base: dict[str, tuple[int, int]] = {}  # layer -> its map's (h, w) on the unpadded image (_check)
        # objective i = sum_k weight_k · score_k[i] over its terms k: each term scored on the whole batch,
        # times a mask (N,) that is its weight at its objective's image and 0 elsewhere (no slicing)
        self.flat = [(t, _const(np.eye(self.n)[i] * t.weight)) for i, obj in enumerate(rows) for t in obj]
        self.grad = ad.value_and_grad(self.loss)

    def forward(self, x: Any) -> tuple[Any, dict]:
        """The model's output and recorded layers ``{path: [output per call]}`` for images ``x``
        ``(N, H, W, 3)`` in [0, 1] (camlens' forward, :func:`~.autodiff.model_output`)."""
        z = (x - self.m) / self.s
        if self.order is not None:
            z = ops.take(z, self.order, axis=-1)
        if not self.last:
            z = ops.transpose(z, (0, 3, 1, 2))
        run = GraphRun(self.wanted)
        out = model_output(self.model, z, run)
        return out, {p: run.outputs.get(p, []) for p in self.wanted}

    def score(self, t: Term, out: Any, acts: dict) -> Any:
        """Term ``t``'s score ``(N,)`` on every image."""
        if t.kind == "output":
            rt = self.resolved.get(id(t))
            return target_scores([[rt]] * self.n, out)[:, 0] if rt is not None else ops.convert_to_tensor(t.fn(out))
        a = acts[self.path[t.layer]][0]
        c = ops.cast(a[..., t.channel] if self.last else a[:, t.channel], "float32")  # (N, h, w)
        yx = map_reading(t, tuple(a.shape), self.last, self.base.get(t.layer))  # (checked by _check)
        return ops.mean(c, axis=(1, 2)) if yx is None else c[:, yx[0], yx[1]]

    def values(self, x: Any) -> Any:
        """Image ``i``'s value of objective ``i``, ``(N,)``."""
        out, acts = self.forward(x)
        v = 0.0
        for t, mask in self.flat:
            v = v + mask * self.score(t, out, acts)
        return v

    def loss(self, p: Any, *taps: Any) -> tuple[Any, Any]:
        """``-Σ_i (objective_i(T(x_i)) - tv·TV(x_i) - l2·||x_i - 0.5||²)`` and the values on ``T(x)``."""
        x = self.img.image(p)
        xt = _pad(x, self.pad)
        if taps:
            xt = _resample(xt, *taps)
        v = self.values(xt)
        reg = 0.0
        if self.tv:
            reg = reg + self.tv * total_variation(x)
        if self.l2:
            reg = reg + self.l2 * ops.sum((x - 0.5) ** 2, axis=(1, 2, 3))
        return -ops.sum(v - reg), v

    def update(self, p: Any, mom: Any, vel: Any, t: Any, *taps: Any) -> tuple[Any, Any, Any, Any]:
        """One Adam step (step number ``t`` >= 1, a float32 scalar tensor), as ``torch.optim.Adam``."""
        (b1, b2) = BETAS
        _, v, g = self.grad(p, *taps)
        mom = mom + (1 - b1) * (g - mom)  # torch's lerp
        vel = vel * b2 + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        p = self.img.project(p - (self.lr / bc1) * mom / (ops.sqrt(vel) / ops.sqrt(bc2) + EPS))
        return p, mom, vel, v


class _Step:
    """``run.update`` as a callable object: ``tf.function`` keeps its retracing statistics per object
    (per function code otherwise, so a trace per call would warn after a few calls)."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __call__(self, *args: Any) -> tuple[Any, Any, Any, Any]:
        return self.run.update(*args)


def maximise(model: Any, terms: Sequence[Sequence[Any]], *, size: tuple[int, int], steps: int, lr: float,
             param: str, decorrelate: bool, transforms: Any, tv: float, l2: float, seed: int,
             mean: Sequence[float], std: Sequence[float], decay: float = 1.0,
             channels: Optional[Sequence[int]] = None,
             progress: Optional[Callable[[int, np.ndarray], None]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimise one image per objective (all in one batch) with Adam; return NumPy ``(images (N, 3, H, W)
    in [0, 1], final objective values (N,) on the untransformed images, history (steps, N))``, as
    :func:`camlens.backends.torch.visualize.maximise` (the same arguments and loss).

    On TensorFlow a graph model's step is one ``tf.function`` from :data:`COMPILE_STEPS` steps on
    (traced once per call), else every step runs eagerly."""
    from .backend import BACKEND, channels_last  # (imports this module lazily)

    require_model(model)
    ad = autodiff()
    rows = [[as_term(t) for t in obj] for obj in terms]
    tf_ = as_transforms(transforms)
    n, (h, w) = len(rows), size
    draws = Draws(seed)
    if param == "fourier":
        img: Any = _Fourier(n, h, w, draws, decorrelate, decay)
    elif param == "pixels":
        img = _Pixels(n, h, w, draws)
    else:
        raise ConfigError(f"unknown parameterisation {param!r}; use 'fourier' or 'pixels'")
    names = sorted({t.layer for obj in rows for t in obj if t.layer is not None})
    path = {name: p for name, (p, _) in zip(names, resolve_paths(model, names))} if names else {}
    whole = ad.name == "tensorflow" and graph_of(model) is not None and steps >= COMPILE_STEPS
    pad = tf_.pad if tf_ is not None else 0
    run = _Run(model, rows, img, last=channels_last(model), mean=_const(np.asarray(mean)), std=_const(np.asarray(std)),
               order=None if channels is None or list(channels) == [0, 1, 2] else [int(c) for c in channels],
               path=path, pad=pad, tv=tv, l2=l2, lr=lr, ad=ad)
    p = _const(img.init)
    _check(run, img.image(p), ad, BACKEND.image_size(model))
    step = ad.compiled(_Step(run)) if whole else run.update
    mom, vel, history = ops.zeros_like(p), ops.zeros_like(p), []
    hp, wp = h + 2 * pad, w + 2 * pad
    for k in range(steps):
        theta = tf_.draw(draws, hp, wp) if tf_ is not None else None
        taps: tuple = ()
        if theta is not None:
            index, weight = bilinear_taps(theta, hp, wp)
            taps = (ops.convert_to_tensor(index.reshape(-1)), ops.convert_to_tensor(weight[..., None]))
        p, mom, vel, v = step(p, mom, vel, ops.convert_to_tensor(np.float32(k + 1)), *taps)
        history.append(np.asarray(ad.to_numpy(v), dtype=np.float32))
        if progress is not None:
            progress(k, history[-1])
    x = img.image(p)
    with ad.no_grad():
        final = np.asarray(ad.to_numpy(run.values(x)), dtype=np.float32)
    images = np.ascontiguousarray(np.asarray(ad.to_numpy(x), dtype=np.float32).transpose(0, 3, 1, 2))
    hist = np.stack(history) if history else np.zeros((0, n), np.float32)
    return images, final, hist


def _check(run: _Run, x: Any, ad: Any, fixed: Optional[tuple[int, int]]) -> None:
    """Forwards of the initial images ``x`` (no gradient, nothing drawn) before the loop: padded as the
    loop pads them, class terms resolved on its NumPy output (their scores then recomputed in
    ``keras.ops``, checked equal) and channel / neuron terms checked against their layers' outputs;
    unpadded, the maps' sizes where neurons' positions are given (``run.base``). Clear errors, raised
    eagerly."""
    pad, xp = run.pad, _pad(x, run.pad)
    try:
        with ad.no_grad():
            out, acts = run.forward(xp)
            plain = run.forward(x)[1] if pad else acts
    except Exception as err:  # noqa: BLE001 - a model that cannot take the padded size: say why
        fed = (int(xp.shape[1]), int(xp.shape[2]))
        if fixed is None or fixed == fed:
            raise
        fit = (fixed[0] - 2 * pad, fixed[1] - 2 * pad)
        fix = (f"pass size={fit} (so that the model sees {fixed[0]}x{fixed[1]})" if min(fit) >= 8 else
               f"pass transforms={{'pad': 0}} (the resampling keeps the size) and size={fixed}")
        raise ModelError(f"the Keras model takes {fixed[0]}x{fixed[1]} images, but the optimisation feeds it "
                         f"{fed[0]}x{fed[1]} ones ({fed[0] - 2 * pad}x{fed[1] - 2 * pad} plus the transforms' "
                         f"{pad} px grey border) and its forward failed ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:200]}); {fix}") from err
    host_out = host(out)
    for obj in run.rows:
        for t in obj:
            if t.kind == "output":
                want = np.asarray(t.fn(host_out), dtype=np.float32)  # (resolves the engine's class targets)
                rt = getattr(t.fn, "resolved", None)
                if rt is not None:
                    run.resolved[id(t)] = rt
                    got = np.asarray(ad.to_numpy(target_scores([[rt]] * run.n, out)[:, 0]))
                    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                        raise ModelError(f"objective {rt.label!r}: its scores on the model's {keras.backend.backend()} "
                                         f"output {got.tolist()} differ from those on its NumPy copy {want.tolist()}")
                continue
            p = run.path[t.layer]
            for outs in (plain.get(p, []), acts.get(p, [])):
                if len(outs) != 1:
                    why = "did not run in the forward" if not outs else f"ran {len(outs)} times (a shared layer)"
                    raise LayerError(f"layer {t.layer!r} {why}: a channel / neuron objective needs a layer that runs "
                                     "once per forward")
            a0, a = plain[p][0], acts[p][0]
            if ad.is_tensor(a0) and len(a0.shape) == 4:
                run.base[t.layer] = (int(a0.shape[1]), int(a0.shape[2])) if run.last else (int(a0.shape[2]),
                                                                                            int(a0.shape[3]))
            map_reading(t, tuple(a.shape) if ad.is_tensor(a) else None, run.last, run.base.get(t.layer))
