"""Black-box models: any callable from a batch of images to scores, NumPy in, NumPy out.

An ONNX Runtime session (``lambda x: sess.run(None, {"input": x})[0]``), a scikit-learn pipeline
on pixels (``pipe.predict_proba``), a remote endpoint, a JAX function: camlens can only run such a
model forward, so it explains it with the methods that score perturbed inputs and nothing else
(occlusion, RISE / D-RISE, the centre prior, and any method declaring no layer, gradients, linear
head, attention or input gradients: :attr:`camlens.methods.Method.score_only`). The engine refuses
the others before any work, naming the ones that work (:func:`camlens.engine.passes.check_method`).

* what it takes: a :class:`CallableModel` (the callable with its input layout and largest batch),
  or any plain callable that no framework backend owns (functions, bound methods, objects with
  ``__call__`` that are not ``nn.Module`` / ``keras.Model``), wrapped for the call with the layout
  read from the inputs (:meth:`CallableBackend.adopt`);
* inputs: float images ``(B, C, H, W)`` or ``(B, H, W, C)`` as NumPy (or anything ``np.asarray``
  reads); the callable always gets float32 batches in the layout it was given, C-contiguous, at
  most ``batch_size`` images per call. ``layout=None`` (auto) reads a 4-D batch as channels-last
  when its last axis has 1, 3 or 4 entries and its second does not (``(B, 32, 32, 3)``), else as
  ``(B, C, H, W)`` (so an ambiguous ``(B, 3, 3, 3)`` is channels-first: pass ``layout=`` then);
* outputs: an array ``(B, K)`` (scores of K classes), ``(B,)`` (one value: regression), a dict
  ``{head: (B, K)}`` or a tuple / list of such arrays, as NumPy or anything ``np.asarray`` reads
  (nested lists from JSON included); the engine reads them as it reads a torch model's outputs,
  so targets (indices, ``categories=`` names, ``"head:class"``, callables, ``combine=``,
  ``top_k``) work unchanged;
* arrays at the engine are NumPy (``xp`` = NumPy's array-API namespace, ``ops`` = :class:`NumpyOps`).

The user's callable is never modified and keeps no state of camlens'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import array_api_compat.numpy as np_xp
import numpy as np

from ..core.errors import ConfigError, InputError, ModelError
from .base import PRECISION_NAMES, float_images
from .numpy import NumpyOps

__all__ = ["CallableModel", "CallableBackend", "BACKEND", "INPUT_LAYOUTS", "infer_layout"]

INPUT_LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class CallableModel:
    """A black-box model: ``fn(images) -> scores``, NumPy in, NumPy out.

    Attributes:
        fn: the callable; it gets float32 batches ``(N, C, H, W)`` (``layout="nchw"``) or
            ``(N, H, W, C)`` (``"nhwc"``) with ``N <= batch_size``, and returns ``(N, K)``, ``(N,)``,
            ``{head: (N, K)}`` or a tuple / list of arrays.
        layout: how the inputs given to ``camlens.explain`` hold their channels (the callable gets
            them so); ``None``: read from the inputs' shape (:func:`infer_layout`).
        batch_size: the most images the callable is given at once (every forward is chunked; the
            method's own ``batch_size=`` option can make chunks smaller, never larger).
        name: how messages name the model (default: the callable's ``__name__`` / type).
    """

    fn: Callable[[np.ndarray], Any]
    layout: Optional[str] = None
    batch_size: int = 32
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"CallableModel needs a callable images -> scores, got {type(self.fn).__name__}")
        if self.layout is not None and self.layout not in INPUT_LAYOUTS:
            raise ConfigError(f"CallableModel layout= takes one of {INPUT_LAYOUTS} or None (read from the inputs), "
                              f"got {self.layout!r}")
        if not (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size > 0):
            raise ConfigError(f"CallableModel batch_size= must be a positive int, got {self.batch_size!r}")

    def __call__(self, images: np.ndarray) -> Any:
        return self.fn(images)

    @property
    def label(self) -> str:
        return self.name or getattr(self.fn, "__qualname__", None) or type(self.fn).__name__


def infer_layout(shape: Sequence[int]) -> str:
    """``"nhwc"`` for a 4-D batch whose last axis has 1, 3 or 4 entries and whose second has not
    (``(B, 32, 32, 3)``), else ``"nchw"`` (the engine's own convention)."""
    return "nhwc" if len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "nchw"


def _black_box(model: Any, what: str) -> ModelError:
    """The error of a step a black-box callable cannot give (layers, gradients, weights)."""
    return ModelError(f"the model is a black-box callable ({_label(model)}: NumPy images in, scores out), so "
                      f"camlens cannot {what}: it can only run it forward. What works on it: methods that score "
                      "perturbed inputs (occlusion, drise (RISE for class targets), center, ...: the entries of "
                      "camlens.available_methods() with .score_only) and metrics that score perturbed inputs "
                      "(deletion, insertion, average_drop, road, ...); for layer / gradient methods and MPRT, pass "
                      "the framework model itself (an nn.Module / keras.Model)")


def _label(model: Any) -> str:
    if isinstance(model, CallableModel):
        return model.label
    return getattr(model, "__qualname__", None) or type(model).__name__


def _to_numpy(out: Any, n: int, model: Any) -> Any:
    """The callable's output for a batch of ``n`` as NumPy: an array, a dict / tuple / list of arrays.
    Floating arrays narrower than float32 are widened to float32; a leading axis other than ``n``
    is an error naming what came back."""
    if isinstance(out, Mapping):
        return {k: _to_numpy(v, n, model) for k, v in out.items()}
    if isinstance(out, (tuple, list)) and out and all(hasattr(v, "shape") for v in out):  # several heads
        heads = [_to_numpy(v, n, model) for v in out]
        return tuple(heads) if isinstance(out, tuple) else heads
    try:
        a = np.asarray(out)
    except Exception as err:
        raise ModelError(f"the black-box model {_label(model)} returned a {type(out).__name__}, which NumPy cannot "
                         "read as an array; return a NumPy array (N, K) / (N,) or a dict of them") from err
    if a.dtype == object or a.ndim == 0 or a.shape[0] != n:
        raise ModelError(f"the black-box model {_label(model)} returned shape {a.shape} (dtype {a.dtype}) for a batch "
                         f"of {n} images: it must return one row per image, (N, K) scores, (N,) values or a dict "
                         "{head: (N, K)}")
    if np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize < 4:
        a = a.astype(np.float32)
    return a


def _concat(parts: list) -> Any:
    """Chunk outputs (all of one structure) joined along the batch axis."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return np.concatenate(parts)


class CallableLayout:
    """The forward runner of a call: ``run(x (N, C, H, W)) -> output``, in chunks of at most the
    model's ``batch_size``, each transposed to the model's layout (a contiguous float32 copy)."""

    def __init__(self, model: CallableModel) -> None:
        self.model = model
        self.calls = 0

    def autocast(self, x: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def run(self, x: np.ndarray, score_only: bool = False) -> Any:
        m = self.model
        parts = []
        for i in range(0, x.shape[0], m.batch_size):
            chunk = x[i:i + m.batch_size]
            a = np.transpose(chunk, (0, 2, 3, 1)) if m.layout == "nhwc" else chunk
            self.calls += 1
            parts.append(_to_numpy(m.fn(np.ascontiguousarray(a, dtype=np.float32)), chunk.shape[0], m))
        return _concat(parts)


class CallableRunner:
    """Forwards beyond the first, NumPy in and out: ``scores(x, b, batch_size)`` (image ``b``'s target
    scores ``(N, T)`` of N inputs ``(N, C, H, W)``) and ``outputs(x, fn, batch_size)``; layer-replaced
    forwards and input gradients are errors (a black box has neither)."""

    def __init__(self, model: CallableModel, score: Callable[[Any, int], Any], layout: CallableLayout) -> None:
        self.model, self.score, self.layout = model, score, layout

    def scores(self, x: np.ndarray, b: int, batch_size: int = 32) -> np.ndarray:
        return np.concatenate([np.asarray(self.score(self.layout.run(x[i:i + batch_size]), b), dtype=np.float32)
                               for i in range(0, x.shape[0], batch_size)])

    def outputs(self, x: np.ndarray, fn: Callable[[Any], Any], batch_size: int = 32) -> list:
        return [fn(self.layout.run(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)]

    def scores_with_layer(self, layer: Any, acts: Any, x_b: Any, b: int, batch_size: int = 32) -> Any:
        raise _black_box(self.model, "replace a layer's output (Ablation-CAM)")

    def input_gradients(self, x: Any, b_scores: Any, guided: bool = False, non_relu: str = "error") -> Any:
        raise _black_box(self.model, "take input gradients (guided backprop)")


class _NoCapture:
    """The capture of a forward that records nothing (score-only methods name no layer)."""

    def __init__(self) -> None:
        self.activations: dict = {}
        self.calls: dict = {}
        self.layouts: dict = {}
        self.attentions = None
        self.attention_layout = None


class CallableBackend:
    """:class:`camlens.backends.base.Backend` for black-box callables (see the module docstring)."""

    name = "callable"
    xp = np_xp
    ops = NumpyOps()
    #: the engine refuses methods that need more than scores of perturbed inputs (Method.score_only)
    score_only = True

    def owns(self, model: Any) -> bool:
        """A :class:`CallableModel`, or a callable that is neither a class nor a loaded model (a
        ``camlens.models`` wrapper: ``model`` + ``preprocess``, which the engine unwraps)."""
        if isinstance(model, CallableModel):
            return True
        return callable(model) and not isinstance(model, type) and not (hasattr(model, "model")
                                                                          and hasattr(model, "preprocess"))

    def adopt(self, model: Any, inputs: np.ndarray) -> CallableModel:
        """The :class:`CallableModel` the engine runs for ``inputs`` (the checked batch as given): a
        plain callable wrapped, a model without a layout given the one read from ``inputs``."""
        m = model if isinstance(model, CallableModel) else CallableModel(model)
        if m.layout is None:
            m = replace(m, layout=infer_layout(inputs.shape))
        return m

    def images_in(self, inputs: Any) -> Any:
        return inputs

    def check_inputs(self, inputs: Any) -> np.ndarray:
        """Float images as a NumPy array, as given (transposed by :meth:`to_model_input`)."""
        return float_images(inputs, np.asarray, "a black-box model must be a NumPy array of images (B, C, H, W) or "
                            "(B, H, W, C)", "x.astype('float32') / 255")

    def input_rank(self, model: Any) -> Optional[int]:
        return 4

    def volume_layouts(self, model: Any, x: Any, names: list[str]) -> dict:
        raise ConfigError(f"the input has shape {tuple(x.shape)}: black-box callables are explained on images "
                          "(B, C, H, W) / (B, H, W, C) only")

    def to_model_input(self, model: CallableModel, x: np.ndarray, precision: str) -> np.ndarray:
        """The engine's ``(B, C, H, W)`` float32 batch (``x`` transposed once for a channels-last model)."""
        self._check_precision(precision)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 5:
            self.volume_layouts(model, x, [])
        return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))) if model.layout == "nhwc" and x.ndim == 4 else x

    @staticmethod
    def _check_precision(precision: str) -> None:
        if precision != "fp32":
            raise ConfigError(f"precision={precision!r}: a black-box callable runs in whatever precision it computes "
                              f"in (precisions: {PRECISION_NAMES}); pass precision='fp32'")

    def call_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def explain_failure(self, err: BaseException, model: Any) -> None:
        return None

    def graph(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def session(self, model: Any, *, eval_mode: bool = True, freeze: bool = True,
                restore_buffers: bool = True) -> contextlib.AbstractContextManager:
        """Nothing to set or restore: camlens only calls the callable."""
        return contextlib.nullcontext()

    def resolve_layers(self, model: Any, spec: Any) -> list:
        raise _black_box(model, f"read its layers (layer={spec!r})")

    def layer_names(self, model: Any) -> list[str]:
        return []

    def image_size(self, model: Any) -> Optional[tuple[int, int]]:
        return None

    def maximise(self, model: Any, terms: Sequence[Sequence[Any]], **kw: Any) -> tuple[Any, Any, Any]:
        raise _black_box(model, "optimise an image for it (camlens.visualize needs gradients)")

    def default_layer(self, model: Any, x: Any) -> str:
        raise _black_box(model, "read its layers")

    def layout(self, model: CallableModel, channels_last: Optional[bool], precision: str) -> CallableLayout:
        self._check_precision(precision)
        return CallableLayout(model)

    @contextlib.contextmanager
    def capture(self, model: Any, layers: Sequence[tuple[str, Any]], *, grad: bool, linear: bool,
                full_graph: bool, attention: bool = False):
        """Nothing to capture: any layer, gradient, linear head or attention asked for is an error."""
        for asked, what in ((layers, "read its layers"), (grad, "take gradients"), (full_graph, "take gradients"),
                            (linear, "read its linear head (CAM)"), (attention, "read its attention")):
            if asked:
                raise _black_box(model, what)
        yield _NoCapture()

    def check_capture(self, cap: Any, layers: Sequence[tuple[str, Any]], model: Any, x: Any,
                      read: Optional[Any] = None) -> None:
        if layers or read:
            raise _black_box(model, "read its layers")

    def target_gradients(self, scores: Any, acts: Sequence[Any], names: Sequence[str], labels: Sequence[str], *,
                         create_graph: bool = False, targets: Any = None) -> list:
        raise ModelError("a black-box callable has no gradients")

    def runner(self, model: CallableModel, score_image: Callable[[Any, int], Any], layout: CallableLayout,
               targets: Optional[list] = None) -> CallableRunner:
        return CallableRunner(model, score_image, layout)

    def linear_head(self, cap: Any, head: Any, acts: Any, layer: str, model: Any, head_name: str) -> Any:
        raise _black_box(model, "read its linear head (CAM)")

    def randomized_copy(self, model: Any, layers: Sequence[str], seed: int) -> Any:
        raise _black_box(model, "re-draw its weights (the MPRT sanity check)")

    def layer_order(self, model: Any, x: Any) -> list[str]:
        raise _black_box(model, "list its layers (the MPRT sanity check)")

    def reinitialise_layers(self, model: Any, layers: Sequence[str], seed: int) -> None:
        raise _black_box(model, "re-draw its weights (the MPRT sanity check)")


BACKEND = CallableBackend()
