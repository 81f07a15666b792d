"""The result sink on a real SQLite store: new frames are written once, replays are skipped,
and a frame identity seen again with different content becomes a dead letter."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from operators import dead_letters as dl
from operators import sinks
from operators.frames import Detection, FrameMeta, FrameResult
from operators.sinks import (
    DeadLetterSink,
    OutageLog,
    ResultSink,
    StoreRetry,
    StoreUnavailable,
    split_new,
)
from operators.stores import RowsRejected, StoreConnectionError, open_store
from operators.tally import Tally
from operators.telemetry.metrics import PipelineMetrics

URL = "postgresql://app:PlantedSecret-4h1@db.example:5432/streamsight"
UNAVAILABLE = "streamsight_sink_unavailable"


def result(seq: int, sha: str = "a" * 64) -> FrameResult:
    meta = FrameMeta(
        frame_id=f"job/cam-0/{seq}",
        job_id="job",
        camera="cam-0",
        seq=seq,
        topic="frames",
        partition=0,
        offset=seq,
        capture_ns=1_000,
        ingest_ns=2_000,
        content_sha256=sha,
        width=320,
        height=240,
    )
    return FrameResult(
        meta=meta,
        detections=(Detection((1.0, 2.0, 30.0, 40.0), "car", 0.9),),
        model_name="m",
        model_version="1",
        device="cpu",
        batch_size=2,
        batch_flush_reason="size",
        batch_dispatched_ns=3_000,
        inferred_ns=4_000,
        batch_id="b1",
    )


def test_split_new_separates_repeats_and_conflicts() -> None:
    stored = {"job/cam-0/1": "a" * 64, "job/cam-0/2": "a" * 64}
    items = [result(1), result(2, "b" * 64), result(3), result(3), result(3, "c" * 64)]
    new, duplicates, conflicts = split_new(items, stored)
    assert [r.meta.seq for r in new] == [3]
    assert duplicates == 2  # seq 1 again, seq 3 twice in the batch
    assert [(c.frame_id, c.reason) for c in conflicts] == [
        ("job/cam-0/2", dl.DUPLICATE_FRAME_CONFLICT),
        ("job/cam-0/3", dl.DUPLICATE_FRAME_CONFLICT),
    ]
    assert conflicts[0].offset == 2 and conflicts[0].payload is None


def test_sink_writes_each_frame_once_and_dead_letters_conflicts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sink.db'}"
    tally = Tally()
    sink = ResultSink(
        url,
        None,
        output_topic="detections",
        dead_letter_topic="dead",
        on_results=tally.results_written,
        on_letters=tally.dead_letters_written,
    )
    part = sink.build("sink", 0, 1)
    part.write_batch([result(0), result(1)])
    part.write_batch([result(1), result(2)])  # a replay of seq 1 after a restart
    conflict = replace(result(0), meta=replace(result(0).meta, content_sha256="f" * 64))
    part.write_batch([conflict])
    part.close()

    store = open_store(url)
    try:
        rows = {r["frame_id"]: r for r in store.fetch_results()}
        letters = store.fetch_dead_letters()
    finally:
        store.close()
    assert sorted(rows) == ["job/cam-0/0", "job/cam-0/1", "job/cam-0/2"]
    assert rows["job/cam-0/0"]["content_sha256"] == "a" * 64  # the first version stays
    assert [(d["reason"], d["frame_id"]) for d in letters] == [
        (dl.DUPLICATE_FRAME_CONFLICT, "job/cam-0/0")
    ]
    assert (tally.written, tally.duplicates, tally.dead_letters) == (3, 1, 1)
    assert tally.mean_batch_size() == 2.0


def overflowing(index: int, **changes: object) -> FrameResult:
    """`result(index)` with metadata fields changed to values past the 64-bit columns."""
    good = result(index)
    return replace(good, meta=replace(good.meta, **changes))


def stored(url: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Every detections row and dead-letter row of the store at `url`."""
    store = open_store(url)
    try:
        return store.fetch_results(), store.fetch_dead_letters()
    finally:
        store.close()


def test_rows_the_database_rejects_become_dead_letters_and_the_rest_is_stored(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'sink.db'}"
    tally = Tally()
    sink = ResultSink(
        url,
        None,
        output_topic="detections",
        dead_letter_topic="dead",
        on_results=tally.results_written,
        on_letters=tally.dead_letters_written,
    )
    part = sink.build("sink", 0, 1)
    big_seq = overflowing(3, seq=2**63, frame_id="job/cam-0/9223372036854775808")
    huge_capture = overflowing(5, capture_ns=2**64)
    batch = [result(0), result(1), result(2), big_seq, result(4), huge_capture, result(6)]

    part.write_batch(batch)  # must not raise
    part.write_batch(batch)  # nor crash-loop when the same batch comes back
    part.close()

    rows, letters = stored(url)
    assert [r["frame_id"] for r in rows] == [f"job/cam-0/{i}" for i in (0, 1, 2, 4, 6)]
    assert [(d["frame_id"], d["stage"], d["reason"]) for d in letters] == [
        ("job/cam-0/9223372036854775808", "sink", dl.SINK_REJECTED),
        ("job/cam-0/5", "sink", dl.SINK_REJECTED),
    ]
    assert all("too large" in str(d["detail"]) for d in letters)
    assert (tally.written, tally.dead_letters) == (5, 4)  # the replay re-reports the rejects
    assert tally.duplicates == 5


def test_a_dead_letter_the_database_rejects_is_stored_in_a_safe_form(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sink.db'}"
    tally = Tally()
    sink = DeadLetterSink(url, None, topic="dead", on_letters=tally.dead_letters_written)
    part = sink.build("dead_letters", 0, 1)
    fine = dl.reject_decoded(result(0).meta, stage="decode", reason=dl.BAD_HEADER, detail="x")
    odd = replace(fine, offset=2**64, job_id="job\udcff", frame_id="job\udcff/cam-0/1")

    part.write_batch([fine, odd])
    part.close()

    _, letters = stored(url)
    by_offset = {d["source_offset"]: d for d in letters}
    assert sorted(by_offset) == [-1, 0]
    safe = by_offset[-1]
    assert safe["job_id"] == "job\\udcff" and safe["frame_id"] == "job\\udcff/cam-0/1"
    assert "18446744073709551616" in str(safe["detail"])
    assert tally.dead_letters == 2


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing_until(clock: FakeClock, until: float, value: str = "ok"):
    """A store call that raises a connection error until `clock` reaches `until`."""
    calls = []

    def call() -> str:
        calls.append(clock())
        if clock() < until:
            raise StoreConnectionError(
                f"cannot connect to PostgreSQL at {URL.replace('PlantedSecret-4h1', '***')}:"
                " OperationalError: connection refused"
            )
        return value

    call.calls = calls  # type: ignore[attr-defined]
    return call


def test_an_unavailable_store_is_retried_with_capped_backoff_and_rare_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    events: list[tuple[str, bool]] = []
    retry = StoreRetry(
        URL,
        "results",
        retry_s=120,
        on_outage=lambda sink, down: events.append((sink, down)),
        clock=clock,
        sleep=clock.sleep,
        outage_log=OutageLog(),
    )
    work = failing_until(clock, clock.now + 35)

    with caplog.at_level(logging.INFO, logger=sinks.__name__):
        assert retry.call(work) == "ok"

    assert 35 <= clock.now - 1000 < 35 + sinks.RETRY_MAX_DELAY_S
    assert clock.sleeps[0] <= sinks.RETRY_FIRST_DELAY_S
    assert max(clock.sleeps) <= sinks.RETRY_MAX_DELAY_S
    assert len(clock.sleeps) == len(work.calls) - 1 < 35  # backoff, not a busy loop
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # at 0 s, then once per 10 s: not once per attempt
    assert all("PlantedSecret" not in w and "db.example" in w for w in warnings)
    assert [r.levelno for r in caplog.records][-1] == logging.INFO  # "available again"
    assert events == [("results", True)] * len(clock.sleeps) + [("results", False)]


def test_the_retry_gives_up_after_its_bound_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    given_up: list[str] = []
    retry = StoreRetry(
        URL,
        "dead_letters",
        retry_s=30,
        on_give_up=given_up.append,
        clock=clock,
        sleep=clock.sleep,
        outage_log=OutageLog(),
    )

    with pytest.raises(StoreUnavailable) as info:
        retry.call(failing_until(clock, float("inf")))

    assert clock.now - 1000 == pytest.approx(30)
    message = str(info.value)
    assert given_up == [message]
    assert "\n" not in message
    assert "db.example" in message and "PlantedSecret" not in message
    assert "connection refused" in message and "30 s" in message


def test_rejected_rows_are_not_retried() -> None:
    clock = FakeClock()
    retry = StoreRetry(URL, "results", clock=clock, sleep=clock.sleep, outage_log=OutageLog())
    calls = []

    def rejected() -> None:
        calls.append(1)
        raise RowsRejected("SQLite rejected the rows: OverflowError: too large")

    with pytest.raises(RowsRejected):
        retry.call(rejected)
    assert calls == [1] and clock.sleeps == []


def test_sink_partitions_of_one_process_share_the_warning_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    shared = OutageLog()
    first, second = (
        StoreRetry(URL, sink, clock=clock, sleep=clock.sleep, outage_log=shared)
        for sink in ("results", "dead_letters")
    )

    with caplog.at_level(logging.WARNING, logger=sinks.__name__):
        first.call(failing_until(clock, clock.now + 12))  # warns at 0 and 10 s
        second.call(failing_until(clock, clock.now + 13))  # from about 12 s to 25 s

    assert len(caplog.records) == 3  # at 0, 10 and 20 s, whichever partition was waiting


def test_an_outage_shows_on_the_sink_metrics() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    clock = FakeClock()
    retry = StoreRetry(
        URL,
        "results",
        on_outage=metrics.sink_outage,
        clock=clock,
        sleep=clock.sleep,
        outage_log=OutageLog(),
    )
    outage = failing_until(clock, clock.now + 5)
    seen_during: list[float | None] = []

    def work() -> str:
        value = outage()
        seen_during.append(registry.get_sample_value(UNAVAILABLE, {"sink": "results"}))
        return value

    retry.call(work)

    retries = registry.get_sample_value("streamsight_sink_retries_total", {"sink": "results"})
    assert retries == len(clock.sleeps) > 0
    assert seen_during == [1.0]  # the successful attempt still saw the outage
    assert registry.get_sample_value(UNAVAILABLE, {"sink": "results"}) == 0.0
    assert registry.get_sample_value(UNAVAILABLE, {"sink": "dead_letters"}) == 0.0
