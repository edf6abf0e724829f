"""Segmentation targets: the class-c logit summed over a region of a ``(B, K, h, w)`` output.

``camlens.Target.region(where, cls=c)`` explains

    S_b = sum_{i, j} M_b[i, j] * Y_b[c, i, j]

for an output ``Y`` of shape ``(B, K, h, w)`` and region weights ``M`` ``(B or 1, h, w)`` at the
OUTPUT's resolution (the same score as pytorch-grad-cam's ``SemanticSegmentationTarget(c, M)``).
``where`` is

* a mask ``(H, W)`` or ``(B, H, W)`` (bool or 0-1 weights; NumPy or a framework array) at the
  input's or the output's resolution. A mask of another size than the output is resized to it by
  nearest neighbour at pixel centres: output pixel ``(i, j)`` takes the mask at
  ``(floor((i + 0.5) H / h), floor((j + 0.5) W / w))`` (``F.interpolate(mode="nearest-exact")``);
* a box ``(x0, y0, x1, y1)`` in input pixels, ``x1``/``y1`` exclusive (or a list of B boxes): an
  output pixel is inside when its centre, ``((j + 0.5) W / w, (i + 0.5) H / h)`` in input pixels,
  lies in ``[x0, x1) x [y0, y1)`` — for integer boxes exactly the resized box mask;
* ``None``: the pixels the model currently predicts as c, ``argmax_k Y_b[k] == c``, taken from the
  explained forward and then fixed (perturbation methods score their perturbed outputs on the same
  pixels). A class predicted nowhere gives a score of 0 and an all-zero map.

Volumes and clips: an output ``(B, K, d, h, w)`` (a 3-D segmentation network's per-voxel logits)
is explained the same way over voxels, ``S_b = sum_{z, i, j} M_b[z, i, j] * Y_b[c, z, i, j]``, with
masks ``(D, H, W)`` / ``(B, D, H, W)`` (nearest at voxel centres along each axis) and boxes
``(x0, y0, z0, x1, y1, z1)`` (``z`` along depth / time; ``camlens.evaluate``'s 3-D box order).

The weights are bound once per call against the real output (:meth:`Region.bind`), one image's
region per resolved target, so every method (gradients, Score-CAM, occlusion, ...) scores image b
on image b's region. Framework-free: array-API maths through ``namespace`` / ``ops_for``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from ..backends.base import namespace, ops_for
from .errors import TargetError, TargetKeyError, TargetTypeError

HeadKey = Union[int, str]
Tensor = Any

__all__ = ["Region", "dense_head", "is_region", "contains_region", "split_per_image"]


def _is_box(where: Any) -> bool:
    """A box ``(x0, y0, x1, y1)`` (or, for volumes, ``(x0, y0, z0, x1, y1, z1)``): 4 or 6 plain numbers
    (a tuple / list / 1-D array)."""
    if isinstance(where, (tuple, list)):
        return len(where) in (4, 6) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in where)
    return getattr(where, "ndim", None) == 1 and getattr(where, "shape", (0,))[0] in (4, 6)


def _is_boxes(where: Any) -> bool:
    """A list of B boxes, one per image."""
    return isinstance(where, (tuple, list)) and len(where) > 0 and all(_is_box(b) for b in where)


def _box(b: Any, n: int = 2) -> tuple[float, ...]:
    """A box for an output with ``n`` spatial axes: ``(lo..., hi...)`` in x, y(, z) order, each hi > lo."""
    v = tuple(float(t) for t in (b.tolist() if hasattr(b, "tolist") else b))
    form = "(x0, y0, x1, y1)" if n == 2 else "(x0, y0, z0, x1, y1, z1)"
    if len(v) != 2 * n:
        raise TargetError(f"a region box for a {'2-D' if n == 2 else '3-D'} output is {form}, got {len(v)} numbers: "
                          f"{v}")
    if not all(hi > lo for lo, hi in zip(v[:n], v[n:])):
        need = "x1 > x0 and y1 > y0" if n == 2 else "x1 > x0, y1 > y0 and z1 > z0"
        raise TargetError(f"a region box is {form} with {need} (input pixels), got {v}")
    return v


@dataclass(frozen=True, eq=False)
class Region:
    """The score function of a region target (compared by identity: it may hold arrays).

    Attributes:
        where: what the user gave: a mask, a box, a list of boxes, or ``None`` (predicted pixels).
        cls: the class index, set by :meth:`bind`.
        weights: ``(B or 1, h, w)`` (volumes: ``(B or 1, d, h, w)``) region weights at the output's
            resolution, in its dtype and on its device, set by :meth:`bind`; ``None`` before.
    """

    where: Any = None
    cls: Optional[int] = None
    weights: Any = None

    @property
    def kind(self) -> str:
        return "predicted" if self.where is None else "region"

    def __call__(self, head: Tensor) -> Tensor:
        """``S_b = sum_ij M_b[i, j] * head[b, cls, i, j]`` (volumes: over ``(z, i, j)``), shape ``(B,)``,
        differentiable in ``head``."""
        r = self if self.weights is not None else self.bind(head, self.cls)
        _check_head(head, r.cls)
        xp = namespace(head)
        m = r.weights
        if tuple(m.shape[1:]) != tuple(head.shape[2:]) or m.shape[0] not in (1, head.shape[0]):
            raise TargetError(f"a region bound to an output of {tuple(m.shape[1:])} pixels (batch {m.shape[0]}) "
                              f"cannot score an output of shape {tuple(head.shape)}")
        col = head[:, r.cls] * xp.astype(m, head.dtype, copy=False)
        return xp.sum(xp.reshape(col, (head.shape[0], -1)), axis=1)

    def bind(self, head: Tensor, cls: Any, input_size: Optional[tuple[int, ...]] = None) -> "Region":
        """This region's weights ``(B or 1, h, w)`` on ``head`` ``(B, K, h, w)`` for class ``cls``
        (volumes: ``(B or 1, d, h, w)`` on ``(B, K, d, h, w)``).

        ``input_size``: the model input's ``(H, W)`` (volumes: ``(D, H, W)``; a 2-entry size is taken as
        the input's H, W with the output's depth), for boxes (input pixels) and masks at the input
        resolution; ``None`` means the output has the input's resolution.
        """
        if cls is None or isinstance(cls, bool) or not isinstance(cls, numbers.Integral):
            raise TargetError(f"Target.region needs one class index (cls=), got {cls!r}")
        cls = int(cls)
        _check_head(head, cls)
        xp, ops = namespace(head), ops_for(head)
        B, out = head.shape[0], tuple(int(v) for v in head.shape[2:])  # (h, w) or (d, h, w)
        if input_size is None:
            size = out
        else:
            size = tuple(int(v) for v in input_size)
            size = (*out[:len(out) - len(size)], *size) if len(size) < len(out) else size[-len(out):]
        where = self.where
        if where is None:  # the pixels predicted as cls now (fixed for the whole call)
            m = xp.argmax(ops.detach(head), axis=1) == cls  # (B, h, w) / (B, d, h, w)
        elif _is_box(where) or _is_boxes(where):
            boxes = [_box(where, len(out))] if _is_box(where) else [_box(b, len(out)) for b in where]
            if len(boxes) not in (1, B):
                raise TargetError(f"Target.region got {len(boxes)} boxes for a batch of {B} images; give one box "
                                  "for every image or one box per image")
            m = ops.asarray(np.stack([_box_mask(b, size, out) for b in boxes]), like=head)
        else:
            m = self._mask(where, head, size)
        empty = [b for b, n in enumerate(ops.to_list(xp.sum(xp.reshape(xp.astype(m, head.dtype), (m.shape[0], -1)),
                                                            axis=1))) if n == 0]
        if empty and where is not None:
            what = "box" if _is_box(where) or _is_boxes(where) else "mask"
            x = "x".join
            raise TargetError(f"the region {what} covers no pixel of the {x(map(str, out))} output (for the "
                              f"{x(map(str, size))} input) in image(s) {empty}: its score would be 0 and its map empty; "
                              f"{'a box must contain the centre of at least one output pixel' if what == 'box' else 'give a mask with at least one pixel set'}")
        return Region(where, cls, m)

    @staticmethod
    def _mask(where: Any, head: Tensor, size: tuple[int, ...]) -> Tensor:
        """A user mask as ``(B or 1, h, w)`` (volumes: ``(B or 1, d, h, w)``) weights on ``head``'s
        device (nearest-resized along each axis)."""
        if not hasattr(where, "shape") or not hasattr(where, "dtype"):
            try:
                where = np.asarray(where)
            except Exception:
                where = None
            if where is None or where.dtype == object:
                raise TargetTypeError("Target.region takes a mask (H, W) / (B, H, W) (NumPy or tensor, bool or 0-1), "
                                      "a box (x0, y0, x1, y1) in input pixels, a list of boxes, or None")
        ops = ops_for(head)
        m = ops.asarray(where, like=head)
        xp = namespace(m)
        B, out = head.shape[0], tuple(int(v) for v in head.shape[2:])
        n = len(out)
        if m.ndim == n:
            m = m[None]
        if m.ndim != n + 1 or m.shape[0] not in (1, B):
            form = "(H, W) or (B, H, W)" if n == 2 else "(D, H, W) or (B, D, H, W)"
            raise TargetError(f"a region mask is {form} with B = {B}, got shape {tuple(where.shape)}")
        if not xp.isdtype(m.dtype, "bool"):
            if not xp.isdtype(m.dtype, ("real floating", "integral")):
                raise TargetTypeError(f"a region mask holds bools or 0-1 weights, got dtype {m.dtype}")
            lo, hi = ops.extrema(m)
            if lo < 0 or hi > 1:
                raise TargetError(f"a region mask holds bools or weights in [0, 1], got values in [{lo:g}, {hi:g}]")
        have = tuple(int(v) for v in m.shape[1:])
        if have == out:
            return m
        if have != tuple(size):
            x = "x".join
            raise TargetError(f"a region mask of {x(map(str, have))} pixels fits neither the input "
                              f"({x(map(str, size))}) nor the output ({x(map(str, out))}); give it at one of these sizes")
        for ax, (n_in, n_out) in enumerate(zip(have, out)):
            m = xp.take(m, ops.asarray(_nearest_index(n_in, n_out), like=head), axis=ax + 1)
        return m


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` pixels, nearest at pixel centres: ``floor((i + 0.5) n_in / n_out)``."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def _box_mask(box: tuple[float, ...], size: tuple[int, ...], out: tuple[int, ...]) -> np.ndarray:
    """``(h, w)`` bool: output pixels whose centre (in input pixels) lies in ``[x0, x1) x [y0, y1)``;
    volumes: ``(d, h, w)``, the box ``(x0, y0, z0, x1, y1, z1)`` with ``z`` along depth."""
    n = len(out)
    lo, hi = box[:n][::-1], box[n:][::-1]  # (x, y[, z]) -> the axes' order ([z,] y, x)
    m = np.ones((), dtype=bool)
    for ax, (N, k, a, b) in enumerate(zip(size, out, lo, hi)):
        c = (np.arange(k) + 0.5) * N / k
        inside = (c >= a) & (c < b)
        m = m[..., None] & inside.reshape((1,) * ax + (k,))
    return m


def _check_head(head: Tensor, cls: int) -> None:
    if head.ndim not in (4, 5):
        raise TargetError(f"Target.region explains a (B, K, h, w) output (per-pixel class logits; volumes: "
                          f"(B, K, d, h, w)), got an output of shape {tuple(head.shape)}; name the segmentation "
                          "output with head=")
    if not 0 <= cls < head.shape[1]:
        raise TargetError(f"class {cls} out of range for a segmentation output with {head.shape[1]} classes")


def dense_head(heads: Mapping[HeadKey, Tensor]) -> HeadKey:
    """The first ``(B, K, h, w)`` output (torchvision segmentation models: ``"out"``, before ``"aux"``)."""
    batch = next(iter(heads.values())).shape[0]
    for k, v in heads.items():
        if v.ndim in (4, 5) and v.shape[0] == batch:
            return k
    shapes = {k: tuple(v.shape) for k, v in heads.items()}
    raise TargetKeyError(f"Target.region needs a (B, K, h, w) output (per-pixel class logits); the outputs are {shapes}. "
                         "Name the output with head=, or use a class target for a (B, K) head")


def is_region(fn: Any) -> bool:
    """Whether a target's score function is a region's."""
    return isinstance(fn, Region)


def contains_region(targets: Any) -> bool:
    """Whether a (nested list of) target spec(s) holds a region target (``Target.region``)."""
    if isinstance(targets, (list, tuple)) and not isinstance(targets, str):
        return any(contains_region(t) for t in targets)
    return isinstance(getattr(targets, "fn", None), Region)


def split_per_image(rows: list[list[Any]]) -> list[list[Any]]:
    """One image's region per resolved target: a target whose weights are ``(B, h, w)`` with B > 1
    becomes, in row b, the same target with weights ``[b:b+1]`` (which broadcast over the N
    perturbed copies of image b that Score-CAM or occlusion score)."""
    def one(tg: Any, b: int) -> Any:
        r = tg.fn
        if isinstance(r, Region) and r.weights is not None and r.weights.shape[0] > 1:
            return dataclasses.replace(tg, fn=Region(r.where, r.cls, r.weights[b:b + 1]))
        return tg

    return [[one(tg, b) for tg in row] for b, row in enumerate(rows)]
