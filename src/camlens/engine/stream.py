"""``camlens.stream``: explain an iterable of inputs, batched internally, one result per input.

Every front that runs more than one image (the CLI, the HTML report, later the viewer, video and
batch runs) goes through it, so batching, per-input errors and progress live in one place::

    for exp in camlens.stream(m, ["cat.jpg", "dog.png"], top_k=3, batch_size=8):
        exp.source, exp.maps.shape          # "cat.jpg", (1, 3, H, W)

Inputs (any mix): image paths, PIL images and ``(H, W[, 3])`` arrays (with a
:class:`camlens.models.LoadedModel`, which preprocesses them), ``(C, H, W)`` tensors and
``(B, C, H, W)`` tensor batches (preprocessed as the model expects; a batch yields one result per
image). Consecutive inputs of the same preprocessed shape are explained together, ``batch_size`` at
a time; order is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from ..backends.base import get_backend, namespace, ops_for
from ..core.errors import PER_INPUT_ERRORS, CamlensError, ConfigError, InputError
from ..core.explanation import Explanation
from ..core.targets import is_framework_array
from .passes import is_loaded
from .volumes import takes_volumes

__all__ = ["stream", "Failure"]


@dataclass
class Failure:
    """An input that could not be explained (``stream(on_error="yield")``), in its place in the order.

    ``index``: the input's position; ``source``: its path, key or index; ``error``: the exception
    (an :class:`~camlens.errors.InputError` for an unreadable file or bad values, or the model's own
    error on this input)."""

    index: int
    source: Any
    error: BaseException


Progress = Callable[[int, Optional[int], Any], None]


def _per_input_error(err: BaseException) -> bool:
    """Errors that belong to one input (its file or values, or the model's own failure on it); other
    camlens errors (an unknown layer, target or option) are the same for every input and are raised."""
    return isinstance(err, PER_INPUT_ERRORS) or not isinstance(err, CamlensError)


def stream(model: Any, inputs: Iterable[Any], targets: Any = None, *, batch_size: int = 8,
           keyed: bool = False, on_error: str = "raise", progress: Optional[Progress] = None,
           max_pixels: Optional[int] = None, options: Optional[Mapping[str, Any]] = None,
           **explain_kwargs: Any) -> Iterator[Union[Explanation, Failure]]:
    """Explain every input of ``inputs``; yields one single-image :class:`~camlens.Explanation` each.

    Args:
        model: an ``nn.Module`` (tensor inputs only) or a :class:`camlens.models.LoadedModel`.
        inputs: an iterable (consumed lazily) of paths, PIL images, arrays, ``(C, H, W)`` tensors or
            ``(B, C, H, W)`` batches; with ``keyed=True``, of ``(key, input)`` pairs.
        targets: as :func:`camlens.explain`, the same for every input (per-image lists of lists
            are refused: inputs are batched in groups the caller does not see).
        batch_size: images per :func:`camlens.explain` call (consecutive inputs of one shape).
        keyed: items are ``(key, input)``; ``exp.source`` is the key.
        on_error: ``"raise"`` (default) or ``"yield"``: a :class:`Failure` in the input's place for
            errors of that input (unreadable file, NaN pixels, the model's own error on it); errors
            that would hit every input (unknown layer, target, option) are raised either way. When a
            batch fails, its inputs are retried one at a time, so one bad input costs only itself.
        progress: called as ``progress(done, total, source)`` after each input's last result
            (``done`` counts inputs; ``total`` is ``len(inputs)`` when it has one, else ``None``).
        max_pixels: refuse image files larger than this (see :func:`camlens.io.load_image`).
        options: the method's options, handed to :func:`camlens.explain` as they are — for options
            named like a parameter of ``stream`` itself (Score-CAM's ``batch_size``:
            ``options={"batch_size": 64}``); also given as keywords, a name is an error.
        **explain_kwargs: everything else :func:`camlens.explain` takes (``method``, ``layer``,
            ``top_k``, method options ...).

    Each result has ``source``: the path (a ``str``), the key, or the input's index (for a batch,
    ``(index, b)``). Results are views of the batch's tensors (``Explanation.image``).
    """
    from . import api
    from ..io.images import DEFAULT_MAX_PIXELS, load_image

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    both = sorted(set(options or {}) & set(explain_kwargs))
    if both:
        raise ConfigError(f"{', '.join(both)} given both in options= and as keyword(s): give each once")
    explain_kwargs = {**explain_kwargs, **(options or {})}
    if on_error not in ("raise", "yield"):
        raise ConfigError(f"on_error must be 'raise' or 'yield', got {on_error!r}")
    if isinstance(targets, list) and targets and all(isinstance(t, list) for t in targets):
        raise ConfigError("stream takes the same targets for every input; per-image lists of lists would depend "
                          "on how inputs are batched: call camlens.explain per batch instead, or give a flat list")
    total = len(inputs) if hasattr(inputs, "__len__") else None  # type: ignore[arg-type]
    loaded = is_loaded(model)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    done = 0

    def prepared() -> Iterator[tuple[int, Any, Any]]:
        """(index, source, (x (N, C, H, W), display or None)) or (index, source, exception)."""
        for i, item in enumerate(inputs):
            source, obj = item if keyed else (None, item)
            if source is None:
                source = os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else i
            try:
                yield i, source, _prepare(model, obj, loaded, limit, load_image)
            except Exception as err:  # noqa: BLE001 - classified by _per_input_error
                if on_error == "raise" or not _per_input_error(err):
                    raise
                yield i, source, err

    def run(group: list) -> Iterator[tuple[Union[Explanation, Failure], Any]]:
        """Explain the group's inputs in one call; yield ``(result, source)`` in order (failures in
        place), with ``source`` set on the last result of each input (``None`` on the others)."""
        real = [g for g in group if not isinstance(g[2], BaseException)]
        exp = None
        if real:
            try:
                exp = api.explain(model, _concat([g[2][0] for g in real]), targets, **explain_kwargs)
            except Exception as err:  # noqa: BLE001 - classified by _per_input_error
                if on_error == "raise" or not _per_input_error(err):
                    raise
                if len(real) == 1:
                    group = [(g[0], g[1], err) if g is real[0] else g for g in group]
                else:  # find the input(s) at fault: one at a time
                    for g in group:
                        yield from run([g])
                    return
        b = 0
        for index, source, got in group:
            if isinstance(got, BaseException):
                yield Failure(index, source, got), source
                continue
            xi, disp = got
            n = xi.shape[0]
            for j in range(n):
                one = exp.image(b)  # type: ignore[union-attr]
                one.display = disp[j:j + 1] if disp is not None else one.display
                one.source = source if n == 1 else (source, j)
                b += 1
                yield one, source if j == n - 1 else None

    def emit(group_results: Iterator[tuple[Union[Explanation, Failure], Any]]) -> Iterator[Union[Explanation, Failure]]:
        nonlocal done
        for r, finished in group_results:  # progress counts inputs (a batch input yields several results)
            yield r
            if finished is not None:
                done += 1
                if progress is not None:
                    progress(done, total, finished)

    def shape(entry: tuple) -> Optional[tuple]:
        return None if isinstance(entry[2], BaseException) else tuple(entry[2][0].shape[1:])

    pending: list = []  # entries (index, source, (x, display) or the input's error), in input order
    for entry in prepared():
        ref = next((shape(e) for e in pending if shape(e) is not None), None)
        if ref is not None and shape(entry) is not None and shape(entry) != ref:
            yield from emit(_flush(run, pending))
        pending.append(entry)
        n = sum(int(e[2][0].shape[0]) for e in pending if shape(e) is not None)
        if n >= batch_size or n == 0:  # full, or only failures pending: nothing to wait for
            yield from emit(_flush(run, pending))
    yield from emit(_flush(run, pending))


def _flush(run: Callable, pending: list) -> Iterator[tuple[Union[Explanation, Failure], Any]]:
    """Run the pending group (if any) and empty it."""
    if not pending:
        return
    group = list(pending)
    pending.clear()
    yield from run(group)


def _concat(xs: list) -> Any:
    """The inputs of one group as one batch (``concat`` along axis 0: always a fresh array)."""
    return namespace(*xs).concat(xs, axis=0)


def _takes_numpy(model: Any) -> bool:
    """Does ``model``'s backend compute on NumPy arrays (Keras: its engine-side arrays are NumPy), so
    NumPy batches are its inputs, not images to preprocess?"""
    try:
        bk = get_backend(model)
    except CamlensError:
        return False
    return bk.xp is namespace(np.empty(0))


def _prepare(model: Any, obj: Any, loaded: bool, max_pixels: Optional[int], load_image: Callable) -> tuple:
    """One input -> ``(x (N, C, H, W) float tensor, display (N, H, W, 3) uint8 or None)``."""
    if not loaded and not isinstance(obj, (str, os.PathLike)) and _takes_numpy(model):
        obj = get_backend(model).check_inputs(obj)  # Keras: NumPy / TF images (H, W, C) or (B, H, W, C) -> NumPy
        if obj.ndim not in (3, 4):
            raise InputError(f"an input of a {get_backend(model).name} model must be one image (H, W, C) or a batch "
                             f"(B, H, W, C), got shape {tuple(obj.shape)}")
        return (obj[None] if obj.ndim == 3 else obj), None
    if is_framework_array(obj):
        if obj.ndim == 3 or (obj.ndim == 4 and not loaded and takes_volumes(model)):
            obj = obj[None, ...]  # one image, or one volume (C, D, H, W) of a 3-D CNN
        if obj.ndim != 4 and (obj.ndim != 5 or loaded):
            raise InputError(f"a tensor input must be (C, H, W) or (B, C, H, W) (volumes: (C, D, H, W) or "
                             f"(B, C, D, H, W)), got shape {tuple(obj.shape)}")
        xp = namespace(obj)
        if loaded and not xp.isdtype(obj.dtype, "real floating"):  # uint8 (B, 3, H, W) images: preprocess them
            arrays = list(ops_for(obj).to_numpy(xp.permute_dims(obj, (0, 2, 3, 1))))
            x = model.preprocess(arrays)
            return x, model.to_display(x)
        return obj, None
    if not loaded:
        raise ConfigError(f"a plain nn.Module takes preprocessed tensors, got {type(obj).__name__}: pass a "
                          "camlens.models.load(...) object as the model to read and preprocess images")
    if isinstance(obj, (str, os.PathLike)):
        obj = load_image(obj, max_pixels=max_pixels or None)
    elif isinstance(obj, np.ndarray) and obj.ndim == 4:
        raise InputError("a 4-D array is a batch: give its images one by one, or a (B, C, H, W) tensor")
    x = model.preprocess(obj)
    return x, model.to_display(x)
