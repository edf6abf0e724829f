"""Grad-CAM (Selvaraju et al., 2017).

Channel weights are the spatial mean of the gradients of the (pre-softmax) score,
``w[b, t, c] = mean_ij dS[b, t] / dA[b, c, i, j]``, and the map is the weighted sum of the
channels, ``raw[b, t] = sum_c w[b, t, c] * A[b, c]``; ReLU, upsampling and normalisation follow in
:mod:`camlens.postprocess`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientMethod, register


def gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    """acts ``(B, C, h, w)``, grads ``(B, T, C, h, w)`` -> raw maps ``(B, T, h, w)``."""
    weights = grads.mean(dim=(-2, -1))  # (B, T, C)
    return torch.matmul(weights, acts.flatten(2)).unflatten(-1, acts.shape[-2:])  # (B, T, C) @ (B, C, hw)


GRADCAM = register(GradientMethod(
    name="gradcam",
    description="Grad-CAM: channels weighted by the spatial mean of the target's gradients",
    cost="1 forward + 1 batched backward for all targets",
    fn=gradcam,
))
