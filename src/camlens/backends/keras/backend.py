"""The Keras 3 (TensorFlow) implementation of :class:`camlens.backends.base.Backend`.

Arrays handed to the engine are NumPy (``ops`` = :class:`~camlens.backends.numpy.NumpyOps`, ``xp`` =
NumPy's array-API namespace): TensorFlow tensors are not array-API objects, so the method maths
runs on host copies made once per pass — the captured activations ``(B, C, h, w)``, the target
gradients ``(B, T, C, h, w)`` and the outputs — after the forward, never inside a layer call.
The input convention inside the engine is the shared one, ``(B, C, H, W)``: a Keras user passes
NHWC images ``(B, H, W, C)`` (Keras' own layout), :meth:`KerasBackend.to_model_input` transposes
them once, and every forward transposes back (a view for NumPy, a copy for TF).

Gradients: the forward runs under one ``tf.GradientTape`` that watches only the captured layer
outputs (so the layers before them are not recorded); the T target scores are evaluated again on
the TF outputs inside the tape (:mod:`.scores`), and ONE vectorised Jacobian
``d (sum_b S[b, t]) / dA`` ``(T, B, h, w, C)`` (``tape.jacobian(..., experimental_use_pfor=True)``)
gives all T targets' gradients; as in the torch backend, image b's score depends only on image
b's activations (inference mode), so the batch sum separates them. Input gradients (guided
backprop) are the same Jacobian w.r.t. the watched NHWC input (:meth:`KerasRunner.input_gradients`;
Keras' ReLUs guided for the forward by :mod:`.guided`); CAM's linear head is the kernel of the
``Dense`` the capture saw producing the head from ``GAP(layer)`` (:meth:`KerasBackend.linear_head`).

State: every layer call gets ``training=False``; nothing is assigned to any variable and no layer
attribute is set, so weights, BatchNorm moving statistics, ``trainable`` flags and activations are
exactly as given, also after an error.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional

import array_api_compat.numpy as np_xp
import keras
import numpy as np
import tensorflow as tf
from keras.src import tree

from ...core.errors import ConfigError, InputError, InputTypeError, LayerError, LayerRuntimeError, ModelError
from ..base import PRECISION_NAMES, layout_problem, unguided_error
from ..numpy import NumpyOps
from . import randomise
from .graph import (Cut, GraphRun, downstream_cut, graph_of, layer_index, output_activations, output_names,
                    require_model, resolve_paths, run_graph)
from .guided import guided_relus
from .scores import tf_target_scores

__all__ = ["KerasBackend", "BACKEND", "KerasCapture", "KerasLayout", "KerasRunner", "channels_last"]

_ACTIVE = threading.local()  # the captures open in this thread (innermost last)


def _captures() -> list:
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    return _ACTIVE.stack


def channels_last(model: Any) -> bool:
    """Does ``model`` take channels-last images ``(B, H, W, C)``? Keras' ``image_data_format()``
    unless one of its layers says ``data_format="channels_first"``."""
    for layer in layer_index(model).values():
        if getattr(layer, "data_format", None) == "channels_first":
            return False
    return keras.config.image_data_format() == "channels_last"


def _to_nchw(a: np.ndarray) -> np.ndarray:
    """``(B, h, w, C) -> (B, C, h, w)`` as a contiguous array."""
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


def _named(out: Any, names: Optional[list[str]]) -> Any:
    """A list / tuple output as ``{output layer name: tensor}`` (heads named by their layers; positions
    still work); a tensor or dict as it is."""
    if isinstance(out, (list, tuple)) and names is not None and len(names) == len(out):
        return dict(zip(names, out))
    return out


def _host(out: Any) -> Any:
    """NumPy copies of an output structure's tensors."""
    return tree.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else np.asarray(t), out)


class KerasCapture:
    """One forward's captured layers: ``activations`` (path -> NumPy ``(B, C, h, w)``), ``calls``
    (path -> how many times it ran), and for the gradients the TF tensors and the tape."""

    def __init__(self, model: Any, names: Sequence[str], grad: bool, linear: bool = False) -> None:
        self.model, self.names, self.grad = model, list(names), grad
        # CAM: every Dense layer's (inputs, outputs) of the forward, one per call
        self.dense_paths = frozenset(p for p, op in layer_index(model).items()
                                     if isinstance(op, keras.layers.Dense)) if linear else frozenset()
        self.dense_io: dict[str, tuple[list, list]] = {}
        self.activations: dict[str, np.ndarray] = {}
        self.calls: dict[str, int] = {}
        self.tf_acts: dict[str, tf.Tensor] = {}
        self.tf_output: Any = None
        self.tape: Optional[tf.GradientTape] = None  # the full forward's tape (models without a cut)
        self.cut: Optional[Cut] = None  # graph models: the gradients re-run only the part below the layers
        self.kept: dict[str, list] = {}  # the cut's upstream outputs, recorded in the forward
        self.model_input: Any = None  # the forward's TF input
        self.layouts: dict = {}
        self.channels_last = True  # set by the forward that fills the capture
        self.attentions = None
        self.attention_layout = None


class KerasLayout:
    """The forward runner of a call: ``run(x (B, C, H, W) NumPy) -> output`` (NumPy copies; list
    outputs named by their layers), recording the layers of the capture open on this model."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.channels_last = channels_last(model)
        self.names = output_names(model)

    def autocast(self, x: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def model_input(self, x: np.ndarray) -> tf.Tensor:
        """``(B, C, H, W)`` NumPy -> the model's TF input (NHWC for a channels-last model)."""
        a = np.transpose(x, (0, 2, 3, 1)) if self.channels_last else x
        return tf.convert_to_tensor(np.ascontiguousarray(a, dtype=np.float32))

    def forward(self, x: np.ndarray, run: Optional[GraphRun] = None) -> Any:
        """The TF output of ``x`` (list outputs named), with ``run``'s layers recorded / replaced."""
        return self.forward_tensor(self.model_input(x), run)

    def forward_tensor(self, xt: tf.Tensor, run: Optional[GraphRun] = None) -> Any:
        """:meth:`forward` of the model's own TF input ``xt`` (NHWC for a channels-last model)."""
        return _named(run_graph(self.model, xt, run if run is not None else GraphRun(frozenset())), self.names)

    def run(self, x: np.ndarray, score_only: bool = False) -> Any:
        cap = next((c for c in reversed(_captures()) if c.model is self.model), None)
        if cap is None or score_only:
            return _host(self.forward(x))
        names = frozenset(cap.names)
        watch = cap.tape.watch if cap.tape is not None else None
        keep = cap.cut.keep if cap.cut is not None else frozenset()
        run = GraphRun(names | keep | cap.dense_paths, inputs_of=cap.dense_paths,
                       on_output=(lambda path, out: watch(out) if path in names else None) if watch else None)
        cap.model_input = self.model_input(x)
        out = _named(run_graph(self.model, cap.model_input, run), self.names)
        cap.dense_io = {p: (run.inputs.get(p, []), run.outputs.get(p, [])) for p in cap.dense_paths}
        cap.tf_output, cap.channels_last = out, self.channels_last
        cap.kept = {p: run.outputs.get(p, []) for p in keep}
        for name in cap.names:
            outs = run.outputs.get(name, [])
            cap.calls[name] = len(outs)
            if len(outs) == 1 and hasattr(outs[0], "numpy"):
                cap.tf_acts[name] = outs[0]
                a = outs[0].numpy()
                cap.activations[name] = _to_nchw(a) if a.ndim == 4 and self.channels_last else a
        return _host(out)


class KerasRunner:
    """Forwards beyond the first (Score-CAM, occlusion, Ablation-CAM: no tape; input gradients: a tape
    on the input), NumPy in and out. ``score(output, b)`` gives image ``b``'s target scores ``(N, T)``
    on N outputs; ``targets`` (B lists of T resolved targets) are evaluated again on the TF outputs
    for the input gradients."""

    def __init__(self, model: Any, score: Callable[[Any, int], Any], layout: KerasLayout,
                 targets: Optional[list] = None) -> None:
        self.model, self.score, self.layout, self.targets = model, score, layout, targets
        self.forwards = 0
        self._paths = {id(op): p for p, op in layer_index(model).items()}

    def _forward(self, x: np.ndarray, run: Optional[GraphRun] = None) -> Any:
        self.forwards += 1
        return _host(self.layout.forward(x, run))

    def scores(self, x: np.ndarray, b: int, batch_size: int = 32) -> np.ndarray:
        """Scores ``(N, T)`` of image ``b``'s targets for N inputs ``x`` ``(N, C, H, W)``, in chunks. A graph
        model with many chunks (Score-CAM's masked copies, RISE, the deletion curves) runs them through
        its forward compiled once as a ``tf.function`` (:func:`_compiled`: same layers and maths, no
        per-layer Python dispatch; the trace is kept per model and input size)."""
        n = -(-x.shape[0] // batch_size)
        fn = _compiled(self.model, x.shape[1:], build=n >= _COMPILE_CHUNKS) if graph_of(self.model) is not None else None
        out = []
        for i in range(0, x.shape[0], batch_size):
            if fn is None:
                y = self._forward(x[i:i + batch_size])
            else:
                self.forwards += 1
                y = _host(_named(fn(self.layout.model_input(x[i:i + batch_size])), self.layout.names))
            out.append(np.asarray(self.score(y, b), dtype=np.float32))
        return np.concatenate(out)

    def outputs(self, x: np.ndarray, fn: Callable[[Any], Any], batch_size: int = 32) -> list:
        return [fn(self._forward(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)]

    def scores_with_layer(self, layer: Any, acts: np.ndarray, x_b: np.ndarray, b: int,
                          batch_size: int = 32) -> np.ndarray:
        """Scores ``(N, T)`` with ``layer``'s output replaced by each of ``acts`` ``(N, C, h, w)``. A graph
        model runs only the part below the layer (:func:`~.graph.downstream_cut`; what it needs from
        above, from one forward of ``x_b`` ``(1, C, H, W)``, tiled to the chunk); otherwise the whole
        forward of ``x_b`` repeated to the chunk's size."""
        path = self._paths.get(id(layer))
        if path is None:
            raise LayerError(f"layer {getattr(layer, 'name', layer)!r} is not in this Keras model's graph")
        cut = downstream_cut(self.model, [path])
        kept: dict = {}
        if cut is not None and cut.keep:
            run0 = GraphRun(cut.keep)
            self._forward(x_b, run0)
            kept = {p: outs[0] for p, outs in run0.outputs.items() if len(outs) == 1}
            if len(kept) != len(cut.keep):  # a shared layer above the cut: whole forwards
                cut = None
        out = []
        for i in range(0, acts.shape[0], batch_size):
            chunk = acts[i:i + batch_size]
            n = chunk.shape[0]
            a = np.transpose(chunk, (0, 2, 3, 1)) if self.layout.channels_last and chunk.ndim == 4 else chunk
            replace = {path: tf.convert_to_tensor(np.ascontiguousarray(a, dtype=np.float32))}
            if cut is None:
                run, xs = GraphRun(frozenset(), replace=replace), np.repeat(x_b, n, axis=0)
            else:
                replace.update((p, tree.map_structure(lambda t: tf.tile(t, [n] + [1] * (len(t.shape) - 1)), v))
                               for p, v in kept.items())
                run = GraphRun(frozenset(), replace=replace, only=cut)
                xs = np.repeat(x_b, n, axis=0) if cut.input else x_b  # (the input is not read otherwise)
            out.append(np.asarray(self.score(self._forward(xs, run), b), dtype=np.float32))
        return np.concatenate(out)

    def input_gradients(self, x: np.ndarray, b_scores: Callable[[Any], Any], guided: bool = False,
                        non_relu: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """Gradients of the target scores w.r.t. the input pixels: ``(B, T, C, H, W)`` and the scores
        ``(B, T)``, for ``x`` ``(B, C, H, W)``.

        One forward of the NHWC input under a ``tf.GradientTape`` watching it; the T scores are the
        runner's ``targets`` evaluated on the TF output (:mod:`.scores`, checked against
        ``b_scores`` on its NumPy copy); ONE vectorised Jacobian ``d (sum_b S[b, :]) / dx``
        ``(T, B, H, W, C)`` gives every target's gradient. ``guided``: every Keras ReLU / ReLU6 gets
        guided backprop's backward for the forward (:func:`.guided.guided_relus`, nothing of the
        model edited); other activations (GELU, SiLU, ...) are a :class:`ModelError` naming them
        unless ``non_relu="plain"`` (they pass their plain gradient: guided only at the ReLUs).
        """
        if self.targets is None:
            raise LayerRuntimeError("the Keras backend's input gradients need the resolved targets (runner(..., "
                                    "targets=rows)) to recompute the scores on the TensorFlow output")
        xt = self.layout.model_input(x)
        self.forwards += 1
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(xt)
            with guided_relus(self.model) if guided else contextlib.nullcontext() as seen:
                out = self.layout.forward_tensor(xt)
            if guided and seen.unguided and non_relu != "plain":
                raise unguided_error(seen.unguided, "Keras model")
            s = tf_target_scores(self.targets, out)  # (B, T), recorded
            scores = np.asarray(b_scores(_host(out)), dtype=np.float32)
            _check_scores(s.numpy(), scores)
            total = tf.reduce_sum(s) if s.shape[1] == 1 else tf.reduce_sum(s, axis=0)
            (g,) = _jacobian(tape, total, [xt], int(s.shape[1]))  # (T, B, ...)
        g = np.swapaxes(g, 0, 1)  # (B, T, H, W, C) / (B, T, C, H, W)
        if self.layout.channels_last:
            g = np.transpose(g, (0, 1, 4, 2, 3))
        return np.ascontiguousarray(g, dtype=np.float32), scores


def _check_scores(got: np.ndarray, want: np.ndarray) -> None:
    """The scores recomputed on the TF output must equal the engine's (same maths, float rounding)."""
    if got.shape != tuple(want.shape) or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ModelError(f"the target scores recomputed on the TensorFlow output {got.tolist()} differ from the "
                         f"reported ones {np.asarray(want).tolist()}; a score function that is not the same "
                         "maths on NumPy and TensorFlow arrays cannot be explained")


def _jacobian(tape: tf.GradientTape, total: tf.Tensor, sources: list, T: int) -> list[np.ndarray]:
    """Per source ``(B, ...)``, ``d total[t] / d source`` ``(T, B, ...)`` as NumPy: one gradient for
    T = 1 (``total`` a scalar), else one vectorised Jacobian (pfor; a ``while_loop`` one if pfor
    lacks an op). Sources the scores do not depend on get zeros."""
    zero = tf.UnconnectedGradients.ZERO
    with tape.stop_recording():
        if T == 1:
            return [g.numpy()[None] for g in tape.gradient(total, sources, unconnected_gradients=zero)]
        try:
            gs = tape.jacobian(total, sources, unconnected_gradients=zero, experimental_use_pfor=True)
        except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError):  # an op pfor lacks
            gs = tape.jacobian(total, sources, unconnected_gradients=zero, experimental_use_pfor=False)
        return [g.numpy() for g in gs]


class KerasBackend:
    """Keras 3 models on the TensorFlow backend: Functional and Sequential (nested ones too), read
    through their graph, and subclassed ones, read by wrapping their layers' calls for the block."""

    name = "keras"
    xp = np_xp
    ops = NumpyOps()

    def owns(self, model: Any) -> bool:
        return isinstance(model, keras.Model)

    def images_in(self, inputs: Any) -> Any:
        return inputs

    def check_inputs(self, inputs: Any) -> np.ndarray:
        """NumPy / TF float images as a NumPy array (NHWC as given; transposed by :meth:`to_model_input`)."""
        try:
            a = inputs.numpy() if hasattr(inputs, "numpy") and not isinstance(inputs, np.ndarray) else np.asarray(inputs)
        except Exception as err:
            raise InputTypeError(f"inputs for a Keras model must be a NumPy array or a TensorFlow tensor of images "
                                 f"(B, H, W, C), got {type(inputs).__name__}") from err
        if not np.issubdtype(a.dtype, np.floating):
            raise InputTypeError(f"inputs must be floating point images preprocessed as the model expects, got dtype "
                                 f"{a.dtype}; e.g. x.astype('float32') / 255 or keras.applications' preprocess_input")
        return a

    def input_rank(self, model: Any) -> Optional[int]:
        g = graph_of(model)
        return len(g.inputs[0].shape) if g is not None and len(g.inputs) == 1 else None

    def volume_layouts(self, model: Any, x: Any, names: list[str]) -> dict:
        """Volumes / clips ``(B, D, H, W, C)`` are not explained on Keras yet: a clear error."""
        raise ConfigError(f"the input has shape {tuple(x.shape)}: volumes and video clips are explained for PyTorch "
                          "models only so far; explain the slices / frames as (B, H, W, C) images with a 2-D Keras "
                          "model, or use the PyTorch twin of the model")

    def to_model_input(self, model: Any, x: np.ndarray, precision: str) -> np.ndarray:
        """``(B, H, W, C)`` images -> ``(B, C, H, W)`` float32 (the engine's convention) for a
        channels-last model; an input already ``(B, C, H, W)`` (C matching the model's) is kept."""
        if precision != "fp32":
            raise ConfigError(f"precision={precision!r}: the Keras backend runs fp32 only for now "
                              f"(precisions: {PRECISION_NAMES}); set a keras mixed-precision policy on the model instead")
        require_model(model)
        g = graph_of(model)
        if g is not None and len(g.inputs) != 1:
            raise InputError(f"this Keras model takes {len(g.inputs)} inputs; camlens explains models of one image input")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or not channels_last(model):
            return x
        C = g.inputs[0].shape[-1] if g is not None else None  # (a subclassed model: NHWC as Keras takes it)
        if C is None or x.shape[-1] == C:
            return _to_nchw(x)
        if x.shape[1] == C:
            return x
        raise InputError(f"the Keras model takes images (B, H, W, {C}) (channels last), got shape {x.shape}")

    def call_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def explain_failure(self, err: BaseException, model: Any) -> None:
        return None

    def graph(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Nothing to switch: the capture's tape records what depends on the watched layer outputs."""
        return contextlib.nullcontext()

    def session(self, model: Any, *, eval_mode: bool = True, freeze: bool = True,
                restore_buffers: bool = True) -> contextlib.AbstractContextManager:
        """Nothing to set or restore: every layer call gets ``training=False`` and no variable or layer
        attribute is written (``eval_mode=False`` is refused: Keras has no per-model mode to keep)."""
        if not eval_mode:
            raise ConfigError("eval_mode=False: Keras models have no mode of their own; camlens calls every layer "
                              "with training=False (BatchNorm moving statistics, Dropout off)")
        require_model(model)
        return contextlib.nullcontext()

    def resolve_layers(self, model: Any, spec: Any) -> list[tuple[str, Any]]:
        return resolve_paths(model, spec)

    def default_layer(self, model: Any, x: np.ndarray) -> str:
        """The last layer to finish (execution order: a block after its own layers; nested graph
        models entered, their leaves chosen) that runs once and outputs a map ``(B, h, w, C)`` with
        ``h * w > 1``, not a model output; one probe forward of ``x[:1]`` (memoised per model and
        input shape)."""
        key = tuple(x.shape[1:])
        try:
            memo = _DEFAULT.setdefault(model, {})
        except TypeError:  # not weakly referenceable: no memo
            memo = {}
        if key in memo:
            return memo[key]
        layout = KerasLayout(model)
        run = GraphRun(frozenset(), every=True)
        final = {id(t) for t in tree.flatten(layout.forward(x[:1], run))}  # the model's outputs: not a CAM layer
        index = layer_index(model)
        best = None
        for path, outs in run.outputs.items():
            op = index.get(path)
            if op is None or graph_of(op) is not None or len(outs) != 1 or id(outs[0]) in final:
                continue
            s = getattr(outs[0], "shape", None)
            if s is None or len(s) != 4:
                continue
            h, w = (s[1], s[2]) if layout.channels_last else (s[2], s[3])
            if h * w > 1:
                best = path
        if best is None:
            raise LayerError(f"cannot pick a CAM layer of Keras model {model.name!r}: no layer outputs a spatial map "
                             "(B, h, w, C) with h*w > 1; pass layer= (a layer name)")
        if len(memo) >= 8:
            memo.clear()
        memo[key] = best
        return best

    def layout(self, model: Any, channels_last: Optional[bool], precision: str) -> KerasLayout:
        if precision != "fp32":
            raise ConfigError(f"precision={precision!r}: the Keras backend runs fp32 only for now")
        return KerasLayout(model)

    @contextlib.contextmanager
    def capture(self, model: Any, layers: Sequence[tuple[str, Any]], *, grad: bool, linear: bool,
                full_graph: bool, attention: bool = False):
        """Record ``layers``' outputs in the next forward of ``model``; with ``grad`` under one
        persistent ``tf.GradientTape`` watching only them. Closed (and the tape released) on exit."""
        if attention:
            raise ConfigError("attention methods (attention_rollout, attention_relevance) read a transformer's attention "
                              "probabilities, which camlens captures on PyTorch models only: they are not on Keras "
                              "models yet; explain a Keras model with a map method (gradcam, cam, scorecam, ...)")
        if full_graph:
            raise ConfigError("differentiable=True is not on Keras models yet")
        cap = KerasCapture(model, [n for n, _ in layers], grad, linear)
        cap.cut = downstream_cut(model, cap.names) if grad else None
        stack = _captures()
        tape = tf.GradientTape(persistent=True, watch_accessed_variables=False) if grad and cap.cut is None else None
        if tape is not None:
            tape.__enter__()
        cap.tape = tape
        stack.append(cap)
        try:
            yield cap
        finally:
            stack.remove(cap)
            if tape is not None:
                tape.__exit__(None, None, None)
            cap.tape = None

    def check_capture(self, cap: KerasCapture, layers: Sequence[tuple[str, Any]], model: Any, x: np.ndarray,
                      read: Optional[Any] = None) -> None:
        if read:
            raise ConfigError("layout= / reshape= are not on Keras models yet: camlens reads 4-D layer outputs as "
                              "(B, h, w, C) maps")
        B, size = int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1]))
        for name, _ in layers:
            n = cap.calls.get(name, 0)
            if n != 1:
                why = "did not run in the forward" if n == 0 else f"ran {n} times (a shared layer)"
                raise LayerError(f"layer {name!r} {why}: camlens explains a layer that runs once per forward; pick "
                                 "another layer")
            a = cap.activations.get(name)
            if a is None:
                raise LayerError(f"layer {name!r} returns {type(cap.tf_acts.get(name, None)).__name__}, not one tensor: "
                                 "camlens explains a layer with one (B, h, w, C) output; pick another layer")
            problem = layout_problem(a.shape, B, size)
            if problem is not None and a.ndim == 4 and a.shape[0] == B:
                problem = None  # (B, C, h, w) from the channels-last output: read as it is
            if problem is not None:
                raise LayerError(f"layer {name!r} output has shape {tuple(cap.tf_acts[name].shape)}: {problem}. Pick a "
                                 "layer with a 4-D (B, h, w, C) output (a convolution block, e.g. the one the default "
                                 "layer=None picks)")
        cap.layouts = {}

    def target_gradients(self, scores: np.ndarray, acts: Sequence[np.ndarray], names: Sequence[str],
                         labels: Sequence[str], *, create_graph: bool = False, targets: Any = None) -> list[np.ndarray]:
        """Per layer, ``dS[b, t] / dA[b]`` ``(B, T, C, h, w)`` for the T scores ``S (B, T)``.

        Graph models (a :class:`~.graph.Cut` below the layers): the part of the graph below the layers
        runs again on T tiled copies of the batch, ``A~ = [A; A; ...]`` ``(T*B, h, w, C)`` (the outputs
        it needs from above the cut, recorded in the forward, tiled alike), copy t scored on target t
        only; ONE backward of ``sum_t sum_b S_t(A~[t*B + b])`` to ``A~`` gives every target's gradient
        (image b's score depends only on image b's activations: inference mode). Nothing above the
        layers is recomputed; copies are taken ``_ROWS`` rows at a time. Other models: the scores
        recomputed in the forward's tape, then one vectorised Jacobian (``tape.jacobian``, pfor)."""
        if create_graph:
            raise ConfigError("differentiable=True is not on Keras models yet")
        cap = next((c for c in reversed(_captures()) if c.grad and c.tf_output is not None), None)
        if cap is None or targets is None:
            raise LayerRuntimeError("the Keras backend's target gradients need an open capture with grad=True and the "
                                    "resolved targets")
        scores = np.asarray(scores)
        if cap.cut is not None and all(len(v) == 1 for v in cap.kept.values()):
            gs = _cut_gradients(cap, scores, list(names), targets)  # (T, B, ...) each
        else:
            gs = _tape_gradients(cap, scores, list(names), targets)
        out = []
        for g in gs:
            g = np.swapaxes(g, 0, 1)  # (B, T, ...)
            if g.ndim == 5 and cap.channels_last:
                g = np.transpose(g, (0, 1, 4, 2, 3))  # (B, T, h, w, C) -> (B, T, C, h, w)
            out.append(np.ascontiguousarray(g, dtype=np.float32))
        return out

    def runner(self, model: Any, score_image: Callable[[Any, int], Any], layout: KerasLayout,
               targets: Optional[list] = None) -> KerasRunner:
        return KerasRunner(model, score_image, layout, targets)

    def linear_head(self, cap: KerasCapture, head: np.ndarray, acts: np.ndarray, layer: str, model: Any,
                    head_name: str) -> np.ndarray:
        """The kernel of the ``Dense`` layer whose output is ``head`` ``(B, K)`` and whose input is the
        global average pool of ``acts`` ``(B, C, h, w)``, as ``(K, C)`` (Keras stores ``(C, K)``).

        Found on the capture's forward, which recorded every Dense layer's input and output (nested
        models and blocks included): the producer of ``head`` (a final softmax / sigmoid left out, so
        ``head = GAP(A) @ W + b``), then its input checked against ``mean_ij A[:, :, i, j]`` —
        ``GlobalAveragePooling2D``, a ``Flatten`` of a 1x1 map, a pooled nested backbone, Dropout in
        between all pass; anything else is an error saying what was found."""
        head = np.asarray(head)
        producers = [p for p, (_, outs) in cap.dense_io.items()
                     if len(outs) == 1 and tuple(outs[0].shape) == head.shape and np.array_equal(outs[0].numpy(), head)]
        if not producers:
            raise ModelError(f"CAM needs output {head_name!r} to come straight from a keras.layers.Dense layer; none of "
                             f"this Keras model's Dense layers ({sorted(cap.dense_io) or 'none'}) produced it. Use "
                             "method='gradcam', which works on any architecture.")
        path = producers[-1]
        inp = np.asarray(cap.dense_io[path][0][0], dtype=np.float32)
        pooled = acts.astype(np.float32).mean(axis=(2, 3))
        if inp.shape != pooled.shape or not np.allclose(inp, pooled, rtol=1e-4, atol=1e-5 * (1 + np.abs(pooled).max())):
            raise ModelError(f"CAM needs the input of Dense {path!r} to be the global average pool of layer {layer!r}: "
                             f"its input has shape {inp.shape}, while GAP({layer}) has shape {pooled.shape}"
                             + ("" if inp.shape != pooled.shape else " but different values (other layers in between)")
                             + ". Pick the layer right before the global pooling, or use method='gradcam'.")
        dense = layer_index(model)[path]
        if getattr(dense, "quantization_mode", None):
            raise ModelError(f"CAM reads the kernel of Dense {path!r}, which is quantized "
                             f"({dense.quantization_mode}); use method='gradcam'")
        return np.ascontiguousarray(np.asarray(dense.kernel, dtype=np.float32).T)

    def output_activations(self, model: Any) -> Optional[dict]:
        """``{head: "softmax" / "sigmoid"}``: the final activations the forward leaves out (so
        :func:`camlens.core.activations.model_activation` gives ``exp.probs`` the model's own)."""
        return output_activations(model)

    def randomized_copy(self, model: Any, layers: Sequence[str], seed: int) -> Any:
        """A clone of ``model`` (``keras.models.clone_model`` + ``set_weights``) with ``layers``' own
        variables re-drawn by their initializers (:mod:`.randomise`); the model is never modified
        and the global random state is left as it was."""
        return randomise.randomized_copy(model, layers, seed)

    def layer_order(self, model: Any, x: Any) -> list[str]:
        """Paths of the layers owning variables of their own that run on ``x`` ``(B, C, H, W)``, in the
        order their calls finish (input side first; a block after its sub-layers): one forward
        recording every layer, ``training=False``, nothing written."""
        index = layer_index(model)
        run = GraphRun(frozenset(), every=True)
        with randomise.preserved_rng():
            KerasLayout(model).forward(np.asarray(x, dtype=np.float32), run)
        return [p for p in run.outputs if p in index and randomise.own_variables(index[p])]

    def reinitialise_layers(self, model: Any, layers: Sequence[str], seed: int) -> None:
        """Re-draw ``layers``' own variables of ``model`` in place (seed ``seed + i`` for the i-th);
        for a copy from :meth:`randomized_copy` only."""
        randomise.reinitialise_layers(model, layers, seed)


_COMPILE_CHUNKS = 8  # a call with this many chunks of forwards compiles the model's forward (then kept)
_COMPILED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # model -> {input shape: fn}


def _compiled(model: Any, shape: tuple, build: bool) -> Optional[Callable[[tf.Tensor], Any]]:
    """The graph model's forward (logits: a final softmax / sigmoid left out, every layer
    ``training=False``) as a ``tf.function`` for inputs ``(N, *shape)`` (any N), if one was built —
    or ``build`` it now (a trace: about two forwards' time)."""
    try:
        memo = _COMPILED.setdefault(model, {})
    except TypeError:  # not weakly referenceable
        return None
    key = tuple(int(d) for d in shape)
    if key not in memo and build:
        ref = weakref.ref(model)  # (the memo must not keep the model alive)
        memo[key] = tf.function(lambda t: run_graph(ref(), t, GraphRun(frozenset())), reduce_retracing=True)
    return memo.get(key)


_ROWS = 64  # the most tiled rows (T copies x B images) one backward of the cut takes


def _cut_gradients(cap: KerasCapture, scores: np.ndarray, names: list[str], targets: Any) -> list[np.ndarray]:
    """:meth:`KerasBackend.target_gradients` on a graph model: the part below the layers on tiled copies."""
    cut = cap.cut
    B, T = scores.shape
    per = max(1, min(T, _ROWS // max(B, 1)))  # targets per backward
    chunks: list[list[np.ndarray]] = []
    for t0 in range(0, T, per):
        n = min(per, T - t0)

        def tile(a: Any, n: int = n) -> Any:
            return tf.tile(a, [n] + [1] * (len(a.shape) - 1)) if n > 1 else a

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            replace = {p: tree.map_structure(tile, outs[0]) for p, outs in cap.kept.items()}
            for p in cut.roots:
                replace[p] = tile(cap.tf_acts[p])
                tape.watch(replace[p])
            run = GraphRun(frozenset(p for p in names if p not in cut.roots), replace=replace, only=cut)
            x = tile(cap.model_input) if cut.input else cap.model_input
            try:
                out = _named(run_graph(cap.model, x, run), output_names(cap.model))
            except ValueError as err:  # an output the cut did not reach: a graph camlens did not expect
                raise LayerRuntimeError(f"the Keras graph below layers {names} could not be run on its own ({err})") from err
            sources = [replace[p] if p in cut.roots else run.outputs[p][0] for p in names]
            total = 0.0
            got = []
            for j in range(n):
                block = tree.map_structure(lambda o, j=j: o[j * B:(j + 1) * B], out)
                s = tf_target_scores([[targets[b][t0 + j]] for b in range(B)], block)  # (B, 1)
                got.append(s)
                total = total + tf.reduce_sum(s)
        _check_scores(tf.concat(got, axis=1).numpy(), scores[:, t0:t0 + n])
        gs = tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        chunks.append([g.numpy().reshape((n, B) + tuple(g.shape[1:])) for g in gs])
    return [np.concatenate([c[i] for c in chunks]) if len(chunks) > 1 else chunks[0][i] for i in range(len(names))]


def _tape_gradients(cap: KerasCapture, scores: np.ndarray, names: list[str], targets: Any) -> list[np.ndarray]:
    """:meth:`KerasBackend.target_gradients` from the forward's tape (still recording; or, if the capture
    had none, the forward again under one watching the layers): one vectorised Jacobian ``(T, B, ...)``."""
    if cap.tape is not None:
        s = tf_target_scores(targets, cap.tf_output)  # (B, T), recorded on the open tape
        _check_scores(s.numpy(), scores)
        total = tf.reduce_sum(s) if s.shape[1] == 1 else tf.reduce_sum(s, axis=0)  # () or (T,)
        return _jacobian(cap.tape, total, [cap.tf_acts[n] for n in names], int(s.shape[1]))
    # a cut whose recorded outputs do not fit (a shared layer above it): the forward again, taped
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        run = GraphRun(frozenset(names), on_output=lambda path, out: tape.watch(out))
        s = tf_target_scores(targets, _named(run_graph(cap.model, cap.model_input, run), output_names(cap.model)))
        _check_scores(s.numpy(), scores)
        total = tf.reduce_sum(s) if s.shape[1] == 1 else tf.reduce_sum(s, axis=0)
        return _jacobian(tape, total, [run.outputs[n][0] for n in names], int(s.shape[1]))

_DEFAULT: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # model -> {input shape: layer}

BACKEND = KerasBackend()
