"""The target scores ``S (B, T)`` recomputed on the TensorFlow outputs, inside the gradient tape.

The engine resolves targets and computes the scores it reports on NumPy copies of the outputs
(:mod:`camlens.core.targets`, array-API maths). NumPy records no graph, so the Keras backend
evaluates the same resolved targets again on the TensorFlow outputs of the same forward, where the
tape records them; the two agree to float rounding (checked: a mismatch is an error). Resolved
targets are read by their attributes (``head``, ``cls``, ``fn``, ``head_only``, ``sign``; a combined
target's ``parts`` / ``weights``), so this module needs nothing of :mod:`camlens.core` but its errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from ...core.errors import TargetError

__all__ = ["split_tf", "tf_target_scores"]


def split_tf(output: Any) -> dict:
    """``{head key: tensor}`` of a Keras output (as :func:`camlens.core.targets.split_outputs` reads
    its NumPy copy): a tensor is head 0, a dict its keys, a list / tuple its positions."""
    if isinstance(output, Mapping):
        return dict(output)
    if isinstance(output, (list, tuple)):
        return dict(enumerate(output))
    return {0: output}


def _head_score(head: tf.Tensor, cls: Any) -> tf.Tensor:
    """``head[:, cls]`` (summed over any further axes); a ``(B,)`` / ``(B, 1)`` head its value."""
    if head.shape.rank == 1:
        return head
    B = tf.shape(head)[0]
    if cls is None:
        return tf.reduce_sum(tf.reshape(head, (B, -1)), axis=1)
    col = head[:, cls]
    return col if col.shape.rank == 1 else tf.reduce_sum(tf.reshape(col, (B, -1)), axis=1)


def _score(tg: Any, heads: dict, output: Any) -> tf.Tensor:
    """Target ``tg``'s score per image ``(B,)`` on the TF output (``-S`` for ``sign=-1``)."""
    fn = getattr(tg, "fn", None)
    if fn is None:
        s = _head_score(heads[tg.head], tg.cls)
    elif hasattr(fn, "parts") and hasattr(fn, "weights"):  # a combined target: sum_t w_t S_t
        s = tf.add_n([float(w) * _score(p, heads, output) for w, p in zip(fn.weights, fn.parts)])
    else:
        try:
            s = tf.convert_to_tensor(fn(heads[tg.head] if tg.head_only else output))
        except Exception as err:  # a score function written for NumPy only
            raise TargetError(f"target {tg.label!r}: its score function failed on the model's TensorFlow output "
                              f"({type(err).__name__}: {err}); on a Keras model a score function receives NumPy "
                              "arrays for the reported scores and TensorFlow tensors for the gradients, so write it "
                              "with indexing and arithmetic (out[:, 3] - out[:, 5]) or keras.ops") from err
        if s.shape.rank != 1:
            raise TargetError(f"target {tg.label!r}: a score function must return shape (B,), got {tuple(s.shape)}")
    return -s if getattr(tg, "sign", 1) == -1 else s


def tf_target_scores(rows: list, output: Any) -> tf.Tensor:
    """``S (B, T)`` with ``S[b, t]`` = target ``rows[b][t]`` on image ``b``, as float32 TF tensor."""
    heads = split_tf(output)
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
            s = tf.stack(parts)
        cols.append(tf.cast(s, tf.float32))
    return tf.stack(cols, axis=1)
