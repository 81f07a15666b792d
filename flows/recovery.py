"""Recovery for real Kafka: the flow resumes from its last snapshot after a restart.

`python -m bytewax.run flows.video` turns recovery on only with `-r DIR`. Against real
Kafka streamsight turns it on itself: it initialises `STREAMSIGHT_RECOVERY_DIR` (once)
and, when `bytewax.run` was started without `-r`, hands it that directory and the
snapshot interval. An explicit `-r`/`-s` (or `BYTEWAX_RECOVERY_DIRECTORY`) always wins;
a directory named that way is initialised too if it is empty.

In a multi-process cluster only process 0 initialises an empty directory. Bytewax needs
the cluster as a whole to hold every recovery partition exactly once; a process need not
hold any. If every process created its own set, the same partition would exist several
times with different contents, and a resume (above all a rescaled one) could read a stale
copy.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from bytewax.recovery import RecoveryConfig, init_db_dir

log = logging.getLogger(__name__)


def requested_directory(argv: Sequence[str], environ: dict[str, str]) -> str | None:
    """The recovery directory given to `bytewax.run` on its command line or environment."""
    for index, arg in enumerate(argv):
        if arg in ("-r", "--recovery-directory") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--recovery-directory="):
            return arg.split("=", 1)[1]
        if arg.startswith("-r") and len(arg) > 2:
            return arg[2:]
    return environ.get("BYTEWAX_RECOVERY_DIRECTORY")


def process_id(argv: Sequence[str], environ: dict[str, str]) -> int | None:
    """This process's id in a `bytewax.run` cluster, found the way `bytewax.run` finds it
    (`-i`, `BYTEWAX_PROCESS_ID`, or `BYTEWAX_POD_NAME` minus `BYTEWAX_STATEFULSET_NAME-`);
    None for a single process."""
    for index, arg in enumerate(argv):
        if arg in ("-i", "--process-id") and index + 1 < len(argv):
            return int(argv[index + 1])
        if arg.startswith("--process-id="):
            return int(arg.split("=", 1)[1])
        if arg.startswith("-i") and len(arg) > 2 and arg[2:].isdigit():
            return int(arg[2:])
    if environ.get("BYTEWAX_PROCESS_ID"):
        return int(environ["BYTEWAX_PROCESS_ID"])
    pod, statefulset = environ.get("BYTEWAX_POD_NAME"), environ.get("BYTEWAX_STATEFULSET_NAME")
    if pod and statefulset:
        return int(pod.replace(statefulset + "-", ""))
    return None


def ensure_initialised(directory: Path, partitions: int) -> bool:
    """Create the recovery partitions if `directory` has none; True if it did."""
    if directory.is_dir() and any(directory.glob("part-*.sqlite3")):
        return False
    directory.mkdir(parents=True, exist_ok=True)
    init_db_dir(directory, partitions)
    return True


def with_recovery(
    cli_main: Callable[..., Any], directory: Path, snapshot_interval: timedelta
) -> Callable[..., Any]:
    """Wrap `bytewax.run`'s `cli_main` so a run without a recovery config gets one."""

    def cli_main_with_recovery(flow: Any, **kwargs: Any) -> Any:
        if kwargs.get("recovery_config") is None:
            kwargs["recovery_config"] = RecoveryConfig(str(directory))
            kwargs["epoch_interval"] = snapshot_interval
        return cli_main(flow, **kwargs)

    return cli_main_with_recovery


def enable_recovery(directory: str, partitions: int, snapshot_interval_s: float) -> Path:
    """Turn recovery on for this `bytewax.run` process; returns the directory in use."""
    explicit = requested_directory(sys.argv, dict(os.environ))
    path = Path(explicit or directory)
    process = process_id(sys.argv, dict(os.environ))
    if not process:
        if ensure_initialised(path, partitions):
            log.info("initialised %d recovery partitions in %s", partitions, path)
    else:
        # Partitions are created by process 0 only; this one uses those it was given.
        path.mkdir(parents=True, exist_ok=True)
        held = len(list(path.glob("part-*.sqlite3")))
        log.info("process %d holds %d recovery partitions in %s", process, held, path)
    runner = sys.modules.get("__main__")
    spec = getattr(runner, "__spec__", None)
    if explicit is None and spec is not None and spec.name == "bytewax.run":
        runner.cli_main = with_recovery(  # type: ignore[union-attr]
            runner.cli_main,  # type: ignore[union-attr]
            path,
            timedelta(seconds=snapshot_interval_s),
        )
    elif explicit is None:
        log.warning("not started by bytewax.run: recovery left to the caller")
    return path
