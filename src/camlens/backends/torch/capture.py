"""Capture of layer outputs by forward hooks, and the checks on what was captured."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...core.errors import LayerError, LayerRuntimeError, LayerTypeError
from ..base import grid_fits, layout_problem
from .probing import _is_attention, _strict_ancestors, probe_layers
from .state import first_tensor

@dataclass
class Capture:
    """What one forward pass captured.

    Attributes:
        activations: per layer name, the layer output ``(B, C, h, w)``, a graph node (or leaf).
        calls: how many times each layer ran in the forward.
        linear_io: for :func:`capture` with ``linear=True``, per ``nn.Linear`` name, its
            ``(input, output)`` (used by CAM to find a GAP + Linear head).
    """

    activations: dict[str, Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    linear_io: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Remove the hooks now (before the block ends), e.g. to run another forward for an error message."""
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], *, grad: bool = True,
            linear: bool = False, full_graph: bool = False) -> Iterator[Capture]:
    """Hooks ``layers`` for the block; yields a :class:`Capture` filled by the next forward.

    With ``grad=True`` the forward should run under ``torch.no_grad()``: the first captured layer
    switches grad mode on, so only the part of the network after it records a graph. With
    ``full_graph=True`` the forward runs with grad mode on from the input and the captured
    activation is the layer's output itself (its graph back to the parameters kept). Grad mode
    and all hooks are restored on exit.
    """
    cap = Capture()
    handles = cap._handles
    grad_mode = torch.is_grad_enabled()

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, out: Any) -> Any:
            cap.calls[name] = cap.calls.get(name, 0) + 1
            t = first_tensor(out)
            if t is None:
                raise LayerTypeError(f"layer {name!r} returned {type(out).__name__}; camlens needs a tensor output")
            if not grad:
                cap.activations[name] = t.detach()
                return None
            if not full_graph:
                torch.set_grad_enabled(True)
            if not t.requires_grad:
                t = t.detach().requires_grad_(True)
            cap.activations[name] = t
            new = t.clone()
            if isinstance(out, Tensor):
                return new
            return type(out)([new, *out[1:]]) if isinstance(out, (tuple, list)) else None
        return hook

    def linear_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, out: Any) -> None:
            cap.linear_io[name] = (inputs[0].detach(), out)
        return hook

    try:
        for name, mod in layers:
            handles.append(mod.register_forward_hook(make_hook(name)))
        if linear:
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear):
                    handles.append(mod.register_forward_hook(linear_hook(name)))
        yield cap
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(grad_mode)


def check_calls(cap: Capture, layers: Sequence[tuple[str, nn.Module]]) -> None:
    """Raise a clear error for layers that did not run, or ran more than once, in the forward."""
    for name, mod in layers:
        n = cap.calls.get(name, 0)
        if n == 0:
            raise LayerRuntimeError(f"layer {name!r} ({type(mod).__name__}) was never called in the forward pass, "
                               "so it has no activations; pick a module on the path from input to output")
        if n > 1:
            raise LayerRuntimeError(f"layer {name!r} ({type(mod).__name__}) was called {n} times in one forward pass "
                               "(a module reused, e.g. one activation module applied twice); pick a module that "
                               "runs once, such as the block or norm layer around it")


def check_layer_outputs(cap: Capture, layers: Sequence[tuple[str, nn.Module]], model: nn.Module, x: Tensor) -> None:
    """Raise one clear error when a captured layer output is not a ``(B, C, h, w)`` map of the input's batch.

    Shared by every layer method, before it runs: vectors ``(B, C)``, tokens ``(B, N, C)``,
    channels-last ``(B, h, w, C)`` maps (see :func:`looks_channels_last`) and outputs whose
    leading dimension is not the batch (per proposal / window) are refused, never misread. The
    message names the layer, the shape seen, what camlens needs and layers that would work (from a
    probe forward, run only on this error path, after the capture hooks are removed).
    """
    B, size = int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1]))
    for name, mod in layers:
        t = cap.activations.get(name)
        if t is None:
            continue
        why = layout_problem(t.shape, B, size)
        if why is None and t.ndim == 4 and not grid_fits(t.shape[2], t.shape[3], size):
            att = next((a for a in _strict_ancestors(name) if _is_attention(model.get_submodule(a))), None)
            if att is not None:  # e.g. a ViT's attn.k_norm (B, heads, N, d)
                why = f"it is inside attention block {att!r}, likely (B, heads, N, d), not a spatial map"
        if why is None:
            continue
        cap.release()
        try:
            p = probe_layers(model, x)
            cands, err = p.candidates(4), p.error
        except Exception:  # the hint is optional
            cands, err = [], None
        hint = (f"pick a convolutional feature layer such as {', '.join(repr(c) for c in cands)} (layer=None "
                "picks the first)" if cands and not err
                else f"no layer of this model qualifies: {err}" if err else "pick a convolutional feature layer")
        raise LayerError(f"layer {name!r} ({type(mod).__name__}) output has shape {tuple(t.shape)}: {why}. camlens "
                         f"needs a (B, C, h, w) feature map with B = {B} (the input batch); {hint}")
