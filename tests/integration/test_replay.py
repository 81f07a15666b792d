"""Replay: the dataflow runs as a real `python -m bytewax.run flows.video` process with
Bytewax's recovery (its BYTEWAX_* variables) against a Kafka-protocol broker, is killed
with SIGKILL several times mid-run and restarted, and the sink still holds every input
frame exactly once. Without recovery, real Kafka says so in one line; the embedded demo
broker refuses recovery."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from operators.workers import RECOVERY_ENV
from tests.fixtures.kafka import REPO_ROOT, read_topic, subprocess_env
from tests.integration.kafka_frames import assert_stored_once, fill_topic, stored

pytestmark = pytest.mark.integration

KILLS = 3


def test_kill_9_and_restart_gives_every_frame_exactly_once(
    kafka_bootstrap, kafka_config, create_topic, unique_topic, tmp_path: Path
) -> None:
    topics = {k: unique_topic(k) for k in ("frames", "detections", "dead")}
    for name in topics.values():
        create_topic(name, 4)
    expected = fill_topic(
        kafka_config, topics["frames"], cameras=4, frames_per_camera=150, job_id="replay"
    )
    db = tmp_path / "sink.db"
    env = subprocess_env(
        STREAMSIGHT_BROKERS=kafka_bootstrap,
        STREAMSIGHT_INPUT_TOPIC=topics["frames"],
        STREAMSIGHT_OUTPUT_TOPIC=topics["detections"],
        STREAMSIGHT_DEAD_LETTER_TOPIC=topics["dead"],
        STREAMSIGHT_STOP_AT_END="true",
        BYTEWAX_RECOVERY_DIRECTORY=str(tmp_path / "recovery"),
        BYTEWAX_SNAPSHOT_INTERVAL="1",
        BYTEWAX_RECOVERY_BACKUP_INTERVAL="0",
        STREAMSIGHT_SINK=f"sqlite:///{db}",
        STREAMSIGHT_FETCH_BATCH_SIZE="4",
        STREAMSIGHT_BATCH_MAX_SIZE="4",
    )
    command = [sys.executable, "-m", "bytewax.run", "flows.video"]
    kills = 0
    for _ in range(KILLS):
        before = stored(db)[0]
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        # Kill once it has written something new, so each kill lands mid-run.
        while proc.poll() is None and time.monotonic() < deadline:
            if stored(db)[0] >= before + 40:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    assert kills == KILLS, "the flow finished before it could be killed: give it more input"
    assert stored(db)[0] < len(expected)

    final = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()[-3000:]

    assert_stored_once(db, expected)
    # The output topic is at-least-once: every frame is there, repeats keep the same key.
    published = {m.key.decode() for m in read_topic(kafka_config, topics["detections"])}
    assert published == expected
    # Recovery resumed from snapshots: far fewer than KILLS + 1 full passes were needed.
    recovery = tmp_path / "recovery"
    assert any(recovery.glob("part-*.sqlite3"))


def test_real_kafka_without_recovery_warns_in_one_line(
    kafka_bootstrap, kafka_config, create_topic, unique_topic, tmp_path: Path
) -> None:
    topic = unique_topic("frames")
    create_topic(topic, 1)
    fill_topic(kafka_config, topic, cameras=1, frames_per_camera=2, job_id="no-recovery")
    env = subprocess_env(
        STREAMSIGHT_BROKERS=kafka_bootstrap,
        STREAMSIGHT_INPUT_TOPIC=topic,
        STREAMSIGHT_OUTPUT_TOPIC=unique_topic("detections"),
        STREAMSIGHT_DEAD_LETTER_TOPIC=unique_topic("dead"),
        STREAMSIGHT_STOP_AT_END="true",
        STREAMSIGHT_SINK=f"sqlite:///{tmp_path / 'sink.db'}",
        STREAMSIGHT_METRICS_ENABLED="false",
        STREAMSIGHT_RECOVERY_DIR=str(tmp_path / "old-setting"),
        OTEL_SDK_DISABLED="true",
    )
    for name in RECOVERY_ENV:
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "recovery is off" in line]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert "BYTEWAX_RECOVERY_DIRECTORY=DIR" in warnings[0]
    assert "STREAMSIGHT_RECOVERY_DIR (now BYTEWAX_RECOVERY_DIRECTORY)" in warnings[0]
    # Nothing was written for recovery, neither by streamsight nor by Bytewax.
    assert not (tmp_path / "old-setting").exists()
    assert not list(tmp_path.rglob("part-*.sqlite3"))


def test_the_embedded_demo_refuses_recovery_in_one_line(tmp_path: Path) -> None:
    env = subprocess_env(
        BYTEWAX_RECOVERY_DIRECTORY=str(tmp_path / "recovery"),
        BYTEWAX_SNAPSHOT_INTERVAL="1",
        BYTEWAX_RECOVERY_BACKUP_INTERVAL="0",
        STREAMSIGHT_METRICS_ENABLED="false",
        OTEL_SDK_DISABLED="true",
    )
    env.pop("STREAMSIGHT_BROKERS", None)
    done = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines[-20:]
    assert lines[0].startswith("streamsight: recovery is on"), lines
    assert "env -u BYTEWAX_RECOVERY_DIRECTORY" in lines[0]
    assert not (tmp_path / "recovery").exists()
