"""Grad-CAM (Selvaraju et al., 2017).

Channel weights are the spatial mean of the gradients of the (pre-softmax) score,
``w[b, t, c] = mean_ij dS[b, t] / dA[b, c, i, j]``, and the map is the weighted sum of the
channels, ``raw[b, t] = sum_c w[b, t, c] * A[b, c]``; ReLU, upsampling and normalisation follow in
:mod:`camlens.postprocess`.
"""

from __future__ import annotations

from ..backends.base import namespace
from .base import GradientMethod, Tensor, register


def gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    """acts ``(B, C, h, w)``, grads ``(B, T, C, h, w)`` -> raw maps ``(B, T, h, w)``."""
    xp = namespace(acts, grads)
    weights = xp.mean(grads, axis=(-2, -1))  # (B, T, C)
    return weighted_sum(xp, weights, acts)


def weighted_sum(xp: object, weights: Tensor, acts: Tensor) -> Tensor:
    """``sum_c weights[b, t, c] * A[b, c]``: weights ``(B, T, C)``, acts ``(B, C, h, w)`` -> ``(B, T, h, w)``,
    as one batched matrix product ``(B, T, C) @ (B, C, h*w)``."""
    B, C, h, w = acts.shape
    return xp.reshape(xp.matmul(weights, xp.reshape(acts, (B, C, h * w))), (B, weights.shape[1], h, w))


GRADCAM = register(GradientMethod(
    name="gradcam",
    description="Grad-CAM: channels weighted by the spatial mean of the target's gradients",
    cost="1 forward + 1 batched backward for all targets",
    fn=gradcam,
))
