"""Activation maximisation on PyTorch models: image parameterisations, transformation robustness
and the optimisation loop behind :func:`camlens.visualize` (the engine's
:mod:`camlens.engine.visualize` parses objectives and hands them here).

Parameterisations (the image ``x`` is ``(N, 3, H, W)`` in ``[0, 1]``):

* ``"fourier"`` (Olah et al. 2017, "Feature Visualization"): ``x = sigmoid(M · irfft2(s ⊙ A))``
  with ``s`` the learned complex spectrum ``(N, 3, H, W//2+1)``, ``A[f] = 1 / max(|f|, 1/max(H, W))``
  (``|f|`` in cycles per pixel: each frequency is scaled to the ``1/f`` amplitude of natural
  images, so a gradient step moves all frequencies equally in whitened space) and ``M`` the colour
  decorrelation matrix: the square root of ImageNet's RGB covariance (its columns scaled so the
  largest has norm 1), so the 3 learned channels are uncorrelated colour components.
* ``"pixels"`` (DeepVis, Yosinski et al. 2015): ``x`` itself, kept in ``[0, 1]`` by clamping after
  each step, with the regularisers ``tv · TV(x) + l2 · ||x - 0.5||²`` subtracted from the
  objective (``TV``: the mean absolute difference of neighbouring pixels).

Transformation robustness: each step the model sees ``T(x)``, a fresh random transform (the same
for every image of the batch): pad by ``pad`` pixels (grey 0.5), then ONE bilinear resampling
combining a scale in ``scale``, a rotation in ``rotate`` degrees and a shift of up to ``jitter``
pixels. The matrices, the frequency grid and every random draw are the framework-free ones of
:mod:`camlens.backends.maximise` (NumPy, seeded by ``seed``: CPU runs repeat bit for bit, an image
does not depend on the others in the batch, and a Keras model gets the same draws).

The model is left exactly as given: eval mode and frozen parameters for the call (restored,
also after errors), gradients taken with ``torch.autograd.grad`` with respect to the image
parameters only (no ``.grad`` is written on the model), forward hooks removed on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ConfigError
from .. import maximise as shared
from ..maximise import COLOR_CORRELATION, Draws, Term, Transforms, as_term, as_transforms, map_reading
from .state import model_state, resolve_layers

__all__ = ["COLOR_CORRELATION", "color_matrix", "fourier_scale", "FourierImage", "PixelImage", "Transforms",
           "Draws", "transform", "Term", "as_term", "as_transforms", "maximise", "total_variation"]


def color_matrix(dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """``M`` (3, 3): :func:`camlens.backends.maximise.color_matrix` as a tensor."""
    return torch.from_numpy(shared.color_matrix()).to(dtype=dtype, device=device)


def fourier_scale(h: int, w: int, decay: float = 1.0, device: Any = None) -> Tensor:
    """``A`` (h, w//2+1) float32: :func:`camlens.backends.maximise.fourier_scale` as a tensor."""
    return torch.from_numpy(shared.fourier_scale(h, w, decay)).to(dtype=torch.float32, device=device)


class FourierImage:
    """``x = sigmoid(M · irfft2(s ⊙ A, norm="ortho"))`` (decorrelated colour, 1/f spectrum).

    ``param`` is the real view ``(N, 3, H, W//2+1, 2)`` of ``s``; :meth:`from_image` inverts
    :meth:`image` (``logit``, ``M⁻¹``, ``rfft2``, ``/ A``) for images in the open interval (0, 1).
    With ``decorrelate=False`` ``M`` is the identity.
    """

    def __init__(self, n: int, h: int, w: int, *, decorrelate: bool = True, decay: float = 1.0, sd: float = shared.SD,
                 draws: Optional[Draws] = None, device: Any = None) -> None:
        self.h, self.w = h, w
        self.scale = fourier_scale(h, w, decay, device)
        self.color = color_matrix(device=device) if decorrelate else torch.eye(3, device=device)
        p = torch.from_numpy((draws or Draws(0)).spectrum(h, w, sd))  # one draw for every image
        self.param = p.expand(n, *p.shape).to(device).clone().requires_grad_(True)

    def image(self) -> Tensor:
        spec = torch.view_as_complex(self.param) * self.scale
        y = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho")  # (N, 3, H, W), decorrelated colour
        return torch.sigmoid(torch.einsum("dc,nchw->ndhw", self.color, y))

    def from_image(self, x: Tensor) -> None:
        """Set the parameter so that :meth:`image` gives ``x`` ``(N, 3, H, W)`` (values in (0, 1))."""
        y = torch.einsum("dc,nchw->ndhw", torch.linalg.inv(self.color), torch.logit(x.to(self.scale.dtype)))
        spec = torch.fft.rfft2(y, norm="ortho") / self.scale
        with torch.no_grad():
            self.param.copy_(torch.view_as_real(spec))

    def step_done(self) -> None:
        """Nothing to project."""


class PixelImage:
    """``x`` itself: ``(N, 3, H, W)`` pixels, clamped to ``[0, 1]`` after every step."""

    def __init__(self, n: int, h: int, w: int, *, sd: float = shared.SD, draws: Optional[Draws] = None,
                 device: Any = None) -> None:
        p = torch.from_numpy((draws or Draws(0)).pixels(h, w, sd))  # one draw for every image
        self.param = p.expand(n, *p.shape).to(device).clone().requires_grad_(True)

    def image(self) -> Tensor:
        return self.param

    def step_done(self) -> None:
        with torch.no_grad():
            self.param.clamp_(0.0, 1.0)


def total_variation(x: Tensor) -> Tensor:
    """``TV(x)`` per image ``(N,)``: mean ``|x[i+1, j] - x[i, j]|`` plus mean ``|x[i, j+1] - x[i, j]|``."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def transform(tf: Transforms, x: Tensor, draws: Draws) -> Tensor:
    """``T(x)`` ``(N, 3, H + 2 pad, W + 2 pad)``: pad (grey 0.5), then one bilinear resampling of every
    image by the step's ``theta`` (:meth:`Transforms.draw`; ``F.affine_grid`` + ``F.grid_sample``,
    border padding, ``align_corners=False``)."""
    if tf.pad:
        x = F.pad(x, (tf.pad,) * 4, value=0.5)
    n, _, h, w = x.shape
    theta = tf.draw(draws, h, w)
    if theta is None:
        return x
    th = torch.from_numpy(theta).to(dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = F.affine_grid(th, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@contextlib.contextmanager
def _hooks(model: nn.Module, names: Sequence[str], store: dict[str, Tensor]) -> Iterator[None]:
    handles = []
    try:
        for name, mod in (resolve_layers(model, list(names)) if names else []):
            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                store[name] = out
            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _term_score(t: Term, output: Any, acts: dict[str, Tensor], base: Optional[dict] = None) -> Tensor:
    if t.kind == "output":
        return t.fn(output)  # type: ignore[misc]
    a = acts[t.layer]  # type: ignore[index]
    at = map_reading(t, tuple(a.shape) if isinstance(a, Tensor) else None, base=(base or {}).get(t.layer))
    c = a[:, t.channel]
    return c.flatten(1).mean(1) if at is None else c[:, at[0], at[1]]


def objective_values(terms: Sequence[Sequence[Term]], output: Any, acts: dict[str, Tensor],
                     base: Optional[dict] = None) -> Tensor:
    """Image ``n``'s value of objective ``n``: ``Σ_k w_k · score_k[n]``, shape ``(N,)``; ``base``: layer ->
    ``(h, w)`` of its map on the untransformed image (where neurons' positions are given)."""
    rows = []
    for n, obj in enumerate(terms):
        rows.append(sum(t.weight * _term_score(t, output, acts, base)[n] for t in obj))
    return torch.stack(rows)


def maximise(model: nn.Module, terms: Sequence[Sequence[Any]], *, size: tuple[int, int], steps: int, lr: float,
             param: str, decorrelate: bool, transforms: Any, tv: float, l2: float, seed: int,
             mean: Sequence[float], std: Sequence[float], decay: float = 1.0,
             channels: Optional[Sequence[int]] = None,
             progress: Optional[Callable[[int, Tensor], None]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Optimise one image per objective (all in one batch) with Adam; return ``(images (N, 3, H, W)
    in [0, 1], final objective values (N,) on the untransformed images, history (steps, N))``.

    The loss is ``-Σ_n (objective_n(T(x_n)) - tv·TV(x_n) - l2·||x_n - 0.5||²)``, the model input
    ``(T(x) - mean) / std`` (RGB), its channels then in the order ``channels`` (``None``: RGB).
    """
    terms = [[as_term(t) for t in obj] for obj in terms]
    transforms = as_transforms(transforms)
    p = next(iter(model.parameters()), None)
    dev, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    if not dtype.is_floating_point:
        dtype = torch.float32
    n, (h, w) = len(terms), size
    draws = Draws(seed)
    if param == "fourier":
        img: Any = FourierImage(n, h, w, decorrelate=decorrelate, decay=decay, draws=draws, device=dev)
    elif param == "pixels":
        img = PixelImage(n, h, w, draws=draws, device=dev)
    else:
        raise ConfigError(f"unknown parameterisation {param!r}; use 'fourier' or 'pixels'")
    m = torch.tensor(list(mean), dtype=dtype, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=dtype, device=dev).view(1, -1, 1, 1)
    layers = sorted({t.layer for obj in terms for t in obj if t.layer is not None})
    acts: dict[str, Tensor] = {}
    opt = torch.optim.Adam([img.param], lr=lr)
    history = []

    order = None if channels is None or list(channels) == [0, 1, 2] else list(channels)

    base: dict[str, tuple[int, int]] = {}  # layer -> its map's (h, w) on the untransformed image

    def values(x: Tensor) -> Tensor:
        acts.clear()
        z = (x.to(dtype) - m) / s
        return objective_values(terms, model(z if order is None else z[:, order]), acts, base)

    with model_state(model), _hooks(model, layers, acts), torch.enable_grad():
        if transforms is not None and transforms.pad and any(
                t.kind == "neuron" and (t.y is not None or t.x is not None) for obj in terms for t in obj):
            with torch.no_grad():  # given neuron positions are in the maps of the unpadded image
                acts.clear()
                z = (img.image().to(dtype) - m) / s
                model(z if order is None else z[:, order])
                base.update((k, tuple(a.shape[-2:])) for k, a in acts.items() if isinstance(a, Tensor) and a.ndim == 4)
        for step in range(steps):
            x = img.image()
            v = values(transform(transforms, x, draws) if transforms is not None else x)
            reg = 0.0
            if tv:
                reg = reg + tv * total_variation(x)
            if l2:
                reg = reg + l2 * (x - 0.5).pow(2).flatten(1).sum(1)
            loss = -(v - reg).sum()
            (grad,) = torch.autograd.grad(loss, [img.param])
            img.param.grad = grad
            opt.step()
            img.param.grad = None
            img.step_done()
            history.append(v.detach())
            if progress is not None:
                progress(step, v.detach())
        with torch.no_grad():
            x = img.image().detach()
            final = values(x).detach()
    acts.clear()
    hist = torch.stack(history) if history else torch.empty((0, n), device=dev)
    return x.float(), final.float(), hist.float()
