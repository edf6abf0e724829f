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

from ..base import layout_problem, looks_channels_last
from .backend import BACKEND, TorchBackend
from .capture import Capture, capture, check_calls, check_layer_outputs
from .gradients import layer_gradients
from .guided import GuidedReLU
from .layout import PRECISIONS, Layout, autocast, model_device
from .ops import TorchOps
from .probing import LayerProbe, LayerRecord, guess_layer, probe, probe_layers
from .runner import Runner
from .state import LayerSpec, first_tensor, model_state, resolve_layers

__all__ = ["LayerSpec", "resolve_layers", "model_state", "capture", "Capture", "layer_gradients",
           "guess_layer", "probe", "model_device", "GuidedReLU", "Runner", "PRECISIONS", "autocast",
           "Layout", "check_calls", "check_layer_outputs", "probe_layers", "LayerProbe", "LayerRecord",
           "layout_problem", "looks_channels_last", "first_tensor", "TorchOps", "TorchBackend", "BACKEND"]
