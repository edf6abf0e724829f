"""Reference computations the tests share: a layer's output captured by a plain forward hook (removed
afterwards, also on an error), for hand-written autograd references of camlens' maps."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


def forward_capturing(model: nn.Module, layer: nn.Module, x: Any, *, read: Optional[Callable[[Any], Any]] = None,
                      replace: Any = None) -> tuple[Any, Any]:
    """``(model(x), layer's output)`` from one forward with a forward hook on ``layer``; ``read`` is applied
    to the captured output (e.g. an FPN transform); ``replace``: the layer's output is replaced by it."""
    store: dict = {}

    def hook(mod: nn.Module, inputs: Any, out: Any) -> Any:
        store["a"] = out if read is None else read(out)
        return replace

    h = layer.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        h.remove()
    return out, store["a"]


def acts_grads(model: nn.Module, layer: nn.Module, x: Any, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output ``a`` and the gradient of class ``classes[b]``'s logit of image b with respect to
    it (one target per image: the images' scores summed, so each image's gradient is its own), by a forward
    hook and ``torch.autograd.grad``; both detached."""
    out, a = forward_capturing(model, layer, x)
    score = out[torch.arange(len(classes)), torch.as_tensor(list(classes))].sum()
    (g,) = torch.autograd.grad(score, a)
    return a.detach(), g.detach()
