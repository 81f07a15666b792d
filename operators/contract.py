"""The Kafka message contract: header names shared by producers and the dataflow."""

from __future__ import annotations

JOB_ID = "streamsight-job-id"
CAMERA = "streamsight-camera"
SEQ = "streamsight-seq"
CAPTURE_TIME_MS = "streamsight-capture-time-ms"
CONTENT_TYPE = "content-type"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE, BAGGAGE)

JPEG = "image/jpeg"
# The image formats of the contract: content type -> Pillow's format name. Nothing else is
# decoded (Pillow is given this allow-list), so e.g. TIFF, ICO or EPS become dead letters.
IMAGE_FORMATS = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/gif": "GIF",
}
ACCEPTED_CONTENT_TYPES = tuple(IMAGE_FORMATS)
PILLOW_FORMATS = tuple(IMAGE_FORMATS.values())

# Dead-letter records carry the frame's own headers plus these.
DLQ_STAGE = "streamsight-dlq-stage"
DLQ_REASON = "streamsight-dlq-reason"
DLQ_DETAIL = "streamsight-dlq-detail"
DLQ_TOPIC = "streamsight-dlq-topic"
DLQ_PARTITION = "streamsight-dlq-partition"
DLQ_OFFSET = "streamsight-dlq-offset"
DLQ_PAYLOAD_OMITTED = "streamsight-dlq-payload-omitted"

DEFAULT_JOB_ID = "unassigned"
MAX_ID_LENGTH = 128
# "/" joins job id, camera and seq into the frame identity, so it may not occur inside them.
ID_SEPARATOR = "/"
# Value ranges: what the 64-bit columns of the sinks hold, and what a capture time can be.
MAX_SEQ = 2**63 - 1
MIN_CAPTURE_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z, exclusive
MAX_CAPTURE_NS = 2**63 - 1  # capture times are stored as int64 nanoseconds


def frame_headers(
    *,
    job_id: str,
    camera: str,
    seq: int,
    capture_time_ms: float,
    content_type: str = JPEG,
    trace_headers: dict[str, str] | None = None,
) -> list[tuple[str, bytes]]:
    """Build the headers a producer attaches to one frame message."""
    headers = [
        (JOB_ID, job_id.encode()),
        (CAMERA, camera.encode()),
        (SEQ, str(seq).encode()),
        (CAPTURE_TIME_MS, f"{capture_time_ms:.3f}".encode()),
        (CONTENT_TYPE, content_type.encode()),
    ]
    for name, value in (trace_headers or {}).items():
        headers.append((name, value.encode()))
    return headers
