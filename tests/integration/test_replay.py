"""Replay: the dataflow runs as a real `python -m bytewax.run flows.video` process with
Bytewax's recovery (its BYTEWAX_* variables) against a Kafka-protocol broker, is killed
with SIGKILL several times mid-run and restarted, and the sink still holds every input
frame exactly once. Without recovery, real Kafka says so in one line; the embedded demo
broker refuses recovery."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flows.pipeline import build_flow
from flows.settings import Settings
from operators import contract
from operators.frames import DeadLetter, FrameBatch, FrameResult
from operators.telemetry.tracing import Tracing, send_tracer, setup_tracing
from operators.workers import RECOVERY_ENV
from tests.fixtures.kafka import REPO_ROOT, read_topic, subprocess_env
from tests.integration.kafka_frames import (
    assert_stored_once,
    fill_topic,
    flow_settings,
    flow_topics,
    stored,
)
from tools.camera import OutgoingFrame
from tools.scene import encode_jpeg, render_frame

pytestmark = pytest.mark.integration

KILLS = 3


def test_kill_9_and_restart_gives_every_frame_exactly_once(
    kafka_bootstrap, kafka_config, create_topic, unique_topic, tmp_path: Path
) -> None:
    topics = flow_topics(create_topic, unique_topic)
    expected = fill_topic(
        kafka_config, topics["frames"], cameras=4, frames_per_camera=150, job_id="replay"
    )
    db = tmp_path / "sink.db"
    env = subprocess_env(
        **flow_settings(kafka_bootstrap, topics, db),
        STREAMSIGHT_STOP_AT_END="true",
        BYTEWAX_RECOVERY_DIRECTORY=str(tmp_path / "recovery"),
        BYTEWAX_SNAPSHOT_INTERVAL="1",
        BYTEWAX_RECOVERY_BACKUP_INTERVAL="0",
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


def stand_in_model(batch: FrameBatch) -> list[FrameResult]:
    """A stand-in for the detector (what is tested is the snapshot, not the model)."""
    done = time.time_ns()
    return [
        FrameResult(f.meta, (), "stand-in", "0", "cpu", len(batch.frames), batch.flush_reason,
                    batch.dispatched_ns, done, batch.batch_id)
        for f in batch.frames
    ]  # fmt: skip


def camera_messages(frames: int) -> list[KafkaSourceMessage]:
    """`frames` JPEG frames of one camera, each with its send span's context."""
    camera = setup_tracing(
        exporter=InMemorySpanExporter(), processor=SimpleSpanProcessor, flush_at_exit=False
    )
    send = send_tracer(camera, "frames", "snap")
    assert send is not None
    messages = []
    for seq in range(frames):
        jpeg = encode_jpeg(render_frame(0, seq).rgb)
        now_ms = time.time() * 1000
        extra = send(OutgoingFrame("cam-0", seq, jpeg, now_ms))
        headers = contract.frame_headers(
            job_id="snap", camera="cam-0", seq=seq, capture_time_ms=now_ms, trace_headers=extra
        )
        messages.append(
            KafkaSourceMessage(b"cam-0", jpeg, "frames", headers, 0, seq, (1, int(now_ms)))
        )
    return messages


def run_recovered(
    items: list[Any], recovery: Path, spans: InMemorySpanExporter | None
) -> list[FrameResult]:
    """Run the flow over `items` (traced into `spans`, or not traced) with recovery in
    `recovery`, snapshotting every epoch; the results it wrote."""
    tracing = (
        setup_tracing(exporter=spans, processor=SimpleSpanProcessor, flush_at_exit=False)
        if spans is not None
        else Tracing.disabled()
    )
    results: list[FrameResult] = []
    letters: list[DeadLetter] = []
    # Batches flush at 8 frames or at the end: frames wait in the batcher's state.
    flow = build_flow(
        Settings(batch_max_size=8, batch_max_delay_ms=600_000),
        source=TestingSource(items),
        infer=stand_in_model,
        input_size=(64, 48),
        results=TestingSink(results),
        dead_letters=TestingSink(letters),
        tracing=tracing,
    )
    with contextlib.suppress(RuntimeError):  # the source's abort, on the first run
        run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(recovery)))
    assert letters == []
    return results


@pytest.mark.parametrize("traced_first", [True, False], ids=["traced-then-not", "not-then-traced"])
def test_a_snapshot_resumes_whether_tracing_was_on_or_off(
    tmp_path: Path, traced_first: bool
) -> None:
    # Frames wait in the batcher when the source aborts; the snapshot holding them is
    # resumed with tracing switched the other way. Snapshots hold no telemetry: each frame
    # is written once, and its carrier says where its trace goes on.
    init_db_dir(tmp_path, 1)
    messages = camera_messages(6)
    items: list[Any] = [*messages[:4], TestingSource.ABORT(), *messages[4:]]
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    assert run_recovered(items, tmp_path, first if traced_first else None) == []
    results = run_recovered(items, tmp_path, None if traced_first else second)
    assert sorted(r.meta.frame_id for r in results) == [f"snap/cam-0/{s}" for s in range(6)]
    sent = {m.offset: dict(m.headers)["traceparent"].decode() for m in messages}
    restored = [r for r in results if r.meta.trace_carrier["traceparent"] != sent[r.meta.seq]]
    if traced_first:
        # Frames decoded before the abort carry their ingest span, made by the first run.
        ingests = {
            f"{s.context.span_id:016x}"
            for s in first.get_finished_spans()
            if s.name == "process frames"
        }
        assert restored and len(restored) < 6
        assert {r.meta.trace_carrier["traceparent"].split("-")[2] for r in restored} <= ingests
    else:
        # Frames restored from the snapshot go on under the camera's span; the others
        # were decoded with tracing and carry their ingest span.
        spans = second.get_finished_spans()
        decoded = {
            s.attributes["streamsight.frame.id"] for s in spans if s.name == "process frames"
        }
        assert len(decoded) < 6
        waits = [s for s in spans if s.name == "batch wait"]
        assert {s.attributes["streamsight.frame.id"] for s in waits} == {
            r.meta.frame_id for r in results
        }
        for wait in waits:
            frame_id = wait.attributes["streamsight.frame.id"]
            seq = int(str(frame_id).rsplit("/", 1)[1])
            assert wait.parent is not None
            if frame_id not in decoded:
                assert f"{wait.parent.span_id:016x}" == sent[seq].split("-")[2]
