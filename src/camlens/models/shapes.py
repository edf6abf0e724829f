"""``ShapesNet``: a small two-head CNN for :mod:`camlens.datasets.shapes`, and its built-in loader.

Shared trunk ``features`` (5 conv + BatchNorm + ReLU blocks: 5x5/2, 3x3, 3x3/2, 3x3, 1x1; total
stride 4, receptive field 21 px) -> (B, 48, 16, 16) at a 64x64 input; each head is global average
pooling + ``nn.Linear`` (so Grad-CAM and CAM both apply at ``"features"``, the output of the last
conv block). Inputs are images in [0, 1] (mean 0, std 1); 60 k parameters.

The shipped weights (``scripts/train_shapes.py``) were trained with cross-entropy on both heads
plus a label-free prior keeping ``features`` quiet on the background (their activation mass
outside both objects, as a fraction of the total, is penalised). Without it the evidence of each
object spreads as a plateau up to ~RF/2 px around it and the maps' argmax often lies just outside
the object; with it each head's evidence sits on its object. Which object each head uses is not
constrained: that is learned (the other object is a distractor for each head).

>>> m = camlens.models.load("shapes-2head")
>>> m.model(torch.rand(2, 3, 64, 64))["shape"].shape   # {"shape": (2, 4), "colour": (2, 3)}
torch.Size([2, 4])
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import InputError, MissingFileError
from ..datasets.shapes import COLOUR_CLASSES, SHAPE_CLASSES
from .preprocess import Preprocess

if TYPE_CHECKING:  # loading imports this module lazily; avoid a cycle at import time
    from .loading import LoadedModel

__all__ = ["ShapesNet", "ShapesPreprocess", "SHAPES_MODEL", "SHAPES_INPUT_SIZE", "SHAPES_LAYER", "load_shapes",
           "shapes_weights_path", "categories"]

SHAPES_MODEL = "shapes-2head"
SHAPES_INPUT_SIZE = 64
SHAPES_LAYER = "features"  # the trunk's last block output (after ReLU), (B, 48, 16, 16)
_WEIGHTS = "shapes_2head.pt"


def _block(cin: int, cout: int, stride: int, k: int = 3) -> nn.Sequential:
    """Conv k x k (padding k // 2) + BatchNorm + ReLU: (B, cin, H, W) -> (B, cout, H / stride, W / stride)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesNet(nn.Module):
    """Two-head CNN: ``forward(x (B, 3, H, W)) -> {"shape": (B, n_shape), "colour": (B, n_colour)}``.

    ``features(x)`` is (B, width, H/4, W/4); ``shape_head`` / ``colour_head`` are Linear layers on
    its global average pool.
    """

    def __init__(self, n_shape: int = len(SHAPE_CLASSES), n_colour: int = len(COLOUR_CLASSES), width: int = 48) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(  # sizes at a 64x64 input; receptive field 21 px
            _block(3, 16, 2, k=5),  # 32x32
            _block(16, 32, 1),      # 32x32
            _block(32, w, 2),       # 16x16
            _block(w, w, 1),        # 16x16
            _block(w, w, 1, k=1),   # 16x16, 1x1 conv: the CAM layer's output
        )
        self.shape_head = nn.Linear(w, n_shape)
        self.colour_head = nn.Linear(w, n_colour)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
        """``x`` (B, 3, H, W) -> (logits per head, ``features(x)`` (B, width, H/4, W/4))."""
        a = self.features(x)
        p = a.mean(dim=(2, 3))  # (B, width)
        return {"shape": self.shape_head(p), "colour": self.colour_head(p)}, a


class ShapesPreprocess(Preprocess):
    """:class:`Preprocess` at 64 px, mean 0, std 1, that also takes tensors.

    A float tensor (3, H, W) or (N, 3, H, W) in [0, 1] (as made by ``make_shapes``; uint8 tensors
    are divided by 255) is resized (bilinear, antialiased) so its shorter side is 64 when it is not
    already, and moved to ``device`` -> (N, 3, H', W') float32. Images (PIL, uint8 / float arrays,
    paths) go through :class:`Preprocess`.
    """

    def __call__(self, images: object) -> Tensor:
        if not isinstance(images, Tensor):
            return super().__call__(images)
        x = images.detach()
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected a tensor (3, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
        hw = self.output_hw(*x.shape[-2:])
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x.cpu() - mean) / std).to(self.device)


def shapes_weights_path() -> Optional[Path]:
    """Path of the shipped ``camlens/data/shapes_2head.pt``, or ``None`` when it is missing."""
    try:
        p = Path(str(resources.files("camlens") / "data" / _WEIGHTS))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual installs
        p = Path(__file__).resolve().parent.parent / "data" / _WEIGHTS
    return p if p.is_file() else None


def categories() -> Dict[str, Sequence[str]]:
    """Class names per head: ``{"shape": SHAPE_CLASSES, "colour": COLOUR_CLASSES}``."""
    return {"shape": list(SHAPE_CLASSES), "colour": list(COLOUR_CLASSES)}


def load_shapes(weights: Optional[str] = None, name: str = SHAPES_MODEL) -> "LoadedModel":
    """The built-in ``"shapes-2head"`` model: :class:`ShapesNet` with the shipped (or given) weights.

    Returns a :class:`~camlens.models.LoadedModel` in eval mode on the CPU with a
    :class:`ShapesPreprocess`, ``categories`` per head and ``default_layer="features"``.

    Raises:
        FileNotFoundError: no ``weights`` given and the shipped weights file is missing.
    """
    from .loading import LoadedModel, load_weights_file

    path = weights if weights is not None else shapes_weights_path()
    if path is None:
        raise MissingFileError(f"camlens/data/{_WEIGHTS} is missing; run scripts/train_shapes.py")
    model = ShapesNet()
    model.load_state_dict(load_weights_file(path), strict=True)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return LoadedModel(
        model=model.eval(),
        preprocess=ShapesPreprocess(SHAPES_INPUT_SIZE, mean, std, "bilinear", False),
        categories=categories(),  # type: ignore[arg-type]  # a dict per head
        default_layer=SHAPES_LAYER,
        name=name,
        mean=mean,
        std=std,
        input_size=SHAPES_INPUT_SIZE,
    )
