"""Multi-process clusters: `python -m bytewax.run flows.video` processes started with
exactly what the Kubernetes StatefulSet gives its pods (pod name, StatefulSet name, a
hostfile written by `python -m flows.cluster`, one recovery directory per pod), on
loopback, against a Kafka-protocol broker. They form one cluster that stores every frame
exactly once, also across a rescale from 2 to 3 processes that resumes from recovery; and
Kafka credentials reach the client without ever being logged."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.pipeline import free_ports
from tests.fixtures.kafka import REPO_ROOT, read_topic, subprocess_env
from tests.integration.kafka_frames import (
    assert_stored_once,
    fill_topic,
    flow_settings,
    flow_topics,
    stored,
)

pytestmark = pytest.mark.integration

STATEFULSET = "streamsight"
PARTITIONS = 4
"""Recovery partitions: the maximum worker count of these tests (the rescale ends at 3)."""
RUN_TIMEOUT_S = 150.0


@dataclass(frozen=True)
class Pod:
    """What the StatefulSet gives pod `index`: its name, hostfile and recovery volume."""

    index: int
    root: Path

    @property
    def name(self) -> str:
        """The pod name, `streamsight-<index>`."""
        return f"{STATEFULSET}-{self.index}"

    @property
    def hostfile(self) -> Path:
        """Where the init container writes the peers (an emptyDir in the pod)."""
        return self.root / self.name / "etc" / "hostfile"

    @property
    def recovery(self) -> Path:
        """The pod's own recovery volume (from the volumeClaimTemplate)."""
        return self.root / self.name / "recovery"


def prepare_pods(root: Path, replicas: int) -> list[Pod]:
    """Run the StatefulSet's init container (`python -m flows.cluster`) for each pod of a
    `replicas`-process cluster on loopback; return the pods."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(replicas))
    pods = [Pod(index, root) for index in range(replicas)]
    for pod in pods:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cluster", "--hosts", hosts],
            cwd=REPO_ROOT,
            env=subprocess_env(
                BYTEWAX_POD_NAME=pod.name,
                BYTEWAX_STATEFULSET_NAME=STATEFULSET,
                BYTEWAX_HOSTFILE_PATH=str(pod.hostfile),
                STREAMSIGHT_REPLICAS=str(replicas),
                BYTEWAX_RECOVERY_DIRECTORY=str(pod.recovery),
                STREAMSIGHT_RECOVERY_PARTITIONS=str(PARTITIONS),
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    return pods


def pod_env(pod: Pod, base: dict[str, str]) -> dict[str, str]:
    """The container environment of `pod`, as the StatefulSet sets it (snapshots every
    second)."""
    return subprocess_env(
        **base,
        BYTEWAX_POD_NAME=pod.name,
        BYTEWAX_STATEFULSET_NAME=STATEFULSET,
        BYTEWAX_HOSTFILE_PATH=str(pod.hostfile),
        BYTEWAX_RECOVERY_DIRECTORY=str(pod.recovery),
        BYTEWAX_SNAPSHOT_INTERVAL="1",
        BYTEWAX_RECOVERY_BACKUP_INTERVAL="0",
        STREAMSIGHT_RECOVERY_PARTITIONS=str(PARTITIONS),
    )


@contextmanager
def start_cluster(
    pods: list[Pod], base: dict[str, str], logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start one `bytewax.run flows.video` per pod (output to `logs/<pod>.log`); kill
    whatever is still running on exit."""
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for pod in pods:
            with (logs / f"{pod.name}.log").open("ab") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bytewax.run", "flows.video"],
                        cwd=REPO_ROOT,
                        env=pod_env(pod, base),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def wait_all(processes: list[subprocess.Popen[bytes]], logs: Path) -> None:
    """Wait for every process to exit 0, or fail with the tail of their logs."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes):
            break
        time.sleep(0.2)
    codes = [p.poll() for p in processes]
    if codes != [0] * len(processes):
        tails = "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}"
            for log in sorted(logs.glob("*.log"))
        )
        pytest.fail(f"exit codes {codes}\n{tails}")


@pytest.fixture
def cluster_input(
    kafka_bootstrap: str,
    kafka_config: dict[str, Any],
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
    tmp_path: Path,
) -> Callable[[int], tuple[set[str], dict[str, str]]]:
    """`cluster_input(frames_per_camera)`: fresh topics filled with frames of 4 cameras
    plus the known bad ones; returns (good frame ids, the settings of every pod)."""

    def _make(frames_per_camera: int) -> tuple[set[str], dict[str, str]]:
        topics = flow_topics(create_topic, unique_topic)
        expected = fill_topic(
            kafka_config,
            topics["frames"],
            cameras=4,
            frames_per_camera=frames_per_camera,
            job_id="cluster",
        )
        settings = {
            **flow_settings(kafka_bootstrap, topics, tmp_path / "sink.db"),
            "STREAMSIGHT_STOP_AT_END": "true",
            "STREAMSIGHT_FETCH_BATCH_SIZE": "4",
            "STREAMSIGHT_BATCH_MAX_SIZE": "4",
        }
        return expected, settings

    return _make


def test_two_pods_form_one_cluster_and_store_every_frame_once(
    cluster_input: Callable[[int], tuple[set[str], dict[str, str]]],
    kafka_config: dict[str, Any],
    tmp_path: Path,
) -> None:
    expected, settings = cluster_input(40)
    pods = prepare_pods(tmp_path / "pods", 2)
    # Process 0 holds every recovery partition; the other pod's volume starts empty.
    assert len(list(pods[0].recovery.glob("part-*.sqlite3"))) == PARTITIONS
    assert not list(pods[1].recovery.glob("part-*.sqlite3"))
    assert pods[1].hostfile.read_text() == pods[0].hostfile.read_text()
    assert len(pods[0].hostfile.read_text().split()) == 2

    logs = tmp_path / "logs"
    with start_cluster(pods, settings, logs) as processes:
        wait_all(processes, logs)

    db = Path(settings["STREAMSIGHT_SINK"].removeprefix("sqlite:///"))
    assert_stored_once(db, expected)
    # One cluster, not two copies of the flow each reading everything: every frame was
    # published exactly once (two independent flows would publish each twice).
    published = [
        m.key.decode() for m in read_topic(kafka_config, settings["STREAMSIGHT_OUTPUT_TOPIC"])
    ]
    assert sorted(published) == sorted(expected)
    # Still no partition was created outside process 0 by the flow itself.
    assert not list(pods[1].recovery.glob("part-*.sqlite3"))


def test_rescale_from_two_to_three_pods_resumes_exactly_once(
    cluster_input: Callable[[int], tuple[set[str], dict[str, str]]],
    kafka_config: dict[str, Any],
    tmp_path: Path,
) -> None:
    expected, settings = cluster_input(120)
    db = Path(settings["STREAMSIGHT_SINK"].removeprefix("sqlite:///"))
    root = tmp_path / "pods"
    logs = tmp_path / "logs"

    # Two pods run until part of the input is stored, then the whole set is stopped
    # abruptly (scale to 0 with a crash: no graceful end, no final snapshot).
    pods = prepare_pods(root, 2)
    with start_cluster(pods, settings, logs) as processes:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in processes):
            if stored(db)[0] >= 120:
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p in processes), "the cluster ended before the kill"
        for process in processes:
            process.send_signal(signal.SIGKILL)
    first_run = stored(db)[0]
    assert 0 < first_run < len(expected)
    output_topic = settings["STREAMSIGHT_OUTPUT_TOPIC"]
    published_before = len(read_topic(kafka_config, output_topic))

    # The documented rescale: same volumes, STREAMSIGHT_REPLICAS=3, every pod re-prepared
    # by its init container (pod 2 gets a new, empty volume), all started together.
    pods = prepare_pods(root, 3)
    assert len(list(pods[0].recovery.glob("part-*.sqlite3"))) == PARTITIONS
    assert len(pods[2].hostfile.read_text().split()) == 3
    with start_cluster(pods, settings, logs) as processes:
        wait_all(processes, logs)

    assert_stored_once(db, expected)
    # It resumed from a snapshot, not from the start of the topic: the second run
    # published fewer frames than the whole input.
    published_after = len(read_topic(kafka_config, output_topic, expected=published_before))
    assert published_after - published_before < len(expected)
    # The new pod's volume still holds no partition: each exists once in the cluster.
    assert not list(pods[2].recovery.glob("part-*.sqlite3"))


def test_kafka_password_reaches_the_client_but_never_the_logs(
    kafka_bootstrap: str, unique_topic: Callable[[str], str], tmp_path: Path
) -> None:
    planted = "planted-Pa55word-9f3c2e"
    key_password = "planted-KeyPass-71ab0d"
    env = subprocess_env(
        STREAMSIGHT_BROKERS=kafka_bootstrap,
        STREAMSIGHT_INPUT_TOPIC=unique_topic("frames"),
        STREAMSIGHT_STOP_AT_END="true",
        STREAMSIGHT_SECURITY_PROTOCOL="sasl_plaintext",
        STREAMSIGHT_SASL_MECHANISM="PLAIN",
        STREAMSIGHT_SASL_USERNAME="streamsight",
        STREAMSIGHT_SASL_PASSWORD=planted,
        STREAMSIGHT_SSL_KEY_PASSWORD=key_password,
        STREAMSIGHT_SINK=f"sqlite:///{tmp_path / 'sink.db'}",
        STREAMSIGHT_LOG_LEVEL="DEBUG",
        STREAMSIGHT_BROKER_WAIT_S="3",
    )
    with (tmp_path / "flow.log").open("wb") as log:
        # The broker refuses SASL: the flow waits STREAMSIGHT_BROKER_WAIT_S, then exits.
        code = subprocess.run(
            [sys.executable, "-m", "bytewax.run", "flows.video"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=90,
        ).returncode
    assert code != 0
    output = (tmp_path / "flow.log").read_text(errors="replace")
    assert output.strip(), "the flow wrote no logs at all"
    # The SASL settings reached librdkafka: it talks SASL to the broker (and fails).
    assert "sasl" in output.lower(), output[-3000:]
    assert planted not in output
    assert key_password not in output
