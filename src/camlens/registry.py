"""One registry type for methods and metrics: one lookup rule, entry points for third-party plug-ins.

A name is looked up ignoring case, ``_`` and ``-`` (``"GradCAM-pp"`` finds ``gradcampp``,
``"road-morf"`` finds ``road_morf``). Another package adds its own by declaring an entry point in
the group ``camlens.methods`` (or ``camlens.metrics``)::

    [project.entry-points."camlens.methods"]
    my_cam = "my_package.cams"            # a module that calls camlens.methods.register(...)
    # or  my_cam = "my_package.cams:MY_CAM"  (a Method object: registered under its name)

Entry points load the first time a lookup misses or the registry is listed; one that fails to
load is a warning naming it, never an error for the other names.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import warnings
from typing import Any, Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry", "normalise_name"]

T = TypeVar("T")


def normalise_name(name: str) -> str:
    """The lookup key of a name: lower case, without ``_`` and ``-``."""
    return str(name).lower().replace("_", "").replace("-", "")


class Registry(dict, Generic[T]):
    """``name -> item`` (items have a ``.name``) for one ``kind`` ("method", "metric").

    A ``dict`` (so tests can ``monkeypatch.setitem`` it) with :meth:`register`, :meth:`get_item`
    (the lookup rule and an error listing close names) and :meth:`available` (entry points loaded)."""

    def __init__(self, kind: str, group: str) -> None:
        super().__init__()
        self.kind, self.group = kind, group
        self._plugins_loaded = False

    def register(self, item: T) -> T:
        """Add ``item`` under ``item.name``; a name (by the lookup rule) that exists is an error."""
        name = item.name  # type: ignore[attr-defined]
        clash = next((n for n in self if normalise_name(n) == normalise_name(name)), None)
        if clash is not None:
            raise ConfigError(f"{self.kind} {name!r} is already registered" +
                              (f" (as {clash!r})" if clash != name else ""))
        self[name] = item
        return item

    def get_item(self, name: str) -> T:
        """The item called ``name`` (case, ``_`` and ``-`` ignored); an unknown name lists close and
        available names."""
        key = normalise_name(name)
        for attempt in range(2):
            for n, item in self.items():
                if normalise_name(n) == key:
                    return item
            if attempt == 0 and not self._load_plugins():
                break
        close = difflib.get_close_matches(str(name).lower(), list(self), n=3, cutoff=0.6)
        if close:
            raise ConfigError(f"unknown {self.kind} {name!r}; did you mean {' or '.join(map(repr, close))}? "
                              f"(`camlens {self.kind}s` lists them all)")
        raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}")

    def available(self) -> dict[str, T]:
        """Every registered item by name, plug-ins included."""
        self._load_plugins()
        return dict(self)

    def _load_plugins(self) -> bool:
        """Load the entry points of ``group`` once; ``True`` if this call loaded any."""
        if self._plugins_loaded:
            return False
        self._plugins_loaded = True
        loaded = False
        for ep in _entry_points(self.group):
            try:
                obj: Any = ep.load()
                if hasattr(obj, "name") and not isinstance(obj, type) and obj.name not in self:
                    self.register(obj)
                loaded = True
            except Exception as err:  # noqa: BLE001 - a broken plug-in must not break camlens
                warnings.warn(f"camlens: the {self.kind} plug-in {ep.name!r} ({ep.value}) of entry-point group "
                              f"{self.group!r} failed to load: {err}", RuntimeWarning, stacklevel=3)
        return loaded


def _entry_points(group: str) -> list:
    try:
        return list(importlib.metadata.entry_points(group=group))
    except TypeError:  # Python 3.9: entry_points() takes no arguments
        return list(importlib.metadata.entry_points().get(group, []))
