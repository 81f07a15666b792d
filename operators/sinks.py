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

No record can stop the flow at the sink: when the database refuses a write because of
its rows (a value out of a column's range, say), the batch is split in halves down to the
single rows it refuses, the rest is stored, and each refused frame becomes a
`sink_rejected` dead letter carrying the database's message (its detections were already
published). A dead letter the database refuses is stored in a safe form (`safe_letter`),
or, failing that too, only published.

When the database cannot be reached, or fails for any reason that is not the rows, the
write is retried with capped exponential backoff (`StoreRetry`) for up to `retry_s`
seconds: `write_batch` does not return meanwhile, so the flow stalls, nothing is lost and
nothing is acknowledged past unwritten rows. One warning per `RETRY_WARN_EVERY_S` per
database and process, and the `on_outage` hook (metrics) on every attempt; past the bound
the sink gives up: `on_give_up` (the flow passes `exit_process`, one line and exit 1),
then `StoreUnavailable`.

`write_items` is the operator of both sink stages (`sink` and `dead_letter_sink`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any, NoReturn, Protocol, TypedDict, TypeVar, Unpack

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.outputs import DynamicSink, Sink, StatelessSinkPartition

from operators import contract, stages
from operators import dead_letters as dl
from operators.frames import DeadLetter, FrameResult
from operators.kafka_io import CheckedProducer
from operators.stages import Instrument, uninstrumented
from operators.stores import (
    DetectionStore,
    RowsRejected,
    StoreError,
    WriteOutcome,
    one_line,
    open_store,
    redact_url,
    result_to_json,
)
from operators.workers import note_worker

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")

STAGE = stages.SINK
# Brokers reject messages over their message.max.bytes (1 MB by default on Kafka).
MAX_DEAD_LETTER_PAYLOAD = 1_000_000 - 64 * 1024

DEFAULT_RETRY_S = 120.0
"""How long a sink retries an unavailable database before giving up (the flow's
`STREAMSIGHT_SINK_RETRY_S`)."""
RETRY_FIRST_DELAY_S = 0.1
RETRY_MAX_DELAY_S = 2.0
"""Backoff cap: a database back up is written to within about this long."""
RETRY_WARN_EVERY_S = 10.0
EXIT_STATUS = 1

ResultsObserver = Callable[[Sequence[FrameResult], int, int], None]
LettersObserver = Callable[[Sequence[DeadLetter]], None]
OutageObserver = Callable[[str, bool], None]
"""`(sink, unavailable)`: True after each failed attempt on an unavailable database (a
retry follows), False once a write goes through again. `sink` is `results` or
`dead_letters`."""
GiveUp = Callable[[str], object]
"""Called with the one-line message when a sink gives up on its database."""

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
"""Optional hook around each write batch (e.g. `operators.telemetry.tracing.write_tracer`)."""


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


def carrying(letter: DeadLetter, carrier: Mapping[str, str]) -> DeadLetter:
    """`letter` whose headers continue the trace in `carrier` (see `with_carrier`)."""
    return replace(letter, headers=tuple(with_carrier(letter.headers, carrier)))


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


class StoreUnavailable(StoreError):
    """The database stayed unavailable for a sink's whole retry time (one-line message,
    free of secrets, naming the database and the last cause)."""


class OutageLog:
    """Rate-limits outage warnings: one per `every_s` per database, whichever sink
    partition of the process is waiting (they share the module's instance)."""

    def __init__(self, every_s: float = RETRY_WARN_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, store: str, now: float) -> bool:
        """Whether a warning about `store` may be logged at `now` (and note it if so)."""
        with self._lock:
            last = self._last.get(store)
            if last is not None and now - last < self.every_s:
                return False
            self._last[store] = now
            return True


_OUTAGES = OutageLog()


class StoreRetry:
    """Runs a sink partition's database calls, waiting out an unavailable database.

    `call(work)` returns what `work` returns. `RowsRejected` passes straight through (the
    same rows would fail again); any other `StoreError` is retried with capped, jittered
    exponential backoff until `retry_s` seconds after the first failure, then the
    partition gives up: `on_give_up(message)`, then `StoreUnavailable(message)`.
    """

    def __init__(
        self,
        url: str,
        sink: str,
        *,
        retry_s: float = DEFAULT_RETRY_S,
        on_outage: OutageObserver | None = None,
        on_give_up: GiveUp | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        outage_log: OutageLog | None = None,
    ) -> None:
        self.store = redact_url(url)
        self.sink = sink
        self.retry_s = retry_s
        self.on_outage = on_outage
        self.on_give_up = on_give_up
        self.clock = clock
        self.sleep = sleep
        self.outages = outage_log or _OUTAGES

    def call(self, work: Callable[[], T]) -> T:
        """`work()`, retried while the database is unavailable (see the class)."""
        started: float | None = None
        delay = RETRY_FIRST_DELAY_S
        retries = 0
        while True:
            try:
                outcome = work()
            except RowsRejected:
                raise
            except StoreError as exc:
                now = self.clock()
                if started is None:
                    started = now
                self._failed(exc, now, now - started, started + self.retry_s)
                retries += 1
                # Jitter spreads the retries of many workers; never sleep past the bound.
                self.sleep(min(delay * random.uniform(0.5, 1.0), started + self.retry_s - now))
                delay = min(delay * 2, RETRY_MAX_DELAY_S)
                continue
            if started is not None:
                log.info(
                    "database %s available again after %.1f s (%d retries); the flow goes on",
                    self.store,
                    self.clock() - started,
                    retries,
                )
                if self.on_outage is not None:
                    self.on_outage(self.sink, False)
            return outcome

    def _failed(self, exc: StoreError, now: float, waited: float, deadline: float) -> None:
        """Give up past `deadline`; else report the failed attempt (a retry follows)."""
        cause = one_line(str(exc))
        if now >= deadline:
            message = (
                f"the sink's database {self.store} was unavailable for {waited:.0f} s"
                f" (STREAMSIGHT_SINK_RETRY_S={self.retry_s:g}), giving up: {cause}"
            )
            if self.on_give_up is not None:
                self.on_give_up(message)
            raise StoreUnavailable(message) from None
        if self.on_outage is not None:
            self.on_outage(self.sink, True)
        if self.outages.due(self.store, now):
            log.warning(
                "database %s unavailable for %.0f s; the flow waits, retrying for up to"
                " %.0f s more: %s",
                self.store,
                waited,
                deadline - now,
                cause,
            )


def exit_process(message: str) -> NoReturn:
    """End the process at once with status 1 and `streamsight: <message>` as its one line
    on stderr. Raising from a Bytewax worker would print a Rust panic and a traceback
    instead (Bytewax has no hook to stop a dataflow with an error quietly:
    https://github.com/bytewax/bytewax/issues/318). Nothing past the unwritten rows was
    acknowledged, so a restart resumes there."""
    sys.stdout.flush()
    sys.stderr.write(f"streamsight: {one_line(message)}\n")
    sys.stderr.flush()
    os._exit(EXIT_STATUS)


def write_isolating(
    write: Callable[[Sequence[Item]], WriteOutcome], items: Sequence[Item]
) -> tuple[WriteOutcome, list[tuple[Item, str]]]:
    """Write `items` with `write`; when the database rejects their rows, write each half
    on its own, down to single items, so that only the rejected items are left out.
    Returns the rows written and each rejected item with the database's message."""
    try:
        return write(items), []
    except RowsRejected as exc:
        if len(items) <= 1:
            return WriteOutcome(0, 0), [(item, str(exc)) for item in items]
    middle = len(items) // 2
    first, rejected_first = write_isolating(write, items[:middle])
    second, rejected_second = write_isolating(write, items[middle:])
    written = WriteOutcome(first.inserted + second.inserted, first.duplicates + second.duplicates)
    return written, rejected_first + rejected_second


def rejected_letter(result: FrameResult, message: str) -> DeadLetter:
    """A frame whose row the database refused (`message`: the database's words)."""
    return dl.reject_decoded(
        result.meta, stage=STAGE, reason=dl.SINK_REJECTED, detail=f"not stored: {message}"
    )


_INT32 = 2**31
_INT64 = 2**63


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def safe_letter(letter: DeadLetter, message: str) -> DeadLetter:
    """`letter` in a form any store takes: its text as ASCII (escapes for the rest), a
    partition or offset outside the columns' range as -1, with its true coordinates and
    the database's `message` at the head of its detail."""
    partition = letter.partition if -_INT32 <= letter.partition < _INT32 else -1
    offset = letter.offset if -_INT64 <= letter.offset < _INT64 else -1
    detail = (
        f"stored in a safe form (source partition {letter.partition}, offset"
        f" {letter.offset}; {message}): {letter.detail}"
    )
    return replace(
        letter,
        stage=_ascii(letter.stage),
        reason=_ascii(letter.reason),
        detail=_ascii(detail),
        topic=_ascii(letter.topic),
        partition=partition,
        offset=offset,
        frame_id=None if letter.frame_id is None else _ascii(letter.frame_id),
        job_id=None if letter.job_id is None else _ascii(letter.job_id),
    )


def store_letters(
    store: DetectionStore, retry: StoreRetry, letters: Sequence[DeadLetter], written_ns: int
) -> None:
    """Store `letters`, waiting out an unavailable database; a letter whose row is refused
    is stored in its safe form, and one refused even so is only logged (it was published
    already): nothing here raises for a row."""

    def write(chunk: Sequence[DeadLetter]) -> WriteOutcome:
        return retry.call(lambda: store.write_dead_letters(chunk, written_ns))

    _, rejected = write_isolating(write, letters)
    if not rejected:
        return
    _, refused = write_isolating(write, [safe_letter(letter, msg) for letter, msg in rejected])
    log.warning(
        "the database refused %d dead letters; stored in a safe form: %d (%s)",
        len(rejected),
        len(rejected) - len(refused),
        rejected[0][1],
    )
    if refused:
        log.error(
            "%d dead letters could not be stored even in a safe form; they are only on the"
            " dead-letter topic: %s",
            len(refused),
            refused[0][1],
        )


class _StorePartition(StatelessSinkPartition[Item]):
    """A worker's part of a sink: the sink's observers, and the worker's own store,
    producer and retry policy."""

    def __init__(
        self,
        sink: _StoreSink[Item],
        store: DetectionStore,
        producer: CheckedProducer | None,
        retry: StoreRetry,
    ) -> None:
        self.store = store
        self.producer = producer
        self.retry = retry
        self.on_letters = sink.on_letters
        self.trace_writes = sink.trace_writes

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush_and_check()
            self.producer.close()
        self.store.close()


class _ResultPartition(_StorePartition[FrameResult]):
    def __init__(
        self,
        sink: ResultSink,
        store: DetectionStore,
        producer: CheckedProducer | None,
        retry: StoreRetry,
    ) -> None:
        super().__init__(sink, store, producer, retry)
        self.output_topic = sink.output_topic
        self.dead_letter_topic = sink.dead_letter_topic
        self.on_results = sink.on_results

    def write_batch(self, items: list[FrameResult]) -> None:
        with self.trace_writes(items) as trace:
            self._write(items, trace)

    def _write(self, items: list[FrameResult], trace: WriteTrace) -> None:
        frame_ids = [r.meta.frame_id for r in items]
        stored = self.retry.call(lambda: self.store.stored_hashes(frame_ids))
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
                conflicts.append(carrying(letter, trace.carrier(result)))
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
            store_letters(self.store, self.retry, conflicts, written_ns)

        def write(chunk: Sequence[FrameResult]) -> WriteOutcome:
            return self.retry.call(lambda: self.store.write_results(chunk, written_ns))

        outcome, rejected = write_isolating(write, new)
        rejects = self._rejected(rejected, trace, written_ns)
        refused = {id(result) for result, _ in rejected}
        written = [result for result in new if id(result) not in refused]
        if self.on_results is not None:
            self.on_results(written, duplicates + outcome.duplicates, written_ns)
        letters = conflicts + rejects
        if letters and self.on_letters is not None:
            self.on_letters(letters)

    def _rejected(
        self, rejected: list[tuple[FrameResult, str]], trace: WriteTrace, written_ns: int
    ) -> list[DeadLetter]:
        """Dead-letter the frames whose rows the database refused: published, then stored."""
        if not rejected:
            return []
        log.warning(
            "the database refused %d frames' rows; they become %s dead letters: %s",
            len(rejected),
            dl.SINK_REJECTED,
            rejected[0][1],
        )
        letters = []
        for result, message in rejected:
            letter = rejected_letter(result, message)
            trace.failed(result, letter.reason, letter.detail)
            letters.append(carrying(letter, trace.carrier(result)))
        if self.producer is not None:
            publish_dead_letters(self.producer, self.dead_letter_topic, letters)
            self.producer.flush_and_check()
        store_letters(self.store, self.retry, letters, written_ns)
        return letters


class _DeadLetterPartition(_StorePartition[DeadLetter]):
    def __init__(
        self,
        sink: DeadLetterSink,
        store: DetectionStore,
        producer: CheckedProducer | None,
        retry: StoreRetry,
    ) -> None:
        super().__init__(sink, store, producer, retry)
        self.topic = sink.topic

    def write_batch(self, items: list[DeadLetter]) -> None:
        with self.trace_writes(items) as trace:
            if self.producer is not None:
                outgoing = [carrying(letter, trace.carrier(letter)) for letter in items]
                publish_dead_letters(self.producer, self.topic, outgoing)
                self.producer.flush_and_check()
            store_letters(self.store, self.retry, items, time.time_ns())
        if self.on_letters is not None:
            self.on_letters(items)


class SinkOptions(TypedDict, total=False):
    """The options both sinks take, as keywords."""

    on_letters: LettersObserver | None
    trace_writes: TraceWrites | None
    retry_s: float
    on_outage: OutageObserver | None
    on_give_up: GiveUp | None


class _StoreSink(DynamicSink[Item]):
    """What both sinks share: the database (opened and written with retries for
    `retry_s`), the Kafka producer and the observers of dead letters and outages."""

    sink_name = ""
    """The `sink` label of its series: `results` or `dead_letters`."""

    def __init__(
        self,
        store_url: str,
        producer_config: dict[str, Any] | None,
        *,
        on_letters: LettersObserver | None = None,
        trace_writes: TraceWrites | None = None,
        retry_s: float = DEFAULT_RETRY_S,
        on_outage: OutageObserver | None = None,
        on_give_up: GiveUp | None = None,
    ) -> None:
        self.store_url = store_url
        self.producer_config = producer_config
        self.on_letters = on_letters
        self.trace_writes = trace_writes or no_trace
        self.retry_s = retry_s
        self.on_outage = on_outage
        self.on_give_up = on_give_up

    def _open(
        self, worker_index: int, worker_count: int, *, publish: bool = True
    ) -> tuple[DetectionStore, CheckedProducer | None, StoreRetry]:
        """A worker's store, its producer (None when not publishing) and retry policy."""
        note_worker(worker_index, worker_count)
        retry = StoreRetry(
            self.store_url,
            self.sink_name,
            retry_s=self.retry_s,
            on_outage=self.on_outage,
            on_give_up=self.on_give_up,
        )
        store = retry.call(lambda: open_store(self.store_url))
        producer = None
        if publish and self.producer_config is not None:
            producer = CheckedProducer(dict(self.producer_config))
        return store, producer, retry


class ResultSink(_StoreSink[FrameResult]):
    """Writes each frame's detections once: to the output topic, then to the database."""

    sink_name = "results"

    def __init__(
        self,
        store_url: str,
        producer_config: dict[str, Any] | None,
        *,
        output_topic: str,
        dead_letter_topic: str,
        publish: bool = True,
        on_results: ResultsObserver | None = None,
        **options: Unpack[SinkOptions],
    ) -> None:
        super().__init__(store_url, producer_config, **options)
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.publish = publish
        self.on_results = on_results

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ResultPartition:
        return _ResultPartition(self, *self._open(worker_index, worker_count, publish=self.publish))


class DeadLetterSink(_StoreSink[DeadLetter]):
    """Publishes dead letters (original bytes and reason) and records them in the database."""

    sink_name = "dead_letters"

    def __init__(
        self,
        store_url: str,
        producer_config: dict[str, Any] | None,
        *,
        topic: str,
        **options: Unpack[SinkOptions],
    ) -> None:
        super().__init__(store_url, producer_config, **options)
        self.topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        return _DeadLetterPartition(self, *self._open(worker_index, worker_count))


@operator
def write_items(
    step_id: str, up: Stream[T], sink: Sink[T], instrument: Instrument = uninstrumented
) -> None:
    """Write every item of `up` to `sink` (`ResultSink`, `DeadLetterSink` or any sink)."""
    op.output("write", up, instrument(step_id, sink))
