"""PyTorch backend: capture layer activations and gradients of many scores in one pass.

The only module of camlens that knows PyTorch's module/hook machinery. Guarantees:

* one forward pass; gradients of all ``T`` target scores w.r.t. every captured layer from one
  batched ``torch.autograd.grad(..., is_grads_batched=True)`` call (a loop over targets only when
  the model has an op that vmap cannot batch);
* parameter ``.grad`` is never touched (no ``.backward()``); parameters need not require grad;
* whatever is changed for the call (train/eval flags, ``requires_grad``, hooks, grad mode) is
  restored on exit, also when an exception is raised;
* the autograd graph starts at the first captured layer: the forward runs without graph until
  then, and each captured output is re-rooted as a fresh leaf when nothing upstream of it needs a
  gradient. The captured tensor is the module's true output; a clone is handed on, so in-place ops
  downstream (``ReLU(inplace=True)``) work and do not alter what was captured.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ConfigError, ConfigTypeError, LayerError, LayerNotFoundError, LayerRuntimeError, LayerTypeError

LayerSpec = Union[str, nn.Module]

__all__ = ["LayerSpec", "resolve_layers", "model_state", "capture", "Capture", "layer_gradients",
           "guess_layer", "probe", "model_device", "GuidedReLU", "Runner", "PRECISIONS", "autocast",
           "Layout", "check_calls", "check_layer_outputs", "probe_layers", "LayerProbe", "LayerRecord",
           "layout_problem", "looks_channels_last"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    convolutions (``torch.fx``), built once per call when ``fold_bn`` is ``True`` (``None``: on
    CPU) and the model is in eval mode, has no hooks and traces; it is checked against the model
    on one input first (relative error < 1e-4) and dropped otherwise. The model is never modified.
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
            self._folded = _fold_batchnorm(self.model, x[:1], self.precision) if want else False
        return self._folded if self._folded is not False else self.model


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


def resolve_layers(model: nn.Module, layers: Union[LayerSpec, Sequence[LayerSpec]]) -> list[tuple[str, nn.Module]]:
    """Turn layer names (dotted, e.g. ``"layer4.2"``) or modules into ``(name, module)`` pairs.

    Raises:
        KeyError: an unknown name, listing the closest valid names.
        ValueError: a module that is not part of ``model``.
    """
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    out: list[tuple[str, nn.Module]] = []
    for spec in layers:
        if isinstance(spec, nn.Module):
            if id(spec) not in by_id:
                raise LayerError(f"module {type(spec).__name__} is not a submodule of the model")
            out.append((by_id[id(spec)] or "<model>", spec))
            continue
        if not isinstance(spec, str):
            raise ConfigTypeError(f"a layer is a dotted name or an nn.Module, got {type(spec).__name__}")
        name = spec.strip()
        if name not in named:
            close = difflib.get_close_matches(name, [n for n in named if n], n=8, cutoff=0.5)
            if not close:
                close = [n for n in named if n and "." not in n][:12]
            raise LayerNotFoundError(f"no layer named {spec!r} in {type(model).__name__}; closest valid names: {close}")
        out.append((name, named[name]))
    if not out:
        raise LayerError("no layer given")
    return out


@contextlib.contextmanager
def model_state(model: nn.Module, *, eval_mode: bool = True, freeze: bool = True,
                restore_buffers: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters for the block; restore exactly on exit.

    Restores every submodule's ``training`` flag and every parameter's ``requires_grad``, also
    when the block raises. With ``eval_mode=False`` and some module in training mode, every
    buffer is also snapshotted (cloned) and restored in place (BatchNorm's running statistics and
    ``num_batches_tracked`` change in training-mode forwards); in eval mode nothing is copied (eval
    BatchNorm reads its buffers only). ``restore_buffers=False`` skips that (differentiable maps:
    the call is a forward of the caller's training step, and restoring buffers in place would
    invalidate the graph that saved them). Hooks are the caller's to remove (see :func:`capture`).
    """
    mods = list(model.modules())
    modes = [(m, m.training) for m in mods]
    flags = [(p, p.requires_grad) for p in _unique_parameters(mods)]
    saved = None
    if restore_buffers and not eval_mode and any(t for _, t in modes):
        with torch.no_grad():
            saved = [(m, n, b, b.clone()) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    try:
        if eval_mode and any(t for _, t in modes):  # (already in eval mode: nothing to switch)
            model.eval()
        if freeze:
            for p, rg in flags:
                if rg:
                    p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training
        for p, rg in flags:
            if p.requires_grad != rg:
                p.requires_grad_(rg)
        if saved is not None:
            with torch.no_grad():
                for m, n, b, copy in saved:
                    if b.shape == copy.shape:
                        b.copy_(copy)
                        m._buffers[n] = b  # the same tensor object, also if the module rebound the name
                    else:
                        m._buffers[n] = copy


def _unique_parameters(mods: Sequence[nn.Module]) -> list[nn.Parameter]:
    """``model.parameters()`` from its module list (shared parameters once), without a second walk."""
    seen: set[int] = set()
    out = []
    for m in mods:
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@dataclass
class Capture:
    """What one forward pass captured.

    Attributes:
        output: the model's output, as returned.
        activations: per layer name, the layer output ``(B, C, h, w)``, a graph node (or leaf).
        calls: how many times each layer ran in the forward.
        linear_io: for :func:`capture` with ``linear=True``, per ``nn.Linear`` name, its
            ``(input, output)`` (used by CAM to find a GAP + Linear head).
    """

    output: Any = None
    activations: dict[str, Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    linear_io: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Remove the hooks now (before the block ends), e.g. to run another forward for an error message."""
        for h in self._handles:
            h.remove()


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


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
            t = _first_tensor(out)
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
        if why is None and t.ndim == 4 and not _grid_fits(t.shape[2], t.shape[3], size):
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


def _is_vmap_error(err: BaseException) -> bool:
    """An error from vmap's batching of the backward (an op without a batching rule)."""
    msg = str(err).lower()
    return "vmap" in msg or "batch" in msg


def layer_gradients(scores: Tensor, acts: Sequence[Tensor], names: Sequence[str], labels: Sequence[str], *,
                    create_graph: bool = False) -> list[Tensor]:
    """Gradients of each target score w.r.t. each activation, in one batched backward.

    Args:
        scores: ``(B, T)`` scores; image ``b`` depends only on input ``b`` (eval mode).
        acts: activations ``(B, C, h, w)`` (any shape with leading B).
        names, labels: layer names and target labels, for error messages.
        create_graph: keep the backward's graph, so the gradients (and maps made of them) are
            differentiable themselves (``explain(differentiable=True)``).

    Returns:
        per activation, gradients ``(B, T, *act.shape[1:])``.

    Uses ``grad_outputs = e_t`` (one-hot over T, broadcast over B) batched with vmap; since
    images are independent, summing over B in the vector-Jacobian product is exact.
    """
    if not scores.requires_grad:
        raise LayerRuntimeError("the explained scores do not depend on any captured layer through autograd "
                           "(the model detaches its output, runs under no_grad, or leaves torch)")
    B, T = scores.shape
    if T > 1:
        eye = torch.eye(T, dtype=scores.dtype, device=scores.device)[:, None, :].expand(T, B, T)
    batched = T > 1  # vmap's grads come (T, B, ...)
    try:
        # retain_graph when batched: if vmap fails half-way, the per-target fallback needs the graph
        grads = torch.autograd.grad(scores, list(acts), grad_outputs=eye if T > 1 else torch.ones_like(scores),
                                    is_grads_batched=T > 1, allow_unused=True,
                                    retain_graph=T > 1 or create_graph, create_graph=create_graph)
        if T == 1:  # (B, ...) -> (B, 1, ...)
            grads = [None if g is None else g.unsqueeze(1) for g in grads]
    except RuntimeError as err:  # an op without a vmap rule: fall back to a loop over targets
        if T == 1 or not _is_vmap_error(err):
            raise
        batched = False
        per_t = [torch.autograd.grad(scores[:, t].sum(), list(acts), retain_graph=t < T - 1 or create_graph,
                                     allow_unused=True, create_graph=create_graph) for t in range(T)]
        grads = [None if per_t[0][i] is None else torch.stack([g[i] for g in per_t], dim=1) for i in range(len(acts))]
    out = []
    for g, name in zip(grads, names):
        if g is None:
            raise LayerRuntimeError(f"the target scores {list(labels)} do not depend on layer {name!r}: no gradient "
                               "path from this layer to the explained output (is it on another branch?)")
        out.append(g.transpose(0, 1) if batched else g)  # -> (B, T, ...)
    return out


_PROBE_BATCH = 2  # the probe runs 2 images, so that a leading dimension that is not the batch shows
_STEM_TOKENS = 6  # at least this many token / channels-last modules after the last (B, C, h, w) layer, and more
# of them than (B, C, h, w) modules before it: that layer is the patch-embedding stem of a token-based network


@dataclass
class LayerRecord:
    """What the probe saw of one module: its first output's shape, calls, and why it is no candidate.

    Attributes:
        name, kind: dotted name and class name.
        calls: times it ran in the forward; shape: its (first) tensor output's shape, or ``None``.
        order: completion index of its first call (execution order).
        reason: why it cannot be the default CAM layer; ``None``: a candidate.
        fragment: a candidate inside a block whose output has no grid left (h*w = 1): used only
            when no other candidate exists.
    """

    name: str
    kind: str
    calls: int
    shape: Optional[tuple[int, ...]]
    order: int
    reason: Optional[str] = None
    fragment: bool = False

    def describe(self) -> str:
        shape = "no tensor" if self.shape is None else str(tuple(self.shape))
        return f"{self.name} ({self.kind}) {shape}" + (f": {self.reason}" if self.reason else "")


@dataclass
class LayerProbe:
    """One probe forward: the output, per-module records, the chosen layer or why there is none.

    ``batch`` is the probe's batch size (shapes in ``records`` have it as leading dimension).
    """

    output: Any
    batch: int
    size: tuple[int, int]
    records: list[LayerRecord]
    layer: Optional[str] = None
    error: Optional[str] = None

    def candidates(self, n: int = 5) -> list[str]:
        """The ``n`` deepest candidate layer names, deepest first (the chosen layer first), without
        pieces of a listed block with its shape (``layer4``, ``layer3``, not ``layer4``, ``layer4.1``)."""
        good = [r for r in reversed(self.records) if r.reason is None]
        good.sort(key=lambda r: r.fragment)  # stable: whole blocks before fragments
        out: list[LayerRecord] = []
        for r in good:
            if len(out) < n and not any(r.name.startswith(o.name + ".") and r.shape == o.shape for o in out):
                out.append(r)
        return [r.name for r in out]

    def near_misses(self, n: int = 6) -> list[LayerRecord]:
        """The deepest modules with a batch-leading 3-D/4-D output, for error messages."""
        out = [r for r in reversed(self.records) if r.shape is not None and len(r.shape) in (3, 4)
               and not r.kind.startswith("Adaptive")]
        return out[:n]


def _grid_fits(h: int, w: int, size: tuple[int, int]) -> bool:
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
    return len(shape) == 4 and _grid_fits(shape[1], shape[2], size) and not _grid_fits(shape[2], shape[3], size)


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


def _strict_ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def _tensor_leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        vals: Any = out.values()
    elif isinstance(out, (tuple, list)):
        vals = out
    elif hasattr(out, "__dataclass_fields__"):
        vals = [getattr(out, f) for f in out.__dataclass_fields__]
    else:
        return []
    return [t for v in vals for t in _tensor_leaves(v)]


def _is_attention(mod: nn.Module) -> bool:
    return isinstance(mod, nn.MultiheadAttention) or "attention" in type(mod).__name__.lower()


def probe_layers(model: nn.Module, x: Tensor) -> LayerProbe:
    """One forward without graph, in eval mode, of 2 images (``x[:2]``, or ``x[0]`` twice if B = 1).

    Two images, so that an output whose leading dimension is not the batch shows (one image can
    give 150 proposals, two give 300); a model that only takes batch 1 is probed at batch 1.

    Picks the default CAM layer: the deepest module (execution order) that

    * runs once (a reused module's output is ambiguous; the block around it is used instead),
    * keeps the batch axis (not per-proposal / per-window outputs of detection or Swin internals),
    * outputs a ``(B, C, h, w)`` map with h*w > 1 (not tokens, vectors or channels-last maps;
      adaptive pooling is skipped: its fixed grid does not follow the image),
    * is not inside an attention block (e.g. timm ViT's ``attn.k_norm`` ``(B, heads, N, d)``),
    * is not the output head of a dense-prediction model (an output ``(B, K, H, W)``): a
      convolution to K channels and the K-channel modules right after it, with all of a head
      module (e.g. a segmentation ``classifier``) unless it holds the whole network,

    preferring a whole block over a piece of a block whose own output has no grid left (resnet50
    on a 32x32 input: ``layer3``, not ``layer4.0.bn1``). When the last such layer is followed by
    many token or channels-last modules (more than the maps before it) it is a patch-embedding
    stem (ViT, Mixer, Swin): no layer is chosen, and ``error`` says why. Model state and hooks are
    restored.
    """
    xs = x[:_PROBE_BATCH] if x.shape[0] >= _PROBE_BATCH else torch.cat([x[:1]] * _PROBE_BATCH)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    named = dict(model.named_modules())
    records: dict[str, LayerRecord] = {}

    def hook(name: str) -> Callable:
        def f(m: nn.Module, i: Any, o: Any) -> None:
            r = records.get(name)
            if r is not None:
                r.calls += 1
                return
            t = _first_tensor(o)
            records[name] = LayerRecord(name, type(m).__name__, 1, None if t is None else tuple(t.shape),
                                        len(records))
        return f

    def run(xb: Tensor) -> Any:
        records.clear()
        handles = [mod.register_forward_hook(hook(name)) for name, mod in named.items() if name]
        try:
            with torch.no_grad(), model_state(model):
                return model(xb)
        finally:
            for h in handles:
                h.remove()

    try:
        out, B = run(xs), _PROBE_BATCH
    except Exception:  # a model that only takes batch 1 (if batch 1 fails too, that error is raised)
        out, B = run(x[:1]), 1
    recs = sorted(records.values(), key=lambda r: r.order)
    p = LayerProbe(out, B, size, recs)
    _choose(p, named)
    return p


def _choose(p: LayerProbe, named: dict[str, nn.Module]) -> None:
    B, size = p.batch, p.size
    by_name = {r.name: r for r in p.records}
    spatial: list[LayerRecord] = []  # (B, C, h, w) with h*w > 1, run once or not
    for r in p.records:
        mod = named[r.name]
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or "adaptive" in r.kind.lower():
            r.reason = "adaptive pooling (its grid does not follow the image)"
        elif r.shape is None:
            r.reason = "no tensor output"
        elif (why := layout_problem(r.shape, B, size)) is not None:
            r.reason = why
        elif r.shape[2] * r.shape[3] <= 1:
            r.reason = "no spatial grid (h*w = 1)"
        else:
            att = next((a for a in _strict_ancestors(r.name) if _is_attention(named[a])), None)
            if att is not None:
                r.reason = f"inside attention block {att!r} ({type(named[att]).__name__})"
            elif r.calls > 1:
                r.reason = f"called {r.calls} times in one forward"
            spatial.append(r)
    # output head of a dense-prediction model: from a projection conv to K output channels on
    dense_k = {int(t.shape[1]) for t in _tensor_leaves(p.output)
               if t.ndim == 4 and t.shape[0] == B and t.shape[2] * t.shape[3] > 1}
    heads: list[LayerRecord] = []
    if dense_k:
        chain = False
        for r in spatial:
            mod = named[r.name]
            if r.shape[1] not in dense_k:
                chain = False
                continue
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.in_channels != mod.out_channels:
                chain = True
            if chain:
                heads.append(r)
        for r in heads:
            r.reason = r.reason or f"output head (its {r.shape[1]} channels are the output's classes)"
        head_names = {r.name for r in heads}
        for h in heads:  # a head module: all of it is head, unless it holds the whole network
            inside = [r for r in spatial if r.name.startswith(h.name + ".")]
            outside = [r for r in spatial if r.reason is None and not r.name.startswith(h.name + ".")
                       and r.name not in head_names]
            if outside:
                for r in inside:
                    r.reason = r.reason or f"inside the output head {h.name!r}"
    good = [r for r in spatial if r.reason is None]
    for r in good:  # a piece of a block whose output has no grid left (e.g. layer4.0.bn1 when layer4 is 1x1)
        r.fragment = any(a in by_name and by_name[a].shape is not None and len(by_name[a].shape) == 4
                         and by_name[a].shape[0] == B and by_name[a].shape[2] * by_name[a].shape[3] <= 1
                         for a in _strict_ancestors(r.name))
    whole = [r for r in good if not r.fragment]
    pick = (whole or good or [None])[-1]
    misses = "; ".join(r.describe() for r in p.near_misses())
    if pick is None:
        p.error = (f"no module of the model outputs a (B, C, h, w) feature map that camlens can use for a "
                   f"{size[0]}x{size[1]} input -- it needs a layer that runs once, "
                   "keeps the batch axis, has h*w > 1 and is not the output head or inside an attention block. "
                   f"Deepest modules (shapes at a probe batch of {B}): {misses or 'none'}. Pass layer= explicitly "
                   "(token and channels-last transformer layouts are not supported yet)")
        return
    after = [r for r in p.records if r.order > pick.order and not r.name.startswith(pick.name + ".")
             and r.shape is not None and r.shape[0] == B
             and ((len(r.shape) == 3 and r.shape[1] > 1) or looks_channels_last(r.shape, size))]
    maps_before = sum(1 for r in spatial if r.order <= pick.order)
    if len(after) >= _STEM_TOKENS and len(after) > maps_before:  # mostly tokens after it (not a CNN + small RNN)
        p.error = (f"it is token-based: after its patch-embedding stem {pick.name!r} ({pick.kind}, "
                   f"{tuple(pick.shape)}), {len(after)} modules output tokens (B, N, C) or channels-last "
                   f"(B, h, w, C) maps (the last: {after[-1].name} {tuple(after[-1].shape)}), which camlens cannot "
                   "read yet (transformer layouts are not supported yet), and a CAM of the stem says nothing "
                   f"about the network. Pass layer= explicitly (layer={pick.name!r} runs but explains only the "
                   "stem), or use an input-space method: method='occlusion' or 'guided_backprop'")
        return
    p.layer = pick.name


def probe(model: nn.Module, x: Tensor) -> tuple[Optional[str], Any]:
    """``(default CAM layer or None, output)`` from :func:`probe_layers` (the output is for 2 images)."""
    p = probe_layers(model, x)
    return p.layer, p.output


def guess_layer(model: nn.Module, x: Tensor) -> str:
    """The default CAM layer (see :func:`probe_layers`); a clear error listing candidates if none.

    torchvision ResNets give ``layer4``, VGG ``features``, timm EfficientNets ``bn2``.
    """
    p = probe_layers(model, x)
    if p.layer is None:
        raise LayerError(f"cannot pick a CAM layer of {type(model).__name__}: {p.error}")
    return p.layer


# ----------------------------------------------------------------------------------------------
# extra passes for perturbation and input-gradient methods

ScoreFn = Callable[[Any, int], Tensor]  # (model output for N inputs, image index b) -> (N, T)


class GuidedReLU(TorchDispatchMode):
    """Guided backpropagation for every ReLU, however it is called.

    ``nn.ReLU`` (in-place or not), ``F.relu``, ``torch.relu``, ``Tensor.relu_`` and ReLU6
    (``hardtanh(0, 6)``) all reach the same ATen backward kernels, ``threshold_backward`` and
    ``hardtanh_backward``. While this mode is active, those kernels receive ``max(grad, 0)``
    instead of ``grad``: gradient flows back only where the input was positive (the ReLU rule)
    AND the incoming gradient is positive (the deconvnet rule) — Springenberg et al.'s guided
    backpropagation. Nothing in the model is modified; leaving the block restores everything.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.ops.aten.threshold_backward.default:
            grad, inp, threshold = args
            return func(grad.clamp_min(0), inp, threshold)
        if func is torch.ops.aten.hardtanh_backward.default and float(args[2]) == 0.0:
            grad, *rest = args
            return func(grad.clamp_min(0), *rest)
        return func(*args, **kwargs)


class Runner:
    """Forward and backward passes beyond the first one, for methods that perturb the input or a layer.

    Runs with no capture hooks active, under ``torch.no_grad()`` except for input gradients;
    the caller holds :func:`model_state`. ``score(output, b)`` gives the scores ``(N, T)`` of image
    ``b``'s targets on a batch of N outputs.
    """

    def __init__(self, model: nn.Module, score: ScoreFn, layout: Optional[Layout] = None):
        self.model = model
        self.score = score
        self.layout = layout if layout is not None else Layout(model)
        self.forwards = 0  # number of forward calls, for cost reports and tests

    def _forward(self, x: Tensor, score_only: bool = False) -> Any:
        self.forwards += 1
        return self.layout.run(x, score_only)

    @torch.no_grad()
    def scores(self, x: Tensor, b: int, batch_size: int = 32) -> Tensor:
        """Scores ``(N, T)`` of image ``b``'s targets for N inputs ``x`` ``(N, C, H, W)``, in chunks."""
        return torch.cat([self.score(self._forward(x[i:i + batch_size], score_only=True), b).float()
                          for i in range(0, x.shape[0], batch_size)])

    @torch.no_grad()
    def scores_with_layer(self, layer: nn.Module, acts: Tensor, x_b: Tensor, b: int, batch_size: int = 32) -> Tensor:
        """Scores ``(N, T)`` when ``layer``'s output is replaced by each of ``acts`` ``(N, C, h, w)``.

        The input ``x_b`` ``(1, C, H, W)`` runs once per chunk at batch 1 and the batch grows at
        the layer; a model that mixes the layer's output with earlier tensors (a skip connection
        around it) is rerun with ``x_b`` repeated instead.
        """
        out = []
        expand = False
        for i in range(0, acts.shape[0], batch_size):
            chunk = acts[i:i + batch_size]
            handle = layer.register_forward_hook(lambda m, inp, o: chunk.to(_first_tensor(o).dtype))
            try:
                if not expand:
                    try:
                        out.append(self.score(self._forward(x_b), b).float())
                        continue
                    except RuntimeError:
                        expand = True  # shapes clash after the layer: repeat the input instead
                out.append(self.score(self._forward(x_b.expand(chunk.shape[0], *x_b.shape[1:])), b).float())
            finally:
                handle.remove()
        return torch.cat(out)

    def input_gradients(self, x: Tensor, b_scores: Callable[[Any], Tensor], guided: bool = False) -> tuple[Tensor, Tensor]:
        """Gradients of the scores w.r.t. the input: ``(B, T, C, H, W)`` and the scores ``(B, T)``.

        ``b_scores(output) -> (B, T)``; with ``guided=True`` every ReLU's backward is guided
        (see :class:`GuidedReLU`). One forward; the T targets share one batched backward.
        """
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            scores = b_scores(self._forward(xi))
            B, T = scores.shape
            eye = torch.eye(T, dtype=scores.dtype, device=scores.device)[:, None, :].expand(T, B, T)
            with (GuidedReLU() if guided else contextlib.nullcontext()):
                if T == 1:
                    g = torch.autograd.grad(scores, xi, grad_outputs=eye[0])[0].unsqueeze(0)
                else:
                    try:
                        g = torch.autograd.grad(scores, xi, grad_outputs=eye, is_grads_batched=True,
                                                retain_graph=True)[0]
                    except RuntimeError as err:  # an op without a vmap rule: loop over targets
                        if not _is_vmap_error(err):
                            raise
                        g = torch.stack([torch.autograd.grad(scores[:, t].sum(), xi, retain_graph=t < T - 1)[0]
                                         for t in range(T)])
        return g.transpose(0, 1), scores.detach()
