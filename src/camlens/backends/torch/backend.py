"""The torch implementation of :class:`camlens.backends.base.Backend`."""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...core.errors import LayerError, ModelError
from . import xp
from .attention import check_attention
from .capture import capture, check_calls, check_layer_outputs
from .gradients import layer_gradients
from .inputs import call_context, check_input_tensor, check_model_tensors, images_from_uint8, to_model_input
from .layout import Layout
from .ops import TorchOps
from .probing import guess_layer, module_ids, token_prefix
from .runner import Runner
from .volume_probe import input_rank, volume_layouts
from .state import model_state, resolve_layers

__all__ = ["TorchBackend", "BACKEND", "reinitialise"]


_DEFAULT_LAYERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class TorchBackend:
    """PyTorch ``nn.Module`` models; arrays are tensors on the model's device."""

    name = "torch"
    xp = xp
    ops = TorchOps()

    def owns(self, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def images_in(self, inputs: Any) -> Any:
        return images_from_uint8(inputs)

    def maximise(self, model: nn.Module, terms: Sequence[Sequence[Any]], **kw: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Activation maximisation (:func:`camlens.visualize`): one image per objective, in one batch;
        :func:`~camlens.backends.torch.visualize.maximise` (imported on first use)."""
        from .visualize import maximise

        return maximise(model, terms, **kw)

    def layer_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_modules() if n]

    def image_size(self, model: nn.Module) -> Optional[tuple[int, int]]:
        """``None``: a module says nothing of its input size."""
        return None

    def check_inputs(self, inputs: Any) -> Tensor:
        return check_input_tensor(inputs)

    def input_rank(self, model: nn.Module) -> Optional[int]:
        """5 for a 3-D CNN (a single ``(C, D, H, W)`` volume is then batch 1), 4 for a 2-D one, or ``None``."""
        return input_rank(model)

    def volume_layouts(self, model: nn.Module, x: Tensor, names: list[str]) -> dict:
        """:func:`~camlens.backends.torch.volume_probe.volume_layouts`: (B, C, d, h, w), channels-last
        (B, d, h, w, C) or clip tokens (B, P + t*h*w, C), from one memoised probe forward."""
        return volume_layouts(model, x, names)

    def to_model_input(self, model: nn.Module, x: Tensor, precision: str) -> Tensor:
        return to_model_input(model, x, precision)

    def call_context(self) -> contextlib.AbstractContextManager:
        return call_context()

    def explain_failure(self, err: BaseException, model: nn.Module) -> None:
        if isinstance(err, RuntimeError) and "nference tensor" in str(err):
            check_model_tensors(model)  # raises ModelRuntimeError naming the tensor

    def graph(self, enabled: bool) -> contextlib.AbstractContextManager:
        return torch.enable_grad() if enabled else torch.no_grad()

    def session(self, model: nn.Module, *, eval_mode: bool = True, freeze: bool = True,
                restore_buffers: bool = True) -> contextlib.AbstractContextManager:
        return model_state(model, eval_mode=eval_mode, freeze=freeze, restore_buffers=restore_buffers)

    def resolve_layers(self, model: nn.Module, spec: Any) -> list[tuple[str, nn.Module]]:
        return resolve_layers(model, spec)

    def default_layer(self, model: nn.Module, x: Tensor) -> str:
        """:func:`guess_layer`, memoised per model for inputs of the same ``(C, H, W)``, dtype and device
        while the model holds the same modules (a probe forward costs about two forwards: without the
        memo ``layer=None`` would double every call)."""
        key = (module_ids(model), tuple(x.shape[1:]), x.dtype, x.device)
        memo = _DEFAULT_LAYERS.get(model)
        if memo is not None and key in memo:
            return memo[key]
        name = guess_layer(model, x)
        try:
            memo = _DEFAULT_LAYERS.setdefault(model, {})
        except TypeError:  # a model that cannot be weakly referenced: no memo
            return name
        if len(memo) >= 8:
            memo.clear()
        memo[key] = name
        return name

    def layout(self, model: nn.Module, channels_last: Optional[bool], precision: str) -> Layout:
        return Layout(model, channels_last, precision)

    def capture(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]], *, grad: bool, linear: bool,
                full_graph: bool, attention: bool = False) -> contextlib.AbstractContextManager:
        return capture(model, layers, grad=grad, linear=linear, full_graph=full_graph, attention=attention)

    def check_capture(self, cap: Any, layers: Sequence[tuple[str, nn.Module]], model: nn.Module, x: Tensor,
                      read: Optional[Any] = None) -> None:
        check_calls(cap, layers)
        check_layer_outputs(cap, layers, model, x, read)
        if cap.attentions is not None:
            cap.attention_layout = check_attention(cap.attentions, model, x, token_prefix(model))

    def target_gradients(self, scores: Tensor, acts: Sequence[Any], names: Sequence[str], labels: Sequence[str], *,
                         create_graph: bool = False, targets: Any = None) -> list[Any]:
        """:func:`layer_gradients`; a dict of activations (a layer with a dict output) gets a dict of
        gradients ``(B, T, ...)``, its values taken in the same batched backward (zeros for a value
        the scores do not read, e.g. the FPN level only the detached proposals use)."""
        flat, where = [], []  # every tensor, and (layer index, dict key or None) for each
        for i, a in enumerate(acts):
            items = a.items() if isinstance(a, Mapping) else [(None, a)]
            for k, v in items:
                flat.append(v)
                where.append((i, k))
        gs = layer_gradients(scores, flat, [f"{names[i]}[{k!r}]" if k is not None else names[i] for i, k in where],
                             labels, create_graph=create_graph, unused_zero=[i if k is not None else None for i, k in where])
        out: list[Any] = [None] * len(acts)
        for (i, k), g in zip(where, gs):
            if k is None:
                out[i] = g
            else:
                out[i] = {**(out[i] or {}), k: g}
        return out

    def runner(self, model: nn.Module, score_image: Callable[[Any, int], Tensor], layout: Layout,
               targets: Any = None) -> Runner:
        """The :class:`Runner` (``targets`` unused: torch scores carry their graph)."""
        return Runner(model, score_image, layout)

    def linear_head(self, cap: Any, head: Tensor, acts: Tensor, layer: str, model: nn.Module, head_name: str) -> Tensor:
        """The weight ``(K, C)`` of the ``nn.Linear`` whose output is ``head`` and whose input is the
        global average pool of ``acts`` ``(B, C, h, w)`` (within fp16/bf16 rounding)."""
        linear_io = cap.linear_io
        pooled = acts.detach().float().mean(dim=(2, 3))
        producers = [n for n, (_, o) in linear_io.items() if o is head or (o.shape == head.shape and torch.equal(o, head))]
        if not producers:
            raise ModelError(f"CAM needs output {head_name!r} to come straight from an nn.Linear layer; none of the "
                             f"model's Linear layers ({list(linear_io) or 'none'}) produced it. Use method='gradcam', "
                             "which works on any architecture.")
        name = producers[-1]
        inp = linear_io[name][0]
        tol = max(1e-4, 8 * torch.finfo(inp.dtype).eps)  # fp16/bf16 forwards round the pooled features
        inp = inp.float()
        if inp.shape != pooled.shape or not torch.allclose(inp, pooled, rtol=tol,
                                                           atol=tol / 10 * (1 + pooled.abs().max().item())):
            raise ModelError(f"CAM needs the input of Linear {name!r} to be the global average pool of layer {layer!r}: "
                             f"its input has shape {tuple(inp.shape)}, while GAP({layer}) has shape {tuple(pooled.shape)}"
                             + ("" if inp.shape != pooled.shape else " but different values (other layers in between)")
                             + ". Pick the layer right before the global pooling, or use method='gradcam'.")
        return model.get_submodule(name).weight.detach()

    def randomized_copy(self, model: nn.Module, layers: Sequence[str], seed: int) -> nn.Module:
        """A deep copy with each named module's own parameters re-initialised (:func:`reinitialise`,
        seed ``seed + i`` for the i-th); the model itself is never modified."""
        net = copy.deepcopy(model)
        self.reinitialise_layers(net, layers, seed)
        return net

    # --- for metrics/
    def layer_order(self, model: nn.Module, x: Tensor) -> list[str]:
        """Modules with parameters of their own (``recurse=False``) that run on ``x``, in order of
        their first call, found by forward pre-hooks (removed afterwards) on one ``no_grad`` forward."""
        units = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        seen: dict[int, int] = {}

        def hook(i: int) -> Callable[..., None]:
            def record(mod: nn.Module, inp: object) -> None:  # must return None: a value would replace the input
                seen.setdefault(i, len(seen))
            return record

        handles = [m.register_forward_pre_hook(hook(i)) for i, (_, m) in enumerate(units)]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
        return [units[i][0] for i in sorted(seen, key=seen.__getitem__)]

    def reinitialise_layers(self, model: nn.Module, layers: Sequence[str], seed: int) -> None:
        """:func:`reinitialise` on each named module of ``model`` in place, seed ``seed + i`` for the i-th."""
        for i, name in enumerate(layers):
            try:
                mod = model.get_submodule(name)
            except AttributeError as err:
                raise LayerError(f"no layer named {name!r} to randomise") from err
            reinitialise(mod, seed + i)


@torch.no_grad()
def reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters in place, seeded, the global RNG untouched:
    ``module.reset_parameters()`` where it exists (the layer's default initialisation), otherwise
    each parameter drawn from ``N(0, std(p)^2)`` (0.02 for a constant one)."""
    devices = [p.device for p in module.parameters(recurse=False) if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):
        torch.manual_seed(seed)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            return
        for p in module.parameters(recurse=False):
            s = float(p.float().std()) if p.numel() > 1 else 0.0
            p.normal_(0.0, s if s > 0 else 0.02)


BACKEND = TorchBackend()
