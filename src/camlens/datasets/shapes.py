"""Synthetic two-object images with ground truth for a two-head model ("shape" and "colour").

Each RGB image (3, H, W) in [0, 1] holds, on a dark, nearly grey, lightly noisy background:

* object A, a grey shape (circle / square / triangle / cross) of random size and brightness:
  head ``"shape"`` classifies its shape; its colour carries no class information;
* object B, a saturated patch (red / green / blue, jittered hue, saturation and value, with
  brightness stripes of random period and angle): head ``"colour"`` classifies its colour; its
  outline (an ellipse or one of A's four shapes, drawn independently of the colour class) and its
  stripes carry no colour information, and because it can look like any of A's shapes, the shape
  head must ignore B.

The objects never overlap (their boxes are at least ``GAP`` px apart along x or y), so every
pixel belongs to A, to B or to the background, and a CAM can be scored against the masks.

>>> b = make_shapes(4, seed=1)
>>> b.images.shape, b.labels["shape"].shape, b.masks["colour"].shape, b.boxes["shape"].shape
(torch.Size([4, 3, 64, 64]), torch.Size([4]), torch.Size([4, 64, 64]), torch.Size([4, 4]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
from ..backends.base import default_array

from ..core.errors import ConfigError

__all__ = ["SHAPE_CLASSES", "COLOUR_CLASSES", "HEADS", "GAP", "ShapesBatch", "make_shapes", "ShapesDataset"]

SHAPE_CLASSES: List[str] = ["circle", "square", "triangle", "cross"]
COLOUR_CLASSES: List[str] = ["red", "green", "blue"]
HEADS: Tuple[str, str] = ("shape", "colour")  # head name -> object: "shape" = A, "colour" = B
GAP = 3  # minimum empty pixels between the two objects' boxes (along x or along y)

_HUES = np.array([0.0, 120.0, 240.0])  # degrees of red, green, blue


@dataclass
class ShapesBatch:
    """A generated batch; ``n`` images of ``size x size`` pixels.

    Fields:
        images: float32 (n, 3, H, W) in [0, 1].
        labels: ``{"shape": (n,) long, "colour": (n,) long}`` class indices.
        masks: ``{"shape": (n, H, W) bool, "colour": (n, H, W) bool}``: pixels of object A / B.
        boxes: ``{"shape": (n, 4) long, "colour": (n, 4) long}``: tight ``(x0, y0, x1, y1)`` of each
            mask, ``x1``/``y1`` exclusive (``mask[y0:y1, x0:x1]`` holds the whole object).
        SHAPE_CLASSES, COLOUR_CLASSES: class names, indexed like the labels.
    """

    images: Any
    labels: Dict[str, Any]
    masks: Dict[str, Any]
    boxes: Dict[str, Any]
    SHAPE_CLASSES: List[str] = field(default_factory=lambda: list(SHAPE_CLASSES))
    COLOUR_CLASSES: List[str] = field(default_factory=lambda: list(COLOUR_CLASSES))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def label_names(self, i: int) -> Dict[str, str]:
        """Class names of image ``i``: ``{"shape": "circle", "colour": "red"}``."""
        return {"shape": self.SHAPE_CLASSES[int(self.labels["shape"][i])],
                "colour": self.COLOUR_CLASSES[int(self.labels["colour"][i])]}

    def targets(self) -> List[List[str]]:
        """Per-image camlens targets of the true classes: n lists ``["shape:circle", "colour:red"]``."""
        return [[f"{h}:{name}" for h, name in self.label_names(i).items()] for i in range(len(self))]


# ----------------------------------------------------------------------------------------------
# rasterisation (vectorised over the batch)


def _shape_masks(kind: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Masks of shapes ``kind`` (n,) in {0: circle, 1: square, 2: triangle, 3: cross}.

    ``dx``, ``dy``: (n, H, W) pixel offsets from each centre; ``r``: (n,) size (half the box side,
    about). Returns bool (n, H, W). Sizes are tuned so the four shapes have similar areas.
    """
    out = np.zeros(dx.shape, dtype=bool)
    for k in range(len(SHAPE_CLASSES)):
        idx = np.flatnonzero(kind == k)
        if idx.size == 0:
            continue
        x, y, rr = dx[idx], dy[idx], r[idx, None, None].astype(dx.dtype)
        ax, ay = np.abs(x), np.abs(y)
        if k == 0:  # circle
            m = x * x + y * y <= rr * rr
        elif k == 1:  # square
            m = np.maximum(ax, ay) <= 0.85 * rr
        elif k == 2:  # upward triangle: apex at y = -r (image y points down), base at y = +0.75 r
            t = (y + rr) / (1.75 * rr)  # 0 at the apex, 1 at the base
            m = (t >= 0) & (t <= 1) & (ax <= 1.05 * rr * t)
        else:  # cross (plus sign), arms 0.76 r wide
            arm = 0.38 * rr
            m = ((ax <= arm) & (ay <= rr)) | ((ay <= arm) & (ax <= rr))
        out[idx] = m
    return out


def _ellipse_masks(dx: np.ndarray, dy: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rotated ellipses: semi-axes ``a``, ``b`` (n,), angle ``theta`` (n,) -> bool (n, H, W)."""
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = (c * dx + s * dy) / a[:, None, None], (c * dy - s * dx) / b[:, None, None]
    return (u * u + v * v <= 1.0)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hue in degrees, saturation, value (n,) -> RGB (n, 3) in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + (h[:, None] % 360.0) / 60.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _boxes(masks: np.ndarray) -> np.ndarray:
    """Tight (x0, y0, x1, y1) boxes of bool masks (n, H, W), exclusive ends -> int64 (n, 4)."""
    rows, cols = masks.any(2), masks.any(1)  # (n, H), (n, W)
    H, W = masks.shape[1:]
    y0, x0 = rows.argmax(1), cols.argmax(1)
    y1, x1 = H - rows[:, ::-1].argmax(1), W - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def _place(rng: np.random.Generator, ra: np.ndarray, rb: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) (x, y) of A and B inside the image, boxes >= ``GAP`` px apart along x or y.

    ``ra``, ``rb``: (n,) half-extents of the objects. Rejection-sampled, redrawing failures only.
    """
    n = ra.shape[0]
    ca, cb = np.zeros((n, 2)), np.zeros((n, 2))
    todo = np.arange(n)
    for _ in range(1000):
        if todo.size == 0:
            return ca, cb
        m = todo.size
        lo_a, lo_b = ra[todo] + 1, rb[todo] + 1
        ca[todo] = lo_a[:, None] + rng.random((m, 2)) * (size - 2 * lo_a)[:, None]
        cb[todo] = lo_b[:, None] + rng.random((m, 2)) * (size - 2 * lo_b)[:, None]
        sep = np.abs(ca[todo] - cb[todo]).max(1) - ra[todo] - rb[todo]
        todo = todo[sep < GAP + 1]  # +1: rounding of the rasterised outlines
    raise RuntimeError(f"could not place two non-overlapping objects in {size}x{size} images; use size >= 48")


# ----------------------------------------------------------------------------------------------
# public API


def make_shapes(n: int, seed: int = 0, size: int = 64) -> ShapesBatch:
    """Generate ``n`` images deterministically from ``seed`` (same seed -> identical batch).

    Args:
        n: number of images.
        seed: NumPy ``default_rng`` seed.
        size: image side in pixels (>= 48; object sizes scale with it, 64 is the default).

    Returns:
        :class:`ShapesBatch` with images (n, 3, size, size) and labels / masks / boxes per head.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if size < 48:
        raise ConfigError(f"size must be >= 48, got {size}")
    rng = np.random.default_rng(seed)
    k = size / 64.0
    shape_lbl = rng.integers(0, len(SHAPE_CLASSES), n)
    colour_lbl = rng.integers(0, len(COLOUR_CLASSES), n)

    # object sizes: A's size r in [6, 10] px; B an ellipse (semi-axes 5..10, 4..8) or one of A's shapes
    ra = rng.uniform(6.0, 10.0, n) * k
    b_kind = rng.integers(-1, len(SHAPE_CLASSES), n)  # -1: ellipse, else a shape like A's
    rb_shape = rng.uniform(5.5, 9.0, n) * k
    ea, eb = rng.uniform(5.0, 10.0, n) * k, rng.uniform(4.0, 8.0, n) * k
    theta = rng.uniform(0.0, np.pi, n)
    ext_b = np.where(b_kind < 0, np.maximum(ea, eb), 1.05 * rb_shape)  # half-extents (triangle: 1.05 r)
    ca, cb = _place(rng, 1.05 * ra, ext_b, size)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    ca, cb = ca.astype(np.float32), cb.astype(np.float32)
    mask_a = _shape_masks(shape_lbl, xx - ca[:, :1, None], yy - ca[:, 1:, None], ra)
    dxb, dyb = xx - cb[:, :1, None], yy - cb[:, 1:, None]
    mask_b = _shape_masks(b_kind, dxb, dyb, rb_shape)  # b_kind -1 (ellipse) is left empty here
    ell = np.flatnonzero(b_kind < 0)
    mask_b[ell] = _ellipse_masks(dxb[ell], dyb[ell], ea[ell], eb[ell], theta[ell])
    mask_b &= ~mask_a  # never the case (placement keeps a gap); guarantees disjoint masks

    # colours: near-grey dark background, grey A (tiny channel jitter), saturated B
    bg = rng.uniform(0.0, 0.3, n)[:, None] + rng.uniform(-0.02, 0.02, (n, 3))
    grey = rng.uniform(0.5, 1.0, n)[:, None] + rng.uniform(-0.03, 0.03, (n, 3))
    hue = _HUES[colour_lbl] + rng.uniform(-20.0, 20.0, n)
    col_b = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0, n), rng.uniform(0.6, 1.0, n))
    noise_sd = rng.uniform(0.0, 0.04, n)[:, None, None, None]

    # B's texture: brightness stripes (random period, angle, phase, depth), the same for every class
    period, ang = rng.uniform(3.0, 6.0, n).astype(np.float32), rng.uniform(0.0, np.pi, n).astype(np.float32)
    phase, depth = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32), rng.uniform(0.3, 0.6, n).astype(np.float32)
    proj = np.cos(ang)[:, None, None] * xx + np.sin(ang)[:, None, None] * yy  # (n, H, W)
    shade = 1.0 - depth[:, None, None] * 0.5 * (1.0 + np.sin(2 * np.pi * proj / period[:, None, None] + phase[:, None, None]))

    fa, fb = mask_a[:, None].astype(np.float32), mask_b[:, None].astype(np.float32)
    img = (bg[:, :, None, None] * (1.0 - fa - fb) + grey[:, :, None, None] * fa
           + col_b[:, :, None, None].astype(np.float32) * (fb * shade[:, None])).astype(np.float32)
    img += rng.standard_normal((n, 3, size, size), dtype=np.float32) * noise_sd.astype(np.float32)
    np.clip(img, 0.0, 1.0, out=img)

    arr = default_array  # torch tensors when torch is installed, else the NumPy arrays themselves
    return ShapesBatch(
        images=arr(img),
        labels={"shape": arr(shape_lbl.astype(np.int64)), "colour": arr(colour_lbl.astype(np.int64))},
        masks={"shape": arr(mask_a), "colour": arr(mask_b)},
        boxes={"shape": arr(_boxes(mask_a)), "colour": arr(_boxes(mask_b))},
    )


class ShapesDataset:
    """``make_shapes(n, seed, size)`` as a map-style dataset (generated once, held in memory): any
    loader that takes ``len`` and ``[i]`` (``torch.utils.data.DataLoader``) takes it.

    ``ds[i]`` -> ``{"image": (3, H, W) float32, "labels": {"shape": long, "colour": long},
    "masks": {head: (H, W) bool}, "boxes": {head: (4,) long}}`` (collates with the default collate).
    """

    def __init__(self, n: int, seed: int = 0, size: int = 64) -> None:
        self.batch = make_shapes(n, seed=seed, size=size)

    def __len__(self) -> int:
        return len(self.batch)

    def __getitem__(self, i: int) -> Dict[str, object]:
        b = self.batch
        return {"image": b.images[i], "labels": {h: v[i] for h, v in b.labels.items()},
                "masks": {h: v[i] for h, v in b.masks.items()}, "boxes": {h: v[i] for h, v in b.boxes.items()}}
