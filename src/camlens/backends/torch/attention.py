"""Attention probabilities of every attention call in one forward (attention rollout, Chefer relevance).

Within :func:`record_attention`, ``torch.nn.functional.scaled_dot_product_attention`` is replaced by
a math implementation that computes, for queries ``q`` ``(B, heads, L, d)``, keys ``k`` ``(B, heads, S, d)``
and values ``v``,

    P   = softmax(q k^T * scale + mask)        (B, heads, L, S)   recorded, in call order
    out = dropout(P) @ v                        the same output as the fused kernel

(``scale`` defaults to ``1 / sqrt(d)``; a boolean mask keeps where True, a float mask is added,
``is_causal`` keeps the lower triangle; grouped-query heads are repeated as SDPA does). ``P`` stays in
the autograd graph, so gradients of the target scores w.r.t. each ``P`` can be taken.

What reaches the patched function: timm ViT / DeiT / EVA-style ``Attention`` modules (``F.scaled_dot_product_attention``
when ``fused_attn``; timm modules whose ``fused_attn`` flag is off are switched to it for the block),
``nn.MultiheadAttention`` (torchvision ViT, ``nn.TransformerEncoderLayer``): its inference fast paths
(``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``) are switched off for
the block (``torch.backends.mha.set_fastpath_enabled``), and a call with ``need_weights=True`` (which
torch computes by explicit ``bmm`` + softmax) is run with ``need_weights=False`` and its weights
rebuilt from the recorded ``P`` (mean over heads when ``average_attn_weights``; in training mode with
attention dropout these are the probabilities before dropout, as returned for ``need_weights=False``).
Everything is restored on exit, also after an exception. The patch is process-wide for the block, so
attention run by other threads meanwhile is recorded too.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...core.errors import LayerError
from ..base import MapLayout, read_layout

__all__ = ["record_attention", "attention_probabilities", "check_attention"]


def attention_probabilities(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                            is_causal: bool = False, scale: Optional[float] = None,
                            enable_gqa: bool = False) -> tuple[Tensor, Tensor]:
    """``(P, value)``: the probabilities ``P = softmax(q k^T * scale + mask)`` ``(..., L, S)`` of
    ``scaled_dot_product_attention`` (same arguments, by plain tensor maths), and ``value`` with its
    heads repeated for grouped-query attention; the attention output is ``dropout(P) @ value``."""
    L, S = query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = (query @ key.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    probs = torch.softmax(logits, dim=-1)
    return probs, value


@contextlib.contextmanager
def record_attention(model: nn.Module, sink: list, *, grad: bool) -> Iterator[list]:
    """Route every attention call of ``model``'s forwards in the block through :func:`attention_probabilities`,
    appending each call's probabilities ``P`` ``(B, heads, L, S)`` to ``sink`` (yielded).

    ``grad``: the graph starts at the first attention call (grad mode is switched on there, as the
    capture hooks do for layers; the caller restores it) and ``P`` of a call with no graph upstream
    becomes a leaf that requires grad, so ``autograd.grad(scores, sink)`` gives each call's
    gradients through everything downstream. Without ``grad`` the recorded ``P`` are detached.
    The model's output is unchanged (the same maths as the kernel, within rounding).
    """
    orig_sdpa, orig_mha = F.scaled_dot_product_attention, F.multi_head_attention_forward
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # timm modules that chose their explicit-softmax path: the SDPA path is the same maths
    unfused = [m for m in model.modules()
               if m.__dict__.get("fused_attn") is False and type(m).__module__.startswith("timm.")]

    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
        if grad and not torch.is_grad_enabled():
            torch.set_grad_enabled(True)
        probs, value = attention_probabilities(query, key, value, attn_mask, is_causal, scale, enable_gqa)
        if grad and not probs.requires_grad:  # nothing upstream records a graph: P is where it starts
            probs = probs.detach().requires_grad_(True)
        sink.append(probs if grad else probs.detach())
        return (F.dropout(probs, dropout_p) if dropout_p > 0 else probs) @ value

    mha_signature = inspect.signature(orig_mha)

    def mha(*args: Any, **kwargs: Any) -> tuple[Tensor, Optional[Tensor]]:
        bound = mha_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if not bound.arguments["need_weights"]:
            return orig_mha(*args, **kwargs)
        bound.arguments["need_weights"] = False  # attention by SDPA (recorded), the weights from P
        n = len(sink)
        out, _ = orig_mha(*bound.args, **bound.kwargs)
        if len(sink) != n + 1:  # pragma: no cover - torch changed how it computes attention
            return orig_mha(*args, **kwargs)
        w = sink[n]
        w = w.mean(dim=1) if bound.arguments["average_attn_weights"] else w
        return out, (w.squeeze(0) if bound.arguments["query"].dim() == 2 else w)

    try:
        F.scaled_dot_product_attention = sdpa
        F.multi_head_attention_forward = mha
        torch.backends.mha.set_fastpath_enabled(False)
        for m in unfused:
            m.__dict__["fused_attn"] = True
        yield sink
    finally:
        for m in unfused:
            m.__dict__["fused_attn"] = False
        torch.backends.mha.set_fastpath_enabled(fastpath)
        F.multi_head_attention_forward = orig_mha
        F.scaled_dot_product_attention = orig_sdpa


SUPPORTED = ("timm ViT / DeiT / BEiT-style models (timm Attention: F.scaled_dot_product_attention), torchvision "
             "ViT and other nn.MultiheadAttention / nn.TransformerEncoderLayer models")


def check_attention(attentions: list, model: nn.Module, x: Tensor, prefix: Optional[int]) -> MapLayout:
    """The token layout of the recorded attention calls, or a clear error.

    Every call must be global self-attention over the same tokens of the input's batch:
    ``(B, heads, N, N)`` with the same ``N`` at each call, ``N - prefix`` patch tokens on a grid that
    fits the input (:func:`camlens.backends.base.read_layout`; ``prefix``: the model's own count of
    class / register tokens where it says). Windowed attention (Swin: ``(B * windows, heads, n, n)``),
    cross-attention, token pruning / pooling between blocks are refused, naming the call.
    """
    B, size = int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1]))
    name = type(model).__name__
    if not attentions:
        raise LayerError(f"no attention call was seen in the forward of {name}: attention rollout and attention "
                         f"relevance read the attention probabilities of models that compute attention by "
                         f"torch.nn.functional.scaled_dot_product_attention or nn.MultiheadAttention: {SUPPORTED}. "
                         "Attention written as explicit softmax(q @ k^T) code (e.g. torchvision's Swin) and models "
                         "without attention are not supported: use a layer method (method='gradcam', layer=...)")
    first = tuple(attentions[0].shape)
    for i, p in enumerate(attentions):
        shape = tuple(p.shape)
        why = None
        if len(shape) != 4:
            why = f"it is {len(shape)}-D, not (B, heads, N, N)"
        elif shape[0] != B:
            why = (f"its leading dimension {shape[0]} is not the batch {B}: windowed attention (e.g. Swin's "
                   "(B * windows, heads, n, n)) does not relate the image's tokens to each other globally")
        elif shape[-1] != shape[-2]:
            why = f"it relates {shape[-2]} queries to {shape[-1]} keys: cross-attention, not self-attention"
        elif shape[-1] != first[-1]:
            why = (f"it is over {shape[-1]} tokens but the first call was over {first[-1]}: the token set changes "
                   "between blocks (token pruning or pooling)")
        if why is not None:
            raise LayerError(f"attention call {i} of {len(attentions)} in {name} gave probabilities of shape {shape}: "
                             f"{why}. Attention rollout and relevance need global self-attention (B, heads, N, N) "
                             f"over the same N tokens at every call ({SUPPORTED}); for other models use a layer "
                             "method (method='gradcam', layer=...)")
    N = first[-1]
    lay = read_layout((B, N, 1), B, size, prefix)
    if lay is None and prefix is not None:
        lay = read_layout((B, N, 1), B, size)
    if lay is None:
        raise LayerError(f"the attention of {name} is over {N} tokens, and no count of prefix tokens leaves patch "
                         f"tokens on a grid that fits the {size[0]}x{size[1]} input" +
                         (f" (the model says {prefix} prefix tokens)" if prefix is not None else "") +
                         "; attention rollout and relevance need ViT-style tokens: class / register tokens first, "
                         "then the patches row by row")
    return lay
