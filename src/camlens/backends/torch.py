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

LayerSpec = Union[str, nn.Module]

__all__ = ["LayerSpec", "resolve_layers", "model_state", "capture", "Capture", "layer_gradients",
           "guess_layer", "probe", "model_device", "GuidedReLU", "Runner", "PRECISIONS", "autocast",
           "Layout"]


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
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
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
    the model is left as it came; the numbers are the same up to float rounding.

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
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be None (auto), True or False, got {self.channels_last!r}")
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
                raise ValueError(f"module {type(spec).__name__} is not a submodule of the model")
            out.append((by_id[id(spec)] or "<model>", spec))
            continue
        if not isinstance(spec, str):
            raise TypeError(f"a layer is a dotted name or an nn.Module, got {type(spec).__name__}")
        name = spec.strip()
        if name not in named:
            close = difflib.get_close_matches(name, [n for n in named if n], n=8, cutoff=0.5)
            if not close:
                close = [n for n in named if n and "." not in n][:12]
            raise KeyError(f"no layer named {spec!r} in {type(model).__name__}; closest valid names: {close}")
        out.append((name, named[name]))
    if not out:
        raise ValueError("no layer given")
    return out


@contextlib.contextmanager
def model_state(model: nn.Module, *, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters for the block; restore exactly on exit.

    Restores every submodule's ``training`` flag and every parameter's ``requires_grad``, also
    when the block raises. Hooks are the caller's to remove (see :func:`capture`).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for p, _ in flags:
                p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, rg in flags:
            p.requires_grad_(rg)


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


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], *, grad: bool = True,
            linear: bool = False) -> Iterator[Capture]:
    """Hooks ``layers`` for the block; yields a :class:`Capture` filled by the next forward.

    With ``grad=True`` the forward should run under ``torch.no_grad()``: the first captured layer
    switches grad mode on, so only the part of the network after it records a graph. Grad mode
    and all hooks are restored on exit.
    """
    cap = Capture()
    handles = []
    grad_mode = torch.is_grad_enabled()

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, out: Any) -> Any:
            cap.calls[name] = cap.calls.get(name, 0) + 1
            t = _first_tensor(out)
            if t is None:
                raise TypeError(f"layer {name!r} returned {type(out).__name__}; camlens needs a tensor output")
            if not grad:
                cap.activations[name] = t.detach()
                return None
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
            raise RuntimeError(f"layer {name!r} ({type(mod).__name__}) was never called in the forward pass, "
                               "so it has no activations; pick a module on the path from input to output")
        if n > 1:
            raise RuntimeError(f"layer {name!r} ({type(mod).__name__}) was called {n} times in one forward pass "
                               "(a module reused, e.g. one activation module applied twice); pick a module that "
                               "runs once, such as the block or norm layer around it")


def _is_vmap_error(err: BaseException) -> bool:
    """An error from vmap's batching of the backward (an op without a batching rule)."""
    msg = str(err).lower()
    return "vmap" in msg or "batch" in msg


def layer_gradients(scores: Tensor, acts: Sequence[Tensor], names: Sequence[str], labels: Sequence[str]) -> list[Tensor]:
    """Gradients of each target score w.r.t. each activation, in one batched backward.

    Args:
        scores: ``(B, T)`` scores; image ``b`` depends only on input ``b`` (eval mode).
        acts: activations ``(B, C, h, w)`` (any shape with leading B).
        names, labels: layer names and target labels, for error messages.

    Returns:
        per activation, gradients ``(B, T, *act.shape[1:])``.

    Uses ``grad_outputs = e_t`` (one-hot over T, broadcast over B) batched with vmap; since
    images are independent, summing over B in the vector-Jacobian product is exact.
    """
    if not scores.requires_grad:
        raise RuntimeError("the explained scores do not depend on any captured layer through autograd "
                           "(the model detaches its output, runs under no_grad, or leaves torch)")
    B, T = scores.shape
    eye = torch.eye(T, dtype=scores.dtype, device=scores.device)
    eye = eye[:, None, :].expand(T, B, T)
    try:
        # retain_graph when batched: if vmap fails half-way, the per-target fallback needs the graph
        grads = torch.autograd.grad(scores, list(acts), grad_outputs=eye if T > 1 else eye[0],
                                    is_grads_batched=T > 1, allow_unused=True, retain_graph=T > 1)
        if T == 1:
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
    except RuntimeError as err:  # an op without a vmap rule: fall back to a loop over targets
        if T == 1 or not _is_vmap_error(err):
            raise
        per_t = [torch.autograd.grad(scores[:, t].sum(), list(acts), retain_graph=t < T - 1, allow_unused=True)
                 for t in range(T)]
        grads = [None if per_t[0][i] is None else torch.stack([g[i] for g in per_t]) for i in range(len(acts))]
    out = []
    for g, name in zip(grads, names):
        if g is None:
            raise RuntimeError(f"the target scores {list(labels)} do not depend on layer {name!r}: no gradient "
                               "path from this layer to the explained output (is it on another branch?)")
        out.append(g.transpose(0, 1))  # (T, B, ...) -> (B, T, ...)
    return out


def probe(model: nn.Module, x: Tensor) -> tuple[Optional[str], Any]:
    """One forward without graph, in eval mode: ``(last spatial layer name or None, output)``.

    The last spatial layer is the last module (in execution order) whose output is a map
    ``(B, C, h, w)`` with h*w > 1; adaptive pooling modules are skipped (their fixed grid, e.g.
    VGG's 7x7 ``avgpool``, does not follow the image). Model state and hooks are restored.
    """
    order: list[str] = []
    skip = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

    def hook(name: str) -> Callable:
        def f(m: nn.Module, i: Any, o: Any) -> None:
            t = _first_tensor(o)
            if t is not None and t.ndim == 4 and t.shape[-1] * t.shape[-2] > 1:
                order.append(name)
        return f

    handles = []
    try:
        for name, mod in model.named_modules():
            if name and not isinstance(mod, skip):
                handles.append(mod.register_forward_hook(hook(name)))
        with torch.no_grad(), model_state(model):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return (order[-1] if order else None), out


def guess_layer(model: nn.Module, x: Tensor) -> str:
    """The last spatial layer of the forward pass (see :func:`probe`).

    torchvision ResNets give ``layer4``, VGG ``features``, timm EfficientNets ``bn2``.
    """
    name, _ = probe(model, x)
    if name is None:
        raise ValueError(f"no module of {type(model).__name__} outputs a spatial (B, C, h, w) map with h*w > 1 for "
                         f"an input of shape {tuple(x.shape)}; CAMs need a convolutional feature layer: pass layer=")
    return name


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
