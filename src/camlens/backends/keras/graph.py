"""Walking a Keras 3 graph model: its layers by path, and one forward that reads (or replaces) layer
outputs and bypasses a final softmax / sigmoid — without cloning or editing the model.

Keras has no forward hooks. A side model ``keras.Model(model.inputs, [layer.output, ...])`` works
for top-level layers but not for a layer inside a nested model (its ``.output`` belongs to the
inner model's own graph: "graph disconnected"). So the forward here runs the model's own graph,
node by node, as ``Functional.call`` does (``Function._run_through_graph``), with our callable
around each layer call; a nested Functional / Sequential model holding a wanted layer is run
through its own graph the same way (recursively), so ``"inner/conv"`` is reached from the outer
input. Layer calls get ``training=False`` (inference: BatchNorm reads its moving statistics and
never updates them, Dropout is off), exactly as ``model(x, training=False)``.

Layer paths: the layer's ``name``, prefixed by the names of the nested models it sits in, joined
by ``/`` (Keras' own separator in variable paths): ``"resnet50/conv5_block3_out"``. A bare name
that is unique across all nesting levels is accepted for the nested layer too.

Pre-activation scores: when a model output comes from a ``Dense`` layer with ``activation="softmax"``
/ ``"sigmoid"``, or from an ``Activation("softmax" / "sigmoid")`` / ``Softmax`` layer, the output is
computed without that activation (``x @ kernel + bias``, or the activation's input): the gradients
explain the logit, not a saturated probability. The model itself is not touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import keras
from keras.src.models.functional import Functional
from keras.src.models.functional import operation_fn as _call_with_context
from keras.src import tree

from ...core.errors import LayerError, ModelTypeError
from .eager import final_layers, recorder, run_eager, to_wrap, tree_index, wrapped_calls

__all__ = ["SEP", "graph_of", "is_graph_model", "require_graph", "require_model", "layer_index", "GraphRun", "run_graph",
           "output_activation", "output_activations", "output_names", "head_keys", "resolve_paths", "Cut",
           "downstream_cut"]

#: The separator of nested layer paths.
SEP = "/"

_BYPASSED = ("softmax", "sigmoid")


def graph_of(model: Any) -> Optional[Functional]:
    """The :class:`Functional` graph a model runs: itself (a Functional model whose ``call`` is
    Functional's own), a built ``Sequential``'s inner one, else ``None`` (a subclassed model, or a
    Sequential never built on an input shape)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional) and type(model).call is Functional.call:
        return model
    return None


def is_graph_model(model: Any) -> bool:
    return graph_of(model) is not None


def require_model(model: Any) -> None:
    """A model camlens can read: a graph model, or a subclassed one whose layers are built."""
    if graph_of(model) is not None:
        return
    if isinstance(model, keras.Sequential) or not getattr(model, "built", False):
        require_graph(model)  # the error saying what to do


def require_graph(model: Any) -> Functional:
    """:func:`graph_of`, or a clear error saying which Keras models work."""
    g = graph_of(model)
    if g is not None:
        return g
    kind = type(model).__name__
    if isinstance(model, keras.Sequential):
        raise ModelTypeError(f"this Sequential model has no graph yet (it was never built on an input shape); "
                             "start it with keras.Input((H, W, C)) or call model.build((None, H, W, C)) first")
    if not getattr(model, "built", False):
        raise ModelTypeError(f"{kind} is a subclassed Keras model that was never called, so its layers have no "
                             "weights yet; call it once on a batch (model(x)) or model.build((None, H, W, C)) first")
    raise ModelTypeError(f"{kind} is a subclassed Keras model (its own call()): it has no graph; this needs a "
                         "Functional or Sequential model")


def _operations(g: Functional) -> list:
    """The graph's operations in execution order (input layers left out)."""
    return [op for op in g.operations if not isinstance(op, keras.layers.InputLayer)]


def layer_index(model: Any) -> dict[str, Any]:
    """Every layer of ``model`` by path (``"inner/conv"``), nested models' layers included, in
    execution order; a nested model appears under its own name and its layers under it."""
    out: dict[str, Any] = {}

    def walk(g: Functional, prefix: str) -> None:
        for op in _operations(g):
            path = prefix + op.name
            out[path] = op
            inner = graph_of(op)
            if inner is not None:
                walk(inner, path + SEP)
            else:  # a custom layer's own sub-layers (read by wrapping their calls, :mod:`.eager`)
                out.update((p, layer) for p, layer in tree_index(op, path + SEP).items() if p not in out)

    require_model(model)
    g = graph_of(model)
    if g is None:  # a subclassed model: its layer tracking tree
        return tree_index(model)
    walk(g, "")
    return out


def output_activation(op: Any) -> Optional[str]:
    """``"softmax"`` / ``"sigmoid"`` when ``op``'s output is that activation of something we can
    compute without it (a ``Dense`` layer's activation, an ``Activation`` / ``Softmax`` layer), else
    ``None``."""
    if isinstance(op, keras.layers.Softmax):
        return "softmax"
    if isinstance(op, (keras.layers.Activation, keras.layers.Dense)):
        name = getattr(getattr(op, "activation", None), "__name__", None)
        if name in _BYPASSED and not (isinstance(op, keras.layers.Dense) and getattr(op, "quantization_mode", None)):
            return name
    return None


def _pre_activation(op: Any, args: tuple) -> Any:
    """``op``'s output without its final softmax / sigmoid (:func:`output_activation`)."""
    x = args[0]
    if isinstance(op, keras.layers.Dense):
        y = keras.ops.matmul(x, op.kernel)
        return y + op.bias if op.bias is not None else y
    return x  # Activation / Softmax: the activation's input


def head_keys(model: Any) -> list:
    """The engine's head key of each of ``model``'s outputs, in ``model.outputs`` order: ``0`` for one
    tensor, the dict keys of a dict output, the output layers' names of a list output
    (:func:`output_names`, else positions)."""
    g = graph_of(model)
    if g is None:
        return []
    struct = g._outputs_struct
    if isinstance(struct, dict):
        return [path[0] for path, _ in tree.flatten_with_path(struct)]
    if isinstance(struct, (list, tuple)):
        return output_names(model) or list(range(len(g.outputs)))
    return [0]


def _final_activation(t: Any) -> Optional[str]:
    """The activation :func:`run_graph` leaves out of the output tensor ``t`` (nested models entered)."""
    hist = t._keras_history
    inner = graph_of(hist.operation)
    if inner is not None:
        return _final_activation(inner.outputs[hist.tensor_index]) if hist.tensor_index < len(inner.outputs) else None
    return output_activation(hist.operation)


def output_activations(model: Any) -> Optional[dict]:
    """``{head key: "softmax" / "sigmoid"}`` for the outputs whose final activation the forward leaves
    out, so ``exp.probs`` apply it to the logits (the model's own probabilities); ``None`` if none."""
    g = graph_of(model)
    if g is None:  # a subclassed model: what the first forward found (:func:`.eager.final_layers`)
        found = {key: act for key, act in (final_layers(model) or {}).values()}
    else:
        found = {k: a for k, a in zip(head_keys(model), map(_final_activation, g.outputs)) if a is not None}
    return found or None


def output_names(model: Any) -> Optional[list[str]]:
    """The names of the layers producing ``model``'s outputs (in output order), when they are unique
    (``None`` for a subclassed model)."""
    g = graph_of(model)
    if g is None:
        return None
    names = [t._keras_history.operation.name for t in g.outputs]
    return names if len(set(names)) == len(names) else None


@dataclass
class GraphRun:
    """What one forward through the graph records: for each wanted path, its outputs (one per call)."""

    wanted: frozenset
    outputs: dict = field(default_factory=dict)  # path -> [output tensor per call]
    replace: dict = field(default_factory=dict)  # path -> tensor fed instead of the layer's output
    # called with (path, output) for wanted layers; what it returns (not None) flows on instead (a probe)
    on_output: Optional[Callable[[str, Any], Any]] = None
    bypassed: dict = field(default_factory=dict)  # output position -> activation bypassed
    every: bool = False  # record every layer (probing)
    only: Optional["Cut"] = None  # run only the part of the graph downstream of the cut (the rest is skipped)
    inputs_of: frozenset = frozenset()  # paths whose first input is recorded too (CAM: the dense layers)
    inputs: dict = field(default_factory=dict)  # path -> [first positional input per call]

    def record(self, path: str, out: Any) -> Any:
        """Keep ``out`` as layer ``path``'s output if it is wanted; returns what flows on: ``out``, or
        what ``on_output(path, out)`` returns instead (``out + eps``: a probe to differentiate)."""
        if path in self.wanted or self.every:
            if self.on_output is not None and path in self.wanted:
                new = self.on_output(path, out)
                out = out if new is None else new
            self.outputs.setdefault(path, []).append(out)
        return out

    def record_input(self, path: str, args: tuple) -> None:
        """Keep layer ``path``'s first positional input if ``inputs_of`` names it."""
        if path in self.inputs_of and args:
            self.inputs.setdefault(path, []).append(args[0])


def run_graph(model: Any, x: Any, run: GraphRun, logits: bool = True) -> Any:
    """``model(x, training=False)`` with the layers in ``run.wanted`` recorded (``run.replace``: fed
    instead), ``logits``: a final softmax / sigmoid left out. Returns the output structure as the
    model does (a tensor, list, or dict)."""
    g = graph_of(model)
    if g is None:
        require_model(model)
        return run_eager(model, x, run, output_activation, _pre_activation)
    return _run(g, [x], run, "", logits)


def _needs_entry(prefix: str, run: GraphRun) -> bool:
    return run.every or any(p.startswith(prefix) for p in (*run.wanted, *run.replace, *run.inputs_of))


def _run(g: Functional, inputs: list, run: GraphRun, prefix: str, logits: bool) -> Any:
    final = {id(t._keras_history.operation): i for i, t in enumerate(g.outputs)} if logits else {}

    def wrap(op: Any) -> Callable[..., Any]:
        path = prefix + op.name
        inner = graph_of(op)
        pos = final.get(id(op))

        def call(*args: Any, **kwargs: Any) -> Any:
            run.record_input(path, args)
            if path in run.replace:
                out = run.replace[path]
            elif run.only is not None and not run.only.runs(path):
                return _PLACEHOLDER  # upstream of the cut and not fed to it: not run (its consumers are not either)
            elif inner is not None and (_needs_entry(path + SEP, run) or pos is not None):
                out = _run(inner, tree.flatten(args[0]), run, path + SEP, pos is not None)
                out = out[0] if isinstance(out, list) and len(out) == 1 else out
            elif pos is not None and output_activation(op) is not None:
                run.bypassed[pos] = output_activation(op)
                out = _pre_activation(op, args)
            else:
                sub = to_wrap(tree_index(op, path + SEP), run) if _needs_entry(path + SEP, run) else {}
                with wrapped_calls(sub, recorder(run)) if sub else contextlib.nullcontext():
                    out = _call_with_context(op, training=False)(*args, **kwargs)
            return run.record(path, out)
        return call

    return g._run_through_graph(inputs, operation_fn=wrap)


@dataclass(frozen=True)
class Cut:
    """The part of a graph model's forward that depends on some layers' outputs, to run again on its
    own (on T tiled copies of a batch, for all targets' gradients in one backward; or with a layer's
    output replaced, for Ablation-CAM) without the layers before them.

    ``roots``: the layers whose outputs are fed (not computed); ``down``: the paths of the operations
    to run (downstream of a root, and the nested models holding one); ``down_all``: prefixes of nested
    models run whole (downstream, holding no root); ``keep``: the operations upstream of the cut
    whose outputs the part needs (and the model outputs that do not depend on a root) — recorded in
    a full forward and fed; ``input``: the model's input is needed too.
    """

    roots: frozenset
    down: frozenset
    down_all: tuple
    keep: frozenset
    input: bool

    def runs(self, path: str) -> bool:
        return path in self.down or path.startswith(self.down_all)


def downstream_cut(model: Any, paths: Sequence[str]) -> Optional[Cut]:
    """The :class:`Cut` of a graph model below the layers ``paths`` (operations of its graphs, nested
    graph models entered), from the graphs' nodes; ``None`` for a subclassed model, a layer inside a
    custom block, or a layer called more than once (those keep the full forward)."""
    g0 = graph_of(model)
    if g0 is None:
        return None
    wanted = set(paths)
    roots: set = set()
    down: set = set()
    down_all: list = []
    keep: set = set()
    top_input = False
    found: set = set()

    def level(g: Functional, prefix: str) -> None:
        nonlocal top_input
        tainted: set = set()  # ids of this graph's tensors that depend on a root
        crossing: list = []
        calls: dict = {}
        for depth in sorted(g._nodes_by_depth, reverse=True):
            for node in g._nodes_by_depth[depth]:
                op = node.operation
                if not op or node.is_input or isinstance(op, keras.layers.InputLayer):
                    continue
                path = prefix + op.name
                calls[path] = calls.get(path, 0) + 1
                ins = node.input_tensors
                hit = any(id(t) in tainted for t in ins)
                inner = graph_of(op)
                holds = any(w.startswith(path + SEP) for w in wanted)
                if path in wanted:
                    found.add(path)
                    (down if hit else roots).add(path)
                    if hit:
                        crossing += [t for t in ins if id(t) not in tainted]
                elif holds and inner is not None:
                    down.add(path)
                    crossing += [t for t in ins if id(t) not in tainted]
                    level(inner, path + SEP)
                elif hit:
                    down.add(path)
                    if inner is not None:
                        down_all.append(path + SEP)
                    crossing += [t for t in ins if id(t) not in tainted]
                else:
                    continue
                tainted.update(id(t) for t in node.outputs)
        if any(calls.get(p, 0) > 1 for p in (*roots, *down) if p.startswith(prefix) and SEP not in p[len(prefix):]):
            raise _NoCut
        crossing += [t for t in g.outputs if id(t) not in tainted]
        for t in crossing:
            op = t._keras_history.operation
            if op is None or isinstance(op, keras.layers.InputLayer):
                top_input |= prefix == ""  # (a nested graph's inputs are its call's arguments)
            else:
                keep.add(prefix + op.name)

    try:
        level(g0, "")
    except _NoCut:
        return None
    if found != wanted:  # a layer inside a custom block (not a node of any graph)
        return None
    return Cut(frozenset(roots), frozenset(down), tuple(down_all), frozenset(keep - down - roots), top_input)


_PLACEHOLDER = [None] * 64  # the outputs of a skipped operation (zipped with the node's outputs)


class _NoCut(Exception):
    pass


def _attribute_path(model: Any, spec: str) -> Optional[Any]:
    """The layer at attribute path ``spec`` (``"block.conv"`` or ``"block/conv"``: ``model.block.conv``), or ``None``."""
    obj = model
    for part in spec.replace(SEP, ".").split("."):
        obj = obj.__dict__.get(part) if part and hasattr(obj, "__dict__") else None
        if not isinstance(obj, keras.layers.Layer):
            return None
    return obj if obj is not model else None


def resolve_paths(model: Any, spec: Any) -> list[tuple[str, Any]]:
    """Layer names / paths / layer objects (one or a list) -> ``(path, layer)``; an unknown name is a
    :class:`~camlens.core.errors.LayerNotFoundError` listing close ones."""
    from ...core.errors import LayerNotFoundError

    index = layer_index(model)
    specs: Sequence[Any] = spec if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for s in specs:
        if isinstance(s, str):
            if s in index:
                out.append((s, index[s]))
                continue
            attr = _attribute_path(model, s)  # a subclassed model's attribute path, "block.conv"
            if attr is not None:
                found = [p for p, op in index.items() if op is attr]
                if found:
                    out.append((found[0], attr))
                    continue
            bare = [p for p in index if p.rsplit(SEP, 1)[-1] == s]
            if len(bare) == 1:
                out.append((bare[0], index[bare[0]]))
                continue
            if len(bare) > 1:
                raise LayerNotFoundError(f"layer name {s!r} is ambiguous in this Keras model: it is {bare}; give the "
                                         f"full path (nested models' names joined by {SEP!r})")
            import difflib

            close = difflib.get_close_matches(s, list(index), n=8, cutoff=0.5)
            close += [p for p in index if s.lower() in p.lower() and p not in close][:8 - len(close)]
            hint = f"; close names: {close}" if close else ""
            raise LayerNotFoundError(f"no layer {s!r} in Keras model {getattr(model, 'name', '')!r}{hint}. Its "
                                     f"{len(index)} layers are named by path ({SEP!r} joins nested models' and blocks' "
                                     f"names, e.g. {next(iter(index), '')!r}; a subclassed model's attribute path "
                                     "'block.conv' works too); list them with camlens.backends.keras.layer_index(model)")
        found = [p for p, op in index.items() if op is s]
        if not found:
            raise LayerError(f"layer object {getattr(s, 'name', s)!r} ({type(s).__name__}) is not a layer of this "
                             "Keras model's graph; pass its name")
        out.append((found[0], s))
    return out
