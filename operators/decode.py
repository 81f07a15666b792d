"""Decode, validate and preprocess: a raw Kafka frame in, a prepared frame or a dead letter out.

Size limits are checked before any large allocation: the byte length first, then the
pixel count read from the image header. JPEG goes through libjpeg-turbo (simplejpeg) with
DCT-domain downscaling; the contract's other formats and unusual JPEG colour spaces (CMYK,
YCCK) go through Pillow, restricted to the contract's formats. Grayscale, alpha, palette
and CMYK images are converted to RGB. Header values are checked against the contract's
ranges (seq, capture time, identity characters) so that a frame that parses can be stored.
`prepare_frame` is the logic; `decode_frames` the stage's operator.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial

import bytewax.operators as op
import numpy as np
import simplejpeg
from bytewax.dataflow import Stream, operator
from PIL import Image, UnidentifiedImageError

from operators import contract, stages
from operators import dead_letters as dl
from operators.frames import DeadLetter, FrameMeta, PreparedFrame, RawFrame
from operators.stages import Instrument, uninstrumented

STAGE = stages.DECODE
JPEG_MAGIC = b"\xff\xd8\xff"
FAST_JPEG_COLORSPACES = ("Gray", "YCbCr", "RGB")
MAX_TRACE_HEADER = 512
DEFAULT_CAPTURE_SKEW_S = 300.0
SEQ_PATTERN = re.compile(rb"[0-9]+")  # bytes, so only ASCII digits match
MAX_SEQ_DIGITS = len(str(contract.MAX_SEQ))
ACCEPTED_FORMATS_TEXT = ", ".join(contract.PILLOW_FORMATS)


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What a frame may be: at most `max_bytes` of payload and `max_pixels` pixels, and a
    capture time at most `max_capture_skew_s` seconds after the frame's ingest time."""

    max_bytes: int
    max_pixels: int
    input_size: tuple[int, int]
    max_capture_skew_s: float = DEFAULT_CAPTURE_SKEW_S


class _Rejected(Exception):
    """Internal signal carrying a dead-letter reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _identity_part(value: bytes, name: str) -> str:
    """A job id or camera as text: 1-128 printable UTF-8 characters without "/", which
    joins the parts of the frame identity (so no two frames can share one)."""
    max_len = contract.MAX_ID_LENGTH
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected(dl.BAD_HEADER, f"header {name} is not UTF-8") from exc
    if not text or len(text) > max_len or not text.isprintable():
        raise _Rejected(dl.BAD_HEADER, f"header {name} must be 1-{max_len} printable characters")
    if contract.ID_SEPARATOR in text:
        raise _Rejected(
            dl.BAD_HEADER,
            f"header {name} must not contain '{contract.ID_SEPARATOR}' "
            "(it separates the parts of the frame identity)",
        )
    return text


def _header_seq(value: bytes) -> int:
    """The frame number: ASCII digits only (no sign, space or '_'), 0..2^63-1."""
    if not SEQ_PATTERN.fullmatch(value):
        raise _Rejected(dl.BAD_HEADER, "header seq must be ASCII digits 0-9 only")
    digits = value.lstrip(b"0") or b"0"
    # Bounded before int(): a long run of digits is refused without parsing it.
    if len(digits) > MAX_SEQ_DIGITS or int(digits) > contract.MAX_SEQ:
        raise _Rejected(dl.BAD_HEADER, f"header seq must be at most {contract.MAX_SEQ}")
    return int(digits)


def _header_number(value: bytes, name: str) -> float:
    try:
        number = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Rejected(dl.BAD_HEADER, f"header {name} is not a number") from exc
    if not math.isfinite(number) or number < 0:
        raise _Rejected(dl.BAD_HEADER, f"header {name} must be a finite number >= 0")
    return number


def _check_capture_ns(capture_ns: int, name: str, raw: RawFrame, limits: FrameLimits) -> int:
    """`capture_ns` if it lies after 2000-01-01 and at most `max_capture_skew_s` after the
    frame's ingest time (its "now", so the check needs no clock of its own), and fits the
    sinks' int64 nanoseconds; else `_Rejected`. The detail names the rule, not the value."""
    ahead_ns = limits.max_capture_skew_s * 1e9
    latest = contract.MAX_CAPTURE_NS
    if ahead_ns < latest - raw.ingest_ns:  # a float, possibly inf: compared before int()
        latest = raw.ingest_ns + int(ahead_ns)
    if not contract.MIN_CAPTURE_TIME_MS * 1_000_000 < capture_ns <= latest:
        raise _Rejected(
            dl.BAD_HEADER,
            f"{name} must be milliseconds since the epoch after 2000-01-01T00:00:00Z and at "
            f"most {limits.max_capture_skew_s:g} s ahead of the frame's arrival",
        )
    return capture_ns


def parse_meta(raw: RawFrame, limits: FrameLimits) -> FrameMeta:
    """Validate the headers of `raw` and derive the frame's identity and times.

    Raises `_Rejected` for garbage or out-of-range headers; missing optional headers get
    defaults.
    """
    headers: dict[str, bytes] = {}
    for name, value in raw.headers:
        headers.setdefault(name, value if value is not None else b"")
    job_id = contract.DEFAULT_JOB_ID
    if contract.JOB_ID in headers:
        job_id = _identity_part(headers[contract.JOB_ID], "job id")
    if contract.CAMERA in headers:
        camera = _identity_part(headers[contract.CAMERA], "camera")
    elif raw.key:
        camera = _identity_part(raw.key, "key (camera)")
    else:
        camera = "unknown"
    seq: int | None = None
    if contract.SEQ in headers:
        seq = _header_seq(headers[contract.SEQ])
    if contract.CAPTURE_TIME_MS in headers:
        capture_ms = _header_number(headers[contract.CAPTURE_TIME_MS], "capture time")
        capture_ns = _check_capture_ns(int(capture_ms * 1e6), "header capture time", raw, limits)
    elif raw.timestamp_ms is not None and raw.timestamp_ms > 0:
        capture_ns = _check_capture_ns(
            raw.timestamp_ms * 1_000_000, "the Kafka timestamp (the capture time)", raw, limits
        )
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
    """The contract's formats only (Pillow's allow-list: no other plugin ever sees the
    bytes, so e.g. EPS never starts Ghostscript); the size is checked from the header
    before decoding. Pillow's own bomb guard stays on: it refuses at open what is more
    than twice its limit, and only warns (ignored here, our limit decides) below that."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=contract.PILLOW_FORMATS)
            width, height = image.size
            _check_pixels(width, height, limits)
            image.draft("RGB", limits.input_size)
            image.load()
    except _Rejected:
        raise
    except UnidentifiedImageError as exc:
        raise _Rejected(
            dl.NOT_AN_IMAGE, f"payload is no image of an accepted format ({ACCEPTED_FORMATS_TEXT})"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise _Rejected(
            dl.TOO_MANY_PIXELS, "image exceeds the decoder's decompression-bomb limit"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
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
        meta = parse_meta(raw, limits)
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


@dataclass(frozen=True)
class DecodeOut:
    """Frames ready for the model, and the frames that failed as dead letters."""

    oks: Stream[PreparedFrame]
    errs: Stream[DeadLetter]


@operator
def decode_frames(
    step_id: str,
    up: Stream[RawFrame],
    limits: FrameLimits,
    instrument: Instrument = uninstrumented,
) -> DecodeOut:
    """`prepare_frame` on every frame of `up`: prepared frames, and dead letters."""
    prepared = op.map("prepare", up, instrument(step_id, partial(prepare_frame, limits=limits)))
    split = op.branch("split", prepared, _is_prepared)
    return DecodeOut(split.trues, split.falses)


def _is_prepared(item: object) -> bool:
    return isinstance(item, PreparedFrame)
