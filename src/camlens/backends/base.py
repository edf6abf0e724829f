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
from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

import array_api_compat  # (imports no array library itself)

from ..errors import ConfigTypeError, MissingDependencyError

__all__ = ["Backend", "Ops", "namespace", "get_backend", "register_backend", "available_backends", "layout_problem",
           "looks_channels_last", "grid_fits"]


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays`` (``array_api_compat.torch`` for torch tensors, the
    NumPy one for NumPy arrays, ...): what methods and metrics compute with."""
    return array_api_compat.array_namespace(*arrays)


@runtime_checkable
class Ops(Protocol):
    """Array operations the maths needs beyond the array API standard (arrays of one backend)."""

    def resize(self, maps: Any, size: tuple[int, int], mode: str = "bilinear") -> Any:
        """``(..., h, w) -> (..., H, W)``; bilinear with ``align_corners=False`` (half-pixel centres)."""

    def topk(self, x: Any, k: int, axis: int = -1) -> tuple[Any, Any]:
        """The ``k`` largest values along ``axis`` and their indices, largest first."""

    def quantile(self, x: Any, q: float, axis: int = -1) -> Any:
        """The ``q`` quantile along ``axis`` (linear interpolation), the axis removed."""

    def normal(self, shape: Sequence[int], seed: int, like: Any) -> Any:
        """Standard normal noise of ``shape``, reproducible from ``seed``, on ``like``'s device and dtype."""

    def to_numpy(self, x: Any) -> Any:
        """A NumPy copy (or view) of ``x``, detached from any graph."""

    def asarray(self, x: Any, like: Any) -> Any:
        """``x`` (NumPy or nested lists) as an array of ``like``'s backend, device and dtype kind."""


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
                full_graph: bool) -> contextlib.AbstractContextManager:
        """Hook ``layers`` for one forward; yields a capture with ``activations`` (name -> array),
        ``calls`` and, with ``linear=True``, each dense layer's (input, output)."""

    def check_capture(self, cap: Any, layers: Sequence[tuple[str, Any]], model: Any, x: Any) -> None:
        """One clear error when a layer did not run once or its output is not ``(B, C, h, w)``."""

    def target_gradients(self, scores: Any, acts: Sequence[Any], names: Sequence[str], labels: Sequence[str], *,
                         create_graph: bool = False) -> list[Any]:
        """Per activation ``(B, C, h, w)``, the gradients ``(B, T, C, h, w)`` of the T scores ``(B, T)``,
        in one batched backward; ``create_graph`` keeps them differentiable."""

    def runner(self, model: Any, score_image: Callable[[Any, int], Any], layout: Any) -> Any:
        """Passes beyond the first: ``scores(x, b)``, ``scores_with_layer(layer, acts, x_b, b)``,
        ``input_gradients(x, fn, guided)``."""

    def linear_head(self, cap: Any, head: Any, acts: Any, layer: str, model: Any, head_name: str) -> Any:
        """The weight ``(K, C)`` of the dense layer that maps ``GAP(acts)`` to ``head`` (CAM); an error
        saying why when there is none."""

    def randomized_copy(self, model: Any, layers: Sequence[str], seed: int) -> Any:
        """A copy of ``model`` with the parameters of ``layers`` (dotted names) re-drawn (MPRT)."""


# ----------------------------------------------------------------------------------------------
# choosing a backend from the model's type

_BACKENDS: dict[str, tuple[tuple[str, ...], str]] = {
    # name -> (top-level modules whose classes it owns, module that defines BACKEND)
    "torch": (("torch",), "camlens.backends.torch"),
}
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
    unless the model's own module already imported it."""
    found = _BY_TYPE.get(type(model))
    if found is not None:
        return found
    roots = {c.__module__.split(".")[0] for c in type(model).__mro__}
    for name, (owned, _) in _BACKENDS.items():
        if roots & set(owned):  # (the model's class is defined there, so that framework is imported)
            backend = _load(name)
            if backend.owns(model):
                _BY_TYPE[type(model)] = backend
                return backend
    known = ", ".join(f"{n} ({'/'.join(r)})" for n, (r, _) in _BACKENDS.items())
    raise ConfigTypeError(f"no camlens backend takes a model of type {type(model).__module__}.{type(model).__name__}; "
                          f"backends: {known}. Pass a torch.nn.Module or a camlens.models.load(...) object")


# ----------------------------------------------------------------------------------------------
# shape rules shared by every backend (plain integers, no arrays)

def grid_fits(h: int, w: int, size: tuple[int, int]) -> bool:
    """Can ``(h, w)`` be the input ``size`` divided by one stride, each side rounded (±1)?"""
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


def layout_problem(shape: Sequence[int], batch: int, size: tuple[int, int]) -> Optional[str]:
    """Why a layer output of ``shape`` is not a ``(B, C, h, w)`` map camlens can read, or ``None``.

    ``batch``: the input's B; ``size``: the input's (H, W).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or shape[0] != batch:
        lead = shape[0] if shape else "none"
        return (f"its leading dimension ({lead}) is not the batch of the input ({batch}): one row per image is "
                "needed, not per proposal/window/token")
    if len(shape) == 2:
        return "it is a vector per image (B, C) with no spatial grid (a pooled or classifier layer)"
    if len(shape) == 3:
        return "it looks like tokens (B, N, C) (a transformer layout, not supported yet)"
    if len(shape) != 4:
        return f"it is {len(shape)}-D"
    if looks_channels_last(shape, size):
        return ("it looks channels-last (B, h, w, C) (e.g. Swin stages; not supported yet), and reading it as "
                "(B, C, h, w) would give a wrong map")
    return None

