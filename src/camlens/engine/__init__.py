"""The engine: one pass (capture → targets → scores → gradients → method, :mod:`.passes`), one
finish (post-processing, :mod:`.finish`), the wrappers around a pass (:mod:`.wrappers`), tiling
(:mod:`.tiling`);
the public calls built from them — :func:`camlens.explain` (:mod:`.api`), :func:`camlens.stream`
(:mod:`.stream`), :func:`camlens.evaluate` (:mod:`.evaluate`). Nothing here knows a method by
name or imports a framework: models go through their :class:`~camlens.backends.base.Backend`.

The names of :mod:`.passes`, :mod:`.finish` and :mod:`.wrappers` are importable from here
(``from camlens.engine import run_pass``).
"""

from .finish import finish, finish_maps
from .passes import (Pass, check_method, check_scores, class_scores, is_loaded, match_dtype, outside_inference_mode, prepare,
                     run_pass, target_scores, unwrap_model)
from .wrappers import AUG_SCALES, aug_smoothed, noise_smoothed

__all__ = ["is_loaded", "unwrap_model", "prepare", "check_method", "outside_inference_mode", "match_dtype", "check_scores",
           "class_scores", "target_scores", "Pass", "run_pass", "finish", "finish_maps", "noise_smoothed",
           "aug_smoothed", "AUG_SCALES"]
