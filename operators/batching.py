"""Batching per stream key: flush at `max_size` frames, or when `max_delay` has passed since
the batch's FIRST frame (a deadline, not an idle timeout), or at the end of the input.

`Batcher` is the pure logic, driven by explicit clock readings; `BatchLogic` adapts it to
Bytewax's `stateful_batch` so pending frames are part of recovery snapshots; `batch_frames`
is the stage's operator (frames too old to infer are skipped first: `operators.shedding`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic

from operators.adaptive import AdaptiveBatching
from operators.frames import DeadLetter, FrameBatch, PreparedFrame
from operators.shedding import shed_stale
from operators.stages import Instrument, uninstrumented
from operators.workers import current_worker, local_key

FLUSH_SIZE = "size"
FLUSH_DEADLINE = "deadline"
FLUSH_END = "end_of_input"
FLUSH_REASONS = (FLUSH_SIZE, FLUSH_DEADLINE, FLUSH_END)


class Batcher:
    """Collects frames of one stream key into batches.

    Times are integer nanoseconds since the epoch; `opened_ns` is when the pending batch's
    first frame arrived.
    """

    def __init__(
        self,
        key_of: Callable[[PreparedFrame], str],
        max_size: int,
        max_delay_ns: int,
        pending: tuple[PreparedFrame, ...] = (),
        opened_ns: int | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.key_of = key_of
        self.max_size = max_size
        self.max_delay_ns = max_delay_ns
        self.pending: list[PreparedFrame] = list(pending)
        self.opened_ns = opened_ns

    @property
    def deadline_ns(self) -> int | None:
        """When the pending batch must be dispatched, or None if nothing is pending."""
        if not self.pending or self.opened_ns is None:
            return None
        return self.opened_ns + self.max_delay_ns

    def add(self, frames: Iterable[PreparedFrame], now_ns: int) -> list[FrameBatch]:
        """Add frames; return the batches that became full (or overdue) on the way."""
        out: list[FrameBatch] = []
        for frame in frames:
            if self.pending and self.deadline_ns is not None and now_ns > self.deadline_ns:
                out.append(self._flush(FLUSH_DEADLINE, now_ns))
            if not self.pending:
                self.opened_ns = now_ns
            self.pending.append(frame)
            if len(self.pending) >= self.max_size:
                out.append(self._flush(FLUSH_SIZE, now_ns))
        if self.pending and self.max_delay_ns == 0:
            out.append(self._flush(FLUSH_DEADLINE, now_ns))
        return out

    def due(self, now_ns: int) -> list[FrameBatch]:
        """The pending batch if its deadline has passed."""
        deadline = self.deadline_ns
        if deadline is not None and now_ns >= deadline:
            return [self._flush(FLUSH_DEADLINE, now_ns)]
        return []

    def drain(self, now_ns: int) -> list[FrameBatch]:
        """Whatever is pending, flushed because the input ended."""
        return [self._flush(FLUSH_END, now_ns)] if self.pending else []

    def _flush(self, reason: str, now_ns: int) -> FrameBatch:
        batch = FrameBatch(
            key=self.key_of(self.pending[0]),
            frames=tuple(self.pending),
            flush_reason=reason,
            opened_ns=self.opened_ns if self.opened_ns is not None else now_ns,
            dispatched_ns=now_ns,
            batch_id=uuid.uuid4().hex[:16],
        )
        self.pending = []
        self.opened_ns = None
        return batch


BatchState = tuple[tuple[PreparedFrame, ...], int | None]


class BatchLogic(StatefulBatchLogic[PreparedFrame, FrameBatch, BatchState]):
    """Bytewax adapter around `Batcher`; the state is (pending frames, opened_ns)."""

    def __init__(
        self,
        batcher: Batcher,
        clock: Callable[[], int] = time.time_ns,
        controller: AdaptiveBatching | None = None,
    ) -> None:
        self.batcher = batcher
        self.clock = clock
        self.controller = controller

    def _result(self, batches: list[FrameBatch]) -> tuple[list[FrameBatch], bool]:
        return batches, (self.DISCARD if not self.batcher.pending else self.RETAIN)

    def on_batch(self, values: list[PreparedFrame]) -> tuple[Iterable[FrameBatch], bool]:
        """New frames for this key (with a controller, under the limits it picks now)."""
        now = self.clock()
        if self.controller is not None and values:
            first = values[0]
            age_s = max(first.prepared_ns - first.meta.capture_ns, 0) / 1e9
            key = self.batcher.key_of(first)
            self.controller.observe_arrivals(key, len(values), now, age_s)
            limits = self.controller.limits(now)
            self.batcher.max_size = limits.max_size
            self.batcher.max_delay_ns = limits.max_delay_ns
        return self._result(self.batcher.add(values, now))

    def on_notify(self) -> tuple[Iterable[FrameBatch], bool]:
        """The deadline of the pending batch has passed."""
        return self._result(self.batcher.due(self.clock()))

    def on_eof(self) -> tuple[Iterable[FrameBatch], bool]:
        """The input ended: flush what is pending."""
        return self._result(self.batcher.drain(self.clock()))

    def notify_at(self) -> datetime | None:
        """Wake up at the pending batch's deadline."""
        deadline = self.batcher.deadline_ns
        if deadline is None:
            return None
        return datetime.fromtimestamp(deadline / 1e9, tz=UTC)

    def snapshot(self) -> BatchState:
        """Pending frames and when the batch opened (tuples: immutable)."""
        return tuple(self.batcher.pending), self.batcher.opened_ns


def stream_key(frame: PreparedFrame, by: str = "partition") -> str:
    """The stream key a frame is batched by: its topic partition, or its camera."""
    meta = frame.meta
    return f"{meta.topic}/{meta.partition}" if by == "partition" else meta.camera


def local_stream_key(frame: PreparedFrame, by: str = "partition") -> str:
    """The key a frame is routed to its batcher by: its stream key, made to route to the
    worker that read the frame (see `operators.workers`) when that worker is known."""
    key = stream_key(frame, by)
    here = current_worker()
    if here is None or here[1] < 2:
        return key
    return local_key(key, *here)


def batch_logic_builder(
    max_size: int,
    max_delay_s: float,
    key_of: Callable[[PreparedFrame], str] = stream_key,
    controller: AdaptiveBatching | None = None,
) -> Callable[[BatchState | None], BatchLogic]:
    """A builder for `op.stateful_batch` with the given size and delay bounds; with a
    `controller`, each key's bounds come from it as frames arrive."""
    max_delay_ns = int(max_delay_s * 1e9)

    def build(resume: BatchState | None) -> BatchLogic:
        pending, opened = resume if resume is not None else ((), None)
        batcher = Batcher(key_of, max_size, max_delay_ns, pending, opened)
        return BatchLogic(batcher, controller=controller)

    return build


@dataclass(frozen=True)
class BatchOut:
    """The batches, and the frames skipped as too old to infer (`stale` dead letters)."""

    oks: Stream[FrameBatch]
    errs: Stream[DeadLetter]


@operator
def batch_frames(
    step_id: str,
    up: Stream[PreparedFrame],
    *,
    max_size: int,
    max_delay_s: float,
    key_by: str = "partition",
    max_age_ms: float = 0.0,
    controller: AdaptiveBatching | None = None,
    instrument: Instrument = uninstrumented,
) -> BatchOut:
    """Batch the frames of `up` per stream key (`key_by`: `partition` or `camera`) with the
    given bounds (or `controller`'s), each on the worker that read it; with `max_age_ms`
    over 0, frames older than that (capture to now) are skipped first."""
    if max_age_ms > 0:
        shed = shed_stale("shed_stale", up, max_age_ms)
        fresh, stale = shed.oks, shed.errs
    else:
        fresh, stale = up, op.flat_map_batch("no_stale", up, _none)
    # Batched on the worker that read the frame: Bytewax's key hashing would otherwise put
    # 3 or all 4 of 4 cameras' batches on one of 2 workers, depending on the topic's name.
    keyed = op.key_on("key", fresh, partial(local_stream_key, by=key_by))
    builder = batch_logic_builder(
        max_size, max_delay_s, partial(stream_key, by=key_by), controller=controller
    )
    batches = op.stateful_batch("collect", keyed, instrument(step_id, builder))
    return BatchOut(op.key_rm("unkey", batches), stale)


def _none(frames: list[PreparedFrame]) -> list[DeadLetter]:
    return []
