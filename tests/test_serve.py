"""``camlens serve``'s JSON API and its limits (issue 15): the answers are camlens.explain's maps; oversize,
non-image, bomb, path-like strings in every field and 100 concurrent requests are answered and the server
stays up; the token and host rules; the live WebSocket's newest-frame-wins."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading
import time
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import camlens  # noqa: E402
from camlens.fronts.serve import ServeConfig, check_host, create_app, layer_tree  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from serve_util import bomb_png, png_bytes, running, shapes_image  # noqa: E402

NAME = "shapes-2head"


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return camlens.models.load(NAME)


def _client(model, **cfg) -> TestClient:
    return TestClient(create_app({NAME: model}, ServeConfig(**cfg)), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(model):
    return _client(model, max_bytes=300_000, max_pixels=1_000_000, max_concurrent=2)


def _grey(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert im.mode == "L"
    return np.asarray(im)


def _post(client, image: bytes, **fields):
    fields.setdefault("model", NAME)
    return client.post("/api/explain", files={"image": ("x.png", image, "image/png")}, data=fields)


def test_models_methods_and_the_layer_tree(client, model):
    assert client.get("/api/models").json() == [{
        "name": NAME, "default_layer": "features", "input_size": 64,
        "heads": {"shape": ["circle", "square", "triangle", "cross"], "colour": ["red", "green", "blue"]}}]
    methods = {m["name"]: m for m in client.get("/api/methods").json()}
    assert {"gradcam", "gradcampp", "occlusion"} <= set(methods) and methods["occlusion"]["needs_layer"] is False
    assert "attention_rollout" not in methods  # attention methods need a transformer
    res = client.get("/api/layers", params={"model": NAME}).json()
    flat = []

    def walk(nodes, depth):
        for n in nodes:
            flat.append((n["path"], n["default"], depth))
            assert all(c["path"].startswith(n["path"] + ".") for c in n["children"])
            walk(n["children"], depth + 1)
    walk(res["tree"], 0)
    assert [p for p, _, _ in flat] == camlens.layer_names(model) == [n for n, _ in model.model.named_modules() if n]
    assert [p for p, d, _ in flat if d] == ["features"] == [res["default"]]
    assert ("features.0.0", False, 2) in flat and [t["path"] for t in res["tree"]] == ["features", "shape_head", "colour_head"]


def test_layer_tree_orphans_hang_at_the_top():
    assert layer_tree(["a", "a.b", "c.d"], "a.b") == [
        {"name": "a", "path": "a", "default": False, "children": [
            {"name": "b", "path": "a.b", "default": True, "children": []}]},
        {"name": "d", "path": "c.d", "default": False, "children": []}]


def test_explain_answers_the_maps_of_camlens_explain(client, model):
    img = shapes_image(1, 80)
    r = _post(client, png_bytes(img), method="gradcampp", layer="features.3",
              targets=json.dumps({"shape": {"top": 2}, "colour": {"classes": ["blue", 0]}}))
    assert r.status_code == 200, r.text
    res = r.json()
    ref = camlens.explain(model, [Image.fromarray(img)], top_k=2, heads=["shape"], layer="features.3", method="gradcampp")
    ref2 = camlens.explain(model, [Image.fromarray(img)], ["colour:2", "colour:0"], layer="features.3", method="gradcampp")
    assert res["layers"] == ["features.3"] and res["method"] == "gradcampp"
    assert [m["label"] for m in res["maps"]] == ref.labels[0] + ["colour: blue", "colour: red"]
    assert [m["head"] for m in res["maps"]] == ["shape", "shape", "colour", "colour"]
    maps = np.concatenate([ref.maps[0].numpy(), ref2.maps[0].numpy()])
    got = np.stack([_grey(m["png"]) for m in res["maps"]])
    assert got.shape == (4, res["height"], res["width"]) == (4,) + tuple(maps.shape[1:])
    assert np.abs(got.astype(int) - np.rint(maps * 255)).max() <= 1
    np.testing.assert_allclose([m["prob"] for m in res["maps"]], np.concatenate([ref.probs[0], ref2.probs[0]]), atol=1e-5)
    assert res["maps"][0]["color"] == [31, 119, 180]  # the report's palette
    # the saved Explanation: Explanation.save, read back by camlens.load
    blob = client.get(f"/api/explanations/{res['id']}.npz")
    assert blob.status_code == 200 and blob.headers["content-disposition"].endswith('.npz"')
    path = __import__("tempfile").mkdtemp() + "/e.npz"
    open(path, "wb").write(blob.content)
    back = camlens.load(path)
    assert back.labels == ref.labels and torch.equal(back.maps, ref.maps)
    assert client.get(f"/api/explanations/{res['id']}.npz", params={"part": 1}).status_code == 200
    assert client.get(f"/api/explanations/{res['id']}.npz", params={"part": 2}).status_code == 404


def test_top_k_per_head_and_defaults(client):
    res = _post(client, png_bytes(shapes_image(2)), targets=json.dumps({"shape": {"top": 3}, "colour": {"top": 1}})).json()
    assert [m["head"] for m in res["maps"]] == ["shape"] * 3 + ["colour"]  # colour's 2nd and 3rd dropped
    res = _post(client, png_bytes(shapes_image(2))).json()  # no targets: the top class of each head
    assert [m["head"] for m in res["maps"]] == ["shape", "colour"] and res["layers"] == ["features"]
    p = [m["prob"] for m in res["maps"]]
    assert all(0 < x <= 1 for x in p)


def test_the_model_comes_back_as_it_came(model):
    net = model.model
    net.train()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    try:
        c = _client(model)
        for method in ("gradcam", "scorecam", "occlusion"):
            assert _post(c, png_bytes(shapes_image(3)), method=method).status_code == 200
        assert net.training and {n: p.requires_grad for n, p in net.named_parameters()} == flags
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
        assert sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                   for m in net.modules()) == hooks
    finally:
        net.eval()


def test_oversize_non_image_and_bombs_are_refused(client):
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3)).astype(np.uint8)  # ~480 kB PNG > 300 kB
    r = _post(client, png_bytes(big))
    assert r.status_code == 413 and "exceeds the limit of 300,000" in r.json()["error"]
    r = client.post("/api/explain", content=b"x" * 400_000, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413
    r = _post(client, bomb_png())
    assert r.status_code == 413 and "40000x40000 = 1,600,000,000 pixels exceeds the limit" in r.json()["error"]
    r = _post(client, png_bytes(np.zeros((1200, 1000, 3), np.uint8)))  # genuine, but 1.2 MP > 1 MP
    assert r.status_code == 413
    for junk in (b"hello", b"\x89PNG\r\n\x1a\n" + b"\0" * 50, b"<svg xmlns='http://www.w3.org/2000/svg'/>", b""):
        r = _post(client, junk)
        assert r.status_code == 422, (junk, r.status_code)
        assert "error" in r.json()
    r = client.post("/api/explain", data={"model": NAME})
    assert r.status_code == 422 and "multipart field 'image'" in r.json()["error"]
    assert client.get("/api/models").status_code == 200


PATHS = ["../../etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini", "file:///etc/passwd", "os.system",
         "__import__('os')", "torchvision:resnet18", "shapes-2head/../x", "%2e%2e%2f", "\0"]


@pytest.mark.parametrize("bad", PATHS)
def test_path_like_strings_in_every_field(client, bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok = png_bytes(shapes_image(4))
    for fields, word in (({"model": bad}, "unknown model"), ({"method": bad}, "unknown method"),
                         ({"layer": bad}, "unknown layer"), ({"targets": json.dumps({bad: {"top": 1}})}, "unknown head"),
                         ({"targets": json.dumps({"shape": {"classes": [bad]}})}, "unknown class"),
                         ({"targets": bad}, "targets must be")):
        r = _post(client, ok, **fields)
        assert r.status_code == 422 and word in r.json()["error"], (fields, r.status_code, r.text)
    r = client.post("/api/explain", files={"image": (bad, ok, "image/png")}, data={"model": NAME})
    assert r.status_code == 200  # the file name is never used
    assert client.get("/api/layers", params={"model": bad}).status_code == 422
    assert client.get(f"/api/explanations/{quote(bad, safe='')}.npz").status_code == 404
    assert list(tmp_path.iterdir()) == []  # nothing written where the server runs


def test_a_token_is_required_when_set(model):
    c = _client(model, token="s3cret")
    assert c.get("/api/models").status_code == 401
    assert c.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/api/models", params={"token": "s3cret"}).status_code == 200
    assert c.get("/", params={"token": "s3cret"}).status_code == 200
    with pytest.raises(Exception):
        with c.websocket_connect("/api/live") as ws:
            ws.receive_text()
    with c.websocket_connect("/api/live?token=s3cret") as ws:
        ws.send_bytes(png_bytes(shapes_image(5)))
        assert len(json.loads(ws.receive_text())["maps"]) == 2


def test_foreign_hosts_and_origins_are_refused_without_a_token(model):
    c = _client(model)
    assert c.get("/api/models", headers={"host": "evil.example"}).status_code == 403  # DNS rebinding
    assert c.get("/api/models", headers={"host": "localhost:8000"}).status_code == 200
    assert c.get("/api/models", headers={"host": "[::1]:8000"}).status_code == 200
    for evil in ("127.0.0.1.evil.example", "localhost.evil.example:80", "[::2]:8000", ""):
        assert c.get("/api/models", headers={"host": evil}).status_code == 403, evil
    r = c.post("/api/explain", files={"image": ("x.png", png_bytes(shapes_image(6)), "image/png")},
               data={"model": NAME}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    with pytest.raises(Exception):
        with c.websocket_connect("/api/live", headers={"origin": "http://evil.example"}) as ws:
            ws.receive_text()


def test_check_host_rule():
    assert check_host("127.0.0.1", None) is None and check_host("localhost", None) is None
    assert check_host("127.0.0.1", "given") == "given" == check_host("0.0.0.0", "given")
    t1, t2 = check_host("0.0.0.0", None), check_host("192.168.1.5", None)
    assert len(t1) == 24 and t1 != t2


def test_busy_requests_get_503(model):
    c = _client(model, max_concurrent=1)
    eng = c.app.state.engine
    eng.admit()  # one request is computing
    try:
        r = _post(c, png_bytes(shapes_image(7)))
        assert r.status_code == 503 and "at most 1" in r.json()["error"]
    finally:
        eng.release()
    assert _post(c, png_bytes(shapes_image(7))).status_code == 200 and eng.busy == 0


def test_100_concurrent_requests_all_answered(model):
    import httpx

    app = create_app({NAME: model}, ServeConfig(max_concurrent=2))
    eng = app.state.engine
    slow = eng.explain

    def explain(*a, **k):  # a model slower than the clients: most find the server busy
        time.sleep(0.05)
        return slow(*a, **k)
    eng.explain = explain
    img = png_bytes(shapes_image(8))
    with running(app) as url:
        def one(i: int) -> int:
            with httpx.Client(base_url=url, timeout=60) as h:
                if i % 10 == 9:
                    return h.post("/api/explain", content=b"junk" * 10,
                                  headers={"content-type": "multipart/form-data; boundary=x"}).status_code
                return h.post("/api/explain", files={"image": ("x.png", img, "image/png")}, data={"model": NAME}).status_code
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            codes = list(pool.map(one, range(100)))
        assert len(codes) == 100 and set(codes) <= {200, 503, 422, 400}, sorted(set(codes))
        assert codes.count(200) >= 2 and codes.count(503) >= 10
        assert eng.busy == 0
        with httpx.Client(base_url=url) as h:  # still up
            assert h.get("/api/models").status_code == 200
            assert h.post("/api/explain", files={"image": ("x.png", img, "image/png")},
                          data={"model": NAME}).status_code == 200


def test_live_newest_frame_wins(model):
    c = _client(model)
    eng = c.app.state.engine
    slow, started = eng.explain, threading.Event()

    def explain(*a, **k):
        started.set()
        time.sleep(0.3)
        return slow(*a, **k)
    eng.explain = explain
    frames = [png_bytes(shapes_image(10 + i)) for i in range(8)]
    with c.websocket_connect("/api/live") as ws:
        ws.send_text(json.dumps({"model": NAME, "method": "gradcam", "targets": {"shape": {"top": 1}, "colour": {"top": 0}}}))
        ws.send_bytes(frames[0])
        assert started.wait(10)
        for f in frames[1:]:  # sent while frame 1 computes: only the newest is kept
            ws.send_bytes(f)
        a, b = json.loads(ws.receive_text()), json.loads(ws.receive_text())
        assert (a["frame"], b["frame"]) == (1, 8) and b["dropped"] == 6
        assert [m["head"] for m in b["maps"]] == ["shape"]
        ws.send_text(json.dumps({"method": "nope"}))
        ws.send_bytes(frames[0])
        err = json.loads(ws.receive_text())
        assert err["frame"] == 9 and err["status"] == 422 and "unknown method" in err["error"]
        ws.send_bytes(b"not an image")
        assert json.loads(ws.receive_text())["status"] == 422


def test_cli_lists_serve_and_refuses_nothing_at_help():
    from typer.testing import CliRunner

    from camlens.fronts.cli import app

    res = CliRunner().invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and "--max-concurrent" in res.output and "--token" in res.output


def test_no_model_named_is_the_first_and_warnings_come_back(client, monkeypatch):
    blank = png_bytes(np.full((64, 64, 3), 128, np.uint8))
    res = client.post("/api/explain", files={"image": ("x.png", blank, "image/png")}).json()
    assert res["model"] == NAME and len(res["maps"]) == 2 and res["warnings"] == []
    explain = camlens.explain

    def warns(*a, **k):
        import warnings

        warnings.warn("1 of 2 maps are constant: ...\nmore", RuntimeWarning)
        warnings.warn("1 of 2 maps are constant: ...", RuntimeWarning)  # the same line once
        return explain(*a, **k)
    monkeypatch.setattr(camlens, "explain", warns)
    res = client.post("/api/explain", files={"image": ("x.png", blank, "image/png")}).json()
    assert res["warnings"] == ["1 of 2 maps are constant: ..."] and len(res["maps"]) == 2
    monkeypatch.undo()
    res = _post(client, blank, layer="shape_head")  # a (B, K) layer: camlens.explain's own error, one line
    assert "error" in res.json() and res.status_code == 422 and "\n" not in res.json()["error"]


def test_run_prints_the_address_and_a_generated_token(model, monkeypatch):
    import uvicorn

    from camlens.fronts.serve import run

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    lines: list[str] = []
    run({NAME: model}, host="0.0.0.0", port=8123, echo=lines.append)
    token = seen["app"].state.engine.config.token
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8123 and len(token) == 24
    assert lines[0] == f"camlens serve: http://0.0.0.0:8123/?token={token}" and token in lines[1]
    c = TestClient(seen["app"], base_url="http://192.168.1.5")  # a token: any host name
    assert c.get("/api/models").status_code == 401 and c.get(f"/api/models?token={token}").status_code == 200
    lines.clear()
    run({NAME: model}, echo=lines.append)
    assert seen["host"] == "127.0.0.1" and lines == ["camlens serve: http://127.0.0.1:8000/"]
    assert seen["app"].state.engine.config.token is None


def test_a_model_failure_is_a_500_and_the_server_stays_up(model, monkeypatch):
    c = _client(model)

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore")
    monkeypatch.setattr(camlens, "explain", boom)
    r = _post(c, png_bytes(shapes_image(9)))
    assert r.status_code == 500 and r.json()["error"] == ("gradcam on shapes-2head failed: RuntimeError: CUDA out of "
                                                          "memory. Tried to allocate 2 GiB")
    with c.websocket_connect("/api/live") as ws:
        ws.send_bytes(png_bytes(shapes_image(9)))
        assert json.loads(ws.receive_text())["status"] == 500
        monkeypatch.undo()
        ws.send_bytes(png_bytes(shapes_image(9)))
        assert len(json.loads(ws.receive_text())["maps"]) == 2  # the same connection goes on
    assert c.app.state.engine.busy == 0


def test_load_image_reads_bytes_as_it_reads_files(tmp_path):
    from camlens.errors import InputError
    from camlens.io.images import load_image

    img = shapes_image(11, 40)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(img))
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(load_image(path)))
    np.testing.assert_array_equal(np.asarray(load_image(bytearray(path.read_bytes()))), img)
    with pytest.raises(InputError, match="cannot read image <bytes>: 40000x40000 = 1,600,000,000 pixels exceeds the limit"):
        load_image(bomb_png())
    with pytest.raises(InputError, match="cannot read image <bytes>"):
        load_image(b"GIF89a garbage")
