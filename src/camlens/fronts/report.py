"""Writing explanations to disk: overlays, grids, ``.npy`` maps and a JSON summary.

A front-end helper on top of the public API (used by the CLI and the demo).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import array_api_compat  # (imports no array library itself)
import numpy as np

from ..analysis.localize import draw_boxes
from ..backends.base import namespace, ops_for, to_float32
from ..core.explanation import Explanation
from ..core.predictions import head_predictions

__all__ = ["map_stats", "predictions", "write_explanation", "write_method_grid", "write_evaluation", "safe_name"]


def safe_name(text: str) -> str:
    """A file-name-safe ASCII slug of ``text`` (at most 60 characters).

    Text with no ASCII letter, digit, ``.``, ``_`` or ``-`` (e.g. a name in another script) gets
    ``"u"`` + 8 hex digits of its SHA-1, so different such names stay different. Slugs can still
    collide (truncation, dropped characters): callers that write one file per input deduplicate.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60]
    if slug.strip("._-"):
        return slug
    if not text:
        return "x"
    import hashlib

    return "u" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def map_stats(m: np.ndarray) -> dict[str, Any]:
    """Summary numbers of one map (H, W) in [0, 1]: peak position (row, col), mean, area above 0.5."""
    peak = np.unravel_index(int(np.argmax(m)), m.shape)
    return {"peak_yx": [int(peak[0]), int(peak[1])], "mean": round(float(m.mean()), 4),
            "area_above_0.5": round(float((m > 0.5).mean()), 4), "max": round(float(m.max()), 4)}


def predictions(exp: Explanation, b: int, categories: Any = None, k: int = 5) -> dict[str, list[dict[str, Any]]]:
    """Top-k softmax predictions of image ``b`` for every classification head
    (:func:`camlens.predictions.head_predictions`); a class without a name is named by its index."""
    return {str(hp["head"]): [{"class": r["cls"], "name": r["name"] if r["name"] is not None else str(r["cls"]),
                               "prob": round(r["prob"], 4)} for r in hp["top"]]
            for hp in head_predictions(exp.heads, b, categories, k) if "top" in hp}


def write_explanation(exp: Explanation, out_dir: Path, stem: str, *, cmap: str = "jet", alpha: float = 0.5,
                      categories: Any = None, images: Optional[np.ndarray] = None,
                      originals: Optional[list] = None, note: Optional[str] = None,
                      max_overlays: Optional[int] = None,
                      max_agreement_targets: Optional[int] = 16) -> list[dict[str, Any]]:
    """Write, for each image b of ``exp``: one overlay PNG per target, a grid PNG and a ``.npy`` of maps.

    Args:
        images: display images at the maps' size for the grid (and the overlays without
            ``originals``); default ``exp.display``, else the inputs min-max rescaled.
        originals: optional B pictures (H0, W0, 3) uint8 at their own resolution (e.g. the photos
            as read): the overlays are drawn on them, maps upsampled to their size.
        note: a line added to the grid's title and written in the overlays' top-left corner
            (e.g. ``"random weights"``).
        max_overlays: write overlay PNGs for the first this-many targets only (``None``: all); the
            others get ``"overlay": None`` (their maps are still in the ``.npy`` and the stats in
            the summary).
        max_agreement_targets: pairwise agreement (``"agreement"``) of the first this-many targets
            (``None``: all; memory and time grow as their number squared), computed pair chunk by
            pair chunk (:func:`camlens.compare.agreement_summary`), never all pairs' maps at once.

    Returns one summary dict per image (paths relative to ``out_dir``); ``"files"`` lists every
    file written for that image.
    """
    from ..analysis.compare import agreement_summary
    from ..viz import explanation_grid, overlay, save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    arr = exp.numpy()
    display = images if images is not None else exp.display
    if display is None:
        from ..viz.grid import display_from_inputs

        display = display_from_inputs(exp.inputs)
    B, T = arr["maps"].shape[:2]
    pairs = agreement_summary(exp, max_targets=max_agreement_targets) if T >= 2 else None
    summaries = []
    for b in range(B):
        name = stem if B == 1 else f"{stem}_{b}"
        entry: dict[str, Any] = {"predictions": predictions(exp, b, categories), "targets": []}
        files: list[str] = []
        base = originals[b] if originals is not None else display[b]
        for t, tg in enumerate(exp.targets[b]):
            written = None
            if max_overlays is None or t < max_overlays:
                path = out_dir / f"{name}_{t:02d}_{safe_name(tg.label)}.png"
                pic = overlay(base, arr["maps"][b, t], cmap=cmap, alpha=alpha)
                det = getattr(tg, "detection", None)
                if det is not None:  # an explained detection: its box (input pixels, scaled to the picture)
                    sy, sx = (p / m for p, m in zip(pic.shape[:2], arr["maps"].shape[-2:]))
                    x0, y0, x1, y1 = det.box
                    pic = draw_boxes(pic, [[round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)]], [tg.label])
                save_png(path, stamp(pic, note) if note else pic)
                written = path.name
                files.append(written)
            p = float(arr["probs"][b, t])
            entry["targets"].append({"head": tg.head if isinstance(tg.head, int) else str(tg.head), "class": tg.cls,
                                     "label": tg.label, "score": round(float(arr["scores"][b, t]), 5),
                                     "prob": None if math.isnan(p) else round(p, 5), "overlay": written,
                                     **({} if (det := getattr(tg, "detection", None)) is None else
                                        {"box": [round(v, 2) for v in det.box]}),
                                     **map_stats(arr["maps"][b, t])})
        np.save(out_dir / f"{name}_maps.npy", arr["maps"][b])
        title = f"{exp.method} @ {', '.join(exp.layers)}" + (f" ({note})" if note else "")
        fig = explanation_grid(_Row(exp, b), images=display[b:b + 1], cmap=cmap, alpha=alpha, suptitle=title)
        save_png(out_dir / f"{name}_grid.png", fig)
        files += [f"{name}_maps.npy", f"{name}_grid.png"]
        entry.update({"maps": f"{name}_maps.npy", "grid": f"{name}_grid.png",
                      "input_size": list(arr["maps"].shape[-2:])})
        if originals is not None:
            entry["overlay_size"] = list(np.asarray(base).shape[:2])
        if max_overlays is not None and T > max_overlays:
            entry["overlays_note"] = f"overlay PNGs of the first {max_overlays} of {T} targets"
        if pairs is not None:
            entry["agreement"] = pairs[b]
            if max_agreement_targets is not None and T > max_agreement_targets:
                entry["agreement_note"] = (f"pairwise agreement of the first {max_agreement_targets} "
                                           f"of {T} targets")
        entry["files"] = files
        summaries.append(entry)
    return summaries


def stamp(image: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with ``text`` on a dark tab in its top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    l, t, r, btm = draw.textbbox((0, 0), text, font=font)
    draw.rectangle([0, 0, r - l + 5, btm - t + 5], fill=(0, 0, 0))
    draw.text((3 - l, 3 - t), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def write_method_grid(exps: dict[str, Explanation], out_dir: Path, stem: str, *, cmap: str = "jet",
                      alpha: float = 0.5) -> str:
    """One grid for the first image of several explanations of the same targets: a row per target,
    a column per method. Returns the file name (in ``out_dir``)."""
    from ..viz import grid, save_png

    first = next(iter(exps.values()))
    display = first.display if first.display is not None else None
    if display is None:
        from ..viz.grid import display_from_inputs

        display = display_from_inputs(first.inputs)
    T = first.maps.shape[1]
    names = list(exps)
    if T == 1:  # one target: wrap the methods into rows of `cols`
        cols = min(len(names), 5)
        rows = -(-len(names) // cols)
        flat = [e.maps[0, 0] for e in exps.values()]
        xp = namespace(*flat)
        flat += [xp.zeros_like(flat[0])] * (rows * cols - len(flat))
        maps = xp.reshape(xp.stack(flat), (rows, cols, *flat[0].shape))
        label = first.targets[0][0].label
        titles = [[f"{names[r * cols + c]} · {label}" if r * cols + c < len(names) else None for c in range(cols)]
                  for r in range(rows)]
    else:  # a row per target, a column per method
        rows = T
        firsts = [e.maps[0] for e in exps.values()]
        maps = namespace(*firsts).stack(firsts, axis=1)  # (T, M, H, W)
        titles = [[f"{name}\n{first.targets[0][t].label}" for name in names] for t in range(T)]
    fig = grid([display[0]] * rows, maps, titles, cmap=cmap, alpha=alpha, cell_size=2.6)
    name = f"{stem}_methods.png"
    save_png(Path(out_dir) / name, fig)
    return name


class _Row:
    """One image of an explanation, with the fields ``explanation_grid`` reads."""

    def __init__(self, exp: Explanation, b: int):
        self.maps = exp.maps[b:b + 1]
        self.probs = exp.probs[b:b + 1]
        self.targets = exp.targets[b:b + 1]
        self.inputs = exp.inputs[b:b + 1]
        self.display = None if exp.display is None else exp.display[b:b + 1]



def _mean_curve(parts: list, points: int = 101) -> "Any":
    """Mean of curves ``(N_i, S_i)`` whose lengths may differ (images of different sizes take a
    different number of deletion steps): each curve is resampled linearly onto ``points`` equally
    spaced fractions of its x range [0, 1] first. Curves of one common length are averaged as they are.
    Float32 arrays of the curves' kind (an empty NumPy array when there is none)."""
    parts = [_float32_rows(p) for p in parts if math.prod(p.shape)]
    if not parts:
        return np.empty(0, dtype=np.float32)
    xp = namespace(*parts)
    if len({p.shape[-1] for p in parts}) == 1:
        return xp.mean(xp.concat(parts), axis=0)
    grid = xp.linspace(0, 1, points, dtype=xp.float32, device=_device(parts[0]))
    out = []
    for p in parts:
        S = p.shape[-1]
        if S == 1:
            out.append(xp.broadcast_to(p, (p.shape[0], points)))
            continue
        pos = grid * (S - 1)
        lo = xp.clip(xp.astype(xp.floor(pos), xp.int64), max=S - 2)
        w = pos - xp.astype(lo, pos.dtype)
        out.append(xp.take(p, lo, axis=1) * (1 - w) + xp.take(p, lo + 1, axis=1) * w)
    return xp.mean(xp.concat(out), axis=0)


def _float32_rows(p: Any) -> Any:
    """A curve array ``(..., S)`` as float32 ``(N, S)``."""
    return namespace(p).reshape(to_float32(p), (-1, p.shape[-1]))


def _device(x: Any) -> Any:
    return array_api_compat.device(x)


def write_evaluation(values: dict, curves: dict, metrics: dict, out_dir: Path) -> dict[str, dict[str, str]]:
    """Write ``results.csv``, ``results.json`` and ``curves.png`` (mean deletion / insertion curves per
    method) for ``values[method][metric]`` = list of per-image ``(T,)`` tensors. Returns the table cells
    ``"mean ± s.e."`` per method and metric."""
    import csv

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..metrics import mean_sem

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells: dict[str, dict[str, str]] = {}
    records = []
    for meth, per_metric in values.items():
        cells[meth] = {}
        for met, parts in per_metric.items():
            mean, sem, n = mean_sem(_concat_flat(parts) if parts else np.empty(0, dtype=np.float32))
            cells[meth][met] = f"{mean:.4f} ± {sem:.4f}"
            records.append({"method": meth, "metric": met, "direction": "higher" if metrics[met].higher_is_better
                            else "lower", "mean": mean, "sem": sem, "n": n})
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "metric", "direction", "mean", "sem", "n"])
        w.writeheader()
        w.writerows(records)
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    names = sorted({met for per in curves.values() for met in per if met in ("deletion", "insertion")})
    fig = Figure(figsize=(5 * max(1, len(names)), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    for ax, met in zip(axes, names):
        for meth, per in curves.items():
            if met in per:
                c = _mean_curve(per[met])
                xp, ops = namespace(c), ops_for(c)
                n = math.prod(c.shape)
                ax.plot(ops.to_numpy(xp.linspace(0, 1, n, dtype=xp.float32, device=_device(c))), ops.to_numpy(c),
                        label=f"{meth}")
        ax.set_title(f"{met} ({metrics[met].arrow} AUC)")
        ax.set_xlabel("fraction of pixels " + ("removed" if met == "deletion" else "revealed"))
        ax.set_ylabel("target probability")
        ax.legend()
    fig.savefig(out_dir / "curves.png")
    return cells


def _concat_flat(parts: list) -> Any:
    """The values of arrays of any shapes, flattened and concatenated (one array)."""
    xp = namespace(*parts)
    return xp.concat([xp.reshape(p, (-1,)) for p in parts])
