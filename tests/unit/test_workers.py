"""Bytewax's routing of keys to workers, as `operators.workers` predicts it, checked
against real Bytewax dataflows."""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource, cluster_main

from operators.workers import current_worker, local_key, note_worker, routed_worker

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
