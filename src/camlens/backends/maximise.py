"""The framework-free maths of activation maximisation (:func:`camlens.visualize`), shared by the
torch (:mod:`camlens.backends.torch.visualize`) and Keras (:mod:`camlens.backends.keras.visualize`)
backends: NumPy only, so one seed gives the same numbers on every framework and device.

* :func:`color_matrix` — ``M`` (3, 3): the square root of ImageNet's RGB covariance (Olah et al.
  2017), its columns scaled so the largest has norm 1: ``x = sigmoid(M · y)`` turns 3 uncorrelated
  components ``y`` into RGB.
* :func:`fourier_scale` — ``A[f] = 1 / max(|f|, 1/max(H, W)) ** decay`` on ``rfft2``'s frequency grid
  ``(H, W//2+1)`` (``|f|`` in cycles per pixel): the 1/f amplitude of natural images.
* :func:`irfft2_matrices` — ``irfft2(S, norm="ortho")`` as real matrix products (for frameworks
  without a differentiable real FFT in :mod:`keras.ops`; equal to NumPy's / torch's on the CPU).
* :class:`Draws` — every random number of one run, from ``np.random.default_rng(seed)`` in a fixed
  order: the initial image (one, broadcast to every image of the batch), then per step the transform.
  So image ``n`` of a batch does not depend on the others: each objective optimised alone with the
  same seed gives the same image (to float rounding).
* :class:`Term` — one weighted part of an objective, as the backends take it (:func:`as_term`), and
  :func:`map_reading`, the checks of a channel / neuron term against its layer's output shape.
* :class:`Transforms` — transformation robustness: pad by ``pad`` px (grey 0.5), then ONE bilinear
  resampling by the inverse of "scale by ``s``, rotate by ``θ``, shift by ``t``" with ``s`` uniform in
  ``scale``, ``θ`` uniform in ``±rotate`` degrees, ``t`` a whole number of pixels uniform in
  ``±jitter`` per axis. :meth:`Transforms.draw` gives ``theta`` (2, 3) in ``F.affine_grid``'s
  normalised coordinates; :func:`bilinear_taps` the four taps and weights of
  ``F.grid_sample(mode="bilinear", padding_mode="border", align_corners=False)`` for it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.errors import ConfigError, ConfigTypeError, LayerError

__all__ = ["COLOR_CORRELATION", "color_matrix", "fourier_scale", "irfft2_matrices", "Draws", "Transforms",
           "as_transforms", "bilinear_taps", "SD", "Term", "as_term", "map_reading"]

# square root of the RGB covariance of ImageNet images (rows: R, G, B; columns: decorrelated
# components), the matrix of Olah et al. 2017; its columns are rescaled in color_matrix()
COLOR_CORRELATION = ((0.26, 0.09, 0.02),
                     (0.27, 0.00, -0.05),
                     (0.27, -0.09, 0.03))

SD = 0.01  # the standard deviation of the initial spectrum / pixel noise


def color_matrix() -> np.ndarray:
    """``M`` (3, 3) float64: :data:`COLOR_CORRELATION` divided by its largest column norm."""
    m = np.asarray(COLOR_CORRELATION, dtype=np.float64)
    return m / np.linalg.norm(m, axis=0).max()


def fourier_scale(h: int, w: int, decay: float = 1.0) -> np.ndarray:
    """``A`` (h, w//2+1) float64: ``1 / max(|f|, 1/max(h, w)) ** decay`` on ``rfft2``'s frequency grid
    (``fftfreq(h)`` down, ``rfftfreq(w)`` across)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    return 1.0 / np.maximum(f, 1.0 / max(h, w)) ** decay


@functools.lru_cache(maxsize=16)
def irfft2_matrices(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(Cr, Ci, Er, Ei)`` float64 with ``irfft2(Sr + i·Si, s=(h, w), norm="ortho")`` equal to

        Zr = Cr @ Sr - Ci @ Si,   Zi = Cr @ Si + Ci @ Sr        (the inverse DFT down the columns)
        x  = (Zr @ Er.T - Zi @ Ei.T) / sqrt(h · w)              (the real inverse DFT along the rows)

    for spectra ``S`` ``(..., h, w//2+1)``: ``Cr + i·Ci = exp(2πi · y · ky / h)`` ``(h, h)``, ``Er + i·Ei =
    c_k · exp(2πi · x · kx / w)`` ``(w, w//2+1)`` with ``c_k = 1`` for ``kx = 0`` and, ``w`` even, ``kx =
    w/2``, else 2 (the conjugate half). The imaginary parts of the ``kx = 0`` (and Nyquist) column are
    ignored, as a c2r transform does. Read-only (cached)."""
    y = np.arange(h)[:, None] * np.arange(h)[None, :]
    cy = 2 * np.pi * y / h
    kx = np.arange(w // 2 + 1)
    c = np.full(kx.shape, 2.0)
    c[0] = 1.0
    if w % 2 == 0:
        c[-1] = 1.0
    cx = 2 * np.pi * np.arange(w)[:, None] * kx[None, :] / w
    out = (np.cos(cy), np.sin(cy), c * np.cos(cx), c * np.sin(cx))
    for a in out:
        a.flags.writeable = False
    return out


class Draws:
    """Every random number of one :func:`camlens.visualize` run, from ``np.random.default_rng(seed)``:
    first the initial image (:meth:`spectrum` or :meth:`pixels`), then one :meth:`Transforms.draw` per
    step. The initial image is the same for every image of the batch, and so is each step's transform."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(int(seed))

    def spectrum(self, h: int, w: int, sd: float = SD) -> np.ndarray:
        """The initial Fourier parameter ``(3, h, w//2+1, 2)`` float32 (real, imaginary): ``N(0, sd²)``."""
        return (self.rng.standard_normal((3, h, w // 2 + 1, 2)) * sd).astype(np.float32)

    def pixels(self, h: int, w: int, sd: float = SD) -> np.ndarray:
        """The initial pixels ``(3, h, w)`` float32: ``0.5 + N(0, sd²)``."""
        return (0.5 + self.rng.standard_normal((3, h, w)) * sd).astype(np.float32)


@dataclass(frozen=True)
class Transforms:
    """Transformation robustness, drawn afresh every step (see the module docstring).

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

    @property
    def resamples(self) -> bool:
        """Is there a resampling after the padding (any jitter, scale or rotation)?"""
        return bool(self.jitter or self.scale != (1.0, 1.0) or self.rotate)

    def draw(self, draws: Draws, h: int, w: int) -> Optional[np.ndarray]:
        """One step's ``theta`` (2, 3) float64 for the padded image of ``h x w`` pixels, mapping output
        coordinates to input ones in ``F.affine_grid``'s normalised ``[-1, 1]`` (x right, y down): the
        inverse of "scale by s, rotate by θ" plus the shift; ``None`` (nothing drawn) without resampling.

        ``u`` = 4 uniforms: ``s = lo + (hi - lo) u0``, ``θ = (2 u1 - 1) · rotate``, shift ``round((2 u_{2,3}
        - 1) · jitter)`` pixels along x, y (``2 / w``, ``2 / h`` per pixel in normalised units)."""
        if not self.resamples:
            return None
        u = draws.rng.random(4)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        th = (2 * u[1] - 1) * math.radians(self.rotate)
        shift = np.round((2 * u[2:] - 1) * self.jitter) * 2 / np.array([w, h], dtype=np.float64)
        cos, sin = math.cos(th) / s, math.sin(th) / s
        return np.array([[cos, -sin, shift[0]], [sin, cos, shift[1]]], dtype=np.float64)


def as_transforms(tf: Any) -> Optional[Transforms]:
    """``None``, a :class:`Transforms` or a dict of its fields (the engine's ``transforms`` option)."""
    if tf is None or isinstance(tf, Transforms):
        return tf
    if not isinstance(tf, Mapping):
        raise ConfigTypeError(f"transforms is None, a Transforms or a dict of its fields, got {type(tf).__name__}")
    return Transforms(pad=int(tf["pad"]), jitter=int(tf["jitter"]), scale=tuple(float(v) for v in tf["scale"]),
                      rotate=float(tf["rotate"]))


def bilinear_taps(theta: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index (4, h*w) int64, weight (4, h*w) float32)``: output pixel ``p`` (row-major) of the
    resampling of an ``h x w`` image by ``theta`` is ``sum_k weight[k, p] · image.flat[index[k, p]]``,
    as ``F.grid_sample(x, F.affine_grid(theta, align_corners=False), "bilinear", "border",
    align_corners=False)``: output pixel ``(i, j)`` sits at ``((2j + 1)/w - 1, (2i + 1)/h - 1)``, its
    source ``theta @ (x, y, 1)`` in pixels ``((x + 1) w - 1) / 2`` (clamped to the image: border
    padding), and its four neighbours weighted by distance."""
    xn = (2 * np.arange(w) + 1) / w - 1
    yn = (2 * np.arange(h) + 1) / h - 1
    X, Y = np.meshgrid(xn, yn)  # (h, w)
    sx = theta[0, 0] * X + theta[0, 1] * Y + theta[0, 2]
    sy = theta[1, 0] * X + theta[1, 1] * Y + theta[1, 2]
    ix = np.clip(((sx + 1) * w - 1) / 2, 0, w - 1).ravel()
    iy = np.clip(((sy + 1) * h - 1) / 2, 0, h - 1).ravel()
    x0, y0 = np.floor(ix), np.floor(iy)
    fx, fy = ix - x0, iy - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)  # (weight 0 where clamped)
    index = np.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    weight = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]).astype(np.float32)
    return index, weight


@dataclass(frozen=True)
class Term:
    """One weighted part of an objective: ``weight · score`` with ``score`` ``(B,)`` either
    ``fn(output)`` (a class score: ``kind="output"``) or a layer's channel of a map (``(B, C, h, w)``;
    Keras: ``(B, h, w, C)``) read spatially averaged (``kind="channel"``) or at ``(y, x)``
    (``kind="neuron"``; ``None``: the centre)."""

    weight: float
    kind: str
    fn: Optional[Callable[[Any], Any]] = None
    layer: Optional[str] = None
    channel: Optional[int] = None
    y: Optional[int] = None
    x: Optional[int] = None


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


def map_reading(t: Term, shape: Optional[Sequence[int]], channels_last: bool = False,
                base: Optional[tuple[int, int]] = None) -> Optional[tuple[int, int]]:
    """Check the channel / neuron term ``t`` against its layer's output ``shape`` (``None``: not one
    array) — ``(B, C, h, w)``, or ``(B, h, w, C)`` with ``channels_last`` — and return where the neuron
    is in that map, ``(y, x)`` (``None`` for a channel term). A :class:`~camlens.core.errors.LayerError`
    says what is wrong.

    A neuron's given ``y`` / ``x`` are in the map of the untransformed image, ``base`` ``(h0, w0)``
    (``None``: this map): the transforms' grey border widens the map by ``(h - h0, w - w0)`` cells, half
    on each side, so the same place is ``(y + (h - h0) // 2, x + (w - w0) // 2)``. One left ``None`` is
    the map's centre along that axis, ``h // 2`` / ``w // 2`` (the image centre in either map)."""
    want = "(B, h, w, C)" if channels_last else "(B, C, h, w)"
    if shape is None or len(shape) != 4:
        got = "not one array" if shape is None else tuple(int(d) for d in shape)
        raise LayerError(f"layer {t.layer!r} gives {got}, not a {want} map: channel and neuron objectives need a "
                         "convolutional layer")
    C, h, w = (shape[3], shape[1], shape[2]) if channels_last else (shape[1], shape[2], shape[3])
    C, h, w = int(C), int(h), int(w)
    if not 0 <= t.channel < C:  # type: ignore[operator]
        raise LayerError(f"channel {t.channel} out of range: layer {t.layer!r} has {C} channels")
    if t.kind == "channel":
        return None
    h0, w0 = base if base is not None else (h, w)
    y = h0 // 2 if t.y is None else t.y
    x = w0 // 2 if t.x is None else t.x
    if not (0 <= y < h0 and 0 <= x < w0):
        raise LayerError(f"neuron ({y}, {x}) is outside layer {t.layer!r}'s {h0}x{w0} map")
    return (h // 2 if t.y is None else y + (h - h0) // 2), (w // 2 if t.x is None else x + (w - w0) // 2)
