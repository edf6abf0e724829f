"""Visualisation: colourised maps, overlays, figure grids, multi-target composites, PNG and HTML export,
slice grids, GIFs and MP4 videos of volume maps."""

from .composite import PALETTE, composite, composite_figure, explanation_composite
from .grid import explanation_grid, filter_grid, grid, save_png
from .html import write_report
from .overlay import colorize, overlay
from .volume import volume_gif, volume_grid, volume_overlays, volume_slices, volume_video

__all__ = ["colorize", "overlay", "grid", "save_png", "explanation_grid", "filter_grid", "PALETTE", "composite",
           "composite_figure", "explanation_composite", "write_report", "volume_slices", "volume_overlays",
           "volume_grid", "volume_gif", "volume_video"]
