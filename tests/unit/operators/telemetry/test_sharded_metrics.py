"""Lock-free counters and histograms expose what `prometheus_client`'s own would, also when
several threads update them at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from operators.telemetry.sharded_metrics import ShardedCounter, ShardedHistogram

BUCKETS = (0.005, 0.01, 0.1, 1.0)
VALUES = [0.0, 0.005, 0.0051, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 30.0]  # edges are inclusive


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _same(ours: CollectorRegistry, theirs: CollectorRegistry) -> bool:
    """The same series with the same values; sums added in another order may differ in
    their last bits."""
    mine, reference = _samples(ours), _samples(theirs)
    return mine.keys() == reference.keys() and all(
        mine[key] == pytest.approx(value, rel=1e-12) for key, value in reference.items()
    )


def _in_threads(work: Callable[[int], None], threads: int = 4) -> None:
    started = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()


def test_a_histogram_fed_from_threads_exposes_what_prometheus_client_would() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    sharded = ShardedHistogram("t_seconds", "doc", ["stage"], ours, buckets=BUCKETS)
    reference = Histogram("t_seconds", "doc", ["stage"], registry=theirs, buckets=BUCKETS)
    stages = ("decode", "infer")

    def work(n: int) -> None:
        for _ in range(500):
            for value in VALUES:
                sharded.labels(stages[n % 2]).observe(value)

    _in_threads(work)
    for n in range(4):
        for _ in range(500):
            for value in VALUES:
                reference.labels(stages[n % 2]).observe(value)
    assert _same(ours, theirs)
    count = ours.get_sample_value("t_seconds_count", {"stage": "decode"})
    assert count == 2 * 500 * len(VALUES)


def test_a_counter_fed_from_threads_loses_no_increment() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    sharded = ShardedCounter("items", "doc", ["stage"], ours)
    reference = Counter("items", "doc", ["stage"], registry=theirs)

    def work(n: int) -> None:
        child = sharded.labels("decode")
        for _ in range(20_000):
            child.inc()
        sharded.labels("infer").inc(0.25)

    _in_threads(work)
    reference.labels("decode").inc(80_000)
    reference.labels("infer").inc(1.0)
    assert ours.get_sample_value("items_total", {"stage": "decode"}) == 80_000
    assert _same(ours, theirs)


def test_exemplars_reach_the_openmetrics_exposition() -> None:
    registry = CollectorRegistry()
    latency = ShardedHistogram("latency_seconds", "doc", registry=registry, buckets=BUCKETS)
    latency.observe(0.05, {"trace_id": "a" * 32})
    latency.observe(0.06, {"trace_id": "b" * 32})  # the same bucket: the latest stays
    latency.observe(2.0)
    text = openmetrics_latest(registry).decode()
    found = {
        sample.labels["le"]: sample.exemplar.labels["trace_id"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.exemplar is not None
    }
    assert found == {"0.1": "b" * 32}


def test_bad_updates_are_refused() -> None:
    registry = CollectorRegistry()
    counter = ShardedCounter("things", "doc", ["kind"], registry)
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("a", "b")
    with pytest.raises(ValueError):  # the registry refuses a second series of one name
        ShardedCounter("things", "doc", ["kind"], registry)
