"""Row-sparse matrix products for the target gradients of token models (a dispatch mode, no model edits).

A class-token head reads ONE token of the last block's output, so in the backward from the T target
scores to a token layer (e.g. ``blocks[-1].norm1``) the gradients reaching the block's MLP and output
projection are zero on every other token row: ``(T * B * N, C)`` matrices of which only ``T * B`` rows
are non-zero. Autograd multiplies them densely — for ViT-B/16 and 10 targets, 2 of the 3 matmuls of
the whole backward are ``(1970, 768) x (768, 3072)`` and ``(1970, 3072) x (3072, 768)``.
:class:`SparseRows` intercepts ``aten.mm`` while the backward runs: when at most half the rows of the
left factor are non-zero, it multiplies those rows alone and scatters them into zeros. Rows of zeros
give rows of zeros either way (for finite weights, which finite scores imply), so the gradients are
the same up to float rounding of the blocked product; the saving is the share of zero rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SparseRows", "MIN_ROWS"]

MIN_ROWS = 256  # smaller products are not worth the row test (and the mode's per-op cost)
_MM = torch.ops.aten.mm.default


class SparseRows(TorchDispatchMode):
    """``aten.mm(a, b)`` with ``a`` ``(M, K)``, ``M >= MIN_ROWS`` and at most ``M / 2`` non-zero rows:
    ``out[rows] = a[rows] @ b``, zeros elsewhere. Every other op passes through unchanged.
    ``saved``: how many rows were skipped (for tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.saved = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _MM and not kwargs:
            a, b = args
            M = a.shape[0]
            if M >= MIN_ROWS and a.dim() == 2:
                rows = a.ne(0).any(1).nonzero().squeeze(1)  # one device sync, on the large products only
                n = rows.numel()
                if 2 * n <= M:
                    out = a.new_zeros((M, b.shape[1]))
                    if n:
                        out.index_copy_(0, rows, func(a.index_select(0, rows), b))
                    self.saved += M - n
                    return out
        return func(*args, **kwargs)
