"""Kafka that is not there: at start the flow waits a bounded time and exits with one
line; while running, an outage stalls the flow, logs sparingly, and loses nothing."""

from __future__ import annotations

import logging
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path

import pytest

from operators.detector import load_detector
from operators.inference import Inferencer
from operators.kafka_io import CheckedProducer, high_watermarks
from tests.fixtures.kafka import broker_subprocess, subprocess_env
from tests.helpers import frame_headers, jpeg_bytes
from tests.integration.kafka_frames import DEAD_LETTERS, fill_topic
from tests.integration.test_kafka_flow import run_flow
from tools.embedded import EmbeddedBroker

pytestmark = pytest.mark.integration

WAIT_S = 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_video(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=tmp_path,
        env=subprocess_env(
            STREAMSIGHT_BROKER_WAIT_S=str(WAIT_S),
            STREAMSIGHT_METRICS_ENABLED="false",
            STREAMSIGHT_STOP_AT_END="true",
            **env,
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.monotonic() - started


def _assert_one_line_exit(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0
    assert len(output) == 1, output[:20]
    assert output[0].startswith("streamsight: cannot reach Kafka at ")
    assert "Traceback" not in output[0]
    for needle in needles:
        assert needle in output[0]


def test_unreachable_broker_exits_with_one_line(tmp_path: Path) -> None:
    brokers = f"127.0.0.1:{_closed_port()}"
    done, seconds = _run_video(tmp_path, STREAMSIGHT_BROKERS=brokers)
    _assert_one_line_exit(done, brokers, f"within {WAIT_S} s", "Connection refused")
    assert seconds < 60


def test_failed_sasl_login_exits_with_one_line(tmp_path: Path) -> None:
    password = "planted-sasl-secret-7f3a"
    with broker_subprocess() as broker:
        done, _ = _run_video(
            tmp_path,
            STREAMSIGHT_BROKERS=broker.bootstrap,
            STREAMSIGHT_SECURITY_PROTOCOL="sasl_plaintext",
            STREAMSIGHT_SASL_MECHANISM="PLAIN",
            STREAMSIGHT_SASL_USERNAME="camera",
            STREAMSIGHT_SASL_PASSWORD=password,
        )
    _assert_one_line_exit(done, broker.bootstrap, "_AUTHENTICATION")
    assert password not in done.stdout + done.stderr


@pytest.fixture(scope="module")
def inferencer() -> Inferencer:
    return Inferencer.create(load_detector(), device="cpu")


def _stored_rows(db: Path) -> int:
    if not db.exists():
        return 0
    with closing(sqlite3.connect(db)) as conn:
        try:
            return conn.execute("SELECT count(*) FROM detections").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_outage_mid_run_stalls_and_resumes(
    tmp_path: Path,
    inferencer: Inferencer,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Frames before and after a 6 s outage of the only broker are all stored once, and
    librdkafka's reconnect lines reach the log at most once per interval."""
    caplog.set_level(logging.WARNING)
    db = tmp_path / "out.db"
    ends: dict[tuple[str, int], int] = {}
    ends_known = threading.Event()

    def end_offsets() -> Mapping[tuple[str, int], int] | None:
        return ends if ends_known.is_set() else None

    with EmbeddedBroker() as broker:
        topics = {"input": "frames", "output": "detections", "dlq": "dead-letters"}
        for name in topics.values():
            broker.create_topic(name, 4)
        config = {"bootstrap.servers": broker.bootstrap}
        before = fill_topic(config, "frames", cameras=2, frames_per_camera=6, job_id="before")
        flow = threading.Thread(
            target=run_flow,
            args=(config, topics, f"sqlite:///{db}", inferencer),
            kwargs={"end_offsets": end_offsets},
        )
        flow.start()
        deadline = time.monotonic() + 60
        while _stored_rows(db) < len(before) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _stored_rows(db) == len(before)

        broker.set_broker_down(1)
        time.sleep(6)
        broker.set_broker_up(1)

        producer = CheckedProducer({**config, "enable.idempotence": True, "acks": "all"})
        try:
            for camera in range(2):
                for seq in range(100, 106):
                    producer.produce(
                        "frames",
                        jpeg_bytes(),
                        key=f"cam-{camera}".encode(),
                        headers=list(frame_headers("after", f"cam-{camera}", seq)),
                    )
            producer.flush_and_check()
        finally:
            producer.close()
        ends.update(_end_offsets(config, "frames"))
        ends_known.set()
        flow.join(timeout=120)
        assert not flow.is_alive()

    with closing(sqlite3.connect(db)) as conn:
        ids = [row[0] for row in conn.execute("SELECT frame_id FROM detections")]
        letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    after = {f"after/cam-{c}/{s}" for c in range(2) for s in range(100, 106)}
    assert sorted(ids) == sorted(before | after)
    assert letters == DEAD_LETTERS

    err = capfd.readouterr().err
    assert "|FAIL|" not in err  # librdkafka's own stderr lines, one per reconnect attempt
    reconnects = [r for r in caplog.records if r.name == "operators.kafka_io.librdkafka"]
    assert 1 <= len(reconnects) <= 2


def _end_offsets(config: dict[str, str], topic: str) -> dict[tuple[str, int], int]:
    return {(topic, p): high for p, high in high_watermarks(config, topic).items()}
