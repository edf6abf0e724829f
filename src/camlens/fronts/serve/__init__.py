"""``camlens serve``: a local web app to explain images (and the webcam, live) in the browser.

:func:`create_app` builds the FastAPI app (the routes and limits: :mod:`camlens.fronts.serve.app`);
:func:`run` checks the host / token rule and runs it with uvicorn. Needs ``pip install "camlens[viewer]"``.
"""

from __future__ import annotations

import secrets
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional

from ...core.errors import ConfigError
from .app import LOOPBACK, ServeConfig, create_app, layer_tree

__all__ = ["create_app", "ServeConfig", "run", "check_host", "layer_tree", "in_thread"]


def check_host(host: str, token: Optional[str]) -> Optional[str]:
    """The token a server on ``host`` must require: ``token`` if given; for any host but loopback
    (127.0.0.1, localhost, ::1) a new random one (``secrets.token_urlsafe(18)``) if none was given;
    else ``None`` (loopback, no token: only this machine can reach it)."""
    if token:
        return token
    return None if host in LOOPBACK else secrets.token_urlsafe(18)


def run(models: Mapping[str, Any], *, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
        config: Optional[ServeConfig] = None, echo: Callable[[str], None] = print) -> None:
    """Serve ``models`` (name → loaded model) at ``http://host:port/`` until interrupted; prints the
    address (with ``?token=`` when a token is required)."""
    import uvicorn

    cfg = config or ServeConfig()
    cfg.token = check_host(host, token)
    app = create_app(models, cfg)
    shown = f"[{host}]" if ":" in host else host
    echo(f"camlens serve: http://{shown}:{port}/" + (f"?token={cfg.token}" if cfg.token else ""))
    if cfg.token and not token:
        echo(f"token (generated, give it to the page as ?token= or scripts as Authorization: Bearer): {cfg.token}")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextmanager
def in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """``app`` served by uvicorn in a daemon thread (``port=0``: a free port) while the block runs; yields
    its base URL (``http://127.0.0.1:PORT``). For tests and scripts (screenshots)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers):
        if time.monotonic() > deadline or not thread.is_alive():
            raise ConfigError(f"the server did not start on {host}:{port} (is the port in use?)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
