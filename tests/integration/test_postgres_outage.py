"""The sinks against a real PostgreSQL server that refuses rows or goes away.

Rows the database refuses become `sink_rejected` dead letters and the rest is stored.
A server stopped in the middle of a run stalls the flow, which resumes when the server is
back: every frame stored once, exit status 0, one warning per interval and the outage on
`/metrics`. A server that stays down past `STREAMSIGHT_SINK_RETRY_S` ends the flow with
one line and no traceback.

The outage tests run their own server (they stop it) on a fixed port, restarted on the
same port as a database server restarted in place would be.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from operators import contract
from operators import dead_letters as dl
from operators.detector import load_detector
from operators.frames import FrameBatch, FrameResult
from operators.inference import Inferencer
from operators.sinks import DeadLetterSink, ResultSink
from operators.stores import open_store
from operators.tally import Tally
from tests.fixtures.kafka import read_topic
from tests.fixtures.postgres import (
    TemporaryPostgres,
    database_url,
    free_port,
    temporary_postgres,
)
from tests.integration.kafka_frames import DEAD_LETTERS, fill_topic
from tests.integration.test_kafka_flow import run_flow
from tests.unit.operators.test_sinks import overflowing, result

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Planted-pg-Secret-77"
OUTAGE_S = 15.0
FLOW_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server() -> Iterator[TemporaryPostgres]:
    """A PostgreSQL server of this module's own, which its tests stop and start."""
    with temporary_postgres() as pg:
        yield pg


@pytest.fixture
def database(server: TemporaryPostgres) -> str:
    """URL (password included, which trust authentication ignores) of a new database."""
    server.restart()
    name = f"outage_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(server.url(), name)
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def count_frames(url: str) -> tuple[int, int, int]:
    """(rows, distinct frame ids, dead letters) in the database at `url`; zeros while it
    has no tables yet or cannot be reached."""
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            rows, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT frame_id) FROM detections"
            ).fetchone()  # type: ignore[misc]
            (letters,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()  # type: ignore[misc]
    except psycopg.Error:
        return 0, 0, 0
    return int(rows), int(distinct), int(letters)


def sink_series(port: int) -> dict[str, float]:
    """`streamsight_sink_unavailable` and `streamsight_sink_retries_total` of the results
    sink, read from the flow's /metrics (empty while it cannot be read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("sink") == "results" and sample.name in (
                "streamsight_sink_unavailable",
                "streamsight_sink_retries_total",
            ):
                found[sample.name] = sample.value
    return found


class Flow:
    """`python -m bytewax.run flows.video` on the embedded broker's demo, writing to
    `sink`, its output in files."""

    def __init__(self, tmp_path: Path, sink: str, frames: int, fps: float, **extra: str) -> None:
        self.metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSIGHT_")}
        env.update(
            {
                "STREAMSIGHT_SINK": sink,
                "STREAMSIGHT_DEMO_FRAMES": str(frames),
                "STREAMSIGHT_DEMO_FPS": str(fps),
                "STREAMSIGHT_DEMO_JOB_ID": "outage",
                "STREAMSIGHT_PROGRESS": "false",
                "STREAMSIGHT_METRICS_PORT": str(self.metrics_port),
                "STREAMSIGHT_METRICS_ADDR": "127.0.0.1",
                "OTEL_TRACES_EXPORTER": "none",
                "PYTHONUNBUFFERED": "1",
                **extra,
            }
        )
        self.stdout = tmp_path / "flow.out"
        self.stderr = tmp_path / "flow.err"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bytewax.run", "flows.video"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `condition` until true; fail (with the flow's output) when the flow exits
        first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"flow exited before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {what} in {timeout_s} s:\n{self.output()}"
            time.sleep(0.2)

    def finish(self, timeout_s: float = FLOW_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"flow still running after {timeout_s} s:\n{self.output()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_rows_postgresql_refuses_become_dead_letters_and_the_rest_is_stored(
    postgres_store_url: str,
) -> None:
    tally = Tally()
    results = ResultSink(
        postgres_store_url,
        None,
        output_topic="detections",
        dead_letter_topic="dead",
        on_results=tally.results_written,
        on_letters=tally.dead_letters_written,
    ).build("sink", 0, 1)
    letters = DeadLetterSink(
        postgres_store_url, None, topic="dead", on_letters=tally.dead_letters_written
    ).build("dead_letters", 0, 1)
    big_seq = overflowing(3, seq=2**63, frame_id="job/cam-0/9223372036854775808")
    huge_capture = overflowing(5, capture_ns=2**64)
    odd_letter = replace(
        dl.reject_decoded(result(7).meta, stage="decode", reason=dl.BAD_HEADER, detail="x"),
        offset=2**64,
    )
    batch = [result(0), result(1), big_seq, result(2), huge_capture, result(4)]

    results.write_batch(batch)
    results.write_batch(batch)  # the same batch again after a restart: no crash loop
    letters.write_batch([odd_letter])
    results.close()
    letters.close()

    store = open_store(postgres_store_url)
    try:
        rows = store.fetch_results()
        dead = store.fetch_dead_letters()
    finally:
        store.close()
    assert [r["frame_id"] for r in rows] == [f"job/cam-0/{i}" for i in (0, 1, 2, 4)]
    rejected = [d for d in dead if d["reason"] == dl.SINK_REJECTED]
    assert [(d["frame_id"], d["source_offset"]) for d in rejected] == [
        ("job/cam-0/9223372036854775808", 3),
        ("job/cam-0/5", 5),
    ]
    assert all(
        "NumericValueOutOfRange [22003]: bigint out of range" in d["detail"] for d in rejected
    )
    assert all(PASSWORD not in d["detail"] for d in dead)
    (safe,) = [d for d in dead if d["reason"] == dl.BAD_HEADER]
    assert safe["source_offset"] == -1 and "offset 18446744073709551616" in safe["detail"]
    assert (tally.written, tally.dead_letters) == (4, 5)


@pytest.fixture(scope="module")
def inferencer() -> Inferencer:
    return Inferencer.create(load_detector(), device="cpu")


def test_flow_through_kafka_dead_letters_the_rows_postgresql_refuses(
    kafka_config: dict[str, Any],
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
    postgres_store_url: str,
    inferencer: Inferencer,
) -> None:
    topics = {"input": unique_topic("frames"), "output": unique_topic("detections")}
    topics["dlq"] = unique_topic("dead-letters")
    for name in topics.values():
        create_topic(name, 4)
    expected = fill_topic(
        kafka_config, topics["input"], cameras=3, frames_per_camera=6, job_id="refused"
    )

    def infer(batch: FrameBatch) -> list[FrameResult]:
        """The real model, then camera 1's capture times pushed past int64: a value that
        got through decoding but that the database refuses (a partial fake, on purpose)."""
        results = inferencer.infer(batch)
        return [
            replace(r, meta=replace(r.meta, capture_ns=2**64)) if r.meta.camera == "cam-1" else r
            for r in results
        ]

    run_flow(kafka_config, topics, postgres_store_url, inferencer, infer=infer)
    run_flow(kafka_config, topics, postgres_store_url, inferencer, infer=infer)  # no crash loop

    refused = {frame_id for frame_id in expected if "/cam-1/" in frame_id}
    store = open_store(postgres_store_url)
    try:
        rows = {row["frame_id"] for row in store.fetch_results()}
        letters = store.fetch_dead_letters()
    finally:
        store.close()
    assert rows == expected - refused
    rejected = [d for d in letters if d["reason"] == dl.SINK_REJECTED]
    assert {d["frame_id"] for d in rejected} == refused and len(rejected) == len(refused)
    assert len(letters) == DEAD_LETTERS + len(refused)
    published = read_topic(kafka_config, topics["dlq"], expected=DEAD_LETTERS + 2 * len(refused))
    # Once per run: a replay meets the refused frames again, as it meets bad input again.
    reasons = [m.header(contract.DLQ_REASON) for m in published]
    assert reasons.count(dl.SINK_REJECTED) == 2 * len(refused)
    assert all(
        "bigint out of range" in (m.header(contract.DLQ_DETAIL) or "")
        for m in published
        if m.header(contract.DLQ_REASON) == dl.SINK_REJECTED
    )


def test_a_write_waits_for_a_stopped_server_and_completes_once(
    server: TemporaryPostgres, database: str
) -> None:
    events: list[tuple[str, bool]] = []
    retrying = threading.Event()

    def on_outage(sink: str, unavailable: bool) -> None:
        events.append((sink, unavailable))
        if unavailable:
            retrying.set()

    part = ResultSink(
        database, None, output_topic="d", dead_letter_topic="x", on_outage=on_outage
    ).build("sink", 0, 1)
    part.write_batch([result(i) for i in range(5)])
    errors: list[BaseException] = []

    def write() -> None:
        try:
            part.write_batch([result(i) for i in range(3, 10)])
        except BaseException as exc:
            errors.append(exc)

    server.stop()
    writer = threading.Thread(target=write, daemon=True)
    try:
        writer.start()
        assert retrying.wait(timeout=30), "the sink never reported the outage"
        assert writer.is_alive()  # still waiting: nothing acknowledged past unwritten rows
    finally:
        server.restart()
    writer.join(timeout=60)
    part.close()

    assert not writer.is_alive() and errors == []
    assert count_frames(database) == (10, 10, 0)
    assert events[0] == ("results", True) and events[-1] == ("results", False)
    assert all(unavailable for _, unavailable in events[:-1])


def test_flow_stalls_while_postgresql_is_down_and_stores_every_frame_once(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    frames = 600
    flow = Flow(tmp_path, database, frames=frames, fps=6)  # 4 cameras: about 25 s of input
    try:
        flow.wait_for(lambda: count_frames(database)[0] >= 100, 240, "100 frames stored")
        server.stop()
        stopped = time.monotonic()
        try:
            flow.wait_for(
                lambda: sink_series(flow.metrics_port).get("streamsight_sink_unavailable") == 1,
                OUTAGE_S,
                "outage on /metrics",
            )
            during = count_frames(database)
            series = sink_series(flow.metrics_port)
            time.sleep(max(0.0, stopped + OUTAGE_S - time.monotonic()))
        finally:
            server.restart()
        status = flow.finish()
    finally:
        flow.kill()

    output = flow.output()
    stored, distinct, letters = count_frames(database)
    warnings = re.findall(r"WARNING operators\.sinks: database .* unavailable for", output)
    seen = re.findall(r"available again after (\S+) s \((\d+) retries\)", output)
    print(
        f"\nserver down {OUTAGE_S:.0f} s, seen by the sink as {seen}: sent {frames},"
        f" stored {stored}, distinct {distinct}, dead-lettered {letters},"
        f" duplicated {stored - distinct}, exit {status}, outage warnings {len(warnings)}"
    )
    assert status == 0, output[-4000:]
    assert during == (0, 0, 0)  # unreachable while stopped
    assert (stored, distinct, letters) == (frames, frames, 0)
    assert series["streamsight_sink_retries_total"] >= 1
    assert 1 <= len(warnings) <= 3  # one per 10 s of the 15 s outage, not one per attempt
    assert "available again" in output
    assert "Traceback" not in output and "panicked" not in output
    assert PASSWORD not in output


def test_flow_gives_up_with_one_line_when_postgresql_stays_down(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    flow = Flow(tmp_path, database, frames=400, fps=5, STREAMSIGHT_SINK_RETRY_S="3")
    try:
        flow.wait_for(lambda: count_frames(database)[0] >= 20, 240, "20 frames stored")
        server.stop()
        stopped = time.monotonic()
        status = flow.finish(timeout_s=120)
        waited = time.monotonic() - stopped
    finally:
        flow.kill()
        server.restart()

    stderr = flow.stderr.read_text(errors="replace")
    output = flow.output()
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"\ngave up after {waited:.1f} s with exit {status}: {lines[-1] if lines else ''}")
    assert status == 1, output[-4000:]
    last = lines[-1]
    assert [line for line in lines if line.startswith("streamsight:")] == [last]
    assert last.startswith("streamsight: the sink's database postgresql://postgres:***@127.0.0.1:")
    assert re.search(
        r"was unavailable for [34] s \(STREAMSIGHT_SINK_RETRY_S=3\), giving up: ", last
    )
    assert "Connection refused" in last or "shutting down" in last
    assert "Traceback" not in output and "panicked" not in output
    assert PASSWORD not in output
