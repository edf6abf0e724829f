"""CAM methods: one small module per family, registered by name."""

from . import cam, gradcam  # noqa: F401  (registers the methods)
from .base import GradientMethod, Method, available_methods, get_method, register

__all__ = ["Method", "GradientMethod", "available_methods", "get_method", "register"]
