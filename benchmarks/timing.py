"""Timing shared by the benchmark suites (no framework imported): interleaved repeats, medians, IQR.

:mod:`benchmarks.run` (PyTorch peers) and :mod:`benchmarks.keras` (Keras / TensorFlow peers) both
time this way, so their ratios mean the same thing.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

Fn = Callable[[], Any]


def _timeit(fns: dict[str, Fn], repeats: int, sync: Callable[[], None], warmup: int = 1,
            inner: int = 1) -> dict[str, list[float]]:
    """Interleaved timing: each repeat runs every function once, in turn (noise hits all alike).

    ``inner > 1``: each timed repeat is ``inner`` calls in a row and records their mean, for
    millisecond calls whose single timings scatter with the machine's noise (the overhead case)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            for _ in range(inner):
                fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(_repeated(fn, inner) if inner > 1 else fn, sync)[1] / inner)
    return times


def _repeated(fn: Fn, n: int) -> Fn:
    def run() -> Any:
        for _ in range(n - 1):
            fn()
        return fn()
    return run


def _timed(fn: Fn, sync: Callable[[], None]) -> tuple[Any, float]:
    """``fn()`` and its duration in seconds."""
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def _iqr(v: list[float]) -> Optional[float]:
    """Interquartile range; None with fewer than 2 values."""
    if len(v) < 2:
        return None
    q = statistics.quantiles(v, n=4)
    return q[2] - q[0]


def _stats(v: list[float]) -> dict[str, Any]:
    return {"times_s": v, "median_s": statistics.median(v), "iqr_s": _iqr(v)}


#: Timed repeats per kind of case, (full run, --quick): ``normal`` cases, ``heavy`` ones (seconds per
#: call) and ``scorecam``.
REPS = {"normal": (15, 3), "heavy": (5, 2), "scorecam": (5, 1)}


@dataclass
class Sizes:
    """The sizes and repeat counts every suite shares: ``--smoke`` (64x64, one call each) or not (224x224)."""

    smoke: bool
    quick: bool

    @property
    def size(self) -> int:
        return 64 if self.smoke else 224

    def reps(self, kind: str = "normal") -> int:
        """Timed repeats of a case of ``kind`` (:data:`REPS`); 1 with ``--smoke``."""
        return 1 if self.smoke else REPS[kind][int(self.quick)]


def plan(out: Optional[Path], smoke: bool, only: Optional[str], cases: dict, stem: str,
         default: Path) -> Optional[tuple[Path, list[str], str]]:
    """Where a run writes (``out``, else a temporary folder for ``--smoke``, else ``default``), the cases
    it runs (``only``: those whose name contains it) and the file stem (``<stem>-only-<only>`` for a
    partial run, so it never replaces the full results); ``None`` (after saying why) if no case matches."""
    out_dir = out or (Path(tempfile.mkdtemp(prefix=f"camlens-bench-{stem}-")) if smoke else default)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in cases if only is None or only in n]
    if not names:
        print(f"no case matches {only!r}; cases: {', '.join(cases)}", file=sys.stderr)
        return None
    return out_dir, names, stem if only is None else f"{stem}-only-{re.sub(r'[^A-Za-z0-9_.-]+', '_', only)}"


def run_cases(cases: dict, names: list[str], setup: Any, meta: dict, out_dir: Path, stem: str,
              write_markdown: Callable[[dict, Path], None]) -> dict:
    """Run ``names`` in order, add the end load and wall time to ``meta``, write ``<stem>.json`` and
    ``<stem>.md``; returns ``{"meta": meta, "rows": [...]}``."""
    rows: list = []
    t0 = time.perf_counter()
    for n in names:
        print(f"[{n}]", flush=True)
        rows += cases[n](setup)
    meta["load_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["wall_s"] = time.perf_counter() - t0
    meta["torch_imported"] = "torch" in sys.modules
    res = {"meta": meta, "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out_dir / f"{stem}.md")
    return res
