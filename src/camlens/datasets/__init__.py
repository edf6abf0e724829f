"""Synthetic data sets with ground truth for checking explanations (see :mod:`camlens.datasets.shapes`)."""

from .shapes import COLOUR_CLASSES, SHAPE_CLASSES, ShapesBatch, ShapesDataset, make_shapes

__all__ = ["COLOUR_CLASSES", "SHAPE_CLASSES", "ShapesBatch", "ShapesDataset", "make_shapes"]
