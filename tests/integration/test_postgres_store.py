"""The PostgreSQL store against a real server: idempotent writes from several connections
and processes, dead letters, jsonb detections, reconnects and secret-free errors."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import traceback
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier as BarrierType
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from operators.frames import Detection
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
)
from tests.unit.operators.test_stores import (
    PAYLOAD_MARKER,
    WRITTEN_NS,
    expected_row,
    make_letter,
    make_result,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(postgres_store_url: str) -> Iterator[DetectionStore]:
    opened = open_store(postgres_store_url)
    yield opened
    opened.close()


def write_range(
    url: str,
    indices: list[int],
    batch: int,
    start: BarrierType,
    reports: Queue[tuple[str, object]],
) -> None:
    """Write results for `indices` in batches from a fresh store (runs in a subprocess),
    meeting the other writer at `start` before each batch; report
    `("ok", [(inserted, duplicates), ...])` or `("error", message)`."""
    try:
        written = []
        with PostgresStore(url) as own:
            for begin in range(0, len(indices), batch):
                chunk = [make_result(i) for i in indices[begin : begin + batch]]
                start.wait(timeout=60)
                outcome = own.write_results(chunk, WRITTEN_NS)
                written.append((outcome.inserted, outcome.duplicates))
        reports.put(("ok", written))
    except BaseException as exc:
        start.abort()
        reports.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def test_write_and_rewrite_counts_duplicates(store: DetectionStore) -> None:
    results = [make_result(i) for i in (3, 1, 2, 0)]

    first = store.write_results(results, WRITTEN_NS)
    before = store.fetch_results()
    again = store.write_results([*results, make_result(4)], WRITTEN_NS + 5)

    assert first == WriteOutcome(inserted=4, duplicates=0)
    assert again == WriteOutcome(inserted=1, duplicates=4)
    assert store.count_results() == 5
    after = store.fetch_results()
    assert after[:4] == before
    assert before == [expected_row(r) for r in sorted(results, key=lambda r: r.meta.frame_id)]
    assert after[4]["written_ns"] == WRITTEN_NS + 5


def test_repeats_within_one_batch_count_once(store: DetectionStore) -> None:
    outcome = store.write_results([make_result(1), make_result(1), make_result(2)], WRITTEN_NS)

    assert outcome == WriteOutcome(inserted=2, duplicates=1)
    assert store.count_results() == 2


def test_large_batch_spans_several_statements_in_one_transaction(
    store: DetectionStore,
) -> None:
    results = [make_result(i, content=f"c{i}".encode()) for i in range(2500)]

    outcome = store.write_results(results, WRITTEN_NS)
    hashes = store.stored_hashes([r.meta.frame_id for r in results[::250]] + ["nope"])

    assert outcome == WriteOutcome(inserted=2500, duplicates=0)
    assert store.count_results() == 2500
    assert hashes == {r.meta.frame_id: r.meta.content_sha256 for r in results[::250]}
    assert hashes["job-a/cam-0/250"] == hashlib.sha256(b"c250").hexdigest()
    assert store.stored_hashes([]) == {}


def test_a_failing_row_rolls_back_the_whole_batch(store: DetectionStore) -> None:
    rows = [make_result(i) for i in range(1500)]
    rows.append(make_result(2000, job_id=None))  # type: ignore[arg-type]

    with pytest.raises(RowsRejected) as info:
        store.write_results(rows, WRITTEN_NS)

    assert str(info.value) == (
        "PostgreSQL rejected the rows: NotNullViolation [23502]: null value in column"
        ' "job_id" of relation "detections" violates not-null constraint'
    )  # the primary message only: no row values from the server's DETAIL
    assert store.count_results() == 0
    assert store.write_results(rows[:3], WRITTEN_NS) == WriteOutcome(3, 0)


def test_a_value_that_cannot_be_converted_is_a_rejected_row(store: DetectionStore) -> None:
    odd = make_result(1, detections=(Detection((0, 0, 1, 1), "car", "high"),))  # type: ignore[arg-type]

    with pytest.raises(RowsRejected, match=r"^PostgreSQL rejected the rows: ValueError: "):
        store.write_results([make_result(0), odd], WRITTEN_NS)

    assert store.count_results() == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq": 2**63}, "NumericValueOutOfRange [22003]: bigint out of range"),
        ({"capture_ns": 2**64}, "NumericValueOutOfRange [22003]: bigint out of range"),
        ({"ingest_ns": -(2**63) - 1}, "NumericValueOutOfRange [22003]: bigint out of range"),
        ({"partition": 2**31}, "NumericValueOutOfRange [22003]: integer out of range"),
        ({"job_id": "a\udcff"}, "UnicodeEncodeError"),
    ],
    ids=["seq", "capture_ns", "ingest_ns", "partition", "surrogate"],
)
def test_values_the_columns_cannot_hold_are_rejected_rows(
    store: DetectionStore, change: dict[str, object], message: str
) -> None:
    good = make_result(0)
    bad = make_result(1)
    bad = replace(bad, meta=replace(bad.meta, **change))

    with pytest.raises(RowsRejected) as info:
        store.write_results([good, bad], WRITTEN_NS)

    assert str(info.value).startswith("PostgreSQL rejected the rows: ")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert store.count_results() == 0
    assert store.stored_hashes([bad.meta.frame_id, good.meta.frame_id, "x\udcff/c/1"]) == {}
    with pytest.raises(RowsRejected):
        store.write_dead_letters([replace(make_letter(1), offset=2**63)], WRITTEN_NS)
    assert store.write_results([good], WRITTEN_NS) == WriteOutcome(1, 0)


def test_schema_types_and_columns(store: DetectionStore, postgres_store_url: str) -> None:
    with psycopg.connect(postgres_store_url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        ).fetchall()
        keys = conn.execute(
            "SELECT a.attname FROM pg_index i"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = 'dead_letters'::regclass AND i.indisprimary"
            " ORDER BY array_position(i.indkey::int2[], a.attnum)"
        ).fetchall()

    types = {(table, column): kind for table, column, kind in columns}
    assert [c for t, c, _ in columns if t == "detections"] == list(RESULT_COLUMNS)
    assert [c for t, c, _ in columns if t == "dead_letters"] == list(DEAD_LETTER_COLUMNS)
    assert types[("detections", "detections")] == "jsonb"
    assert types[("detections", "capture_ns")] == "bigint"
    assert types[("detections", "written_ns")] == "bigint"
    assert [k for (k,) in keys] == ["source_topic", "source_partition", "source_offset", "stage"]


def test_detections_round_trip_as_jsonb(store: DetectionStore, postgres_store_url: str) -> None:
    result = make_result(0)
    empty = make_result(1, detections=())
    store.write_results([result, empty], WRITTEN_NS)

    rows = {row["frame_id"]: row for row in store.fetch_results()}
    with psycopg.connect(postgres_store_url) as conn:
        labels = conn.execute(
            "SELECT d->>'label' FROM detections, jsonb_array_elements(detections) d"
            " WHERE frame_id = %s ORDER BY 1",
            (result.meta.frame_id,),
        ).fetchall()

    assert detections_from_json(rows[result.meta.frame_id]["detections"]) == result.detections
    assert rows[result.meta.frame_id]["detection_count"] == 2
    assert rows[empty.meta.frame_id]["detections"] == []
    assert labels == [("car",), ("person",)]


def test_postgres_rows_equal_sqlite_rows(store: DetectionStore, tmp_path: Path) -> None:
    results = [make_result(i) for i in range(20)] + [make_result(99, seq=None)]
    with SQLiteStore(tmp_path / "parity.db") as lite:
        lite.write_results(results, WRITTEN_NS)
        lite.write_dead_letters([make_letter(1), make_letter(2, payload=None)], WRITTEN_NS)
        lite_rows = lite.fetch_results()
        lite_letters = lite.fetch_dead_letters()

    store.write_results(results, WRITTEN_NS)
    store.write_dead_letters([make_letter(1), make_letter(2, payload=None)], WRITTEN_NS)

    assert len(lite_rows) == 21
    assert store.fetch_results() == lite_rows
    assert store.fetch_dead_letters() == lite_letters


def test_dead_letters_idempotent_and_payload_free(
    store: DetectionStore, postgres_store_url: str
) -> None:
    letters = [make_letter(5), make_letter(6), make_letter(5, stage="infer")]

    first = store.write_dead_letters(letters, WRITTEN_NS)
    again = store.write_dead_letters([*letters, make_letter(7, payload=None)], WRITTEN_NS)
    with psycopg.connect(postgres_store_url) as conn:
        dumped = conn.execute("SELECT string_agg(d::text, '') FROM dead_letters d").fetchone()

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
    assert rows[0]["payload_bytes"] == len(PAYLOAD_MARKER)
    assert rows[0]["payload_sha256"] == hashlib.sha256(PAYLOAD_MARKER).hexdigest()
    assert rows[3]["payload_bytes"] is None
    assert dumped is not None and PAYLOAD_MARKER.decode() not in dumped[0]


def test_nul_characters_do_not_break_a_write(store: DetectionStore) -> None:
    letter = make_letter(1, detail="bad header \x00 value")
    result = make_result(0, detections=(Detection((0, 0, 1, 1), "a\x00b", 0.5),))

    assert store.write_dead_letters([letter], WRITTEN_NS) == WriteOutcome(1, 0)
    assert store.write_results([result], WRITTEN_NS) == WriteOutcome(1, 0)
    assert store.fetch_dead_letters()[0]["detail"] == "bad header \ufffd value"
    assert store.fetch_results()[0]["detections"][0]["label"] == "a\ufffdb"
    odd = make_result(1, camera="cam\x001")
    assert store.write_results([odd], WRITTEN_NS) == WriteOutcome(1, 0)
    assert store.stored_hashes([odd.meta.frame_id]) == {odd.meta.frame_id: odd.meta.content_sha256}
    assert store.write_results([odd], WRITTEN_NS) == WriteOutcome(0, 1)


def test_two_processes_writing_overlapping_frames_store_each_once(
    postgres_store_url: str,
) -> None:
    frames, batch = 900, 50
    # Both start on the shared frames 300-599, batch for batch and in step, in opposite
    # orders within each batch: the pattern that deadlocks writers that do not order rows.
    first = list(range(300, 600)) + list(range(0, 300))
    second = [i for k in range(300, 600, batch) for i in reversed(range(k, k + batch))]
    second += list(range(600, frames))
    PostgresStore(postgres_store_url).close()

    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    queue: Queue[tuple[str, object]] = context.Queue()
    workers = [
        context.Process(target=write_range, args=(postgres_store_url, order, batch, start, queue))
        for order in (first, second)
    ]
    for worker in workers:
        worker.start()
    reports = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)

    assert [message for kind, message in reports if kind == "error"] == []
    assert [worker.exitcode for worker in workers] == [0, 0]
    outcomes = [pair for _, written in reports for pair in written]  # type: ignore[attr-defined]
    assert sum(inserted for inserted, _ in outcomes) == frames
    assert sum(duplicates for _, duplicates in outcomes) == 300
    with psycopg.connect(postgres_store_url) as conn:
        total, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT frame_id) FROM detections"
        ).fetchone()  # type: ignore[misc]
        ids = {frame_id for (frame_id,) in conn.execute("SELECT frame_id FROM detections")}
    assert total == distinct == frames
    assert ids == {f"job-a/cam-0/{i}" for i in range(frames)}


def test_connections_racing_on_a_fresh_database(postgres_store_url: str) -> None:
    errors: list[BaseException] = []
    outcomes: list[WriteOutcome] = []
    start = threading.Barrier(4)

    def open_and_write(worker: int) -> None:
        try:
            start.wait()
            with PostgresStore(postgres_store_url) as own:
                outcomes.append(own.write_results([make_result(i) for i in range(50)], worker))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not errors
    assert sum(o.inserted for o in outcomes) == 50
    assert sum(o.duplicates for o in outcomes) == 150


def test_store_reconnects_after_its_connection_is_killed(
    store: DetectionStore, postgres_store_url: str
) -> None:
    store.write_results([make_result(0)], WRITTEN_NS)
    database = urlsplit(postgres_store_url).path.lstrip("/")
    with psycopg.connect(postgres_store_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()

    outcome = store.write_results([make_result(0), make_result(1)], WRITTEN_NS)

    assert killed == (1,)
    assert outcome == WriteOutcome(inserted=1, duplicates=1)
    assert store.count_results() == 2


def test_connection_error_to_real_server_hides_password(postgres_url: str) -> None:
    secret = "PlantedSecret-Zq81x"
    server = urlsplit(postgres_url).netloc.rpartition("@")[2]
    url = f"postgresql://no_such_role:{secret}@{server}/no_such_database_x?password={secret}"

    with pytest.raises(StoreConnectionError) as info:
        open_store(url)

    rendered = "".join(traceback.format_exception(info.value))
    assert "no_such" in str(info.value)
    assert secret not in rendered
    assert secret not in repr(info.value)
