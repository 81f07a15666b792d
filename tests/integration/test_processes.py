"""`python -m flows.processes`: the launcher starts a cluster of single-worker processes
on loopback against a Kafka-protocol broker. Together they store every frame exactly
once, each process works and serves its own metrics and Bytewax API port, process 0
holds the recovery partitions, and a rescale to three processes resumes from them; a stop
signal or a failed child stops them all."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.pipeline import free_ports
from tests.fixtures.kafka import REPO_ROOT, read_topic, subprocess_env
from tests.fixtures.otlp import OtlpServer
from tests.integration.kafka_frames import assert_stored_once, fill_topic, stored

pytestmark = pytest.mark.integration

PARTITIONS = 4
RUN_TIMEOUT_S = 120.0
START_LINE = re.compile(r"process (\d+) of \d+ \(pid (\d+)\)")


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports free on every address right now."""
    for _ in range(200):
        (base,) = free_ports(1)
        if base + count > 65536:
            continue
        with ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def launcher_env(
    settings: dict[str, str], tmp_path: Path, processes: int = 2, **extra: str
) -> dict[str, str]:
    """The launcher's environment for `processes` processes: `settings`, fresh peer,
    metrics and API ports (Bytewax's API on), Bytewax's recovery in a directory under
    `tmp_path` (snapshots every second), no OTEL_* variables of the caller."""
    base = consecutive_free_ports(3 * processes)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("OTEL_")}
    return dict(
        env,
        **settings,
        STREAMSIGHT_PEER_PORT=str(base),
        STREAMSIGHT_METRICS_PORT=str(base + processes),
        STREAMSIGHT_METRICS_ADDR="127.0.0.1",
        BYTEWAX_DATAFLOW_API_ENABLED="true",
        BYTEWAX_DATAFLOW_API_PORT=str(base + 2 * processes),
        BYTEWAX_DATAFLOW_API_CACHE_PATH=str(tmp_path),  # a directory
        BYTEWAX_RECOVERY_DIRECTORY=str(tmp_path / "recovery"),
        BYTEWAX_SNAPSHOT_INTERVAL="1",
        BYTEWAX_RECOVERY_BACKUP_INTERVAL="0",
        STREAMSIGHT_RECOVERY_PARTITIONS=str(PARTITIONS),
        **extra,
    )


def launch(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start `python -m flows.processes ARGS`, its output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.processes", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def scrape(port: int) -> str | None:
    """The text of `http://127.0.0.1:<port>/metrics`, or None while it does not answer
    with HTTP (another program on this busy machine may hold the port for a moment)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return reply.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None


def children_of(log: Path, count: int, launcher: subprocess.Popen[bytes]) -> list[int]:
    """The pids of the launcher's `count` children, from its start lines."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and launcher.poll() is None:
        found = dict(START_LINE.findall(log.read_text(errors="replace")))
        if len(found) == count:
            return [int(found[str(i)]) for i in range(count)]
        time.sleep(0.1)
    pytest.fail(f"no start lines: {log.read_text(errors='replace')[-3000:]}")


def alive(pid: int) -> bool:
    """Whether a process `pid` exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_ports(ports: list[int], launcher: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until every port serves /metrics while the launcher runs."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not all(scrape(port) for port in ports):
        if launcher.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"ports {ports} never served: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def topics(
    kafka_bootstrap: str,
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
    tmp_path: Path,
) -> dict[str, str]:
    """Fresh input, output and dead-letter topics and a SQLite sink: the settings."""
    names = {k: unique_topic(k) for k in ("frames", "detections", "dead")}
    for name in names.values():
        create_topic(name, 4)
    return {
        "STREAMSIGHT_BROKERS": kafka_bootstrap,
        "STREAMSIGHT_INPUT_TOPIC": names["frames"],
        "STREAMSIGHT_OUTPUT_TOPIC": names["detections"],
        "STREAMSIGHT_DEAD_LETTER_TOPIC": names["dead"],
        "STREAMSIGHT_SINK": f"sqlite:///{tmp_path / 'sink.db'}",
        "STREAMSIGHT_FETCH_BATCH_SIZE": "4",
        "STREAMSIGHT_BATCH_MAX_SIZE": "4",
    }


def test_two_processes_store_every_frame_once_each_with_its_own_ports(
    topics: dict[str, str],
    kafka_config: dict[str, Any],
    otlp_receiver: OtlpServer,
    tmp_path: Path,
) -> None:
    expected = fill_topic(
        kafka_config,
        topics["STREAMSIGHT_INPUT_TOPIC"],
        cameras=4,
        frames_per_camera=80,
        job_id="processes",
    )
    env = launcher_env(
        topics,
        tmp_path,
        STREAMSIGHT_STOP_AT_END="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    metrics = [int(env["STREAMSIGHT_METRICS_PORT"]) + i for i in range(2)]
    api = [int(env["BYTEWAX_DATAFLOW_API_PORT"]) + i for i in range(2)]
    log = tmp_path / "launcher.log"
    launcher = launch(env, log, "-n", "2")
    served: set[int] = set()
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while launcher.poll() is None and time.monotonic() < deadline:
            for port in set(metrics + api) - served:
                text = scrape(port)
                if text and "# TYPE" in text:
                    served.add(port)
            time.sleep(0.05)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert launcher.returncode == 0, output[-4000:]

    db = Path(topics["STREAMSIGHT_SINK"].removeprefix("sqlite:///"))
    assert_stored_once(db, expected)
    # Every process served its own metrics port; Bytewax's API ports while it ran.
    assert set(metrics) <= served, (served, output[-3000:])
    assert set(api) <= served, (served, output[-3000:])
    # Both processes inferred frames: their spans carry their Bytewax process id.
    spans = otlp_receiver.receiver.snapshot()
    per_process = Counter(
        span.resource.get("bytewax.process.id") for span in spans if span.name == "inference batch"
    )
    assert set(per_process) == {"0", "1"}, Counter(s.name for s in spans)
    # Process 0 holds every recovery partition, process 1 none.
    recovery = tmp_path / "recovery"
    assert len(list((recovery / "process-0").glob("part-*.sqlite3"))) == PARTITIONS
    assert (recovery / "process-1").is_dir()
    assert not list((recovery / "process-1").glob("part-*.sqlite3"))


@contextmanager
def serving_launcher(
    topics: dict[str, str], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], list[int], Path]]:
    """A tailing 2-process launcher once both processes serve metrics: the launcher, its
    children's pids and its log. Killed on the way out if still running."""
    env = launcher_env(topics, tmp_path, STREAMSIGHT_STOP_AT_END="false")
    log = tmp_path / "launcher.log"
    launcher = launch(env, log, "-n", "2")
    try:
        pids = children_of(log, 2, launcher)
        port = int(env["STREAMSIGHT_METRICS_PORT"])
        wait_ports([port, port + 1], launcher, log)
        yield launcher, pids, log
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)


def test_sigterm_to_the_launcher_stops_every_process(
    topics: dict[str, str], tmp_path: Path
) -> None:
    with serving_launcher(topics, tmp_path) as (launcher, pids, _):
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=30)
    assert code == 128 + signal.SIGTERM
    assert not [pid for pid in pids if alive(pid)]


def test_a_failed_process_stops_the_others_and_sets_the_exit_code(
    topics: dict[str, str], tmp_path: Path
) -> None:
    with serving_launcher(topics, tmp_path) as (launcher, pids, log):
        os.kill(pids[1], signal.SIGKILL)
        code = launcher.wait(timeout=30)
    # The killed process's code; its peer, losing the connection, fails too (exit 1),
    # and wins when both ended before the launcher looked.
    assert code in (128 + signal.SIGKILL, 1), log.read_text(errors="replace")[-3000:]
    assert not alive(pids[0])


def test_a_rescale_from_two_to_three_processes_resumes_exactly_once(
    topics: dict[str, str], kafka_config: dict[str, Any], tmp_path: Path
) -> None:
    expected = fill_topic(
        kafka_config,
        topics["STREAMSIGHT_INPUT_TOPIC"],
        cameras=4,
        frames_per_camera=120,
        job_id="rescale",
    )
    db = Path(topics["STREAMSIGHT_SINK"].removeprefix("sqlite:///"))
    log = tmp_path / "launcher.log"
    # Two processes tail the topic until part of it is stored, then are stopped.
    env = launcher_env(topics, tmp_path, STREAMSIGHT_STOP_AT_END="false")
    launcher = launch(env, log, "-n", "2")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while stored(db)[0] < 120 and launcher.poll() is None:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        assert launcher.poll() is None, log.read_text(errors="replace")[-3000:]
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
    assert 0 < stored(db)[0] < len(expected)
    output_topic = topics["STREAMSIGHT_OUTPUT_TOPIC"]
    published_before = len(read_topic(kafka_config, output_topic))

    # Three processes over the same recovery directory resume and finish the topic.
    env = launcher_env(topics, tmp_path, 3, STREAMSIGHT_STOP_AT_END="true")
    launcher = launch(env, log, "-n", "3")
    try:
        code = launcher.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
    assert code == 0, log.read_text(errors="replace")[-4000:]
    assert_stored_once(db, expected)
    # It resumed from a snapshot, not from the start of the topic.
    published_after = len(read_topic(kafka_config, output_topic, expected=published_before))
    assert published_after - published_before < len(expected)
    # Process 0 kept every partition; the new process, like process 1, holds none.
    recovery = tmp_path / "recovery"
    assert len(list((recovery / "process-0").glob("part-*.sqlite3"))) == PARTITIONS
    for index in (1, 2):
        assert not list((recovery / f"process-{index}").glob("part-*.sqlite3"))
