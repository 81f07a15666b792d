"""Cluster wiring: process ids read the way bytewax.run reads them (checked against a
real `bytewax.run`), pod ordinals, the peers hostfile, and which process creates the
recovery partitions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows import cluster
from flows.cluster import peer_addresses, write_hostfile
from flows.recovery import prepare_directory
from operators.workers import pod_process_id, run_options
from tests.fixtures.kafka import REPO_ROOT, subprocess_env

POD = {"BYTEWAX_POD_NAME": "streamsight-3", "BYTEWAX_STATEFULSET_NAME": "streamsight"}
# Every way of saying "process 3" that bytewax.run understands.
PROCESS_3: list[tuple[list[str], dict[str, str]]] = [
    (["-i3"], {}),
    (["-i", "3"], {}),
    (["-i=3"], {}),
    (["--process-id=3"], {}),
    (["--process-id", "3"], {}),
    (["--process=3"], {}),  # an abbreviation, as argparse allows
    (["-w2", "-i3"], {}),
    ([], {"BYTEWAX_PROCESS_ID": "3"}),
    ([], POD),
    (["-i", "3"], {"BYTEWAX_POD_NAME": "streamsight-1", "BYTEWAX_STATEFULSET_NAME": "streamsight"}),
]


@pytest.mark.parametrize(("flags", "environ"), PROCESS_3)
def test_every_form_of_the_process_id_is_read_as_bytewax_run_reads_it(
    flags: list[str], environ: dict[str, str]
) -> None:
    assert run_options(["flows.video", *flags], environ).process_id == 3


def test_a_single_process_has_no_process_id() -> None:
    assert run_options(["flows.video", "-w", "2"], {}).process_id is None
    assert run_options(["flows.video", "-a", "h:1;h:2"], {}).process_id is None


def test_a_process_id_bytewax_run_refuses_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="process-id"):
        run_options(["flows.video", "-i", "x"], {})
    with pytest.raises(ValueError, match="addresses"):  # bytewax.run: expected one argument
        run_options(["flows.video", "-a", "-i9"], {})
    with pytest.raises(ValueError, match="not a pod of StatefulSet"):
        run_options([], {"BYTEWAX_POD_NAME": "other-1", "BYTEWAX_STATEFULSET_NAME": "s"})


PROBE = """
import json, os
from operators.workers import run_options
options = run_options()
print(json.dumps({"process_id": options.process_id, "workers": options.workers}), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize(("flags", "environ"), [PROCESS_3[i] for i in (0, 5, 6, 7, 8)])
def test_a_real_bytewax_run_and_run_options_agree(
    flags: list[str], environ: dict[str, str], tmp_path: Path
) -> None:
    """bytewax.run parses its flags, then imports the flow module: the probe reads them
    there with `run_options` and exits before any cluster forms. Without `-a`, bytewax.run
    refuses to start when (and only when) it found a process id."""
    (tmp_path / "probe.py").write_text(PROBE)
    clean = {k: v for k, v in subprocess_env().items() if not k.startswith("BYTEWAX_")}
    command = [sys.executable, "-m", "bytewax.run", f"{tmp_path / 'probe.py'}:flow", *flags]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *extra],
            cwd=REPO_ROOT,
            env={**clean, **environ},
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = run()
    assert refused.returncode == 2
    assert "addresses option is required if a process_id is passed" in refused.stderr
    probed = run("-a", "127.0.0.1:1;127.0.0.1:2;127.0.0.1:3;127.0.0.1:4")
    assert probed.returncode == 0, probed.stderr
    assert json.loads(probed.stdout) == {"process_id": 3, "workers": 2 if "-w2" in flags else 1}


def test_ordinal_of_a_statefulset_pod() -> None:
    assert pod_process_id("streamsight-0", "streamsight") == 0
    assert pod_process_id("streamsight-12", "streamsight") == 12
    for pod in ("other-1", "streamsight-", "streamsight-x", "streamsight-\u0663"):
        with pytest.raises(ValueError):
            pod_process_id(pod, "streamsight")


def test_peer_addresses_name_every_pod_through_the_headless_service(tmp_path: Path) -> None:
    addresses = peer_addresses("ss", 3, 2101, service="peers", namespace="ns")
    assert addresses == [f"ss-{i}.peers.ns.svc.cluster.local:2101" for i in range(3)]
    assert peer_addresses("ss", 2, 2101, hosts=["a", "b:9"]) == ["a:2101", "b:9"]
    hostfile = tmp_path / "etc" / "hostfile"
    write_hostfile(hostfile, addresses)
    assert hostfile.read_text().splitlines() == addresses
    with pytest.raises(ValueError):
        peer_addresses("ss", 2, 2101, hosts=["a"])


def test_only_process_zero_creates_recovery_partitions(tmp_path: Path) -> None:
    assert prepare_directory(tmp_path / "p0", 0, 4) == 4
    assert prepare_directory(tmp_path / "p0", 0, 4) == 4
    assert prepare_directory(tmp_path / "p1", 1, 4) == 0
    assert prepare_directory(tmp_path / "single", None, 2) == 2
    assert (tmp_path / "p1").is_dir()


@pytest.mark.parametrize(
    "name", ["STREAMSIGHT_REPLICAS", "STREAMSIGHT_PEER_PORT", "STREAMSIGHT_RECOVERY_PARTITIONS"]
)
@pytest.mark.parametrize("value", ["x", "-1", "2.5"])
def test_a_bad_number_in_the_environment_is_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        cluster.main(["--pod-name", "s-0", "--statefulset", "s", "--replicas", "1"])
    assert str(caught.value) == f"streamsight: {name}: not a whole number (expected digits, e.g. 3)"
