"""The result sink on a real SQLite store: new frames are written once, replays are skipped,
and a frame identity seen again with different content becomes a dead letter."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from operators import dead_letters as dl
from operators.frames import Detection, FrameMeta, FrameResult
from operators.sinks import ResultSink, split_new
from operators.stores import open_store
from operators.tally import Tally


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
