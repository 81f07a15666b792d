"""The process launcher: each process's command line and environment (ports, recovery
flags, model threads), its refusals, and the supervision of its children."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.processes import (
    Layout,
    adopt_single_process_partitions,
    exit_code,
    layout_for,
    main,
    refusal,
    supervise,
)
from flows.settings import Settings
from operators.workers import RunOptions

RECOVERY = {
    "BYTEWAX_RECOVERY_DIRECTORY": "/var/lib/recovery",
    "BYTEWAX_SNAPSHOT_INTERVAL": "5",
    "BYTEWAX_RECOVERY_BACKUP_INTERVAL": "0",
}


def test_every_process_runs_the_flow_in_one_loopback_cluster() -> None:
    layout = Layout(processes=3, workers=2, peer_port=2200)
    assert layout.addresses() == ["127.0.0.1:2200", "127.0.0.1:2201", "127.0.0.1:2202"]
    assert layout.argv(1, python="py") == [
        "py", "-m", "bytewax.run", "flows.video", "-w", "2", "-i", "1",
        "-a", "127.0.0.1:2200;127.0.0.1:2201;127.0.0.1:2202",
    ]  # fmt: skip


def test_each_process_gets_its_own_ports_and_recovery_directory(tmp_path: Path) -> None:
    options = RunOptions(recovery_directory=tmp_path, snapshot_interval_s=5, backup_interval_s=0)
    layout = Layout(
        processes=2, metrics_port=9464, api_port=3030, recovery_options=options, cores=2
    )
    environ = {"OTEL_SERVICE_NAME": "mine", "STREAMSIGHT_BROKERS": "kafka:9092", **RECOVERY}
    envs = [layout.environment(i, environ) for i in range(2)]
    assert [e["STREAMSIGHT_METRICS_PORT"] for e in envs] == ["9464", "9465"]
    assert [e["BYTEWAX_DATAFLOW_API_PORT"] for e in envs] == ["3030", "3031"]
    for index, env in enumerate(envs):
        assert env["OTEL_SERVICE_NAME"] == "mine"
        assert env["STREAMSIGHT_BROKERS"] == "kafka:9092"
        # Bytewax's recovery flags, not the shared variables, give each its own directory.
        assert not RECOVERY.keys() & env.keys()
        assert layout.argv(index, python="py")[-6:] == [
            "-r", str(tmp_path / f"process-{index}"), "-s", "5", "-b", "0",
        ]  # fmt: skip
    assert environ["BYTEWAX_RECOVERY_DIRECTORY"] == "/var/lib/recovery"  # left as it was


def test_without_recovery_no_process_gets_recovery_flags() -> None:
    layout = Layout(processes=2)
    assert layout.recovery(0) is None
    assert "-r" not in layout.argv(0) and "-s" not in layout.argv(0)


@pytest.mark.parametrize(
    ("cores", "processes", "workers", "setting", "threads"),
    [
        (2, 2, 1, 0, 1),
        (8, 2, 1, 0, 4),
        (8, 2, 2, 0, 2),
        (2, 4, 1, 0, 1),
        (8, 2, 1, 3, 3),
    ],
)
def test_the_cores_are_split_among_every_worker_unless_set(
    cores: int, processes: int, workers: int, setting: int, threads: int
) -> None:
    layout = Layout(processes=processes, workers=workers, cpu_threads=setting, cores=cores)
    assert layout.model_threads() == threads
    assert layout.environment(0, {})["STREAMSIGHT_CPU_THREADS"] == str(threads)


def test_layout_starts_from_the_user_settings(tmp_path: Path) -> None:
    settings = Settings(brokers="kafka:9092", metrics_port=9500, cpu_threads=0)
    environ = {"BYTEWAX_DATAFLOW_API_PORT": "4000", **RECOVERY}
    layout = layout_for(None, 1, 2101, settings, environ, 6)
    assert layout.processes == 6  # one per usable core
    env = layout.environment(5, {})
    assert env["STREAMSIGHT_METRICS_PORT"] == "9505"
    assert env["BYTEWAX_DATAFLOW_API_PORT"] == "4005"
    assert env["STREAMSIGHT_CPU_THREADS"] == "1"
    assert layout.recovery(5) == Path("/var/lib/recovery/process-5")
    assert layout_for(2, 3, 2101, settings, {}, 6).api_port == 3030
    assert layout_for(2, 3, 2101, settings, {}, 6).recovery(0) is None
    with pytest.raises(ValueError, match="BYTEWAX_DATAFLOW_API_PORT"):
        layout_for(2, 1, 2101, settings, {"BYTEWAX_DATAFLOW_API_PORT": "x"}, 6)
    with pytest.raises(ValueError, match="snapshot-interval"):
        layout_for(2, 1, 2101, settings, {"BYTEWAX_SNAPSHOT_INTERVAL": "soon"}, 6)


def test_refusals() -> None:
    demo = refusal(Settings(brokers=None))
    assert demo is not None
    assert "STREAMSIGHT_BROKERS" in demo and "python -m bytewax.run flows.video" in demo
    assert refusal(Settings(brokers="kafka:9092")) is None
    incomplete = Layout(processes=2, recovery_options=RunOptions(recovery_directory=Path("r")))
    assert "BYTEWAX_SNAPSHOT_INTERVAL" in (incomplete.problem() or "")
    assert Layout(processes=2).problem() is None
    assert "processes" in (Layout(processes=0).problem() or "")
    assert "workers" in (Layout(processes=1, workers=0).problem() or "")
    assert "ports" in (Layout(processes=3, metrics_port=65534).problem() or "")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No STREAMSIGHT_* or BYTEWAX_* variables from the caller."""
    for name in list(os.environ):
        if name.startswith(("STREAMSIGHT_", "BYTEWAX_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_main_refuses_without_brokers_with_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "STREAMSIGHT_BROKERS" in err


@pytest.mark.parametrize("argv", [["-n", "0"], ["-w", "0"], ["-n", "-1"]])
def test_main_refuses_bad_counts(
    argv: list[str], clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("STREAMSIGHT_BROKERS", "kafka:9092")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 1" in err


def test_main_refuses_a_recovery_directory_without_its_intervals_with_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    clean_env.setenv("STREAMSIGHT_BROKERS", "kafka:9092")
    clean_env.setenv("BYTEWAX_RECOVERY_DIRECTORY", str(tmp_path / "recovery"))
    assert main(["-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BYTEWAX_SNAPSHOT_INTERVAL" in err
    assert not (tmp_path / "recovery").exists()


def test_main_rejects_a_bad_process_count_from_the_environment(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("STREAMSIGHT_BROKERS", "kafka:9092")
    clean_env.setenv("STREAMSIGHT_PROCESSES", "many")
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


def test_single_process_partitions_move_to_process_zero(tmp_path: Path) -> None:
    for name in ("part-0.sqlite3", "part-0.sqlite3-wal", "part-1.sqlite3"):
        (tmp_path / name).write_text(name)
    assert adopt_single_process_partitions(tmp_path) == 3
    moved = sorted(p.name for p in (tmp_path / "process-0").iterdir())
    assert moved == ["part-0.sqlite3", "part-0.sqlite3-wal", "part-1.sqlite3"]
    assert not list(tmp_path.glob("part-*"))
    # Process 0 already holds partitions: stray ones are left where they are.
    (tmp_path / "part-7.sqlite3").write_text("stray")
    assert adopt_single_process_partitions(tmp_path) == 0
    assert (tmp_path / "part-7.sqlite3").exists()
    assert adopt_single_process_partitions(tmp_path / "empty") == 0


def test_exit_codes_read_as_a_shell_reports_them() -> None:
    assert exit_code(0) == 0
    assert exit_code(3) == 3
    assert exit_code(-15) == 143


def child(code: str) -> subprocess.Popen[bytes]:
    """A Python child running `code`."""
    return subprocess.Popen([sys.executable, "-c", code])


def test_supervise_returns_zero_when_every_child_succeeds() -> None:
    assert supervise([child("pass"), child("import time; time.sleep(0.3)")]) == 0


def test_a_failed_child_stops_the_others_and_gives_its_code() -> None:
    sleeper = child("import time; time.sleep(60)")
    started = time.monotonic()
    # The failing child is the last one: it is noticed while the first still runs.
    assert supervise([sleeper, child("import time, sys; time.sleep(0.2); sys.exit(3)")]) == 3
    assert sleeper.returncode == -15
    assert time.monotonic() - started < 10


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"ready\n"  # its handler is in place
    assert supervise([stubborn, child("import sys; sys.exit(5)")], grace_s=0.5) == 5
    assert stubborn.returncode == -9
    stubborn.stdout.close()
