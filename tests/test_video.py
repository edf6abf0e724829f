"""``camlens video`` (issue 15): a synthetic MP4 explained frame by frame with shapes-2head, decoded
back with PyAV; EMA smoothing and ``--every`` maths; Ctrl-C; bad files; bounded memory; a fake
webcam; a Keras model."""

from __future__ import annotations

import signal
import threading
import time
import weakref
from fractions import Fraction

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

av = pytest.importorskip("av")

import camlens  # noqa: E402
from camlens.fronts import video as v  # noqa: E402
from camlens.core.errors import ConfigError, InputError  # noqa: E402
from camlens.fronts.cli import app  # noqa: E402

H = W = 96
N, FPS = 30, 15


def _frame(i: int, h: int = H, w: int = W) -> np.ndarray:
    """A grey frame with a red square moving right along the lower half."""
    f = np.full((h, w, 3), 40, np.uint8)
    x = 4 + (3 * i) % (w - 28)
    f[h // 2 + 8:h // 2 + 32, x:x + 24] = (220, 30, 30)
    return f


def _write_mp4(path, n: int = N, fps: int = FPS, h: int = H, w: int = W) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(_frame(i, h, w), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _read_mp4(path) -> tuple[list, Fraction]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in c.decode(s)], s.average_rate


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    p = tmp_path_factory.mktemp("video") / "in.mp4"
    _write_mp4(p)
    return p


@pytest.fixture(scope="module")
def shapes():
    return camlens.models.load("shapes-2head")


def test_cli_writes_an_overlay_video_of_the_same_frames_size_and_rate(clip, shapes, tmp_path):
    out = tmp_path / "out.mp4"
    res = CliRunner().invoke(app, ["video", str(clip), "--out", str(out), "--model", "shapes-2head", "-b", "4"])
    assert res.exit_code == 0, res.output
    assert f"{N} frame(s)" in res.output
    frames, rate = _read_mp4(out)
    inputs, in_rate = _read_mp4(clip)
    assert len(frames) == N and rate == in_rate == FPS
    assert all(f.shape == (H, W, 3) for f in frames)
    # the overlay where the map is high differs from the input; it is what render draws (below the text band)
    expected = list(v.explain_frames(shapes, inputs, batch_size=4))
    band = 40  # rows of the label / fps band (3 lines of an 8 px font)
    for k in (0, 13, 29):
        vf = expected[k]
        from camlens.viz.overlay import resize_bilinear

        m = resize_bilinear(vf.maps[0].astype(np.float64), (H, W))
        high = m > 0.6
        high[:band] = False
        assert high.sum() > 20, k
        diff = np.abs(frames[k].astype(float) - inputs[k].astype(float)).mean(-1)
        assert diff[high].mean() > 20, (k, diff[high].mean())
        drawn = v.render(vf, None)
        assert np.abs(frames[k][band:].astype(float) - drawn[band:].astype(float)).mean() < 8
    assert np.abs(frames[5][:12, :40].astype(float) - v.render(expected[5], None)[:12, :40]).mean() < 30  # a label


def test_ema_is_the_recurrence_on_the_explained_maps(shapes):
    ema = v.Ema(0.8)
    a, b, c = (np.full((1, 2, 2), x, np.float32) for x in (1.0, 0.0, 0.5))
    assert np.allclose(ema(a), 1.0) and np.allclose(ema(b), 0.8) and np.allclose(ema(c), 0.8 * 0.8 + 0.2 * 0.5)
    assert np.allclose(v.Ema(0.0)(b), 0.0)
    with pytest.raises(ConfigError):
        v.Ema(1.0)
    frames = [_frame(i) for i in range(10)]
    raw = [f.maps for f in v.explain_frames(shapes, frames, batch_size=3)]
    smooth = [f.maps for f in v.explain_frames(shapes, frames, batch_size=3, smooth=0.7)]
    assert np.allclose(smooth[0], raw[0], atol=1e-6)
    for k in range(1, 10):
        assert np.allclose(smooth[k], 0.7 * smooth[k - 1] + 0.3 * raw[k], atol=1e-5), k
    assert max(np.abs(s - r).max() for s, r in zip(smooth, raw)) > 0.05  # the square moves: smoothing shows


def test_every_n_explains_every_nth_frame_and_reuses_its_map(shapes):
    frames = [_frame(i) for i in range(10)]
    net = shapes.model
    net.train()  # handed over in training mode: it must come back so, with its parameters and no hooks
    before = {k: t.clone() for k, t in net.state_dict().items()}
    grads = [p.requires_grad for p in net.parameters()]
    every1 = list(v.explain_frames(shapes, frames, batch_size=2))
    assert net.training and [p.requires_grad for p in net.parameters()] == grads
    assert all(torch.equal(before[k], t) for k, t in net.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in net.modules())
    net.eval()
    every3 = list(v.explain_frames(shapes, frames, batch_size=2, every=3))
    assert [f.index for f in every3] == list(range(10))
    assert all(f.frame is frames[f.index] for f in every3)
    assert [f.explained for f in every3] == [i % 3 == 0 for i in range(10)]
    for f in every3:
        src = 3 * (f.index // 3)
        assert np.allclose(f.maps, every1[src].maps, atol=1e-5), f.index
        assert f.labels == every1[src].labels
    assert not np.allclose(every1[1].maps, every1[0].maps, atol=1e-3)  # so reuse is visible


def test_frames_alive_stay_bounded_for_a_long_stream(shapes, tmp_path):
    B, Q, n = 4, 4, 120
    alive, peak = [0], [0]

    def gone() -> None:
        alive[0] -= 1

    def source():
        for i in range(n):
            f = _frame(i, 32, 32)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(f, gone)
            yield f

    reader = v.FrameReader(source(), maxsize=Q)
    writer = v.FrameWriter(tmp_path / "long.mp4", 25, maxsize=Q)
    for vf in v.explain_frames(shapes, reader, batch_size=B, every=2):
        writer.write(lambda vf=vf: v.render(vf, 25.0))
    reader.close()
    writer.close()
    assert writer.written == n and len(_read_mp4(tmp_path / "long.mp4")[0]) == n
    # reader queue + batch * every held + writer queue + the few in hand: never the whole stream
    assert peak[0] <= Q + 2 * B + Q + 6, peak[0]


class FakeCamera:
    """A cv2.VideoCapture stand-in: BGR frames; ``interrupt_after`` raises KeyboardInterrupt, as
    Ctrl-C would, from the k+1-th read; ``signal_after`` sends SIGINT to the process instead."""

    def __init__(self, n: int = 1000, interrupt_after=None, signal_after=None, delay: float = 0.0) -> None:
        self.i, self.n, self.released, self.delay = 0, n, False, delay
        self.interrupt_after, self.signal_after = interrupt_after, signal_after

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return 20.0 if prop == 5 else 0.0

    def read(self):
        if self.interrupt_after is not None and self.i == self.interrupt_after:
            raise KeyboardInterrupt
        if self.signal_after is not None and self.i == self.signal_after:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.5)  # the handler (main thread) stops the reader before more frames are queued
        if self.i >= self.n:
            return False, None
        time.sleep(self.delay)
        self.i += 1
        return True, np.ascontiguousarray(_frame(self.i - 1, 64, 64)[..., ::-1])

    def release(self) -> None:
        self.released = True


def _webcam(monkeypatch, cam: FakeCamera, *args: str):
    monkeypatch.setattr(v, "open_capture", lambda index: cam)
    return CliRunner().invoke(app, ["video", "--webcam", "0", "--model", "shapes-2head", "-b", "4", *args])


def test_webcam_records_from_an_injected_camera(monkeypatch, tmp_path):
    cam = FakeCamera()
    res = _webcam(monkeypatch, cam, "--out", str(tmp_path / "cam.mp4"), "--max-frames", "7")
    assert res.exit_code == 0, res.output
    frames, rate = _read_mp4(tmp_path / "cam.mp4")
    assert len(frames) == 7 and rate == 20 and frames[0].shape == (64, 64, 3) and cam.released


def test_webcam_window_without_a_display_asks_for_out(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    res = _webcam(monkeypatch, FakeCamera(n=3))
    assert res.exit_code == 2 and "cannot open a window" in res.output and "--out" in res.output


def test_ctrl_c_from_the_source_finalises_a_valid_file_with_the_frames_done(monkeypatch, tmp_path):
    res = _webcam(monkeypatch, FakeCamera(interrupt_after=6), "--out", str(tmp_path / "k.mp4"))
    assert res.exit_code == 0 and "interrupted" in res.output, res.output
    assert len(_read_mp4(tmp_path / "k.mp4")[0]) == 6


def test_ctrl_c_signal_on_a_file_finishes_the_frames_read(monkeypatch, clip, tmp_path):
    assert threading.current_thread() is threading.main_thread()
    cam = FakeCamera(signal_after=9)
    monkeypatch.setattr(v, "decoded", lambda path: v.capture_frames(cam))
    res = CliRunner().invoke(app, ["video", str(clip), "--out", str(tmp_path / "s.mp4"), "-m", "shapes-2head"])
    assert res.exit_code == 130 and "interrupted" in res.output, res.output
    assert len(_read_mp4(tmp_path / "s.mp4")[0]) == 9
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_bad_files_are_one_clear_line_and_exit_2(clip, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # truncated: no index (moov) at the end
    cases = {empty: "empty", text: "cannot read", cut: "cannot read", tmp_path / "missing.mp4": "no video file"}
    for path, words in cases.items():
        res = CliRunner().invoke(app, ["video", str(path), "--out", str(tmp_path / "o.mp4"), "-m", "shapes-2head"])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, (path, res.output)
    assert not (tmp_path / "o.mp4").exists()
    res = CliRunner().invoke(app, ["video", str(clip), "-m", "shapes-2head"])
    assert res.exit_code == 2 and "--out" in res.output


def test_an_audio_only_file_is_not_a_video(tmp_path):
    p = tmp_path / "audio.mp4"
    with av.open(str(p), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=8000)
        for i in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 8000, i * 1024
            for pk in s.encode(fr):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    with pytest.raises(InputError, match="no video stream"):
        v.probe(p)
    res = CliRunner().invoke(app, ["video", str(p), "--out", str(tmp_path / "o.mp4"), "-m", "shapes-2head"])
    assert res.exit_code == 2 and "no video stream" in res.output


@pytest.mark.slow
def test_keras_model_frame_by_frame(clip, tmp_path):
    keras = pytest.importorskip("keras")
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2D(8, 3, strides=2, activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inp, L.Dense(4, activation="softmax", name="fc")(x)).save(tmp_path / "small.keras")
    out = tmp_path / "k.mp4"
    res = CliRunner().invoke(app, ["video", str(clip), "--out", str(out), "--model", f"keras:{tmp_path / 'small.keras'}",
                                   "--every", "2", "--smooth", "0.5", "--max-frames", "12"])
    assert res.exit_code == 0, res.output
    frames, rate = _read_mp4(out)
    inputs = _read_mp4(clip)[0]
    assert len(frames) == 12 and rate == FPS and frames[0].shape == (H, W, 3)
    lm = camlens.models.load(f"keras:{tmp_path / 'small.keras'}")
    got = list(v.explain_frames(lm, inputs[:12], every=2, smooth=0.5))
    assert got[0].maps.shape == (1, 32, 32) and np.isfinite(got[0].maps).all()
    assert np.abs(frames[11][40:].astype(float) - v.render(got[11], None)[40:]).mean() < 8


def test_rate_counts_bursts_of_a_batch_as_the_time_they_took():
    rate = v.Rate(window=10.0, now=0.0)
    got = []
    for burst in range(1, 5):  # 8 frames at once every 2 s: 4 fps
        got += [rate.tick(now=2.0 * burst + 1e-4 * k) for k in range(8)]
    assert got[7] == pytest.approx(8 / 2.0, rel=1e-3)  # one burst: frames over the time since the start
    assert got[-1] == pytest.approx(4.0, rel=1e-3)


def test_a_live_reader_drops_the_oldest_frames_when_the_model_is_slower():
    reader = v.FrameReader((np.full((2, 2, 3), i, np.uint8) for i in range(50)), maxsize=3, drop_old=True)
    deadline = time.time() + 10
    while reader.dropped < 47 and time.time() < deadline:
        time.sleep(0.01)
    assert [int(f[0, 0, 0]) for f in reader] == [47, 48, 49] and reader.dropped == 47
    reader.close()


class FakeCv2:
    """An OpenCV with a GUI, as far as camlens can tell: q is pressed at the 4th frame shown."""

    error = RuntimeError
    WINDOW_NORMAL = 0
    __version__ = "fake"

    def __init__(self) -> None:
        self.shown: list = []

    def getBuildInformation(self) -> str:
        return "  GUI:                           QT5\n"

    def namedWindow(self, title, flags) -> None:
        pass

    def imshow(self, title, bgr) -> None:
        self.shown.append(bgr.copy())

    def waitKey(self, ms) -> int:
        return ord("q") if len(self.shown) == 4 else -1

    def destroyWindow(self, title) -> None:
        pass


def test_webcam_window_shows_overlays_until_q(monkeypatch):
    fake = FakeCv2()
    monkeypatch.setattr(v, "_cv2", lambda: fake)
    monkeypatch.setenv("DISPLAY", ":0")
    res = _webcam(monkeypatch, FakeCamera(n=200, delay=0.03), "-b", "1")  # a 33 fps camera
    assert res.exit_code == 0, res.output
    # q at the 4th frame stops reading; the frames already read are still shown, then it ends
    assert 4 <= len(fake.shown) <= 4 + 2 + 2 and fake.shown[0].shape == (64, 64, 3)
    raw = _frame(0, 64, 64)[..., ::-1]
    assert np.abs(fake.shown[0].astype(float) - raw).mean() > 10  # an overlay, not the raw frame


def test_out_must_not_be_the_input(clip):
    res = CliRunner().invoke(app, ["video", str(clip), "--out", str(clip), "-m", "shapes-2head"], env={"COLUMNS": "400"})
    assert res.exit_code == 2 and "is the input video" in res.output
