"""The README's first command: `python -m bytewax.run flows.video` with no Kafka configured
runs the demo on the embedded broker, prints a summary and exits 0."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSIGHT_")}
    env.update(
        {
            "STREAMSIGHT_SINK": f"sqlite:///{tmp_path / 'detections.db'}",
            "STREAMSIGHT_DEMO_FRAMES": "120",
            "STREAMSIGHT_DEMO_FPS": "30",
            "STREAMSIGHT_DEMO_JOB_ID": "demo-test",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def test_demo_runs_to_the_end_and_prints_the_summary(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=ROOT,
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "frames in" in output and "120" in output
    assert "mAP@0.5" in output
    with sqlite3.connect(tmp_path / "detections.db") as db:
        rows = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT frame_id), SUM(detection_count) FROM detections "
            "WHERE job_id = 'demo-test'"
        ).fetchone()
    assert rows[0] == 120 and rows[1] == 120
    assert rows[2] > 120  # several objects per synthetic frame


def test_demo_rerun_is_a_new_job_and_both_runs_are_kept(tmp_path: Path) -> None:
    for _ in range(2):
        env = demo_env(tmp_path, STREAMSIGHT_DEMO_FRAMES="20", STREAMSIGHT_DEMO_FPS="0")
        del env["STREAMSIGHT_DEMO_JOB_ID"]
        proc = subprocess.run(
            [sys.executable, "-m", "bytewax.run", "flows.video"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with sqlite3.connect(tmp_path / "detections.db") as db:
        jobs = db.execute("SELECT job_id, COUNT(*) FROM detections GROUP BY job_id").fetchall()
    assert len(jobs) == 2 and all(count == 20 for _, count in jobs)


def test_bad_configuration_fails_fast_with_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=ROOT,
        env=demo_env(tmp_path, STREAMSIGHT_BATCH_MAX_SIZE="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "STREAMSIGHT_BATCH_MAX_SIZE" in proc.stderr


@pytest.mark.parametrize(
    ("setting", "value", "code", "message"),
    [
        (
            "STREAMSIGHT_MODEL_PATH",
            "/nonexistent/model.pt",
            2,
            "streamsight: STREAMSIGHT_MODEL_PATH",
        ),
        (
            "STREAMSIGHT_SINK",
            "postgresql://user:planted-pg-secret@127.0.0.1:1/db",
            1,
            "streamsight: cannot connect to PostgreSQL",
        ),
    ],
)
def test_unusable_model_or_sink_stops_before_the_flow_with_one_line(
    tmp_path: Path, setting: str, value: str, code: int, message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=ROOT,
        env=demo_env(tmp_path, **{setting: value}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr
    assert "planted-pg-secret" not in proc.stdout + proc.stderr


def run_demo(tmp_path: Path, **extra: str) -> str:
    """Run the demo with `extra` settings; its output (it must exit 0)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=ROOT,
        env=demo_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return output


def test_the_demo_cameras_send_frames_of_the_size_asked(tmp_path: Path) -> None:
    output = run_demo(
        tmp_path,
        STREAMSIGHT_DEMO_FRAMES="20",
        STREAMSIGHT_DEMO_FPS="0",
        STREAMSIGHT_DEMO_FRAME_SIZE="1280x720",
    )
    assert "1280x720" in output and "mAP@0.5" in output
    with sqlite3.connect(tmp_path / "detections.db") as db:
        sizes = db.execute("SELECT DISTINCT width, height FROM detections").fetchall()
    assert sizes == [(1280, 720)]


def test_frames_skipped_as_stale_are_a_row_of_the_summary_and_none_is_missing(
    tmp_path: Path,
) -> None:
    # Every frame is older than a microsecond when it reaches the batcher.
    output = run_demo(
        tmp_path,
        STREAMSIGHT_DEMO_FRAMES="20",
        STREAMSIGHT_DEMO_FPS="0",
        STREAMSIGHT_MAX_FRAME_AGE_MS="0.001",
    )
    skipped = [line for line in output.splitlines() if "skipped (stale)" in line]
    assert len(skipped) == 1 and " 20 " in skipped[0], output[-3000:]
    missing = [line for line in output.splitlines() if "missing" in line]
    assert len(missing) == 1 and missing[0].split()[-2] == "0", missing
    with sqlite3.connect(tmp_path / "detections.db") as db:
        reasons = db.execute("SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason").fetchall()
    assert reasons == [("stale", 20)]


def test_no_stale_row_without_an_age_limit(tmp_path: Path) -> None:
    output = run_demo(tmp_path, STREAMSIGHT_DEMO_FRAMES="8", STREAMSIGHT_DEMO_FPS="0")
    assert "skipped (stale)" not in output and "frames processed" in output
