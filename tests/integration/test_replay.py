"""Replay: the dataflow runs as a real `python -m bytewax.run flows.video` process with
recovery against a Kafka-protocol broker, is killed with SIGKILL several times mid-run and
restarted, and the sink still holds every input frame exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        STREAMSIGHT_RECOVERY_DIR=str(tmp_path / "recovery"),
        STREAMSIGHT_SNAPSHOT_INTERVAL_S="0.5",
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
