"""The records that flow between stages: raw Kafka frames, prepared frames, batches,
per-frame results and dead letters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the span export process loads these records without numpy
    import numpy as np


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One Kafka message as ingested: its coordinates, key, headers and payload."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None
    ingest_ns: int


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """What is known of a frame once its headers are validated.

    `frame_id` is the frame's identity for the idempotent sink: `job/camera/seq` when the
    producer sent a sequence number, else `kafka/topic/partition/offset`.
    """

    frame_id: str
    job_id: str
    camera: str
    seq: int | None
    topic: str
    partition: int
    offset: int
    capture_ns: int
    ingest_ns: int
    content_sha256: str
    width: int = 0
    height: int = 0
    trace_carrier: Mapping[str, str] = field(default_factory=dict)
    """W3C trace headers that continue the frame's trace (from its Kafka headers, or, with
    tracing, its ingest span's): set when the record is made, never changed after."""


@dataclass(frozen=True, slots=True)
class PreparedFrame:
    """A decoded frame resized to the model's input: `pixels` is uint8, H x W x 3, RGB."""

    meta: FrameMeta
    pixels: np.ndarray
    prepared_ns: int


@dataclass(frozen=True, slots=True)
class FrameBatch:
    """Frames of one stream key dispatched together to one forward pass."""

    key: str
    frames: tuple[PreparedFrame, ...]
    flush_reason: str
    opened_ns: int
    dispatched_ns: int
    batch_id: str = ""


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in original image pixels."""

    box: tuple[float, float, float, float]
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class FrameResult:
    """The detections of one frame, with the model and batch that produced them."""

    meta: FrameMeta
    detections: tuple[Detection, ...]
    model_name: str
    model_version: str
    device: str
    batch_size: int
    batch_flush_reason: str
    batch_dispatched_ns: int
    inferred_ns: int
    batch_id: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be processed, with why and where it came from.

    `payload` holds the original bytes (None when the message had none).
    """

    stage: str
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    payload: bytes | None
    frame_id: str | None = None
    job_id: str | None = None
    trace_carrier: Mapping[str, str] = field(default_factory=dict)
    """W3C trace headers that continue the record's trace; set when it is made."""
