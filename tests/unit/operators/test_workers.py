"""Bytewax's routing of keys to workers, as `operators.workers` predicts it, checked
against real Bytewax dataflows."""

from __future__ import annotations

import gc
import platform
import weakref
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource, cluster_main

from operators.workers import (
    current_worker,
    freeze_startup_heap,
    keep_freed_memory,
    local_key,
    note_worker,
    routed_worker,
    workers_per_process,
)

KEYS = [f"frames-{n}/{p}" for n in range(12) for p in range(4)]


class _NoteSink(DynamicSink[Any]):
    """Notes each worker's index on its thread, as the pipeline's sinks do."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> Any:
        note_worker(worker_index, worker_count)

        class _Drop(StatelessSinkPartition[Any]):
            def write_batch(self, items: list[Any]) -> None:
                pass

        return _Drop()


def _workers_of(keys: list[str], worker_count: int) -> dict[str, tuple[int, int] | None]:
    """Run a keyed step over `keys` on `worker_count` workers: the worker each key ran on."""
    ran_on: dict[str, tuple[int, int] | None] = {}

    def record(state: None, key: str) -> tuple[None, str]:
        ran_on[key] = current_worker()
        return state, key

    flow = Dataflow("routing")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(keys)), lambda k: k)
    op.output("out", op.stateful_map("record", keyed, record), _NoteSink())
    cluster_main(flow, [], 0, worker_count_per_proc=worker_count)
    return ran_on


@pytest.mark.parametrize("worker_count", [2, 3, 4])
def test_keys_run_on_the_worker_predicted(worker_count: int) -> None:
    ran_on = _workers_of(KEYS, worker_count)
    assert set(ran_on) == set(KEYS)
    assert {w for w in ran_on.values()} == {(i, worker_count) for i in range(worker_count)}
    assert {k: w[0] for k, w in ran_on.items() if w} == {
        k: routed_worker(k, worker_count) for k in KEYS
    }


def test_local_keys_run_where_asked() -> None:
    wanted = {local_key(k, n % 3, 3): n % 3 for n, k in enumerate(KEYS)}
    ran_on = _workers_of(list(wanted), 3)
    assert {k: w[0] for k, w in ran_on.items() if w} == wanted


def test_a_key_already_routed_there_is_kept() -> None:
    for key in KEYS[:8]:
        home = routed_worker(key, 2)
        assert local_key(key, home, 2) == key
        moved = local_key(key, 1 - home, 2)
        assert moved.startswith(f"{key}#") and routed_worker(moved, 2) == 1 - home


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["flows.video", "-w", "3"], {}, 3),
        (["flows.video", "--workers-per-process=4", "-s", "5"], {}, 4),
        (["flows.video", "-w2"], {"BYTEWAX_WORKERS_PER_PROCESS": "5"}, 2),
        (["flows.video"], {"BYTEWAX_WORKERS_PER_PROCESS": "5"}, 5),
        (["flows.video"], {}, 1),
        (["flows.video"], {"BYTEWAX_WORKERS_PER_PROCESS": "many"}, 1),
    ],
)
def test_workers_per_process_follow_bytewax_run(
    argv: list[str], environ: dict[str, str], expected: int
) -> None:
    assert workers_per_process(argv, environ) == expected


def test_a_command_line_not_of_bytewax_run_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["pytest", "-w", "7"])
    monkeypatch.delenv("BYTEWAX_WORKERS_PER_PROCESS", raising=False)
    assert workers_per_process() == 1


class _Node:
    def __init__(self) -> None:
        self.other: object = self


def test_freezing_the_start_up_heap_collects_first_then_hides_what_is_alive() -> None:
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection frees the cycle before the freeze does
    try:
        cycle = _Node()  # garbage that only the collector frees
        gone = weakref.ref(cycle)
        del cycle
        kept = [[i] for i in range(10_000)]  # lists: always tracked
        tracked = len(gc.get_objects())
        frozen = freeze_startup_heap()
        assert gone() is None  # collected, not frozen for good
        # frozen objects can still be freed (another test's thread letting one go), never
        # added to: the count only falls after the freeze
        assert frozen >= gc.get_freeze_count() >= len(kept)
        assert len(gc.get_objects()) < tracked - len(kept)  # out of the collector's walk
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def test_malloc_keeps_freed_memory_unless_the_environment_tunes_it() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory({}) is glibc
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is glibc
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) is False
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "131072"}) is False
