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

# every name of the compat namespace (all, any, max, ... shadow the built-ins here: use builtins.*)
globals().update({k: getattr(_compat, k) for k in dir(_compat) if not k.startswith("_")})

Axis = Optional[Union[int, tuple[int, ...]]]


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
    if x.is_floating_point() and bounds and builtins.all(type(b) in (int, float) and b == b for b in bounds):  # b == b: not NaN
        return torch.clamp(x, min, max)
    return _compat.clip(x, min, max)


def reshape(x: torch.Tensor, /, shape: tuple[int, ...], *, copy: Optional[bool] = None) -> torch.Tensor:
    return torch.reshape(x, shape) if copy is None else _compat.reshape(x, shape, copy=copy)


def mean(x: torch.Tensor, /, *, axis: Axis = None, keepdims: bool = False) -> torch.Tensor:
    if axis is None or not x.is_floating_point():
        return _compat.mean(x, axis=axis, keepdims=keepdims)
    return torch.mean(x, dim=axis, keepdim=keepdims)


def sum(x: torch.Tensor, /, *, axis: Axis = None, dtype: Any = None, keepdims: bool = False) -> torch.Tensor:  # noqa: A001
    if axis is None or dtype is not None or not x.is_floating_point():
        return _compat.sum(x, axis=axis, dtype=dtype, keepdims=keepdims)
    return torch.sum(x, dim=axis, keepdim=keepdims)
