"""Layers without a graph: subclassed models (a ``call`` of their own) and custom layers holding
sub-layers, read during one forward.

A subclassed model has no graph to walk (:mod:`.graph`), and Keras has no forward hooks. For the
block of one forward, each layer to read gets an instance attribute ``call`` that wraps its own
``call`` (``Operation.__call__`` looks ``self.call`` up at call time, and ``Layer.__call__`` still
does everything around it: building, autocasting, masks, the ``training`` argument): the wrapper
records the output, feeds a replacement instead (Ablation-CAM), or computes a final
``Dense(activation="softmax" / "sigmoid")`` without its activation. On exit the attribute is
deleted again, also after an error, so the layer's ``__dict__`` is exactly as before (asserted).
The torch backend reads module outputs the same way, inside the module's own ``forward`` wrapped
for the block.

Paths: as for graph models, names joined by ``/`` along Keras' layer tracking tree
(``model._flatten_layers(recursive=False)`` at each level): ``"block/conv"``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Optional

from keras.src import tree

from ...core.errors import ModelError

__all__ = ["children", "tree_index", "wrapped_calls", "final_layers", "run_eager", "to_wrap", "recorder"]

SEP = "/"


def children(layer: Any) -> list:
    """The layers ``layer`` tracks directly (its attributes), in tracking order (none for a bare
    operation of a graph, e.g. the ``Add`` of ``x + 3.0`` in MobileNetV3)."""
    flatten = getattr(layer, "_flatten_layers", None)
    return list(flatten(include_self=False, recursive=False)) if flatten is not None else []


def tree_index(layer: Any, prefix: str = "") -> dict[str, Any]:
    """Every layer under ``layer`` by path (``prefix`` + names joined by ``/``), parents first."""
    out: dict[str, Any] = {}
    for c in children(layer):
        path = prefix + c.name
        if path in out:  # two tracked layers of one name: keep the first, as Keras' get_layer does
            continue
        out[path] = c
        out.update(tree_index(c, path + SEP))
    return out


@contextlib.contextmanager
def wrapped_calls(layers: dict[str, Any], fn: Callable[[str, Any, Callable[..., Any], tuple, dict], Any]) -> Iterator[None]:
    """For the block, ``layer(...)`` of each ``(path, layer)`` runs ``fn(path, layer, call, args, kwargs)``
    in place of ``layer.call(*args, **kwargs)``; the layers are restored exactly on exit."""
    done: list = []
    try:
        for path, layer in layers.items():
            if "call" in layer.__dict__:
                raise ModelError(f"layer {path!r} has a call attribute of its own (another tool is wrapping it); "
                                 "camlens cannot read its output without replacing that")
            orig = layer.call

            def call(*args: Any, _p: str = path, _l: Any = layer, _c: Any = orig, **kwargs: Any) -> Any:
                return fn(_p, _l, _c, args, kwargs)

            object.__setattr__(layer, "call", call)  # (not Layer.__setattr__: nothing tracked)
            done.append(layer)
        yield
    finally:
        for layer in reversed(done):
            object.__delattr__(layer, "call")


_FINAL: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def final_layers(model: Any) -> Optional[dict]:
    """``{path: (head key, activation)}`` of the layers of a subclassed ``model`` whose output IS one
    of its outputs and ends in a softmax / sigmoid we can leave out, once :func:`run_eager` has probed
    the model (``None`` before)."""
    return _FINAL.get(model)


def _probe_finals(model: Any, x: Any, index: dict[str, Any], bypassable: Callable[[Any], Optional[str]]) -> dict:
    """One forward recording every layer's output; the layers whose output object is a model output."""
    seen: dict[int, tuple[str, Any]] = {}  # id -> (innermost layer returning it, the tensor, kept alive)

    def record(path: str, layer: Any, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = call(*args, **kwargs)
        seen.setdefault(id(out), (path, out))
        return out

    with wrapped_calls(index, record):
        out = model(x, training=False)
    found = {}
    for key_path, t in tree.flatten_with_path(out):
        path = seen.get(id(t), (None, None))[0]
        act = bypassable(index[path]) if path is not None else None
        if act is not None:
            found[path] = (key_path[0] if key_path else 0, act)
    return found


def run_eager(model: Any, x: Any, run: Any, bypassable: Callable[[Any], Optional[str]],
              pre_activation: Callable[[Any, tuple], Any]) -> Any:
    """``model(x, training=False)`` for a subclassed model, with ``run``'s layers (a :class:`GraphRun`)
    recorded / replaced and a final softmax / sigmoid left out (found by one probe forward the first
    time, memoised per model)."""
    index = tree_index(model)
    if model not in _FINAL:
        try:
            _FINAL[model] = _probe_finals(model, x, index, bypassable)
        except TypeError:  # not weakly referenceable: probe every time
            pass
    finals = _FINAL.get(model) or _probe_finals(model, x, index, bypassable)
    with wrapped_calls(to_wrap(index, run, finals), recorder(run, finals, pre_activation)):
        return model(x, training=False)


def to_wrap(index: dict[str, Any], run: Any, finals: Optional[dict] = None) -> dict[str, Any]:
    """The layers of ``index`` a forward must wrap for ``run`` (all of them when it records every layer)."""
    if run.every:
        return dict(index)
    paths = set(run.wanted) | set(run.replace) | set(run.inputs_of) | set(finals or ())
    return {p: layer for p, layer in index.items() if p in paths}


def recorder(run: Any, finals: Optional[dict] = None,
             pre_activation: Optional[Callable[[Any, tuple], Any]] = None) -> Callable[..., Any]:
    """The wrapper body for :func:`wrapped_calls`: replace (``run.replace``), leave out a final
    activation (``finals``), else call; then record the output for ``run``."""
    finals = finals or {}

    def fn(path: str, layer: Any, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        run.record_input(path, args)
        if path in run.replace:
            out = run.replace[path]
        elif path in finals and pre_activation is not None:
            key, act = finals[path]
            run.bypassed[key] = act
            out = pre_activation(layer, args)
        else:
            out = call(*args, **kwargs)
        return run.record(path, out)

    return fn
