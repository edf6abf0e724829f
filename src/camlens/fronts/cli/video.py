"""``camlens video``: maps on every frame of a video file or a webcam, drawn and encoded to an MP4
(or shown in a window); the pipeline is :mod:`camlens.fronts.video`."""

from __future__ import annotations

import functools
import itertools
import signal
import threading
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from camlens.fronts.cli.base import _fatal, command, console
from camlens.fronts.cli.common import (
    TARGET_HELP, _check_common, _check_method, _check_view, _cli_targets, _device_option, _load_model, _model_option,
    _parse_options, _weights_option)


@command()
def video(
    source: Optional[Path] = typer.Argument(None, help="a video file (MP4, MKV, AVI, MOV ...: what FFmpeg reads)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="the MP4 to write (with --webcam: record instead "
                                                                 "of a window)"),
    webcam: Optional[int] = typer.Option(None, "--webcam", help="read camera INDEX (OpenCV) instead of a file"),
    model: str = _model_option(),
    weights: Optional[Path] = _weights_option(),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="layer name(s); several are fused"),
    method: str = typer.Option("gradcam", "--method", help="see `camlens methods`"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="explain each head's K top classes"),
    show: int = typer.Option(0, "--show", help="which target's map is drawn (0: the first); the first 3 targets are labelled"),
    smooth: float = typer.Option(0.0, "--smooth",
                                 help="temporal smoothing in [0, 1): map = s * previous + (1 - s) * new (0: none)"),
    every: int = typer.Option(1, "--every", help="explain every Nth frame; the frames between reuse its map"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="frames per forward / backward pass"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="stop after N frames"),
    cmap: str = typer.Option("jet", "--cmap", help="matplotlib colormap"),
    alpha: float = typer.Option(0.5, "--alpha", help="overlay opacity in [0, 1]"),
    crf: int = typer.Option(18, "--crf", help="H.264 quality (0 lossless, 18 visually lossless, 23 default)"),
    device: Optional[str] = _device_option(),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="method option KEY=VALUE (repeatable)"),
) -> None:
    """Explain a video frame by frame: overlays (with label, probability and fps) encoded to --out.

    Frames are decoded (PyAV) and encoded in background threads while the model runs, explained
    --batch-size at a time; memory stays bounded for any length. --every N explains frames 0, N,
    2N ... and shows each one's map on the frames up to the next; --smooth s averages the maps over
    time (m = s * m_prev + (1 - s) * m_new). Ctrl-C stops reading, finishes the frames read and
    finalises a valid --out file (a second Ctrl-C: at once, still a valid file); exit code 130.

    --webcam INDEX reads a camera (OpenCV) until Ctrl-C, q / Esc in the window, or --max-frames;
    without --out it shows a window (needs an OpenCV with GUI, not opencv-python-headless), where
    frames the model cannot keep up with are dropped (the newest wins); --out records every frame.
    """
    from camlens.fronts import video as v

    if (source is None) == (webcam is None):
        raise typer.BadParameter("give a video file or --webcam INDEX (one of them)")
    if source is not None and out is None:
        raise typer.BadParameter("--out OUT.mp4 is needed with a video file")
    if target and top_k:
        raise typer.BadParameter("give --target or --top-k, not both")
    _check_method(method)
    _check_view(cmap, alpha)
    _check_common(device=device, top_k=top_k)
    if not 0.0 <= smooth < 1.0:
        raise typer.BadParameter(f"--smooth is in [0, 1) (0: none, 0.8: strong), got {smooth}")
    for name, val in (("--every", every), ("--batch-size", batch_size), ("--max-frames", max_frames)):
        if val is not None and val < 1:
            raise typer.BadParameter(f"{name} must be >= 1, got {val}")
    if show < 0 or not 0 <= crf <= 51:
        raise typer.BadParameter("--show must be >= 0 and --crf in 0..51")
    if out is not None and out.suffix.lower() != ".mp4":
        raise typer.BadParameter(f"--out writes an MP4: give a name ending in .mp4, got {str(out)!r}")
    if source is not None and out is not None and out.resolve() == source.resolve():
        raise typer.BadParameter(f"--out {str(out)!r} is the input video: give another file name")
    if webcam is not None and out is None:  # no window possible: say so before the model loads
        why = v.window_unavailable(v._cv2())
        if why is not None:
            raise typer.BadParameter(f"cannot open a window: {why}; record with --out FILE.mp4 instead")
    opts = _parse_options(option or [])
    targets = _cli_targets(target)

    total: Optional[int] = None
    if source is not None:
        info = v.probe(source)  # a missing, empty, corrupt or non-video file: one line, exit 2
        fps: Any = info.fps
        total = info.frames if max_frames is None else min(info.frames or max_frames, max_frames)
        frames: Any = itertools.islice(v.decoded(source), max_frames)
    m = _load_model(model, weights, device)
    window = None
    if webcam is not None:
        if out is None:
            window = v.Window(f"camlens {m.name}")
        try:
            cap = v.open_capture(webcam)
        except BaseException:
            if window is not None:
                window.close()
            raise
        fps = v.capture_fps(cap)
        frames = v.capture_frames(cap, max_frames)

    reader = v.FrameReader(frames, maxsize=2 * batch_size, start=False, drop_old=window is not None)
    writer = None
    interrupted = _on_ctrl_c(reader)
    rate = v.Rate()
    kw = dict(method=method, top_k=top_k, layer=list(layer) if layer else None, **opts)
    done = 0
    try:
        writer = v.FrameWriter(out, fps, crf=crf, maxsize=2 * batch_size) if out is not None else None
        reader.start()
        with _video_progress(total if source is not None else None) as progress:
            task = progress.add_task(f"{source.name if source else f'webcam {webcam}'}", total=total)
            for vf in v.explain_frames(m, reader, targets, batch_size=batch_size, every=every, smooth=smooth, **kw):
                draw = functools.partial(v.render, vf, rate.tick(), target=show, cmap=cmap, alpha=alpha)
                if writer is not None:
                    writer.write(draw)
                if window is not None and not window.show(draw()):
                    reader.stop()
                done += 1
                progress.advance(task)
    except KeyboardInterrupt:  # the second Ctrl-C: stop at once
        interrupted.set()
    finally:
        _restore_ctrl_c()
        reader.close()
        if window is not None:
            window.close()
        if writer is not None:
            writer.close()  # a valid file with the frames done, whatever happened
    stopped = interrupted.is_set() or reader.interrupted
    where = f" to {escape(str(out))}" if out is not None else ""
    n = writer.written if writer is not None else done
    dropped = f", {reader.dropped} camera frame(s) dropped (the model is slower)" if reader.dropped else ""
    console.print(f"{'[yellow]interrupted: [/]' if stopped else '[green]✓[/] '}{n} frame(s){where}{dropped} "
                  f"({m.name}, {method}{f', every {every}' if every > 1 else ''}"
                  f"{f', smooth {smooth}' if smooth else ''})", highlight=False)
    if stopped and webcam is None:
        raise typer.Exit(code=130)
    if n == 0 and out is not None:
        _fatal("no frame was written")


_previous_handler: Any = None


def _on_ctrl_c(reader: Any) -> threading.Event:
    """SIGINT (Ctrl-C): the first stops the reader (the frames read are still explained and
    written), the second raises KeyboardInterrupt (the file is still finalised). Main thread only."""
    global _previous_handler
    hit = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return hit

    def handler(signum: int, frame: Any) -> None:
        if hit.is_set():
            raise KeyboardInterrupt
        hit.set()
        reader.stop()
        console.print("[yellow]stopping: finishing the frames read (Ctrl-C again: at once)[/]")

    _previous_handler = signal.signal(signal.SIGINT, handler)
    return hit


def _restore_ctrl_c() -> None:
    global _previous_handler
    if _previous_handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _previous_handler)
        _previous_handler = None


def _video_progress(total: Optional[int]) -> Any:
    """A progress bar with frames done, fps and ETA (on stderr, gone when done)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    cols: list = [TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn() if total else TextColumn("{task.completed} frames"), TimeElapsedColumn()]
    if total:
        cols += [TaskProgressColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*cols, console=console, transient=True)
