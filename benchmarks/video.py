"""Throughput of ``camlens video``: frames per second of the whole pipeline (decode → explain →
overlay → encode) against the model's own batched forward + backward at the same batch size.

    python -m benchmarks.video [--device cpu|cuda] [--model efficientnet-lite0] [--batch 8] [--frames 64]
                               [--width 320 --height 240] [--threads 2] [--repeats 3] [--smoke] [--out DIR]

A synthetic MP4 (``--frames`` frames, a moving square on a gradient, H.264) is written first. Three
things are timed, interleaved (each repeat runs each once, in turn: :mod:`benchmarks.timing`), after
a warm-up:

* ``model fwd+bwd``: the limit of a gradient method. The first ``--batch`` frames, preprocessed once
  outside the timing, as one batch: a plain forward of the model with a hook on camlens' default
  layer, and ``torch.autograd.grad`` of the sum of each image's top logit to the layer's output
  (parameters frozen: no weight gradients; the graph starts at the layer, as in camlens' own pass). frames/s = batch / time.
* ``camlens.explain``: Grad-CAM on the same preprocessed batch. frames/s = batch / time.
* ``camlens video``: the pipeline the command runs (:mod:`camlens.fronts.video`): decode the file
  (PyAV, a background thread), preprocess and explain ``--batch`` frames at a time
  (:func:`camlens.stream`), draw the overlays with label / probability / fps and encode H.264 (a
  background thread). frames/s = frames / time.

The ratios ``video / fwd+bwd`` (the issue asks >= 0.8) and ``explain / fwd+bwd`` are reported.
Writes ``<out>/video-<device>.md`` and ``.json``. ``--smoke``: shapes-2head, 64x64 frames, 16 frames,
batch 4, one repeat, to a temporary folder (not a benchmark; proves the script runs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import _stats, _timeit

ROOT = Path(__file__).resolve().parents[1]


def write_clip(path: Path, frames: int, width: int, height: int, fps: int = 25) -> None:
    """A synthetic H.264 clip: a horizontal gradient with a bright square moving across."""
    import av

    ramp = np.linspace(30, 160, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)
    side = max(8, min(height, width) // 4)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        s.height, s.width, s.pix_fmt = height, width, "yuv420p"
        for i in range(frames):
            f = base.copy()
            x = (7 * i) % max(1, width - side)
            y = height // 2 - side // 2
            f[y:y + side, x:x + side] = (230, 40, 40)
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def pipeline(m: Any, clip: Path, out: Path, batch: int) -> int:
    """What ``camlens video CLIP --out OUT -b BATCH`` runs, without the progress bar; returns frames written."""
    from camlens.fronts import video as v

    reader = v.FrameReader(v.decoded(clip), maxsize=2 * batch)
    writer = v.FrameWriter(out, v.probe(clip).fps, maxsize=2 * batch)
    rate = v.Rate()
    try:
        for vf in v.explain_frames(m, reader, batch_size=batch):
            writer.write(lambda vf=vf, fps=rate.tick(): v.render(vf, fps))
    finally:
        reader.close()
        writer.close()
    return writer.written


def _top_logits(out: Any) -> Any:
    """The sum over images of the top logit of every (B, K) head (a tensor, or a dict / tuple of heads)."""
    heads = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else [out]
    return sum(h.max(dim=1).values.sum() for h in heads if getattr(h, "ndim", 0) == 2)


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    smoke = args.smoke
    name = args.model or ("shapes-2head" if smoke else "efficientnet-lite0")
    batch = args.batch or (4 if smoke else 8)
    n = args.frames or (16 if smoke else 64)
    width, height = args.width or (64 if smoke else 320), args.height or (64 if smoke else 240)
    reps = 1 if smoke else args.repeats

    import torch

    import camlens

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="camlens-bench-video-")) if smoke else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="camlens-video-clip-"))
    clip = work / "clip.mp4"
    write_clip(clip, n, width, height)

    from camlens.fronts import video as v

    m = camlens.models.load(name, device=args.device)
    net, layer = m.model, m.model.get_submodule(m.default_layer)
    first = [f for _, f in zip(range(batch), v.decoded(clip))]
    x = torch.cat([m.preprocess(f) for f in first]).to(m.device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    frozen = [p for p in net.parameters() if p.requires_grad]

    def fwd_bwd() -> None:
        store: dict = {}
        def hook(mod: Any, inp: Any, o: Any) -> Any:  # the graph starts at the layer, as camlens' pass does
            store["a"] = o.detach().requires_grad_()
            return store["a"]

        h = layer.register_forward_hook(hook)
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                out = net(x)
                torch.autograd.grad(_top_logits(out), store["a"])
        finally:
            h.remove()
            for p in frozen:
                p.requires_grad_(True)

    def explain() -> None:
        camlens.explain(m, x)

    written: list = []

    def video() -> None:
        written.append(pipeline(m, clip, work / "out.mp4", batch))

    fns = {"model fwd+bwd": fwd_bwd, "camlens.explain": explain, "camlens video": video}
    load_start = [round(val, 2) for val in os.getloadavg()]
    times = _timeit(fns, reps, sync, warmup=0 if smoke else 1)
    assert all(w == n for w in written), written
    per = {"model fwd+bwd": batch, "camlens.explain": batch, "camlens video": n}
    rows = {}
    for k, t in times.items():
        med = statistics.median(t)
        rows[k] = {**_stats(t), "frames": per[k], "fps": per[k] / med}
    base = rows["model fwd+bwd"]["fps"]
    ratios = {"video / fwd+bwd": rows["camlens video"]["fps"] / base,
              "explain / fwd+bwd": rows["camlens.explain"]["fps"] / base}
    dev = str(m.device)
    meta = {"device": dev, "gpu": torch.cuda.get_device_name(0) if x.is_cuda else None,
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "model": name, "batch": batch,
            "frames": n, "frame_size": [width, height], "input": list(x.shape), "layer": m.default_layer,
            "repeats": reps, "smoke": smoke, "date": datetime.date.today().isoformat(),
            "load_start": load_start, "load_end": [round(val, 2) for val in os.getloadavg()],
            "command": "python -m benchmarks.video " + " ".join(argv if argv is not None else sys.argv[1:])}
    res = {"meta": meta, "rows": rows, "ratios": ratios}
    stem = f"video-{'cuda' if x.is_cuda else 'cpu'}"
    import json

    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out_dir / stem}.md, .json")
    return 0


def markdown(res: dict) -> str:
    """The results as a Markdown table."""
    meta, rows, ratios = res["meta"], res["rows"], res["ratios"]
    where = meta["gpu"] or f"{meta['processor']}, {meta['cpu_count']} CPUs, {meta['threads']} torch threads"
    lines = [f"# camlens video throughput — {meta['device']}", "",
             f"{where}; torch {meta['torch']}; {meta['date']}; load average {meta['load_start']} at start, "
             f"{meta['load_end']} at end{'; --smoke (NOT a benchmark)' if meta['smoke'] else ''}.", "",
             f"Model `{meta['model']}` (layer `{meta['layer']}`), Grad-CAM, batch {meta['batch']}; a synthetic "
             f"{meta['frame_size'][0]}x{meta['frame_size'][1]} H.264 clip of {meta['frames']} frames (model input "
             f"{tuple(meta['input'][1:])}). Interleaved timing, {meta['repeats']} repeat(s) after a warm-up; "
             "median (IQR).", "",
             "| what | frames per call | median (s) | IQR (s) | frames/s |", "|---|---|---|---|---|"]
    for k, r in rows.items():
        iqr = f"{r['iqr_s']:.3f}" if r["iqr_s"] is not None else "—"
        lines.append(f"| {k} | {r['frames']} | {r['median_s']:.3f} | {iqr} | {r['fps']:.1f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {val:.2f} |" for k, val in ratios.items()]
    lines += ["", "`model fwd+bwd`: a plain forward with a hook on the layer and `torch.autograd.grad` of the top "
              "logits' sum to it (no weight gradients), on the preprocessed batch. `camlens video`: decode "
              "(background thread) → preprocess + `camlens.stream` → overlay with label, probability, fps → "
              "H.264 encode (background thread), the whole file.", f"Reproduce: `{meta['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
