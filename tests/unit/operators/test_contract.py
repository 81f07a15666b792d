"""The data contract's value ranges, frame identity and accepted formats, enforced at decode:
values that parse but fall outside the contract become `bad_header` dead letters, identities
cannot collide, and only the contract's image formats are ever decoded."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from operators import contract
from operators import dead_letters as dl
from operators.decode import FrameLimits, prepare_frame
from operators.frames import DeadLetter, FrameBatch, PreparedFrame, RawFrame
from tests.helpers import frame_headers, gradient_rgb, jpeg_bytes, pillow_bytes, raw_frame

LIMITS = FrameLimits(max_bytes=512 * 1024, max_pixels=4_000_000, input_size=(160, 120))
INT64_MAX = 2**63 - 1
Y2000_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
# The frame's ingest time is the decode stage's "now": fixed here, so no test reads a clock.
NOW_MS = 1_700_000_000_000  # 2023-11-14
SKEW_MS = 300_000  # the default margin of 300 s


def at_now(raw: RawFrame, *, timestamp_ms: int | None = NOW_MS) -> RawFrame:
    """`raw` as ingested at NOW_MS, with the given Kafka timestamp."""
    return dataclasses.replace(raw, ingest_ns=NOW_MS * 1_000_000, timestamp_ms=timestamp_ms)


def with_headers(**extra: bytes) -> RawFrame:
    """A good JPEG frame ingested at NOW_MS, with header overrides by name."""
    headers = dict(frame_headers())
    headers[contract.CAPTURE_TIME_MS] = str(NOW_MS).encode()
    headers.update(extra)
    return at_now(raw_frame(jpeg_bytes(64, 48), tuple(headers.items())))


def assert_bad_header(out: PreparedFrame | DeadLetter) -> DeadLetter:
    assert isinstance(out, DeadLetter), "accepted"
    assert out.reason == dl.BAD_HEADER, out.detail
    assert out.stage == "decode"
    return out


# --- streamsight-seq: strictly ASCII digits, 0..2^63-1 -------------------------------


def test_default_limits_allow_five_minutes_of_capture_skew() -> None:
    assert LIMITS.max_capture_skew_s == 300.0


def test_largest_seq_is_accepted() -> None:
    out = prepare_frame(with_headers(**{contract.SEQ: str(INT64_MAX).encode()}), LIMITS)
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert out.meta.seq == INT64_MAX
    assert out.meta.frame_id == f"job-1/cam-0/{INT64_MAX}"


@pytest.mark.parametrize(
    "seq",
    [
        str(2**63).encode(),
        str(2**64).encode(),
        b"9" * 40,
        b"9" * 5000,  # longer than Python parses as an int by default
    ],
    ids=["2^63", "2^64", "40 digits", "5000 digits"],
)
def test_seq_beyond_int64_is_a_bad_header(seq: bytes) -> None:
    out = assert_bad_header(prepare_frame(with_headers(**{contract.SEQ: seq}), LIMITS))
    assert "seq" in out.detail
    assert "999" not in out.detail


@pytest.mark.parametrize(
    "seq",
    [
        b"2_011",
        b" 7 ",
        b"7 ",
        b"+8",
        b"-1",
        b"",
        b"1.0",
        b"1e3",
        b"0x10",
        "\u0663".encode(),  # Arabic-Indic digit three
        "\uff17".encode(),  # fullwidth digit seven
        "\u00b2".encode(),  # superscript two
    ],
    ids=repr,
)
def test_seq_must_be_ascii_digits_only(seq: bytes) -> None:
    assert_bad_header(prepare_frame(with_headers(**{contract.SEQ: seq}), LIMITS))


# --- frame identity: no "/" inside job id or camera ---------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (contract.JOB_ID, b"north-gate/lane-2"),
        (contract.CAMERA, b"north-gate/lane-2"),
        (contract.JOB_ID, b"night-shift/"),
        (contract.CAMERA, b"/dock"),
    ],
    ids=["slash in job id", "slash in camera", "trailing slash", "leading slash"],
)
def test_slash_in_an_identity_part_is_a_bad_header(header: str, value: bytes) -> None:
    out = assert_bad_header(prepare_frame(with_headers(**{header: value}), LIMITS))
    assert "'/'" in out.detail
    for part in value.decode().split("/"):  # the detail names the rule, not the value
        assert not part or part not in out.detail


def test_slash_in_the_key_used_as_camera_is_a_bad_header() -> None:
    headers = tuple((n, v) for n, v in with_headers().headers if n != contract.CAMERA)
    raw = dataclasses.replace(with_headers(), headers=headers, key=b"site-7/cam-2")
    out = assert_bad_header(prepare_frame(raw, LIMITS))
    assert "site-7" not in out.detail


def test_identities_that_used_to_collide_are_both_refused() -> None:
    """Job `a/b` + camera `c` and job `a` + camera `b/c` both joined to `a/b/c/1`."""
    first = with_headers(**{contract.JOB_ID: b"a/b", contract.CAMERA: b"c", contract.SEQ: b"1"})
    second = with_headers(**{contract.JOB_ID: b"a", contract.CAMERA: b"b/c", contract.SEQ: b"1"})
    for raw in (first, second):
        assert_bad_header(prepare_frame(raw, LIMITS))


def test_valid_identity_keeps_its_format() -> None:
    raw = with_headers(
        **{contract.JOB_ID: b"job.7-x", contract.CAMERA: b"cam:3", contract.SEQ: b"42"}
    )
    out = prepare_frame(raw, LIMITS)
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert out.meta.frame_id == "job.7-x/cam:3/42"


# --- capture time: after 2000-01-01, at most max_capture_skew_s in the future -------


@pytest.mark.parametrize(
    "capture_ms",
    [Y2000_MS + 1, NOW_MS - 86_400_000, NOW_MS, NOW_MS + SKEW_MS, f"{NOW_MS}.250"],
    ids=["just after 2000", "a day ago", "now", "at the margin", "fractional"],
)
def test_capture_time_in_range_is_accepted(capture_ms: int | str) -> None:
    out = prepare_frame(
        with_headers(**{contract.CAPTURE_TIME_MS: str(capture_ms).encode()}), LIMITS
    )
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert out.meta.capture_ns == int(float(capture_ms) * 1_000_000)


@pytest.mark.parametrize(
    "capture_ms",
    [
        0,
        1_000,
        Y2000_MS,
        NOW_MS + SKEW_MS + 1,
        NOW_MS * 1000,  # a producer that sends microseconds
        9_223_372_036_855,  # just past what int64 nanoseconds hold
        10**300,
    ],
    ids=[
        "epoch",
        "1970",
        "2000-01-01 exactly",
        "past the margin",
        "microseconds",
        "int64",
        "1e300",
    ],
)
def test_capture_time_out_of_range_is_a_bad_header(capture_ms: int) -> None:
    raw = with_headers(**{contract.CAPTURE_TIME_MS: str(capture_ms).encode()})
    out = assert_bad_header(prepare_frame(raw, LIMITS))
    assert "capture time" in out.detail
    for number in (NOW_MS, capture_ms):  # the detail names the rule, not the values
        assert number < 1000 or str(number)[:4] not in out.detail


def test_capture_skew_is_configurable() -> None:
    strict = dataclasses.replace(LIMITS, max_capture_skew_s=0.0)
    ahead = with_headers(**{contract.CAPTURE_TIME_MS: str(NOW_MS + 1).encode()})
    assert_bad_header(prepare_frame(ahead, strict))
    exact = with_headers(**{contract.CAPTURE_TIME_MS: str(NOW_MS).encode()})
    assert isinstance(prepare_frame(exact, strict), PreparedFrame)
    loose = dataclasses.replace(LIMITS, max_capture_skew_s=3600.0)
    assert isinstance(prepare_frame(ahead, loose), PreparedFrame)


def test_an_unbounded_skew_still_keeps_capture_times_within_int64() -> None:
    unbounded = dataclasses.replace(LIMITS, max_capture_skew_s=float("inf"))
    far = with_headers(**{contract.CAPTURE_TIME_MS: b"9300000000000"})
    assert_bad_header(prepare_frame(far, unbounded))


def without_capture_header(timestamp_ms: int | None) -> RawFrame:
    raw = with_headers()
    headers = tuple((n, v) for n, v in raw.headers if n != contract.CAPTURE_TIME_MS)
    return at_now(dataclasses.replace(raw, headers=headers), timestamp_ms=timestamp_ms)


def test_kafka_timestamp_in_range_is_the_capture_time() -> None:
    out = prepare_frame(without_capture_header(NOW_MS - 5), LIMITS)
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert out.meta.capture_ns == (NOW_MS - 5) * 1_000_000


@pytest.mark.parametrize(
    "timestamp_ms",
    [1_000, Y2000_MS, NOW_MS + SKEW_MS + 1, NOW_MS * 1000],
    ids=["1970", "2000-01-01 exactly", "past the margin", "microseconds"],
)
def test_kafka_timestamp_out_of_range_is_a_bad_header(timestamp_ms: int) -> None:
    out = assert_bad_header(prepare_frame(without_capture_header(timestamp_ms), LIMITS))
    assert "timestamp" in out.detail


def test_no_capture_time_at_all_falls_back_to_ingest_time() -> None:
    out = prepare_frame(without_capture_header(None), LIMITS)
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert out.meta.capture_ns == NOW_MS * 1_000_000


def test_kafka_timestamp_is_not_checked_when_the_header_gives_the_capture_time() -> None:
    out = prepare_frame(at_now(with_headers(), timestamp_ms=1_000), LIMITS)
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert out.meta.capture_ns == NOW_MS * 1_000_000


# --- formats: only the contract's, decoded by an allow-list -------------------------

PILLOW_FORMAT = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/gif": "GIF",
}


def test_every_format_of_the_contract_is_known_here() -> None:
    assert set(contract.ACCEPTED_CONTENT_TYPES) == set(PILLOW_FORMAT)


@pytest.mark.parametrize("content_type", contract.ACCEPTED_CONTENT_TYPES)
def test_every_accepted_content_type_decodes(content_type: str) -> None:
    fmt = PILLOW_FORMAT[content_type]
    data = pillow_bytes("P" if fmt == "GIF" else "RGB", fmt)
    raw = dataclasses.replace(
        with_headers(**{contract.CONTENT_TYPE: content_type.encode()}), value=data
    )
    out = prepare_frame(raw, LIMITS)
    assert isinstance(out, PreparedFrame), getattr(out, "detail", out)
    assert (out.meta.width, out.meta.height) == (64, 48)


def _saved(fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient_rgb(32, 32)).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def eps_bytes() -> bytes:
    """A small EPS (PostScript) image, as Pillow writes it: decoding it needs Ghostscript."""
    return _saved("EPS")


OFF_CONTRACT = {
    "TIFF": lambda: _saved("TIFF"),
    "ICO": lambda: _saved("ICO"),
    "EPS": eps_bytes,
    "PPM": lambda: _saved("PPM"),
    "TGA": lambda: _saved("TGA"),
}


@pytest.mark.parametrize("fmt", sorted(OFF_CONTRACT))
def test_formats_outside_the_contract_are_dead_letters(fmt: str) -> None:
    data = OFF_CONTRACT[fmt]()
    raw = dataclasses.replace(with_headers(), value=data)
    out = prepare_frame(raw, LIMITS)
    assert isinstance(out, DeadLetter), f"{fmt} was decoded"
    assert out.reason == dl.NOT_AN_IMAGE, out.detail
    assert out.payload == data
    assert "JPEG" in out.detail  # the detail names what is accepted


FAKE_GS = """#!/bin/sh
# A fake Ghostscript: it records that it was started, then fails.
echo "$@" > "{marker}"
exit 1
"""

EPS_CHILD = """
import sys
import time
from operators.decode import FrameLimits, prepare_frame
from tests.helpers import raw_frame
out = prepare_frame(
    raw_frame(sys.stdin.buffer.read()),
    FrameLimits(max_bytes=1 << 20, max_pixels=4_000_000, input_size=(160, 120)),
)
print(type(out).__name__, getattr(out, "reason", ""))
"""


def test_an_eps_frame_never_starts_ghostscript(tmp_path: Path) -> None:
    """A fake `gs` first on PATH marks any start; the decode runs in a fresh process so
    Pillow has not yet looked Ghostscript up."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-was-started"
    fake_gs = bin_dir / "gs"
    fake_gs.write_text(FAKE_GS.format(marker=marker))
    fake_gs.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", EPS_CHILD],
        input=eps_bytes(),
        capture_output=True,
        env=env,
        cwd=root,
        timeout=120,
        check=True,
    )
    assert not marker.exists(), "Ghostscript was started for an EPS frame"
    assert done.stdout.decode().split() == ["DeadLetter", dl.NOT_AN_IMAGE]


# --- Pillow's decompression-bomb guard stays on ---------------------------------------


def test_pillow_bomb_guard_is_not_switched_off_for_the_process() -> None:
    import operators.decode  # noqa: F401  (importing the stage must leave the guard alone)

    assert Image.MAX_IMAGE_PIXELS is not None


def test_pillow_bomb_error_becomes_too_many_pixels() -> None:
    """With our limit above Pillow's, Pillow's own guard refuses the image at open: that
    refusal is a dead letter too, never an exception."""
    side = 13_500  # 182 M pixels: more than twice Pillow's default limit of 89 M
    header = _png_header(side, side)
    huge = dataclasses.replace(LIMITS, max_pixels=10**9)
    out = prepare_frame(dataclasses.replace(with_headers(), value=header), huge)
    assert isinstance(out, DeadLetter)
    assert out.reason == dl.TOO_MANY_PIXELS, out.detail


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming `width` x `height` whose pixel data is one empty compressed block."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


# --- the setting reaches the decode stage of the flow -------------------------------


@pytest.mark.parametrize(("skew_s", "stored"), [(300.0, False), (7200.0, True)])
def test_the_skew_setting_is_wired_into_the_flow(skew_s: float, stored: bool) -> None:
    """A frame captured an hour ahead of the flow's clock is a dead letter with the default
    margin and stored with a two-hour one (margins of an hour: no race with the clock)."""
    from bytewax.connectors.kafka import KafkaSourceMessage
    from bytewax.testing import TestingSink, TestingSource, run_main

    from flows.pipeline import build_flow
    from flows.settings import Settings

    ahead_ms = time.time() * 1000 + 3_600_000
    headers = dict(frame_headers(seq=1))
    headers[contract.CAPTURE_TIME_MS] = f"{ahead_ms:.3f}".encode()
    item = KafkaSourceMessage(
        key=b"cam-0",
        value=jpeg_bytes(64, 48),
        topic="frames",
        headers=list(headers.items()),
        offset=0,
        partition=0,
        timestamp=(1, NOW_MS),
    )
    batches: list[FrameBatch] = []

    def infer(batch: FrameBatch) -> list:
        batches.append(batch)
        return []

    letters: list[DeadLetter] = []
    flow = build_flow(
        Settings(max_capture_skew_s=skew_s, batch_max_size=1),
        source=TestingSource([item]),
        infer=infer,
        input_size=(64, 48),
        results=TestingSink([]),
        dead_letters=TestingSink(letters),
    )
    run_main(flow)
    if stored:
        assert letters == [] and len(batches) == 1
    else:
        assert [(d.reason, d.offset) for d in letters] == [(dl.BAD_HEADER, 0)]
        assert batches == []
