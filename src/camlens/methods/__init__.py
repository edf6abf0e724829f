"""CAM methods: one small module per family, registered by name."""

# importing a method module registers its methods
from . import cam, gradcam, gradcam_family  # noqa: F401
from . import ablationcam, scorecam  # noqa: F401
from . import guided, occlusion  # noqa: F401
from . import baselines  # noqa: F401
from . import attention  # noqa: F401
from . import drise  # noqa: F401
from . import perturbation  # noqa: F401
from .base import (ActivationMethod, GradientMethod, Method, MethodContext, MethodOutput, available_methods,
                   get_method, register)

__all__ = ["Method", "GradientMethod", "ActivationMethod", "MethodContext", "MethodOutput", "available_methods",
           "get_method", "register"]
