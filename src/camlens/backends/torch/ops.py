"""The array operations of the torch backend: the array-API namespace (``array_api_compat.torch``)
and the :class:`camlens.backends.base.Ops` the standard lacks."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TorchOps", "resize_pair"]


def _source_index(n_in: int, n_out: int) -> Tensor:
    """Fractional source position of each output, ``max((d + 0.5) * n_in / n_out - 0.5, 0)`` (float64)."""
    return ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """``R`` ``(n_out, n_in)`` with ``R @ v`` = 1-D bilinear resize of ``v``, ``align_corners=False``.

    PyTorch's source index: ``s = max((d + 0.5) * n_in / n_out - 0.5, 0)``, ``i0 = floor(s)``,
    ``i1 = min(i0 + 1, n_in - 1)``, ``out[d] = (1 - l) v[i0] + l v[i1]`` with ``l = s - i0``.
    """
    s = _source_index(n_in, n_out)
    i0 = s.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    lam = s - i0
    r = torch.zeros(n_out, n_in, dtype=torch.float64)
    r.index_put_((torch.arange(n_out), i0), 1 - lam, accumulate=True)
    r.index_put_((torch.arange(n_out), i1), lam, accumulate=True)
    return r.float().to(device)


@functools.lru_cache(maxsize=64)
def resize_pair(h: int, w: int, H: int, W: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(Ry (H, h), Rx^T (w, W))`` in ``dtype``: a bilinear resize is ``Ry @ m @ Rx^T`` (shared,
    read-only tensors)."""
    return _bilinear_matrix(h, H, device).to(dtype), _bilinear_matrix(w, W, device).to(dtype).T.contiguous()



class TorchOps:
    """:class:`camlens.backends.base.Ops` on torch tensors (on their device)."""

    def resize(self, maps: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
        """Bilinear (``align_corners=False``) as ``Ry @ m @ Rx^T`` with two cached small matrices —
        the numbers of ``F.interpolate`` (to ~5e-7), one batched matmul for many maps; other modes
        by ``F.interpolate``."""
        if tuple(maps.shape[-2:]) == tuple(size):
            return maps
        if mode != "bilinear":
            kw = {"align_corners": False} if mode == "bicubic" else {}
            return F.interpolate(maps.float(), size=tuple(size), mode=mode, **kw)
        m = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
        ry, rxt = resize_pair(m.shape[-2], m.shape[-1], int(size[0]), int(size[1]), m.device, m.dtype)
        return ry @ (m @ rxt)

    def topk(self, x: Tensor, k: int, axis: int = -1) -> tuple[Tensor, Tensor]:
        r = x.topk(k, dim=axis)
        return r.values, r.indices

    def quantile(self, x: Tensor, q: float, axis: int = -1) -> Tensor:
        return torch.quantile(x, q, dim=axis)

    def normal(self, shape: Sequence[int], seed: int, like: Tensor) -> Tensor:
        gen = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randn(tuple(shape), generator=gen, device=like.device, dtype=like.dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)

    def asarray(self, x: Any, like: Tensor) -> Tensor:
        return torch.as_tensor(np.asarray(x), device=like.device)
