"""The array-API namespace of torch tensors: ``array_api_compat.torch`` with direct torch calls for
the few functions on camlens' per-call path (same results; the compat wrappers re-check dtypes and
broadcast, which costs microseconds per call on small tensors).

``camlens.backends.base.namespace`` returns this module for torch tensors.
"""

from __future__ import annotations

import builtins
from typing import Any, Optional, Union

import torch
from array_api_compat import torch as _compat

# every name of the compat namespace (all, any, max, min, sum, int, float, bool, ... shadow the built-ins
# here: use builtins.*)
globals().update({k: getattr(_compat, k) for k in dir(_compat) if not k.startswith("_")})

Axis = Optional[Union[builtins.int, tuple[builtins.int, ...]]]
_REAL = (builtins.int, builtins.float)


def take_along_axis(x: torch.Tensor, indices: torch.Tensor, /, *, axis: int = -1) -> torch.Tensor:
    """``torch.gather`` when ``indices`` has ``x``'s shape but along ``axis`` (no broadcasting needed)."""
    if x.ndim == indices.ndim and builtins.all(a == b for i, (a, b) in enumerate(zip(x.shape, indices.shape))
                                               if i != axis % x.ndim):
        return torch.gather(x, axis, indices)
    return _compat.take_along_axis(x, indices, axis=axis)


def clip(x: torch.Tensor, /, min: Any = None, max: Any = None) -> torch.Tensor:  # noqa: A002
    """``torch.clamp`` for a floating tensor and finite float bounds (one or both); the compat
    wrapper (integer ranges, NaN bounds, tensor bounds) otherwise."""
    bounds = [b for b in (min, max) if b is not None]
    if x.is_floating_point() and bounds and builtins.all(type(b) in _REAL and b == b for b in bounds):  # b == b: not NaN
        return torch.clamp(x, min, max)
    return _compat.clip(x, min, max)


def matmul(x1: torch.Tensor, x2: torch.Tensor, /) -> torch.Tensor:
    """``torch.bmm`` for two 3-D stacks of one batch size (``torch.matmul`` expands and reshapes
    both first: four more dispatched ops per call); ``torch.matmul`` otherwise."""
    if x1.ndim == 3 and x2.ndim == 3 and x1.shape[0] == x2.shape[0] and x1.dtype == x2.dtype:
        return torch.bmm(x1, x2)
    return _compat.matmul(x1, x2)


def reshape(x: torch.Tensor, /, shape: tuple[int, ...], *, copy: Optional[bool] = None) -> torch.Tensor:
    return torch.reshape(x, shape) if copy is None else _compat.reshape(x, shape, copy=copy)


def mean(x: torch.Tensor, /, *, axis: Axis = None, keepdims: bool = False) -> torch.Tensor:
    if not x.is_floating_point() or axis == () or (axis is None and keepdims):
        return _compat.mean(x, axis=axis, keepdims=keepdims)
    return torch.mean(x) if axis is None else torch.mean(x, dim=axis, keepdim=keepdims)


def sum(x: torch.Tensor, /, *, axis: Axis = None, dtype: Any = None, keepdims: bool = False) -> torch.Tensor:  # noqa: A001
    if dtype is not None or not x.is_floating_point() or axis == () or (axis is None and keepdims):
        return _compat.sum(x, axis=axis, dtype=dtype, keepdims=keepdims)
    return torch.sum(x) if axis is None else torch.sum(x, dim=axis, keepdim=keepdims)


def max(x: torch.Tensor, /, *, axis: Axis = None, keepdims: bool = False) -> torch.Tensor:  # noqa: A001
    if axis == ():  # no axis: the array itself (a copy), as the standard says
        return _compat.max(x, axis=axis, keepdims=keepdims)
    return torch.amax(x) if axis is None and not keepdims else torch.amax(x, () if axis is None else axis, keepdim=keepdims)


def min(x: torch.Tensor, /, *, axis: Axis = None, keepdims: bool = False) -> torch.Tensor:  # noqa: A001
    if axis == ():  # no axis: the array itself (a copy), as the standard says
        return _compat.min(x, axis=axis, keepdims=keepdims)
    return torch.amin(x) if axis is None and not keepdims else torch.amin(x, () if axis is None else axis, keepdim=keepdims)
