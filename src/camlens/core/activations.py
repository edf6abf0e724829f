"""Output activations: how a head's logits become the probabilities in ``exp.probs`` and the
weights of ``combine="confidence"``.

* ``"softmax"``: ``p_k = exp(z_k) / sum_j exp(z_j)`` over the K classes of a ``(B, K)`` head —
  one class per image (the default for ``(B, K)`` heads with ``K >= 2``);
* ``"sigmoid"``: ``p_k = 1 / (1 + exp(-z_k))`` per class — multi-label heads, where every class is
  its own yes/no question; also a ``(B,)`` / ``(B, 1)`` binary logit;
* ``"none"``: the output is not a probability (regression values, features): ``probs`` is NaN
  and ``combine="confidence"`` refuses it (the default for every other head).

The activation never changes what is explained (maps explain the logit / value, ``exp.scores``):
both are monotone, so top-k classes are the same under either.

``explain(activation=...)`` takes a name (every head), a ``{head: name}`` mapping (other heads keep
their default) or ``None``: then a HuggingFace-style ``model.config.problem_type ==
"multi_label_classification"`` means ``"sigmoid"`` (read by attribute, no import of transformers).
Framework-free: array-API maths plus :meth:`Ops.sigmoid` / :meth:`Ops.softmax`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from ..backends.base import get_backend, namespace, ops_for, to_float32
from .errors import ConfigError, ConfigTypeError

HeadKey = Union[int, str]
Tensor = Any
ActivationSpec = Union[str, Mapping[HeadKey, str], None]

__all__ = ["ACTIVATIONS", "model_activation", "head_activations", "default_activation", "activate"]

#: The activation names :func:`camlens.explain` takes.
ACTIVATIONS = ("softmax", "sigmoid", "none")

#: ``config.problem_type`` values (HuggingFace ``PretrainedConfig``) and the activation they mean.
_PROBLEM_TYPES = {"multi_label_classification": "sigmoid", "single_label_classification": "softmax",
                  "regression": "none"}


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ConfigTypeError(f"activation{where} must be one of {list(ACTIVATIONS)}, got {name!r} "
                              f"({type(name).__name__})")
    low = name.strip().lower()
    if low not in ACTIVATIONS:
        raise ConfigError(f"unknown activation{where} {name!r}; the activations are {list(ACTIVATIONS)} "
                          "('sigmoid' for multi-label heads, 'none' for regression outputs)")
    return low


def model_activation(model: Any, activation: ActivationSpec) -> ActivationSpec:
    """``activation`` itself when given; else the one the model documents, or ``None`` (defaults).

    A model with ``model.config.problem_type`` (HuggingFace convention) gives ``"sigmoid"`` for
    ``"multi_label_classification"``, ``"softmax"`` for ``"single_label_classification"`` and
    ``"none"`` for ``"regression"``. ``config`` is read from the instance's ``__dict__`` first (a
    framework module's attribute lookup raises on a miss, which costs microseconds per call). Without
    it, the backend's ``output_activations(model)`` where it has one (Keras: a final sigmoid /
    softmax left out of the computed scores gives that head's activation).
    """
    if activation is not None:
        return activation
    config = getattr(model, "__dict__", {}).get("config")
    if config is None:
        return _backend_activations(model)
    kind = getattr(config, "problem_type", None)
    return _PROBLEM_TYPES.get(kind) if isinstance(kind, str) else None


def _backend_activations(model: Any) -> ActivationSpec:
    """The activations the model's backend knows it applies to its outputs and leaves out of the
    scores (``Backend.output_activations``, optional: the Keras backend's bypassed final softmax /
    sigmoid), or ``None``."""
    try:
        bk = get_backend(model)
    except Exception:  # not a framework model (the caller's own error follows)
        return None
    fn = getattr(bk, "output_activations", None)
    return fn(model) if fn is not None else None


def head_activations(spec: ActivationSpec, heads: Mapping[HeadKey, Tensor],
                     find: Callable[[Any, Mapping[HeadKey, Tensor]], HeadKey]) -> dict[HeadKey, str]:
    """The activation of each head named by ``spec``, by head key; heads not in it keep their default.

    ``spec``: ``None`` (every head its default), a name (every head) or ``{head key or position:
    name}``. ``find(key, heads)`` resolves a key to a head key (an error listing the outputs if none).
    """
    if spec is None:
        return {}
    if isinstance(spec, str):
        name = _check_name(spec, "")
        return {k: name for k in heads}
    if not isinstance(spec, Mapping):
        raise ConfigTypeError(f"activation= takes a name {list(ACTIVATIONS)}, a {{head: name}} dict or None, got "
                              f"{type(spec).__name__}")
    out: dict[HeadKey, str] = {}
    for key, name in spec.items():
        out[find(key, heads)] = _check_name(name, f" for head {key!r}")
    return out


def default_activation(head: Tensor) -> str:
    """``"softmax"`` for a floating-point ``(B, K)`` head with ``K >= 2``, else ``"none"``."""
    ok = head.ndim == 2 and head.shape[1] >= 2 and namespace(head).isdtype(head.dtype, "real floating")
    return "softmax" if ok else "none"


def activate(name: str, head: Tensor) -> Optional[Tensor]:
    """Probabilities of one head, detached, float32 or wider: ``(B, K)`` for a ``(B, K)`` head,
    ``(B, 1)`` for ``(B,)`` / ``(B, 1)``; ``None`` for ``"none"`` and for heads that have no
    probabilities under that activation (softmax of one logit, maps)."""
    if name == "none":
        return None
    ops = ops_for(head)
    h = to_float32(ops.detach(head))
    if h.ndim == 1:
        h = namespace(h).reshape(h, (h.shape[0], 1))
    if h.ndim != 2:
        return None
    if name == "softmax":
        return ops.softmax(h, axis=1) if h.shape[1] >= 2 else None
    return ops.sigmoid(h)
