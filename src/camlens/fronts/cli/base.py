"""The ``camlens`` Typer app, its stderr console and :func:`command`, the one place the command line
turns camlens' errors into a one-line message and an exit code."""

from __future__ import annotations

import functools
from typing import Any, Callable, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="camlens: where an image model looks, for every output it has.")
console = Console(stderr=True, soft_wrap=True)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
    """``app.command`` that turns a :class:`camlens.errors.CamlensError` reaching the command (an error
    camlens raises on purpose: unknown layer, bad target or option, device) into one line and exit
    code 2. This is the one place the CLI catches them; per-file problems (an unreadable image, the
    model's own error on one image) are reported where they happen and the run goes on (the rule:
    :mod:`camlens.fronts.cli.common`).

    A package of a camlens extra that is not installed (PyTorch without ``camlens[torch]``) is a
    :class:`camlens.errors.MissingDependencyError` naming the extra, reported the same way. Only the
    commands import camlens' torch-backed modules, so ``camlens --help`` needs no PyTorch."""
    def deco(fn: Callable) -> Callable:
        name = (args[0] if args else kwargs.get("name")) or fn.__name__.replace("_", "-")

        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            from camlens import _missing_dependency
            from camlens.core.errors import CamlensError
            from camlens.fronts.cli.common import _first_line  # common imports this module

            try:
                try:
                    return fn(*a, **k)
                except ImportError as err:  # torch missing, found by the command or by a camlens.NAME
                    missing = _missing_dependency(err, f"camlens {name}")
                    if missing is None:
                        raise
                    raise missing from err
            except CamlensError as err:
                _fatal(_first_line(err))
        return app.command(*args, **kwargs)(run)
    return deco


def _fatal(msg: str, code: int = 2) -> NoReturn:
    """Print ``error: msg`` (one line) and end the run with exit code ``code``."""
    console.print(f"[red]error: {escape(msg)}[/]", highlight=False)
    raise typer.Exit(code=code)


def main() -> None:  # pragma: no cover
    """Run the command line on ``sys.argv``."""
    app()
