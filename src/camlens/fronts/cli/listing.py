"""``camlens methods``, ``camlens metrics``, ``camlens models``: what camlens has, as tables or lines."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from camlens.fronts.cli.base import command


@command()
def methods() -> None:
    """List the available methods, what they do, what they cost, and whether they explain volumes /
    video clips (B, C, D, H, W)."""
    import camlens

    table = Table()
    table.add_column("method", no_wrap=True)
    for col in ("what it does", "cost per call"):
        table.add_column(col)
    table.add_column("volumes", no_wrap=True)
    for name, m in sorted(camlens.available_methods().items()):
        table.add_row(name, m.description, m.cost, "yes" if m.volumes else "no")
    Console().print(table)


@command()
def metrics() -> None:
    """List the available metrics: direction, kind, what they need beyond the model and maps, and whether
    they score volume / clip maps."""
    import camlens

    table = Table()
    table.add_column("metric", no_wrap=True)
    for col in ("", "kind", "needs", "what it measures"):
        table.add_column(col)
    table.add_column("volumes", no_wrap=True)
    for name, m in sorted(camlens.metrics.available_metrics().items()):
        needs = ", ".join(r.replace("|", " or ") for r in m.requires) or "-"
        table.add_row(name, m.arrow, m.category, needs, m.description, "yes" if getattr(m, "volumes", False) else "no")
    Console().print(table)


@command()
def models() -> None:
    """List the built-in models and the loader forms."""
    import camlens

    for name in camlens.models.list_models():
        print(name)
    print("torchvision:NAME  timm:NAME  path/to/file.py:factory  (random init unless --weights FILE)")
    print("keras:path/to/model.keras (.h5)  keras:applications.NAME[@SIZE]  (random init unless --weights FILE.weights.h5)")
