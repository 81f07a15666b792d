"""Run the dataflow as a cluster of processes on this host: `python -m flows.processes`.

Bytewax worker threads (`bytewax.run -w N`) share one interpreter lock; on CPU, one
single-worker process per core runs faster and pays less for telemetry. `bytewax.run`
has no flag for processes, so this launcher starts N `python -m bytewax.run flows.video
-w W -i <i> -a "<peers>"` children that form one Bytewax cluster on loopback, and
supervises them.

Process `i` gets its own ports and directories: peers on `--peer-port` + i, metrics on
`STREAMSIGHT_METRICS_PORT` + i, Bytewax's API on `BYTEWAX_DATAFLOW_API_PORT` (3030) + i,
and `STREAMSIGHT_CPU_THREADS` = cores / (N x W) unless set. Recovery is Bytewax's, from
the launcher's `BYTEWAX_RECOVERY_DIRECTORY`, `BYTEWAX_SNAPSHOT_INTERVAL` and
`BYTEWAX_RECOVERY_BACKUP_INTERVAL`: process i gets `-r <directory>/process-i -s .. -b ..`
(process 0 holds every partition, as a StatefulSet's pod 0 does). SIGTERM and SIGINT
are passed on to every child; when one child fails, the others are stopped and the
launcher exits with the failed child's code.

Real Kafka only: the embedded demo broker lives inside a single process.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from flows.cluster import DEFAULT_PORT
from flows.recovery import prepare_directory
from flows.settings import Settings, settings_or_exit
from operators.workers import RECOVERY_ENV, RunOptions, cores, run_options, threads_per_worker

DEFAULT_API_PORT = 3030
"""Bytewax's dataflow API port when `BYTEWAX_DATAFLOW_API_PORT` is unset."""
GRACE_S = 20.0
"""How long children get to exit after SIGTERM before they are killed."""
HOST = "127.0.0.1"
FLOW = "flows.video"


@dataclass(frozen=True)
class Layout:
    """The cluster: how many processes and workers, and each process's ports and dirs."""

    processes: int
    workers: int = 1
    peer_port: int = DEFAULT_PORT
    metrics_port: int = 9464
    api_port: int = DEFAULT_API_PORT
    recovery_options: RunOptions = field(default_factory=RunOptions)
    """`bytewax.run`'s recovery options, from the launcher's environment; each process
    gets a subdirectory of their directory."""
    cpu_threads: int = 0
    """The user's STREAMSIGHT_CPU_THREADS; 0 splits the cores among all workers."""
    cores: int = 1

    def addresses(self) -> list[str]:
        """`host:port` of every process, in process-id order."""
        return [f"{HOST}:{self.peer_port + i}" for i in range(self.processes)]

    def model_threads(self) -> int:
        """The model's CPU threads per worker."""
        return threads_per_worker(self.processes * self.workers, self.cpu_threads, self.cores)

    def recovery(self, index: int) -> Path | None:
        """The recovery directory of process `index`; None when recovery is off."""
        base = self.recovery_options.recovery_directory
        return None if base is None else base / f"process-{index}"

    def argv(self, index: int, python: str = sys.executable) -> list[str]:
        """The command line of process `index`, its recovery flags included."""
        return [
            python, "-m", "bytewax.run", FLOW,
            "-w", str(self.workers),
            "-i", str(index),
            "-a", ";".join(self.addresses()),
            *self.recovery_options.recovery_flags(self.recovery(index)),
        ]  # fmt: skip

    def environment(self, index: int, environ: Mapping[str, str]) -> dict[str, str]:
        """The environment of process `index`: `environ` with its own ports and model
        threads, without the recovery variables (its flags say them, with its own
        directory)."""
        env = {name: value for name, value in environ.items() if name not in RECOVERY_ENV}
        env["STREAMSIGHT_METRICS_PORT"] = str(self.metrics_port + index)
        env["BYTEWAX_DATAFLOW_API_PORT"] = str(self.api_port + index)
        env["STREAMSIGHT_CPU_THREADS"] = str(self.model_threads())
        return env

    def problem(self) -> str | None:
        """Why this layout cannot run, or None."""
        if self.processes < 1:
            return "--processes must be at least 1"
        if self.workers < 1:
            return "--workers must be at least 1"
        for name, base in (
            ("peer", self.peer_port),
            ("metrics", self.metrics_port),
            ("Bytewax API", self.api_port),
        ):
            if not 1 <= base <= 65536 - self.processes:
                return f"{name} ports {base}..{base + self.processes - 1} are not valid ports"
        return self.recovery_options.recovery_problem()


def layout_for(
    processes: int | None,
    workers: int,
    peer_port: int,
    settings: Settings,
    environ: Mapping[str, str],
    cores: int,
) -> Layout:
    """The layout the options, settings and environment ask for (ValueError on a
    `BYTEWAX_DATAFLOW_API_PORT` that is not a number, or `BYTEWAX_*` variables that
    `bytewax.run` would refuse)."""
    api_port = environ.get("BYTEWAX_DATAFLOW_API_PORT", "").strip() or str(DEFAULT_API_PORT)
    if not api_port.isdigit():
        raise ValueError(f"BYTEWAX_DATAFLOW_API_PORT={api_port!r} is not a port number")
    return Layout(
        processes=cores if processes is None else processes,
        workers=workers,
        peer_port=peer_port,
        metrics_port=settings.metrics_port,
        api_port=int(api_port),
        recovery_options=run_options([], environ),
        cpu_threads=settings.cpu_threads,
        cores=cores,
    )


def refusal(settings: Settings) -> str | None:
    """Why the launcher must not start with these settings, or None."""
    if settings.embedded:
        return (
            "STREAMSIGHT_BROKERS is unset: the embedded demo broker runs in one process; "
            "run `python -m bytewax.run flows.video` for the demo, or point "
            "STREAMSIGHT_BROKERS at Kafka"
        )
    return None


def adopt_single_process_partitions(base: Path) -> int:
    """Move recovery partitions a single `bytewax.run` process left directly in `base`
    into `base/process-0`, unless that already holds some; how many files moved.

    Process 0 holding every partition is how a cluster starts, so a single process's
    snapshots carry over (as a rescale from 1 to N processes would)."""
    target = base / "process-0"
    files = sorted(base.glob("part-*.sqlite3*"))
    if not files or any(target.glob("part-*.sqlite3")):
        return 0
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.move(path, target / path.name)
    return len(files)


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies, so no child outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def supervise(children: Sequence[subprocess.Popen[bytes]], grace_s: float = GRACE_S) -> int:
    """Wait for every child. Stop signals are passed on; the first child to fail gets
    the others stopped (SIGTERM, SIGKILL after `grace_s`). The first failure's exit
    code, else 0."""
    failed: int | None = None
    kill_at: float | None = None

    def stop(signum: int) -> None:
        nonlocal kill_at
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
        if kill_at is None:
            kill_at = time.monotonic() + grace_s

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [child.poll() for child in children]  # every child, every round
            if failed is None and any(code for code in codes):
                failed = exit_code(next(code for code in codes if code))
                stop(signal.SIGTERM)
            if None not in codes:
                return failed or 0
            if kill_at is not None and time.monotonic() > kill_at:
                for child in children:
                    if child.poll() is None:
                        child.kill()
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # String defaults from the environment go through `type` too: a bad value is an
    # argparse error.
    parser = argparse.ArgumentParser(
        prog="python -m flows.processes",
        description="Run the dataflow as a cluster of bytewax.run processes on this host "
        "(one single-worker process per core by default). Needs STREAMSIGHT_BROKERS.",
    )
    parser.add_argument(
        "-n",
        "--processes",
        type=int,
        default=os.environ.get("STREAMSIGHT_PROCESSES") or None,
        help="processes to run (default: STREAMSIGHT_PROCESSES, else the usable cores)",
    )
    parser.add_argument(
        "-w", "--workers", type=int, default=1, help="worker threads per process (default: 1)"
    )
    parser.add_argument(
        "--peer-port",
        type=int,
        default=os.environ.get("STREAMSIGHT_PEER_PORT") or DEFAULT_PORT,
        help="peer port of process 0; process i uses this + i (default: "
        f"STREAMSIGHT_PEER_PORT, else {DEFAULT_PORT})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the processes and supervise them; their exit code."""
    args = _parse_args(argv)
    settings = settings_or_exit()  # the children load the same settings: checked once here
    try:
        layout = layout_for(
            args.processes, args.workers, args.peer_port, settings, os.environ, cores()
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = refusal(settings) or layout.problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    base = layout.recovery_options.recovery_directory
    moved = adopt_single_process_partitions(base) if base is not None else 0
    if moved:
        print(
            f"streamsight: moved {moved} recovery files of a single process into "
            f"{layout.recovery(0)}",
            file=sys.stderr,
        )
    children: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(layout.processes):
            directory = layout.recovery(index)
            recovery = "recovery off"
            if directory is not None:
                held = prepare_directory(directory, index, settings.recovery_partitions)
                recovery = f"recovery {directory} ({held} partitions)"
            child = subprocess.Popen(
                layout.argv(index),
                env=layout.environment(index, os.environ),
                process_group=0,  # a terminal's Ctrl-C reaches them once, through here
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            children.append(child)
            print(
                f"streamsight: process {index} of {layout.processes} (pid "
                f"{child.pid}): peer {layout.addresses()[index]}, metrics :"
                f"{layout.metrics_port + index}, Bytewax API :{layout.api_port + index}, "
                f"{layout.workers} worker(s) x {layout.model_threads()} model thread(s), "
                f"{recovery}",
                file=sys.stderr,
                flush=True,
            )
    except BaseException:
        for child in children:
            child.kill()
            child.wait()
        raise
    return supervise(children)


if __name__ == "__main__":
    sys.exit(main())
