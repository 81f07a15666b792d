"""Decode, validate and preprocess: good frames of every colour mode, and each kind of bad
input ending as its documented dead-letter reason."""

from __future__ import annotations

import numpy as np
import pytest

from operators import contract
from operators import dead_letters as dl
from operators.decode import FrameLimits, prepare_frame
from operators.frames import DeadLetter, PreparedFrame
from tests.helpers import (
    frame_headers,
    jpeg_bytes,
    jpeg_with_dimensions,
    pillow_bytes,
    png16_bytes,
    raw_frame,
)

LIMITS = FrameLimits(max_bytes=512 * 1024, max_pixels=4_000_000, input_size=(160, 120))


def test_jpeg_is_decoded_and_resized_to_the_model_input() -> None:
    raw = raw_frame(jpeg_bytes(320, 240))
    out = prepare_frame(raw, LIMITS)
    assert isinstance(out, PreparedFrame)
    assert out.pixels.shape == (120, 160, 3)
    assert out.pixels.dtype == np.uint8
    assert (out.meta.width, out.meta.height) == (320, 240)
    assert out.meta.frame_id == "job-1/cam-0/0"
    assert out.meta.job_id == "job-1"
    # The gradient survives: red grows left to right, green top to bottom.
    assert out.pixels[60, 150, 0] > out.pixels[60, 10, 0] + 150
    assert out.pixels[110, 80, 1] > out.pixels[10, 80, 1] + 150


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("P", "GIF"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
    ],
)
def test_other_colour_modes_and_formats_become_rgb(mode: str, fmt: str) -> None:
    out = prepare_frame(raw_frame(pillow_bytes(mode, fmt)), LIMITS)
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert out.pixels.shape == (120, 160, 3)
    assert (out.meta.width, out.meta.height) == (64, 48)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits() -> None:
    out = prepare_frame(raw_frame(png16_bytes()), LIMITS)
    assert isinstance(out, PreparedFrame)
    assert out.pixels.max() > 200


def test_missing_headers_fall_back_to_kafka_identity() -> None:
    out = prepare_frame(raw_frame(jpeg_bytes(), headers=(), offset=17, partition=2), LIMITS)
    assert isinstance(out, PreparedFrame)
    assert out.meta.frame_id == "kafka/frames/2/17"
    assert out.meta.job_id == contract.DEFAULT_JOB_ID
    assert out.meta.camera == "cam-0"  # from the message key
    assert out.meta.seq is None


def test_trace_headers_are_carried_in_the_item() -> None:
    parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    out = prepare_frame(raw_frame(jpeg_bytes(), frame_headers(traceparent=parent)), LIMITS)
    assert isinstance(out, PreparedFrame)
    assert out.meta.trace_carrier == {"traceparent": parent.decode()}


def _truncated() -> bytes:
    data = jpeg_bytes()
    return data[: len(data) // 2]


def _corrupt_scan() -> bytes:
    data = bytearray(jpeg_bytes())
    start = data.find(b"\xff\xda") + 20
    data[start : start + 400] = bytes(range(200)) * 2
    return bytes(data)


BAD_INPUTS = [
    ("empty", lambda: raw_frame(b""), dl.EMPTY),
    ("no value", lambda: raw_frame(None), dl.EMPTY),
    ("oversize", lambda: raw_frame(b"\xff\xd8\xff" + b"0" * 600_000), dl.TOO_LARGE),
    ("truncated jpeg", lambda: raw_frame(_truncated()), dl.CORRUPT_IMAGE),
    ("corrupt jpeg scan", lambda: raw_frame(_corrupt_scan()), dl.CORRUPT_IMAGE),
    ("not an image", lambda: raw_frame(b"hello, this is plain text"), dl.NOT_AN_IMAGE),
    ("random bytes", lambda: raw_frame(np.random.default_rng(1).bytes(5000)), dl.NOT_AN_IMAGE),
    ("jpeg bomb", lambda: raw_frame(jpeg_with_dimensions(60000, 60000)), dl.TOO_MANY_PIXELS),
    (
        "png header only",
        lambda: raw_frame(pillow_bytes("RGB", "PNG")[:60]),
        dl.CORRUPT_IMAGE,
    ),
    (
        "garbage seq",
        lambda: raw_frame(jpeg_bytes(), frame_headers(**{contract.SEQ: b"abc"})),
        dl.BAD_HEADER,
    ),
    (
        "negative seq",
        lambda: raw_frame(jpeg_bytes(), frame_headers(**{contract.SEQ: b"-4"})),
        dl.BAD_HEADER,
    ),
    (
        "job id not utf-8",
        lambda: raw_frame(jpeg_bytes(), frame_headers(**{contract.JOB_ID: b"\xff\xfe"})),
        dl.BAD_HEADER,
    ),
    (
        "job id with control characters",
        lambda: raw_frame(jpeg_bytes(), frame_headers(**{contract.JOB_ID: b"a\nb"})),
        dl.BAD_HEADER,
    ),
    (
        "job id too long",
        lambda: raw_frame(jpeg_bytes(), frame_headers(**{contract.JOB_ID: b"j" * 500})),
        dl.BAD_HEADER,
    ),
    (
        "capture time not a number",
        lambda: raw_frame(jpeg_bytes(), frame_headers(**{contract.CAPTURE_TIME_MS: b"NaN"})),
        dl.BAD_HEADER,
    ),
    (
        "wrong content type",
        lambda: raw_frame(jpeg_bytes(), frame_headers(**{contract.CONTENT_TYPE: b"text/plain"})),
        dl.UNSUPPORTED_CONTENT_TYPE,
    ),
]


@pytest.mark.parametrize(("name", "make", "reason"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_becomes_a_dead_letter(name: str, make, reason: str) -> None:
    raw = make()
    out = prepare_frame(raw, LIMITS)
    assert isinstance(out, DeadLetter), f"{name} was accepted"
    assert out.reason == reason, out.detail
    assert out.stage == "decode"
    assert (out.topic, out.partition, out.offset) == (raw.topic, raw.partition, raw.offset)
    assert out.payload == raw.value  # the original bytes travel with the dead letter
    assert out.detail and len(out.detail) <= dl.MAX_DETAIL
    assert "\\x" not in out.detail  # no payload bytes in the reason


def test_pixel_limit_applies_to_pillow_formats_too() -> None:
    tight = FrameLimits(max_bytes=LIMITS.max_bytes, max_pixels=1000, input_size=(160, 120))
    out = prepare_frame(raw_frame(pillow_bytes("RGB", "PNG")), tight)
    assert isinstance(out, DeadLetter)
    assert out.reason == dl.TOO_MANY_PIXELS


def test_dead_letter_message_keeps_source_and_reason() -> None:
    out = prepare_frame(raw_frame(b"not an image", offset=9), LIMITS)
    assert isinstance(out, DeadLetter)
    key, value, headers = dl.dead_letter_message(out, max_payload_bytes=1000)
    names = dict(headers)
    assert value == b"not an image"
    assert key == b"cam-0"
    assert names[contract.DLQ_REASON] == dl.NOT_AN_IMAGE.encode()
    assert names[contract.DLQ_STAGE] == b"decode"
    assert names[contract.DLQ_OFFSET] == b"9"
    assert names[contract.JOB_ID] == b"job-1"  # the frame's own headers are kept


def test_dead_letter_message_omits_payload_over_the_limit() -> None:
    out = prepare_frame(raw_frame(b"x" * 5000), LIMITS)
    assert isinstance(out, DeadLetter)
    _, value, headers = dl.dead_letter_message(out, max_payload_bytes=1000)
    assert value is None
    assert contract.DLQ_PAYLOAD_OMITTED in dict(headers)
