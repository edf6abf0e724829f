"""Model loading and preprocessing.

>>> from camlens import models
>>> lm = models.load()                      # EfficientNet-Lite0, ImageNet weights, eval mode
>>> x = lm.preprocess("cat.jpg")            # Tensor (1, 3, 224, W) on lm.device
>>> logits = lm(x)                          # (1, 1000)
>>> rgb = lm.to_display(x)                  # uint8 (1, 224, W, 3) for overlays
"""

from ..io.images import load_image
from .loading import (
    DEFAULT_MODEL,
    LoadedModel,
    guess_default_layer,
    imagenet_categories,
    list_models,
    load,
    load_weights_file,
    remap_state_dict_by_order,
)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, to_display

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "Preprocess",
    "guess_default_layer",
    "imagenet_categories",
    "list_models",
    "load",
    "load_image",
    "load_weights_file",
    "remap_state_dict_by_order",
    "to_display",
]
