"""camlens' exceptions: one base class, a few kinds, each also the built-in type it replaces.

Catch :class:`CamlensError` for every error camlens raises on purpose (the CLI does, in one place:
one line and exit code 2), or a kind:

======================  =====================================================================
``ConfigError``         an option or argument value (a method option, precision, device, name)
``ModelError``          the model cannot be explained as asked (its outputs, a weights file
                        that does not fit); ``LayerError`` for a layer that is missing, never
                        runs, runs twice or has an output camlens cannot read
``TargetError``         a target that does not resolve against the model's outputs
``InputError``          an input image, tensor or file (NaN pixels, shapes, unreadable files)
``MissingDependencyError``  an optional package that a feature needs is not installed
======================  =====================================================================

Each kind subclasses a built-in exception too (``ValueError`` unless its name says otherwise:
``ConfigTypeError`` is a ``TypeError``, ``LayerNotFoundError`` a ``KeyError``, ...), so code that
caught the built-in types before keeps working.
"""

from __future__ import annotations

__all__ = [
    "CamlensError", "ConfigError", "ConfigTypeError", "ConfigKeyError", "MissingFileError",
    "ModelError", "ModelTypeError", "ModelRuntimeError", "NonFiniteScoresError",
    "LayerError", "LayerNotFoundError", "LayerTypeError", "LayerRuntimeError",
    "TargetError", "TargetTypeError", "TargetIndexError", "TargetKeyError",
    "InputError", "InputTypeError", "InputFileNotFoundError", "MissingDependencyError", "PER_INPUT_ERRORS",
]


class CamlensError(Exception):
    """Base class of every error camlens raises on purpose."""


class ConfigError(CamlensError, ValueError):
    """An option or argument has a value camlens cannot use."""


class ConfigTypeError(ConfigError, TypeError):
    """An option or argument has a type camlens cannot use."""


class ConfigKeyError(ConfigError, KeyError):
    """A name (a dtype, a backend, ...) the framework or camlens does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file named by an option (weights, a model factory file) does not exist."""


class ModelError(CamlensError, ValueError):
    """The model cannot be explained as asked."""


class ModelTypeError(ModelError, TypeError):
    """The model's output has a type camlens cannot read."""


class ModelRuntimeError(ModelError, RuntimeError):
    """The model's state or weights do not allow the call (e.g. weights that do not fit)."""


class NonFiniteScoresError(ModelError, FloatingPointError):
    """The model returned NaN/Inf scores for finite inputs."""


class LayerError(ModelError):
    """A layer that is missing, never runs, runs more than once, or has an unreadable output."""


class LayerNotFoundError(LayerError, KeyError):
    """No layer of that name (the message lists the closest valid names)."""

    def __str__(self) -> str:  # a KeyError would show its message quoted
        return str(self.args[0]) if self.args else ""


class LayerTypeError(LayerError, TypeError):
    """A layer's output is not a tensor."""


class LayerRuntimeError(LayerError, RuntimeError):
    """A layer did not run once in the forward, or the scores do not depend on it."""


class TargetError(CamlensError, ValueError):
    """A target does not resolve against the model's outputs."""


class TargetTypeError(TargetError, TypeError):
    """A target of a type camlens cannot use."""


class TargetIndexError(TargetError, IndexError):
    """A class index out of range for its head."""


class TargetKeyError(TargetError, KeyError):
    """No model output of that name (the message lists the outputs)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(CamlensError, ValueError):
    """An input image, tensor or file camlens cannot use."""


class InputTypeError(InputError, TypeError):
    """An input of a type camlens cannot use."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """An input image file does not exist."""


class MissingDependencyError(CamlensError, ImportError):
    """An optional package that a feature needs is not installed."""


#: The camlens errors that belong to the one input they were raised for (its file or its values,
#: or non-finite scores of the model on it); every other :class:`CamlensError` (an unknown layer,
#: target or option) would hit every input alike. ``camlens.stream(on_error="yield")`` and the
#: CLI's per-file rule both read it.
PER_INPUT_ERRORS: tuple[type[CamlensError], ...] = (InputError, NonFiniteScoresError)
