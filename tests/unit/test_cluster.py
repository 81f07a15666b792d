"""Cluster wiring: process ids from pod names, the peers hostfile, and which process
creates the recovery partitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import cluster
from flows.cluster import ordinal, peer_addresses, prepare_recovery, write_hostfile
from flows.recovery import process_id


def test_process_id_is_found_the_way_bytewax_run_finds_it() -> None:
    assert process_id(["flows.video", "-i", "2"], {}) == 2
    assert process_id(["flows.video", "--process-id=3"], {}) == 3
    assert process_id(["flows.video"], {"BYTEWAX_PROCESS_ID": "1"}) == 1
    pod = {"BYTEWAX_POD_NAME": "streamsight-4", "BYTEWAX_STATEFULSET_NAME": "streamsight"}
    assert process_id(["flows.video"], pod) == 4
    assert process_id(["flows.video", "-w", "2"], {}) is None


def test_ordinal_of_a_statefulset_pod() -> None:
    assert ordinal("streamsight-0", "streamsight") == 0
    assert ordinal("streamsight-12", "streamsight") == 12
    with pytest.raises(ValueError):
        ordinal("other-1", "streamsight")


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
    assert prepare_recovery(tmp_path / "p0", 0, 4) == 4
    assert prepare_recovery(tmp_path / "p0", 0, 4) == 4
    assert prepare_recovery(tmp_path / "p1", 1, 4) == 0
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
