"""Recovery set-up: Bytewax's own flags and variables turn it on, read as `bytewax.run`
reads them; an empty directory is initialised once, by process 0 only; real Kafka without
recovery says so in one line; the embedded demo broker refuses it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.recovery import ensure_initialised, off_warning, prepare_directory, set_up_recovery
from operators.workers import RunOptions, run_options

ON = {
    "BYTEWAX_RECOVERY_DIRECTORY": "rec",
    "BYTEWAX_SNAPSHOT_INTERVAL": "5",
    "BYTEWAX_RECOVERY_BACKUP_INTERVAL": "0",
}


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["flows.video", "-r", "rec", "-s", "5", "-b", "0"], {}),
        (["flows.video", "-rrec", "-s5", "-b0"], {}),
        (["flows.video", "--recovery-directory=rec", "--snapshot-interval=5", "-b", "0"], {}),
        (["flows.video"], ON),
        (["flows.video", "-r", "rec"], {**ON, "BYTEWAX_RECOVERY_DIRECTORY": "elsewhere"}),
    ],
)
def test_recovery_options_are_read_as_bytewax_run_reads_them(
    argv: list[str], environ: dict[str, str]
) -> None:
    options = run_options(argv, environ)
    assert options.recovery_directory == Path("rec")
    assert (options.snapshot_interval_s, options.backup_interval_s) == (5, 0)
    assert options.recovery_problem() is None


def test_recovery_is_off_without_a_directory() -> None:
    options = run_options(["flows.video", "-s", "5"], {})
    assert options.recovery_directory is None
    assert options.recovery_problem() is None


def test_a_directory_without_both_intervals_is_refused_as_bytewax_run_refuses_it() -> None:
    problem = run_options([], {"BYTEWAX_RECOVERY_DIRECTORY": "rec"}).recovery_problem()
    assert problem is not None
    assert "BYTEWAX_SNAPSHOT_INTERVAL" in problem and "BYTEWAX_RECOVERY_BACKUP_INTERVAL" in problem
    with pytest.raises(ValueError, match="snapshot-interval"):
        run_options(["-s", "0.5"], {})  # whole seconds only, as bytewax.run takes them


def test_recovery_flags_name_every_option_that_is_set() -> None:
    options = run_options([], ON)
    assert options.recovery_flags() == ["-r", "rec", "-s", "5", "-b", "0"]
    assert options.recovery_flags(Path("rec/process-1"))[:2] == ["-r", "rec/process-1"]
    assert RunOptions(snapshot_interval_s=3).recovery_flags() == ["-s", "3"]
    assert RunOptions().recovery_flags() == []


def test_partitions_are_initialised_once(tmp_path: Path) -> None:
    directory = tmp_path / "recovery"
    assert ensure_initialised(directory, 3) is True
    assert len(list(directory.glob("part-*.sqlite3"))) == 3
    assert ensure_initialised(directory, 3) is False


def test_a_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "recovery"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"BYTEWAX_RECOVERY_DIRECTORY: .* is not a folder"):
        prepare_directory(file, None, 2)


def on(directory: Path, process: int | None = None) -> RunOptions:
    return RunOptions(
        process_id=process,
        recovery_directory=directory,
        snapshot_interval_s=5,
        backup_interval_s=0,
    )


def test_a_single_process_and_process_zero_initialise_the_directory(tmp_path: Path) -> None:
    assert set_up_recovery(on(tmp_path / "a"), 3, embedded=False) == tmp_path / "a"
    assert len(list((tmp_path / "a").glob("part-*.sqlite3"))) == 3
    set_up_recovery(on(tmp_path / "b", 0), 3, embedded=False)
    assert len(list((tmp_path / "b").glob("part-*.sqlite3"))) == 3
    set_up_recovery(on(tmp_path / "c", 1), 3, embedded=False)
    assert (tmp_path / "c").is_dir() and not list((tmp_path / "c").iterdir())


def test_real_kafka_without_recovery_warns_once_per_cluster(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="flows.recovery"):
        assert set_up_recovery(RunOptions(), 8, embedded=False, environ={}) is None
        set_up_recovery(RunOptions(process_id=1), 8, embedded=False, environ={})
        set_up_recovery(RunOptions(), 8, embedded=True, environ={})
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line
    assert "recovery is off" in line and "reads the input topic again from its start" in line
    for name in ON:
        assert name in line
    assert "-r DIR -s SECONDS -b 0" in line


def test_the_warning_names_variables_that_are_no_longer_read() -> None:
    line = off_warning({"STREAMSIGHT_RECOVERY_DIR": "/var/lib/recovery"})
    assert "STREAMSIGHT_RECOVERY_DIR (now BYTEWAX_RECOVERY_DIRECTORY)" in line
    assert "/var/lib/recovery" not in line
    assert "no longer read" not in off_warning({})


def test_the_embedded_broker_refuses_recovery(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="embedded demo broker") as refused:
        set_up_recovery(on(tmp_path / "r"), 8, embedded=True)
    assert "env -u BYTEWAX_RECOVERY_DIRECTORY python -m bytewax.run flows.video" in str(
        refused.value
    )
    assert not (tmp_path / "r").exists()
