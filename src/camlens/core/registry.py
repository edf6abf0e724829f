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
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from .errors import ConfigError, ConfigTypeError

__all__ = ["Registry", "normalise_name", "Option", "check_options", "defaults", "positive_int", "positive_number",
           "number", "fraction", "one_of", "optional", "int_or_pair",
           "int_or_sides"]

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


# ------------------------------------------------------------------------------------------------
# typed options: one spec (name, type, default, check) for every method and metric option


@dataclass(frozen=True)
class Option:
    """A method's or metric's option: ``default``, what values it takes (``check(value)`` returns
    ``None`` when fine, else what was expected, e.g. ``"a positive int"``), and one line of ``doc``.

    Checked once when the option is given (:func:`check_options`); the error names the owner, the
    option, what it takes and what was given."""

    default: Any
    check: Optional[Callable[[Any], Optional[str]]] = None
    doc: str = ""
    type_error: bool = False  # a wrong value is a ConfigTypeError (a TypeError) rather than a ConfigError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: Any) -> Optional[str]:
    return None if _is_int(v) and v > 0 else "a positive int"


def positive_number(v: Any) -> Optional[str]:
    return None if _is_number(v) and v > 0 else "a number > 0"


def number(v: Any) -> Optional[str]:
    return None if _is_number(v) else "a number"


def fraction(v: Any) -> Optional[str]:
    return None if _is_number(v) and 0 < v <= 1 else "a number in (0, 1]"


def one_of(*choices: Any) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        return None if v in choices else f"one of {', '.join(map(repr, choices))}"
    return check


def optional(inner: Callable[[Any], Optional[str]], what: str = "None") -> Callable[[Any], Optional[str]]:
    """``None`` or what ``inner`` accepts."""
    def check(v: Any) -> Optional[str]:
        if v is None:
            return None
        why = inner(v)
        return None if why is None else f"{why} or None ({what})"
    return check


def int_or_pair(v: Any) -> Optional[str]:
    """A positive int or an ``(h, w)`` pair of them."""
    vals = (v, v) if _is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else ()
    ok = len(vals) == 2 and all(_is_int(a) and a > 0 for a in vals)
    return None if ok else "a positive int or a pair (h, w) of them"


def int_or_sides(v: Any) -> Optional[str]:
    """A positive int, or a tuple of 2 (``(h, w)``: images) or 3 (``(d, h, w)``: volumes) of them."""
    vals = (v,) if _is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else ()
    ok = len(vals) in (1, 2, 3) and (len(vals) > 1 or _is_int(v)) and all(_is_int(a) and a > 0 for a in vals)
    return None if ok else "a positive int, or (h, w) / (d, h, w) of them"


def defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """``name -> default`` of a mapping of :class:`Option` s (plain values are their own defaults)."""
    return {k: v.default if isinstance(v, Option) else v for k, v in options.items()}


def check_options(kind: str, owner: str, options: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """The one rule for method and metric options: every given key must be one of ``options`` (a
    ConfigTypeError listing them), and each value must pass its :class:`Option` check (a ConfigError,
    or ConfigTypeError for ``type_error`` options, naming ``owner``, the option, what it takes and
    the value). ``kind``: "method" or "metric"."""
    unknown = set(given) - set(options)
    if unknown:
        raise ConfigTypeError(f"{kind} {owner!r} has no option(s) {sorted(unknown)}; its options: "
                              f"{', '.join(sorted(options)) or 'none'}")
    for key, value in given.items():
        spec = options.get(key)
        if isinstance(spec, Option) and spec.check is not None:
            why = spec.check(value)
            if why is not None:
                kind = ConfigTypeError if spec.type_error else ConfigError
                raise kind(f"{owner} {key} must be {why}, got {value!r}" + (f" ({spec.doc})" if spec.doc else ""))
