"""Transformer-native maps from the attention probabilities of every block.

The engine records ``A_l`` ``(B, heads, N, N)``, the softmax attention of block ``l = 1..L`` over the
``N`` tokens (``prefix`` class / register tokens first, then the ``h x w`` patches row by row), and,
for the relevance method, ``G_l = dS[b, t] / dA_l`` ``(B, T, heads, N, N)`` for the T target scores
(one batched backward). No layer is used.

Attention rollout (Abnar & Zuidema, 2020), class-agnostic:

    F_l   = fuse_heads(A_l)                    mean / max / min over heads          (B, N, N)
    F_l   = F_l with its smallest discard_ratio * N^2 entries set to 0 (optional; the class token's
            own entry F_l[cls, cls] is kept, as in jacobgil's vit-explain)
    Â_l   = (0.5 F_l + 0.5 I), each row divided by its sum                           (residual path)
    Roll  = Â_L ... Â_2 Â_1
    map   = Roll[cls, prefix:] on the patch grid                                       (B, h, w)

The map is the same for every target (the attention does not depend on the class): all T maps of
an image are equal. Differences from vit-explain: rows are renormalised correctly (vit-explain's
``a / a.sum(dim=-1)`` divides column j by row j's sum) and discarding is per image (it zeroes entries
of the first image only).

Attention relevance (Chefer, Gur & Wolf, CVPR 2021, "Generic Attention-model Explainability...", the
rule for self-attention encoders such as ViT), per target:

    Ā_l   = mean_heads( max(G_l ⊙ A_l, 0) )                                          (B, T, N, N)
    R     = I;  R <- R + Ā_l R   for l = 1..L,   i.e.  R = (I + Ā_L) ... (I + Ā_1)
    map   = R[cls, prefix:] on the patch grid                                          (B, T, h, w)

The gradients are those of the pre-softmax target scores (the engine's scores, as in Chefer's code).

The class row: the first token when the model has prefix tokens (timm ``num_prefix_tokens``,
torchvision's class token). Models without any (e.g. timm ``class_token=False, global_pool="avg"``)
have no class token: the map is then the MEAN over all query rows, ``mean_i Roll[i, :]`` (resp.
``mean_i R[i, :]``), the relevance of each patch to the average-pooled output tokens.

Only the row is needed, so the product is taken from the left, one row vector at a time:
``r <- r Â_l`` (resp. ``r <- r + r Ā_l``) for ``l = L..1`` starting at ``r = e_cls`` (``O(L N^2)``
instead of ``O(L N^3)``; the same numbers as the matrix product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backends.base import MapLayout, namespace, ops_for
from ..core.registry import Option, one_of
from .base import Method, MethodContext, MethodOutput, Tensor, register

__all__ = ["attention_rollout", "attention_relevance", "AttentionRollout", "AttentionRelevance",
           "ATTENTION_ROLLOUT", "ATTENTION_RELEVANCE", "HEAD_FUSIONS"]

HEAD_FUSIONS = ("mean", "max", "min")


def _readout(xp: Any, layout: MapLayout, like: Tensor, lead: tuple[int, ...]) -> Tensor:
    """The row vector ``e`` ``(*lead, 1, N)`` that reads the map out: the class token's one-hot
    (``prefix > 0``) or ``1/N`` everywhere (no class token: the mean over the rows)."""
    N = like.shape[-1]
    if layout.prefix > 0:
        e = xp.astype(xp.arange(N, device=like.device) == 0, like.dtype)
    else:
        e = xp.full((N,), 1.0 / N, dtype=like.dtype, device=like.device)
    return xp.broadcast_to(xp.reshape(e, (1,) * len(lead) + (1, N)), (*lead, 1, N))


def _to_grid(xp: Any, row: Tensor, layout: MapLayout) -> Tensor:
    """``(..., 1, N)`` read-out rows -> ``(..., h, w)`` maps of the patch tokens."""
    h, w = layout.grid
    return xp.reshape(row[..., 0, layout.prefix:], (*row.shape[:-2], h, w))


def _discard(fused: Tensor, ratio: float, keep_first: bool) -> Tensor:
    """``fused`` ``(B, N, N)`` with the ``floor(ratio * N^2)`` smallest entries of each image set to 0
    (ties broken as ``Ops.topk``); entry ``[0, 0]`` (class to class) kept when ``keep_first``."""
    B, N, _ = fused.shape
    k = int(ratio * N * N)
    if k == 0:
        return fused
    xp = namespace(fused)
    flat = xp.reshape(fused, (B, N * N))
    drop = ops_for(fused).top_mask(-flat, k)  # True at the k smallest
    if keep_first:
        drop = drop & (xp.arange(N * N, device=fused.device) != 0)
    return xp.reshape(xp.where(drop, xp.zeros_like(flat), flat), (B, N, N))


def attention_rollout(attention: list, layout: MapLayout, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout: ``attention`` (L arrays ``(B, heads, N, N)``, in block order) -> maps
    ``(B, h, w)`` (see the module docstring)."""
    xp = namespace(*attention)
    row = _readout(xp, layout, attention[0], (attention[0].shape[0],))  # (B, 1, N)
    N = attention[0].shape[-1]
    eye = xp.eye(N, dtype=attention[0].dtype, device=attention[0].device)
    for a in reversed(attention):
        fused = getattr(xp, head_fusion)(a, axis=1)  # (B, N, N)
        fused = _discard(fused, discard_ratio, keep_first=layout.prefix > 0)
        a_hat = 0.5 * fused + 0.5 * eye
        a_hat = a_hat / xp.sum(a_hat, axis=-1, keepdims=True)
        row = xp.matmul(row, a_hat)
    return _to_grid(xp, row, layout)


def attention_relevance(attention: list, grads: list, layout: MapLayout) -> Tensor:
    """Chefer et al.'s relevance: ``attention`` (L arrays ``(B, heads, N, N)``) and their target
    gradients ``grads`` (L arrays ``(B, T, heads, N, N)``) -> maps ``(B, T, h, w)``."""
    xp = namespace(*attention, *grads)
    B, T = grads[0].shape[:2]
    row = _readout(xp, layout, grads[0], (B, T))  # (B, T, 1, N)
    for a, g in zip(reversed(attention), reversed(grads)):
        a_bar = xp.mean(xp.clip(g * a[:, None], min=0), axis=2)  # (B, T, N, N)
        row = row + xp.matmul(row, a_bar)
    return _to_grid(xp, row, layout)


@dataclass(frozen=True)
class AttentionRollout(Method):
    """Attention rollout over every attention call of the forward; the same map for every target."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        assert ctx.attention is not None and ctx.attention_layout is not None  # the engine honours needs_attention
        m = attention_rollout(ctx.attention, ctx.attention_layout, ctx.options["head_fusion"],
                              ctx.options["discard_ratio"])
        T = ctx.scores.shape[1]
        return MethodOutput(raws={"attention": ctx.xp.tile(m[:, None], (1, T, 1, 1))})  # a copy: finish clips in place


@dataclass(frozen=True)
class AttentionRelevance(Method):
    """Chefer et al.'s gradient-weighted attention relevance, per target."""

    def compute(self, ctx: MethodContext) -> MethodOutput:
        assert ctx.attention is not None and ctx.attention_grads is not None  # the engine honours needs_*
        return MethodOutput(raws={"attention": attention_relevance(ctx.attention, ctx.attention_grads,
                                                                   ctx.attention_layout)})


def _discard_ratio(v: Any) -> Any:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
    return None if ok else "a number in [0, 1)"


ATTENTION_ROLLOUT = register(AttentionRollout(
    name="attention_rollout",
    description="Attention rollout (transformers): product of the residual-mixed attention of every block, "
                "class-token row; class-agnostic (the same map for every target)",
    cost="1 forward, no backward",
    needs_grads=False,
    needs_layer=False,
    needs_attention=True,
    differentiable=True,
    options={"head_fusion": Option("mean", one_of(*HEAD_FUSIONS), "how the heads' attention is fused"),
             "discard_ratio": Option(0.0, _discard_ratio, "fraction of each block's smallest fused attention "
                                                          "entries set to 0")},
))

ATTENTION_RELEVANCE = register(AttentionRelevance(
    name="attention_relevance",
    description="Chefer et al. 2021 relevance (transformers): attention weighted by its positive gradient, "
                "averaged over heads, accumulated over blocks",
    cost="1 forward + 1 batched backward for all targets",
    needs_grads=True,
    needs_layer=False,
    needs_attention=True,
    differentiable=True,
))
