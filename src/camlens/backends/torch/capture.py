"""Capture of layer outputs by forward hooks, and the checks on what was captured."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ...core.errors import LayerError, LayerRuntimeError, LayerTypeError
from ..base import MapLayout, grid_fits, layout_problem, override_layout
from .attention import record_attention
from .probing import _is_attention, _strict_ancestors, map_layout, patch_grid, probe_layers, token_prefix
from .state import first_tensor

@dataclass
class Capture:
    """What one forward pass captured.

    Attributes:
        activations: per layer name, the layer output ``(B, C, h, w)``, a graph node (or leaf).
        calls: how many times each layer ran in the forward.
        linear_io: for :func:`capture` with ``linear=True``, per ``nn.Linear`` name, its
            ``(input, output)`` (used by CAM to find a GAP + Linear head).
        layouts: per layer whose output is a map in another layout (channels-last, tokens), how
            to read it (set by :func:`check_layer_outputs`); NCHW layers are absent.
        attentions: for :func:`capture` with ``attention=True``, the probabilities ``(B, heads, N, N)``
            of every attention call of the forward, in call order (:mod:`.attention`).
        attention_layout: their tokens' :class:`MapLayout` (prefix count, patch grid), set by
            :func:`camlens.backends.torch.attention.check_attention`.
    """

    activations: dict[str, Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    linear_io: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    layouts: dict[str, MapLayout] = field(default_factory=dict)
    attentions: Optional[list] = None
    attention_layout: Optional[MapLayout] = None
    _handles: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Remove the hooks now (before the block ends), e.g. to run another forward for an error message."""
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], *, grad: bool = True,
            linear: bool = False, full_graph: bool = False, attention: bool = False) -> Iterator[Capture]:
    """Hooks ``layers`` for the block; yields a :class:`Capture` filled by the next forward.

    With ``grad=True`` the forward should run under ``torch.no_grad()``: the first captured layer
    switches grad mode on, so only the part of the network after it records a graph. With
    ``full_graph=True`` the forward runs with grad mode on from the input and the captured
    activation is the layer's output itself (its graph back to the parameters kept). With
    ``attention=True`` every attention call's probabilities are recorded in ``cap.attentions``
    (:func:`.attention.record_attention`; with ``grad`` they are graph nodes). Grad mode, all hooks
    and every patched function or flag are restored on exit.
    """
    cap = Capture()
    handles = cap._handles
    grad_mode = torch.is_grad_enabled()

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, out: Any) -> Any:
            cap.calls[name] = cap.calls.get(name, 0) + 1
            t = first_tensor(out)
            if t is None and _tensor_dict(out):  # e.g. an FPN's OrderedDict of levels: read by a reshape= function
                return _capture_dict(cap, name, out, grad, full_graph)
            if t is None:
                raise LayerTypeError(f"layer {name!r} returned {type(out).__name__}; camlens needs a tensor output "
                                     "(or a dict of tensors read by reshape=)")
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

    stack = contextlib.ExitStack()
    if full_graph:  # differentiable maps: attention by the math kernel, whose backward is itself differentiable
        stack.enter_context(_math_attention())
    try:
        if attention:
            cap.attentions = stack.enter_context(record_attention(model, [], grad=grad or full_graph))
        for name, mod in layers:
            hook = make_hook(name)
            handles.append(_ForwardTap(mod, hook) if _can_tap(model, name, mod) else mod.register_forward_hook(hook))
        if linear:
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear):
                    handles.append(mod.register_forward_hook(linear_hook(name)))
        yield cap
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(grad_mode)
        stack.close()


def _tensor_dict(out: Any) -> bool:
    """A non-empty mapping whose values are all tensors (an FPN backbone's ``OrderedDict`` of levels)."""
    return isinstance(out, Mapping) and len(out) > 0 and all(isinstance(v, Tensor) for v in out.values())


def _capture_dict(cap: Capture, name: str, out: Mapping, grad: bool, full_graph: bool) -> Any:
    """Record a dict output as a dict of activations (each value as a single tensor output would be:
    detached, or a graph leaf whose clone flows on); the model gets the clones in a mapping of its
    output's own type. Only a ``reshape=`` function reads it (:func:`check_layer_outputs`)."""
    if not grad:
        cap.activations[name] = {k: v.detach() for k, v in out.items()}
        return None
    if not full_graph:
        torch.set_grad_enabled(True)
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in out.items()}
    cap.activations[name] = leaves
    try:
        return type(out)((k, v.clone()) for k, v in leaves.items())
    except TypeError:  # a mapping type that cannot be built from pairs: a plain dict
        return {k: v.clone() for k, v in leaves.items()}


def _math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` by its math kernel for the block: the fused kernels
    (flash, memory-efficient) have no double backward, so a CAM loss through a transformer's
    attention could not be trained; the math kernel gives the same numbers."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class _ForwardTap:
    """A forward hook run inside the layer's own ``forward`` (an instance attribute wrapping the
    bound method for the block), removable like a hook handle.

    The same call as ``register_forward_hook`` — ``hook(module, args, out)``, its non-None result
    replacing the output — without ``Module.__call__``'s hook path, which costs tens of
    microseconds per call (the per-call overhead on small models). Used only where the two are
    indistinguishable (see :func:`_can_tap`); ``remove`` restores the module exactly."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module, hook: Callable) -> None:
        bound = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = bound(*args, **kwargs)
            new = hook(module, args, out)
            return out if new is None else new

        module.__dict__["forward"] = forward
        self.module: Any = module

    def remove(self) -> None:
        if self.module is not None:
            self.module.__dict__.pop("forward", None)
            self.module = None


_REPLICATING = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _can_tap(model: nn.Module, name: str, mod: nn.Module) -> bool:
    """A :class:`_ForwardTap` behaves as a forward hook here: a plain module with no forward of its
    own instance and no forward hooks (a user's hooks run before ours, so ours must see their
    output: a hook then), no global module hooks, not scripted, and not inside a wrapper that copies
    or traces modules per call (DataParallel replicas, ``torch.compile``'s ``_orig_mod``)."""
    from torch.nn.modules import module as _m

    if isinstance(mod, torch.jit.ScriptModule) or "forward" in mod.__dict__ or mod._forward_hooks \
            or mod._forward_pre_hooks or _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return False
    parts = name.split(".") if name and name != "<model>" else []
    chain = [model, *(model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts)))]
    return not any(isinstance(a, _REPLICATING) or "_orig_mod" in a._modules for a in chain)


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


def check_layer_outputs(cap: Capture, layers: Sequence[tuple[str, nn.Module]], model: nn.Module, x: Tensor,
                        read: Optional[Mapping[str, Any]] = None) -> None:
    """Raise one clear error when a captured layer output is not a ``(B, C, h, w)`` map of the input's batch.

    Shared by every layer method, before it runs: vectors ``(B, C)``, tokens ``(B, N, C)``,
    channels-last ``(B, h, w, C)`` maps (see :func:`looks_channels_last`) and outputs whose
    leading dimension is not the batch (per proposal / window) are refused, never misread. The
    message names the layer, the shape seen, what camlens needs and layers that would work (from a
    probe forward, run only on this error path, after the capture hooks are removed). ``read``:
    layer name -> the layout the user gave (``explain(layout=..., reshape=...)``), used instead.
    """
    B, size = int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1]))
    for name, mod in layers:
        t = cap.activations.get(name)
        if t is None:
            continue
        if isinstance(t, Mapping):  # a dict of tensors (FPN levels): only a reshape= function reads it
            lay = read.get(name) if read is not None else None
            if isinstance(lay, MapLayout) and lay.kind == "reshape":
                if any(v.ndim == 0 or v.shape[0] != B for v in t.values()):
                    raise LayerError(f"layer {name!r} returned a dict whose tensors do not all lead with the batch "
                                     f"({B}): {_dict_shapes(t)}")
                cap.layouts[name] = lay
                continue
            raise LayerError(f"layer {name!r} ({type(mod).__name__}) returned a dict of {len(t)} tensors "
                             f"({_dict_shapes(t)}), not a (B, C, h, w) map. Give reshape= a function of that dict "
                             "returning (B, C, h, w) (a pytorch-grad-cam reshape_transform such as its "
                             "fasterrcnn_reshape_transform works unchanged), or explain one of the modules that "
                             "produce its tensors")
        if read is not None and name in read:  # explain(layout=..., reshape=...): the user's reading
            cap.layouts[name] = override_layout(read[name], tuple(t.shape), B, size, token_prefix(model), name)
            continue
        why = layout_problem(t.shape, B, size)
        if why is not None:
            lay = map_layout(tuple(t.shape), B, size, token_prefix(model), patch_grid(model, size))
            if lay is not None:  # channels-last or tokens: read as (B, C, h, w) by the engine
                cap.layouts[name] = lay
                continue
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


def _dict_shapes(d: Mapping) -> str:
    """``'0': (1, 256, 32, 32), 'pool': (1, 256, 4, 4)`` for an error message."""
    return ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in d.items())
