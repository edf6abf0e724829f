"""Randomised copies of Keras models for the model parameter randomisation test (MPRT).

:func:`randomized_copy` builds an independent copy of the user's model — ``keras.models.clone_model``
(nested Functional / Sequential models cloned too, ``recursive=True``) and ``set_weights`` with the
model's own values — so the user's model is never written; :func:`reinitialise_layers` then
re-draws, in place on that copy, the variables each named layer owns itself (``add_weight`` on the
layer, not its sub-layers'):

* a variable ``v`` whose layer has an initializer attribute for it (``kernel`` ->
  ``kernel_initializer``, ``depthwise_kernel`` -> ``depthwise_initializer``, ``gamma``,
  ``moving_variance``, ...) is drawn from a fresh instance of that initializer, seeded: the layer's
  own default initialisation, as ``reset_parameters()`` is for torch (BatchNorm: gamma 1, beta 0,
  moving mean 0, moving variance 1);
* any other variable from ``N(0, s^2)``, ``s`` its current standard deviation (0.02 for a
  constant or 1-element one), as the torch backend does.

Seeds: the i-th layer of a call gets ``seed + i`` and its j-th own variable the 31-bit integer
``SeedSequence([seed + i, j])`` draws (so kernels and biases of one layer differ), passed to the
initializer as its ``seed=`` (Keras' stateless draws: deterministic per seed). Cloning and seeding
never change the global random state: Python's ``random`` (unseeded Keras initializers draw their
seeds from it on construction), NumPy's global state and Keras' global ``SeedGenerator`` are
saved and put back.
"""

from __future__ import annotations

import contextlib
import random as python_random
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras.src.backend.common import global_state

from ...core.errors import LayerError, ModelError
from .graph import graph_of, layer_index

__all__ = ["randomized_copy", "reinitialise_layers", "own_variables", "preserved_rng"]

_GLOBAL_SG = "global_seed_generator"  # keras.src.random.seed_generator.GLOBAL_SEED_GENERATOR


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Put Python's, NumPy's and Keras' global random state back as it was on exit (also after errors)."""
    py, npy = python_random.getstate(), np.random.get_state()
    gen = global_state.get_global_attribute(_GLOBAL_SG)
    state = None if gen is None else np.array(gen.state.numpy())
    try:
        yield
    finally:
        python_random.setstate(py)
        np.random.set_state(npy)
        now = global_state.get_global_attribute(_GLOBAL_SG)
        if gen is None:
            if now is not None:
                global_state.set_global_attribute(_GLOBAL_SG, None)
        else:
            if now is not gen:
                global_state.set_global_attribute(_GLOBAL_SG, gen)
            gen.state.assign(state)


def own_variables(layer: Any) -> list:
    """The variables ``layer`` created itself (``add_weight``), not those of its sub-layers."""
    return [*layer._trainable_variables, *layer._non_trainable_variables]


def _clone(model: Any) -> Any:
    """An independent copy of ``model`` with its weights' values (a clear error where Keras cannot clone it)."""
    try:
        if graph_of(model) is not None:
            net = keras.models.clone_model(model, recursive=True)
        else:  # a subclassed model: Keras' own serialisation round trip (needs get_config / from_config)
            net = keras.models.clone_model(model)
        net.set_weights(model.get_weights())
    except Exception as err:
        kind = "graph" if graph_of(model) is not None else "subclassed"
        raise ModelError(f"MPRT needs an independent copy of this {kind} Keras model (camlens never re-initialises "
                         f"the user's model), and keras.models.clone_model + set_weights failed: "
                         f"{type(err).__name__}: {str(err)[:400]}. Give its custom layers / model a get_config() that "
                         "from_config() accepts, or build the model as a Functional one") from err
    if len(net.weights) != len(model.weights):
        raise ModelError(f"the clone of Keras model {model.name!r} has {len(net.weights)} variables, the model "
                         f"{len(model.weights)}; MPRT needs an exact copy (a model whose layers are built from its config)")
    return net


def randomized_copy(model: Any, layers: Sequence[str], seed: int) -> Any:
    """A copy of ``model`` (:func:`_clone`) with ``layers`` (paths) re-initialised
    (:func:`reinitialise_layers`); the model and the global random state are left as they were."""
    with preserved_rng():
        net = _clone(model)
    reinitialise_layers(net, layers, seed)
    return net


def _initializer(layer: Any, var: Any) -> Any:
    """The initializer ``layer`` declares for its own variable ``var``, or ``None``."""
    name = var.name
    for attr in (f"{name}_initializer", f"{name.removesuffix('_kernel')}_initializer"):
        init = getattr(layer, attr, None)
        if isinstance(init, keras.initializers.Initializer):
            return init
    return None


def _draw(layer: Any, var: Any, seed: int) -> np.ndarray:
    """New values for ``var`` from its layer's initializer seeded with ``seed`` (else ``N(0, s^2)``)."""
    init = _initializer(layer, var)
    shape, dtype = tuple(var.shape), var.dtype
    if init is not None:
        config = init.get_config()
        if "seed" in config:
            config["seed"] = seed
        return np.asarray(keras.ops.convert_to_numpy(type(init).from_config(config)(shape, dtype=dtype)))
    value = np.asarray(var.numpy(), dtype=np.float64)
    s = float(value.std()) if value.size > 1 else 0.0
    return np.random.default_rng(seed).normal(0.0, s if s > 0 else 0.02, shape).astype(value.dtype)


def reinitialise_layers(model: Any, layers: Sequence[str], seed: int) -> None:
    """Re-draw the own variables of each layer named in ``layers`` (paths of :func:`layer_index`) of
    ``model`` IN PLACE, the i-th layer with seed ``seed + i`` (see the module docstring); only for a
    model the caller owns (one from :func:`randomized_copy`). The global random state is kept."""
    index = layer_index(model)
    with preserved_rng():
        for i, path in enumerate(layers):
            layer = index.get(path)
            if layer is None:
                raise LayerError(f"no layer named {path!r} to randomise in Keras model {model.name!r}")
            for j, var in enumerate(own_variables(layer)):
                s = int(np.random.SeedSequence([seed + i, j]).generate_state(1)[0] >> 1)
                var.assign(_draw(layer, var, s))
