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
b's activations (inference mode), so the batch sum separates them.

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
from ..base import PRECISION_NAMES, layout_problem
from ..numpy import NumpyOps
from .graph import (GraphRun, graph_of, layer_index, output_activations, output_names, require_model, resolve_paths,
                    run_graph)
from .scores import tf_target_scores

__all__ = ["KerasBackend", "BACKEND", "KerasCapture", "KerasLayout", "KerasRunner", "channels_last"]

_ACTIVE = threading.local()  # the captures open in this thread (innermost last)


def _captures() -> list:
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    return _ACTIVE.stack


def channels_last(model: Any) -> bool:
    """Does ``model`` take channels-last images ``(B, H, W, C)``? What its layers say (their
    ``data_format``, set when they were built: ``channels_first`` if any says so), else Keras'
    ``image_data_format()``."""
    formats = {getattr(layer, "data_format", None) for layer in layer_index(model).values()}
    if "channels_first" in formats:
        return False
    if "channels_last" in formats:
        return True
    return keras.config.image_data_format() == "channels_last"


def _check_precision(precision: str) -> None:
    """Only ``"fp32"``: a Keras model runs in the dtypes it was built with (its dtype policy)."""
    if precision != "fp32":
        raise ConfigError(f"precision={precision!r}: camlens runs a Keras model in the dtypes it was built with "
                          f"(precisions: {PRECISION_NAMES}; fp32 on Keras). For float16 / bfloat16, build the model "
                          "under keras.mixed_precision.set_dtype_policy('mixed_float16') (or 'mixed_bfloat16') and "
                          "pass precision='fp32': camlens reads its low-precision layer outputs as float32")


def _float32(t: Any) -> Any:
    """A float16 / bfloat16 TF tensor cast to float32 (recorded on a tape: the gradient flows back
    through the cast); anything else as it is. Mixed-precision models' outputs are scored in float32."""
    dt = getattr(t, "dtype", None)
    return tf.cast(t, tf.float32) if dt is not None and dt in (tf.float16, tf.bfloat16) else t


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
    """NumPy copies of an output structure's tensors (float16 / bfloat16 ones as float32)."""
    return tree.map_structure(lambda t: _float32(t).numpy() if hasattr(t, "numpy") else np.asarray(t), out)


def _as_layer_dtype(a: np.ndarray, layer: Any) -> tf.Tensor:
    """Replacement outputs in the layer's own dtype (float16 under a mixed policy), clipped to its finite
    range first (Ablation-CAM's ``min - 1e7`` would be ``-inf`` in float16)."""
    dtype = tf.as_dtype(getattr(layer, "compute_dtype", None) or "float32")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == tf.float16:
        a = np.clip(a, dtype.min, dtype.max)
    return tf.cast(a, dtype)


class KerasCapture:
    """One forward's captured layers: ``activations`` (path -> NumPy ``(B, C, h, w)``), ``calls``
    (path -> how many times it ran), and for the gradients the TF tensors and the tape."""

    def __init__(self, model: Any, names: Sequence[str], grad: bool) -> None:
        self.model, self.names, self.grad = model, list(names), grad
        self.activations: dict[str, np.ndarray] = {}
        self.calls: dict[str, int] = {}
        self.tf_acts: dict[str, tf.Tensor] = {}
        self.tf_output: Any = None
        self.tape: Optional[tf.GradientTape] = None
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
        """The TF output of ``x`` (list outputs named; float16 / bfloat16 heads cast to float32),
        with ``run``'s layers recorded / replaced."""
        run = run if run is not None else GraphRun(frozenset())
        return _named(tree.map_structure(_float32, run_graph(self.model, self.model_input(x), run)), self.names)

    def run(self, x: np.ndarray, score_only: bool = False) -> Any:
        cap = next((c for c in reversed(_captures()) if c.model is self.model), None)
        if cap is None or score_only:
            return _host(self.forward(x))
        watch = cap.tape.watch if cap.tape is not None else None
        run = GraphRun(frozenset(cap.names), on_output=(lambda path, out: watch(out)) if watch else None)
        out = self.forward(x, run)
        cap.tf_output, cap.channels_last = out, self.channels_last
        for name in cap.names:
            outs = run.outputs.get(name, [])
            cap.calls[name] = len(outs)
            if len(outs) == 1 and hasattr(outs[0], "numpy"):
                cap.tf_acts[name] = outs[0]
                a = _float32(outs[0]).numpy()  # a mixed-precision layer's float16 output read as float32
                cap.activations[name] = _to_nchw(a) if a.ndim == 4 and self.channels_last else a
        return _host(out)


class KerasRunner:
    """Forwards beyond the first (Score-CAM, occlusion, Ablation-CAM): no tape, NumPy in and out.
    ``score(output, b)`` gives image ``b``'s target scores ``(N, T)`` on N outputs."""

    def __init__(self, model: Any, score: Callable[[Any, int], Any], layout: KerasLayout) -> None:
        self.model, self.score, self.layout = model, score, layout
        self.forwards = 0
        self._paths = {id(op): p for p, op in layer_index(model).items()}

    def _forward(self, x: np.ndarray, run: Optional[GraphRun] = None) -> Any:
        self.forwards += 1
        return _host(self.layout.forward(x, run))

    def scores(self, x: np.ndarray, b: int, batch_size: int = 32) -> np.ndarray:
        """Scores ``(N, T)`` of image ``b``'s targets for N inputs ``x`` ``(N, C, H, W)``, in chunks."""
        return np.concatenate([np.asarray(self.score(self._forward(x[i:i + batch_size]), b), dtype=np.float32)
                               for i in range(0, x.shape[0], batch_size)])

    def outputs(self, x: np.ndarray, fn: Callable[[Any], Any], batch_size: int = 32) -> list:
        return [fn(self._forward(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)]

    def scores_with_layer(self, layer: Any, acts: np.ndarray, x_b: np.ndarray, b: int,
                          batch_size: int = 32) -> np.ndarray:
        """Scores ``(N, T)`` with ``layer``'s output replaced by each of ``acts`` ``(N, C, h, w)``; the
        input ``x_b`` ``(1, C, H, W)`` is repeated to the chunk's size."""
        path = self._paths.get(id(layer))
        if path is None:
            raise LayerError(f"layer {getattr(layer, 'name', layer)!r} is not in this Keras model's graph")
        out = []
        for i in range(0, acts.shape[0], batch_size):
            chunk = acts[i:i + batch_size]
            a = np.transpose(chunk, (0, 2, 3, 1)) if self.layout.channels_last and chunk.ndim == 4 else chunk
            run = GraphRun(frozenset(), replace={path: _as_layer_dtype(a, layer)})
            xs = np.repeat(x_b, chunk.shape[0], axis=0)
            out.append(np.asarray(self.score(self._forward(xs, run), b), dtype=np.float32))
        return np.concatenate(out)

    def input_gradients(self, x: Any, b_scores: Callable[[Any], Any], guided: bool = False,
                        non_relu: str = "error") -> tuple[Any, Any]:
        raise ConfigError("input-gradient methods (saliency, guided backprop, integrated gradients, ...) are not on "
                          "Keras models yet; use the Grad-CAM family (gradcam, gradcampp, xgradcam, hirescam, "
                          "layercam) or eigencam")


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
        _check_precision(precision)
        require_model(model)
        g = graph_of(model)
        if g is not None and len(g.inputs) != 1:
            raise InputError(f"this Keras model takes {len(g.inputs)} inputs; camlens explains models of one image input")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            return x
        if not channels_last(model):  # a channels_first model takes (B, C, H, W), the engine's convention
            C = g.inputs[0].shape[1] if g is not None else None
            if C is not None and x.shape[1] != C:
                raise InputError(f"the Keras model takes images (B, {C}, H, W) (channels first: its layers have "
                                 f"data_format='channels_first'), got shape {x.shape}; e.g. np.transpose(x, (0, 3, 1, 2))")
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
        final = {id(t) for t in tree.flatten(run_graph(model, layout.model_input(x[:1]), run))}  # not a CAM layer
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
        _check_precision(precision)
        return KerasLayout(model)

    @contextlib.contextmanager
    def capture(self, model: Any, layers: Sequence[tuple[str, Any]], *, grad: bool, linear: bool,
                full_graph: bool, attention: bool = False):
        """Record ``layers``' outputs in the next forward of ``model``; with ``grad`` under one
        persistent ``tf.GradientTape`` watching only them. Closed (and the tape released) on exit."""
        if attention:
            raise ConfigError("attention methods are not on Keras models yet")
        if full_graph:
            raise ConfigError("differentiable=True is not on Keras models yet")
        cap = KerasCapture(model, [n for n, _ in layers], grad)
        stack = _captures()
        tape = tf.GradientTape(persistent=True, watch_accessed_variables=False) if grad else None
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
        """Per layer, ``dS[b, t] / dA[b]`` ``(B, T, C, h, w)`` for the T scores: the scores recomputed on
        the TF outputs in the capture's tape (``targets``: the resolved rows), then one vectorised
        Jacobian of ``sum_b S[b, :]`` ``(T,)`` w.r.t. the layers' outputs ``(B, h, w, C)``."""
        if create_graph:
            raise ConfigError("differentiable=True is not on Keras models yet")
        cap = next((c for c in reversed(_captures()) if c.tape is not None), None)
        if cap is None or targets is None:
            raise LayerRuntimeError("the Keras backend's target gradients need an open capture with grad=True and the "
                               "resolved targets")
        tape = cap.tape
        s = tf_target_scores(targets, cap.tf_output)  # (B, T), recorded on the tape
        got = s.numpy()
        if got.shape != tuple(scores.shape) or not np.allclose(got, scores, rtol=1e-4, atol=1e-5):
            raise ModelError(f"the target scores recomputed on the TensorFlow output {got.tolist()} differ from the "
                             f"reported ones {np.asarray(scores).tolist()}; a score function that is not the same "
                             "maths on NumPy and TensorFlow arrays cannot be explained")
        sources = [cap.tf_acts[n] for n in names]
        T = got.shape[1]
        total = tf.reduce_sum(s) if T == 1 else tf.reduce_sum(s, axis=0)  # () or (T,), recorded
        with tape.stop_recording():
            if T == 1:
                gs = tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                gs = [g.numpy()[None] for g in gs]  # (1, B, ...)
            else:
                try:
                    gs = tape.jacobian(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                       experimental_use_pfor=True)
                except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError):  # an op pfor lacks
                    gs = tape.jacobian(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                       experimental_use_pfor=False)
                gs = [g.numpy() for g in gs]  # (T, B, ...)
        out = []
        for g in gs:
            g = np.swapaxes(g, 0, 1)  # (B, T, ...)
            if g.ndim == 5 and cap.channels_last:
                g = np.transpose(g, (0, 1, 4, 2, 3))  # (B, T, h, w, C) -> (B, T, C, h, w)
            out.append(np.ascontiguousarray(g, dtype=np.float32))
        return out

    def runner(self, model: Any, score_image: Callable[[Any, int], Any], layout: KerasLayout) -> KerasRunner:
        return KerasRunner(model, score_image, layout)

    def linear_head(self, cap: Any, head: Any, acts: Any, layer: str, model: Any, head_name: str) -> Any:
        raise ModelError("CAM (the linear head's weights) is not on Keras models yet; use method='gradcam', which "
                         "equals CAM for a GAP + Dense head up to a positive factor")

    def output_activations(self, model: Any) -> Optional[dict]:
        """``{head: "softmax" / "sigmoid"}``: the final activations the forward leaves out (so
        :func:`camlens.core.activations.model_activation` gives ``exp.probs`` the model's own)."""
        return output_activations(model)

    def randomized_copy(self, model: Any, layers: Sequence[str], seed: int) -> Any:
        raise ConfigError("randomised copies (MPRT) are not on Keras models yet")

    def layer_order(self, model: Any, x: Any) -> list[str]:
        return [p for p, op in layer_index(model).items() if op.weights and graph_of(op) is None]

    def reinitialise_layers(self, model: Any, layers: Sequence[str], seed: int) -> None:
        raise ConfigError("re-initialising layers (MPRT) is not on Keras models yet")


_DEFAULT: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # model -> {input shape: layer}

BACKEND = KerasBackend()
