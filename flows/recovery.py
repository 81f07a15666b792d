"""Recovery: after a restart the flow resumes from its last snapshot.

Recovery is Bytewax's own, turned on by `bytewax.run`'s flags or their variables:
`python -m bytewax.run flows.video -r DIR -s SECS -b SECS`, or
`BYTEWAX_RECOVERY_DIRECTORY`, `BYTEWAX_SNAPSHOT_INTERVAL` and
`BYTEWAX_RECOVERY_BACKUP_INTERVAL` (the image, docker compose and Kubernetes set them).
Before `bytewax.run` opens the directory, `set_up_recovery` adds what Bytewax leaves to
its user:

- an empty directory gets its `STREAMSIGHT_RECOVERY_PARTITIONS` partitions (what
  `python -m bytewax.recovery DIR N` does), by process 0 only in a multi-process
  cluster: Bytewax needs the cluster as a whole to hold every partition exactly once, and
  a process need not hold any. If every process created its own set, the same partition
  would exist several times with different contents, and a resume (above all a rescaled
  one) could read a stale copy;
- with real Kafka and recovery off, one warning line: a restart reads the input topic
  again from its start;
- with the embedded demo broker, recovery is refused: that broker starts empty at every
  run, so a snapshot's offsets would skip the new run's frames.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from bytewax.recovery import init_db_dir

from operators.workers import (
    BACKUP_INTERVAL_ENV,
    RECOVERY_DIRECTORY_ENV,
    SNAPSHOT_INTERVAL_ENV,
    RunOptions,
)

log = logging.getLogger(__name__)

HOW_TO_TURN_ON = (
    f"{RECOVERY_DIRECTORY_ENV}=DIR {SNAPSHOT_INTERVAL_ENV}=SECONDS {BACKUP_INTERVAL_ENV}=0 "
    "(or bytewax.run flows.video -r DIR -s SECONDS -b 0)"
)
RETIRED = {
    "STREAMSIGHT_RECOVERY_DIR": RECOVERY_DIRECTORY_ENV,
    "STREAMSIGHT_SNAPSHOT_INTERVAL_S": SNAPSHOT_INTERVAL_ENV,
}
"""Variables earlier versions read, and the `bytewax.run` variables that replace them."""


def ensure_initialised(directory: Path, partitions: int) -> bool:
    """Create the recovery partitions if `directory` has none; True if it did."""
    if directory.is_dir() and any(directory.glob("part-*.sqlite3")):
        return False
    directory.mkdir(parents=True, exist_ok=True)
    init_db_dir(directory, partitions)
    return True


def prepare_directory(directory: Path, process: int | None, partitions: int) -> int:
    """Make `directory` ready for process `process` (None: a single process); return how
    many partitions it holds.

    A single process and process 0 create all `partitions` when the directory has none;
    the others only make sure it exists (they may hold partitions moved there by an
    operator). ValueError when `directory` exists and is not a folder."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{RECOVERY_DIRECTORY_ENV}: {directory} exists and is not a folder")
    if not process:
        ensure_initialised(directory, partitions)
    else:
        directory.mkdir(parents=True, exist_ok=True)
    return len(list(directory.glob("part-*.sqlite3")))


def off_warning(environ: Mapping[str, str]) -> str:
    """The one line said when real Kafka runs without recovery."""
    line = (
        "recovery is off: after a restart the flow reads the input topic again from its "
        f"start; turn it on with {HOW_TO_TURN_ON}"
    )
    retired = [f"{old} (now {new})" for old, new in RETIRED.items() if environ.get(old)]
    if retired:
        line += "; no longer read: " + ", ".join(retired)
    return line


def set_up_recovery(
    options: RunOptions,
    partitions: int,
    *,
    embedded: bool,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """Get recovery ready for this `bytewax.run` process, from its `options`; returns the
    directory in use, or None when recovery is off. ValueError when recovery is asked
    for with the embedded broker, or its directory is not a folder."""
    environ = os.environ if environ is None else environ
    directory = options.recovery_directory
    if directory is None:
        if not embedded and not options.process_id:  # said once, by process 0
            log.warning(off_warning(environ))
        return None
    if embedded:
        raise ValueError(
            f"recovery is on ({RECOVERY_DIRECTORY_ENV} or -r), but the embedded demo broker "
            "starts empty at every run and a snapshot would skip its frames: run the demo "
            f"without it (env -u {RECOVERY_DIRECTORY_ENV} python -m bytewax.run flows.video)"
        )
    held = prepare_directory(directory, options.process_id, partitions)
    log.info(
        "process %d holds %d recovery partitions in %s", options.process_id or 0, held, directory
    )
    return directory
