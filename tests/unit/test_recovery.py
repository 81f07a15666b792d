"""Recovery set-up: the directory comes from bytewax.run's flags or streamsight's setting,
is initialised once, and a run without `-r` gets a recovery config."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from bytewax.recovery import RecoveryConfig

from flows.recovery import ensure_initialised, requested_directory, with_recovery


def test_requested_directory_from_flags_and_environment() -> None:
    assert requested_directory(["flows.video", "-r", "rec"], {}) == "rec"
    assert requested_directory(["flows.video", "--recovery-directory=rec2"], {}) == "rec2"
    assert requested_directory(["flows.video", "-rrec3"], {}) == "rec3"
    assert requested_directory(["flows.video"], {"BYTEWAX_RECOVERY_DIRECTORY": "env"}) == "env"
    assert requested_directory(["flows.video", "-w", "2"], {}) is None


def test_partitions_are_initialised_once(tmp_path: Path) -> None:
    directory = tmp_path / "recovery"
    assert ensure_initialised(directory, 3) is True
    assert len(list(directory.glob("part-*.sqlite3"))) == 3
    assert ensure_initialised(directory, 3) is False


def test_run_without_recovery_config_gets_one(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def cli_main(flow: object, **kwargs: Any) -> None:
        calls.append(kwargs)

    wrapped = with_recovery(cli_main, tmp_path, timedelta(seconds=2))
    wrapped("flow", recovery_config=None, epoch_interval=timedelta(seconds=10))
    explicit = RecoveryConfig("elsewhere")
    wrapped("flow", recovery_config=explicit, epoch_interval=timedelta(seconds=7))
    assert isinstance(calls[0]["recovery_config"], RecoveryConfig)
    assert Path(calls[0]["recovery_config"].db_dir) == tmp_path
    assert calls[0]["epoch_interval"] == timedelta(seconds=2)
    assert calls[1]["recovery_config"] is explicit
    assert calls[1]["epoch_interval"] == timedelta(seconds=7)
