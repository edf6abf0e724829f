""":class:`camlens.backends.base.Ops` for NumPy arrays: maps saved to disk, loaded back
(:func:`camlens.load`) or computed without a framework run through the same post-processing and
metrics code as tensors on a device."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .base import bilinear_matrix, corner_matrix

__all__ = ["NumpyOps"]


@functools.lru_cache(maxsize=64)
def _pair(h: int, w: int, H: int, W: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    ry = bilinear_matrix(h, H).astype(np.float32).astype(dtype)  # float32 rounding, as the torch backend
    rxt = np.ascontiguousarray(bilinear_matrix(w, W).astype(np.float32).astype(dtype).T)
    ry.flags.writeable = rxt.flags.writeable = False
    return ry, rxt


class NumpyOps:
    """NumPy implementation of :class:`camlens.backends.base.Ops` (no autograd: nothing has a graph)."""

    def resize(self, maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
        if tuple(maps.shape[-2:]) == tuple(size):
            return maps
        if len(size) == 3:  # volumes (..., d, h, w): trilinear, separable along each axis
            m = maps if maps.dtype in (np.float32, np.float64) else maps.astype(np.float32)
            d, h, w = m.shape[-3:]
            if mode == "nearest":  # torch's "nearest": source index floor(i * n / N), along each axis
                for ax, (n, N) in enumerate(zip((d, h, w), size)):
                    m = np.take(m, np.minimum((np.arange(int(N)) * (n / int(N))).astype(np.int64), n - 1),
                                axis=m.ndim - 3 + ax)
                return m
            rd, ry, rx = (bilinear_matrix(n, int(N)).astype(m.dtype) for n, N in zip((d, h, w), size))
            return np.einsum("Dd,Hh,Ww,...dhw->...DHW", rd, ry, rx, m, optimize=True)
        if mode != "bilinear":
            import cv2

            flag = {"nearest": cv2.INTER_NEAREST, "bicubic": cv2.INTER_CUBIC}[mode]
            flat = np.asarray(maps, dtype=np.float32).reshape(-1, *maps.shape[-2:])
            out = np.stack([cv2.resize(m, (int(size[1]), int(size[0])), interpolation=flag) for m in flat])
            return out.reshape(*maps.shape[:-2], *size)
        m = maps if maps.dtype in (np.float32, np.float64) else maps.astype(np.float32)
        ry, rxt = self.resize_matrices(m.shape[-2], m.shape[-1], int(size[0]), int(size[1]), m)
        return ry @ (m @ rxt)

    def resize_matrices(self, h: int, w: int, H: int, W: int, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _pair(h, w, H, W, np.dtype(like.dtype))

    def has_graph(self, x: Any) -> bool:
        return False

    def clip_(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.clip(x, lo, hi, out=x) if x.flags.writeable else np.clip(x, lo, hi)

    def softmax(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        e = np.exp(-np.abs(x))  # never overflows: exp of a non-positive number
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.result_type(x, np.float32), copy=False)

    def detach(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_list(self, x: Any) -> list:
        return np.asarray(x).reshape(-1).tolist()

    def extrema(self, x: Any) -> tuple[float, float]:
        x = np.asarray(x)
        return float(x.min()), float(x.max())

    def topk(self, x: np.ndarray, k: int, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flip(np.argsort(x, axis=axis, kind="stable"), axis=axis)
        idx = np.take(idx, np.arange(k), axis=axis)
        return np.take_along_axis(x, idx, axis=axis), idx

    def quantile(self, x: np.ndarray, q: float, axis: int = -1) -> np.ndarray:
        return np.quantile(x, q, axis=axis).astype(x.dtype, copy=False)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def asarray(self, x: Any, like: Any) -> np.ndarray:
        return np.asarray(x)

    # --- for metrics/
    def device_type(self, x: Any) -> str:
        return "cpu"

    def generator(self, seed: Optional[int], like: Any = None) -> np.random.Generator:
        """NumPy's generator (``seed=None``: a fresh, unseeded one): reproducible, not torch's draws."""
        return np.random.default_rng(seed)

    def random(self, shape: Sequence[int], generator: np.random.Generator, like: Any,
               normal: bool = False) -> np.ndarray:
        gen = generator if generator is not None else np.random.default_rng()
        draw = gen.standard_normal(tuple(shape), dtype=np.float32) if normal else gen.random(tuple(shape), dtype=np.float32)
        return draw.astype(np.asarray(like).dtype, copy=False)

    def separable_filter(self, x: np.ndarray, k_w: np.ndarray, k_h: np.ndarray, padding: str) -> np.ndarray:
        """Correlation (not convolution: kernels are not flipped) after ``reflect`` / ``edge`` padding."""
        from scipy.ndimage import correlate1d

        mode = {"reflect": "mirror", "replicate": "nearest"}[padding]  # torch's reflect = scipy's mirror
        y = correlate1d(np.asarray(x), np.asarray(k_w), axis=-1, mode=mode)
        return correlate1d(y, np.asarray(k_h), axis=-2, mode=mode)

    def box_mean(self, x: np.ndarray, radius: int) -> np.ndarray:
        """Window sums by cumulative sums along each axis, divided by the in-image window sizes."""
        r = int(radius)
        x = np.asarray(x)

        def window_sum(a: np.ndarray, axis: int) -> np.ndarray:
            n = a.shape[axis]
            c = np.cumsum(a, axis=axis, dtype=np.float64)
            c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
            hi = np.minimum(np.arange(n) + r + 1, n)
            lo = np.maximum(np.arange(n) - r, 0)
            return np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)

        H, W = x.shape[-2:]
        count = np.outer(np.minimum(np.arange(H) + r + 1, H) - np.maximum(np.arange(H) - r, 0),
                         np.minimum(np.arange(W) + r + 1, W) - np.maximum(np.arange(W) - r, 0))
        return (window_sum(window_sum(x, -1), -2) / count).astype(x.dtype, copy=False)

    def average_ranks(self, x: np.ndarray) -> np.ndarray:
        from scipy.stats import rankdata

        return rankdata(np.asarray(x), method="average", axis=1).astype(np.float64) - 1.0

    # --- for methods/
    def set_at(self, x: np.ndarray, index: tuple, values: Any) -> np.ndarray:
        x[index] = values
        return x

    def resize_corners(self, maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Bilinear with ``align_corners=True`` (:func:`camlens.backends.base.corner_matrix`), separable;
        a 3-entry ``size``: trilinear on ``(..., d, h, w)``."""
        m = np.asarray(maps)
        dt = m.dtype if m.dtype in (np.float32, np.float64) else np.float32
        if len(size) == 3:
            rd, ry, rx = (corner_matrix(n, int(N)).astype(dt) for n, N in zip(m.shape[-3:], size))
            return np.einsum("Dd,Hh,Ww,...dhw->...DHW", rd, ry, rx, m.astype(dt, copy=False), optimize=True)
        ry = corner_matrix(m.shape[-2], int(size[0])).astype(dt)
        rx = corner_matrix(m.shape[-1], int(size[1])).astype(dt)
        return ry @ m.astype(dt, copy=False) @ rx.T

    # --- for fronts/
    def top_mask(self, x: np.ndarray, k: int) -> np.ndarray:
        """The indices of :meth:`topk` set in a False mask (``np.put_along_axis``)."""
        mask = np.zeros(np.shape(x), dtype=bool)
        np.put_along_axis(mask, self.topk(np.asarray(x), k, axis=-1)[1], True, axis=-1)
        return mask

    def to_file(self, x: Any) -> tuple[np.ndarray, str, str]:
        """``x`` itself, ``"numpy.DTYPE"`` and ``"numpy"`` (the file format's names for NumPy arrays)."""
        a = np.asarray(x)
        return a, f"numpy.{a.dtype}", "numpy"

    def from_file(self, values: np.ndarray, dtype: str, device: Any = None) -> np.ndarray:
        """``values`` as stored in the file. Entries saved from a framework that is not installed load
        this way too (:func:`camlens.backends.base.ops_named`): a dtype NumPy lacks then stays the one
        it was widened to (bfloat16 as float32, the same values); NumPy arrays have no device, so
        ``device`` must be ``None`` or the CPU."""
        if device is not None and str(device) != "cpu":
            from ..core.errors import ConfigError

            raise ConfigError(f"NumPy arrays live in host memory: cannot place them on device {str(device)!r} "
                              "(leave device unset, or install the framework the arrays were saved from)")
        return values

    def is_out_of_memory(self, err: BaseException) -> bool:
        """``MemoryError`` (NumPy's failed allocations subclass it)."""
        return isinstance(err, MemoryError)
