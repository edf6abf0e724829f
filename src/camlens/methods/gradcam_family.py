"""The Grad-CAM family: Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, Eigen-CAM, Eigen-Grad-CAM.

Each is a few lines of tensor math on the layer activations ``A`` ``(B, C, h, w)`` and the
gradients ``G = dS/dA`` ``(B, T, C, h, w)`` of the T target scores; the result is the raw map
``(B, T, h, w)`` before ReLU, upsampling and normalisation (:mod:`camlens.postprocess`).
"""

from __future__ import annotations

from ..backends.base import namespace
from ..core.registry import Option, one_of
from .base import ActivationMethod, GradientMethod, Tensor, register
from .gradcam import weighted_sum

_ONE_PASS = "1 forward + 1 batched backward for all targets"


ALPHA_NORMS = ("closed_form", "spatial_sum")


def gradcam_pp(acts: Tensor, grads: Tensor, eps: float = 1e-6, alpha: str = "closed_form") -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) with the exponential closed form (their eq. 19).

    With ``Y = exp(S)`` the higher derivatives are powers of the first, so
    ``alpha = G^2 / (2 G^2 + sum_ij(A) * G^3 + eps)`` (0 where ``G == 0``) and
    ``w_c = sum_ij alpha * ReLU(G)``; the map is ``sum_c w_c A_c``. Same as pytorch-grad-cam.

    ``alpha="spatial_sum"`` is tf-keras-vis' convention (``GradcamPlusPlus``, 0.8.7): no ``eps``
    (a zero denominator counts as 1), and each channel's alphas are divided by their spatial sum,
    ``alpha'_ij = alpha_ij / sum_kl alpha_kl`` (a zero sum counts as 1). tf-keras-vis also keeps
    the factor ``exp(S)`` of its first derivative in ``w_c``, so its raw maps are ``exp(S)`` times
    these (a positive factor per target: the same after min-max).
    """
    xp = namespace(acts, grads)
    g2 = grads * grads
    sum_a = xp.sum(acts, axis=(-2, -1))[:, None, :, None, None]  # (B, 1, C, 1, 1)
    den = 2 * g2 + sum_a * g2 * grads
    if alpha == "spatial_sum":
        a = g2 / xp.where(den == 0, xp.ones_like(den), den)
        a = xp.where(grads != 0, a, xp.zeros_like(a))
        total = xp.sum(a, axis=(-2, -1), keepdims=True)  # (B, T, C, 1, 1)
        a = a / xp.where(total == 0, xp.ones_like(total), total)
    else:
        a = g2 / (den + eps)
        a = xp.where(grads != 0, a, xp.zeros_like(a))
    weights = xp.sum(a * xp.clip(grads, min=0), axis=(-2, -1))
    return weighted_sum(xp, weights, acts)


def xgradcam(acts: Tensor, grads: Tensor, eps: float = 1e-7) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): ``w_c = sum_ij(G * A) / (sum_ij A + eps)``, map ``sum_c w_c A_c``."""
    xp = namespace(acts, grads)
    num = xp.sum(grads * acts[:, None], axis=(-2, -1))
    den = xp.sum(acts, axis=(-2, -1))[:, None] + eps
    return weighted_sum(xp, num / den, acts)


def hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin 2020): element-wise ``sum_c G_c * A_c`` (no spatial averaging)."""
    return namespace(acts, grads).sum(grads * acts[:, None], axis=2)


def layercam(acts: Tensor, grads: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): ``sum_c ReLU(G_c) * A_c``; meant for inner layers too."""
    xp = namespace(acts, grads)
    return xp.sum(xp.clip(grads, min=0) * acts[:, None], axis=2)


def first_component(x: Tensor) -> Tensor:
    """Projection of each map onto its first principal component.

    ``x`` ``(N, C, h, w)`` is read as ``h*w`` samples of ``C`` features, centred per feature; the
    result ``(N, h, w)`` is ``X_c @ v1`` with ``v1`` the first right singular vector (batched SVD
    on the tensor's device). SVD leaves the sign of ``v1`` arbitrary; camlens fixes it so the
    projection correlates positively with the channel sum ``sum_c x_c`` — the component points
    towards "more activation", so the map does not flip between runs, devices or libraries.
    """
    xp = namespace(x)
    n, c, h, w = x.shape
    X = xp.permute_dims(xp.reshape(xp.astype(x, xp.float32, copy=False), (n, c, h * w)), (0, 2, 1))  # (N, hw, C)
    big = xp.finfo(xp.float32).max  # NaN -> 0, +-inf -> the largest float (as torch.nan_to_num)
    X = xp.where(xp.isnan(X), xp.zeros_like(X), xp.clip(X, min=-big, max=big))
    Xc = X - xp.mean(X, axis=1, keepdims=True)
    vh = xp.linalg.svd(Xc, full_matrices=False)[2]
    proj = (Xc @ vh[:, 0, :, None])[..., 0]  # (N, hw)
    ref = xp.sum(X, axis=2)
    ref = ref - xp.mean(ref, axis=1, keepdims=True)
    sign = xp.sign(xp.sum(proj * ref, axis=1, keepdims=True))
    proj = proj * xp.where(sign == 0, xp.ones_like(sign), sign)
    return xp.astype(xp.reshape(proj, (n, h, w)), x.dtype, copy=False)


def eigencam(acts: Tensor, n_targets: int) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): the first principal component of the activations.

    Class-agnostic: every target of an image gets the same map ``(B, T, h, w)``.
    """
    xp = namespace(acts)
    B, _, h, w = acts.shape
    return xp.broadcast_to(first_component(acts)[:, None], (B, n_targets, h, w))


def eigengradcam(acts: Tensor, grads: Tensor) -> Tensor:
    """Eigen-Grad-CAM: the first principal component of ``G * A``, per target."""
    xp = namespace(acts, grads)
    B, T, C, h, w = grads.shape
    prod = xp.reshape(grads * acts[:, None], (B * T, C, h, w))
    return xp.reshape(first_component(prod), (B, T, h, w))


GRADCAM_PP = register(GradientMethod(
    name="gradcampp", description="Grad-CAM++: positive gradients weighted by second/third-order terms "
                                  "(exp closed form)", cost=_ONE_PASS, fn=gradcam_pp,
    options={"alpha": Option("closed_form", one_of(*ALPHA_NORMS),
                             "'closed_form' (the paper, pytorch-grad-cam) or 'spatial_sum' (alphas divided by "
                             "their spatial sum, as tf-keras-vis)")}))
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
