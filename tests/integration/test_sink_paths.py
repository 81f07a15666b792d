"""Which SQLite sink paths `python -m bytewax.run flows.video` creates: the default
`.streamsight/` directory, and nothing else: a path in a missing directory stops the flow
before it starts, with one line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.postgres import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_flow(cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """The demo flow run in `cwd` with `settings` (and a few frames), to its end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSIGHT_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "STREAMSIGHT_DEMO_FRAMES": "8",
            "STREAMSIGHT_DEMO_FPS": "0",
            "STREAMSIGHT_PROGRESS": "false",
            "STREAMSIGHT_METRICS_PORT": str(free_port()),
            "STREAMSIGHT_METRICS_ADDR": "127.0.0.1",
            "OTEL_TRACES_EXPORTER": "none",
            **settings,
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_sink_in_a_missing_directory_stops_the_flow_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    proc = run_flow(tmp_path, STREAMSIGHT_SINK=f"sqlite:///{missing}/x.db")

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines == [
        f"streamsight: cannot open SQLite store '{missing}/x.db': directory '{missing}'"
        " does not exist (create it first; only a missing .streamsight/ is created)"
    ]
    assert not (tmp_path / "no").exists()


def test_the_default_sink_creates_its_directory(tmp_path: Path) -> None:
    proc = run_flow(tmp_path)

    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    database = tmp_path / ".streamsight" / "detections.db"
    with sqlite3.connect(database) as db:
        (rows,) = db.execute("SELECT count(*) FROM detections").fetchone()
    assert rows == 8
