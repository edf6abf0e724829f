"""Guided backpropagation's ReLU rule as a dispatch mode (no model edits)."""

from __future__ import annotations


import torch
from torch.utils._python_dispatch import TorchDispatchMode


#: Backward kernels of activations that are not ReLUs -> their names: guided backpropagation's rule
#: is defined for ReLUs only, so through these the gradient would pass unguided.
NON_RELU_BACKWARD = {"gelu_backward": "GELU", "silu_backward": "SiLU", "mish_backward": "Mish",
                     "elu_backward": "ELU/SELU/CELU", "hardswish_backward": "Hardswish",
                     "softplus_backward": "Softplus", "leaky_relu_backward": "LeakyReLU",
                     "hardsigmoid_backward": "Hardsigmoid", "tanh_backward": "Tanh"}


class GuidedReLU(TorchDispatchMode):
    """Guided backpropagation for every ReLU, however it is called.

    ``nn.ReLU`` (in-place or not), ``F.relu``, ``torch.relu``, ``Tensor.relu_`` and ReLU6
    (``hardtanh(0, 6)``) all reach the same ATen backward kernels, ``threshold_backward`` and
    ``hardtanh_backward``. While this mode is active, those kernels receive ``max(grad, 0)``
    instead of ``grad``: gradient flows back only where the input was positive (the ReLU rule)
    AND the incoming gradient is positive (the deconvnet rule) — Springenberg et al.'s guided
    backpropagation. Nothing in the model is modified; leaving the block restores everything.
    Backward kernels of other activations (:data:`NON_RELU_BACKWARD`) pass unchanged and are
    recorded in ``unguided`` (the caller decides whether that is an error).
    """

    def __init__(self) -> None:
        super().__init__()
        self.unguided: set[str] = set()  # backward kernels of other activations seen (GELU, SiLU, ...)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in NON_RELU_BACKWARD:
            self.unguided.add(NON_RELU_BACKWARD[name])
        if func is torch.ops.aten.threshold_backward.default:
            grad, inp, threshold = args
            return func(grad.clamp_min(0), inp, threshold)
        if func is torch.ops.aten.hardtanh_backward.default and float(args[2]) == 0.0:
            grad, *rest = args
            return func(grad.clamp_min(0), *rest)
        return func(*args, **kwargs)
