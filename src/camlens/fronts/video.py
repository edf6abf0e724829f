"""Maps on video: decode a file (PyAV) or a webcam (OpenCV), explain the frames in batches through
:func:`camlens.stream`, smooth the maps over time, draw the overlays and encode them (PyAV).

The pipeline streams: at no time is more than a bounded number of frames alive, whatever the
video's length. Frames pass through four stages, each holding at most:

* the reader (:class:`FrameReader`, a background thread decoding into a queue): ``queue`` frames;
* :func:`explain_frames`: the ``batch_size`` frames :func:`camlens.stream` is gathering, plus, with
  ``every=N``, the up to ``N - 1`` frames between two explained ones (``batch_size * every`` at most);
* the writer (:class:`FrameWriter`, a background thread drawing and encoding): ``queue`` frames.

Decoding and encoding run in their threads while the model computes (PyAV and the model's kernels
release the GIL), so on a machine with a spare core their cost is hidden.

Temporal smoothing (``smooth = s`` in ``[0, 1)``) is an exponential moving average of each target's
map over the explained frames: ``m̄_0 = m_0``, ``m̄_k = s * m̄_{k-1} + (1 - s) * m_k``; ``s = 0`` is
no smoothing. A convex combination of maps in ``[0, 1]`` stays in ``[0, 1]``. Target ``t`` is the
``t``-th target of each frame (with ``targets=None`` the top class of each head, which may change
from frame to frame: the average then blends the classes' maps, as the eye would).

``every = N`` explains frames ``0, N, 2N, ...``; frame ``i`` shows the (smoothed) map, label and
score of frame ``N * (i // N)``, the last explained frame at or before it.

Only the public API is used (:func:`camlens.stream`), and :mod:`camlens.viz` to draw.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from ..core.errors import ConfigError, InputError, MissingDependencyError

__all__ = ["VideoFrame", "Ema", "explain_frames", "render", "FrameReader", "FrameWriter", "probe", "decoded",
           "open_capture", "capture_frames", "Window", "window_unavailable"]

_DONE = object()  # end of a queue


def _av() -> Any:
    try:
        import av
    except ImportError as err:
        raise MissingDependencyError('camlens video decodes and encodes with PyAV, which is not installed: '
                                     'pip install "camlens[video]" (or pip install av)') from err
    return av


@dataclass
class VideoFrame:
    """One frame and what is drawn on it.

    ``index``: its position in the video; ``frame``: ``(H, W, 3)`` uint8 RGB as decoded; ``maps``:
    ``(T, h, w)`` float32 in [0, 1] (the model-input grid, smoothed); ``labels`` / ``probs``: the
    ``T`` targets' labels and probabilities; ``explained``: whether the model ran on this frame
    (``False`` for frames between two explained ones with ``every > 1``, which reuse the last)."""

    index: int
    frame: np.ndarray
    maps: np.ndarray
    labels: list
    probs: np.ndarray
    explained: bool


class Ema:
    """Exponential moving average of maps: ``m̄_0 = m_0``, ``m̄_k = s m̄_{k-1} + (1 - s) m_k``.

    ``smooth = s`` in ``[0, 1)``; 0 returns every map as it is. A change of shape (another number of
    targets, another grid) starts the average again."""

    def __init__(self, smooth: float) -> None:
        if not 0.0 <= smooth < 1.0:
            raise ConfigError(f"smooth is the weight of the past maps in [0, 1) (0: none, 0.8: strong), got {smooth}")
        self.s = float(smooth)
        self.state: Optional[np.ndarray] = None

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        m = np.asarray(maps, dtype=np.float32)
        if self.s == 0.0 or self.state is None or self.state.shape != m.shape:
            self.state = m.copy()
        else:
            self.state = (self.s * self.state + (1.0 - self.s) * m).astype(np.float32)
        return self.state


def explain_frames(model: Any, frames: Iterable[np.ndarray], targets: Any = None, *, batch_size: int = 8,
                   every: int = 1, smooth: float = 0.0, **explain_kwargs: Any) -> Iterator[VideoFrame]:
    """Explain a stream of ``(H, W, 3)`` uint8 frames; yields a :class:`VideoFrame` per frame, in order.

    Frames ``0, every, 2*every ...`` go through :func:`camlens.stream` (``batch_size`` per explain
    call; ``model`` a :class:`camlens.models.LoadedModel`, which preprocesses them); the others reuse
    the last explained frame's maps. Maps are smoothed by :class:`Ema` (``smooth``). ``frames`` is
    consumed lazily: at most ``batch_size * every`` frames are held here at any time.
    ``explain_kwargs`` go to :func:`camlens.explain` (``method``, ``layer``, method options ...).
    """
    import camlens

    if every < 1:
        raise ConfigError(f"every must be >= 1 (1: explain every frame), got {every}")
    ema = Ema(smooth)
    held: collections.deque = collections.deque()  # (index, frame) read, not yet yielded

    def chosen() -> Iterator[tuple[int, np.ndarray]]:
        for i, frame in enumerate(frames):
            held.append((i, frame))
            if i % every == 0:
                yield i, frame

    last: Optional[tuple] = None  # (maps, labels, probs) of the last explained frame
    for exp in camlens.stream(model, chosen(), targets, keyed=True, batch_size=batch_size, options=explain_kwargs):
        j = exp.source
        d = exp.numpy()
        while held and held[0][0] < j:  # the frames between the previous explained one and this one
            i, frame = held.popleft()
            yield VideoFrame(i, frame, *last, explained=False)  # type: ignore[misc]
        i, frame = held.popleft()
        last = (ema(d["maps"][0]), d["labels"][0], d["probs"][0])
        del exp, d
        yield VideoFrame(i, frame, *last, explained=True)
    while held:  # after the last explained frame
        i, frame = held.popleft()
        yield VideoFrame(i, frame, *last, explained=False)  # type: ignore[misc]


# ------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------
def _text_lines(vf: VideoFrame, fps: Optional[float], max_targets: int = 3) -> list[str]:
    lines = []
    for label, p in list(zip(vf.labels, vf.probs))[:max_targets]:
        lines.append(f"{label}" + (f"  p={float(p):.2f}" if np.isfinite(p) else ""))
    if len(vf.labels) > max_targets:
        lines.append(f"+{len(vf.labels) - max_targets} target(s)")
    if fps is not None:
        lines.append(f"{fps:.1f} fps")
    return lines


def render(vf: VideoFrame, fps: Optional[float] = None, *, target: int = 0, cmap: str = "jet",
           alpha: float = 0.5) -> np.ndarray:
    """The frame ``(H, W, 3)`` uint8 with target ``target``'s map overlaid (``camlens.viz.overlay``:
    ``(1 - alpha) * frame + alpha * cmap(map)``, the map resized bilinearly to the frame) and, top
    left on a dark band, each target's label and probability (at most 3) and ``fps`` when given."""
    from PIL import Image, ImageDraw, ImageFont

    from ..viz import overlay

    out = overlay(vf.frame, vf.maps[min(target, len(vf.maps) - 1)], cmap=cmap, alpha=alpha)
    lines = _text_lines(vf, fps)
    if not lines:
        return out
    H = out.shape[0]
    size = max(8, H // 24)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img, "RGBA")
    step = size + 2
    width = max(int(draw.textlength(s, font=font)) for s in lines) + 6
    draw.rectangle((0, 0, width, step * len(lines) + 4), fill=(0, 0, 0, 150))
    for k, s in enumerate(lines):
        draw.text((3, 2 + k * step), s, fill=(255, 255, 255, 255), font=font)
    return np.asarray(img)


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
@dataclass
class VideoInfo:
    """What :func:`probe` found: ``fps`` (a Fraction), ``frames`` (``None`` where the container does
    not say), ``width``, ``height``, ``codec``."""

    fps: Fraction
    frames: Optional[int]
    width: int
    height: int
    codec: str


def _open_input(path: Union[str, Path]) -> tuple[Any, Any]:
    """``(container, video stream)`` of a file, or an :class:`InputError` saying what is wrong."""
    av = _av()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no video file {str(p)!r}" + (" (it is a folder)" if p.is_dir() else ""))
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes): not a video")
    try:
        container = av.open(str(p), mode="r")
    except av.error.FFmpegError as err:
        raise InputError(f"cannot read {p} as a video ({err}): is it a video file (MP4, MKV, AVI, MOV ...), "
                         "complete and not corrupt?") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{p} has no video stream: not a video (an audio-only or data file?)")
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.name:
        container.close()
        raise InputError(f"{p}: its video codec is not one this FFmpeg (PyAV) can decode; re-encode it, "
                         "e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")
    stream.thread_type = "AUTO"
    return container, stream


def probe(path: Union[str, Path]) -> VideoInfo:
    """The frame rate, frame count, size and codec of a video file (errors: :class:`InputError`)."""
    container, stream = _open_input(path)
    try:
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        n = int(stream.frames or 0) or None
        return VideoInfo(Fraction(fps), n, int(stream.codec_context.width), int(stream.codec_context.height),
                         str(stream.codec_context.name))
    finally:
        container.close()


def decoded(path: Union[str, Path]) -> Iterator[np.ndarray]:
    """Decode every frame of ``path`` as ``(H, W, 3)`` uint8 RGB, one at a time."""
    av = _av()
    container, stream = _open_input(path)
    n = 0
    try:
        try:
            for frame in container.decode(stream):
                n += 1
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as err:
            raise InputError(f"{path}: decoding failed after {n} frame(s) ({err}): the file is corrupt or "
                             "truncated, or its codec is not supported") from None
    finally:
        container.close()
    if n == 0:
        raise InputError(f"{path} has a video stream with no frames that decode: it is empty or corrupt")


class FrameReader:
    """Iterate over frames produced in a background thread (decoding overlaps the model).

    ``source``: a video path (decoded by PyAV) or any iterable of ``(H, W, 3)`` uint8 frames (a
    webcam, a test's generator). At most ``maxsize`` decoded frames wait in the queue. The source's
    errors are raised in the consumer's thread; a ``KeyboardInterrupt`` raised by the source, or
    :meth:`stop` (Ctrl-C), ends the iteration cleanly (``interrupted`` is then ``True``).
    ``drop_old=True`` (a live camera shown in a window): when the queue is full the oldest frame is
    dropped (``dropped`` counts them), so a model slower than the camera shows recent frames."""

    def __init__(self, source: Union[str, Path, Iterable[np.ndarray]], maxsize: int = 8, start: bool = True,
                 drop_old: bool = False) -> None:
        self.source = decoded(source) if isinstance(source, (str, Path)) else source
        self.q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self.drop_old, self.dropped = drop_old, 0
        self.halt = threading.Event()
        self.interrupted = False
        self.thread = threading.Thread(target=self._run, name="camlens-video-reader", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start reading (``start=False``: e.g. once a Ctrl-C handler is in place)."""
        self.thread.start()

    def _put(self, item: Any) -> bool:
        if self.drop_old and isinstance(item, np.ndarray):  # live: the newest frame wins, latency stays bounded
            while not self.halt.is_set():
                try:
                    self.q.put_nowait(item)
                    return True
                except queue.Full:
                    try:
                        self.q.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass
            return False
        while not self.halt.is_set():
            try:
                self.q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self.source:
                if not self._put(frame):
                    return
        except KeyboardInterrupt:
            self.interrupted = True
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(err)
            return
        self._put(_DONE)

    def stop(self) -> None:
        """End the iteration after the frames already read (Ctrl-C)."""
        self.interrupted = True
        self.halt.set()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            try:
                item = self.q.get(timeout=0.05)
            except queue.Empty:
                if self.halt.is_set() or self.thread.ident is not None and not self.thread.is_alive() and self.q.empty():
                    return
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread and close the source."""
        self.halt.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=5)
        close = getattr(self.source, "close", None)
        if close is not None and not self.thread.is_alive():
            close()


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------
class FrameWriter:
    """Encode ``(H, W, 3)`` uint8 frames to an MP4 (PyAV) in a background thread.

    :meth:`write` takes a frame, or a zero-argument callable that returns one (drawn in the
    writer's thread, so overlays overlap the model too); at most ``maxsize`` wait. H.264 (libx264,
    ``crf``) when PyAV's FFmpeg has it, else MPEG-4 Part 2; yuv420p, so an odd height or width is
    padded by one row / column. :meth:`close` flushes the encoder and finalises the file (also
    after Ctrl-C: the file is valid with the frames written). ``written`` counts encoded frames."""

    def __init__(self, path: Union[str, Path], fps: Union[float, Fraction], *, codec: Optional[str] = None,
                 crf: int = 18, maxsize: int = 8) -> None:
        from ..viz.volume import _video_codec

        self.av = _av()
        self.path = Path(path)
        if not float(fps) > 0:
            raise ConfigError(f"fps must be positive, got {fps}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.codec = _video_codec(self.av, codec)
        self.fps = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        self.crf = crf
        self.q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self.error: Optional[BaseException] = None
        self.written = 0
        self.container: Any = None
        self.stream: Any = None
        self.thread = threading.Thread(target=self._run, name="camlens-video-writer", daemon=True)
        self.thread.start()

    def _open(self, frame: np.ndarray) -> None:
        try:
            self.container = self.av.open(str(self.path), mode="w", format="mp4")
        except (self.av.error.FFmpegError, OSError) as err:
            raise InputError(f"cannot write {self.path}: {err}") from None
        st = self.container.add_stream(self.codec, rate=self.fps)
        st.height, st.width = frame.shape[0] + frame.shape[0] % 2, frame.shape[1] + frame.shape[1] % 2
        st.pix_fmt = "yuv420p"
        if self.codec == "libx264":
            st.options = {"crf": str(int(self.crf))}
        else:
            st.bit_rate = max(2_000_000, int(4 * st.height * st.width * float(self.fps)))
        self.stream = st

    def _encode(self, frame: np.ndarray) -> None:
        from ..viz.volume import even_frame

        if self.container is None:
            self._open(frame)
        frame = even_frame(np.ascontiguousarray(frame))
        if frame.shape[:2] != (self.stream.height, self.stream.width):
            raise InputError(f"frame {self.written} is {frame.shape[1]}x{frame.shape[0]}, the video "
                             f"{self.stream.width}x{self.stream.height}: every frame must have one size")
        vf = self.av.VideoFrame.from_ndarray(frame, format="rgb24")
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.written += 1

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is _DONE:
                return
            if self.error is not None:
                continue  # drain: the error is raised in the producer's thread
            try:
                self._encode(item() if callable(item) else item)
            except BaseException as err:  # noqa: BLE001 - handed to the producer
                self.error = err

    def write(self, frame: Union[np.ndarray, Callable[[], np.ndarray]]) -> None:
        """Queue a frame (or a callable drawing it); raises the writer's error, if it had one."""
        if self.error is not None:
            raise self.error
        self.q.put(frame)

    def close(self) -> None:
        """Encode what is queued, flush the encoder, finalise the file; raise the writer's error."""
        if self.thread.is_alive():
            self.q.put(_DONE)
            self.thread.join()
        if self.container is not None:
            try:
                for packet in self.stream.encode():
                    self.container.mux(packet)
            finally:
                self.container.close()
                self.container = None
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------------------------------
# webcam (OpenCV)
# ------------------------------------------------------------------------------------------
def _cv2() -> Any:
    try:
        import cv2
    except ImportError as err:
        raise MissingDependencyError("camlens video --webcam reads the camera with OpenCV, which is not "
                                     "installed: pip install opencv-python (a window) or "
                                     "opencv-python-headless (--out only)") from err
    return cv2


def open_capture(index: int) -> Any:
    """``cv2.VideoCapture(index)``, opened (tests replace this function with a fake camera)."""
    cv2 = _cv2()
    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        cap.release()
        raise InputError(f"no camera at index {index} (OpenCV could not open it): check that a camera is "
                         "connected and free, or try --webcam 1")
    return cap


def capture_frames(cap: Any, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
    """Frames of an opened capture (``read() -> (ok, BGR frame)``) as RGB ``(H, W, 3)`` uint8,
    until it stops delivering or ``max_frames``; releases it at the end."""
    n = 0
    try:
        while max_frames is None or n < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                if n == 0:
                    raise InputError("the camera delivered no frame (cap.read() failed)")
                return
            n += 1
            yield np.ascontiguousarray(frame[..., ::-1])
    finally:
        cap.release()


def capture_fps(cap: Any, default: float = 30.0) -> float:
    """The camera's frame rate (``CAP_PROP_FPS``), or ``default`` where it reports none."""
    try:
        fps = float(cap.get(5))  # cv2.CAP_PROP_FPS
    except Exception:  # noqa: BLE001 - a fake or odd capture
        return default
    return fps if 1.0 <= fps <= 1000.0 else default


def window_unavailable(cv2: Any) -> Optional[str]:
    """Why OpenCV cannot show a window here, or ``None``: a build without GUI
    (``opencv-python-headless``: "GUI: NONE" in its build information), or, on Linux, no display
    (``DISPLAY`` / ``WAYLAND_DISPLAY`` unset: Qt would abort the process rather than raise)."""
    import os
    import re
    import sys

    gui = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    if gui is not None and gui.group(1).upper() == "NONE":
        return (f"this OpenCV ({cv2.__version__}) is built without GUI (opencv-python-headless); "
                "pip install opencv-python for a window")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY / WAYLAND_DISPLAY unset)"
    return None


class Window:
    """An OpenCV window showing RGB frames; ``show`` returns ``False`` once q or Esc is pressed.

    OpenCV builds without a GUI (``opencv-python-headless``) cannot open one: a :class:`ConfigError`
    says so and to record with ``--out`` instead."""

    def __init__(self, title: str = "camlens") -> None:
        cv2 = _cv2()
        self.cv2, self.title = cv2, title
        why = window_unavailable(cv2)
        if why is not None:
            raise ConfigError(f"cannot open a window: {why}; record with --out FILE.mp4 instead")
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error as err:
            raise ConfigError(f"this OpenCV ({cv2.__version__}) cannot open a window "
                              f"({str(err).strip().splitlines()[-1]}): record with --out FILE.mp4") from None

    def show(self, frame: np.ndarray) -> bool:
        self.cv2.imshow(self.title, np.ascontiguousarray(frame[..., ::-1]))
        return (self.cv2.waitKey(1) & 0xFF) not in (ord("q"), 27)

    def close(self) -> None:
        try:
            self.cv2.destroyWindow(self.title)
        except self.cv2.error:
            pass


class Rate:
    """Frames per second, as the overlay shows it.

    Results come in bursts (a batch of B frames at once, every B / fps seconds), so ticks closer
    than ``gap`` seconds form one burst, and the rate is the frames of the bursts after the first
    one of the last ``window`` seconds over the time from that first burst to the last: each burst's
    frames were computed in the time since the previous one. Before a second burst: the frames over
    the time since the start."""

    def __init__(self, window: float = 4.0, gap: float = 0.005, now: Optional[float] = None) -> None:
        self.window, self.gap = window, gap
        self.start = time.perf_counter() if now is None else now
        self.bursts: collections.deque = collections.deque()  # [time of its last tick, frames]

    def tick(self, now: Optional[float] = None) -> float:
        """Count a frame done ``now`` (default: the clock); the rate."""
        now = time.perf_counter() if now is None else now
        if self.bursts and now - self.bursts[-1][0] <= self.gap:
            self.bursts[-1][0] = now
            self.bursts[-1][1] += 1
        else:
            self.bursts.append([now, 1])
        while len(self.bursts) > 2 and now - self.bursts[1][0] > self.window:
            self.bursts.popleft()
        if len(self.bursts) == 1:
            return self.bursts[0][1] / max(now - self.start, 1e-6)
        span = self.bursts[-1][0] - self.bursts[0][0]
        return sum(b[1] for b in list(self.bursts)[1:]) / max(span, 1e-6)
