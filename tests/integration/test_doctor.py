"""`python -m tools.doctor` against a real Prometheus scraping the running flow, made to be
bound in known ways: first the offered load far below capacity, then a producer far above
it with batches of one frame (`STREAMSIGHT_BATCH_MAX_SIZE=1`). And the demo's progress
line and summary say the verdict of the same rules in one line.

The flow runs a detector three times wider than the shipped one (untrained, the same
architecture: about 9x the compute per frame, 20 to 40 ms on one thread of a 2-core
machine) on one model thread, so that its capacity (tens of frames/s) is far below the
fast phase's rate and far above the slow phase's on any machine; the fast phase keeps one
core busy for about 15 s.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from operators.kafka_io import CheckedProducer
from tests.fixtures.kafka import REPO_ROOT, subprocess_env
from tests.integration.kafka_frames import flow_settings, flow_topics
from tests.integration.test_prometheus import prometheus_server, wait_for
from tests.metrics_data import free_port
from tools.camera import OutgoingFrame, publish, synthetic_frames

pytestmark = pytest.mark.integration
__all__ = ["prometheus_server"]

PARTITIONS = 4
CAMERAS = 4
WINDOW_S = 10
SLOW_TICKS_PER_S = 1.0  # 4 frames/s
FAST_TICKS_PER_S = 25.0  # 100 frames/s
WIDTH_SCALE = 3


def wide_detector(path: Path) -> Path:
    """Save the shipped architecture `WIDTH_SCALE` times wider, untrained, as a weights
    file `STREAMSIGHT_MODEL_PATH` accepts."""
    from operators.detector import DEFAULT_WIDTHS, TinyDet, load_detector, save_weights

    shipped = load_detector()
    widths = [w * WIDTH_SCALE for w in DEFAULT_WIDTHS]
    model = TinyDet(len(shipped.classes), widths=widths)
    meta = {"classes": list(shipped.classes), "widths": widths, "name": "tinydet-wide"}
    return save_weights(model, meta, path)


def ticks() -> Iterator[list[OutgoingFrame]]:
    """Unbounded ticks of one frame per camera, re-sending a few rendered frames under
    new sequence numbers (rendering every frame would load the cores the flow uses)."""
    rendered = list(synthetic_frames(CAMERAS, 10))
    for seq in itertools.count():
        now_ms = time.time() * 1000
        yield [OutgoingFrame(f.camera, seq, f.jpeg, now_ms) for f in rendered[seq % len(rendered)]]


@contextmanager
def producing(config: dict[str, Any], topic: str, ticks_per_s: float) -> Iterator[None]:
    """Publish `ticks()` to `topic` at `ticks_per_s` until the block ends."""
    stop = threading.Event()
    producer = CheckedProducer({**config, "linger.ms": 5})
    thread = threading.Thread(
        target=publish,
        args=(producer, topic, ticks()),
        kwargs={"job_id": "doctor", "fps": ticks_per_s, "stop": stop, "partitions": PARTITIONS},
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        producer.close()


def doctor(url: str) -> dict[str, Any]:
    """`python -m tools.doctor --json` over the last `WINDOW_S` seconds."""
    command = ["-m", "tools.doctor", "--prometheus", url, "--window", f"{WINDOW_S}s", "--json"]
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_doctor_names_the_offered_load_then_inference_with_batches_of_one(
    prometheus_server: tuple[str, int],
    kafka_bootstrap: str,
    kafka_config: dict[str, Any],
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
    tmp_path: Path,
) -> None:
    url, metrics_port = prometheus_server
    topics = flow_topics(create_topic, unique_topic, PARTITIONS)
    env = subprocess_env(
        **flow_settings(kafka_bootstrap, topics, tmp_path / "sink.db"),
        STREAMSIGHT_METRICS_PORT=str(metrics_port),
        STREAMSIGHT_METRICS_ADDR="127.0.0.1",
        STREAMSIGHT_LAG_INTERVAL_S="0.5",
        STREAMSIGHT_MODEL_PATH=str(wide_detector(tmp_path / "wide.pt")),
        STREAMSIGHT_CPU_THREADS="1",
        STREAMSIGHT_BATCH_MAX_SIZE="1",
        OTEL_SDK_DISABLED="true",
    )
    flow = subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with producing(kafka_config, topics["frames"], SLOW_TICKS_PER_S):
            wait_for(
                url,
                "sum(streamsight_inference_frames_total)",
                lambda r: bool(r) and float(r[0]["value"][1]) >= CAMERAS,
                timeout_s=120,
            )
            time.sleep(WINDOW_S + 1)
            slow = doctor(url)
        assert slow["bound"] == "offered_load", slow
        assert slow["readings"]["lag_growing"] is False

        with producing(kafka_config, topics["frames"], FAST_TICKS_PER_S):
            time.sleep(WINDOW_S + 3)
            fast = doctor(url)
        assert fast["bound"] == "inference", fast
        assert fast["verdict"] == "bound by: inference on cpu"
        rules = [f["rule"] for f in fast["findings"]]
        assert rules[0] == "inference" and "batch-size-capped" in rules
        capped = fast["findings"][rules.index("batch-size-capped")]
        assert "STREAMSIGHT_BATCH_MAX_SIZE" in capped["change"]
        assert fast["readings"]["batch_max_size"] == 1
        assert fast["readings"]["saturated"] is True
    finally:
        flow.kill()
        _, stderr = flow.communicate(timeout=30)
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")[-3000:]


VERDICT = re.compile(
    r"bound by: (the offered load, workers \d+% busy|inference on \w+(, \d+ threads?)?"
    r"|preprocessing CPU, [\d.]+ cores per process|Kafka ingest.*|the sink, .*"
    r"|the interpreter lock, .*|no single stage, .*|nothing yet, .*)"
)


def test_demo_progress_line_and_summary_say_the_bound_in_one_line(tmp_path: Path) -> None:
    env = subprocess_env(
        STREAMSIGHT_SINK=f"sqlite:///{tmp_path / 'detections.db'}",
        STREAMSIGHT_DEMO_FRAMES="240",
        STREAMSIGHT_DEMO_FPS="10",
        STREAMSIGHT_METRICS_PORT=str(free_port()),
        STREAMSIGHT_METRICS_ADDR="127.0.0.1",
        OTEL_SDK_DISABLED="true",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    lines = output.splitlines()
    progress = [line for line in lines if line.startswith("processed ")]
    assert progress and all(" | bound by: " in line for line in progress), output[-3000:]
    for line in progress:
        assert VERDICT.fullmatch(line[line.index("bound by: ") :]), line
    # The summary: its table, then the verdict of the whole run on a line of its own.
    table_end = max(i for i, line in enumerate(lines) if line.startswith("└"))
    assert VERDICT.fullmatch(lines[table_end + 1]), lines[table_end + 1]
    assert lines[table_end + 2].startswith("detections stored in ")
