"""Dead letters: bad input turned into data, with the stage, the reason and the source.

Every reason is one of `REASONS` (a bounded set, safe as a metric label); `detail` is a
short human sentence that never holds payload bytes or secrets.
"""

from __future__ import annotations

from operators import contract
from operators.frames import DeadLetter, FrameMeta, RawFrame

EMPTY = "empty"
TOO_LARGE = "too_large"
BAD_HEADER = "bad_header"
UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"
UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"
DUPLICATE_FRAME_CONFLICT = "duplicate_frame_conflict"
KAFKA_ERROR = "kafka_error"
SINK_REJECTED = "sink_rejected"
INTERNAL_ERROR = "internal_error"
STALE = "stale"

REASONS = (
    EMPTY,
    TOO_LARGE,
    BAD_HEADER,
    UNSUPPORTED_CONTENT_TYPE,
    NOT_AN_IMAGE,
    CORRUPT_IMAGE,
    TOO_MANY_PIXELS,
    UNSUPPORTED_IMAGE_MODE,
    DUPLICATE_FRAME_CONFLICT,
    KAFKA_ERROR,
    SINK_REJECTED,
    INTERNAL_ERROR,
    STALE,
)

MAX_DETAIL = 300


def reject(
    raw: RawFrame,
    *,
    stage: str,
    reason: str,
    detail: str,
    frame_id: str | None = None,
    job_id: str | None = None,
    trace_carrier: dict[str, str] | None = None,
) -> DeadLetter:
    """Turn a raw frame that failed `stage` into a dead letter holding its original bytes."""
    if reason not in REASONS:
        raise ValueError(f"unknown dead-letter reason {reason!r}")
    return DeadLetter(
        stage=stage,
        reason=reason,
        detail=detail[:MAX_DETAIL],
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=raw.key,
        headers=raw.headers,
        payload=raw.value,
        frame_id=frame_id,
        job_id=job_id,
        trace_carrier=dict(trace_carrier or {}),
    )


def reject_decoded(meta: FrameMeta, *, stage: str, reason: str, detail: str) -> DeadLetter:
    """A dead letter for a frame already decoded, whose original bytes are no longer at
    hand: it carries the frame's identity, source coordinates and trace context, and the
    original message stays readable at those coordinates."""
    source = RawFrame(
        topic=meta.topic,
        partition=meta.partition,
        offset=meta.offset,
        key=meta.camera.encode(),
        value=None,
        headers=tuple((k, v.encode()) for k, v in meta.trace_carrier.items()),
        timestamp_ms=None,
        ingest_ns=meta.ingest_ns,
    )
    return reject(
        source,
        stage=stage,
        reason=reason,
        detail=detail,
        frame_id=meta.frame_id,
        job_id=meta.job_id,
        trace_carrier=meta.trace_carrier,
    )


def dead_letter_headers(
    letter: DeadLetter, *, payload_omitted: str | None
) -> list[tuple[str, bytes]]:
    """Headers of the dead-letter message: the frame's own headers plus where and why."""
    headers = [(n, v) for n, v in letter.headers if not n.startswith("streamsight-dlq-")]
    headers += [
        (contract.DLQ_STAGE, letter.stage.encode()),
        (contract.DLQ_REASON, letter.reason.encode()),
        (contract.DLQ_DETAIL, letter.detail.encode()),
        (contract.DLQ_TOPIC, letter.topic.encode()),
        (contract.DLQ_PARTITION, str(letter.partition).encode()),
        (contract.DLQ_OFFSET, str(letter.offset).encode()),
    ]
    if payload_omitted:
        headers.append((contract.DLQ_PAYLOAD_OMITTED, payload_omitted.encode()))
    return headers


def dead_letter_message(
    letter: DeadLetter, *, max_payload_bytes: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The (key, value, headers) to publish for `letter`.

    The value is the original payload; a payload larger than `max_payload_bytes` is left
    out (the headers say so, and the source coordinates still point at it).
    """
    payload = letter.payload
    omitted = None
    if payload is not None and len(payload) > max_payload_bytes:
        payload, omitted = None, f"payload of {len(letter.payload or b'')} bytes exceeds the limit"
    if letter.payload is None and letter.stage != "decode" and letter.stage != "ingest":
        omitted = "read the original at the source coordinates"
    return letter.key, payload, dead_letter_headers(letter, payload_omitted=omitted)
