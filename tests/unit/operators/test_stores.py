"""The SQLite store: idempotent writes, dead letters, JSON detections, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import sqlite3
import threading
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from operators import stores
from operators.frames import DeadLetter, Detection, FrameMeta, FrameResult
from operators.sink_url import parse_sink_url
from operators.stores import (
    DEAD_LETTER_COLUMNS,
    RESULT_COLUMNS,
    DetectionStore,
    PostgresStore,
    RowsRejected,
    SQLiteStore,
    StoreConnectionError,
    WriteOutcome,
    detections_from_json,
    open_store,
    redact_url,
    result_to_json,
)

PAYLOAD_MARKER = b"RAW-FRAME-PAYLOAD-7f1c2e"
WRITTEN_NS = 1_700_000_000_123_456_789


def make_result(
    index: int,
    *,
    job_id: str = "job-a",
    camera: str = "cam-0",
    detections: Sequence[Detection] | None = None,
    seq: int | None = -1,
    content: bytes | None = None,
) -> FrameResult:
    """A result for frame `index` of `camera`; `seq=-1` means use `index`."""
    sequence = index if seq == -1 else seq
    frame_id = f"{job_id}/{camera}/{index}" if sequence is not None else f"kafka/frames/0/{index}"
    body = content if content is not None else f"frame-{camera}-{index}".encode()
    if detections is None:
        detections = (
            Detection(box=(1.5, 2.25, 10.0 + index, 20.125), label="person", score=0.875),
            Detection(box=(0.1, 0.2, 0.3, 1 / 3), label="car", score=1 / 7),
        )
    meta = FrameMeta(
        frame_id=frame_id,
        job_id=job_id,
        camera=camera,
        seq=sequence,
        topic="frames",
        partition=index % 4,
        offset=1000 + index,
        capture_ns=1_700_000_000_000_000_000 + index,
        ingest_ns=1_700_000_000_100_000_000 + index,
        content_sha256=hashlib.sha256(body).hexdigest(),
        width=640,
        height=480,
        trace_carrier={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
    )
    return FrameResult(
        meta=meta,
        detections=tuple(detections),
        model_name="tinydet",
        model_version="1.2.0",
        device="cpu",
        batch_size=8,
        batch_flush_reason="size",
        batch_dispatched_ns=1_700_000_000_200_000_000 + index,
        inferred_ns=1_700_000_000_300_000_000 + index,
    )


def make_letter(
    offset: int,
    *,
    stage: str = "decode",
    payload: bytes | None = PAYLOAD_MARKER,
    detail: str = "not a JPEG",
) -> DeadLetter:
    """A dead letter for offset `offset` of partition 1 of `frames`."""
    return DeadLetter(
        stage=stage,
        reason="undecodable",
        detail=detail,
        topic="frames",
        partition=1,
        offset=offset,
        key=b"cam-0",
        headers=(("streamsight-job-id", b"job-a"),),
        payload=payload,
        frame_id=f"job-a/cam-0/{offset}",
        job_id="job-a",
    )


def expected_row(result: FrameResult, written_ns: int = WRITTEN_NS) -> dict[str, object]:
    """The row a store should hold for `result`."""
    return {**result_to_json(result), "written_ns": written_ns}


def free_port() -> int:
    """A loopback TCP port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    (tmp_path / "sink").mkdir()
    return tmp_path / "sink" / "detections.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[DetectionStore]:
    opened = open_store(f"sqlite:///{db_path}")
    yield opened
    opened.close()


def test_write_results_inserts_one_row_per_frame(store: DetectionStore) -> None:
    results = [make_result(i) for i in (2, 0, 1)]

    outcome = store.write_results(results, WRITTEN_NS)

    assert outcome == WriteOutcome(inserted=3, duplicates=0)
    assert store.count_results() == 3
    rows = store.fetch_results()
    assert rows == [expected_row(r) for r in sorted(results, key=lambda r: r.meta.frame_id)]
    assert list(rows[0]) == list(RESULT_COLUMNS)


def test_rewriting_counts_duplicates_and_changes_nothing(store: DetectionStore) -> None:
    results = [make_result(i) for i in range(5)]
    store.write_results(results, WRITTEN_NS)
    before = store.fetch_results()

    again = store.write_results(results, WRITTEN_NS + 999)

    assert again == WriteOutcome(inserted=0, duplicates=5)
    assert store.fetch_results() == before
    assert {row["written_ns"] for row in before} == {WRITTEN_NS}


def test_partial_overlap_and_repeats_within_a_batch(store: DetectionStore) -> None:
    store.write_results([make_result(0), make_result(1)], WRITTEN_NS)

    outcome = store.write_results(
        [make_result(1), make_result(2), make_result(2), make_result(3)], WRITTEN_NS
    )

    assert outcome == WriteOutcome(inserted=2, duplicates=2)
    assert [row["frame_id"] for row in store.fetch_results()] == [
        f"job-a/cam-0/{i}" for i in range(4)
    ]


def test_empty_writes_touch_nothing(store: DetectionStore) -> None:
    assert store.write_results([], WRITTEN_NS) == WriteOutcome(0, 0)
    assert store.write_dead_letters([], WRITTEN_NS) == WriteOutcome(0, 0)
    assert store.count_results() == 0
    assert store.count_dead_letters() == 0


def test_a_failing_row_rolls_back_the_whole_batch(store: DetectionStore) -> None:
    good = make_result(0)
    bad = make_result(1, job_id=None)  # type: ignore[arg-type]

    with pytest.raises(RowsRejected, match="NOT NULL constraint failed"):
        store.write_results([good, bad], WRITTEN_NS)

    assert store.count_results() == 0
    assert store.write_results([good], WRITTEN_NS) == WriteOutcome(1, 0)


def test_a_value_that_cannot_be_converted_is_a_rejected_row(store: DetectionStore) -> None:
    odd = make_result(1, detections=(Detection((0, 0, 1, 1), "car", "high"),))  # type: ignore[arg-type]

    with pytest.raises(RowsRejected, match=r"^SQLite rejected the rows: ValueError: "):
        store.write_results([make_result(0), odd], WRITTEN_NS)

    assert store.count_results() == 0


@pytest.mark.parametrize(
    "change",
    [{"seq": 2**63}, {"capture_ns": 2**64}, {"ingest_ns": -(2**63) - 1}, {"job_id": "a\udcff"}],
    ids=["seq", "capture_ns", "ingest_ns", "surrogate"],
)
def test_values_the_columns_cannot_hold_are_rejected_rows(
    store: DetectionStore, change: dict[str, object]
) -> None:
    good = make_result(0)
    bad = make_result(1)
    bad = replace(bad, meta=replace(bad.meta, **change))

    with pytest.raises(RowsRejected) as info:
        store.write_results([good, bad], WRITTEN_NS)

    assert str(info.value).startswith("SQLite rejected the rows: ")
    assert "\n" not in str(info.value)
    assert store.count_results() == 0
    assert store.stored_hashes([bad.meta.frame_id, good.meta.frame_id, "x\udcff/c/1"]) == {}
    with pytest.raises(RowsRejected):
        store.write_dead_letters([replace(make_letter(1), offset=2**63)], WRITTEN_NS)


def test_stored_hashes_returns_only_stored_frames(store: DetectionStore) -> None:
    stored = [make_result(i, content=f"content-{i}".encode()) for i in range(1200)]
    store.write_results(stored, WRITTEN_NS)
    wanted = [r.meta.frame_id for r in stored[::3]] + ["job-a/cam-0/missing", ""]

    hashes = store.stored_hashes(wanted)

    assert hashes == {r.meta.frame_id: r.meta.content_sha256 for r in stored[::3]}
    assert hashes["job-a/cam-0/3"] == hashlib.sha256(b"content-3").hexdigest()
    assert store.stored_hashes([]) == {}


def test_detections_round_trip_through_json(store: DetectionStore, db_path: Path) -> None:
    with_boxes = make_result(0)
    empty = make_result(1, detections=())
    numpy_values = make_result(
        2,
        detections=(
            Detection(
                box=tuple(np.array([1.25, 2.5, 3.75, 4.0], dtype=np.float32)),  # type: ignore[arg-type]
                label="dog",
                score=np.float32(0.5),  # type: ignore[arg-type]
            ),
        ),
    )
    store.write_results([with_boxes, empty, numpy_values], WRITTEN_NS)

    rows = {row["frame_id"]: row for row in store.fetch_results()}

    first = rows[with_boxes.meta.frame_id]
    assert first["detection_count"] == 2
    assert first["detections"][0] == {
        "box": [1.5, 2.25, 10.0, 20.125],
        "label": "person",
        "score": 0.875,
    }
    assert detections_from_json(first["detections"]) == with_boxes.detections
    assert rows[empty.meta.frame_id]["detections"] == []
    assert rows[empty.meta.frame_id]["detection_count"] == 0
    assert detections_from_json(rows[numpy_values.meta.frame_id]["detections"]) == (
        Detection(box=(1.25, 2.5, 3.75, 4.0), label="dog", score=0.5),
    )
    with sqlite3.connect(db_path) as raw:
        text = raw.execute(
            "SELECT detections FROM detections WHERE frame_id = ?", (with_boxes.meta.frame_id,)
        ).fetchone()[0]
    assert json.loads(text) == first["detections"]
    assert detections_from_json(text) == with_boxes.detections


def test_non_finite_numbers_are_stored_as_null(store: DetectionStore) -> None:
    odd = make_result(
        0,
        detections=(Detection(box=(math.inf, 1.0, 2.0, 3.0), label="x", score=math.nan),),
    )

    store.write_results([odd], WRITTEN_NS)

    stored = store.fetch_results()[0]["detections"]
    assert stored == [{"box": [None, 1.0, 2.0, 3.0], "label": "x", "score": None}]
    back = detections_from_json(stored)[0]
    assert math.isnan(back.box[0]) and math.isnan(back.score)


def test_frame_without_sequence_number_stores_null_seq(store: DetectionStore) -> None:
    result = make_result(7, seq=None)

    store.write_results([result], WRITTEN_NS)

    row = store.fetch_results()[0]
    assert row["seq"] is None
    assert row["frame_id"] == "kafka/frames/0/7"


def test_dead_letters_are_idempotent_by_coordinates_and_stage(store: DetectionStore) -> None:
    letters = [make_letter(5), make_letter(6), make_letter(5, stage="infer")]

    first = store.write_dead_letters(letters, WRITTEN_NS)
    again = store.write_dead_letters([*letters, make_letter(7)], WRITTEN_NS + 1)

    assert first == WriteOutcome(inserted=3, duplicates=0)
    assert again == WriteOutcome(inserted=1, duplicates=3)
    assert store.count_dead_letters() == 4
    rows = store.fetch_dead_letters()
    assert [(r["source_offset"], r["stage"]) for r in rows] == [
        (5, "decode"),
        (5, "infer"),
        (6, "decode"),
        (7, "decode"),
    ]
    assert list(rows[0]) == list(DEAD_LETTER_COLUMNS)
    assert rows[0]["written_ns"] == WRITTEN_NS
    assert rows[-1]["written_ns"] == WRITTEN_NS + 1


def test_dead_letters_keep_payload_length_and_hash_only(
    store: DetectionStore, db_path: Path
) -> None:
    long_detail = "d" * 5000
    store.write_dead_letters(
        [make_letter(1, detail=long_detail), make_letter(2, payload=None)], WRITTEN_NS
    )
    store.close()

    with SQLiteStore(db_path) as reopened:
        rows = reopened.fetch_dead_letters()

    assert rows[0]["payload_bytes"] == len(PAYLOAD_MARKER)
    assert rows[0]["payload_sha256"] == hashlib.sha256(PAYLOAD_MARKER).hexdigest()
    assert rows[0]["detail"] == "d" * stores.DETAIL_MAX_CHARS
    assert rows[1]["payload_bytes"] is None
    assert rows[1]["payload_sha256"] is None
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
    assert files
    for path in files:
        assert PAYLOAD_MARKER not in path.read_bytes()


def test_open_store_creates_only_the_default_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    default = open_store("sqlite:///.streamsight/detections.db")
    existing = tmp_path / "abs" / "dir"
    existing.mkdir(parents=True)
    absolute = open_store(f"sqlite:///{existing / 'b.db'}")
    default.write_results([make_result(0)], WRITTEN_NS)
    absolute.write_results([make_result(1)], WRITTEN_NS)
    default.close()
    absolute.close()

    assert (tmp_path / ".streamsight" / "detections.db").is_file()
    assert (existing / "b.db").is_file()
    with SQLiteStore(tmp_path / ".streamsight" / "detections.db") as check:
        assert check.count_results() == 1


@pytest.mark.parametrize(
    "path",
    ["missing/dir/a.db", "{tmp}/missing/dir/b.db", "/nonexistent-streamsight/dir/x.db"],
    ids=["relative", "absolute", "root"],
)
def test_a_sqlite_path_in_a_missing_directory_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.chdir(tmp_path)
    file = Path(path.format(tmp=tmp_path))
    missing = file.parent

    with pytest.raises(StoreConnectionError) as info:
        open_store(f"sqlite:///{file}")

    message = str(info.value)
    assert "\n" not in message
    assert f"directory {str(missing)!r} does not exist" in message
    assert not missing.exists() and not missing.parent.exists()


def test_sqlite_runs_in_wal_mode_and_schema_is_documented(db_path: Path) -> None:
    open_store(f"sqlite:///{db_path}").close()

    with sqlite3.connect(db_path) as raw:
        mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
        result_columns = [row[1] for row in raw.execute("PRAGMA table_info(detections)")]
        letter_columns = [row[1] for row in raw.execute("PRAGMA table_info(dead_letters)")]
        letter_key = [
            row[1]
            for row in sorted(raw.execute("PRAGMA table_info(dead_letters)"), key=lambda r: r[5])
            if row[5]
        ]

    assert mode == "wal"
    assert result_columns == list(RESULT_COLUMNS)
    assert letter_columns == list(DEAD_LETTER_COLUMNS)
    assert letter_key == ["source_topic", "source_partition", "source_offset", "stage"]
    doc = re.sub(r"\s+", " ", stores.__doc__ or "")
    for ddl in stores.POSTGRES_SCHEMA:
        assert re.sub(r"\s+", " ", ddl) in doc


def test_reopening_keeps_rows_and_schema(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    with SQLiteStore(db_path) as first:
        first.write_results([make_result(0)], WRITTEN_NS)

    reopened = open_store(url)
    outcome = reopened.write_results([make_result(0), make_result(1)], WRITTEN_NS)

    assert outcome == WriteOutcome(inserted=1, duplicates=1)
    assert reopened.count_results() == 2
    reopened.close()


def test_concurrent_writers_lose_nothing(db_path: Path) -> None:
    frames = 600
    overlap = range(200, 400)
    plans = [
        [make_result(i) for i in range(0, 400)],
        [make_result(i) for i in reversed(range(200, frames))],
    ]
    outcomes: list[list[WriteOutcome]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(worker: int) -> None:
        try:
            start.wait(timeout=30)
            with SQLiteStore(db_path) as own:
                plan = plans[worker]
                for begin in range(0, len(plan), 7):
                    outcomes[worker].append(own.write_results(plan[begin : begin + 7], worker))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,), daemon=True) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not any(thread.is_alive() for thread in threads)
    assert not errors
    inserted = sum(o.inserted for worker in outcomes for o in worker)
    duplicates = sum(o.duplicates for worker in outcomes for o in worker)
    assert inserted == frames
    assert duplicates == len(overlap)
    with SQLiteStore(db_path) as check:
        ids = [row["frame_id"] for row in check.fetch_results()]
    assert sorted(ids) == sorted(f"job-a/cam-0/{i}" for i in range(frames))
    assert len(set(ids)) == len(ids)


def test_many_connections_opening_a_new_file_at_once(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    opened: list[int] = []

    def open_and_count(path: Path, start: threading.Barrier) -> None:
        try:
            start.wait(timeout=30)
            with SQLiteStore(path) as own:
                opened.append(own.count_results())
        except BaseException as exc:
            errors.append(exc)

    attempts, connections = 25, 6
    for attempt in range(attempts):
        path = tmp_path / f"fresh-{attempt}.db"
        start = threading.Barrier(connections)
        threads = [
            threading.Thread(target=open_and_count, args=(path, start), daemon=True)
            for _ in range(connections)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert errors == []
    assert opened == [0] * attempts * connections


def test_unsupported_url_is_rejected_without_its_password() -> None:
    with pytest.raises(ValueError) as info:
        open_store("mysql://user:PlantedSecret-1@db/x")
    assert "PlantedSecret-1" not in str(info.value)
    assert "mysql://" in str(info.value)


def test_redact_url_masks_user_info_and_query_passwords() -> None:
    assert redact_url("postgresql://app:s3cr%40t@db:5432/x?sslmode=require") == (
        "postgresql://app:***@db:5432/x?sslmode=require"
    )
    assert redact_url("postgresql://app@db/x?password=hunter2") == (
        "postgresql://app@db/x?password=***"
    )
    assert redact_url("postgresql://db/x") == "postgresql://db/x"


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://streamsight:{secret}@127.0.0.1:{port}/detections",
        "postgres://streamsight@127.0.0.1:{port}/detections?password={secret}",
        "postgresql://streamsight:{secret}%zz@127.0.0.1:{port}/detections",
    ],
)
def test_connection_error_never_shows_the_password(template: str) -> None:
    secret = "PlantedSecret-9f3kQ"
    url = template.format(secret=secret, port=free_port())

    # The store itself, given a URL the settings would refuse (a stray %) too.
    with pytest.raises(StoreConnectionError) as info:
        PostgresStore(url)

    rendered = "".join(traceback.format_exception(info.value))
    assert "cannot connect to PostgreSQL at" in str(info.value)
    assert "\n" not in str(info.value)  # the flow prints it as its one line
    assert "127.0.0.1" in str(info.value)
    assert "***" in str(info.value)
    assert secret not in rendered
    assert secret not in repr(info.value)


@pytest.mark.parametrize(
    "url", ["sqlite:///.streamsight/d.db", "sqlite:////tmp/x.db", "postgresql://db.local/app"]
)
def test_redact_url_leaves_a_url_without_secrets_as_it_is(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize(
    ("url", "scheme", "system", "path", "redacted"),
    [
        ("sqlite:///.streamsight/d.db", "sqlite", "sqlite", Path(".streamsight/d.db"), None),
        ("SQLite:////tmp/x.db", "sqlite", "sqlite", Path("/tmp/x.db"), "sqlite:////tmp/x.db"),
        ("sqlite:///:memory:", "sqlite", "sqlite", Path(":memory:"), None),
        ("postgresql://db.local/app", "postgresql", "postgresql", None, None),
        (
            "postgres://app:s3cr%40t@db:5432/x?password=p2&sslmode=require",
            "postgres",
            "postgresql",
            None,
            "postgres://app:***@db:5432/x?password=***&sslmode=require",
        ),
    ],
)
def test_a_sink_url_is_parsed_once_into_what_every_reader_needs(
    url: str, scheme: str, system: str, path: Path | None, redacted: str | None
) -> None:
    sink = parse_sink_url(url)
    assert (sink.scheme, sink.system, sink.path) == (scheme, system, path)
    assert sink.url == f"{scheme}://{url.partition('://')[2]}"
    assert sink.redacted == (redacted or sink.url)
    assert str(sink) == sink.redacted and "s3cr" not in repr(sink) and "p2" not in repr(sink)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqlite://", "file path"),
        ("sqlite:///", "file path"),
        ("sqlite://x.db", "file path"),
        ("sqlite:///dir/", "file path"),
        ("mysql://u:PlantedSecret-2@db/x", "not a sqlite"),
        ("PlantedSecret-2", "not a sqlite"),
        ("postgresql://u:PlantedSecret-2@db:port/x", "port"),
        ("postgresql://u:PlantedSecret-2@db:0/x", "port"),
        ("postgresql://u:PlantedSecret-2%zz@db/x", "%"),
    ],
)
def test_a_bad_sink_url_is_refused_without_repeating_it(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as parse:
        parse_sink_url(url)
    assert "PlantedSecret-2" not in str(parse.value)
    with pytest.raises(ValueError) as opening:
        open_store(url)
    assert "PlantedSecret-2" not in str(opening.value) and problem in str(opening.value)


def test_settings_and_the_store_read_the_same_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.settings import Settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    settings = Settings(sink="SQLITE:///data/d.db")
    assert settings.sink == "sqlite:///data/d.db"
    assert settings.sink_url == parse_sink_url("sqlite:///data/d.db")
    open_store(settings.sink_url).close()
    open_store(settings.sink).close()
    assert (tmp_path / "data" / "d.db").exists()
    assert settings.sink_url.path == Path("data/d.db")
