"""Visualisation: colourised maps, overlays, figure grids and PNG export."""

from .grid import explanation_grid, grid, save_png
from .overlay import colorize, overlay

__all__ = ["colorize", "overlay", "grid", "save_png", "explanation_grid"]
