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
from collections.abc import Callable, Sequence
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from operators import contract
from operators import dead_letters as dl
from operators.frames import DeadLetter, FrameResult
from operators.kafka_io import CheckedProducer
from operators.stores import DetectionStore, open_store, result_to_json

STAGE = "sink"
# Brokers reject messages over their message.max.bytes (1 MB by default on Kafka).
MAX_DEAD_LETTER_PAYLOAD = 1_000_000 - 64 * 1024

ResultsObserver = Callable[[Sequence[FrameResult], int, int], None]
LettersObserver = Callable[[Sequence[DeadLetter]], None]


def conflict_letter(result: FrameResult, stored_sha: str) -> DeadLetter:
    """A frame whose identity was already stored with other content."""
    meta = result.meta
    return DeadLetter(
        stage=STAGE,
        reason=dl.DUPLICATE_FRAME_CONFLICT,
        detail=f"frame identity already stored with content {stored_sha[:12]}, "
        f"this one is {meta.content_sha256[:12]}",
        topic=meta.topic,
        partition=meta.partition,
        offset=meta.offset,
        key=meta.camera.encode(),
        headers=tuple((k, v.encode()) for k, v in meta.trace_carrier.items()),
        payload=None,
        frame_id=meta.frame_id,
        job_id=meta.job_id,
        trace_carrier=dict(meta.trace_carrier),
    )


def split_new(
    results: Sequence[FrameResult], stored: dict[str, str]
) -> tuple[list[FrameResult], int, list[DeadLetter]]:
    """Split a write batch into (new results, duplicates, conflicts as dead letters)."""
    seen = dict(stored)
    new: list[FrameResult] = []
    duplicates = 0
    conflicts: list[DeadLetter] = []
    for result in results:
        frame_id, sha = result.meta.frame_id, result.meta.content_sha256
        known = seen.get(frame_id)
        if known is None:
            seen[frame_id] = sha
            new.append(result)
        elif known == sha:
            duplicates += 1
        else:
            conflicts.append(conflict_letter(result, known))
    return new, duplicates, conflicts


def _result_headers(result: FrameResult) -> list[tuple[str, bytes]]:
    meta = result.meta
    headers = [
        (contract.JOB_ID, meta.job_id.encode()),
        (contract.CAMERA, meta.camera.encode()),
        (contract.CONTENT_TYPE, b"application/json"),
    ]
    if meta.seq is not None:
        headers.append((contract.SEQ, str(meta.seq).encode()))
    headers += [(k, v.encode()) for k, v in meta.trace_carrier.items()]
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
    ) -> None:
        self.store = store
        self.producer = producer
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.on_results = on_results
        self.on_letters = on_letters

    def write_batch(self, items: list[FrameResult]) -> None:
        stored = self.store.stored_hashes([r.meta.frame_id for r in items])
        new, duplicates, conflicts = split_new(items, stored)
        if self.producer is not None:
            for result in new:
                self.producer.produce(
                    self.output_topic,
                    json.dumps(result_to_json(result)).encode(),
                    key=result.meta.frame_id.encode(),
                    headers=_result_headers(result),
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
    ) -> None:
        self.store = store
        self.producer = producer
        self.topic = topic
        self.on_letters = on_letters

    def write_batch(self, items: list[DeadLetter]) -> None:
        if self.producer is not None:
            publish_dead_letters(self.producer, self.topic, items)
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
    ) -> None:
        self.store_url = store_url
        self.producer_config = producer_config
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.publish = publish
        self.on_results = on_results
        self.on_letters = on_letters

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ResultPartition:
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
    ) -> None:
        self.store_url = store_url
        self.producer_config = producer_config
        self.topic = topic
        self.on_letters = on_letters

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        producer = None
        if self.producer_config is not None:
            producer = CheckedProducer(dict(self.producer_config))
        return _DeadLetterPartition(
            open_store(self.store_url), producer, self.topic, self.on_letters
        )
