"""Side-by-side benchmark of camlens on Keras 3 (TensorFlow) models: camlens vs tf-keras-vis, and vs
TensorFlow's own forward + ``GradientTape.gradient`` (the lower bound of one target's Grad-CAM).

    python -m benchmarks.keras_bench [--quick] [--smoke] [--threads 2] [--only CASE_SUBSTRING] [--out DIR]

Torch is never imported (checked at the end of the run). The principles of :mod:`benchmarks.run` hold:

* everyone gets the SAME model (``keras.applications`` with random weights, fixed seed), input, layer
  and targets;
* maps are checked to agree BEFORE anything is timed: camlens' raw map at the layer's grid (ReLU'd,
  not normalised, as tf-keras-vis returns it with ``expand_cam=False, normalize_cam=False``), max abs
  difference divided by the map's peak, tolerance 1e-4 (Score-CAM 1e-3); a peer that disagrees is not
  timed and the run exits 1;
* each is timed doing its own whole job to maps at input size: camlens' ``explain`` (bilinear
  upsample + min-max), tf-keras-vis' ``__call__`` with its defaults (``scipy.ndimage.zoom`` + its
  ``normalize``); tf-keras-vis' visualiser (its model clone without the final softmax,
  ``ReplaceToLinear``) is built once, outside the timing, as a user would;
* T targets of one image: tf-keras-vis' own best way is one call on a batch of T copies of the
  image with ``CategoricalScore(classes)`` (one forward of T images, one gradient);
* timing is interleaved (each repeat runs every function once, in turn) after a warm-up, in one
  process; medians, the interquartile range and the ratios are reported.

The lower bound ``forward+tape``: a side model ``keras.Model(model.inputs, [layer.output,
model.output])`` (the tutorials' way, built once), one forward under ``tf.GradientTape`` and
``tape.gradient`` of the target's output to the layer — no map, no upsampling.

Writes ``<out>/keras-cpu.md`` and ``<out>/keras-cpu.json`` (``--only``: ``keras-cpu-only-<substring>``).
``--smoke``: 64x64 inputs and one timed call each (not a benchmark; proves the checks pass).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import datetime
import importlib.metadata
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .timing import Fn, Sizes, plan, run_cases, _stats, _timed, _timeit

GRAD_TOL = 1e-4  # max abs difference of raw maps / their peak
SCORE_TOL = 1e-3
TFKV = "tf-keras-vis"


def _nosync() -> None:  # TF on the CPU returns finished tensors (camlens and tf-keras-vis return NumPy)
    return None


@dataclass
class Setup(Sizes):
    """What every case shares: sizes, repeat counts and the models (built once, seeded)."""

    models: dict[str, Any] = field(default_factory=dict)

    def model(self, name: str, size: Optional[int] = None) -> Any:
        """``keras.applications.<name>`` with random weights (seed 0) at ``size``² x 3, 1000 classes."""
        import keras

        s = size or self.size
        key = f"{name}@{s}"
        if key not in self.models:
            keras.utils.set_random_seed(0)
            self.models[key] = getattr(keras.applications, name)(weights=None, input_shape=(s, s, 3))
        return self.models[key]

    def x(self, batch: int = 1, seed: int = 0, size: Optional[int] = None) -> np.ndarray:
        s = size or self.size
        return np.random.default_rng(seed).standard_normal((batch, s, s, 3)).astype(np.float32)


def _rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Max abs difference of two raw map stacks holding the same maps in the same order, over the peak."""
    a, b = np.asarray(ours, np.float64).reshape(-1), np.asarray(theirs, np.float64).reshape(-1)
    if a.size != b.size:
        raise ValueError(f"map sizes differ: {np.shape(ours)} vs {np.shape(theirs)}")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _minmax(m: np.ndarray) -> np.ndarray:
    """Each map ``(..., h, w)`` min-maxed to [0, 1] (a constant map: 0)."""
    m = np.asarray(m, np.float64)
    lo, hi = m.min(axis=(-2, -1), keepdims=True), m.max(axis=(-2, -1), keepdims=True)
    return (m - lo) / np.maximum(hi - lo, 1e-12)


def _tfkv(kind: str, model: Any) -> Any:
    """tf-keras-vis' visualiser of ``kind`` on a clone of ``model`` whose final softmax is linear."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    cls = {"gradcam": Gradcam, "gradcampp": GradcamPlusPlus, "layercam": Layercam, "scorecam": Scorecam}[kind]
    return cls(model, model_modifier=ReplaceToLinear(), clone=True)


def forward_tape(model: Any, layer: str, x: np.ndarray, cls: int) -> Fn:
    """The lower bound as the tutorials write it (Keras' Grad-CAM example, tf-keras-vis): a side model to
    (layer, output) built once; per call one forward under a default ``tf.GradientTape`` (it records
    the forward for the trainable weights too) and ``tape.gradient`` of ``output[:, cls]`` to the
    layer's output."""
    import keras
    import tensorflow as tf

    side = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    xt = tf.convert_to_tensor(x)

    def run() -> Any:
        with tf.GradientTape() as tape:
            a, out = side(xt, training=False)
            tape.watch(a)
            score = tf.reduce_sum(out[:, cls])
        return tape.gradient(score, a).numpy()

    return run


def plain_forward(model: Any, x: np.ndarray) -> Fn:
    """One plain forward ``model(x, training=False)``: what any explanation of x costs at least."""
    import tensorflow as tf

    xt = tf.convert_to_tensor(x)
    return lambda: model(xt, training=False).numpy()


def _row(s: Setup, case: str, title: str, ours: Fn, check: Callable[[], float], peer: Optional[Fn], tol: float,
         reps: int, bound: Optional[tuple[str, Fn]] = None, extra: Optional[dict[str, Fn]] = None,
         note: str = "") -> dict[str, Any]:
    """Check the peer's raw maps (``check()``: the relative difference), then time camlens, the peer (if it
    agrees), the bound and the ``extra`` functions interleaved. Returns the row."""
    row: dict[str, Any] = {"case": case, "title": title, "peers": {}, "bound": None, "extra": {}, "note": note}
    fns: dict[str, Fn] = {"camlens": ours}
    if peer is not None:
        diff = check()
        ok = diff < tol
        row["peers"][TFKV] = {"diff": diff, "tol": tol, "ok": ok}
        print(f"  {TFKV}: raw maps' max diff / peak {diff:.1e}" + ("" if ok else "  <-- MAPS DISAGREE, not timed"),
              flush=True)
        if ok:
            fns[TFKV] = peer
    if bound is not None:
        fns[bound[0]] = bound[1]
    fns.update(extra or {})
    if s.smoke:
        times = {k: [_timed(fn, _nosync)[1]] for k, fn in fns.items()}
    else:
        times = _timeit(fns, reps, _nosync, warmup=1)
    row["camlens"] = _stats(times["camlens"])
    med = row["camlens"]["median_s"]
    if TFKV in times:
        row["peers"][TFKV].update(_stats(times[TFKV]))
        row["peers"][TFKV]["ratio"] = row["peers"][TFKV]["median_s"] / med
    if bound is not None:
        row["bound"] = {"name": bound[0], **_stats(times[bound[0]])}
        row["bound"]["camlens_over_bound"] = med / row["bound"]["median_s"]
    for name in extra or {}:
        row["extra"][name] = _stats(times[name])
    parts = [f"camlens {med * 1e3:.1f} ms"]
    if "ratio" in row["peers"].get(TFKV, {}):
        parts.append(f"{TFKV} {row['peers'][TFKV]['median_s'] * 1e3:.1f} ms (x{row['peers'][TFKV]['ratio']:.2f})")
    if row["bound"]:
        parts.append(f"{bound[0]} {row['bound']['median_s'] * 1e3:.1f} ms "  # type: ignore[index]
                     f"(camlens / bound {row['bound']['camlens_over_bound']:.2f})")
    print(f"{title}: " + ", ".join(parts), flush=True)
    return row


CASES: dict[str, Callable[[Setup], list[dict[str, Any]]]] = {}


def case(name: str) -> Callable:
    def reg(fn: Callable[[Setup], list[dict[str, Any]]]) -> Callable[[Setup], list[dict[str, Any]]]:
        CASES[name] = fn
        return fn
    return reg


def _classes(T: int) -> list[int]:
    return [(37 * i + 1) % 1000 for i in range(T)]


def _gradcam_row(s: Setup, case_name: str, method: str, T: int, **options: Any) -> dict[str, Any]:
    """ResNet50 ``conv5_block3_out``, one image, T classes: camlens (one forward, one vectorised Jacobian)
    vs tf-keras-vis (a batch of T copies, ``CategoricalScore``); T = 1 also vs forward+tape, and T > 1
    also times camlens with 1 target (``camlens_T_over_1``)."""
    import camlens
    from tf_keras_vis.utils.scores import CategoricalScore

    model, x, layer = s.model("ResNet50"), s.x(), "conv5_block3_out"
    classes = _classes(T)
    vis = _tfkv(method, model)
    xs = np.repeat(x, T, axis=0)

    def ours(targets: list[int]) -> Fn:
        return lambda: camlens.explain(model, x, targets=targets, layer=layer, method=method, **options).maps

    def peer() -> Any:
        return vis(CategoricalScore(classes), xs, penultimate_layer=layer, seek_penultimate_conv_layer=False)

    def check() -> float:
        raw = camlens.explain(model, x, targets=classes, layer=layer, method=method, relu=False, **options).raw[0]
        theirs = np.asarray(vis(CategoricalScore(classes), xs, penultimate_layer=layer,
                                seek_penultimate_conv_layer=False, expand_cam=False, normalize_cam=False))
        if method == "gradcampp":  # tf-keras-vis keeps exp(S) per target: compare min-maxed maps
            return _rel(_minmax(np.maximum(raw, 0)), _minmax(theirs))
        return _rel(np.maximum(raw, 0), theirs)

    name = {"gradcam": "Grad-CAM", "layercam": "LayerCAM", "gradcampp": "Grad-CAM++ (alpha='spatial_sum')"}[method]
    title = f"ResNet50 {s.size}² {name} conv5_block3_out, {T} target{'s' * (T > 1)}"
    bound = ("forward+tape", forward_tape(model, layer, x, classes[0])) if T == 1 else None
    extra = {"camlens 1 target": ours(classes[:1])} if T > 1 else {"forward": plain_forward(model, x)}
    row = _row(s, case_name, title, ours(classes), check, peer, GRAD_TOL, s.reps(), bound=bound, extra=extra,
               note=f"{TFKV}: one call on {T} copies of the image" if T > 1 else "")
    if T == 1:
        fwd = row["extra"].pop("forward")
        row["forward"] = fwd
        row["camlens_over_forward"] = row["camlens"]["median_s"] / fwd["median_s"]
        print(f"  camlens / one plain forward (model(x, training=False)): {row['camlens_over_forward']:.2f}")
        row["note"] = (f"one plain forward model(x, training=False): {_ms(fwd)} ms, camlens / forward "
                       f"{row['camlens_over_forward']:.2f}")
    if T > 1:
        one = row["extra"].pop("camlens 1 target")
        row["camlens_1t"] = one
        row["camlens_T_over_1"] = row["camlens"]["median_s"] / one["median_s"]
        print(f"  camlens {T} targets / 1 target: {row['camlens_T_over_1']:.2f}")
        row["note"] += f"; camlens {T} targets / 1 target (same run): {row['camlens_T_over_1']:.2f}"
    return row


@case("keras-gradcam-1t")
def gradcam_1t(s: Setup) -> list[dict[str, Any]]:
    return [_gradcam_row(s, "keras-gradcam-1t", "gradcam", 1)]


@case("keras-gradcam-10t")
def gradcam_10t(s: Setup) -> list[dict[str, Any]]:
    return [_gradcam_row(s, "keras-gradcam-10t", "gradcam", 10)]


@case("keras-layercam-10t")
def layercam_10t(s: Setup) -> list[dict[str, Any]]:
    return [_gradcam_row(s, "keras-layercam-10t", "layercam", 10)]


@case("keras-gradcampp-10t")
def gradcampp_10t(s: Setup) -> list[dict[str, Any]]:
    """Grad-CAM++ in tf-keras-vis' convention (``alpha="spatial_sum"``; its raw maps carry a factor exp(S)
    per target, so the check compares min-maxed raw maps)."""
    return [_gradcam_row(s, "keras-gradcampp-10t", "gradcampp", 10, alpha="spatial_sum")]


@case("keras-scorecam")
def scorecam(s: Setup) -> list[dict[str, Any]]:
    """Score-CAM of one image, one target, ResNet50 ``conv3_block4_out`` (512 channels: 512 masked
    forwards) at 96x96 (``--smoke``: 64x64), tf-keras-vis' weights (``weights="class_probability"``:
    the target's softmax probability on each masked input); both at batch size 32; tf-keras-vis scores
    its masked inputs with ``model.predict`` (compiled), camlens with the forward compiled once
    (``tf.function``)."""
    import camlens
    from tf_keras_vis.utils.scores import CategoricalScore

    size = 64 if s.smoke else 96
    model, x, layer, cls = s.model("ResNet50", size), s.x(size=size), "conv3_block4_out", 1
    vis = _tfkv("scorecam", model)
    kw = dict(targets=cls, layer=layer, method="scorecam", weights="class_probability", batch_size=32)

    def ours() -> Any:
        return camlens.explain(model, x, **kw).maps

    def peer() -> Any:
        return vis(CategoricalScore([cls]), x, penultimate_layer=layer, seek_penultimate_conv_layer=False,
                   batch_size=32)

    def check() -> float:
        raw = camlens.explain(model, x, relu=False, **kw).raw[0]
        theirs = np.asarray(vis(CategoricalScore([cls]), x, penultimate_layer=layer, seek_penultimate_conv_layer=False,
                                batch_size=32, expand_cam=False, normalize_cam=False))
        return _rel(np.maximum(raw, 0), theirs)

    title = f"ResNet50 {size}² Score-CAM conv3_block4_out (512 channels), 1 target"
    return [_row(s, "keras-scorecam", title, ours, check, peer, SCORE_TOL, s.reps("scorecam"),
                 note="weights='class_probability' (tf-keras-vis' convention); batch size 32 each")]


def _ms(st: Optional[dict[str, Any]]) -> str:
    if not st or "median_s" not in st:
        return "—"
    iqr = st.get("iqr_s")
    return f"{st['median_s'] * 1e3:.1f} ({iqr * 1e3:.1f})" if iqr is not None else f"{st['median_s'] * 1e3:.1f}"


def write_markdown(res: dict[str, Any], path: Path) -> None:
    meta, rows = res["meta"], res["rows"]
    head = ["case", "camlens ms (IQR)", f"{TFKV} ms (IQR)", f"{TFKV} / camlens", "lower bound ms (IQR)",
            "camlens / bound", "camlens T / 1 target", "raw max diff / peak", "note"]
    lines = [f"# camlens vs tf-keras-vis and TensorFlow's tape — Keras {meta['keras']}, TensorFlow {meta['tensorflow']}, "
             "CPU", "",
             f"Machine: {meta['processor']}, {meta['cpu_count']} CPUs, {meta['threads']} TF threads; "
             f"{TFKV} {meta['tf_keras_vis']}, camlens {meta['camlens']}; {meta['date']}; load average "
             f"{meta['load_start']} at start, {meta['load_end']} at end"
             f"{'; --smoke (64x64, 1 repeat: NOT a benchmark)' if meta['smoke'] else ''}"
             f"{'; --quick' if meta['quick'] else ''}; torch imported: {meta['torch_imported']}.", "",
             "Same model (keras.applications, random weights), input, layer and targets for everyone; raw maps "
             "at the layer's grid checked to agree before timing (max abs diff / peak, tolerance 1e-4, Score-CAM 1e-3); then "
             f"{meta['repeats']}; median (IQR) in ms; ratio > 1: camlens is faster. Each is timed doing its whole "
             "job to maps at input size. Lower bound forward+tape: a side model to (layer, output), one forward "
             "under tf.GradientTape and tape.gradient of the target's output to the layer.", "",
             f"Reproduce: `{meta['command']}`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["peers"].get(TFKV)
        b = r["bound"]
        cells = [r["title"], _ms(r["camlens"]),
                 "—" if e is None else (_ms(e) if "ratio" in e else f"maps disagree ({e['diff']:.1e})"),
                 f"{e['ratio']:.2f}" if e and "ratio" in e else "—",
                 f"{b['name']}: {_ms(b)}" if b else "—", f"{b['camlens_over_bound']:.2f}" if b else "—",
                 f"{r['camlens_T_over_1']:.2f}" if "camlens_T_over_1" in r else "—",
                 f"{e['diff']:.1e}" if e else "—", r["note"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3; Score-CAM 1)")
    ap.add_argument("--smoke", action="store_true", help="64x64 inputs, 1 repeat: checks agreement and outputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results; with --smoke a temporary folder)")
    args = ap.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    keras.utils.disable_interactive_logging()  # tf-keras-vis' model.predict progress bars
    planned = plan(args.out, args.smoke, args.only, CASES, "keras-cpu", Path(__file__).parent / "results")
    if planned is None:
        return 2
    out_dir, names, stem = planned
    s = Setup(smoke=args.smoke, quick=args.quick)
    meta = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": args.threads, "keras": keras.__version__, "tensorflow": tf.__version__,
            "tf_keras_vis": importlib.metadata.version("tf-keras-vis"), "camlens": importlib.metadata.version("camlens"),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_start": [round(v, 2) for v in os.getloadavg()], "smoke": args.smoke, "quick": args.quick,
            "only": args.only, "cases": names,
            "repeats": ("one timed call per function, no warm-up: NOT a benchmark" if args.smoke else
                        f"interleaved timing after one warm-up, {s.reps()} repeats ({s.reps('scorecam')} for "
                        "Score-CAM)"),
            "command": "python -m benchmarks.keras_bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    res = run_cases(CASES, names, s, meta, out_dir, stem, write_markdown)
    meta, rows = res["meta"], res["rows"]
    print(f"wrote {out_dir / stem}.md, .json ({meta['wall_s']:.0f} s); torch imported: {meta['torch_imported']}")
    bad = [r["title"] for r in rows for e in r["peers"].values() if not e["ok"]]
    for title in bad:
        print(f"MAPS DISAGREE: {title}", file=sys.stderr)
    return 1 if bad or meta["torch_imported"] else 0


if __name__ == "__main__":
    sys.exit(main())
