"""Image files Pillow cannot write, built byte by byte for the decode tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def write_png16(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG of uint16 HxWxC samples: C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA."""
    h, w, c = samples.shape
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path
