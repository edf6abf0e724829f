"""Guided backpropagation's ReLU rule for Keras 3 (TensorFlow) models, for one forward, without edits.

Every Keras route to a ReLU ends in the TensorFlow backend's ``nn.relu`` / ``nn.relu6``:
``keras.activations.relu`` (the ``activation="relu"`` of ``Conv2D`` / ``Dense`` / ``Activation``),
the ``ReLU`` layer (``ReLU(6.)`` in MobileNetV2), ``keras.ops.relu`` / ``relu6`` in a custom
layer. For the block of :func:`guided_relus`, those two functions of
``keras.src.backend.tensorflow.nn`` (looked up by attribute at call time) are replaced by
:func:`guided_relu` / :func:`guided_relu6`: the same forward, and a ``tf.custom_gradient`` backward

    relu:   dx = max(dy, 0) * [x > 0]            relu6:   dx = max(dy, 0) * [0 < x < 6]

— gradient flows back only where the input was in the linear range (the ReLU rule) AND the
incoming gradient is positive (the deconvnet rule): Springenberg et al.'s guided backpropagation,
as the torch backend's ``GuidedReLU`` (``threshold_backward`` / ``hardtanh_backward`` fed
``max(grad, 0)``). Nothing of the model is touched (no layer attribute, no weight); the module
attributes are put back on exit, also after an error (a lock keeps two guided forwards apart; other threads get Keras' own functions meanwhile).

The rule is defined for ReLU networks only. The block records every other activation the forward
runs (the backend's ``gelu``, ``silu`` (swish), ``hard_silu`` (hard swish), ``hard_sigmoid``,
``elu``, ``selu``, ``celu``, ``softplus`` (also inside mish), ``leaky_relu``, ``tanh``; ``PReLU``
layers, which are ``relu(x) - alpha * relu(-x)``, and ``ReLU`` layers with a threshold or a negative
slope), and ReLU ops that ran around those functions
(``tf.nn.relu`` called directly in a custom layer, seen by a TensorFlow op callback), so the
caller can refuse a result that would be a plain gradient under guided backprop's name.
``hard_sigmoid`` (``relu6(x + 3) / 6``) keeps its plain ReLU6 gradient: it is a gate, not a ReLU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Callable

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import nn as _tf_nn
from keras.src.backend.tensorflow import numpy as _tf_np

__all__ = ["guided_relu", "guided_relu6", "guided_relus", "GuidedRun", "NON_RELU"]

#: The TF backend's activation functions that are not ReLUs -> the name an error gives them.
NON_RELU = {"gelu": "GELU", "silu": "SiLU/swish", "hard_silu": "hard_swish", "hard_sigmoid": "hard_sigmoid",
            "elu": "ELU", "selu": "SELU", "celu": "CELU", "softplus": "Softplus/Mish", "leaky_relu": "LeakyReLU",
            "tanh": "tanh"}

_LOCK = threading.RLock()
_STATE = threading.local()  # .run: the GuidedRun of this thread's open block; .plain: depth inside hard_sigmoid


def _plain() -> bool:
    return getattr(_STATE, "plain", 0) > 0 or getattr(_STATE, "run", None) is None


def _guide(inside: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """``max(dy, 0) * [inside]``: the guided rule, ``inside`` the linear range of the input."""
    return tf.where(tf.logical_and(inside, dy > 0), dy, tf.zeros_like(dy))


@tf.custom_gradient
def guided_relu(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """``relu(x)`` whose gradient is ``max(dy, 0) * [x > 0]``."""
    return tf.nn.relu(x), lambda dy: _guide(x > 0, dy)


@tf.custom_gradient
def guided_relu6(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """``relu6(x)`` whose gradient is ``max(dy, 0) * [0 < x < 6]``."""
    return tf.nn.relu6(x), lambda dy: _guide(tf.logical_and(x > 0, x < 6), dy)


class GuidedRun:
    """What one guided forward saw: ``guided`` (ReLUs given the guided rule), ``unguided`` (names of
    the other activations, and of ReLUs it could not reach)."""

    def __init__(self) -> None:
        self.guided = 0
        self.unguided: set[str] = set()
        self._relu_ops = 0  # Relu / Relu6 ops executed (a TF op callback), ours included


def _replacements(run: GuidedRun) -> dict[tuple[Any, str], Callable[..., Any]]:
    """``{(module, name): replacement}`` for the block."""
    orig = {name: getattr(_tf_nn, name) for name in ("relu", "relu6", "hard_sigmoid", *NON_RELU) if hasattr(_tf_nn, name)}
    orig_tanh = _tf_np.tanh

    def relu(x: Any) -> Any:
        if _plain():
            return orig["relu"](x)
        run.guided += 1
        return guided_relu(tf.convert_to_tensor(x))

    def relu6(x: Any) -> Any:
        if _plain():
            return orig["relu6"](x)
        run.guided += 1
        return guided_relu6(tf.convert_to_tensor(x))

    def recorded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if getattr(_STATE, "run", None) is not run or getattr(_STATE, "plain", 0):  # another thread, or
                return fn(*args, **kwargs)  # inside another activation (hard_silu's hard_sigmoid): as it is
            run.unguided.add(NON_RELU[name])
            _STATE.plain = getattr(_STATE, "plain", 0) + 1  # inside it (hard_sigmoid's relu6): plain gradients
            try:
                return fn(*args, **kwargs)
            finally:
                _STATE.plain -= 1
        return call

    out: dict[tuple[Any, str], Callable[..., Any]] = {(_tf_nn, "relu"): relu, (_tf_nn, "relu6"): relu6}
    out.update({(_tf_nn, n): recorded(n, fn) for n, fn in orig.items() if n in NON_RELU})
    out[(_tf_np, "tanh")] = recorded("tanh", orig_tanh)
    return out


def _unguided_layers(model: Any) -> set[str]:
    """Layers whose ReLU-like maths the rule would get wrong: ``PReLU`` (``relu(x) - a relu(-x)``: both
    would be guided), ``ReLU`` layers with a threshold (a ``where``, no ReLU) or a negative slope."""
    out = set()
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.PReLU):
            out.add("PReLU")
        elif isinstance(layer, keras.layers.ReLU) and (layer.threshold or layer.negative_slope):
            out.add(f"ReLU(threshold={layer.threshold}, negative_slope={layer.negative_slope})")
    return out


@contextlib.contextmanager
def _relu_op_counter(run: GuidedRun) -> Iterator[None]:
    """Count the ``Relu`` / ``Relu6`` ops executed in the block (TensorFlow's op callbacks, where
    available): more than the guided ones means ReLUs called around Keras (``tf.nn.relu``)."""
    try:
        from tensorflow.python.framework import op_callbacks
    except ImportError:  # pragma: no cover - a TF without op callbacks: no stray-ReLU check
        yield
        return

    def callback(op_type: Any, inputs: Any, attrs: Any, outputs: Any, op_name: Any = None, graph: Any = None) -> Any:
        if op_type in ("Relu", "Relu6", b"Relu", b"Relu6") and not getattr(_STATE, "plain", 0):
            run._relu_ops += 1
        return None

    op_callbacks.add_op_callback(callback)
    try:
        yield
    finally:
        op_callbacks.remove_op_callback(callback)


@contextlib.contextmanager
def guided_relus(model: Any) -> Iterator[GuidedRun]:
    """For the block, Keras' ReLUs get the guided backward; yields the :class:`GuidedRun` that records
    what the forward ran (``unguided``: the activations the rule does not cover). The TF backend's
    functions are restored on exit, also after an error."""
    run = GuidedRun()
    run.unguided |= _unguided_layers(model)
    with _LOCK:
        saved = []
        try:
            for (module, name), fn in _replacements(run).items():
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, fn)
            _STATE.run = run
            with _relu_op_counter(run):
                yield run
        finally:
            _STATE.run = None
            for module, name, fn in reversed(saved):
                setattr(module, name, fn)
    if run._relu_ops > run.guided:
        run.unguided.add(f"{run._relu_ops - run.guided} ReLU op(s) called around Keras (tf.nn.relu in a custom layer)")
