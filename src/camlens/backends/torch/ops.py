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

from ...core.errors import ConfigKeyError, InputTypeError
from ..base import bilinear_matrix

__all__ = ["TorchOps", "resize_pair"]


@functools.lru_cache(maxsize=64)
def resize_pair(h: int, w: int, H: int, W: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(Ry (H, h), Rx^T (w, W))`` in ``dtype`` on ``device`` (shared, read-only tensors) from the
    float64 :func:`camlens.backends.base.bilinear_matrix`, rounded to float32 first as always."""
    ry = torch.from_numpy(bilinear_matrix(h, H).copy()).float().to(device=device, dtype=dtype)
    rx = torch.from_numpy(bilinear_matrix(w, W).copy()).float().to(device=device, dtype=dtype)
    return ry, rx.T.contiguous()


class TorchOps:
    """:class:`camlens.backends.base.Ops` on torch tensors (on their device)."""

    def resize(self, maps: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
        """Bilinear (``align_corners=False``) as ``Ry @ m @ Rx^T`` with two cached small matrices —
        the numbers of ``F.interpolate`` (to ~5e-7), one batched matmul for many maps; other modes
        by ``F.interpolate``."""
        if tuple(maps.shape[-2:]) == tuple(size):
            return maps
        if len(size) == 3:  # volumes (..., d, h, w): trilinear (or nearest)
            return self._resize_volume(maps, size, mode)
        if mode != "bilinear":
            kw = {"align_corners": False} if mode == "bicubic" else {}
            return F.interpolate(maps.float(), size=tuple(size), mode=mode, **kw)
        m = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
        ry, rxt = resize_pair(m.shape[-2], m.shape[-1], int(size[0]), int(size[1]), m.device, m.dtype)
        if m.ndim >= 2 and m.numel() == m.shape[-2] * m.shape[-1]:  # one map: two plain 2-D products
            return (ry @ (m.reshape(m.shape[-2:]) @ rxt)).reshape(*m.shape[:-2], *ry.shape[:1], rxt.shape[1])
        return ry @ (m @ rxt)

    @staticmethod
    def _resize_volume(maps: Tensor, size: tuple[int, ...], mode: str = "bilinear") -> Tensor:
        """``(..., d, h, w) -> (..., D, H, W)`` by ``F.interpolate(mode="trilinear", align_corners=False)``
        (``mode="nearest"``: ``F.interpolate``'s nearest) on the maps as channels of one volume
        ``(1, N, d, h, w)``."""
        *lead, d, h, w = maps.shape
        size = (int(size[0]), int(size[1]), int(size[2]))
        if (d, h, w) == size:
            return maps
        m = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
        if mode == "nearest":
            out = F.interpolate(m.reshape(1, -1, d, h, w), size=size, mode="nearest")
        else:
            out = F.interpolate(m.reshape(1, -1, d, h, w), size=size, mode="trilinear", align_corners=False)
        return out.reshape(*lead, *size)

    def resize_matrices(self, h: int, w: int, H: int, W: int, like: Tensor) -> tuple[Tensor, Tensor]:
        return resize_pair(h, w, H, W, like.device, like.dtype)

    def has_graph(self, x: Any) -> bool:
        return isinstance(x, Tensor) and x.requires_grad

    def clip_(self, x: Tensor, lo: float, hi: float) -> Tensor:
        return x.clamp_(lo, hi)

    def softmax(self, x: Tensor, axis: int = -1) -> Tensor:
        return x.softmax(axis)

    def sigmoid(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def detach(self, x: Tensor) -> Tensor:
        return x.detach() if x.requires_grad else x  # no graph: the tensor itself (no op dispatched)

    def to_list(self, x: Tensor) -> list:
        x = x.detach() if x.requires_grad else x
        if x.ndim == 2:  # e.g. scores (B, T): flattened on the host, no reshape dispatched
            return [v for row in x.tolist() for v in row]
        return (x if x.ndim == 1 else x.reshape(-1)).tolist()

    def extrema(self, x: Tensor) -> tuple[float, float]:
        lo, hi = torch.aminmax(x.detach() if x.requires_grad else x)  # one pass, one op
        if x.device.type == "cpu":
            return lo.item(), hi.item()
        both = torch.stack([lo, hi]).tolist()  # one copy to the host, not two
        return both[0], both[1]

    def topk(self, x: Tensor, k: int, axis: int = -1) -> tuple[Tensor, Tensor]:
        r = x.topk(k, dim=axis)
        return r.values, r.indices

    def quantile(self, x: Tensor, q: float, axis: int = -1) -> Tensor:
        return torch.quantile(x, q, dim=axis)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)

    def asarray(self, x: Any, like: Tensor) -> Tensor:
        if isinstance(x, Tensor):
            return x.to(like.device)
        return torch.as_tensor(np.asarray(x), device=like.device)

    # --- for metrics/
    def device_type(self, x: Any) -> str:
        return x.device.type if isinstance(x, Tensor) else "cpu"

    def generator(self, seed: "int | None", like: Any = None) -> "torch.Generator | None":
        """A ``torch.Generator`` on ``like``'s device; ``seed=None``: ``torch.default_generator`` on the
        CPU, ``None`` (torch's global stream there, for :meth:`random`) on other devices."""
        device = like.device if isinstance(like, Tensor) else torch.device("cpu")
        if seed is None:
            return torch.default_generator if device.type == "cpu" else None
        return torch.Generator(device=device).manual_seed(int(seed))

    def random(self, shape: Sequence[int], generator: "torch.Generator | None", like: Tensor,
               normal: bool = False) -> Tensor:
        """``torch.rand`` / ``torch.randn`` in float32 on the generator's device (``None``: the
        global stream on ``like``'s device), then moved to ``like``'s device and dtype."""
        device = generator.device if generator is not None else like.device
        draw = torch.randn if normal else torch.rand
        out = draw(tuple(int(s) for s in shape), generator=generator, device=device, dtype=torch.float32)
        return out.to(device=like.device, dtype=like.dtype)

    def separable_filter(self, x: Tensor, k_w: Tensor, k_h: Tensor, padding: str) -> Tensor:
        """``F.pad`` (``padding`` mode) then two 1-channel ``conv2d``: along W, then along H."""
        *lead, H, W = x.shape
        pw, ph = k_w.shape[0] // 2, k_h.shape[0] // 2
        y = F.pad(x.reshape(-1, 1, H, W), (pw, pw, ph, ph), mode=padding)
        y = F.conv2d(y, k_w.reshape(1, 1, 1, -1))  # along W
        y = F.conv2d(y, k_h.reshape(1, 1, -1, 1))  # along H
        return y.reshape(*lead, H, W)

    def box_mean(self, x: Tensor, radius: int) -> Tensor:
        """``F.avg_pool2d`` with kernel ``2 r + 1``, stride 1, padding ``r``, ``count_include_pad=False``."""
        *lead, H, W = x.shape
        r = int(radius)
        y = F.avg_pool2d(x.reshape(-1, 1, H, W), 2 * r + 1, stride=1, padding=r, count_include_pad=False)
        return y.reshape(*lead, H, W)

    def average_ranks(self, x: Tensor) -> Tensor:
        """One stable sort; each tie group's first and last place by ``scatter_reduce``; scattered back."""
        N, P = x.shape
        s, idx = x.sort(dim=1, stable=True)
        new = torch.ones_like(s, dtype=torch.bool)
        new[:, 1:] = s[:, 1:] != s[:, :-1]
        gid = (new.cumsum(1) - 1) + torch.arange(N, device=x.device)[:, None] * P  # tie group, unique per row
        pos = torch.arange(P, device=x.device, dtype=torch.float64).expand(N, P).reshape(-1)
        g = gid.reshape(-1)
        first = torch.full((N * P,), float(P), dtype=torch.float64, device=x.device).scatter_reduce(0, g, pos, "amin")
        last = torch.full((N * P,), -1.0, dtype=torch.float64, device=x.device).scatter_reduce(0, g, pos, "amax")
        avg_sorted = ((first[g] + last[g]) / 2).reshape(N, P)
        return torch.empty_like(avg_sorted).scatter_(1, idx, avg_sorted)

    # --- for methods/
    def resize_corners(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        """``F.interpolate(..., mode="bilinear", align_corners=True)`` on the maps as channels of one
        image ``(1, N, h, w)``; a 3-entry ``size``: ``mode="trilinear"`` on ``(..., d, h, w)`` maps."""
        if len(size) == 3:
            *lead, d, h, w = maps.shape
            size3 = tuple(int(v) for v in size)
            out = F.interpolate(maps.reshape(1, -1, d, h, w), size=size3, mode="trilinear", align_corners=True)
            return out.reshape(*lead, *size3)
        *lead, h, w = maps.shape
        size = (int(size[0]), int(size[1]))
        out = F.interpolate(maps.reshape(1, -1, h, w), size=size, mode="bilinear", align_corners=True)
        return out.reshape(*lead, *size)

    def set_at(self, x: Tensor, index: tuple, values: Any) -> Tensor:
        """``x[index] = values`` in place (``index_put_``); returns ``x``."""
        x[index] = values
        return x

    # --- for fronts/
    def top_mask(self, x: Tensor, k: int) -> Tensor:
        """``zeros_like(x, bool).scatter_(-1, x.topk(k).indices, True)``."""
        return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)

    def to_file(self, x: Tensor) -> tuple[np.ndarray, str, str]:
        """Detached, on the CPU, conjugation / negation bits resolved, dense; bfloat16 and the 1-byte
        float8 types as float32, complex32 as complex64 (exact widenings); the NumPy view of the
        CPU copy otherwise (no copy for a CPU tensor)."""
        c = x.detach().cpu().resolve_conj().resolve_neg()
        if c.layout != torch.strided:
            c = c.to_dense()
        if c.dtype == torch.bfloat16 or (c.is_floating_point() and c.element_size() == 1):
            a = c.float().numpy()  # bf16 / float8 -> float32 is exact
        elif c.dtype == torch.complex32:
            a = c.to(torch.complex64).numpy()
        else:
            try:
                a = c.numpy()
            except TypeError as e:
                raise InputTypeError(f"NumPy has no dtype for {x.dtype}") from e
        return a, str(x.dtype), str(x.device)

    def from_file(self, values: np.ndarray, dtype: str, device: Any = None) -> Tensor:
        """A tensor of dtype ``torch.NAME`` (``dtype`` = ``"torch.NAME"``) on ``device``: a float32 file
        entry holding widened bfloat16 values is narrowed bit for bit (its low 16 bits are zero), others
        by ``Tensor.to``; the entry is copied (the tensor owns its memory)."""
        want = getattr(torch, dtype[len("torch."):], None) if dtype.startswith("torch.") else None
        if not isinstance(want, torch.dtype):
            raise ConfigKeyError(f"unknown to this PyTorch {torch.__version__}")
        dev = torch.device("cpu") if device is None else torch.device(device)
        if want == torch.bfloat16 and values.dtype == np.float32:
            bits = np.ascontiguousarray(values).view(np.uint32)
            if not (bits & 0xFFFF).any():  # float32 widened from bf16: its top 16 bits are the bf16, bit for bit
                t = torch.from_numpy((bits >> 16).astype(np.uint16).view(np.int16)).view(torch.bfloat16)
                return t.to(dev)
        t = torch.from_numpy(np.array(values, copy=True))
        return t.to(device=dev, dtype=want)

    def is_out_of_memory(self, err: BaseException) -> bool:
        """``torch.OutOfMemoryError`` (CUDA / MPS allocator failures), where this PyTorch has it."""
        oom = getattr(torch, "OutOfMemoryError", None)
        return oom is not None and isinstance(err, oom)
