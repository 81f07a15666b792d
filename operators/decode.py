"""Decode, validate and preprocess: a raw Kafka frame in, a prepared frame or a dead letter out.

Size limits are checked before any large allocation: the byte length first, then the
pixel count read from the image header. JPEG goes through libjpeg-turbo (simplejpeg) with
DCT-domain downscaling; other formats and unusual JPEG colour spaces (CMYK, YCCK) go
through Pillow. Grayscale, alpha, palette and CMYK images are converted to RGB.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from operators import contract
from operators import dead_letters as dl
from operators.frames import DeadLetter, FrameMeta, PreparedFrame, RawFrame

STAGE = "decode"
JPEG_MAGIC = b"\xff\xd8\xff"
FAST_JPEG_COLORSPACES = ("Gray", "YCbCr", "RGB")
MAX_TRACE_HEADER = 512

# Pixel limits are enforced here before decoding, so Pillow's own bomb check is not needed.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What a frame may be: at most `max_bytes` of payload and `max_pixels` pixels."""

    max_bytes: int
    max_pixels: int
    input_size: tuple[int, int]


class _Rejected(Exception):
    """Internal signal carrying a dead-letter reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _header_text(value: bytes, name: str, *, max_len: int) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected(dl.BAD_HEADER, f"header {name} is not UTF-8") from exc
    if not text or len(text) > max_len or not text.isprintable():
        raise _Rejected(dl.BAD_HEADER, f"header {name} must be 1-{max_len} printable characters")
    return text


def _header_number(value: bytes, name: str) -> float:
    try:
        number = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Rejected(dl.BAD_HEADER, f"header {name} is not a number") from exc
    if not math.isfinite(number) or number < 0:
        raise _Rejected(dl.BAD_HEADER, f"header {name} must be a finite number >= 0")
    return number


def parse_meta(raw: RawFrame) -> FrameMeta:
    """Validate the headers of `raw` and derive the frame's identity and times.

    Raises `_Rejected` for garbage headers; missing optional headers get defaults.
    """
    headers: dict[str, bytes] = {}
    for name, value in raw.headers:
        headers.setdefault(name, value if value is not None else b"")
    job_id = contract.DEFAULT_JOB_ID
    if contract.JOB_ID in headers:
        job_id = _header_text(headers[contract.JOB_ID], "job id", max_len=contract.MAX_ID_LENGTH)
    if contract.CAMERA in headers:
        camera = _header_text(headers[contract.CAMERA], "camera", max_len=contract.MAX_ID_LENGTH)
    elif raw.key:
        camera = _header_text(raw.key, "key (camera)", max_len=contract.MAX_ID_LENGTH)
    else:
        camera = "unknown"
    seq: int | None = None
    if contract.SEQ in headers:
        try:
            seq = int(headers[contract.SEQ].decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Rejected(dl.BAD_HEADER, "header seq is not an integer") from exc
        if seq < 0:
            raise _Rejected(dl.BAD_HEADER, "header seq must be >= 0")
    if contract.CAPTURE_TIME_MS in headers:
        capture_ns = int(_header_number(headers[contract.CAPTURE_TIME_MS], "capture time") * 1e6)
    elif raw.timestamp_ms is not None and raw.timestamp_ms > 0:
        capture_ns = raw.timestamp_ms * 1_000_000
    else:
        capture_ns = raw.ingest_ns
    if contract.CONTENT_TYPE in headers:
        content_type = headers[contract.CONTENT_TYPE].decode("latin-1").split(";")[0].strip()
        if content_type.lower() not in contract.ACCEPTED_CONTENT_TYPES:
            raise _Rejected(
                dl.UNSUPPORTED_CONTENT_TYPE,
                f"content type must be one of {', '.join(contract.ACCEPTED_CONTENT_TYPES)}",
            )
    carrier = {}
    for name in contract.TRACE_HEADERS:
        value = headers.get(name)
        if value and len(value) <= MAX_TRACE_HEADER:
            try:
                carrier[name] = value.decode("ascii")
            except UnicodeDecodeError:
                continue
    if seq is None:
        frame_id = f"kafka/{raw.topic}/{raw.partition}/{raw.offset}"
    else:
        frame_id = f"{job_id}/{camera}/{seq}"
    return FrameMeta(
        frame_id=frame_id,
        job_id=job_id,
        camera=camera,
        seq=seq,
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        capture_ns=capture_ns,
        ingest_ns=raw.ingest_ns,
        content_sha256=hashlib.sha256(raw.value or b"").hexdigest(),
        trace_carrier=carrier,
    )


def _check_pixels(width: int, height: int, limits: FrameLimits) -> None:
    if width <= 0 or height <= 0:
        raise _Rejected(dl.CORRUPT_IMAGE, "image has no pixels")
    if width * height > limits.max_pixels:
        raise _Rejected(
            dl.TOO_MANY_PIXELS,
            f"{width}x{height} exceeds the limit of {limits.max_pixels} pixels",
        )


def _decode_jpeg(data: bytes, limits: FrameLimits) -> tuple[np.ndarray, int, int] | None:
    """Fast path: libjpeg-turbo decode with DCT downscaling; None if Pillow must do it."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise _Rejected(dl.CORRUPT_IMAGE, "JPEG header unreadable") from exc
    _check_pixels(width, height, limits)
    if colorspace not in FAST_JPEG_COLORSPACES:
        return None
    in_w, in_h = limits.input_size
    try:
        rgb = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=in_w, min_height=in_h, fastdct=True
        )
    except ValueError as exc:
        raise _Rejected(dl.CORRUPT_IMAGE, "JPEG data is corrupt or truncated") from exc
    return rgb, width, height


def _decode_with_pillow(data: bytes, limits: FrameLimits) -> tuple[np.ndarray, int, int]:
    """Any format Pillow reads; the size is checked from the header before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            _check_pixels(width, height, limits)
            image.draft("RGB", limits.input_size)
            image.load()
    except _Rejected:
        raise
    except UnidentifiedImageError as exc:
        raise _Rejected(dl.NOT_AN_IMAGE, "payload is not a decodable image") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _Rejected(dl.CORRUPT_IMAGE, "image data is corrupt or truncated") from exc
    if image.mode != "RGB":
        try:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = max(float(array.max()), 1.0)
                image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8))
            image = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise _Rejected(
                dl.UNSUPPORTED_IMAGE_MODE, f"image mode {image.mode} cannot become RGB"
            ) from exc
    return np.asarray(image), width, height


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if rgb.shape[1] == size[0] and rgb.shape[0] == size[1]:
        return np.ascontiguousarray(rgb)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def decode_pixels(data: bytes, limits: FrameLimits) -> tuple[np.ndarray, int, int]:
    """Decode and resize one image: (uint8 H x W x 3 at the input size, width, height)."""
    decoded = _decode_jpeg(data, limits) if data.startswith(JPEG_MAGIC) else None
    if decoded is None:
        decoded = _decode_with_pillow(data, limits)
    rgb, width, height = decoded
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise _Rejected(dl.UNSUPPORTED_IMAGE_MODE, "decoded image is not 3-channel")
    return _resize(rgb, limits.input_size), width, height


def prepare_frame(raw: RawFrame, limits: FrameLimits) -> PreparedFrame | DeadLetter:
    """Validate, decode and resize `raw`; any problem becomes a dead letter, never a raise."""
    meta: FrameMeta | None = None
    try:
        if not raw.value:
            raise _Rejected(dl.EMPTY, "message has no payload")
        if len(raw.value) > limits.max_bytes:
            raise _Rejected(
                dl.TOO_LARGE, f"{len(raw.value)} bytes exceeds the limit of {limits.max_bytes}"
            )
        meta = parse_meta(raw)
        pixels, width, height = decode_pixels(raw.value, limits)
    except _Rejected as rejected:
        return dl.reject(
            raw,
            stage=STAGE,
            reason=rejected.reason,
            detail=rejected.detail,
            frame_id=meta.frame_id if meta else None,
            job_id=meta.job_id if meta else None,
            trace_carrier=meta.trace_carrier if meta else None,
        )
    except Exception as exc:  # one bad record must never crash the dataflow
        return dl.reject(
            raw,
            stage=STAGE,
            reason=dl.INTERNAL_ERROR,
            detail=f"unexpected {type(exc).__name__} while decoding",
            frame_id=meta.frame_id if meta else None,
            job_id=meta.job_id if meta else None,
        )
    meta = _with_size(meta, width, height)
    return PreparedFrame(meta=meta, pixels=pixels, prepared_ns=time.time_ns())


def _with_size(meta: FrameMeta, width: int, height: int) -> FrameMeta:
    return replace(meta, width=width, height=height)
