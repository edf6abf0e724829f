"""Faithfulness, localisation, complexity and randomisation metrics; each declares its direction.

``camlens.evaluate`` is the one call most users need; the metric objects are importable here.
"""

from . import faithfulness, localisation, road, sanity  # noqa: F401  (registers the metrics)
from .base import (EvalContext, Metric, MetricResult, auc, available_metrics, get_metric, mean_sem, order_pixels,
                   register_metric)
from .localisation import pointing_game

__all__ = ["Metric", "MetricResult", "EvalContext", "available_metrics", "get_metric", "register_metric", "auc",
           "order_pixels", "mean_sem", "pointing_game"]
