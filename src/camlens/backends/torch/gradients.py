"""Gradients of many target scores w.r.t. captured layer outputs in one batched backward."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ...core.errors import LayerRuntimeError
from .sparse import SparseRows

def _is_vmap_error(err: BaseException) -> bool:
    """An error from vmap's batching of the backward (an op without a batching rule)."""
    msg = str(err).lower()
    return "vmap" in msg or "batch" in msg


def layer_gradients(scores: Tensor, acts: Sequence[Tensor], names: Sequence[str], labels: Sequence[str], *,
                    create_graph: bool = False, unused_zero: Sequence[Optional[int]] = ()) -> list[Tensor]:
    """Gradients of each target score w.r.t. each activation, in one batched backward.

    Args:
        scores: ``(B, T)`` scores; image ``b`` depends only on input ``b`` (eval mode).
        acts: activations ``(B, C, h, w)`` (any shape with leading B).
        names, labels: layer names and target labels, for error messages.
        create_graph: keep the backward's graph, so the gradients (and maps made of them) are
            differentiable themselves (``explain(differentiable=True)``).
        unused_zero: per activation, a group id (the values of one layer's dict output, e.g. FPN
            levels) or ``None``: an activation of a group with no path to the scores gets zero
            gradients (the level only the detached proposals read) as long as another of its group
            has one; otherwise (and by default, for every activation) no path is an error.

    Returns:
        per activation, gradients ``(B, T, *act.shape[1:])``.

    Uses ``grad_outputs = e_t`` (one-hot over T, broadcast over B) batched with vmap; since
    images are independent, summing over B in the vector-Jacobian product is exact. One score
    (B = T = 1) takes autograd's implicit ones, as a hand-written ``autograd.grad(score, act)`` does.
    For token layers ``(B, N, C)`` the backward's large matrix products skip their zero rows
    (:class:`~camlens.backends.torch.sparse.SparseRows`: a class-token head's gradient lives on one
    token per image after the last block's attention).
    """
    if not scores.requires_grad:
        raise LayerRuntimeError("the explained scores do not depend on any captured layer through autograd "
                           "(the model detaches its output, runs under no_grad, or leaves torch)")
    B, T = scores.shape
    if T > 1:
        eye = torch.eye(T, dtype=scores.dtype, device=scores.device)[:, None, :].expand(T, B, T)
    batched = T > 1  # vmap's grads come (T, B, ...)
    # token layers (B, N, C): the products behind a class-token head are row-sparse (see .sparse)
    sparse = SparseRows() if not create_graph and T * B > 1 and any(a.ndim == 3 for a in acts) else None
    try:
        # retain_graph when batched: if vmap fails half-way, the per-target fallback needs the graph
        with sparse if sparse is not None else contextlib.nullcontext():
            grads = torch.autograd.grad(scores, list(acts), grad_outputs=eye if T > 1 else None if B == 1 else torch.ones_like(scores),
                                        is_grads_batched=T > 1, allow_unused=True,
                                        retain_graph=T > 1 or create_graph, create_graph=create_graph)
        if T == 1:  # (B, ...) -> (B, 1, ...)
            grads = [None if g is None else g.unsqueeze(1) for g in grads]
    except RuntimeError as err:  # an op without a vmap rule: fall back to a loop over targets
        if T == 1 or not _is_vmap_error(err):
            raise
        batched = False
        per_t = [torch.autograd.grad(scores[:, t].sum(), list(acts), retain_graph=t < T - 1 or create_graph,
                                     allow_unused=True, create_graph=create_graph) for t in range(T)]
        grads = [None if per_t[0][i] is None else torch.stack([g[i] for g in per_t], dim=1) for i in range(len(acts))]
    out = []
    group = list(unused_zero) + [None] * (len(acts) - len(unused_zero))
    reached = {k for k, g in zip(group, grads) if k is not None and g is not None}
    zero_ok = [k is not None and k in reached for k in group]  # a group none of whose values is reached: an error
    for g, name, a, ok in zip(grads, names, acts, zero_ok):
        if g is None and ok:
            out.append(a.new_zeros((a.shape[0], T, *a.shape[1:])))
            continue
        if g is None:
            raise LayerRuntimeError(f"the target scores {list(labels)} do not depend on layer {name!r}: no gradient "
                               "path from this layer to the explained output (is it on another branch?)")
        out.append(g.transpose(0, 1) if batched else g)  # -> (B, T, ...)
    return out
