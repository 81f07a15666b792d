"""Sinks: detections and dead letters, idempotent by frame identity, never by batch.

For each write batch the result sink
1. drops frames already stored with the same content (replays after a restart),
2. turns a frame whose identity is stored with DIFFERENT content into a dead letter,
3. publishes the new frames' detections to the output topic and waits for every
   delivery report (a failed delivery raises: the worker restarts from its last
   snapshot rather than lose data),
4. then commits them to the database in one transaction.
A row in the database therefore implies its message was delivered; after a crash the
topic may see a frame twice (same key), the database never does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any, Protocol

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from operators import contract
from operators import dead_letters as dl
from operators.frames import DeadLetter, FrameResult
from operators.kafka_io import CheckedProducer
from operators.stores import DetectionStore, open_store, result_to_json
from operators.workers import note_worker

STAGE = "sink"
# Brokers reject messages over their message.max.bytes (1 MB by default on Kafka).
MAX_DEAD_LETTER_PAYLOAD = 1_000_000 - 64 * 1024

ResultsObserver = Callable[[Sequence[FrameResult], int, int], None]
LettersObserver = Callable[[Sequence[DeadLetter]], None]

WRITTEN = "written"
DUPLICATE = "duplicate"
CONFLICT = "conflict"


class WriteTrace(Protocol):
    """What a sink tells its tracing hook about the items of one write batch."""

    def carrier(self, item: object) -> Mapping[str, str]:
        """Trace headers for the item's outgoing message (empty: keep its own)."""
        ...

    def skipped(self, item: object) -> None:
        """The item was already stored."""
        ...

    def failed(self, item: object, reason: str, detail: str) -> None:
        """The item became a dead letter."""
        ...


TraceWrites = Callable[[Sequence[Any]], AbstractContextManager[WriteTrace]]
"""Optional hook around each write batch (e.g. `operators.tracing.write_tracer`)."""


class _NoTrace:
    def carrier(self, item: object) -> Mapping[str, str]:
        return {}

    def skipped(self, item: object) -> None:
        return None

    def failed(self, item: object, reason: str, detail: str) -> None:
        return None


@contextmanager
def no_trace(items: Sequence[Any]) -> Iterator[WriteTrace]:
    """The default hook: traces nothing."""
    yield _NoTrace()


def with_carrier(
    headers: Sequence[tuple[str, bytes]], carrier: Mapping[str, str]
) -> list[tuple[str, bytes]]:
    """`headers` with the trace headers replaced by `carrier` (unchanged if it is empty)."""
    if not carrier:
        return list(headers)
    kept = [(n, v) for n, v in headers if n not in contract.TRACE_HEADERS]
    return kept + [(n, v.encode()) for n, v in carrier.items()]


def conflict_letter(result: FrameResult, stored_sha: str) -> DeadLetter:
    """A frame whose identity was already stored with other content."""
    return dl.reject_decoded(
        result.meta,
        stage=STAGE,
        reason=dl.DUPLICATE_FRAME_CONFLICT,
        detail=f"frame identity already stored with content {stored_sha[:12]}, "
        f"this one is {result.meta.content_sha256[:12]}",
    )


def classify(
    results: Sequence[FrameResult], stored: dict[str, str]
) -> list[tuple[FrameResult, str, str]]:
    """Each result with its outcome (`written`, `duplicate` or `conflict`) and the content
    hash its identity is known by."""
    seen = dict(stored)
    out: list[tuple[FrameResult, str, str]] = []
    for result in results:
        frame_id, sha = result.meta.frame_id, result.meta.content_sha256
        known = seen.get(frame_id)
        if known is None:
            seen[frame_id] = sha
            out.append((result, WRITTEN, sha))
        elif known == sha:
            out.append((result, DUPLICATE, sha))
        else:
            out.append((result, CONFLICT, known))
    return out


def split_new(
    results: Sequence[FrameResult], stored: dict[str, str]
) -> tuple[list[FrameResult], int, list[DeadLetter]]:
    """Split a write batch into (new results, duplicates, conflicts as dead letters)."""
    outcomes = classify(results, stored)
    new = [result for result, outcome, _ in outcomes if outcome == WRITTEN]
    duplicates = sum(1 for _, outcome, _ in outcomes if outcome == DUPLICATE)
    conflicts = [conflict_letter(r, known) for r, outcome, known in outcomes if outcome == CONFLICT]
    return new, duplicates, conflicts


def _result_headers(
    result: FrameResult, carrier: Mapping[str, str] | None = None
) -> list[tuple[str, bytes]]:
    meta = result.meta
    headers = [
        (contract.JOB_ID, meta.job_id.encode()),
        (contract.CAMERA, meta.camera.encode()),
        (contract.CONTENT_TYPE, b"application/json"),
    ]
    if meta.seq is not None:
        headers.append((contract.SEQ, str(meta.seq).encode()))
    headers += [(k, v.encode()) for k, v in (carrier or meta.trace_carrier).items()]
    return headers


def publish_dead_letters(
    producer: CheckedProducer, topic: str, letters: Sequence[DeadLetter]
) -> None:
    """Queue dead letters on `topic` (the caller checks delivery)."""
    for letter in letters:
        key, value, headers = dl.dead_letter_message(
            letter, max_payload_bytes=MAX_DEAD_LETTER_PAYLOAD
        )
        producer.produce(topic, value, key=key, headers=headers)


class _ResultPartition(StatelessSinkPartition[FrameResult]):
    def __init__(
        self,
        store: DetectionStore,
        producer: CheckedProducer | None,
        output_topic: str,
        dead_letter_topic: str,
        on_results: ResultsObserver | None,
        on_letters: LettersObserver | None,
        trace_writes: TraceWrites = no_trace,
    ) -> None:
        self.store = store
        self.producer = producer
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.on_results = on_results
        self.on_letters = on_letters
        self.trace_writes = trace_writes

    def write_batch(self, items: list[FrameResult]) -> None:
        with self.trace_writes(items) as trace:
            self._write(items, trace)

    def _write(self, items: list[FrameResult], trace: WriteTrace) -> None:
        stored = self.store.stored_hashes([r.meta.frame_id for r in items])
        new: list[FrameResult] = []
        duplicates = 0
        conflicts: list[DeadLetter] = []
        for result, outcome, known in classify(items, stored):
            if outcome == WRITTEN:
                new.append(result)
            elif outcome == DUPLICATE:
                duplicates += 1
                trace.skipped(result)
            else:
                letter = conflict_letter(result, known)
                trace.failed(result, letter.reason, letter.detail)
                conflicts.append(
                    replace(
                        letter, headers=tuple(with_carrier(letter.headers, trace.carrier(result)))
                    )
                )
        if self.producer is not None:
            for result in new:
                self.producer.produce(
                    self.output_topic,
                    json.dumps(result_to_json(result)).encode(),
                    key=result.meta.frame_id.encode(),
                    headers=_result_headers(result, trace.carrier(result)),
                )
            publish_dead_letters(self.producer, self.dead_letter_topic, conflicts)
            self.producer.flush_and_check()
        written_ns = time.time_ns()
        if conflicts:
            self.store.write_dead_letters(conflicts, written_ns)
        outcome = self.store.write_results(new, written_ns)
        if self.on_results is not None:
            self.on_results(new, duplicates + outcome.duplicates, written_ns)
        if conflicts and self.on_letters is not None:
            self.on_letters(conflicts)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush_and_check()
            self.producer.close()
        self.store.close()


class _DeadLetterPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(
        self,
        store: DetectionStore,
        producer: CheckedProducer | None,
        topic: str,
        on_letters: LettersObserver | None,
        trace_writes: TraceWrites = no_trace,
    ) -> None:
        self.store = store
        self.producer = producer
        self.topic = topic
        self.on_letters = on_letters
        self.trace_writes = trace_writes

    def write_batch(self, items: list[DeadLetter]) -> None:
        with self.trace_writes(items) as trace:
            if self.producer is not None:
                outgoing = [
                    replace(
                        letter, headers=tuple(with_carrier(letter.headers, trace.carrier(letter)))
                    )
                    for letter in items
                ]
                publish_dead_letters(self.producer, self.topic, outgoing)
                self.producer.flush_and_check()
            self.store.write_dead_letters(items, time.time_ns())
        if self.on_letters is not None:
            self.on_letters(items)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        self.store.close()


class ResultSink(DynamicSink[FrameResult]):
    """Writes each frame's detections once: to the output topic, then to the database."""

    def __init__(
        self,
        store_url: str,
        producer_config: dict[str, Any] | None,
        *,
        output_topic: str,
        dead_letter_topic: str,
        publish: bool = True,
        on_results: ResultsObserver | None = None,
        on_letters: LettersObserver | None = None,
        trace_writes: TraceWrites | None = None,
    ) -> None:
        self.store_url = store_url
        self.producer_config = producer_config
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.publish = publish
        self.on_results = on_results
        self.on_letters = on_letters
        self.trace_writes = trace_writes or no_trace

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ResultPartition:
        note_worker(worker_index, worker_count)
        producer = None
        if self.publish and self.producer_config is not None:
            producer = CheckedProducer(dict(self.producer_config))
        return _ResultPartition(
            open_store(self.store_url),
            producer,
            self.output_topic,
            self.dead_letter_topic,
            self.on_results,
            self.on_letters,
            self.trace_writes,
        )


class DeadLetterSink(DynamicSink[DeadLetter]):
    """Publishes dead letters (original bytes and reason) and records them in the database."""

    def __init__(
        self,
        store_url: str,
        producer_config: dict[str, Any] | None,
        *,
        topic: str,
        on_letters: LettersObserver | None = None,
        trace_writes: TraceWrites | None = None,
    ) -> None:
        self.store_url = store_url
        self.producer_config = producer_config
        self.topic = topic
        self.on_letters = on_letters
        self.trace_writes = trace_writes or no_trace

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        note_worker(worker_index, worker_count)
        producer = None
        if self.producer_config is not None:
            producer = CheckedProducer(dict(self.producer_config))
        return _DeadLetterPartition(
            open_store(self.store_url), producer, self.topic, self.on_letters, self.trace_writes
        )
