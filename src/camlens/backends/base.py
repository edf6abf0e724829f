"""The backend contract: everything framework-specific behind one protocol.

camlens' engine (:mod:`camlens.engine`) and its maths (methods, metrics, post-processing) talk to a
model only through a :class:`Backend`, chosen from the model's type by :func:`get_backend`. A
backend owns the framework: it restores the model's state after a call, captures layer outputs,
takes batched target gradients (optionally differentiable), runs score-only and layer-replaced
forwards, input gradients (guided or not), finds the linear head for CAM, makes randomised copies
for MPRT, and converts its arrays to NumPy.

Array maths uses the backend's array namespace ``backend.xp``: the Python array API standard
(https://data-apis.org/array-api/) through ``array-api-compat`` (``array_api_compat.torch`` for
PyTorch; NumPy, JAX, CuPy have namespaces of their own). Why the standard and not an ops protocol
of our own: methods written against it run unchanged on any compliant array library (a Keras/TF
backend can hand over ``jax``/``numpy`` arrays or convert at its boundary), its semantics (dtype
promotion, broadcasting, ``axis=`` reductions) are specified and tested by others, and for torch
tensors the namespace calls torch's own kernels, so no speed is lost. What the standard lacks and
the maths needs — bilinear resizing, top-k, quantiles along an axis, seeded Gaussian noise —
is the small :class:`Ops` extension each backend provides as ``backend.ops``.

This module imports no framework; the shape rules below (:func:`layout_problem`) are shared by
every backend.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import array_api_compat  # (imports no array library itself)
import numpy as np

from ..core.errors import ConfigError, ConfigTypeError, InputTypeError, LayerError, MissingDependencyError, ModelError

__all__ = ["PRECISION_NAMES", "Backend", "Ops", "namespace", "ops_for", "to_float32", "bilinear_matrix", "extreme_rows", "get_backend", "register_backend", "available_backends", "layout_problem", "unguided_error",
           "looks_channels_last", "grid_fits"]


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays`` (``array_api_compat.torch`` for torch tensors, the
    NumPy one for NumPy arrays, ...): what methods and metrics compute with. Cached per array
    type (the per-call cost is one dict lookup)."""
    kind = type(arrays[0])
    for a in arrays:
        if type(a) is not kind:
            return array_api_compat.array_namespace(*arrays)
    found = _NS_BY_TYPE.get(kind)
    if found is None:
        found = _NS_BY_TYPE[kind] = _backend_namespace(kind) or array_api_compat.array_namespace(*arrays)
    return found


def _backend_namespace(kind: type) -> Any:
    """The ``xp`` of the backend whose framework defines ``kind`` (its own, faster namespace), or ``None``."""
    root = kind.__module__.split(".")[0]
    name = next((n for n, (roots, _) in _BACKENDS.items() if root in roots), None)
    return _load(name).xp if name is not None else None


_NS_BY_TYPE: dict[type, Any] = {}

#: The precisions a call can run the model's forwards in (``explain(precision=...)``); every backend
#: takes these names (the torch one maps them to ``torch.autocast`` dtypes).
PRECISION_NAMES = ("fp32", "fp16", "bf16")


def to_float32(x: Any) -> Any:
    """``x`` as float32 (no copy, no dispatch when it is float32 already)."""
    xp = namespace(x)
    return x if x.dtype == xp.float32 else xp.astype(x, xp.float32)


@runtime_checkable
class Ops(Protocol):
    """Array operations the maths needs beyond the array API standard (arrays of one backend)."""

    def resize(self, maps: Any, size: tuple[int, int], mode: str = "bilinear") -> Any:
        """``(..., h, w) -> (..., H, W)``; bilinear with ``align_corners=False`` (half-pixel centres).
        A 3-entry ``size`` ``(D, H, W)`` resizes volumes ``(..., d, h, w)`` trilinearly (the same
        convention along each axis, as ``F.interpolate(mode="trilinear")``), or with ``mode="nearest"``
        as ``F.interpolate(mode="nearest")`` (source index ``floor(i * d / D)``); other modes: trilinear."""

    def resize_matrices(self, h: int, w: int, H: int, W: int, like: Any) -> tuple[Any, Any]:
        """``(Ry (H, h), Rx^T (w, W))`` in ``like``'s dtype and device (read-only, cached): a bilinear
        resize of ``(..., h, w)`` maps is ``Ry @ m @ Rx^T`` (rows of :func:`bilinear_matrix`)."""

    def has_graph(self, x: Any) -> bool:
        """Does ``x`` record an autograd graph (so maths on it must stay differentiable)?"""

    def clip_(self, x: Any, lo: float, hi: float) -> Any:
        """``clip(x, lo, hi)`` in place where the framework allows it (a fresh array is a page-faulting
        allocation for full-size maps); returns the result."""

    def softmax(self, x: Any, axis: int = -1) -> Any:
        """``exp(x) / sum(exp(x))`` along ``axis`` (the framework's stable kernel)."""

    def sigmoid(self, x: Any) -> Any:
        """``1 / (1 + exp(-x))`` elementwise (multi-label probabilities), without overflow."""

    def detach(self, x: Any) -> Any:
        """``x`` without its autograd graph (the same values, no copy where possible)."""

    def to_list(self, x: Any) -> list:
        """The values of ``x`` as a flat Python list (one copy to the host)."""

    def extrema(self, x: Any) -> tuple[float, float]:
        """``(min, max)`` of all of ``x``'s values as host floats (NaN if any value is NaN)."""

    def topk(self, x: Any, k: int, axis: int = -1) -> tuple[Any, Any]:
        """The ``k`` largest values along ``axis`` and their indices, largest first."""

    def quantile(self, x: Any, q: float, axis: int = -1) -> Any:
        """The ``q`` quantile along ``axis`` (linear interpolation), the axis removed."""

    def to_numpy(self, x: Any) -> Any:
        """A NumPy copy (or view) of ``x``, detached from any graph."""

    def asarray(self, x: Any, like: Any) -> Any:
        """``x`` (NumPy or nested lists) as an array of ``like``'s backend, device and dtype kind."""

    # --- for metrics/
    def device_type(self, x: Any) -> str:
        """The kind of device holding ``x``: ``"cpu"``, ``"cuda"``, ``"mps"``, ... (solver and dtype choices)."""

    def generator(self, seed: Optional[int], like: Any = None) -> Any:
        """A random stream on ``like``'s device (the CPU when ``like`` is ``None``) seeded with ``seed``;
        ``seed=None``: the framework's global stream on that device. Successive :meth:`random` calls
        on one stream continue it."""

    def random(self, shape: Sequence[int], generator: Any, like: Any, normal: bool = False) -> Any:
        """Float32 draws of ``shape`` from ``generator`` on the generator's device, uniform on [0, 1)
        (``normal=True``: standard normal), returned on ``like``'s device and dtype (so one seed gives
        the same numbers whatever ``like`` is)."""

    def separable_filter(self, x: Any, k_w: Any, k_h: Any, padding: str) -> Any:
        """Each ``(H, W)`` plane of ``x`` ``(..., H, W)`` correlated with the 1-D kernel ``k_w`` ``(kw,)``
        along W, then with ``k_h`` ``(kh,)`` along H (odd lengths, ``x``'s float dtype), after padding
        each side by ``kw // 2`` / ``kh // 2`` (``padding``: ``"reflect"`` or ``"replicate"``); same shape."""

    def box_mean(self, x: Any, radius: int) -> Any:
        """Mean of each ``(2 r + 1)^2`` window of the ``(H, W)`` planes of ``x`` ``(..., H, W)`` over its
        in-image pixels only (out-of-image ones are not counted), centred on every pixel; same shape."""

    def average_ranks(self, x: Any) -> Any:
        """Ranks ``(N, P)`` float64 of each row of ``x`` ``(N, P)``, 0-based, ties sharing their average
        rank (``scipy.stats.rankdata(method="average") - 1`` per row; Spearman's rho)."""

    # --- for methods/
    def resize_corners(self, maps: Any, size: tuple[int, int]) -> Any:
        """``(..., h, w) -> (..., H, W)`` bilinear with ``align_corners=True`` (corner pixels aligned:
        source ``d * (h - 1) / (H - 1)``, as ``nn.UpsamplingBilinear2d``; Score-CAM's masks), in
        ``maps``' float dtype; bit-exact with the framework's own kernel, so a constant map stays
        exactly constant wherever the framework's does."""

    def set_at(self, x: Any, index: tuple, values: Any) -> Any:
        """``x[index] = values`` for an ``index`` tuple of integer arrays and/or slices (NumPy's
        advanced indexing, the arrays broadcast together), which the standard's ``__setitem__`` lacks;
        in place where the framework allows it (pass a fresh array, e.g. a copy), the updated array
        returned (e.g. Ablation-CAM's copies: ``set_at(copies, (arange(k), channels), v)``)."""

    # --- for fronts/
    def top_mask(self, x: Any, k: int) -> Any:
        """Boolean mask of ``x``'s shape, True at the ``k`` largest entries along the last axis: the
        ones :meth:`topk` picks (ties broken as it breaks them), in one scatter (top-fraction masks)."""

    def to_file(self, x: Any) -> tuple[np.ndarray, str, str]:
        """``(values, dtype, device)`` to save ``x`` in a file: a host NumPy array holding ``x``'s values bit
        for bit (detached, dense; a dtype NumPy lacks widened losslessly, e.g. bfloat16 / float8 to
        float32, complex32 to complex64), the framework's dtype name (``"torch.bfloat16"``: framework
        name, a dot, the dtype) and device name (``"cuda:0"``). A ``TypeError`` when NumPy cannot hold
        the dtype at all."""

    def from_file(self, values: np.ndarray, dtype: str, device: Any = None) -> Any:
        """The array :meth:`to_file` saved: ``values`` cast back to the dtype named ``dtype`` (bit for
        bit) on ``device`` (``None``: the CPU). A ``LookupError`` (message: why, e.g. ``"unknown to this
        PyTorch 2.4"``) when this framework has no dtype of that name."""

    def is_out_of_memory(self, err: BaseException) -> bool:
        """Is ``err`` this framework's out-of-memory error (device or host)?"""


@runtime_checkable
class Backend(Protocol):
    """What the engine needs from a framework. Shapes: B images, T targets, C channels.

    Attributes:
        name: ``"torch"``, ``"keras"``, ...
        xp: the array-API namespace of the backend's arrays.
        ops: the :class:`Ops` the standard lacks.
    """

    name: str
    xp: Any
    ops: Ops

    def owns(self, model: Any) -> bool:
        """Is ``model`` one of this framework's models?"""

    def images_in(self, inputs: Any) -> Any:
        """For a loaded model: framework image arrays (uint8 ``(B, 3, H, W)``) as a list of ``(H, W, 3)``
        NumPy images its preprocessing takes; anything else unchanged."""

    def maximise(self, model: Any, terms: Sequence[Sequence[Any]], **kw: Any) -> tuple[Any, Any, Any]:
        """Activation maximisation for :func:`camlens.visualize` (torch and Keras; a black box refuses):
        one image per objective (a list of weighted terms), all in one batch; returns ``(images (N, 3, H,
        W) in [0, 1], final values (N,), history (steps, N))``; the model is left exactly as given."""

    def layer_names(self, model: Any) -> list[str]:
        """The layer names an objective may give (torch: dotted module names; Keras: layer paths and the
        bare names unique across the nesting), for :func:`camlens.visualize` to tell ``"layer:channel"``
        from a class target."""

    def image_size(self, model: Any) -> Optional[tuple[int, int]]:
        """The ``(H, W)`` the model's input is fixed to (a Keras ``Input`` shape), else ``None``: the
        default image size of :func:`camlens.visualize` for a plain model."""

    def check_inputs(self, inputs: Any) -> Any:
        """The input array of a plain model: the framework's float array (a clear error otherwise);
        arrays that cannot record a graph (torch inference tensors) are copied."""

    def input_rank(self, model: Any) -> Optional[int]:
        """The rank of a batch ``model`` takes where its layers say (5: a 3-D CNN taking
        ``(B, C, D, H, W)``, so a 4-D input is one volume; 4: images), else ``None``; cheap after the
        first call (optional: the engine reads inputs by their own rank without it)."""

    def volume_layouts(self, model: Any, x: Any, names: list[str]) -> dict[str, MapLayout]:
        """For a volume input ``x`` ``(B, C, D, H, W)``: layer name -> how its output holds the 3-D map
        (a :class:`MapLayout` of a :data:`VOLUME_KINDS` kind, with its grid where known); optional:
        without it every layer is read as ``(B, C, d, h, w)``."""

    def to_model_input(self, model: Any, x: Any, precision: str) -> Any:
        """``x`` on the model's device in the dtype of its weights (``precision`` may leave it to autocast)."""

    def call_context(self) -> contextlib.AbstractContextManager:
        """The framework modes a call needs around everything it does (torch: inference mode off)."""

    def explain_failure(self, err: BaseException, model: Any) -> None:
        """Raise a clear error for a framework failure whose cause can be named (e.g. a model whose
        weights cannot be differentiated); return to let ``err`` propagate."""

    def graph(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Record an autograd graph in the block (``True``) or not (``False``)."""

    def session(self, model: Any, *, eval_mode: bool = True, freeze: bool = True,
                restore_buffers: bool = True) -> contextlib.AbstractContextManager:
        """Put ``model`` in the state a call needs; restore modes, trainable flags, buffers on exit
        (also on errors)."""

    def resolve_layers(self, model: Any, spec: Any) -> list[tuple[str, Any]]:
        """Layer names or layer objects -> ``(dotted name, layer)`` pairs; unknown names list close ones."""

    def default_layer(self, model: Any, x: Any) -> str:
        """The layer used when none is given (the last spatial ``(B, C, h, w)`` output)."""

    def layout(self, model: Any, channels_last: Optional[bool], precision: str) -> Any:
        """The forward runner of a call: ``.run(x, score_only=False)`` under its precision/layout."""

    def capture(self, model: Any, layers: Sequence[tuple[str, Any]], *, grad: bool, linear: bool,
                full_graph: bool, attention: bool = False) -> contextlib.AbstractContextManager:
        """Hook ``layers`` for one forward; yields a capture with ``activations`` (name -> array),
        ``calls`` and, with ``linear=True``, each dense layer's (input, output). With
        ``attention=True`` also ``attentions``: the probabilities ``softmax(q k^T * scale + mask)``
        ``(B, heads, N, N)`` of every attention call of the forward, in call order, whatever kernel
        the model uses (fused ones routed through plain maths for the block, the output unchanged);
        with ``grad`` they are graph nodes, so :meth:`target_gradients` can differentiate w.r.t.
        them. Everything patched is restored on exit, also after an error."""

    def check_capture(self, cap: Any, layers: Sequence[tuple[str, Any]], model: Any, x: Any,
                      read: Optional[Any] = None) -> None:
        """One clear error when a layer did not run once or its output is no map of the batch; sets
        ``cap.layouts`` for channels-last / token layers (``read``: layer -> the user's layout,
        :func:`override_layout`); with ``attention=True``, when no attention call ran or one is not
        global self-attention over the same tokens of the batch, and otherwise sets
        ``cap.attention_layout`` (a :class:`MapLayout` of kind ``"tokens"``: prefix count and patch grid)."""

    def target_gradients(self, scores: Any, acts: Sequence[Any], names: Sequence[str], labels: Sequence[str], *,
                         create_graph: bool = False, targets: Any = None) -> list[Any]:
        """Per activation ``(B, C, h, w)``, the gradients ``(B, T, C, h, w)`` of the T scores ``(B, T)``,
        in one batched backward; ``create_graph`` keeps them differentiable. ``targets``: the resolved
        rows (B lists of T targets) the scores were computed from, for a backend whose engine-side
        arrays are host copies without a graph (Keras: NumPy), which evaluates them again on its
        framework's outputs inside its tape; a backend whose scores carry their graph ignores it."""

    def runner(self, model: Any, score_image: Callable[[Any, int], Any], layout: Any, targets: Any = None) -> Any:
        """Passes beyond the first: ``scores(x, b)``, ``scores_with_layer(layer, acts, x_b, b)``,
        ``input_gradients(x, fn, guided)``. ``targets``: the resolved rows, as for
        :meth:`target_gradients` (a backend without graphs on the engine's arrays needs them for
        its input gradients)."""

    def linear_head(self, cap: Any, head: Any, acts: Any, layer: str, model: Any, head_name: str) -> Any:
        """The weight ``(K, C)`` of the dense layer that maps ``GAP(acts)`` to ``head`` (CAM); an error
        saying why when there is none."""

    def randomized_copy(self, model: Any, layers: Sequence[str], seed: int) -> Any:
        """A copy of ``model`` with the parameters of ``layers`` (dotted names) re-drawn (MPRT)."""

    # optional (the black-box backend, :mod:`camlens.backends.callable`):
    # ``adopt(model, inputs) -> model``: the model object the engine runs for these checked inputs
    #   (:func:`camlens.engine.passes.prepare`; a plain callable wrapped with the inputs' layout);
    # ``score_only = True``: only methods that score perturbed inputs work (``Method.score_only``),
    #   the engine refuses the others before any work, listing those that work.

    # --- for metrics/
    def layer_order(self, model: Any, x: Any) -> list[str]:
        """Dotted names of the layers that own parameters (not counting their sub-layers') and run on
        ``x``, in order of their first call (input side first); ``""`` is the model itself. One
        forward, no gradients; the model is left as it was."""

    def reinitialise_layers(self, model: Any, layers: Sequence[str], seed: int) -> None:
        """Re-draw the own parameters of ``layers`` (dotted names) of ``model`` IN PLACE, the i-th with
        seed ``seed + i``, as :meth:`randomized_copy` does on its copy; only for a model the caller owns
        (one from :meth:`randomized_copy`). The global random state is left as it was."""


# ----------------------------------------------------------------------------------------------
# choosing a backend from the model's type

_BACKENDS: dict[str, tuple[tuple[str, ...], str]] = {
    # name -> (top-level modules whose classes it owns, module that defines BACKEND)
    "torch": (("torch",), "camlens.backends.torch"),
    # Keras 3 models (keras.Model, on the TensorFlow backend); its engine-side arrays are NumPy
    "keras": (("keras",), "camlens.backends.keras"),
    # black boxes: camlens.CallableModel, and any other callable no backend above owns (get_backend's
    # fallback); NumPy in, scores out, score-only methods
    "callable": ((), "camlens.backends.callable"),
}
_FALLBACK = "callable"  # the backend asked last, for a model whose classes no backend's packages define
_LOADED: dict[str, Backend] = {}


def register_backend(name: str, roots: Sequence[str], module: str) -> None:
    """Declare a backend: it owns models whose class (or a base class) is defined under one of the
    top-level packages ``roots``; ``module`` defines ``BACKEND`` and is imported on first use."""
    _BACKENDS[name] = (tuple(roots), module)


def available_backends() -> list[str]:
    return list(_BACKENDS)


def _load(name: str) -> Backend:
    if name not in _LOADED:
        import importlib

        roots, module = _BACKENDS[name]
        try:
            _LOADED[name] = importlib.import_module(module).BACKEND
        except ModuleNotFoundError as err:
            raise MissingDependencyError(f"the {name} backend needs {err.name!r}, which is not installed: "
                                         f"pip install 'camlens[{name}]'") from err
    return _LOADED[name]


_BY_TYPE: dict[type, Backend] = {}


def get_backend(model: Any) -> Backend:
    """The backend that owns ``model``, from its type (and base classes); no framework is imported
    unless the model's own module already imported it. The most derived class decides: the MRO is
    read in order, so a ``keras.Model`` under Keras' torch backend (also an ``nn.Module``) is Keras'.
    A callable no backend owns (a function, a bound method such as an sklearn pipeline's
    ``predict_proba``, an object with ``__call__``) gets the black-box backend
    (:mod:`camlens.backends.callable`: NumPy in, scores out, score-only methods)."""
    found = _BY_TYPE.get(type(model))
    if found is not None:
        return found
    tried: set[str] = set()
    for cls in type(model).__mro__:
        root = cls.__module__.split(".")[0]
        name = next((n for n, (owned, _) in _BACKENDS.items() if root in owned), None)
        if name is None or name in tried:
            continue
        tried.add(name)
        backend = _load(name)  # (the model's class is defined there, so that framework is imported)
        if backend.owns(model):
            _BY_TYPE[type(model)] = backend
            return backend
    if callable(model) and not isinstance(model, type) and _FALLBACK in _BACKENDS and _FALLBACK not in tried:
        backend = _load(_FALLBACK)  # a plain callable (function, bound method, object with __call__)
        if backend.owns(model):
            _BY_TYPE[type(model)] = backend
            return backend
    known = ", ".join(f"{n} ({'/'.join(r)})" for n, (r, _) in _BACKENDS.items())
    raise ConfigTypeError(f"model must be an nn.Module, a Keras 3 keras.Model, a camlens LoadedModel "
                          f"(camlens.models.load(...)) or a callable images -> scores (NumPy in, NumPy out; e.g. "
                          f"an sklearn pipeline's predict_proba, or lambda x: session.run(None, {{'input': x}})[0] "
                          f"for ONNX Runtime), got {type(model).__module__}.{type(model).__name__}: "
                          f"no camlens backend takes it (backends: {known})")


_OPS_BY_TYPE: dict[type, Ops] = {}


def ops_for(x: Any) -> Ops:
    """The :class:`Ops` for arrays like ``x``: the owning backend's for framework arrays (a torch
    tensor: :class:`camlens.backends.torch.ops.TorchOps`), :class:`camlens.backends.numpy.NumpyOps`
    for NumPy arrays."""
    found = _OPS_BY_TYPE.get(type(x))
    if found is not None:
        return found
    root = type(x).__module__.split(".")[0]
    if root == "numpy":
        from .numpy import NumpyOps

        found = NumpyOps()
    else:
        name = next((n for n, (roots, _) in _BACKENDS.items() if root in roots), None)
        if name is None:
            raise ConfigTypeError(f"no camlens backend handles arrays of type {type(x).__module__}.{type(x).__name__}; "
                                  "pass torch tensors or NumPy arrays")
        found = _load(name).ops
    _OPS_BY_TYPE[type(x)] = found
    return found


# ----------------------------------------------------------------------------------------------
# the resize convention every backend shares (NumPy, float64)

def _source_index(n_in: int, n_out: int) -> np.ndarray:
    """Fractional source position of each output, ``max((d + 0.5) * n_in / n_out - 0.5, 0)``."""
    return np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)


@functools.lru_cache(maxsize=128)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``R`` ``(n_out, n_in)`` float64 with ``R @ v`` = 1-D bilinear resize of ``v``, ``align_corners=False``
    (read-only).

    PyTorch's source index: ``s = max((d + 0.5) * n_in / n_out - 0.5, 0)``, ``i0 = floor(s)``,
    ``i1 = min(i0 + 1, n_in - 1)``, ``out[d] = (1 - l) v[i0] + l v[i1]`` with ``l = s - i0``.
    """
    return _interpolation_matrix(_source_index(n_in, n_out), n_in)


@functools.lru_cache(maxsize=128)
def corner_matrix(n_in: int, n_out: int) -> np.ndarray:
    """:func:`bilinear_matrix` with ``align_corners=True``: source ``s = d (n_in - 1) / (n_out - 1)``."""
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return _interpolation_matrix(np.arange(n_out, dtype=np.float64) * step, n_in)


def _interpolation_matrix(s: np.ndarray, n_in: int) -> np.ndarray:
    """``R`` ``(len(s), n_in)`` (read-only): output ``d`` is ``(1 - l) v[i0] + l v[i1]`` at the fractional
    source ``s[d]``, ``i0 = floor(s)``, ``i1 = min(i0 + 1, n_in - 1)``, ``l = s - i0``."""
    n_out = s.shape[0]
    i0 = np.minimum(np.floor(s).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = s - i0
    r = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(r, (np.arange(n_out), i0), 1 - lam)
    np.add.at(r, (np.arange(n_out), i1), lam)
    r.flags.writeable = False
    return r


@functools.lru_cache(maxsize=128)
def extreme_rows(n_in: int, n_out: int) -> tuple[int, ...]:
    """Output indices where a bilinear resize can reach its min or max along one axis.

    Outputs that share the source cell ``i0`` are ``(1 - l) v[i0] + l v[i1]`` with ``l`` rising
    with ``d``: monotone in ``d``, so within a cell the extremes are its first and last output.
    """
    i0 = np.floor(_source_index(n_in, n_out)).astype(np.int64).tolist()
    keep = {0, n_out - 1}
    keep.update(d for d in range(1, n_out) if i0[d] != i0[d - 1])
    keep.update(d - 1 for d in range(1, n_out) if i0[d] != i0[d - 1])
    return tuple(sorted(keep))


# ----------------------------------------------------------------------------------------------
# shape rules shared by every backend (plain integers, no arrays)

@functools.lru_cache(maxsize=1024)
def grid_fits(h: int, w: int, size: tuple[int, int]) -> bool:
    """Can ``(h, w)`` be the input ``size`` divided by one stride, each side rounded (±1)?
    (Plain integers in, so memoised: the per-call check of every captured layer.)"""
    H, W = size
    if h < 1 or w < 1:
        return False
    lo = max(H / (h + 1), W / (w + 1))
    hi = min(H / (h - 1) if h > 1 else float("inf"), W / (w - 1) if w > 1 else float("inf"))
    return lo <= hi


def looks_channels_last(shape: Sequence[int], size: tuple[int, int]) -> bool:
    """A 4-D ``(B, h, w, C)`` output: dims 1-2 fit the input's grid at one stride, dims 2-3 do not.

    E.g. Swin's ``(B, 7, 7, 768)`` for a 224x224 input; a real ``(B, C, h, w)`` map never has
    ``(h, w) = (7, 768)``. When both readings fit (small C), it is read as ``(B, C, h, w)``.
    """
    return len(shape) == 4 and grid_fits(shape[1], shape[2], size) and not grid_fits(shape[2], shape[3], size)


def unguided_error(kinds: set, model: str = "model's backward") -> ModelError:
    """The error of a guided backprop through activations other than ReLUs (``kinds``: their names),
    for every backend: the rule is defined for ReLU networks, and the result would be a plain gradient."""
    return ModelError(f"guided backpropagation is defined for ReLU networks (Springenberg et al.), but this {model} "
                      f"also runs {', '.join(sorted(kinds))}: their gradients would pass unguided, a plain gradient "
                      "under guided backprop's name. Use method='gradcam' (or another CAM), 'occlusion' or 'scorecam' "
                      "on this model, or non_relu='plain' to guide only its ReLUs and pass the other activations' "
                      "gradients as they are")


def float_images(inputs: Any, to_numpy: Callable[[Any], np.ndarray], takes: str, scaling: str) -> np.ndarray:
    """``inputs`` as a NumPy array of floating-point images (backends that hand the engine NumPy), or an
    :class:`InputTypeError` naming what was given: ``takes`` completes "inputs for ..." with what the
    model accepts (``"a Keras model must be a NumPy array ... (B, H, W, C)"``), ``scaling`` says how to
    make floats (``"x.astype('float32') / 255"``)."""
    try:
        a = to_numpy(inputs)
    except Exception as err:
        raise InputTypeError(f"inputs for {takes}, got {type(inputs).__name__}") from err
    if not np.issubdtype(a.dtype, np.floating):
        raise InputTypeError(f"inputs must be floating point images preprocessed as the model expects, got dtype "
                             f"{a.dtype}; e.g. {scaling}")
    return a


def layout_problem(shape: Sequence[int], batch: int, size: tuple[int, int]) -> Optional[str]:
    """Why a layer output of ``shape`` is not a ``(B, C, h, w)`` map camlens can read, or ``None``.

    ``batch``: the input's B; ``size``: the input's (H, W).
    """
    return _layout_problem(tuple(shape), batch, tuple(size))


@functools.lru_cache(maxsize=1024)
def _layout_problem(shape: tuple[int, ...], batch: int, size: tuple[int, int]) -> Optional[str]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or shape[0] != batch:
        lead = shape[0] if shape else "none"
        return (f"its leading dimension ({lead}) is not the batch of the input ({batch}): one row per image is "
                "needed, not per proposal/window/token")
    if len(shape) == 2:
        return "it is a vector per image (B, C) with no spatial grid (a pooled or classifier layer)"
    if len(shape) == 3:
        return (f"it looks like tokens (B, N, C), but no count of prefix tokens (0-{MAX_PREFIX_TOKENS}) leaves "
                f"patches that form a grid fitting the {size[0]}x{size[1]} input")
    if len(shape) != 4:
        return f"it is {len(shape)}-D"
    if looks_channels_last(shape, size):
        return ("it looks channels-last (B, h, w, C) (e.g. Swin stages), and reading it as "
                "(B, C, h, w) would give a wrong map")
    return None


__all__ += ["MapLayout", "read_layout", "override_layout", "LAYOUT_KINDS", "VOLUME_KINDS", "volume_readings",
            "token_volume_grids"]


@dataclass(frozen=True)
class MapLayout:
    """How a layer output that is not ``(B, C, h, w)`` holds a feature map.

    ``kind``: ``"nhwc"`` (``(B, h, w, C)``, e.g. Swin / ConvNeXt blocks) or ``"tokens"``
    (``(B, N, C)``: ``prefix`` class / distillation / register tokens first, then the ``grid``
    patches row by row, e.g. ViT, DeiT, Mixer), or ``"reshape"`` (a user's ``fn(a) -> (B, C, h, w)``,
    e.g. a pytorch-grad-cam ``reshape_transform``), or ``"volume"`` (a 3-D map ``(B, C, d, h, w)`` of a
    volume / clip input, ``grid`` = ``(d, h, w)``: read as ``(B, C, d, h*w)``, which the methods that
    only reduce over all positions or work element-wise treat exactly as the volume), or
    ``"volume-last"`` (a channels-last 3-D map ``(B, d, h, w, C)``, e.g. torchvision Swin3D stages:
    ``grid`` = ``(d, h, w)``, read as ``(B, C, d, h*w)`` by a permutation), or ``"volume-tokens"``
    (tokens ``(B, P + d*h*w, C)`` of a clip: ``prefix`` = P class tokens first, then the ``grid``
    ``(d, h, w)`` patches in ``(t, h, w)`` raster order, e.g. torchvision MViT blocks; read as
    ``(B, C, d, h*w)``).
    :func:`camlens.core.layouts.to_map` reads it as ``(B, C, h, w)``. Given to ``explain(layout=...)``, ``grid`` and ``prefix`` may be left ``None``
    (found from the output's shape, see :func:`override_layout`)."""

    kind: str
    grid: Optional[tuple[int, ...]] = None
    prefix: Optional[int] = None
    fn: Optional[Callable[[Any], Any]] = field(default=None, compare=False)


MAX_PREFIX_TOKENS = 8  # class + distillation + up to 6 register tokens, when the model does not say


def read_layout(shape: Sequence[int], batch: int, size: tuple[int, int],
                prefix: Optional[int] = None) -> Optional[MapLayout]:
    """The :class:`MapLayout` of a channels-last or token layer output of the input's batch, or
    ``None`` (NCHW, or not readable as a map).

    Tokens ``(B, N, C)``: the prefix count is ``prefix`` when the model says (timm's
    ``num_prefix_tokens``, torchvision's class token), else the smallest ``P <= 8`` for which
    ``N - P`` patches form a grid ``h x w`` that fits the input at one stride (:func:`grid_fits`),
    the grid closest to the input's aspect ratio; ``None`` when no count fits.
    """
    return _read_layout(tuple(int(d) for d in shape), int(batch), (int(size[0]), int(size[1])), prefix)


@functools.lru_cache(maxsize=1024)
def _read_layout(shape: tuple[int, ...], batch: int, size: tuple[int, int],
                 prefix: Optional[int]) -> Optional[MapLayout]:
    if not shape or shape[0] != batch:
        return None
    if len(shape) == 4 and looks_channels_last(shape, size):
        return MapLayout("nhwc", (shape[1], shape[2]), 0)
    if len(shape) != 3:
        return None
    N = shape[1]
    for P in ([prefix] if prefix is not None else range(MAX_PREFIX_TOKENS + 1)):
        n = N - P
        fits = [(h, n // h) for h in range(1, n + 1) if n % h == 0 and grid_fits(h, n // h, size)]
        if fits:
            H, W = size
            h, w = min(fits, key=lambda g: abs(math.log((g[0] / g[1]) / (H / W))))
            return MapLayout("tokens", (h, w), P)
    return None


LAYOUT_KINDS = ("nchw", "nhwc", "tokens")
VOLUME_KINDS = ("volume", "volume-last", "volume-tokens")  # 3-D maps of a (B, C, D, H, W) input


def volume_readings(shape: Sequence[int], size: tuple[int, int, int]) -> tuple[bool, bool]:
    """Which readings of a 5-D output fit a volume input of ``size`` ``(D, H, W)``:
    ``(B, C, d, h, w)`` (first) and channels-last ``(B, d, h, w, C)`` (second). A reading fits when
    its ``d <= D`` (clips are often strided in time unlike in space, so ``d`` has its own stride) and
    its ``(h, w)`` is ``(H, W)`` at one stride (:func:`grid_fits`). E.g. Swin3D-T's last stage on a
    8x64x64 clip, ``(B, 4, 2, 2, 768)``: only channels-last fits (``(h, w) = (2, 768)`` does not)."""
    D, H, W = (int(s) for s in size)
    s = tuple(int(v) for v in shape)
    if len(s) != 5:
        return False, False
    return (1 <= s[2] <= D and grid_fits(s[3], s[4], (H, W)),
            1 <= s[1] <= D and grid_fits(s[2], s[3], (H, W)))


def token_volume_grids(n: int, size: tuple[int, int, int],
                       prefix: Optional[int] = None) -> tuple[Optional[int], list[tuple[int, int, int]]]:
    """The shape search for tokens ``(B, n, C)`` of a clip of ``size`` ``(D, H, W)``: the first prefix
    count ``P`` (``prefix``, else 0..8) for which some ``(t, h, w)`` with ``t*h*w = n - P``, ``t <= D``
    and ``(h, w)`` = ``(H, W)`` at one stride exists, and all such grids (more than one: ambiguous,
    e.g. 392 tokens on 16x224x224 are 8x7x7 or 2x14x14); ``(None, [])`` when none."""
    D, H, W = (int(s) for s in size)
    for P in ([prefix] if prefix is not None else range(MAX_PREFIX_TOKENS + 1)):
        m = n - P
        found = [(t, h, m // (t * h)) for t in range(1, min(D, m) + 1) if m % t == 0
                 for h in range(1, min(m // t, H + 1) + 1) if (m // t) % h == 0 and grid_fits(h, m // (t * h), (H, W))]
        if found:
            return P, found
    return None, []


def override_layout(spec: Any, shape: Sequence[int], batch: int, size: tuple[int, int],
                    prefix: Optional[int] = None, layer: str = "") -> MapLayout:
    """The layout a user asked for (``explain(layout=..., reshape=...)``), completed from the output's
    ``shape``; ``"nchw"``: read as is, even where it looks channels-last.

    ``"nhwc"``: the grid is dims 1-2. ``"tokens"`` / ``MapLayout("tokens", grid, prefix)``: with a
    grid, the prefix is ``N - h*w``; with a prefix, the grid is found as for :func:`read_layout`;
    with neither, the model's prefix (``prefix``) or the search. A layout the shape cannot hold is a
    :class:`~camlens.core.errors.LayerError` saying what was seen."""
    shape = tuple(int(d) for d in shape)
    lay = MapLayout(spec) if isinstance(spec, str) else spec
    if not isinstance(lay, MapLayout) or lay.kind not in (*LAYOUT_KINDS, "reshape", *VOLUME_KINDS):
        raise ConfigError(f"layout= takes one of {LAYOUT_KINDS} or a camlens.MapLayout(kind, grid, prefix), "
                          f"got {spec!r}")
    where = f"layer {layer!r}" if layer else "the layer"
    if not shape or shape[0] != batch:
        raise LayerError(f"{where} output has shape {shape}: its leading dimension is not the batch ({batch}), "
                         f"so no layout reads it as one map per image")
    if lay.kind == "reshape":
        return lay
    need = {"nchw": 4, "nhwc": 4, "tokens": 3, "volume": 5, "volume-last": 5, "volume-tokens": 3}[lay.kind]
    if len(shape) != need:
        raise LayerError(f"layout={lay.kind!r} needs a {need}-D output for {where}, got shape {shape}")
    if lay.kind == "volume":
        return MapLayout("volume", (shape[2], shape[3], shape[4]), 0)
    if lay.kind == "volume-last":
        return MapLayout("volume-last", (shape[1], shape[2], shape[3]), 0)
    if lay.kind == "volume-tokens":
        if lay.grid is None or len(lay.grid) != 3:
            raise LayerError(f"layout='volume-tokens' for {where} (shape {shape}) needs its grid: "
                             "MapLayout('volume-tokens', grid=(t, h, w), prefix=P)")
        t, h, w = (int(g) for g in lay.grid)
        P = shape[1] - t * h * w if lay.prefix is None else int(lay.prefix)
        if P < 0 or P + t * h * w != shape[1]:
            raise LayerError(f"volume token grid {t}x{h}x{w}" + (f" with {P} prefix tokens" if lay.prefix is not None
                             else "") + f" does not hold the {shape[1]} tokens of {where} (shape {shape})")
        return MapLayout("volume-tokens", (t, h, w), P)
    if lay.kind == "nchw":
        return MapLayout("nchw", (shape[2], shape[3]), 0)
    if lay.kind == "nhwc":
        return MapLayout("nhwc", (shape[1], shape[2]), 0)
    N = shape[1]
    if lay.grid is not None:
        h, w = (int(g) for g in lay.grid)
        P = N - h * w if lay.prefix is None else int(lay.prefix)
        if P < 0 or P + h * w != N:
            raise LayerError(f"layout grid {h}x{w}" + (f" with {P} prefix tokens" if lay.prefix is not None else "")
                             + f" does not hold the {N} tokens of {where} (shape {shape})")
        return MapLayout("tokens", (h, w), P)
    found = read_layout(shape, batch, size, lay.prefix if lay.prefix is not None else prefix)
    if found is None and lay.prefix is None and prefix is not None:
        found = read_layout(shape, batch, size)
    if found is None or found.kind != "tokens":
        raise LayerError(f"no patch grid fitting the {size[0]}x{size[1]} input holds the {N} tokens of {where}"
                         + (f" after {lay.prefix} prefix tokens" if lay.prefix is not None else "")
                         + "; give the grid: layout=camlens.MapLayout('tokens', grid=(h, w), prefix=P)")
    return found


# ----------------------------------------------------------------------------------------------
# --- for fronts/: arrays made with no array at hand, and framework errors

__all__ += ["ops_named", "default_array", "is_out_of_memory"]

_OPS_BY_NAME: dict[Optional[str], Ops] = {}


def ops_named(name: Optional[str] = None) -> Ops:
    """The :class:`Ops` of the backend called ``name`` (``"torch"``, ...; ``"numpy"``: NumPy's), ``None``:
    the default backend (the first registered: torch); NumPy's when that framework is not installed
    or no backend has that name.

    For fronts that must make framework arrays with no array to take the kind from (so
    :func:`ops_for` has nothing to dispatch on): :func:`camlens.load` rebuilds each file entry with
    the Ops of the framework its dtype name says it came from (``"torch.float32"`` -> ``"torch"``,
    :meth:`Ops.from_file`), and :mod:`camlens.localize` turns plain nested lists into the default
    kind. So both return torch tensors when torch is installed, as when they imported torch
    themselves, without importing it before it is needed; and without torch a saved explanation
    still loads, as NumPy arrays of the same values. Cached per name."""
    found = _OPS_BY_NAME.get(name)
    if found is None:
        key = next(iter(_BACKENDS), None) if name is None else name
        found = None
        if key is not None and key != "numpy" and key in _BACKENDS:
            try:
                found = _load(key).ops
            except MissingDependencyError:  # the framework is not installed
                found = None
        if found is None:
            from .numpy import NumpyOps

            found = NumpyOps()
        _OPS_BY_NAME[name] = found
    return found


def default_array(x: Any) -> Any:
    """``x`` (nested lists, a NumPy array) as an array of the default backend on the CPU, in the dtype
    NumPy reads it as (``torch.as_tensor(np.asarray(x))`` with torch installed; the NumPy array
    without): :meth:`Ops.from_file` of :func:`ops_named` with the dtype's name under the
    framework's prefix, as the file format names it (``"torch.float32"``)."""
    a = np.asarray(x)
    key = next(iter(_BACKENDS), "numpy")
    return ops_named().from_file(a, f"{key}.{a.dtype}", None)


def is_out_of_memory(err: BaseException) -> bool:
    """Is ``err`` an out-of-memory error: ``MemoryError``, or that of a backend loaded so far
    (:meth:`Ops.is_out_of_memory`; an error cannot come from a framework no camlens backend has
    loaded)? No framework is imported."""
    from .numpy import NumpyOps

    return NumpyOps().is_out_of_memory(err) or any(b.ops.is_out_of_memory(err) for b in list(_LOADED.values()))

