"""``camlens serve``: the web app (:mod:`camlens.fronts.serve`) on the models named here."""

from __future__ import annotations

from typing import List, Optional

import typer

from camlens.fronts.cli.base import _fatal, command, console
from camlens.fronts.cli.common import MODEL_HELP, _load_model


@command()
def serve(
    model: List[str] = typer.Option(["efficientnet-lite0"], "--model", "-m", help=MODEL_HELP + " (repeat for several)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; any but loopback needs a token"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    token: Optional[str] = typer.Option(None, "--token", envvar="CAMLENS_TOKEN",
                                        help="required of every request; generated and printed for a non-loopback host"),
    device: Optional[str] = typer.Option(None, "--device"),
    max_bytes: int = typer.Option(16 * 1024 * 1024, "--max-bytes", min=1, help="largest upload / frame, in bytes"),
    max_pixels: int = typer.Option(25_000_000, "--max-pixels", min=1, help="largest image (width x height)"),
    max_concurrent: int = typer.Option(4, "--max-concurrent", min=1, help="requests computing at once; beyond: 503"),
) -> None:
    """A local web app: drop an image or use the webcam, pick a model, layer, method and targets; the
    maps are coloured and composited in the browser. JSON API: /api/models, /api/methods,
    /api/layers, /api/explain, WebSocket /api/live (see camlens.fronts.serve.app)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        _fatal(f"camlens serve needs {err.name}, which is not installed: pip install \"camlens[viewer]\"")
    from camlens.fronts.serve import ServeConfig, run

    models = {}
    for name in model:
        if name in models:
            continue
        with console.status(f"loading {name}..."):
            models[name] = _load_model(name, None, device)
    run(models, host=host, port=port, token=token,
        config=ServeConfig(max_bytes=max_bytes, max_pixels=max_pixels, max_concurrent=max_concurrent),
        echo=lambda s: console.print(s, highlight=False, soft_wrap=True))
