"""Guided backpropagation's ReLU rule as a dispatch mode (no model edits)."""

from __future__ import annotations


import torch
from torch.utils._python_dispatch import TorchDispatchMode


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
