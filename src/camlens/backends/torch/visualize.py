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

Transformation robustness: each step the model sees ``T(x)``, a fresh random transform per image:
pad by ``pad`` pixels (grey 0.5), then ONE bilinear resampling combining a scale in ``scale``,
a rotation in ``rotate`` degrees and a shift of up to ``jitter`` pixels. Every draw comes from a
``torch.Generator`` seeded by ``seed`` (CPU runs repeat bit for bit).

The model is left exactly as given: eval mode and frozen parameters for the call (restored,
also after errors), gradients taken with ``torch.autograd.grad`` with respect to the image
parameters only (no ``.grad`` is written on the model), forward hooks removed on exit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ConfigError, LayerError
from .state import model_state, resolve_layers

__all__ = ["COLOR_CORRELATION", "color_matrix", "fourier_scale", "FourierImage", "PixelImage", "Transforms",
           "Term", "as_term", "as_transforms", "maximise", "total_variation"]

# square root of the RGB covariance of ImageNet images (rows: R, G, B; columns: decorrelated
# components), the matrix of Olah et al. 2017; its columns are rescaled in color_matrix()
COLOR_CORRELATION = ((0.26, 0.09, 0.02),
                     (0.27, 0.00, -0.05),
                     (0.27, -0.09, 0.03))


def color_matrix(dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """``M`` (3, 3): :data:`COLOR_CORRELATION` divided by the largest column norm."""
    m = torch.tensor(COLOR_CORRELATION, dtype=dtype, device=device)
    return m / m.norm(dim=0).max()


def fourier_scale(h: int, w: int, decay: float = 1.0, device: Any = None) -> Tensor:
    """``A`` (h, w//2+1): ``1 / max(|f|, 1/max(h, w)) ** decay`` on ``rfft2``'s frequency grid."""
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.rfftfreq(w, device=device)[None, :]
    f = torch.sqrt(fy * fy + fx * fx)
    return 1.0 / torch.clamp(f, min=1.0 / max(h, w)) ** decay


class FourierImage:
    """``x = sigmoid(M · irfft2(s ⊙ A, norm="ortho"))`` (decorrelated colour, 1/f spectrum).

    ``param`` is the real view ``(N, 3, H, W//2+1, 2)`` of ``s``; :meth:`from_image` inverts
    :meth:`image` (``logit``, ``M⁻¹``, ``rfft2``, ``/ A``) for images in the open interval (0, 1).
    With ``decorrelate=False`` ``M`` is the identity.
    """

    def __init__(self, n: int, h: int, w: int, *, decorrelate: bool = True, decay: float = 1.0, sd: float = 0.01,
                 generator: Optional[torch.Generator] = None, device: Any = None) -> None:
        self.h, self.w = h, w
        self.scale = fourier_scale(h, w, decay, device)
        self.color = color_matrix(device=device) if decorrelate else torch.eye(3, device=device)
        p = torch.randn((n, 3, h, w // 2 + 1, 2), generator=generator, device="cpu") * sd
        self.param = p.to(device).requires_grad_(True)

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

    def __init__(self, n: int, h: int, w: int, *, sd: float = 0.01, generator: Optional[torch.Generator] = None,
                 device: Any = None) -> None:
        p = 0.5 + torch.randn((n, 3, h, w), generator=generator, device="cpu") * sd
        self.param = p.to(device).requires_grad_(True)

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


@dataclass(frozen=True)
class Transforms:
    """Transformation robustness, drawn afresh for every image and step.

    Attributes:
        pad: grey (0.5) border added first, in pixels (default 12).
        jitter: largest shift in pixels, each axis, uniform (default 8).
        scale: the scale factor range, uniform (default 0.9 to 1.1).
        rotate: the largest rotation in degrees, uniform in ``±rotate`` (default 10).
    """

    pad: int = 12
    jitter: int = 8
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        """``T(x)`` ``(N, 3, H + 2 pad, W + 2 pad)``: pad, then one bilinear resampling by the inverse of
        the per-image affine map ``(scale s, rotation θ, shift t)``."""
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, value=0.5)
        n, _, h, w = x.shape
        if not self.jitter and self.scale == (1.0, 1.0) and not self.rotate:
            return x
        u = torch.rand((n, 4), generator=g, device="cpu", dtype=torch.float64)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        th = (2 * u[:, 1] - 1) * math.radians(self.rotate)
        shift = torch.round((2 * u[:, 2:] - 1) * self.jitter) * 2 / torch.tensor([w, h], dtype=torch.float64)
        cos, sin = torch.cos(th) / s, torch.sin(th) / s
        # affine_grid maps output coords to input coords: the inverse of "scale by s, rotate by θ"
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Term:
    """One weighted part of an objective: ``weight · score`` with ``score`` ``(B,)`` either
    ``fn(output)`` (a class score: ``kind="output"``) or a layer's channel ``(B, C, h, w)`` read
    spatially averaged (``kind="channel"``) or at ``(y, x)`` (``kind="neuron"``; ``None``: the centre)."""

    weight: float
    kind: str
    fn: Optional[Callable[[Any], Tensor]] = None
    layer: Optional[str] = None
    channel: Optional[int] = None
    y: Optional[int] = None
    x: Optional[int] = None


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


def _term_score(t: Term, output: Any, acts: dict[str, Tensor]) -> Tensor:
    if t.kind == "output":
        return t.fn(output)  # type: ignore[misc]
    a = acts[t.layer]  # type: ignore[index]
    if not isinstance(a, Tensor) or a.ndim != 4:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise LayerError(f"layer {t.layer!r} gives {shape}, not a (B, C, h, w) map: channel and neuron "
                         "objectives need a convolutional layer")
    if not 0 <= t.channel < a.shape[1]:  # type: ignore[operator]
        raise LayerError(f"channel {t.channel} out of range: layer {t.layer!r} has {a.shape[1]} channels")
    c = a[:, t.channel]
    if t.kind == "channel":
        return c.flatten(1).mean(1)
    h, w = c.shape[-2:]
    y = h // 2 if t.y is None else t.y
    x = w // 2 if t.x is None else t.x
    if not (0 <= y < h and 0 <= x < w):
        raise LayerError(f"neuron ({y}, {x}) is outside layer {t.layer!r}'s {h}x{w} map")
    return c[:, y, x]


def objective_values(terms: Sequence[Sequence[Term]], output: Any, acts: dict[str, Tensor]) -> Tensor:
    """Image ``n``'s value of objective ``n``: ``Σ_k w_k · score_k[n]``, shape ``(N,)``."""
    rows = []
    for n, obj in enumerate(terms):
        rows.append(sum(t.weight * _term_score(t, output, acts)[n] for t in obj))
    return torch.stack(rows)


def as_term(term: Any) -> Term:
    """The engine's ``(weight, kind, payload)`` (:mod:`camlens.engine.visualize`) as a :class:`Term`."""
    if isinstance(term, Term):
        return term
    w, kind, p = term
    if kind == "output":
        return Term(float(w), "output", fn=p)
    if kind == "channel":
        return Term(float(w), "channel", layer=p[0], channel=int(p[1]))
    if kind == "neuron":
        return Term(float(w), "neuron", layer=p[0], channel=int(p[1]), y=p[2], x=p[3])
    raise ConfigError(f"unknown objective term kind {kind!r}")


def as_transforms(tf: Any) -> Optional[Transforms]:
    """``None``, a :class:`Transforms` or a dict of its fields."""
    if tf is None or isinstance(tf, Transforms):
        return tf
    return Transforms(pad=int(tf["pad"]), jitter=int(tf["jitter"]), scale=tuple(float(v) for v in tf["scale"]),
                      rotate=float(tf["rotate"]))


def maximise(model: nn.Module, terms: Sequence[Sequence[Any]], *, size: tuple[int, int], steps: int, lr: float,
             param: str, decorrelate: bool, transforms: Any, tv: float, l2: float, seed: int,
             mean: Sequence[float], std: Sequence[float], decay: float = 1.0,
             progress: Optional[Callable[[int, Tensor], None]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Optimise one image per objective (all in one batch) with Adam; return ``(images (N, 3, H, W)
    in [0, 1], final objective values (N,) on the untransformed images, history (steps, N))``.

    The loss is ``-Σ_n (objective_n(T(x_n)) - tv·TV(x_n) - l2·||x_n - 0.5||²)``, the model input
    ``(T(x) - mean) / std``.
    """
    terms = [[as_term(t) for t in obj] for obj in terms]
    transforms = as_transforms(transforms)
    p = next(iter(model.parameters()), None)
    dev, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    if not dtype.is_floating_point:
        dtype = torch.float32
    n, (h, w) = len(terms), size
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if param == "fourier":
        img: Any = FourierImage(n, h, w, decorrelate=decorrelate, decay=decay, generator=g, device=dev)
    elif param == "pixels":
        img = PixelImage(n, h, w, generator=g, device=dev)
    else:
        raise ConfigError(f"unknown parameterisation {param!r}; use 'fourier' or 'pixels'")
    m = torch.tensor(list(mean), dtype=dtype, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=dtype, device=dev).view(1, -1, 1, 1)
    layers = sorted({t.layer for obj in terms for t in obj if t.layer is not None})
    acts: dict[str, Tensor] = {}
    opt = torch.optim.Adam([img.param], lr=lr)
    history = []

    def values(x: Tensor) -> Tensor:
        acts.clear()
        return objective_values(terms, model(((x.to(dtype) - m) / s)), acts)

    with model_state(model), _hooks(model, layers, acts), torch.enable_grad():
        for step in range(steps):
            x = img.image()
            v = values(transforms(x, g) if transforms is not None else x)
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
