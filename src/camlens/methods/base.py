"""The method registry: a CAM method is a small piece of tensor math on what the engine captures.

A gradient method implements ``raw(acts, grads) -> (B, T, h, w)`` given the layer activations
``acts`` ``(B, C, h, w)`` and the gradients of the T target scores ``grads`` ``(B, T, C, h, w)``.
Adding one is a subclass (or a function) and :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

__all__ = ["Method", "GradientMethod", "register", "get_method", "available_methods"]

_REGISTRY: dict[str, "Method"] = {}


@dataclass(frozen=True)
class Method:
    """A method's identity and cost, for ``camlens methods`` and the engine.

    Attributes:
        name: registry key (``--method NAME``).
        description: one line.
        cost: forwards / backwards needed, in words.
        needs_grads: whether the engine must compute gradients at the layer.
    """

    name: str
    description: str
    cost: str
    needs_grads: bool = True


@dataclass(frozen=True)
class GradientMethod(Method):
    """A method that is a function of activations and gradients only.

    ``fn(acts (B, C, h, w), grads (B, T, C, h, w)) -> raw maps (B, T, h, w)``.
    """

    fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None

    def raw(self, acts: Tensor, grads: Tensor) -> Tensor:
        assert self.fn is not None
        return self.fn(acts, grads)


def register(method: Method) -> Method:
    """Add a method to the registry (name must be new)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look a method up by name; an unknown name lists the available ones."""
    key = name.lower().replace("_", "").replace("-", "")
    for n, m in _REGISTRY.items():
        if n.replace("_", "").replace("-", "") == key:
            return m
    raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")


def available_methods() -> dict[str, Method]:
    """All registered methods by name."""
    return dict(_REGISTRY)
