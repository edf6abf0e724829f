"""The page of ``camlens serve``: one HTML document, CSS and JavaScript inline, no network but its own
server's API.

The server sends raw maps (8-bit grey PNGs); the page colours and composites them in a canvas with
the report's own pixel maths (:data:`camlens.viz.html.COMPOSE_JS`), so toggles, opacity, colormap and
mode redraw without a request; model, layer, method, targets and the image recompute.

Elements (what the browser tests drive): ``#file`` / ``#drop`` (the image), ``#model``, ``#layers``
(the layer tree: ``button.layer-node[data-path]``, the default one ``.default``, the chosen one
``.chosen``; a module with children is a ``<details>``, open down to the default layer), ``#method``, ``#compare`` (more methods, side by side), per head ``input.topk`` and
``input.classes`` (``data-head``), ``#mode``, ``#cmap``, ``#opacity``, ``#toggles`` (per head
``input.head-toggle``, per map ``input.map-toggle[data-target]``), ``#panels`` (a
``section.panel[data-method]`` per method, its ``canvas.view`` counting redraws in ``data-renders``),
``#download-png``, ``#download-npz``, ``#live-start`` / ``#live-stop``, ``canvas#live-view``
(``data-frames``: answers drawn) and ``#fps``. ``<html>`` has ``data-requests`` (explain answers
received), ``data-busy`` while one is pending and ``data-error`` with the last error.
"""

from __future__ import annotations

import html
import json
from typing import Sequence

from ...viz.html import COMPOSE_JS, lut

__all__ = ["page_html"]

_CSS = """
:root{color-scheme:light dark;--fg:#1b1b1b;--bg:#fff;--mute:#666;--line:#ddd;--acc:#4a7fd0}
@media (prefers-color-scheme:dark){:root{--fg:#e8e8e8;--bg:#161616;--mute:#999;--line:#333;--acc:#6b9be6}}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1rem;color:var(--fg);background:var(--bg)}
h1{font-size:1.3rem;margin:0 0 .6rem}h2{font-size:1rem;margin:.2rem 0}h3{font-size:.9rem;margin:.6rem 0 .2rem}
.app{display:flex;gap:1rem;align-items:flex-start;flex-wrap:wrap}
.side{width:300px;flex:0 0 300px}.main{flex:1;min-width:300px}
#drop{border:2px dashed var(--line);padding:.8rem;text-align:center;border-radius:6px;margin-bottom:.5rem}
#drop.over{border-color:var(--acc)}
label{display:block;margin:.25rem 0}select,input[type=text]{max-width:100%}
#layers{max-height:220px;overflow:auto;border:1px solid var(--line);padding:.2rem;font-size:.8rem}
#layers ul{list-style:none;margin:0;padding-left:.9rem}#layers>ul{padding-left:0}
#layers summary{cursor:pointer}#layers li>.layer-node{margin-left:1rem}
.layer-node{border:0;background:none;color:inherit;cursor:pointer;padding:0 .2rem;font:inherit}
.layer-node.default::after{content:" (default)";color:var(--mute)}
.layer-node.chosen{background:var(--acc);color:#fff;border-radius:3px}.layer-node.chosen.default::after{color:#dde}
#panels{display:flex;flex-wrap:wrap;gap:1rem}
.panel canvas.view{display:block;border:1px solid var(--line);image-rendering:pixelated;width:384px;height:auto}
.meta{color:var(--mute);font-size:.8rem}
#toggles ul{list-style:none;padding:0;margin:.2rem 0 .4rem}
.swatch{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;vertical-align:middle}
#error{color:#c00;min-height:1.2em}
#live-view{display:block;border:1px solid var(--line);width:384px;height:auto;margin-top:1rem}
#live-view[data-frames="0"]{display:none}
video{display:none}
"""

_JS = r"""
(function () {
  "use strict";
  var CFG = JSON.parse(document.getElementById("camlens-config").textContent);
  var LUTS = CFG.luts;
  var TOKEN = new URLSearchParams(location.search).get("token") || "";
""" + COMPOSE_JS + r"""
  var $ = function (s) { return document.querySelector(s); };
  var $$ = function (s) { return Array.prototype.slice.call(document.querySelectorAll(s)); };
  var root = document.documentElement;
  var state = {models: [], image: null, results: {}, layer: "", requests: 0, live: null};
  window.camlensServe = state;  // the answers shown (results: method -> /api/explain's answer), for scripts and tests

  function api(path, opts) {
    opts = opts || {};
    opts.headers = Object.assign({}, opts.headers || {}, TOKEN ? {"Authorization": "Bearer " + TOKEN} : {});
    return fetch(path, opts).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
        return body;
      });
    });
  }
  function showError(err) {
    var msg = err ? String(err.message || err) : "";
    $("#error").textContent = msg;
    if (msg) root.dataset.error = msg; else delete root.dataset.error;
  }
  function decode(uri, w, h) {  // RGBA bytes of a data-URI image drawn at (w, h)
    return new Promise(function (resolve, reject) {
      var im = new Image();
      im.onload = function () {
        var c = document.createElement("canvas"); c.width = w; c.height = h;
        var x = c.getContext("2d"); x.drawImage(im, 0, 0, w, h);
        resolve(x.getImageData(0, 0, w, h).data);
      };
      im.onerror = function () { reject(new Error("cannot decode an image from the server")); };
      im.src = uri;
    });
  }
  function decodeResult(res) {
    return Promise.all([decode(res.image, res.width, res.height)].concat(
      res.maps.map(function (m) { return decode(m.png, res.width, res.height); }))).then(function (px) {
      res.pixels = px[0]; res.mapPixels = px.slice(1); return res;
    });
  }

  // --- drawing: the checked maps over the image, in the browser ---------------------------------
  function checked() {
    return $$("input.map-toggle").filter(function (el) { return el.checked; }).map(function (el) { return +el.dataset.target; });
  }
  function draw(res, canvas) {
    canvas.width = res.width; canvas.height = res.height;
    var ctx = canvas.getContext("2d"), out = ctx.createImageData(res.width, res.height);
    var on = [], cols = [];
    checked().forEach(function (t) { if (t < res.mapPixels.length) { on.push(res.mapPixels[t]); cols.push(res.maps[t].color); } });
    var mode = $("#mode").value;
    compose(res.pixels, on, cols, mode !== "composite", LUTS[$("#cmap").value], parseFloat($("#opacity").value) / 100, out.data);
    ctx.putImageData(out, 0, 0);
    canvas.dataset.renders = String((+canvas.dataset.renders || 0) + 1);
  }
  function redraw() {
    $("#opacity-value").textContent = (parseFloat($("#opacity").value) / 100).toFixed(2);
    $("#cmap").disabled = $("#mode").value === "composite";
    Object.keys(state.results).forEach(function (m) {
      var canvas = document.querySelector('section.panel[data-method="' + m + '"] canvas.view');
      if (canvas) draw(state.results[m], canvas);
    });
    if (state.liveResult) draw(state.liveResult, $("#live-view"));
  }

  // --- the toggles of the maps (from the first result) ----------------------------------------
  function buildToggles(res) {
    var box = $("#toggles"), old = checked(), byHead = {}, single = $("#mode").value === "single";
    var same = box.dataset.labels === JSON.stringify(res.maps.map(function (m) { return m.label; }));
    box.innerHTML = "";
    res.maps.forEach(function (m, t) { (byHead[m.head] = byHead[m.head] || []).push(t); });
    Object.keys(byHead).forEach(function (head) {
      var h = document.createElement("div");
      h.innerHTML = '<label><input type="checkbox" class="head-toggle" checked> <b></b></label><ul></ul>';
      h.querySelector("b").textContent = head;
      h.querySelector("input").dataset.head = head;
      byHead[head].forEach(function (t) {
        var m = res.maps[t], li = document.createElement("li");
        li.innerHTML = '<label><input type="checkbox" class="map-toggle"> <span class="swatch"></span> <span class="lab"></span></label>';
        var input = li.querySelector("input");
        input.dataset.target = String(t); input.dataset.head = head;
        input.checked = same ? old.indexOf(t) >= 0 : (!single || t === 0);
        li.querySelector(".swatch").style.background = "rgb(" + m.color.join(",") + ")";
        li.querySelector(".lab").textContent = m.label + (m.prob === null ? "" : " p=" + m.prob.toFixed(2));
        h.querySelector("ul").appendChild(li);
      });
      box.appendChild(h);
    });
    box.dataset.labels = JSON.stringify(res.maps.map(function (m) { return m.label; }));
    syncHeads();
  }
  function syncHeads() {
    $$("input.head-toggle").forEach(function (h) {
      var maps = $$("input.map-toggle").filter(function (el) { return el.dataset.head === h.dataset.head; });
      h.checked = maps.some(function (el) { return el.checked; });
    });
  }
  document.addEventListener("change", function (ev) {
    var el = ev.target;
    if (el.classList.contains("map-toggle")) {
      if ($("#mode").value === "single" && el.checked) $$("input.map-toggle").forEach(function (o) { if (o !== el) o.checked = false; });
      syncHeads(); redraw();
    } else if (el.classList.contains("head-toggle")) {
      if ($("#mode").value === "single" && el.checked) $$("input.map-toggle").forEach(function (o) { o.checked = false; });
      var first = true;
      $$("input.map-toggle").forEach(function (o) {
        if (o.dataset.head === el.dataset.head) { o.checked = el.checked && (first || $("#mode").value !== "single"); first = false; }
      });
      syncHeads(); redraw();
    }
  });

  // --- options -> a request -------------------------------------------------------------------
  function targets() {
    var out = {};
    $$("input.topk").forEach(function (el) {
      var head = el.dataset.head, names = $('input.classes[data-head="' + head + '"]').value.split(",")
        .map(function (s) { return s.trim(); }).filter(Boolean);
      out[head] = names.length ? {classes: names} : {top: Math.max(0, parseInt(el.value || "0", 10))};
    });
    return out;
  }
  function methods() {
    var ms = [$("#method").value];
    Array.prototype.forEach.call($("#compare").selectedOptions, function (o) { if (ms.indexOf(o.value) < 0) ms.push(o.value); });
    return ms;
  }
  function options() {
    return {model: $("#model").value, layer: state.layer, targets: targets()};
  }
  function panel(method) {
    var p = document.querySelector('section.panel[data-method="' + method + '"]');
    if (!p) {
      p = document.createElement("section"); p.className = "panel"; p.dataset.method = method;
      p.innerHTML = '<h2></h2><canvas class="view" data-renders="0"></canvas><div class="meta"></div>';
      p.querySelector("h2").textContent = method;
      $("#panels").appendChild(p);
    }
    return p;
  }
  var pending = 0;
  function explain() {
    if (!state.image) return Promise.resolve();
    var ms = methods(), o = options();
    $$("section.panel").forEach(function (p) { if (ms.indexOf(p.dataset.method) < 0) { p.remove(); delete state.results[p.dataset.method]; } });
    pending += 1; root.dataset.busy = "1";
    var seq = state.seq = (state.seq || 0) + 1;  // a newer request's answer wins over an older one's
    return Promise.all(ms.map(function (method) {
      var form = new FormData();
      form.append("image", state.image, "image");
      form.append("model", o.model); form.append("method", method);
      form.append("layer", o.layer); form.append("targets", JSON.stringify(o.targets));
      return api("/api/explain", {method: "POST", body: form}).then(decodeResult);
    })).then(function (results) {
      if (seq !== state.seq) return;
      state.results = {};
      results.forEach(function (res, i) {
        state.results[ms[i]] = res;
        var p = panel(ms[i]);
        p.querySelector(".meta").textContent = "layer " + (res.layers.join(", ") || "-") + " · " + res.width + "×" + res.height + " · " + res.ms + " ms";
        p.dataset.id = res.id;
      });
      buildToggles(results[0]);
      showError(null);
      var notes = [];
      results.forEach(function (r, i) { (r.warnings || []).forEach(function (w) { notes.push(ms[i] + ": " + w); }); });
      $("#notes").textContent = notes.join(" · ");
      redraw();
      state.requests += 1; root.dataset.requests = String(state.requests);
    }).catch(showError).then(function () { pending -= 1; if (!pending) delete root.dataset.busy; });
  }

  // --- models, layers, methods --------------------------------------------------------------
  function renderTree(nodes, ul) {
    nodes.forEach(function (n) {
      var li = document.createElement("li"), b = document.createElement("button");
      b.type = "button"; b.className = "layer-node" + (n.default ? " default" : "") + (n.path === state.layer ? " chosen" : "");
      b.dataset.path = n.path; b.textContent = n.name; b.title = n.path;
      if (n.children.length) {  // collapsible; open down to the default / chosen layer
        var det = document.createElement("details"), sum = document.createElement("summary"), sub = document.createElement("ul");
        var mark = state.layer || "";
        det.open = mark === n.path || mark.indexOf(n.path + ".") === 0;
        sum.appendChild(b); det.appendChild(sum); renderTree(n.children, sub); det.appendChild(sub); li.appendChild(det);
      } else { li.appendChild(b); }
      ul.appendChild(li);
    });
  }
  function loadModel() {
    var model = state.models.filter(function (m) { return m.name === $("#model").value; })[0];
    var box = $("#heads"); box.innerHTML = "";
    Object.keys(model.heads).forEach(function (head, i) {
      var d = document.createElement("div"), id = "classes-" + i;
      d.innerHTML = '<h3></h3><label>top <input type="number" class="topk" min="0" max="16" value="1"></label>' +
        '<label>or classes <input type="text" class="classes" placeholder="names, comma-separated" list="' + id + '"></label><datalist id="' + id + '"></datalist>';
      d.querySelector("h3").textContent = head;
      d.querySelector(".topk").dataset.head = head; d.querySelector(".classes").dataset.head = head;
      model.heads[head].forEach(function (c) { var o = document.createElement("option"); o.value = c; d.querySelector("datalist").appendChild(o); });
      box.appendChild(d);
    });
    state.layer = model.default_layer || "";
    return api("/api/layers?model=" + encodeURIComponent(model.name)).then(function (res) {
      var ul = document.createElement("ul"); renderTree(res.tree, ul);
      $("#layers").innerHTML = ""; $("#layers").appendChild(ul);
      $("#layer-name").textContent = state.layer || "(none)";
    });
  }
  $("#layers").addEventListener("click", function (ev) {
    var b = ev.target.closest("button.layer-node"); if (!b) return;
    state.layer = b.dataset.path;
    $$("button.layer-node").forEach(function (o) { o.classList.toggle("chosen", o === b); });
    $("#layer-name").textContent = state.layer;
    explain(); sendOptions();
  });

  // --- the image ------------------------------------------------------------------------------
  function setImage(file) { if (!file) return; state.image = file; explain(); }
  $("#file").addEventListener("change", function () { setImage(this.files[0]); });
  var drop = $("#drop");
  drop.addEventListener("dragover", function (ev) { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", function () { drop.classList.remove("over"); });
  drop.addEventListener("drop", function (ev) { ev.preventDefault(); drop.classList.remove("over"); setImage(ev.dataTransfer.files[0]); });

  ["#mode", "#cmap"].forEach(function (s) { $(s).addEventListener("change", function () {
    if (s === "#mode" && $("#mode").value === "single") {
      var seen = false; $$("input.map-toggle").forEach(function (o) { if (o.checked) { o.checked = !seen; seen = true; } });
      syncHeads();
    }
    redraw();
  }); });
  $("#opacity").addEventListener("input", redraw);
  ["#method", "#compare"].forEach(function (s) { $(s).addEventListener("change", function () { explain(); sendOptions(); }); });
  $("#model").addEventListener("change", function () { state.results = {}; $("#panels").innerHTML = ""; loadModel().then(explain).then(sendOptions); });
  $("#heads").addEventListener("change", function () { explain(); sendOptions(); });

  // --- downloads ------------------------------------------------------------------------------
  function save(href, name) { var a = document.createElement("a"); a.href = href; a.download = name; document.body.appendChild(a); a.click(); a.remove(); }
  $("#download-png").addEventListener("click", function () {
    $$("section.panel").forEach(function (p) { save(p.querySelector("canvas.view").toDataURL("image/png"), "camlens-" + p.dataset.method + ".png"); });
  });
  $("#download-npz").addEventListener("click", function () {
    $$("section.panel").forEach(function (p) {
      if (p.dataset.id) save("/api/explanations/" + p.dataset.id + ".npz" + (TOKEN ? "?token=" + encodeURIComponent(TOKEN) : ""), "camlens-" + p.dataset.method + ".npz");
    });
  });

  // --- live: the webcam over the WebSocket, one frame in flight (the newest wins) -----------
  function sendOptions() {
    var L = state.live; if (!L || L.ws.readyState !== 1) return;
    var o = options(); o.method = $("#method").value;
    L.ws.send(JSON.stringify(o));
  }
  function startLive() {
    if (state.live) return;
    navigator.mediaDevices.getUserMedia({video: true}).then(function (stream) {
      var video = $("#camera"); video.srcObject = stream; video.play();
      var proto = location.protocol === "https:" ? "wss://" : "ws://";
      var ws = new WebSocket(proto + location.host + "/api/live" + (TOKEN ? "?token=" + encodeURIComponent(TOKEN) : ""));
      var L = state.live = {ws: ws, stream: stream, times: [], frames: 0, grab: document.createElement("canvas")};
      ws.onopen = function () { sendOptions(); sendFrame(); };
      ws.onmessage = function (ev) {
        var res = JSON.parse(ev.data);
        if (res.error) { showError(res.error); setTimeout(sendFrame, 200); return; }
        decodeResult(res).then(function (r) {
          state.liveResult = r;
          if (!$$("input.map-toggle").length) buildToggles(r);
          draw(r, $("#live-view"));
          L.frames += 1; $("#live-view").dataset.frames = String(L.frames);
          var now = performance.now(); L.times.push(now);
          while (L.times.length && now - L.times[0] > 2000) L.times.shift();
          var fps = L.times.length > 1 ? (L.times.length - 1) * 1000 / (now - L.times[0]) : 0;
          $("#fps").textContent = fps.toFixed(1) + " fps · " + r.ms + " ms · dropped " + r.dropped;
          $("#fps").dataset.fps = fps.toFixed(2);
          sendFrame();
        });
      };
      ws.onclose = function () { stopLive(); };
    }).catch(showError);
  }
  function sendFrame() {  // the frame now on the camera, JPEG, the longer side at most 320 px
    var L = state.live; if (!L || L.ws.readyState !== 1) return;
    var video = $("#camera");
    if (!video.videoWidth) { setTimeout(sendFrame, 50); return; }
    var s = Math.min(1, 320 / Math.max(video.videoWidth, video.videoHeight));
    L.grab.width = Math.round(video.videoWidth * s); L.grab.height = Math.round(video.videoHeight * s);
    L.grab.getContext("2d").drawImage(video, 0, 0, L.grab.width, L.grab.height);
    L.grab.toBlob(function (blob) { if (L.ws.readyState === 1) L.ws.send(blob); }, "image/jpeg", 0.8);
  }
  function stopLive() {
    var L = state.live; if (!L) return;
    state.live = null;
    L.stream.getTracks().forEach(function (t) { t.stop(); });
    if (L.ws.readyState <= 1) L.ws.close();
  }
  $("#live-start").addEventListener("click", startLive);
  $("#live-stop").addEventListener("click", stopLive);

  // --- start ----------------------------------------------------------------------------------
  Promise.all([api("/api/models"), api("/api/methods")]).then(function (res) {
    state.models = res[0];
    res[0].forEach(function (m) { var o = document.createElement("option"); o.value = o.textContent = m.name; $("#model").appendChild(o); });
    res[1].forEach(function (m) {
      [$("#method"), $("#compare")].forEach(function (sel) {
        var o = document.createElement("option"); o.value = m.name; o.textContent = m.name; o.title = m.description;
        if (sel.id === "method" && m.name === "gradcam") o.selected = true;
        sel.appendChild(o);
      });
    });
    return loadModel();
  }).then(function () { root.dataset.ready = "1"; }, showError);
})();
"""


def page_html(cmaps: Sequence[str]) -> str:
    """The page, with the colormaps ``cmaps`` (matplotlib names, the first the default) as 256-entry
    lookup tables."""
    luts = {str(c): lut(str(c)) for c in cmaps}
    cfg = json.dumps({"luts": luts}, separators=(",", ":")).replace("</", "<\\/")
    cm_opts = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in luts)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>camlens serve</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style>
</head>
<body>
<h1>camlens</h1>
<div id="error" role="alert"></div>
<div id="notes" class="meta"></div>
<div class="app">
<div class="side">
<div id="drop">drop an image here, or <input type="file" id="file" accept="image/*"></div>
<label>model <select id="model"></select></label>
<div>layer: <code id="layer-name"></code></div>
<div id="layers"></div>
<label>method <select id="method"></select></label>
<label>side by side <select id="compare" multiple size="3"></select></label>
<div id="heads"></div>
<h3>view</h3>
<label>mode <select id="mode"><option value="composite">composite: a hue per map</option>
<option value="colormap">colormap: max of checked maps</option><option value="single">one map (colormap)</option></select></label>
<label>colormap <select id="cmap">{cm_opts}</select></label>
<label>opacity <input type="range" id="opacity" min="0" max="100" step="1" value="50"> <output id="opacity-value">0.50</output></label>
<div id="toggles"></div>
<button type="button" id="download-png">download PNGs</button>
<button type="button" id="download-npz">download Explanations</button>
<h3>live</h3>
<button type="button" id="live-start">start webcam</button> <button type="button" id="live-stop">stop</button>
<div id="fps"></div>
</div>
<div class="main">
<div id="panels"></div>
<canvas id="live-view" width="1" height="1" data-frames="0" data-renders="0"></canvas>
<video id="camera" muted playsinline></video>
</div>
</div>
<script type="application/json" id="camlens-config">{cfg}</script>
<script>{_JS}</script>
</body>
</html>
"""
