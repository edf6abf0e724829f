"""One self-contained, offline HTML report: predictions per head and an interactive map viewer.

Everything is embedded in the single file: images as base64 PNG data URIs, each map as an 8-bit grey
PNG data URI (at the display image's size), colormaps as 256-entry lookup tables, plain JavaScript
and CSS inline. No network access, no CDN, no web fonts, no framework.

Per image, the viewer draws on ``canvas#view-{v}`` (``v`` counts images over all explanations):

* ``input.layer-toggle[data-viewer=v][data-target=t]``: show/hide target ``t``'s map;
  ``button.layer-solo``: show only that target; ``button.layers-all`` / ``button.layers-none``;
* ``input#opacity-{v}`` (range 0..100): the overlay opacity ``alpha``;
* ``select#mode-{v}``: ``"single"`` (the default) — one map at a time through the colormap of
  ``select#cmap-{v}``, i.e. :func:`camlens.viz.overlay`: checking a map unchecks the others, and the
  first target is shown at first; ``"colormap"`` — the per-pixel max of the checked maps through the
  colormap; ``"composite"`` — each checked target in its own hue, exactly the formula of
  :func:`camlens.viz.composite` (the image alone when no map is checked);
* ``canvas#cbar-{v}`` with ``div#cbar-ticks-{v}`` (tick labels 0, 0.5, 1): the colorbar of the two
  colormap modes;
* the canvas's ``data-renders`` counts redraws; ``<html data-ready="1">`` once all viewers are drawn
  (``data-error`` holds a message if an embedded image failed to decode).

Pixel values match the Python functions on the 8-bit-quantised maps (``round(255 m) / 255``):
Uint8ClampedArray rounds half to even like ``np.rint``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from os import PathLike
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..core.errors import ConfigError, InputError
from ..core.predictions import head_predictions
from .composite import palette_colors
from .grid import display_from_inputs, target_label
from .overlay import as_rgb_float, get_cmap, resize_bilinear, to_numpy

__all__ = ["write_report", "COMPOSE_JS", "lut"]

DEFAULT_CMAPS = ("jet", "viridis", "inferno", "magma", "gray")


def _png_data_uri(arr: np.ndarray) -> str:
    """PNG data URI of a uint8 (H, W) grey or (H, W, 3) RGB array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def lut(name: str) -> list[int]:
    """A colormap as 256 RGB triples, flattened (768 ints): entry ``q`` = ``colorize(q / 255)``."""
    return get_cmap(name)(np.arange(256) / 255.0, bytes=True)[:, :3].astype(int).ravel().tolist()


_lut = lut  # the name the report's tests use


def _predictions(exp: Any, b: int, categories: Any, k: int = 5) -> list[dict[str, Any]]:
    """Per head of ``exp.heads``: top-``k`` softmax classes of 2-D heads, the value of scalar heads
    (:func:`camlens.predictions.head_predictions`).

    Class names come from ``categories``, else from the labels of targets on that class
    (``"head: name"``), else the index alone.
    """
    from_targets: dict[tuple[str, int], str] = {}
    for tg in exp.targets[b]:
        cls, head = getattr(tg, "cls", None), getattr(tg, "head", None)
        if cls is not None:
            lab = target_label(tg)
            prefix = f"{head}: "
            name = lab[len(prefix):] if lab.startswith(prefix) else lab
            if name != str(cls):  # "species: 3" names nothing new
                from_targets[(str(head), int(cls))] = name
    out = []
    for entry in head_predictions(dict(getattr(exp, "heads", None) or {}), b, categories, k):
        key = entry["head"]
        entry.update(head=str(key), named=not isinstance(key, int))
        for row in entry.get("top", ()):
            row["name"] = (str(row["name"]) if row["name"] is not None
                           else from_targets.get((str(key), row["cls"]), ""))
        out.append(entry)
    return out


MODES = {"single": "one map (colormap)", "colormap": "colormap: max of checked maps",
         "composite": "composite: a hue per map"}


def _head_caption(head: str, n_heads: int, named: bool) -> str:
    """A predictions table's caption: the head's name; "predictions" for a model's only, unnamed head
    (a plain tensor output); "output N" for the unnamed heads of a tuple / list output."""
    if named:
        return head
    return "predictions" if n_heads == 1 else f"output {head}"


def _viewer_html(v: int, name: str, meta: str, w: int, h: int, labels: list[str], heads: list[str],
                 colors: np.ndarray, preds: list[dict[str, Any]], cmaps: Sequence[str], alpha: float,
                 mode: str) -> str:
    e = html.escape
    scale = max(1, round(384 / w)) if w < 384 else 1
    width = f"width:{w * scale}px"
    style = width + (";image-rendering:pixelated" if scale > 1 else "")
    layers = "\n".join(
        f'<li class="layer" data-target="{t}" data-head="{e(hd)}"><label>'
        f'<input type="checkbox" class="layer-toggle" data-viewer="{v}" data-target="{t}"'
        f'{" checked" if mode != "single" or t == 0 else ""}>'
        f'<span class="swatch" style="background:rgb({int(c[0])},{int(c[1])},{int(c[2])})"></span>'
        f'<span class="layer-label">{e(lab)}</span></label>'
        f'<button type="button" class="layer-solo" data-viewer="{v}" data-target="{t}" '
        f'title="show only this map">only</button></li>'
        for t, (lab, hd, c) in enumerate(zip(labels, heads, colors))
    )
    tables = []
    for hp in preds:
        if "top" in hp:
            rows = "".join(
                f'<tr><td class="cls">{r["cls"]}</td><td class="name">{e(r["name"])}</td>'
                f'<td class="bar"><span style="width:{100 * r["prob"]:.1f}%"></span></td>'
                f'<td class="p">{r["prob"]:.3f}</td></tr>' for r in hp["top"])
        elif "value" in hp:
            rows = f'<tr><td colspan="4">value {hp["value"]:.4g}</td></tr>'
        else:
            rows = f'<tr><td colspan="4">output of shape {hp["shape"]} (not shown)</td></tr>'
        caption = _head_caption(hp["head"], len(preds), hp.get("named", True))
        tables.append(f'<table class="pred" data-head="{e(hp["head"])}"><caption>{e(caption)}</caption>'
                      f"{rows}</table>")
    cm_opts = "".join(f'<option value="{e(c)}">{e(c)}</option>' for c in cmaps)
    mode_opts = "\n".join(f'<option value="{m}"{" selected" if m == mode else ""}>{e(text)}</option>'
                          for m, text in MODES.items())
    return f"""
<section class="viewer" id="viewer-{v}" data-viewer="{v}">
<h2>{e(name)}</h2>
<p class="meta">{e(meta)}</p>
<div class="row">
<div class="stage">
<canvas id="view-{v}" class="view" width="{w}" height="{h}" style="{style}" data-renders="0"></canvas>
<div class="cbar-box" style="{width}">
<canvas id="cbar-{v}" class="cbar" width="256" height="1"></canvas>
<div class="cbar-ticks" id="cbar-ticks-{v}"><span>0</span><span>0.5</span><span>1</span></div>
<div class="cbar-caption">map value (1 = the map's maximum)</div>
</div>
</div>
<div class="side">
<div class="controls">
<label>mode <select id="mode-{v}" class="mode" data-viewer="{v}">
{mode_opts}</select></label>
<label>colormap <select id="cmap-{v}" class="cmap" data-viewer="{v}">{cm_opts}</select></label>
<label>opacity <input type="range" id="opacity-{v}" class="opacity" data-viewer="{v}" min="0" max="100" step="1"
 value="{round(100 * alpha)}"> <output id="opacity-value-{v}">{alpha:.2f}</output></label>
</div>
<div class="layer-head">maps <button type="button" class="layers-all" data-viewer="{v}">all</button>
<button type="button" class="layers-none" data-viewer="{v}">none</button></div>
<ul class="layers" id="layers-{v}">
{layers}
</ul>
<div class="preds">{"" if len(preds) == 1 and not preds[0].get("named", True) else "<h3>predictions</h3>"}
{"".join(tables) or "<p>no model outputs recorded</p>"}
</div>
</div>
</div>
</section>"""


_CSS = """
:root{color-scheme:light dark;--fg:#1b1b1b;--bg:#fff;--mute:#666;--line:#ddd;--bar:#4a7fd0}
@media (prefers-color-scheme:dark){:root{--fg:#e8e8e8;--bg:#161616;--mute:#999;--line:#333;--bar:#6b9be6}}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;color:var(--fg);background:var(--bg)}
h1{font-size:1.4rem;margin:0 0 1rem}h2{font-size:1.1rem;margin:0}h3{font-size:.9rem;margin:.8rem 0 .3rem}
.meta{color:var(--mute);margin:.2rem 0 .6rem;font-size:.85rem}
.viewer{border-top:1px solid var(--line);padding:1rem 0}
.row{display:flex;flex-wrap:wrap;gap:1.2rem;align-items:flex-start}
.stage canvas.view{display:block;max-width:100%;height:auto;border:1px solid var(--line)}
.stage{flex:0 1 auto;max-width:100%}
.cbar-box{max-width:100%;margin-top:4px}
.stage canvas.cbar{display:block;width:100%;height:12px}
.cbar-ticks{position:relative;height:1.1em;font-size:.75rem;font-variant-numeric:tabular-nums}
.cbar-ticks span{position:absolute;top:0}
.cbar-ticks span:nth-child(1){left:0}.cbar-ticks span:nth-child(2){left:50%;transform:translateX(-50%)}
.cbar-ticks span:nth-child(3){right:0}
.cbar-caption{color:var(--mute);font-size:.75rem}
.side{min-width:260px;flex:1}
.controls label{display:block;margin:.25rem 0}
.layers{list-style:none;padding:0;margin:.3rem 0}
.layer{display:flex;align-items:center;gap:.4rem;margin:.15rem 0}
.layer label{display:flex;align-items:center;gap:.35rem;cursor:pointer}
.swatch{display:inline-block;width:.9rem;height:.9rem;border-radius:2px}
.layer-solo,.layers-all,.layers-none{font-size:.75rem;padding:0 .4rem}
table.pred{border-collapse:collapse;margin:.3rem 0 .6rem;font-size:.85rem}
table.pred caption{text-align:left;font-weight:600}
table.pred td{padding:.05rem .4rem .05rem 0}
td.cls{color:var(--mute);text-align:right}td.p{font-variant-numeric:tabular-nums}
td.bar{width:120px}td.bar span{display:block;height:.6rem;background:var(--bar)}
#error{color:#c00}
"""

#: The pixel maths of the viewers (the report's and ``camlens serve``'s page), one JavaScript function:
#: ``compose(img, on, cols, colormap, lut, a0, d)`` writes into RGBA bytes ``d`` the image ``img``
#: (RGBA bytes) with the grey maps ``on`` (RGBA bytes, R = G = B = round(255 m)) laid over it —
#: ``colormap``: :func:`camlens.viz.overlay` of their per-pixel max through ``lut`` (768 ints),
#: ``(1 - a0) img + a0 lut[max m]``; else :func:`camlens.viz.composite`: colour ``sum m c / sum m``
#: (``cols``: one RGB per map), opacity ``a0 max m``; the image alone without maps.
COMPOSE_JS = r"""
  function compose(img, on, cols, colormap, lut, a0, d) {
    var n = d.length, k, K = on.length, i, m, v, s, r, g, b, a;
    if (K === 0) {
      d.set(img);
    } else if (colormap) {  // overlay(): (1 - a) * image + a * lut[max of checked maps]
      for (i = 0; i < n; i += 4) {
        m = 0;
        for (k = 0; k < K; k++) { v = on[k][i]; if (v > m) m = v; }
        m *= 3;
        d[i] = (1 - a0) * img[i] + a0 * lut[m];  // Uint8ClampedArray: clamp, round half to even
        d[i + 1] = (1 - a0) * img[i + 1] + a0 * lut[m + 1];
        d[i + 2] = (1 - a0) * img[i + 2] + a0 * lut[m + 2];
        d[i + 3] = 255;
      }
    } else {  // composite(): colour = sum m c / sum m, opacity = alpha * max m
      for (i = 0; i < n; i += 4) {
        s = 0; m = 0; r = 0; g = 0; b = 0;
        for (k = 0; k < K; k++) {
          v = on[k][i] / 255;
          if (v > 0) { s += v; if (v > m) m = v; r += v * cols[k][0]; g += v * cols[k][1]; b += v * cols[k][2]; }
        }
        if (s > 0) {
          a = a0 * m;
          d[i] = (1 - a) * img[i] + a * (r / s);
          d[i + 1] = (1 - a) * img[i + 1] + a * (g / s);
          d[i + 2] = (1 - a) * img[i + 2] + a * (b / s);
        } else { d[i] = img[i]; d[i + 1] = img[i + 1]; d[i + 2] = img[i + 2]; }
        d[i + 3] = 255;
      }
    }
  }
"""

# Plain ES5-style JavaScript: no modules, no framework, no network.
_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("camlens-data").textContent);
  var LUTS = DATA.luts;
""" + COMPOSE_JS + r"""

  function load(src) {
    return new Promise(function (resolve, reject) {
      var im = new Image();
      im.onload = function () { resolve(im); };
      im.onerror = function () { reject(new Error("cannot decode an embedded image")); };
      im.src = src;
    });
  }
  function pixels(im, w, h) {  // RGBA bytes of an image drawn at (w, h)
    var c = document.createElement("canvas");
    c.width = w; c.height = h;
    var x = c.getContext("2d");
    x.drawImage(im, 0, 0, w, h);
    return x.getImageData(0, 0, w, h).data;
  }
  function q(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function Viewer(spec, image, maps) {
    var v = spec.id, root = document.getElementById("viewer-" + v);
    this.w = spec.w; this.h = spec.h; this.colors = spec.colors;
    this.img = pixels(image, spec.w, spec.h);
    this.maps = maps.map(function (m) { return pixels(m, spec.w, spec.h); });  // grey: R = G = B
    this.canvas = document.getElementById("view-" + v);
    this.ctx = this.canvas.getContext("2d");
    this.out = this.ctx.createImageData(spec.w, spec.h);
    this.cbar = document.getElementById("cbar-" + v);
    this.cbarBox = this.cbar.parentNode;
    this.allButton = root.querySelector("button.layers-all");
    this.mode = document.getElementById("mode-" + v);
    this.cmap = document.getElementById("cmap-" + v);
    this.opacity = document.getElementById("opacity-" + v);
    this.opacityOut = document.getElementById("opacity-value-" + v);
    this.toggles = q("input.layer-toggle", root);
    this.renders = 0;
    var self = this, redraw = function () { self.render(); };
    this.toggles.forEach(function (el) {
      el.addEventListener("change", function () {
        if (self.mode.value === "single" && el.checked) {  // one map at a time: the others go off
          self.toggles.forEach(function (o) { if (o !== el) o.checked = false; });
        }
        self.render();
      });
    });
    this.mode.addEventListener("change", function () {
      if (self.mode.value === "single") {  // keep the first checked map only
        var seen = false;
        self.toggles.forEach(function (o) { if (o.checked) { o.checked = !seen; seen = true; } });
      }
      self.render();
    });
    this.cmap.addEventListener("change", redraw);
    this.opacity.addEventListener("input", redraw);
    this.opacity.addEventListener("change", redraw);
    q("button.layer-solo", root).forEach(function (btn) {
      btn.addEventListener("click", function () {
        self.toggles.forEach(function (el) { el.checked = el.dataset.target === btn.dataset.target; });
        self.render();
      });
    });
    q("button.layers-all, button.layers-none", root).forEach(function (btn) {
      btn.addEventListener("click", function () {
        var on = btn.classList.contains("layers-all");
        self.toggles.forEach(function (el) { el.checked = on; });
        self.render();
      });
    });
  }

  Viewer.prototype.render = function () {
    var img = this.img, d = this.out.data;
    var a0 = parseFloat(this.opacity.value) / 100;
    this.opacityOut.textContent = a0.toFixed(2);
    var on = [], cols = [], self = this;
    this.toggles.forEach(function (el) {
      if (el.checked) { var t = +el.dataset.target; on.push(self.maps[t]); cols.push(self.colors[t]); }
    });
    var colormap = this.mode.value !== "composite";  // "single" and "colormap" use the colormap
    this.cmap.disabled = !colormap;
    this.allButton.disabled = this.mode.value === "single";
    compose(img, on, cols, colormap, LUTS[this.cmap.value], a0, d);
    this.ctx.putImageData(this.out, 0, 0);
    this.drawColorbar(colormap);
    this.renders += 1;
    this.canvas.dataset.renders = String(this.renders);
  };

  Viewer.prototype.drawColorbar = function (show) {
    this.cbarBox.style.visibility = show ? "visible" : "hidden";
    if (!show) return;
    var x = this.cbar.getContext("2d"), im = x.createImageData(256, 1), lut = LUTS[this.cmap.value];
    for (var j = 0; j < 256; j++) {
      im.data[4 * j] = lut[3 * j]; im.data[4 * j + 1] = lut[3 * j + 1]; im.data[4 * j + 2] = lut[3 * j + 2];
      im.data[4 * j + 3] = 255;
    }
    x.putImageData(im, 0, 0);
  };

  window.camlensViewers = [];
  Promise.all(DATA.viewers.map(function (spec) {
    return Promise.all([load(spec.image), Promise.all(spec.maps.map(load))]).then(function (res) {
      var viewer = new Viewer(spec, res[0], res[1]);
      viewer.render();
      window.camlensViewers[spec.id] = viewer;
    });
  })).then(function () {
    document.documentElement.dataset.ready = "1";
  }, function (err) {
    document.documentElement.dataset.error = String(err && err.message || err);
    var box = document.getElementById("error");
    box.textContent = "camlens report: " + document.documentElement.dataset.error;
  });
})();
"""


def _display_images(exp: Any, images: Any) -> list[np.ndarray]:
    """B display images as uint8 (H, W, 3): ``images``, else ``exp.display``, else min-max inputs."""
    if images is None:
        images = getattr(exp, "display", None)
    if images is None:
        return list(display_from_inputs(exp.inputs))
    return [np.clip(np.rint(as_rgb_float(im)), 0, 255).astype(np.uint8) for im in images]


def write_report(
    explanations: Union[Any, Sequence[Any]],
    path: Union[str, PathLike],
    *,
    images: Optional[Sequence[Any]] = None,
    names: Optional[Sequence[str]] = None,
    title: str = "camlens report",
    cmaps: Sequence[str] = DEFAULT_CMAPS,
    alpha: float = 0.5,
    categories: Any = None,
    top_k: int = 5,
    mode: str = "single",
) -> Path:
    """Write one self-contained HTML file with a viewer per image of each explanation.

    Args:
        explanations: ``Explanation`` objects (duck-typed: ``maps`` (B, T, H, W), ``targets``,
            ``probs`` (B, T), ``heads``, ``display``, ``inputs``, ``method``, ``layers``), or one;
            a ``str`` / ``Path`` entry is the file of a saved one (``exp.save``), read by ``camlens.load``.
        path: the ``.html`` file to write (parent directories are created).
        images: optional, one entry per explanation: display images (B, H, W, 3) (uint8 or float
            in [0, 1]) or ``None``; default ``exp.display``, else ``exp.inputs`` min-max rescaled.
            Maps are resized bilinearly to the display image's size.
        names: optional section titles, one per explanation (e.g. file names); ``"[b]"`` is
            appended for batches with B > 1.
        title: the page title.
        cmaps: colormap names offered by the viewer (the first is the default).
        alpha: initial opacity in [0, 1].
        categories: class names for the predictions: a list (first head) or a mapping head → list;
            without them names come from the targets' labels where a class was explained.
        top_k: predictions listed per classification head.
        mode: the viewers' initial mode: ``"single"`` (one map at a time through the first
            colormap, starting with the first target), ``"colormap"`` (max of all maps through the
            colormap) or ``"composite"`` (a hue per map). Each viewer can switch.

    Returns:
        The ``Path`` written.
    """
    if hasattr(explanations, "maps") or isinstance(explanations, (str, PathLike)):
        explanations = [explanations]
    from ..core.explanation import load as load_explanation  # a path: an explanation saved by exp.save

    exps = [load_explanation(e) if isinstance(e, (str, PathLike)) else e for e in explanations]
    if images is not None and len(images) != len(exps):
        raise ConfigError(f"images must have one entry per explanation ({len(exps)}), got {len(images)}")
    if names is not None and len(names) != len(exps):
        raise ConfigError(f"names must have one entry per explanation ({len(exps)}), got {len(names)}")
    if not cmaps:
        raise ConfigError("cmaps must name at least one colormap")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    luts = {str(c): lut(str(c)) for c in cmaps}  # unknown names raise ValueError here

    sections, specs = [], []
    for i, exp in enumerate(exps):
        maps = to_numpy(exp.maps).astype(np.float64)
        if maps.ndim != 4:
            raise InputError(f"explanation {i}: maps must be (B, T, H, W), got shape {maps.shape}")
        B, T = maps.shape[:2]
        if len(exp.targets) != B or any(len(row) != T for row in exp.targets):
            raise InputError(f"explanation {i}: targets must be B={B} lists of T={T} targets")
        disp = _display_images(exp, None if images is None else images[i])
        if len(disp) != B:
            raise InputError(f"explanation {i}: {len(disp)} display images for a batch of {B}")
        probs = getattr(exp, "probs", None)
        p = np.full((B, T), np.nan) if probs is None else to_numpy(probs).astype(np.float64).reshape(B, T)
        colors = palette_colors(T, cycle=True)
        for b in range(B):
            v = len(specs)
            img = disp[b]
            h, w = img.shape[:2]
            layer_uris = []
            for t in range(T):
                m = maps[b, t] if maps.shape[2:] == (h, w) else resize_bilinear(maps[b, t], (h, w))
                q = np.rint(np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
                layer_uris.append(_png_data_uri(q))
            labels = [target_label(tg) + ("" if math.isnan(p[b, t]) else f" p={p[b, t]:.2f}")
                      for t, tg in enumerate(exp.targets[b])]
            heads = [str(getattr(tg, "head", "")) for tg in exp.targets[b]]
            name = names[i] if names is not None else f"explanation {i + 1}"
            if B > 1:
                name += f" [{b}]"
            layers = ", ".join(map(str, getattr(exp, "layers", []) or []))
            meta = " · ".join(x for x in (str(getattr(exp, "method", "") or ""), f"layer {layers}" if layers else "",
                                          f"{w}×{h}", f"{T} map{'s' * (T != 1)}") if x)
            sections.append(_viewer_html(v, name, meta, w, h, labels, heads, colors,
                                         _predictions(exp, b, categories, top_k), list(luts), float(alpha), mode))
            specs.append({"id": v, "w": w, "h": h, "image": _png_data_uri(img), "maps": layer_uris,
                          "colors": colors.astype(int).tolist()})

    data = json.dumps({"luts": luts, "viewers": specs}, separators=(",", ":")).replace("</", "<\\/")
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="camlens">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<div id="error" role="alert"></div>
{"".join(sections) or "<p>no explanations</p>"}
<script type="application/json" id="camlens-data">{data}</script>
<script>{_JS}</script>
</body>
</html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
