"""Precision (autocast) and memory layout (NCHW / channels_last) of the model's forwards, and
the BatchNorm-folded inference copy for score-only forwards."""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...core.errors import ConfigError
from ..base import PRECISION_NAMES

def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


PRECISIONS: dict[str, Optional[torch.dtype]] = dict(zip(PRECISION_NAMES, (None, torch.float16, torch.bfloat16)))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the model's forwards: ``torch.autocast`` with fp16/bf16; fp32: no-op.

    Only the model runs under it; camlens' own maths (weights, maps, normalisation) stays fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Layout:
    """Memory layout of the inputs handed to the model: NCHW, or channels_last (NHWC in memory).

    ``channels_last=None`` (auto) uses channels_last for batches of 2 or more 4-D inputs on a
    model with ``nn.Conv2d`` layers — on CPU (oneDNN) or with fp16/bf16 on CUDA, where it is
    measured faster (resnet18, CPU, batch 16: 31 ms vs 37 ms per image) — and falls back to NCHW
    for good if the model rejects it (e.g. a ``.view`` of the raw input). ``True`` always (errors
    propagate), ``False`` never. Only the input's layout changes, never the model's weights, so
    the model is left as it came; the numbers are the same up to float rounding. (Rounding, of
    either layout: where a ReLU input or a max-pool pair after the layer is within a few ulps of
    a tie, float32 rounding decides the gradient's route, and a map can move by ~1e-3 — as it
    does for any other kernel, CPU or thread count; measured on vgg11, neither layout is closer
    to float64 than the other. In float64 the layouts agree to 1e-6.)

    Score-only forwards (``run(x, score_only=True)``: Score-CAM's masked inputs, occlusion,
    metrics) of 2+ inputs may run on an inference copy with BatchNorm folded into the preceding
    convolutions (``torch.fx``), when ``fold_bn`` is ``True`` (``None``: on CPU) and the model is in
    eval mode, has no hooks and traces; it is checked against the model on one input first (relative
    error < 1e-4) and dropped otherwise. The model is never modified. The copy is kept for the next
    calls on the same model (weakly: it goes with the model) while nothing it was built from changes:
    the same parameter and buffer tensors at the same versions (an optimiser step, ``load_state_dict``
    or any in-place change bumps a tensor's version), modes, hooks, device, dtype and precision; else it
    is built anew (tracing + folding costs ~0.3 s on a ResNet18, once rather than per call).
    """

    model: nn.Module
    channels_last: Optional[bool] = None
    precision: str = "fp32"
    failed: bool = False
    fold_bn: Optional[bool] = None
    _folded: Any = field(default=None, repr=False)  # None: not tried; False: unusable; else the copy

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.channels_last not in (None, True, False):
            raise ConfigError(f"channels_last must be None (auto), True or False, got {self.channels_last!r}")
        self._has_conv: Optional[bool] = None

    @property
    def has_conv(self) -> bool:
        if self._has_conv is None:  # looked up on the first batched forward only
            self._has_conv = any(isinstance(m, nn.Conv2d) for m in self.model.modules())
        return self._has_conv

    def wants(self, x: Tensor) -> bool:
        if self.channels_last is not None:
            return self.channels_last and x.ndim == 4
        if self.failed or x.ndim != 4 or x.shape[0] < 2 or not self.has_conv:
            return False
        return x.device.type == "cpu" or (x.device.type == "cuda" and self.precision != "fp32")

    def autocast(self, x: Tensor) -> contextlib.AbstractContextManager:
        """The precision's autocast for code that must run like the model (target score functions)."""
        return autocast(x.device, self.precision)

    def run(self, x: Tensor, score_only: bool = False) -> Any:
        """``model(x)`` under the precision's autocast, in the chosen layout."""
        model = self._inference_model(x) if score_only and x.shape[0] >= 2 else self.model
        with autocast(x.device, self.precision):
            if not self.wants(x):
                return model(x)
            try:
                return model(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError as err:
                if self.channels_last or not _is_layout_error(err):
                    raise
                self.failed = True  # auto mode: this model wants NCHW (e.g. it .view()s its input)
                return model(x)

    def _inference_model(self, x: Tensor) -> nn.Module:
        if self._folded is None:  # auto: CPU only (the copy doubles the weights' memory; GPUs gain less)
            want = self.fold_bn if self.fold_bn is not None else x.device.type == "cpu"
            self._folded = _cached_fold(self.model, x[:1], self.precision) if want else False
        return self._folded if self._folded is not False else self.model


#: model -> (the state the folded copy was built from, the copy or False); weak: entries go with the model
_FOLDS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()


def _fold_state(model: nn.Module, x: Tensor, precision: str) -> tuple:
    """What a folded copy depends on: every parameter / buffer tensor and its version, every module's
    mode and hook count, the global hooks, and the input's device / dtype and the precision."""
    from torch.nn.modules import module as _m

    mods = list(model.modules())
    return (precision, x.device, x.dtype,
            tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers())),
            tuple((id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods),
            len(_m._global_forward_hooks), len(_m._global_forward_pre_hooks))


def _cached_fold(model: nn.Module, probe_x: Tensor, precision: str) -> Any:
    """:func:`_fold_batchnorm`, reused while :func:`_fold_state` is unchanged."""
    state = _fold_state(model, probe_x, precision)
    hit = _FOLDS.get(model)
    if hit is not None and hit[0] == state:
        return hit[1]
    folded = _fold_batchnorm(model, probe_x, precision)
    _FOLDS[model] = (state, folded)
    return folded


def _fold_batchnorm(model: nn.Module, probe_x: Tensor, precision: str) -> Any:
    """A ``torch.fx`` copy of ``model`` with each eval BatchNorm folded into its conv, or ``False``.

    ``False`` when the model has no BatchNorm, is in training mode, carries hooks, does not
    trace symbolically, or the copy's outputs on ``probe_x`` differ from the model's.
    """
    from torch.fx.experimental.optimization import fuse
    from torch.nn.modules import module as _m
    from torch.utils._pytree import tree_leaves

    mods = list(model.modules())
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods) or any(m.training for m in mods):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in mods) or _m._global_forward_hooks \
            or _m._global_forward_pre_hooks:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = fuse(model)  # works on a deep copy
        with torch.no_grad(), autocast(probe_x.device, precision):
            want, got = tree_leaves(model(probe_x)), tree_leaves(folded(probe_x))
    except Exception:  # not traceable (data-dependent control flow, ...) or not foldable: keep the model
        return False
    tens = [(w, g) for w, g in zip(want, got) if isinstance(w, Tensor)]
    if len(want) != len(got) or not tens or any(
            not isinstance(g, Tensor) or g.shape != w.shape
            or (g.float() - w.float()).abs().max() > 1e-4 * (1 + w.float().abs().max()) for w, g in tens):
        return False
    return folded


def _is_layout_error(err: RuntimeError) -> bool:
    msg = str(err)
    return "stride" in msg or "contiguous" in msg
