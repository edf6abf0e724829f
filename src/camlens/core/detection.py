"""Object-detector outputs: per-image detections, box targets and their scores.

A detector (torchvision's Faster / Mask R-CNN, RetinaNet, FCOS, SSD, ...) returns in eval mode a
list of B mappings, one per image, each with ``"boxes"`` ``(N, 4)`` (``x0, y0, x1, y1`` in input
pixels), ``"labels"`` ``(N,)`` and ``"scores"`` ``(N,)``. Such an output has no ``(B, K)`` head, so
a class index alone names nothing; a detection is named by a box instead:

* :class:`BoxScore` (what ``camlens.Target.box`` builds): per image, the detection of class ``cls``
  (any class for ``None``) whose box overlaps the given box best, with IoU >= ``iou``; its score is
  that detection's score (differentiable: torchvision's scores are the box head's softmax /
  sigmoid, so gradients reach the backbone). Ties in IoU go to the higher score.
* :func:`top_detections`: the k highest-scoring detections of each image (``targets=None``).

Convention, unlike pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` (which sums ``IoU + score`` over
every matching box, matches by IoU over all classes first and needs IoU > threshold): the score is
the ONE best-matching detection's score alone, matched among the detections of the class, with
IoU >= ``iou``. On a perturbed input (Score-CAM, occlusion, ...) the box is matched again in each
output; an image with no match there scores 0.

Maths on host copies of the boxes (NumPy, float64); the scores stay arrays of the model's framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..backends.base import namespace, ops_for, to_float32
from .errors import TargetError

__all__ = ["Detection", "BoxScore", "detection_lists", "top_detections", "box_iou", "check_box", "host_copy",
           "detection_label"]

#: The keys of one image's detections.
DETECTION_KEYS = ("boxes", "labels", "scores")
_SHOWN = 5  # detections listed in a no-match error


@dataclass(frozen=True)
class Detection:
    """One detection of one image, as explained.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in input pixels (the model's own box).
        label: its class index.
        score: its score (a float, detached).
        index: its row in the image's detections.
    """

    box: tuple[float, float, float, float]
    label: int
    score: float
    index: int


def detection_lists(output: Any) -> Optional[list[Mapping]]:
    """The B per-image mappings of a detector's output (a list / tuple of mappings, each with array
    ``"boxes"`` ``(N, 4)``, ``"labels"`` ``(N,)`` and ``"scores"`` ``(N,)``), or ``None``."""
    if not isinstance(output, (list, tuple)) or not output:
        return None
    for d in output:
        if not isinstance(d, Mapping) or not all(k in d for k in DETECTION_KEYS):
            return None
    return list(output)


def host_copy(t: Any) -> np.ndarray:
    """A detached host copy (float64 for floating boxes / scores)."""
    ops = ops_for(t)
    try:
        a = ops.to_numpy(ops.detach(t))
    except TypeError:  # a dtype NumPy lacks (bf16)
        a = ops.to_numpy(to_float32(ops.detach(t)))
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def box_iou(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """IoU ``(N,)`` of one box ``(x0, y0, x1, y1)`` with boxes ``(N, 4)``: intersection area over
    union area (0 where the union is empty)."""
    b = np.asarray(box, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(b[2], boxes[:, 2]) - np.maximum(b[0], boxes[:, 0]), 0.0, None)
    h = np.clip(np.minimum(b[3], boxes[:, 3]) - np.maximum(b[1], boxes[:, 1]), 0.0, None)
    inter = w * h
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0.0, None) * np.clip(x[..., 3] - x[..., 1], 0.0, None)  # noqa: E731
    union = area(b) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def check_box(box: Any, cls: Any, iou: Any) -> tuple[tuple[float, float, float, float], Optional[int], float]:
    """Validate ``Target.box``'s arguments: 4 finite numbers with ``x1 > x0``, ``y1 > y0``; an int
    class or ``None``; ``0 < iou <= 1``."""
    try:
        vals = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise TargetError(f"Target.box takes a box (x0, y0, x1, y1) of 4 numbers in input pixels, got {box!r}") from None
    if len(vals) != 4 or not all(map(math.isfinite, vals)):
        raise TargetError(f"Target.box takes a box (x0, y0, x1, y1) of 4 finite numbers, got {box!r}")
    if not (vals[2] > vals[0] and vals[3] > vals[1]):
        raise TargetError(f"Target.box: box {vals} is empty; it is (x0, y0, x1, y1) with x1 > x0 and y1 > y0 "
                          "(corners, not x, y, width, height)")
    if cls is not None and (isinstance(cls, bool) or not hasattr(cls, "__index__")):
        raise TargetError(f"Target.box: cls is a class index (int) or None (any class), got {cls!r}")
    iou = float(iou)
    if not 0.0 < iou <= 1.0:
        raise TargetError(f"Target.box: iou must be in (0, 1], got {iou}")
    return vals, None if cls is None else int(cls), iou  # type: ignore[return-value]


def class_name(label: int, categories: Any) -> Optional[str]:
    """The name of class ``label`` from ``categories`` (a list, or a mapping with key ``"labels"``
    or ``0``), or ``None``."""
    names = categories.get("labels", categories.get(0)) if isinstance(categories, Mapping) else categories
    return str(names[label]) if names is not None and 0 <= label < len(names) else None


def detection_label(label: int, score: float, categories: Any) -> str:
    """``"{class name} {score:.2f}"`` (the class index where there are no names)."""
    name = class_name(label, categories)
    return f"{label if name is None else name} {score:.2f}"


def _describe(d: Mapping, categories: Any, n: int = _SHOWN) -> str:
    """The ``n`` highest-scoring detections of one image, for error messages."""
    scores, labels, boxes = host_copy(d["scores"]), host_copy(d["labels"]), host_copy(d["boxes"])
    if scores.shape[0] == 0:
        return "no detections"
    order = np.argsort(-scores, kind="stable")[:n]
    parts = [f"{detection_label(int(labels[i]), float(scores[i]), categories)} at "
             f"({', '.join(f'{v:.1f}' for v in boxes[i])})" for i in order]
    more = f" and {scores.shape[0] - n} more" if scores.shape[0] > n else ""
    return f"{scores.shape[0]} detections: " + "; ".join(parts) + more


@dataclass(frozen=True)
class BoxScore:
    """The score function of a box target: per image, the score of the detection of class ``cls``
    (``None``: any class) whose box has the highest IoU with ``box`` (ties: the higher score),
    if that IoU is >= ``iou``; 0 for an image without one.

    Called with the model's output (B per-image detection mappings) it returns the scores ``(B,)``,
    differentiable where the model's scores are.
    """

    box: tuple[float, float, float, float]
    cls: Optional[int] = None
    iou: float = 0.5

    @property
    def __name__(self) -> str:  # a label for the target when it has no other
        c = "" if self.cls is None else f" cls {self.cls}"
        return f"box ({', '.join(f'{v:g}' for v in self.box)}){c}"

    def match(self, d: Mapping) -> tuple[Optional[int], float]:
        """``(row of the matching detection or None, best IoU among the class's detections)``."""
        boxes, scores = host_copy(d["boxes"]), host_copy(d["scores"])
        if boxes.shape[0] == 0:
            return None, 0.0
        ious = box_iou(self.box, boxes)
        if self.cls is not None:
            ious = np.where(host_copy(d["labels"]) == self.cls, ious, -1.0)
        best = float(ious.max())
        if best < self.iou:
            return None, max(best, 0.0)
        ties = np.flatnonzero(ious == best)
        return int(ties[np.argmax(scores[ties])]), best

    def __call__(self, output: Any) -> Any:
        dets = detection_lists(output)
        if dets is None:
            raise TargetError(f"target {self.__name__!r} is a box target, which needs a detector's output (a list of B "
                              f"dicts with {list(DETECTION_KEYS)}), got {type(output).__name__}")
        xp = namespace(dets[0]["scores"])
        out = []
        for d in dets:
            i, _ = self.match(d)
            s = d["scores"]
            out.append(s[i] if i is not None else xp.zeros((), dtype=s.dtype, device=_device(s)))
        return xp.stack(out)

    def resolve(self, output: Any, b: int, categories: Any = None) -> Detection:
        """The detection this target explains on image ``b`` of ``output``; a :class:`TargetError`
        naming the image, the box, the best IoU found and the detections present if none matches."""
        dets = detection_lists(output)
        if dets is None:
            raise TargetError(f"target {self.__name__!r} is a box target (Target.box), which explains a detection of "
                              f"an object detector, but the model's output is a {type(output).__name__}, not a list "
                              f"of per-image dicts with {list(DETECTION_KEYS)}; use a class target or a callable")
        d = dets[b]
        i, best = self.match(d)
        if i is None:
            name = None if self.cls is None else class_name(self.cls, categories)
            what = "any class" if self.cls is None else f"class {self.cls}" + (f" ({name})" if name else "")
            raise TargetError(f"image {b}: no detection of {what} overlaps box {self.box} with IoU >= {self.iou} "
                              f"(best IoU {best:.3f}); the model found {_describe(d, categories)}. Lower iou=, give "
                              "another box or cls=None, or lower the model's score threshold (torchvision: "
                              "box_score_thresh= / score_thresh=)")
        box = tuple(float(v) for v in host_copy(d["boxes"])[i])
        return Detection(box, int(host_copy(d["labels"])[i]), float(host_copy(d["scores"])[i]), i)  # type: ignore[arg-type]


def _device(t: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(t)


def top_detections(output: Any, k: int, categories: Any = None) -> list[list[Detection]]:
    """The ``k`` highest-scoring detections of each image (B lists of k, best first).

    Every image must have ``k`` (T is the same for every image of a batch): an image with fewer is
    a :class:`TargetError` naming the images and their counts, suggesting a smaller ``top_k``, a
    lower score threshold, or one call per image.
    """
    dets = detection_lists(output)
    assert dets is not None
    rows, short = [], []
    for b, d in enumerate(dets):
        scores = host_copy(d["scores"])
        if scores.shape[0] < k:
            short.append(f"image {b}: {scores.shape[0]}")
            continue
        boxes, labels = host_copy(d["boxes"]), host_copy(d["labels"])
        order = np.argsort(-scores, kind="stable")[:k]
        rows.append([Detection(tuple(float(v) for v in boxes[i]), int(labels[i]), float(scores[i]), int(i))  # type: ignore[arg-type]
                     for i in order])
    if short:
        raise TargetError(f"targets=None explains the top {k} detection(s) of every image, but some images have fewer "
                          f"({', '.join(short)}); every image of a batch needs the same number of targets. Use a "
                          "smaller top_k, lower the model's score threshold (torchvision: box_score_thresh= / "
                          "score_thresh=), explain those images on their own, or name boxes with Target.box")
    return rows
