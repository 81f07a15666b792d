"""Which Bytewax worker the current thread is, and the routing of keyed steps.

Bytewax sends each item of a keyed step to the worker `siphash13(key) % worker_count`,
so with few keys (4 cameras, 2 workers) the split is often 3 to 1 or 4 to 0, and which it
is depends on the topic's name. `local_key` picks a key that Bytewax routes to a chosen
worker, so frames can be batched and inferred on the worker that read them: the workers
share the model's work as evenly as Bytewax shares the Kafka partitions between them.
`freeze_startup_heap` keeps the interpreter's full garbage collections, which hold the
interpreter lock every worker shares, from walking the objects of start-up, and
`keep_freed_memory` keeps glibc's malloc from handing the forward passes' buffers back to
the kernel after every batch. `threads_per_worker` shares the cores among the workers'
forward passes (without importing torch, so the process launcher can use it).
`run_options` reads `bytewax.run`'s command line and `BYTEWAX_*` variables (workers,
process id, recovery) the way it does: the one place the project parses them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NoReturn

_MASK = (1 << 64) - 1
# By thread id, not `threading.local`: Bytewax's Rust threads hold a Python thread state
# only while they hold the interpreter lock, so thread-local values do not last.
_workers: dict[int, tuple[int, int]] = {}


def freeze_startup_heap() -> int:
    """Collect garbage once, then move every object alive (modules, the model, settings:
    what start-up built and keeps) out of the collector's view; how many were frozen.

    A full collection walks every tracked object with the interpreter lock held: after
    the imports of torch, Bytewax and OpenTelemetry that is over 200,000 objects and 100
    to 150 ms on a 2-core machine, during which no worker runs Python. With them frozen
    it takes a few milliseconds. Objects
    made later are collected as usual; frozen ones are never freed (call this once,
    when start-up is done)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, setting: int = 0, available: int | None = None) -> int:
    """The model's CPU threads for each of `workers` workers: `setting` when given (> 0),
    else the cores (`available`, by default this process's) shared among the workers
    (at least 1)."""
    if setting > 0:
        return setting
    return max(1, (cores() if available is None else available) // max(workers, 1))


MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks up to this size come from malloc's heaps (glibc's largest allowed value)."""
TRIM_THRESHOLD_BYTES = 256 << 20
"""Free memory at the top of a heap is kept up to this size."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_USER_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Have glibc's malloc serve blocks up to `MMAP_THRESHOLD_BYTES` from its heaps and
    keep up to `TRIM_THRESHOLD_BYTES` of freed memory instead of returning it to the
    kernel; whether it did. Not done off glibc, nor when the environment already tunes
    malloc (`GLIBC_TUNABLES` with `glibc.malloc.*`, or `MALLOC_*_`): that choice stands.

    A forward pass allocates and frees megabytes of activations. By default glibc maps
    large blocks afresh and trims the heap's top when they are freed, so the next batch
    touches new pages: 49,000 to 280,000 minor page faults per 2,200 frames on a
    2-core machine, 5,000 to 31,000 with these thresholds. Peak memory is unchanged: what is kept
    is what the last batches used."""
    environ = os.environ if environ is None else environ
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(
        name in environ for name in _USER_TUNING
    ):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols, libc's among them (`find_library` would start
        # `ldconfig` to find libc's file).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def note_worker(index: int, count: int) -> None:
    """Record that the calling thread is worker `index` of `count` (a sink's `build`,
    which Bytewax calls on each worker's own thread before any item flows)."""
    _workers[threading.get_ident()] = (index, count)


RECOVERY_DIRECTORY_ENV = "BYTEWAX_RECOVERY_DIRECTORY"
SNAPSHOT_INTERVAL_ENV = "BYTEWAX_SNAPSHOT_INTERVAL"
BACKUP_INTERVAL_ENV = "BYTEWAX_RECOVERY_BACKUP_INTERVAL"
RECOVERY_ENV = (RECOVERY_DIRECTORY_ENV, SNAPSHOT_INTERVAL_ENV, BACKUP_INTERVAL_ENV)
"""The variables `bytewax.run` reads its recovery flags (`-r`, `-s`, `-b`) from."""


@dataclass(frozen=True)
class RunOptions:
    """What `python -m bytewax.run` makes of its command line and environment: the one
    parsed form of them in this project (see `run_options`)."""

    workers: int = 1
    """Worker threads per process (`-w`)."""
    process_id: int | None = None
    """This process's id in a multi-process cluster (`-i`, or the pod's ordinal); None
    for a single process."""
    recovery_directory: Path | None = None
    """Where the recovery partitions are (`-r`); None when recovery is off."""
    snapshot_interval_s: int | None = None
    """Seconds between snapshots (`-s`)."""
    backup_interval_s: int | None = None
    """Seconds old snapshots are kept (`-b`)."""

    def recovery_problem(self) -> str | None:
        """Why `bytewax.run` refuses these recovery options (its own rule), or None."""
        if self.recovery_directory is not None and (
            self.snapshot_interval_s is None or self.backup_interval_s is None
        ):
            return (
                f"recovery needs {SNAPSHOT_INTERVAL_ENV} and {BACKUP_INTERVAL_ENV} beside "
                f"{RECOVERY_DIRECTORY_ENV} (bytewax.run -r DIR -s SECS -b SECS; -b 0 keeps "
                "no extra snapshots)"
            )
        return None

    def recovery_flags(self, directory: Path | None = None) -> list[str]:
        """The `bytewax.run` flags (`-r`, `-s`, `-b`) that give a process the recovery
        options set here, with `directory` instead of this one when given."""
        flags: list[str] = []
        for flag, value in (
            ("-r", directory or self.recovery_directory),
            ("-s", self.snapshot_interval_s),
            ("-b", self.backup_interval_s),
        ):
            if value is not None:
                flags += [flag, str(value)]
        return flags


class _RunParser(argparse.ArgumentParser):
    """An argument parser whose errors are ValueErrors, not an exit."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def pod_process_id(pod_name: str, statefulset: str) -> int:
    """The process id of StatefulSet pod `pod_name` (`name-3` -> 3), as `bytewax.run`
    derives it from `BYTEWAX_POD_NAME` minus `BYTEWAX_STATEFULSET_NAME-`; ValueError when
    the pod is not one of the StatefulSet's."""
    prefix = statefulset + "-"
    suffix = pod_name.removeprefix(prefix)
    if not pod_name.startswith(prefix) or not suffix.isascii() or not suffix.isdigit():
        raise ValueError(f"pod {pod_name!r} is not a pod of StatefulSet {statefulset!r}")
    return int(suffix)


def run_options(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RunOptions:
    """`bytewax.run`'s options, read the way it reads them (bytewax 0.21.1's
    `bytewax/run.py`): each flag, else its `BYTEWAX_*` variable, and the process id from
    the pod name last. `argv` defaults to the command line when the process was started
    by `bytewax.run` (else none), `environ` to the environment. ValueError on a value
    `bytewax.run` would refuse too."""
    environ = os.environ if environ is None else environ
    if argv is None:
        main = getattr(sys.modules.get("__main__"), "__spec__", None)
        argv = sys.argv[1:] if getattr(main, "name", None) == "bytewax.run" else []
    # Every flag of bytewax.run, so that abbreviations (`--process=3`) and flags that take
    # a value (`-a "h:p;h:p"`) are read as it reads them; each falls back to its variable.
    parser = _RunParser(add_help=False, allow_abbrev=True)
    for short, long, kind, variable in (
        ("-r", "--recovery-directory", Path, RECOVERY_DIRECTORY_ENV),
        ("-s", "--snapshot-interval", int, SNAPSHOT_INTERVAL_ENV),
        ("-b", "--backup-interval", int, BACKUP_INTERVAL_ENV),
        ("-w", "--workers-per-process", int, "BYTEWAX_WORKERS_PER_PROCESS"),
        ("-i", "--process-id", int, "BYTEWAX_PROCESS_ID"),
        ("-a", "--addresses", str, "BYTEWAX_ADDRESSES"),
    ):
        parser.add_argument(short, long, type=kind, default=environ.get(variable))
    known, _ = parser.parse_known_args(list(argv))
    process_id = known.process_id
    pod, statefulset = environ.get("BYTEWAX_POD_NAME"), environ.get("BYTEWAX_STATEFULSET_NAME")
    if process_id is None and pod is not None and statefulset is not None:
        process_id = pod_process_id(pod, statefulset)
    return RunOptions(
        workers=max(known.workers_per_process or 1, 1),
        process_id=process_id,
        recovery_directory=known.recovery_directory,
        snapshot_interval_s=known.snapshot_interval,
        backup_interval_s=known.backup_interval,
    )


def workers_per_process(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """The worker threads per process that `python -m bytewax.run` was asked for (its
    `-w` / `--workers-per-process` flag, else `BYTEWAX_WORKERS_PER_PROCESS`, else 1; also
    1 when its options do not parse). Arguments as for `run_options`."""
    try:
        return run_options(argv, environ).workers
    except ValueError:
        return 1


def current_worker() -> tuple[int, int] | None:
    """(index, count) of the worker running on this thread, or None if none was noted."""
    return _workers.get(threading.get_ident())


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK


def siphash13(data: bytes) -> int:
    """SipHash-1-3 with a zero key: what Rust's `DefaultHasher::new()` computes."""
    v0, v1 = 0x736F6D6570736575, 0x646F72616E646F6D
    v2, v3 = 0x6C7967656E657261, 0x7465646279746573

    def sip_round() -> None:
        nonlocal v0, v1, v2, v3
        v0 = (v0 + v1) & _MASK
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _MASK
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _MASK
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _MASK
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)

    whole = len(data) - len(data) % 8
    for start in range(0, whole, 8):
        word = int.from_bytes(data[start : start + 8], "little")
        v3 ^= word
        sip_round()
        v0 ^= word
    last = ((len(data) & 0xFF) << 56) | int.from_bytes(data[whole:], "little")
    v3 ^= last
    sip_round()
    v0 ^= last
    v2 ^= 0xFF
    for _ in range(3):
        sip_round()
    return v0 ^ v1 ^ v2 ^ v3


def routed_worker(key: str, worker_count: int) -> int:
    """The worker Bytewax sends items of `key` to (Rust hashes a `String` as its bytes
    and a 0xFF byte)."""
    return siphash13(key.encode() + b"\xff") % worker_count


@lru_cache(maxsize=4096)
def local_key(key: str, worker: int, worker_count: int) -> str:
    """`key`, or `key#n` with the smallest n, such that Bytewax routes it to `worker`."""
    candidate, n = key, 0
    while routed_worker(candidate, worker_count) != worker:
        n += 1
        candidate = f"{key}#{n}"
    return candidate
