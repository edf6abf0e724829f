"""The Keras 3 implementation of :class:`camlens.backends.base.Backend` (on TensorFlow, JAX or PyTorch).

Arrays handed to the engine are NumPy (``ops`` = :class:`~camlens.backends.numpy.NumpyOps`, ``xp`` =
NumPy's array-API namespace): TensorFlow tensors are not array-API objects, so the method maths
runs on host copies made once per pass — the captured activations ``(B, C, h, w)``, the target
gradients ``(B, T, C, h, w)`` and the outputs — after the forward, never inside a layer call.
The input convention inside the engine is the shared one, ``(B, C, H, W)``: a Keras user passes
NHWC images ``(B, H, W, C)`` (Keras' own layout), :meth:`KerasBackend.to_model_input` transposes
them once, and every forward transposes back (a view for NumPy, a copy for TF).

Gradients: one code path for every Keras backend; what differs is in :mod:`.autodiff` (chosen by
``keras.backend.backend()``). On TensorFlow a graph model's forward records no gradient, and the
part of the graph below the captured layers runs once more on T tiled copies of the batch for ONE
backward that gives all T targets' gradients (a subclassed model: the forward under a tape watching
the captured outputs, then one vectorised Jacobian); on JAX and PyTorch a zero probe is added to
each captured output and differentiated (``jax.vmap`` of the model's VJP, ``autograd.grad(...,
is_grads_batched=True)``). The T target scores are evaluated again on the backend's outputs
(:mod:`.scores`); as in the torch backend, image b's score depends only on image b's activations
(inference mode), so the batch sum separates them. Input gradients (guided backprop) are the same
Jacobian w.r.t. the NHWC input (:meth:`KerasRunner.input_gradients`; on TensorFlow, Keras' ReLUs
guided for the forward by :mod:`.guided`); CAM's linear head is the kernel of the ``Dense`` the
capture saw producing the head from ``GAP(layer)`` (:meth:`KerasBackend.linear_head`).

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
from keras.src import tree

from ...core.errors import ConfigError, InputError, LayerError, LayerRuntimeError, ModelError
from ..base import PRECISION_NAMES, float_images, layout_problem, unguided_error
from ..numpy import NumpyOps
from . import randomise
from .autodiff import autodiff, float32, host, model_output, named
from .graph import (SEP, Cut, GraphRun, downstream_cut, graph_of, head_keys, layer_index, output_activations,
                    output_names,
                    require_model, resolve_paths, run_graph)
from .scores import target_scores

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


def _to_nchw(a: np.ndarray) -> np.ndarray:
    """``(B, h, w, C) -> (B, C, h, w)`` as a contiguous array."""
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


_named = named  # list outputs named by their output layers


_host = host  # NumPy copies of an output structure's tensors (float16 / bfloat16 ones as float32)


def _as_layer_dtype(a: np.ndarray, layer: Any) -> Any:
    """Replacement outputs in the layer's own dtype (float16 under a mixed policy), clipped to its finite
    range first (Ablation-CAM's ``min - 1e7`` would be ``-inf`` in float16)."""
    dtype = keras.backend.standardize_dtype(getattr(layer, "compute_dtype", None) or "float32")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "float16":
        info = np.finfo(np.float16)
        a = np.clip(a, info.min, info.max)
    t = autodiff().to_tensor(a)
    return t if dtype == "float32" else keras.ops.cast(t, dtype)


class KerasCapture:
    """One forward's captured layers: ``activations`` (path -> NumPy ``(B, C, h, w)``), ``calls``
    (path -> how many times it ran), and for the gradients the backend's tensors (``tf_acts``,
    ``tf_output``: TF, JAX or torch, named so from the TensorFlow-only first slice) and ``grad_state``
    (:mod:`.autodiff`: TF's tape, JAX's VJP, torch's probes)."""

    def __init__(self, model: Any, names: Sequence[str], grad: bool, linear: bool = False) -> None:
        self.model, self.names, self.grad = model, list(names), grad
        # CAM: every Dense layer's (inputs, outputs) of the forward, one per call
        self.dense_paths = frozenset(p for p, op in layer_index(model).items()
                                     if isinstance(op, keras.layers.Dense)) if linear else frozenset()
        self.dense_io: dict[str, tuple[list, list]] = {}
        self.activations: dict[str, np.ndarray] = {}
        self.calls: dict[str, int] = {}
        self.tf_acts: dict[str, Any] = {}
        self.tf_output: Any = None
        self.grad_state: Any = None  # :mod:`.autodiff`: TF's tape (models without a cut), JAX's VJP, torch's probes
        self.cut: Optional[Cut] = None  # TF graph models: the gradients re-run only the part below the layers
        self.kept: dict[str, list] = {}  # the cut's upstream outputs, recorded in the forward
        self.model_input: Any = None  # the forward's input tensor
        self.layouts: dict = {}
        self.channels_last = True  # set by the forward that fills the capture
        self.attentions = None
        self.attention_layout = None

    @property
    def tape(self) -> Any:
        """TensorFlow's ``GradientTape`` of this capture (``None`` on other backends or without grad)."""
        return self.grad_state if autodiff().name == "tensorflow" else None


class KerasLayout:
    """The forward runner of a call: ``run(x (B, C, H, W) NumPy) -> output`` (NumPy copies; list
    outputs named by their layers), recording the layers of the capture open on this model."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.channels_last = channels_last(model)
        self.names = output_names(model)

    def autocast(self, x: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def model_input(self, x: np.ndarray) -> Any:
        """``(B, C, H, W)`` NumPy -> the model's input tensor (NHWC for a channels-last model)."""
        a = np.transpose(x, (0, 2, 3, 1)) if self.channels_last else x
        return autodiff().to_tensor(a)

    def forward(self, x: np.ndarray, run: Optional[GraphRun] = None) -> Any:
        """The backend's output of ``x`` (list outputs named; float16 / bfloat16 heads cast to float32),
        with ``run``'s layers recorded / replaced."""
        return self.forward_tensor(self.model_input(x), run)

    def forward_tensor(self, xt: Any, run: Optional[GraphRun] = None) -> Any:
        """:meth:`forward` of the model's own input tensor ``xt`` (NHWC for a channels-last model)."""
        return model_output(self.model, xt, run if run is not None else GraphRun(frozenset()))

    def run(self, x: np.ndarray, score_only: bool = False) -> Any:
        cap = next((c for c in reversed(_captures()) if c.model is self.model), None)
        ad = autodiff()
        if cap is None or score_only:
            with ad.no_grad():
                return _host(self.forward(x))
        keep = cap.cut.keep if cap.cut is not None else frozenset()
        cap.model_input = self.model_input(x)
        out, outputs, inputs = ad.forward(cap, lambda run: self.forward_tensor(cap.model_input, run), tuple(x.shape),
                                          record=keep | cap.dense_paths, inputs_of=cap.dense_paths)
        cap.dense_io = {p: (inputs.get(p, []), outputs.get(p, [])) for p in cap.dense_paths}
        cap.tf_output, cap.channels_last = out, self.channels_last
        cap.kept = {p: outputs.get(p, []) for p in keep}
        for name in cap.names:
            outs = outputs.get(name, [])
            cap.calls[name] = len(outs)
            if len(outs) == 1 and ad.is_tensor(outs[0]):
                cap.tf_acts[name] = outs[0]
                a = ad.to_numpy(float32(outs[0]))  # a mixed-precision layer's float16 output read as float32
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
        with autodiff().no_grad():
            return _host(self.layout.forward(x, run))

    def _plain(self, x: np.ndarray) -> Any:
        """The NumPy output of one score-only forward of ``x`` ``(N, C, H, W)``. Once this runner has run
        ``_COMPILE_CHUNKS`` forwards (Score-CAM's masked copies, RISE, occlusion, the deletion curves),
        a graph model's forward is compiled once as a ``tf.function`` (:func:`_compiled`: the same
        layers and maths without per-layer Python dispatch; kept per model and input size, so later
        calls use it from their first forward)."""
        fn = None
        if graph_of(self.model) is not None:
            fn = _compiled(self.model, x.shape[1:], build=self.forwards >= _COMPILE_CHUNKS)
        if fn is None:
            return self._forward(x)
        self.forwards += 1
        return _host(_named(fn(self.layout.model_input(x)), self.layout.names))

    def scores(self, x: np.ndarray, b: int, batch_size: int = 32) -> np.ndarray:
        """Scores ``(N, T)`` of image ``b``'s targets for N inputs ``x`` ``(N, C, H, W)``, in chunks."""
        return np.concatenate([np.asarray(self.score(self._plain(x[i:i + batch_size]), b), dtype=np.float32)
                               for i in range(0, x.shape[0], batch_size)])

    def outputs(self, x: np.ndarray, fn: Callable[[Any], Any], batch_size: int = 32) -> list:
        return [fn(self._plain(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)]

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
            replace = {path: _as_layer_dtype(a, layer)}
            if cut is None:
                run, xs = GraphRun(frozenset(), replace=replace), np.repeat(x_b, n, axis=0)
            else:
                replace.update((p, tree.map_structure(lambda t: keras.ops.tile(t, [n] + [1] * (len(t.shape) - 1)), v))
                               for p, v in kept.items())
                run = GraphRun(frozenset(), replace=replace, only=cut)
                xs = np.repeat(x_b, n, axis=0) if cut.input else x_b  # (the input is not read otherwise)
            out.append(np.asarray(self.score(self._forward(xs, run), b), dtype=np.float32))
        return np.concatenate(out)

    def input_gradients(self, x: np.ndarray, b_scores: Callable[[Any], Any], guided: bool = False,
                        non_relu: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """Gradients of the target scores w.r.t. the input pixels: ``(B, T, C, H, W)`` and the scores
        ``(B, T)``, for ``x`` ``(B, C, H, W)``.

        One forward of the NHWC input, differentiated w.r.t. it (:meth:`.autodiff.Autodiff.input_jacobian`:
        TF's tape, ``jax.vjp``, torch's autograd); the T scores are the runner's ``targets`` evaluated
        on the backend's output (:mod:`.scores`, checked against
        ``b_scores`` on its NumPy copy); ONE vectorised Jacobian ``d (sum_b S[b, :]) / dx``
        ``(T, B, H, W, C)`` gives every target's gradient. ``guided``: every Keras ReLU / ReLU6 gets
        guided backprop's backward for the forward (:func:`.guided.guided_relus`, nothing of the
        model edited); other activations (GELU, SiLU, ...) are a :class:`ModelError` naming them
        unless ``non_relu="plain"`` (they pass their plain gradient: guided only at the ReLUs).
        """
        if self.targets is None:
            raise LayerRuntimeError("the Keras backend's input gradients need the resolved targets (runner(..., "
                                    "targets=rows)) to recompute the scores on the model's output")
        ad = autodiff()
        if guided and ad.name != "tensorflow":
            raise ConfigError("guided backprop on Keras models runs on Keras' TensorFlow backend only (it gives "
                              "TensorFlow's ReLUs the guided backward); set KERAS_BACKEND=tensorflow, or use the "
                              "Grad-CAM family")
        xt = self.layout.model_input(x)
        self.forwards += 1
        box: dict = {}

        def forward(t: Any) -> Any:
            if not guided:
                return self.layout.forward_tensor(t)
            from .guided import guided_relus

            with guided_relus(self.model) as seen:
                out = self.layout.forward_tensor(t)
            box["unguided"] = seen.unguided
            return out

        def check(got: np.ndarray, out: Any) -> None:  # against the engine's scores of the output's NumPy copy
            box["scores"] = np.asarray(b_scores(_host(out)), dtype=np.float32)
            _checker(box["scores"])(got)

        g, _ = ad.input_jacobian(forward, xt, self.targets, check)  # (T, B, ...)
        if box.get("unguided") and non_relu != "plain":
            raise unguided_error(box["unguided"], "Keras model")
        scores = box["scores"]
        g = np.swapaxes(g, 0, 1)  # (B, T, H, W, C) / (B, T, C, H, W)
        if self.layout.channels_last:
            g = np.transpose(g, (0, 1, 4, 2, 3))
        return np.ascontiguousarray(g, dtype=np.float32), scores


def _checker(want: Any) -> Callable[[np.ndarray], None]:
    """A check that the scores recomputed on the backend's output equal the engine's ``want`` ``(B, T)``
    (the same maths, to float rounding)."""
    want = np.asarray(want)

    def check(got: np.ndarray) -> None:
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise ModelError(f"the target scores recomputed on the model's {keras.backend.backend()} output "
                             f"{got.tolist()} differ from the reported ones {want.tolist()}; a score function that is "
                             "not the same maths on NumPy arrays and the backend's tensors cannot be explained")
    return check


class KerasBackend:
    """Keras 3 models on the TensorFlow, JAX or PyTorch backend of Keras: Functional and Sequential
    (nested ones too), read through their graph, and subclassed ones, read by wrapping their layers'
    calls for the block."""

    name = "keras"
    xp = np_xp
    ops = NumpyOps()

    def owns(self, model: Any) -> bool:
        return isinstance(model, keras.Model)

    def images_in(self, inputs: Any) -> Any:
        return inputs

    def maximise(self, model: Any, terms: Sequence[Sequence[Any]], **kw: Any) -> tuple[Any, Any, Any]:
        """Activation maximisation (:func:`camlens.visualize`): one image per objective, in one batch;
        :func:`~camlens.backends.keras.visualize.maximise` (NumPy out: NCHW images in [0, 1])."""
        from .visualize import maximise

        return maximise(model, terms, **kw)

    def layer_names(self, model: Any) -> list[str]:
        """Layer paths (``"features/block4_conv"``) and the bare names unique across the nesting, less the
        output layers named as the model's heads (``"shape:circle"`` of a dict output ``{"shape": ...}``
        made by a Dense layer ``shape`` stays a head's class)."""
        heads = {k for k in head_keys(model) if isinstance(k, str)}
        paths = [p for p in layer_index(model) if p not in heads]
        bare: dict[str, int] = {}
        for p in paths:
            leaf = p.rsplit(SEP, 1)[-1]
            bare[leaf] = bare.get(leaf, 0) + 1
        return paths + [b for b, k in bare.items() if k == 1 and b not in paths and b not in heads]

    def image_size(self, model: Any) -> Optional[tuple[int, int]]:
        """The ``(H, W)`` of a graph model's one 4-D input, where both are fixed."""
        g = graph_of(model)
        if g is None or len(g.inputs) != 1 or len(g.inputs[0].shape) != 4:
            return None
        s = g.inputs[0].shape
        hw = (s[1], s[2]) if channels_last(model) else (s[2], s[3])
        return None if None in hw else (int(hw[0]), int(hw[1]))

    def check_inputs(self, inputs: Any) -> np.ndarray:
        """NumPy / backend-tensor float images as a NumPy array (NHWC as given; transposed by
        :meth:`to_model_input`)."""
        return float_images(inputs, lambda t: t if isinstance(t, np.ndarray) else autodiff().to_numpy(t),
                            "a Keras model must be a NumPy array or a tensor of Keras' backend of images (B, H, W, C)",
                            "x.astype('float32') / 255 or keras.applications' preprocess_input")

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
        return autodiff().call_context()

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
        with autodiff().no_grad():  # (the graph's own output tensors: not a CAM layer)
            final = {id(t) for t in tree.flatten(run_graph(model, layout.model_input(x[:1]), run))}
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
        """Record ``layers``' outputs in the next forward of ``model``; with ``grad`` set up for
        :meth:`target_gradients` (:mod:`.autodiff`: TF's tape watching only them, JAX's / torch's
        probes). Closed (and the tape / graph released) on exit."""
        if attention:
            raise ConfigError("attention methods (attention_rollout, attention_relevance) read a transformer's attention "
                              "probabilities, which camlens captures on PyTorch models only: they are not on Keras "
                              "models yet; explain a Keras model with a map method (gradcam, cam, scorecam, ...)")
        if full_graph:
            raise ConfigError("differentiable=True is not on Keras models yet")
        cap = KerasCapture(model, [n for n, _ in layers], grad, linear)
        cap.cut = downstream_cut(model, cap.names) if grad and autodiff().name == "tensorflow" else None
        stack = _captures()
        with autodiff().open(cap):
            stack.append(cap)
            try:
                yield cap
            finally:
                stack.remove(cap)

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
        """Per layer, ``dS[b, t] / dA[b]`` ``(B, T, C, h, w)`` for the T scores ``S (B, T)``: the resolved
        ``targets`` scored again on the backend's outputs, then all T targets' gradients at once
        (:meth:`.autodiff.Autodiff.jacobians`: TF graph models below a :class:`~.graph.Cut`, on T
        tiled copies, one backward; otherwise one vectorised Jacobian)."""
        if create_graph:
            raise ConfigError("differentiable=True is not on Keras models yet")
        cap = next((c for c in reversed(_captures()) if c.grad and c.tf_output is not None), None)
        if cap is None or targets is None:
            raise LayerRuntimeError("the Keras backend's target gradients need an open capture with grad=True and the "
                                    "resolved targets")
        gs = autodiff().jacobians(cap, targets, names, _checker(scores))  # (T, B, ...) each
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
                     if len(outs) == 1 and tuple(outs[0].shape) == head.shape and np.array_equal(autodiff().to_numpy(outs[0]), head)]
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


def _compiled(model: Any, shape: tuple, build: bool) -> Optional[Callable[[Any], Any]]:
    """The graph model's forward (logits: a final softmax / sigmoid left out, every layer
    ``training=False``) as a ``tf.function`` for inputs ``(N, *shape)`` (any N), if one was built —
    or ``build`` it now (a trace: about two forwards' time). TensorFlow only (``None`` otherwise)."""
    ad = autodiff()
    if ad.name != "tensorflow":
        return None
    try:
        memo = _COMPILED.setdefault(model, {})
    except TypeError:  # not weakly referenceable
        return None
    key = tuple(int(d) for d in shape)
    if key not in memo and build:
        ref = weakref.ref(model)  # (the memo must not keep the model alive)
        memo[key] = ad.compiled(lambda t: run_graph(ref(), t, GraphRun(frozenset())))
    return memo.get(key)


_DEFAULT: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # model -> {input shape: layer}

BACKEND = KerasBackend()
