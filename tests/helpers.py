"""Builders for test inputs: raw frames, encoded images of many kinds."""

from __future__ import annotations

import io
import time

import numpy as np
import simplejpeg
from PIL import Image

from operators import contract
from operators.frames import RawFrame


def gradient_rgb(width: int = 320, height: int = 240) -> np.ndarray:
    """A smooth RGB test image."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)
    r = np.broadcast_to(x, (height, width))
    g = np.broadcast_to(y[:, None], (height, width))
    b = np.full((height, width), 128, dtype=np.float32)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def jpeg_bytes(width: int = 320, height: int = 240, quality: int = 85) -> bytes:
    """An RGB JPEG."""
    return simplejpeg.encode_jpeg(gradient_rgb(width, height), quality=quality)


def pillow_bytes(mode: str, fmt: str, width: int = 64, height: int = 48) -> bytes:
    """An image in a given Pillow mode and format (e.g. "CMYK", "JPEG")."""
    image = Image.fromarray(gradient_rgb(width, height)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png16_bytes(width: int = 40, height: int = 30) -> bytes:
    """A 16-bit grayscale PNG."""
    array = (np.arange(width * height, dtype=np.uint16).reshape(height, width) * 50).astype(
        np.uint16
    )
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_with_dimensions(width: int, height: int) -> bytes:
    """A small JPEG whose SOF header claims `width` x `height` (a decompression bomb)."""
    data = bytearray(jpeg_bytes(16, 16))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def frame_headers(
    job: str = "job-1", camera: str = "cam-0", seq: int = 0, **extra: bytes
) -> tuple[tuple[str, bytes], ...]:
    """Well-formed headers for one frame, with overrides by header name."""
    headers = dict(
        contract.frame_headers(
            job_id=job, camera=camera, seq=seq, capture_time_ms=time.time() * 1000
        )
    )
    headers.update({name.replace("_", "-"): value for name, value in extra.items()})
    return tuple(headers.items())


def raw_frame(
    value: bytes | None,
    headers: tuple[tuple[str, bytes], ...] | None = None,
    *,
    offset: int = 0,
    partition: int = 0,
    key: bytes | None = b"cam-0",
) -> RawFrame:
    """A RawFrame as the ingest stage would make it."""
    return RawFrame(
        topic="frames",
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        headers=frame_headers() if headers is None else headers,
        timestamp_ms=int(time.time() * 1000),
        ingest_ns=time.time_ns(),
    )
