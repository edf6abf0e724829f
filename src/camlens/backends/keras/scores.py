"""The target scores ``S (B, T)`` recomputed on the Keras backend's outputs, where autodiff sees them.

The engine resolves targets and computes the scores it reports on NumPy copies of the outputs
(:mod:`camlens.core.targets`, array-API maths). NumPy records no graph, so the Keras backend
evaluates the same resolved targets again on the backend's outputs of the same forward (TF tensors
inside the tape, JAX arrays inside ``jax.vjp``, torch tensors on the recorded graph), in
``keras.ops``; the two agree to float rounding (checked: a mismatch is an error). Resolved
targets are read by their attributes (``head``, ``cls``, ``fn``, ``head_only``, ``sign``; a combined
target's ``parts`` / ``weights``), so this module needs nothing of :mod:`camlens.core` but its errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keras import ops

from ...core.errors import TargetError

__all__ = ["split_heads", "target_scores", "split_tf", "tf_target_scores"]


def split_heads(output: Any) -> dict:
    """``{head key: tensor}`` of a Keras output (as :func:`camlens.core.targets.split_outputs` reads
    its NumPy copy): a tensor is head 0, a dict its keys, a list / tuple its positions."""
    if isinstance(output, Mapping):
        return dict(output)
    if isinstance(output, (list, tuple)):
        return dict(enumerate(output))
    return {0: output}


def _head_score(head: Any, cls: Any) -> Any:
    """``head[:, cls]`` (summed over any further axes); a ``(B,)`` / ``(B, 1)`` head its value."""
    if len(head.shape) == 1:
        return head
    if cls is None:
        return ops.sum(ops.reshape(head, (head.shape[0], -1)), axis=1)
    col = head[:, cls]
    return col if len(col.shape) == 1 else ops.sum(ops.reshape(col, (col.shape[0], -1)), axis=1)


def _score(tg: Any, heads: dict, output: Any) -> Any:
    """Target ``tg``'s score per image ``(B,)`` on the backend's output (``-S`` for ``sign=-1``)."""
    fn = getattr(tg, "fn", None)
    if fn is None:
        s = _head_score(heads[tg.head], tg.cls)
    elif hasattr(fn, "parts") and hasattr(fn, "weights"):  # a combined target: sum_t w_t S_t
        terms = [float(w) * _score(p, heads, output) for w, p in zip(fn.weights, fn.parts)]
        s = terms[0]
        for term in terms[1:]:
            s = s + term
    else:
        try:
            s = ops.convert_to_tensor(fn(heads[tg.head] if tg.head_only else output))
        except Exception as err:  # a score function written for NumPy only
            raise TargetError(f"target {tg.label!r}: its score function failed on the model's output as a "
                              f"{keras_backend()} tensor ({type(err).__name__}: {err}); on a Keras model a score "
                              "function receives NumPy arrays for the reported scores and the backend's tensors for "
                              "the gradients, so write it with indexing and arithmetic (out[:, 3] - out[:, 5]) or "
                              "keras.ops") from err
        if len(s.shape) != 1:
            raise TargetError(f"target {tg.label!r}: a score function must return shape (B,), got {tuple(s.shape)}")
    return -s if getattr(tg, "sign", 1) == -1 else s


def keras_backend() -> str:
    from keras import backend

    return {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}.get(backend.backend(), backend.backend())


def target_scores(rows: list, output: Any) -> Any:
    """``S (B, T)`` with ``S[b, t]`` = target ``rows[b][t]`` on image ``b``, a float32 tensor of the
    Keras backend's kind."""
    heads = split_heads(output)
    B, T = len(rows), len(rows[0])
    cols = []
    for t in range(T):
        col = [rows[b][t] for b in range(B)]
        if all(c == col[0] for c in col):
            s = _score(col[0], heads, output)
        else:
            cache: dict = {}
            parts = []
            for b, c in enumerate(col):
                if c not in cache:
                    cache[c] = _score(c, heads, output)
                parts.append(cache[c][b])
            s = ops.stack(parts)
        cols.append(ops.cast(s, "float32"))
    return ops.stack(cols, axis=1)


split_tf, tf_target_scores = split_heads, target_scores  # the names of the TensorFlow-only first slice
