"""camlens: class activation maps for every output of PyTorch image models.

>>> import camlens
>>> m = camlens.models.load("efficientnet-lite0")
>>> exp = camlens.explain(m, "cat.jpg", top_k=3)
>>> exp.maps.shape          # (B, T, H, W), each map in [0, 1]
"""

from . import errors, methods, metrics, postprocess
from .api import explain
from .compare import Agreement, agreement
from .errors import CamlensError
from .evaluate import Scores, evaluate
from .explanation import Explanation, load
from .methods import available_methods
from .stream import Failure, stream
from .targets import Target

__version__ = "0.1.0"


def __getattr__(name: str):
    # heavier submodules load on first use: camlens.models (timm), camlens.viz (matplotlib),
    # camlens.localize (SciPy; boxes_from_maps, masks_from_maps, box_iou, mask_iou, draw_boxes, cutout)
    if name in ("models", "viz", "localize"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'camlens' has no attribute {name!r}")


__all__ = ["explain", "stream", "Failure", "load", "errors", "CamlensError", "evaluate", "Scores", "metrics", "agreement", "Agreement", "Explanation", "Target", "available_methods", "methods", "postprocess", "models", "viz",
           "localize",
           "__version__"]
