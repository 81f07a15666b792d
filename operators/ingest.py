"""Ingest: Bytewax's KafkaSource, its messages as `RawFrame`s and its errors as dead letters
(`ingest_frames`, the stage's operator).

`FrameKafkaSource` can stop each partition at an end offset that becomes known while the
flow runs (the demo camera publishes concurrently and reports where it stopped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream, operator
from bytewax.inputs import FixedPartitionedSource, Source, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING

from operators import dead_letters as dl
from operators import stages
from operators.frames import DeadLetter, RawFrame
from operators.kafka_io import librdkafka_logger
from operators.stages import Instrument, uninstrumented

STAGE = stages.INGEST
# librdkafka waits up to 500 ms for a fetch to fill by default: too long for live video.
FETCH_WAIT_MAX_MS = 20
# Each partition's consumer prefetches up to this much (librdkafka's default is 64 MiB per
# partition: a large backlog would fill memory with frames waiting to be decoded).
PREFETCH_MAX_KBYTES = 4096

EndOffsets = Callable[[], Mapping[tuple[str, int], int] | None]
KafkaItem = KafkaSourceMessage[bytes | None, bytes | None] | KafkaError[bytes | None, bytes | None]
"""What Bytewax's KafkaSource emits with `raise_on_errors=False`."""


def to_raw_frame(msg: KafkaSourceMessage) -> RawFrame:
    """A Bytewax Kafka message as a `RawFrame` stamped with the ingest time."""
    timestamp = msg.timestamp[1] if msg.timestamp and msg.timestamp[0] != 0 else None
    return RawFrame(
        topic=msg.topic or "",
        partition=msg.partition if msg.partition is not None else -1,
        offset=msg.offset if msg.offset is not None else -1,
        key=msg.key,
        value=msg.value,
        headers=tuple((name, value or b"") for name, value in (msg.headers or ())),
        timestamp_ms=timestamp,
        ingest_ns=time.time_ns(),
    )


def error_to_dead_letter(err: KafkaError) -> DeadLetter:
    """A consume error from the source as a dead letter (the message it came with, if any)."""
    raw = to_raw_frame(err.msg)
    code = err.err.name() if hasattr(err.err, "name") else "unknown"
    return dl.reject(raw, stage=STAGE, reason=dl.KAFKA_ERROR, detail=f"consume error {code}")


class _BoundedPartition(StatefulSourcePartition[Any, int | None]):
    """Delegates to a Kafka partition reader; ends once it reaches its end offset."""

    def __init__(
        self, inner: StatefulSourcePartition, topic: str, partition: int, ends: EndOffsets
    ) -> None:
        self._inner = inner
        self._tp = (topic, partition)
        self._ends = ends

    def next_batch(self) -> list[Any]:
        ends = self._ends()
        if ends is not None:
            end = ends.get(self._tp, 0)
            position = self._inner.snapshot()
            if end <= 0 or (position is not None and position >= end):
                raise StopIteration()
        return self._inner.next_batch()

    def next_awake(self) -> datetime | None:
        return self._inner.next_awake()

    def snapshot(self) -> int | None:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class FrameKafkaSource(FixedPartitionedSource[KafkaItem, int | None]):
    """A Kafka source whose partitions stop at end offsets that become known while the
    flow runs: each stops once it reaches `end_offsets()[(topic, partition)]` (as soon as
    that mapping is known; until then it tails).

    It wraps Bytewax's `KafkaSource` through the public source API only (`list_parts`,
    `build_part`): Bytewax workers share one source object across threads.
    """

    def __init__(self, kafka: KafkaSource, end_offsets: EndOffsets) -> None:
        self.kafka = kafka
        self.end_offsets = end_offsets

    def list_parts(self) -> list[str]:
        return self.kafka.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> StatefulSourcePartition[KafkaItem, int | None]:
        inner = self.kafka.build_part(step_id, for_part, resume_state)
        idx, topic = for_part.split("-", 1)
        return _BoundedPartition(inner, topic, int(idx), self.end_offsets)


def frame_source(
    bootstrap: str,
    topic: str,
    *,
    client_config: dict[str, Any],
    batch_size: int,
    tail: bool,
    end_offsets: EndOffsets | None = None,
) -> FixedPartitionedSource[KafkaItem, int | None]:
    """The Kafka source of frames: tailing, stopping at the topic end, or bounded."""
    kafka = KafkaSource(
        bootstrap.split(","),
        [topic],
        tail=tail or end_offsets is not None,
        starting_offset=OFFSET_BEGINNING,
        # KafkaSource gives these to its partition consumers and to the admin client that
        # lists the partitions, which ignores the consumer properties (librdkafka queues a
        # CONFWARN line for `queued.max.messages.kbytes`, which it serves only on a poll
        # of that client, and Bytewax never polls it).
        add_config={
            **{k: v for k, v in client_config.items() if k != "bootstrap.servers"},
            "logger": librdkafka_logger,
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
            "queued.max.messages.kbytes": PREFETCH_MAX_KBYTES,
        },
        batch_size=batch_size,
        raise_on_errors=False,
    )
    return kafka if end_offsets is None else FrameKafkaSource(kafka, end_offsets)


def receive(item: KafkaSourceMessage | KafkaError) -> RawFrame | DeadLetter:
    """An item of the Kafka source: a message as a `RawFrame`, a consume error as a dead
    letter."""
    if isinstance(item, KafkaSourceMessage):
        return to_raw_frame(item)
    return error_to_dead_letter(item)


@dataclass(frozen=True)
class IngestOut:
    """The frames read, and the source's consume errors as dead letters."""

    oks: Stream[RawFrame]
    errs: Stream[DeadLetter]


@operator
def ingest_frames(
    step_id: str,
    flow: Dataflow,
    source: Source[Any],
    instrument: Instrument = uninstrumented,
) -> IngestOut:
    """Read `source` (a Kafka source whose errors come as items, `raise_on_errors=False`):
    its messages as `RawFrame`s stamped with the ingest time, its errors as dead letters."""
    items = op.input("read", flow, source)
    received = op.map("receive", items, instrument(step_id, receive))
    split = op.branch("split", received, _is_raw)
    return IngestOut(split.trues, split.falses)


def _is_raw(item: object) -> bool:
    return isinstance(item, RawFrame)
