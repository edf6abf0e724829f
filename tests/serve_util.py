"""Shared by the ``camlens serve`` tests: a real uvicorn server in a thread, and test images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from camlens.fronts.serve import in_thread


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def shapes_image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A uint8 (size, size, 3) picture: a red disc and a blue square on grey noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 130, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - size * 0.3) ** 2 + (xx - size * 0.3) ** 2 < (size * 0.18) ** 2] = (220, 30, 30)
    img[int(size * 0.55):int(size * 0.85), int(size * 0.55):int(size * 0.85)] = (30, 30, 220)
    return img


def bomb_png(w: int = 40_000, h: int = 40_000) -> bytes:
    """A PNG whose header claims ``w x h`` grey pixels (1.6 gigapixels by default) over a tiny,
    truncated zlib stream: a decompression bomb's header, a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100_000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


running = in_thread  # the app on a real uvicorn in a thread
