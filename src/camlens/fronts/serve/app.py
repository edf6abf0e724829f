"""The ``camlens serve`` web app: a FastAPI application over the public API (``camlens.explain``,
``camlens.layer_names``, ``Explanation.save``), for the page in ``page.html`` and for scripts.

The JSON API (every route the page uses; ``token`` is required when the server has one, as
``Authorization: Bearer TOKEN``, ``X-Camlens-Token: TOKEN`` or ``?token=TOKEN``):

* ``GET /api/models`` → ``[{name, default_layer, heads: {head: [class names]}, input_size}]``: the models
  the server was started with (the client chooses among them by name, never names a file).
* ``GET /api/methods`` → ``[{name, description, cost, needs_layer}]``.
* ``GET /api/layers?model=NAME`` → ``{model, default, tree}``: the model's layers as a tree of
  ``{name, path, default, children}`` (the dotted names split at ``.``); ``default`` is the model's
  default layer.
* ``POST /api/explain`` (multipart): ``image`` (an image file), ``model``, ``method`` (default
  ``gradcam``), ``layer`` (a name of ``/api/layers``; empty: the default), ``targets`` (JSON: per head
  ``{"top": k}`` or ``{"classes": [names or indices]}``; default the top class of every head) →
  ``{id, model, method, layers, width, height, image, maps: [{label, head, cls, prob, color, png}], ms,
  warnings}``:
  ``image`` the display image and each map an 8-bit grey PNG (``round(255 m)``, at the display size) as
  data URIs, so the page colours and composites them itself; ``id`` names the saved Explanation.
* ``GET /api/explanations/{id}.npz``: that Explanation (``Explanation.save``; the last
  :data:`KEEP` results are kept in memory).
* ``WS /api/live``: a text message (JSON: ``model``, ``method``, ``layer``, ``targets`` as above) sets the
  options; each binary message is one frame (a JPEG / PNG file) and is answered by a text message with
  the result as ``/api/explain`` gives it (without ``id``) plus ``frame`` (the frame's number) and
  ``dropped`` (frames replaced by newer ones before they were computed): the newest frame wins, at
  most one is computed at a time and one waits.

Limits: a body over ``max_bytes`` is refused with 413; an image whose header claims more than
``max_pixels`` pixels with 413 (before decoding: decompression bombs); a file that is not an image
with 422; unknown names (model, method, layer, head, class) with 422 listing the valid ones; beyond
``max_concurrent`` requests computing (or waiting their turn) at once, 503. One request computes at
a time (``explain`` hooks the model's layers for the call); its warnings (e.g. constant maps) come back
in the answer's ``warnings``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from fastapi.concurrency import run_in_threadpool

from ...core.errors import CamlensError, ConfigError, InputError
from ...io.images import load_image

__all__ = ["create_app", "ServeConfig", "KEEP", "LOOPBACK"]

#: explanations kept for download (the newest)
KEEP = 16
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: the colormaps the page offers (matplotlib names)
CMAPS = ("jet", "viridis", "inferno", "magma", "gray")


@dataclass
class ServeConfig:
    """The server's limits.

    Fields:
        max_bytes: the largest request body (an upload, a live frame), in bytes.
        max_pixels: the largest image (width x height), checked on the file's header before decoding.
        max_concurrent: requests computing (or waiting their turn) at once; beyond: 503.
        token: required of every request when set (any host but loopback must have one).
        max_targets: maps per request (top-k and classes of all heads together).
    """

    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_concurrent: int = 4
    token: Optional[str] = None
    max_targets: int = 16
    allowed_hosts: tuple = field(default_factory=lambda: LOOPBACK + ("testserver",))


class HttpError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _model_info(name: str, lm: Any) -> dict[str, Any]:
    cats = getattr(lm, "categories", None)
    if isinstance(cats, Mapping):
        heads = {str(k): [str(c) for c in v] for k, v in cats.items()}
    elif cats:
        heads = {"0": [str(c) for c in cats]}
    else:
        heads = {}
    return {"name": name, "default_layer": getattr(lm, "default_layer", None), "heads": heads,
            "input_size": getattr(lm, "input_size", None)}


def layer_tree(names: list[str], default: Optional[str]) -> list[dict[str, Any]]:
    """Dotted layer names as a tree: ``[{name, path, default, children}]`` in the names' order
    (``"a.b"`` under ``"a"``; a name whose parent is not listed hangs at the top)."""
    nodes: dict[str, dict[str, Any]] = {}
    roots: list[dict[str, Any]] = []
    for path in names:
        node = {"name": path.rpartition(".")[2], "path": path, "default": path == default, "children": []}
        nodes[path] = node
        parent = path.rpartition(".")[0]
        (nodes[parent]["children"] if parent in nodes else roots).append(node)
    return roots


def _png_uri(arr: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt)
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Engine:
    """The models, the admission count and the compute lock; calls only camlens' public API."""

    def __init__(self, models: Mapping[str, Any], config: ServeConfig) -> None:
        if not models:
            raise ConfigError("camlens serve needs at least one model (--model NAME)")
        self.models = dict(models)
        self.config = config
        self.compute = threading.Lock()  # one computation at a time (explain hooks the model for the call)
        self.busy = 0
        self.busy_lock = threading.Lock()
        self.saved: "OrderedDict[str, Any]" = OrderedDict()
        self._layers: dict[str, list[str]] = {}

    # --- admission: at most max_concurrent at once, the rest 503 ----------------------------
    def admit(self) -> None:
        with self.busy_lock:
            if self.busy >= self.config.max_concurrent:
                raise HttpError(503, f"busy: {self.busy} requests computing (at most {self.config.max_concurrent}); "
                                     "try again shortly")
            self.busy += 1

    def release(self) -> None:
        with self.busy_lock:
            self.busy -= 1

    # --- names the client may give ----------------------------------------------------------
    def model(self, name: Any) -> Any:
        if not isinstance(name, str) or name not in self.models:
            raise HttpError(422, f"unknown model {str(name)[:80]!r}; this server has: {', '.join(self.models)}")
        return self.models[name]

    def layers(self, name: str) -> list[str]:
        import camlens

        if name not in self._layers:
            self._layers[name] = camlens.layer_names(self.model(name))
        return self._layers[name]

    def method(self, name: Any) -> Any:
        import camlens

        methods = camlens.available_methods()
        if not isinstance(name, str) or name not in methods:
            raise HttpError(422, f"unknown method {str(name)[:80]!r}; methods: {', '.join(sorted(methods))}")
        return methods[name]

    def layer(self, model: str, name: Any) -> Optional[str]:
        if name in (None, ""):
            return None
        if not isinstance(name, str) or name not in self.layers(model):
            raise HttpError(422, f"unknown layer {str(name)[:80]!r} of model {model!r}; see GET /api/layers?model={model}")
        return name

    def targets(self, model: str, spec: Any) -> tuple[list[str], dict[str, int]]:
        """``{head: {"top": k} | {"classes": [...]}}`` → explicit targets ``"head:index"`` and per-head
        top-k; heads and classes checked against the model's class names."""
        heads = _model_info(model, self.models[model])["heads"]
        if spec in (None, "", {}):
            return [], {h: 1 for h in heads} if heads else {"0": 1}
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError:
                raise HttpError(422, "targets must be JSON: {head: {\"top\": k} or {\"classes\": [names]}}") from None
        if not isinstance(spec, dict):
            raise HttpError(422, "targets must be a JSON object: {head: {\"top\": k} or {\"classes\": [names]}}")
        explicit: list[str] = []
        top: dict[str, int] = {}
        for head, want in spec.items():
            if heads and head not in heads:
                raise HttpError(422, f"unknown head {str(head)[:80]!r}; heads: {', '.join(heads)}")
            names = heads.get(head, [])
            if not isinstance(want, dict):
                raise HttpError(422, f"targets[{head!r}] must be {{\"top\": k}} or {{\"classes\": [...]}}")
            if want.get("classes"):
                classes = want["classes"]
                if not isinstance(classes, list):
                    raise HttpError(422, f"targets[{head!r}].classes must be a list")
                for c in classes:
                    if isinstance(c, str) and c in names:
                        idx = names.index(c)
                    elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < max(len(names), 1):
                        idx = c
                    else:
                        raise HttpError(422, f"unknown class {str(c)[:80]!r} of head {head!r}; classes: "
                                             f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
                    explicit.append(f"{head}:{idx}")
            else:
                k = want.get("top", 1)
                if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                    raise HttpError(422, f"targets[{head!r}].top must be an integer >= 0, got {str(k)[:20]!r}")
                if k:
                    top[head] = min(k, len(names)) if names else k
        if len(explicit) + sum(top.values()) > self.config.max_targets:
            raise HttpError(422, f"at most {self.config.max_targets} maps per request")
        if not explicit and not top:
            raise HttpError(422, "no targets: ask for top k >= 1 or some classes of at least one head")
        return explicit, top

    def decode(self, data: bytes) -> Image.Image:
        if len(data) > self.config.max_bytes:
            raise HttpError(413, f"image of {len(data):,} bytes exceeds the limit of {self.config.max_bytes:,}")
        if not data:
            raise HttpError(422, "no image: send an image file (PNG, JPEG, ...)")
        try:
            return load_image(data, max_pixels=self.config.max_pixels)
        except InputError as err:
            msg = str(err)
            if "exceeds the limit" in msg:
                raise HttpError(413, msg.replace("<bytes>", "upload")) from None
            if "cannot identify image file" in msg:
                msg = "the upload is not an image file (PNG, JPEG, WebP, BMP, TIFF, GIF, ... expected)"
            raise HttpError(422, msg.replace("<bytes>", "upload")) from None

    # --- the computation (in a worker thread) ----------------------------------------------
    def explain(self, image: Image.Image, model: str, method: str, layer: Optional[str],
                targets: Any) -> tuple[dict[str, Any], list[Any]]:
        """Explain ``image``: one ``camlens.explain`` for the top-k heads (``top_k`` = the largest k,
        each head's extra maps dropped from the answer), one for explicit classes; → (the answer,
        the Explanations)."""
        import camlens

        model = model or next(iter(self.models))  # none named: the first the server was started with
        lm = self.model(model)
        self.method(method)
        layer = self.layer(model, layer)
        explicit, top = self.targets(model, targets)
        t0 = time.perf_counter()
        exps = []
        with self.compute, warnings.catch_warnings(record=True) as caught:  # the lock also keeps the warnings apart
            warnings.simplefilter("always")
            try:
                if top:
                    keys = [int(h) if h.isdigit() else h for h in top]
                    exps.append((camlens.explain(lm, [image], layer=layer, method=method, top_k=max(top.values()),
                                                 heads=keys, categories=lm.categories), top))
                if explicit:
                    exps.append((camlens.explain(lm, [image], explicit, layer=layer, method=method,
                                                 categories=lm.categories), None))
            except CamlensError as err:  # a usage error: layer, target or option
                raise HttpError(422, str(err).splitlines()[0]) from None
            except Exception as err:  # noqa: BLE001 - the model's own failure (or out of memory): one line, the server stays up
                raise HttpError(500, f"{method} on {model} failed: {type(err).__name__}: "
                                     f"{(str(err).splitlines() or [''])[0][:300]}") from None
        ms = (time.perf_counter() - t0) * 1000
        answer = self._answer(exps, model, method, ms)
        answer["warnings"] = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        return answer, [e for e, _ in exps]

    def _answer(self, exps: list[tuple[Any, Optional[dict[str, int]]]], model: str, method: str,
                ms: float) -> dict[str, Any]:
        from ...viz.composite import palette_colors

        maps, image, layers = [], None, []
        for exp, top in exps:
            arrays = exp.numpy()  # framework-free copies
            m, probs = arrays["maps"][0], arrays["probs"][0]
            if image is None:
                image = np.asarray(exp.display[0], np.uint8)
                layers = list(exp.layers)
            rank: dict[str, int] = {}
            for t, tg in enumerate(exp.targets[0]):
                head = "0" if tg.head is None else str(tg.head)
                rank[head] = rank.get(head, 0) + 1
                if top is not None and rank[head] > top.get(head, 0):
                    continue  # beyond this head's k
                q = np.rint(np.clip(np.nan_to_num(m[t], nan=0.0), 0, 1) * 255).astype(np.uint8)
                maps.append({"label": str(tg.label), "head": head, "cls": tg.cls,
                             "prob": None if not np.isfinite(probs[t]) else float(probs[t]), "png": _png_uri(q)})
        colors = palette_colors(len(maps), cycle=True).astype(int).tolist()
        for entry, c in zip(maps, colors):
            entry["color"] = c
        h, w = image.shape[:2]
        return {"model": model, "method": method, "layers": layers, "width": w, "height": h,
                "image": _png_uri(image), "maps": maps, "ms": round(ms, 1)}

    def keep(self, exps: list[Any]) -> str:
        key = uuid.uuid4().hex
        self.saved[key] = exps
        while len(self.saved) > KEEP:
            self.saved.popitem(last=False)
        return key


def create_app(models: Mapping[str, Any], config: Optional[ServeConfig] = None) -> Any:
    """The FastAPI app serving ``models`` (name → a :class:`camlens.models.LoadedModel`).

    See the module's docs for the routes. ``config``: the limits and the token (:class:`ServeConfig`)."""
    cfg = config or ServeConfig()
    eng = Engine(models, cfg)
    app = FastAPI(title="camlens serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = eng

    def authorised(headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        if not cfg.token:
            return True
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-camlens-token") or query.get("token", "")
        return secrets.compare_digest(str(given).encode(), cfg.token.encode())

    def host_ok(headers: Mapping[str, str]) -> bool:
        """Without a token only loopback Host names (no DNS rebinding); an Origin must be the Host."""
        host = headers.get("host", "")
        if host.startswith("["):  # [::1]:8000
            name = host[1:].split("]")[0]
        else:  # 127.0.0.1:8000, localhost
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if not cfg.token and name not in cfg.allowed_hosts:
            return False
        origin = headers.get("origin")
        return origin is None or origin.split("://", 1)[-1] == host

    class Guard:
        """ASGI middleware: host / origin / token checks, and the body limit (413) on every request."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] not in ("http", "websocket"):
                return await self.inner(scope, receive, send)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            from urllib.parse import parse_qs

            query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            if not host_ok(headers) or not authorised(headers, query):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                status = 403 if not host_ok(headers) else 401
                msg = (f"forbidden: Host {headers.get('host', '')[:80]!r} / Origin {headers.get('origin', '')[:80]!r} "
                       "(without a token this server answers only loopback names, 127.0.0.1 / localhost, from its own "
                       "page; start it with --token to allow others)" if status == 403 else
                       "a token is required: ?token=TOKEN, Authorization: Bearer TOKEN or X-Camlens-Token: TOKEN "
                       "(camlens serve printed it at start)")
                return await JSONResponse({"error": msg}, status_code=status)(scope, receive, send)
            if scope["type"] == "http":
                try:
                    length = int(headers.get("content-length", "0") or 0)
                except ValueError:
                    length = 0
                if length > cfg.max_bytes:
                    return await JSONResponse({"error": f"request body of {length:,} bytes exceeds the limit of "
                                                        f"{cfg.max_bytes:,}"}, status_code=413)(scope, receive, send)
                seen = 0

                async def counted() -> Any:
                    nonlocal seen
                    msg = await receive()
                    seen += len(msg.get("body", b""))
                    if seen > cfg.max_bytes:
                        raise HttpError(413, f"request body exceeds the limit of {cfg.max_bytes:,} bytes")
                    return msg
                started = False

                async def sending(msg: Any) -> None:
                    nonlocal started
                    started = started or msg["type"] == "http.response.start"
                    await send(msg)
                try:
                    return await self.inner(scope, counted, sending)
                except HttpError as err:
                    if started:
                        raise
                    return await JSONResponse({"error": err.message}, status_code=err.status)(scope, receive, send)
            return await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, err: HttpError) -> Any:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> Any:
        from .page import page_html

        return HTMLResponse(page_html(CMAPS))

    @app.get("/api/models")
    async def api_models() -> Any:
        return [_model_info(n, m) for n, m in eng.models.items()]

    @app.get("/api/methods")
    async def api_methods() -> Any:
        import camlens

        return [{"name": n, "description": m.description, "cost": m.cost, "needs_layer": bool(m.needs_layer)}
                for n, m in sorted(camlens.available_methods().items()) if not m.needs_attention]

    @app.get("/api/layers")
    async def api_layers(model: str) -> Any:
        lm = eng.model(model)
        names = await run_in_threadpool(eng.layers, model)
        default = getattr(lm, "default_layer", None)
        return {"model": model, "default": default, "tree": layer_tree(names, default)}

    @app.post("/api/explain")
    async def api_explain(request: Request) -> Any:
        eng.admit()
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=cfg.max_bytes)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HttpError(422, "no image: send the file as the multipart field 'image'")
            data = await upload.read(cfg.max_bytes + 1)
            fields = {k: form.get(k) for k in ("model", "method", "layer", "targets")}
            for k, v in fields.items():
                if v is not None and not isinstance(v, str):
                    raise HttpError(422, f"{k} must be a text field")
            image = eng.decode(data)
            answer, exps = await run_in_threadpool(eng.explain, image, fields["model"] or "", fields["method"] or "gradcam",
                                                   fields["layer"], fields["targets"])
            answer["id"] = eng.keep(exps)
            return answer
        finally:
            eng.release()

    @app.get("/api/explanations/{key}.npz")
    async def api_saved(key: str, part: int = 0) -> Any:
        exps = eng.saved.get(key) if len(key) == 32 and all(c in "0123456789abcdef" for c in key) else None
        if exps is None or not 0 <= part < len(exps):
            raise HttpError(404, "no such explanation (the server keeps the last "
                                 f"{KEEP}); explain again")
        import tempfile
        from pathlib import Path

        def save() -> bytes:
            with tempfile.TemporaryDirectory() as d:
                return exps[part].save(Path(d) / "explanation.npz").read_bytes()
        blob = await run_in_threadpool(save)
        return Response(blob, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="camlens-{key[:8]}.npz"'})

    @app.websocket("/api/live")
    async def api_live(ws: WebSocket) -> None:
        await ws.accept()
        opts: dict[str, Any] = {"model": next(iter(eng.models)), "method": "gradcam", "layer": None, "targets": None}
        latest: list[Any] = [None]  # the newest frame not computed yet: (number, bytes)
        ready = asyncio.Event()
        state = {"frames": 0, "dropped": 0, "closed": False}

        async def receiver() -> None:
            try:
                while True:
                    msg = await ws.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    if msg.get("text") is not None:
                        try:
                            new = json.loads(msg["text"])
                        except ValueError:
                            new = None
                        if isinstance(new, dict):
                            opts.update({k: new[k] for k in ("model", "method", "layer", "targets") if k in new})
                        continue
                    data = msg.get("bytes") or b""
                    state["frames"] += 1
                    if latest[0] is not None:
                        state["dropped"] += 1  # the newest frame wins
                    latest[0] = (state["frames"], data)
                    ready.set()
            finally:
                state["closed"] = True
                ready.set()

        async def worker() -> None:
            while True:
                await ready.wait()
                ready.clear()
                if state["closed"]:
                    return
                if latest[0] is None:
                    continue
                number, data = latest[0]
                latest[0] = None
                try:
                    if len(data) > cfg.max_bytes:
                        raise HttpError(413, f"frame of {len(data):,} bytes exceeds the limit of {cfg.max_bytes:,}")
                    image = await run_in_threadpool(eng.decode, data)
                    eng.admit()
                    try:
                        answer, _ = await run_in_threadpool(eng.explain, image, opts["model"], opts["method"],
                                                            opts["layer"], opts["targets"])
                    finally:
                        eng.release()
                    answer.update(frame=number, dropped=state["dropped"])
                except HttpError as err:
                    answer = {"frame": number, "error": err.message, "status": err.status}
                try:
                    await ws.send_text(json.dumps(answer))
                except Exception:  # the client went away
                    return

        rx = asyncio.create_task(receiver())
        try:
            await worker()
        except WebSocketDisconnect:
            pass
        finally:
            rx.cancel()

    return app
