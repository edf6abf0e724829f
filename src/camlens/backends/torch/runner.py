"""Forwards and backwards beyond the first pass: score-only, layer-replaced, input gradients."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..base import unguided_error
from .gradients import _is_vmap_error
from .guided import GuidedReLU
from .layout import Layout
from .state import first_tensor

ScoreFn = Callable[[Any, int], Tensor]  # (output, image b) -> scores (N, T) of image b's targets

class Runner:
    """Forward and backward passes beyond the first one, for methods that perturb the input or a layer.

    Runs with no capture hooks active, under ``torch.no_grad()`` except for input gradients;
    the caller holds :func:`model_state`. ``score(output, b)`` gives the scores ``(N, T)`` of image
    ``b``'s targets on a batch of N outputs.
    """

    def __init__(self, model: nn.Module, score: ScoreFn, layout: Optional[Layout] = None):
        self.model = model
        self.score = score
        self.layout = layout if layout is not None else Layout(model)
        self.forwards = 0  # number of forward calls, for cost reports and tests

    def _forward(self, x: Tensor, score_only: bool = False) -> Any:
        self.forwards += 1
        return self.layout.run(x, score_only)

    @torch.no_grad()
    def scores(self, x: Tensor, b: int, batch_size: int = 32) -> Tensor:
        """Scores ``(N, T)`` of image ``b``'s targets for N inputs ``x`` ``(N, C, H, W)``, in chunks."""
        return torch.cat([self.score(self._forward(x[i:i + batch_size], score_only=True), b).float()
                          for i in range(0, x.shape[0], batch_size)])

    @torch.no_grad()
    def outputs(self, x: Tensor, fn: Callable[[Any], Any], batch_size: int = 32) -> list:
        """``[fn(output) for each chunk of batch_size inputs of x (N, C, H, W)]``: the model's raw
        outputs read by ``fn`` (e.g. a detector's boxes, for D-RISE), one forward per chunk."""
        return [fn(self._forward(x[i:i + batch_size], score_only=True)) for i in range(0, x.shape[0], batch_size)]

    @torch.no_grad()
    def scores_with_layer(self, layer: nn.Module, acts: Tensor, x_b: Tensor, b: int, batch_size: int = 32) -> Tensor:
        """Scores ``(N, T)`` when ``layer``'s output is replaced by each of ``acts`` ``(N, C, h, w)``.

        The input ``x_b`` ``(1, C, H, W)`` runs once per chunk at batch 1 and the batch grows at
        the layer; a model that mixes the layer's output with earlier tensors (a skip connection
        around it) is rerun with ``x_b`` repeated instead.
        """
        out = []
        expand = False
        for i in range(0, acts.shape[0], batch_size):
            chunk = acts[i:i + batch_size]
            handle = layer.register_forward_hook(lambda m, inp, o: chunk.to(first_tensor(o).dtype))
            try:
                if not expand:
                    try:
                        out.append(self.score(self._forward(x_b), b).float())
                        continue
                    except RuntimeError:
                        expand = True  # shapes clash after the layer: repeat the input instead
                out.append(self.score(self._forward(x_b.expand(chunk.shape[0], *x_b.shape[1:])), b).float())
            finally:
                handle.remove()
        return torch.cat(out)

    def input_gradients(self, x: Tensor, b_scores: Callable[[Any], Tensor], guided: bool = False,
                        non_relu: str = "error") -> tuple[Tensor, Tensor]:
        """Gradients of the scores w.r.t. the input: ``(B, T, C, H, W)`` and the scores ``(B, T)``.

        ``b_scores(output) -> (B, T)``; with ``guided=True`` every ReLU's backward is guided
        (see :class:`GuidedReLU`). One forward; the T targets share one batched backward.
        A guided backward through other activations (GELU, SiLU, Hardswish, ...) raises a
        :class:`~camlens.core.errors.ModelError` unless ``non_relu="plain"`` (they pass their plain
        gradient: guided only at the ReLUs).
        """
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            scores = b_scores(self._forward(xi))
            B, T = scores.shape
            eye = torch.eye(T, dtype=scores.dtype, device=scores.device)[:, None, :].expand(T, B, T)
            mode = GuidedReLU() if guided else None
            with (mode if mode is not None else contextlib.nullcontext()):
                if T == 1:
                    g = torch.autograd.grad(scores, xi, grad_outputs=eye[0])[0].unsqueeze(0)
                else:
                    try:
                        g = torch.autograd.grad(scores, xi, grad_outputs=eye, is_grads_batched=True,
                                                retain_graph=True)[0]
                    except RuntimeError as err:  # an op without a vmap rule: loop over targets
                        if not _is_vmap_error(err):
                            raise
                        g = torch.stack([torch.autograd.grad(scores[:, t].sum(), xi, retain_graph=t < T - 1)[0]
                                         for t in range(T)])
        if mode is not None and mode.unguided and non_relu != "plain":
            raise unguided_error(mode.unguided)
        return g.transpose(0, 1), scores.detach()
