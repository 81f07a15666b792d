"""Batching: size bound, a deadline counted from the batch's FIRST frame, end of input, state
that survives a snapshot, and the stage's operator (stale frames skipped first)."""

from __future__ import annotations

import pickle
import time

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from operators import dead_letters as dl
from operators.batching import (
    FLUSH_DEADLINE,
    FLUSH_END,
    FLUSH_SIZE,
    Batcher,
    BatchLogic,
    batch_frames,
    batch_logic_builder,
    stream_key,
)
from operators.frames import DeadLetter, FrameBatch, FrameMeta, PreparedFrame
from tests import metrics_data as data

MS = 1_000_000


def frame(seq: int, partition: int = 0, camera: str = "cam-0") -> PreparedFrame:
    meta = FrameMeta(
        frame_id=f"j/{camera}/{seq}",
        job_id="j",
        camera=camera,
        seq=seq,
        topic="frames",
        partition=partition,
        offset=seq,
        capture_ns=0,
        ingest_ns=0,
        content_sha256="0" * 64,
        width=8,
        height=8,
    )
    return PreparedFrame(meta=meta, pixels=np.zeros((4, 4, 3), np.uint8), prepared_ns=0)


def seqs(batch) -> list[int]:
    return [f.meta.seq for f in batch.frames]


def test_flushes_at_max_size() -> None:
    batcher = Batcher(stream_key, max_size=3, max_delay_ns=1000 * MS)
    out = batcher.add([frame(i) for i in range(7)], now_ns=0)
    assert [seqs(b) for b in out] == [[0, 1, 2], [3, 4, 5]]
    assert all(b.flush_reason == FLUSH_SIZE for b in out)
    assert [f.meta.seq for f in batcher.pending] == [6]


def test_deadline_counts_from_the_first_frame_not_the_last() -> None:
    batcher = Batcher(stream_key, max_size=100, max_delay_ns=50 * MS)
    # A steady trickle every 20 ms: an idle timeout would never fire.
    for i in range(3):
        assert batcher.add([frame(i)], now_ns=i * 20 * MS) == []
    assert batcher.deadline_ns == 50 * MS
    assert batcher.due(49 * MS) == []
    (batch,) = batcher.due(50 * MS)
    assert seqs(batch) == [0, 1, 2]
    assert batch.flush_reason == FLUSH_DEADLINE
    assert batch.opened_ns == 0 and batch.dispatched_ns == 50 * MS
    assert batcher.deadline_ns is None


def test_a_late_frame_flushes_the_overdue_batch_before_joining_a_new_one() -> None:
    batcher = Batcher(stream_key, max_size=100, max_delay_ns=50 * MS)
    batcher.add([frame(0)], now_ns=0)
    (batch,) = batcher.add([frame(1)], now_ns=80 * MS)
    assert seqs(batch) == [0]
    assert [f.meta.seq for f in batcher.pending] == [1]
    assert batcher.deadline_ns == 130 * MS


def test_zero_delay_dispatches_at_once() -> None:
    batcher = Batcher(stream_key, max_size=8, max_delay_ns=0)
    out = batcher.add([frame(0), frame(1)], now_ns=5)
    assert [seqs(b) for b in out] == [[0, 1]]


def test_drain_flushes_at_end_of_input() -> None:
    batcher = Batcher(stream_key, max_size=8, max_delay_ns=50 * MS)
    batcher.add([frame(0), frame(1)], now_ns=0)
    (batch,) = batcher.drain(now_ns=1)
    assert batch.flush_reason == FLUSH_END
    assert seqs(batch) == [0, 1]
    assert batcher.drain(now_ns=2) == []


def test_batch_ids_are_unique_and_keys_follow_the_stream() -> None:
    batcher = Batcher(stream_key, max_size=1, max_delay_ns=MS)
    out = batcher.add([frame(0, partition=3), frame(1, partition=3)], now_ns=0)
    assert len({b.batch_id for b in out}) == 2
    assert {b.key for b in out} == {"frames/3"}
    assert stream_key(frame(0, camera="cam-7"), by="camera") == "cam-7"


def test_logic_snapshot_survives_pickling_and_resumes_with_its_deadline() -> None:
    clock = iter([0, 10 * MS]).__next__
    build = batch_logic_builder(max_size=4, max_delay_s=0.05)
    logic = build(None)
    logic.clock = clock
    emitted, discard = logic.on_batch([frame(0), frame(1)])
    assert list(emitted) == [] and discard is BatchLogic.RETAIN
    state = pickle.loads(pickle.dumps(logic.snapshot()))
    resumed = build(state)
    assert [f.meta.seq for f in resumed.batcher.pending] == [0, 1]
    assert resumed.notify_at() == logic.notify_at()
    assert resumed.notify_at().timestamp() == 0.05
    resumed.clock = lambda: 60 * MS
    (batch,), discard = resumed.on_notify()
    assert seqs(batch) == [0, 1]
    assert discard is BatchLogic.DISCARD  # nothing pending: the key's state is dropped


def test_logic_eof_flushes_pending() -> None:
    logic = batch_logic_builder(max_size=4, max_delay_s=1.0)(None)
    logic.on_batch([frame(0)])
    (batch,), discard = logic.on_eof()
    assert batch.flush_reason == FLUSH_END and discard is BatchLogic.DISCARD


def _batch_frames(
    frames: list[PreparedFrame], **bounds: float
) -> tuple[list[FrameBatch], list[DeadLetter]]:
    batches: list[FrameBatch] = []
    letters: list[DeadLetter] = []
    flow = Dataflow("batching")
    out = batch_frames("batch", op.input("in", flow, TestingSource(frames)), **bounds)
    op.output("batches", out.oks, TestingSink(batches))
    op.output("letters", out.errs, TestingSink(letters))
    run_main(flow)
    return batches, letters


def test_batch_frames_batches_per_partition_and_skips_stale_frames_first() -> None:
    now = time.time_ns()
    fresh = [data.prepared(data.meta(i, partition=i % 2, capture_ns=now)) for i in range(6)]
    # A minute old against a 30 s limit: stale whatever the machine's speed.
    old = data.prepared(data.meta(99, partition=0, capture_ns=now - 60 * 10**9))
    frames = [*fresh[:3], old, *fresh[3:]]

    batches, letters = _batch_frames(frames, max_size=3, max_delay_s=60.0, max_age_ms=30_000)
    assert sorted(seqs(b) for b in batches) == [[0, 2, 4], [1, 3, 5]]
    assert {b.key for b in batches} == {f"{data.TOPIC}/0", f"{data.TOPIC}/1"}
    assert [(d.stage, d.reason, d.offset) for d in letters] == [("batch", dl.STALE, 99)]

    # Without an age limit every frame is batched and the dead-letter stream stays empty.
    batches, letters = _batch_frames(frames, max_size=3, max_delay_s=60.0)
    assert sorted(seqs(b) for b in batches) == [[0, 2, 99], [1, 3, 5], [4]]
    assert letters == []
