"""The result of :func:`camlens.explain`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from torch import Tensor

from .targets import ResolvedTarget

__all__ = ["Explanation"]


@dataclass
class Explanation:
    """Maps for B images and T targets each.

    Attributes:
        maps: ``(B, T, H, W)`` final maps in [0, 1], on the model's device.
        raw: ``(B, T, h, w)`` the first (or only) layer's weighted sum before ReLU, upsampling and
            normalisation.
        raws: per layer name, its raw maps ``(B, T, h_l, w_l)``.
        scores: ``(B, T)`` the explained scores (pre-softmax logits for class targets).
        probs: ``(B, T)`` softmax probability of each target's class on its head (NaN where a
            target has no class, e.g. a score function).
        targets: B lists of T resolved targets (head, cls, label); per image because ``top_k``
            picks different classes for different images.
        inputs: ``(B, 3, H, W)`` the model input that was explained.
        layers: the layer names used.
        method: the method name.
        display: optional ``(B, H, W, 3)`` uint8 images for overlays (set when camlens
            preprocessed the images itself).
        heads: the model's outputs by head key, detached.
        pixel: ``(B, T, C, H, W)`` per-input-channel attributions of input-space methods
            (guided backprop, guided Grad-CAM), else ``None``.
        components: with ``combine=`` other than ``"separate"``, the B lists of targets that were
            folded into each image's single combined target.
    """

    maps: Tensor
    raw: Tensor
    scores: Tensor
    probs: Tensor
    targets: list[list[ResolvedTarget]]
    inputs: Tensor
    layers: list[str]
    method: str
    raws: dict[str, Tensor] = field(default_factory=dict)
    display: Optional[np.ndarray] = None
    heads: dict[Any, Tensor] = field(default_factory=dict)
    pixel: Optional[Tensor] = None
    components: Optional[list[list[ResolvedTarget]]] = None

    @property
    def labels(self) -> list[list[str]]:
        """``B`` lists of ``T`` target labels, e.g. ``"0: tabby"``."""
        return [[t.label for t in row] for row in self.targets]

    def numpy(self) -> dict[str, Any]:
        """NumPy copies: ``maps``, ``raw``, ``scores``, ``probs`` (float32) and ``labels``."""
        return {
            "maps": self.maps.detach().float().cpu().numpy(),
            "raw": self.raw.detach().float().cpu().numpy(),
            "scores": self.scores.detach().float().cpu().numpy(),
            "probs": self.probs.detach().float().cpu().numpy(),
            "labels": self.labels,
        }

    def __repr__(self) -> str:
        B, T, H, W = self.maps.shape
        return (f"Explanation(method={self.method!r}, layers={self.layers}, maps=(B={B}, T={T}, H={H}, W={W}), "
                f"targets={self.labels[0] if B else []}{' ...' if B > 1 else ''})")
