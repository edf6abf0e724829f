"""The Grad-CAM family: Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, Eigen-CAM, Eigen-Grad-CAM.

Each is a few lines of tensor math on the layer activations ``A`` ``(B, C, h, w)`` and the
gradients ``G = dS/dA`` ``(B, T, C, h, w)`` of the T target scores; the result is the raw map
``(B, T, h, w)`` before ReLU, upsampling and normalisation (:mod:`camlens.postprocess`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ActivationMethod, GradientMethod, register

_ONE_PASS = "1 forward + 1 batched backward for all targets"


def _weighted(weights: Tensor, acts: Tensor) -> Tensor:
    """``sum_c weights[b, t, c] * A[b, c]``: weights ``(B, T, C)`` -> ``(B, T, h, w)``."""
    return torch.einsum("btc,bchw->bthw", weights, acts)


def gradcam_pp(acts: Tensor, grads: Tensor, eps: float = 1e-6) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) with the exponential closed form (their eq. 19).

    With ``Y = exp(S)`` the higher derivatives are powers of the first, so
    ``alpha = G^2 / (2 G^2 + sum_ij(A) * G^3 + eps)`` (0 where ``G == 0``) and
    ``w_c = sum_ij alpha * ReLU(G)``; the map is ``sum_c w_c A_c``. Same as pytorch-grad-cam.
    """
    g2 = grads.pow(2)
    sum_a = acts.sum(dim=(-2, -1))[:, None, :, None, None]  # (B, 1, C, 1, 1)
    alpha = g2 / (2 * g2 + sum_a * g2 * grads + eps)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * grads.clamp_min(0)).sum(dim=(-2, -1))
    return _weighted(weights, acts)


def xgradcam(acts: Tensor, grads: Tensor, eps: float = 1e-7) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): ``w_c = sum_ij(G * A) / (sum_ij A + eps)``, map ``sum_c w_c A_c``."""
    num = (grads * acts[:, None]).sum(dim=(-2, -1))
    den = acts.sum(dim=(-2, -1))[:, None] + eps
    return _weighted(num / den, acts)


def hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin 2020): element-wise ``sum_c G_c * A_c`` (no spatial averaging)."""
    return (grads * acts[:, None]).sum(dim=2)


def layercam(acts: Tensor, grads: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): ``sum_c ReLU(G_c) * A_c``; meant for inner layers too."""
    return (grads.clamp_min(0) * acts[:, None]).sum(dim=2)


def first_component(x: Tensor) -> Tensor:
    """Projection of each map onto its first principal component.

    ``x`` ``(N, C, h, w)`` is read as ``h*w`` samples of ``C`` features, centred per feature; the
    result ``(N, h, w)`` is ``X_c @ v1`` with ``v1`` the first right singular vector (batched SVD
    on the tensor's device). SVD leaves the sign of ``v1`` arbitrary; camlens fixes it so the
    projection correlates positively with the channel sum ``sum_c x_c`` — the component points
    towards "more activation", so the map does not flip between runs, devices or libraries.
    """
    n, c, h, w = x.shape
    X = x.reshape(n, c, h * w).transpose(1, 2).float()  # (N, hw, C)
    X = torch.nan_to_num(X)
    Xc = X - X.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(Xc, full_matrices=False)
    proj = Xc @ vh[:, 0, :, None]  # (N, hw, 1)
    proj = proj[..., 0]
    ref = X.sum(dim=2)
    ref = ref - ref.mean(dim=1, keepdim=True)
    sign = torch.sign((proj * ref).sum(dim=1, keepdim=True))
    proj = proj * torch.where(sign == 0, torch.ones_like(sign), sign)
    return proj.reshape(n, h, w).to(x.dtype)


def eigencam(acts: Tensor, n_targets: int) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): the first principal component of the activations.

    Class-agnostic: every target of an image gets the same map ``(B, T, h, w)``.
    """
    return first_component(acts)[:, None].expand(-1, n_targets, -1, -1)


def eigengradcam(acts: Tensor, grads: Tensor) -> Tensor:
    """Eigen-Grad-CAM: the first principal component of ``G * A``, per target."""
    B, T = grads.shape[:2]
    prod = (grads * acts[:, None]).flatten(0, 1)  # (B*T, C, h, w)
    return first_component(prod).reshape(B, T, *acts.shape[-2:])


GRADCAM_PP = register(GradientMethod(
    name="gradcampp", description="Grad-CAM++: positive gradients weighted by second/third-order terms "
                                  "(exp closed form)", cost=_ONE_PASS, fn=gradcam_pp))
XGRADCAM = register(GradientMethod(
    name="xgradcam", description="XGrad-CAM: gradients x activations normalised by the activation sum",
    cost=_ONE_PASS, fn=xgradcam))
HIRESCAM = register(GradientMethod(
    name="hirescam", description="HiResCAM: element-wise gradients x activations, summed over channels "
                                 "(faithful to the score)", cost=_ONE_PASS, fn=hirescam))
LAYERCAM = register(GradientMethod(
    name="layercam", description="LayerCAM: positive gradients x activations per location; good on inner layers",
    cost=_ONE_PASS, fn=layercam))
EIGENCAM = register(ActivationMethod(
    name="eigencam", description="Eigen-CAM: first principal component of the activations (class-agnostic)",
    cost="1 forward, no backward; one SVD per image", fn=eigencam))
EIGENGRADCAM = register(GradientMethod(
    name="eigengradcam", description="Eigen-Grad-CAM: first principal component of gradients x activations",
    cost=_ONE_PASS + "; one SVD per target", fn=eigengradcam,
    differentiable=False))  # an SVD's sign is fixed by hand and its gradient is unstable at near-equal values
