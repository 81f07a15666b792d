"""Prometheus counters and histograms that the flow's worker threads update without locks.

`prometheus_client` guards every value with a mutex. Stage metrics are updated several
times per frame by every worker, and with two workers on one interpreter those mutexes
are contended: a worker switched out while holding one stalls the other. Here each
thread adds to its own shard (only the thread that owns a shard writes it, and each
single update is atomic under the interpreter lock), and a scrape sums the shards. The
children have `prometheus_client`'s `inc` / `observe` signatures.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

_ident = threading.get_ident


class CounterChild:
    """One labelled counter: a float per thread."""

    def __init__(self) -> None:
        self._shards: dict[int, list[float]] = {}

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (>= 0)."""
        if amount < 0:
            raise ValueError("counters only go up")
        shard = self._shards.get(_ident())
        if shard is None:
            shard = self._shards.setdefault(_ident(), [0.0])
        shard[0] += amount

    def value(self) -> float:
        """The sum over threads."""
        return sum(shard[0] for shard in list(self._shards.values()))


class _HistogramShard:
    __slots__ = ("counts", "exemplars", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0
        self.exemplars: list[Exemplar | None] = [None] * buckets


class HistogramChild:
    """One labelled histogram: bucket counts, sum and latest exemplars per thread."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._shards: dict[int, _HistogramShard] = {}

    def observe(self, amount: float, exemplar: Mapping[str, str] | None = None) -> None:
        """Count `amount` in its bucket (upper bounds are inclusive); `exemplar` becomes
        that bucket's exemplar."""
        shard = self._shards.get(_ident())
        if shard is None:
            shard = self._shards.setdefault(_ident(), _HistogramShard(len(self._bounds)))
        index = bisect_left(self._bounds, amount)
        shard.counts[index] += 1
        shard.total += amount
        if exemplar:
            shard.exemplars[index] = Exemplar(dict(exemplar), amount, time.time())

    def snapshot(self) -> tuple[list[int], float, list[Exemplar | None]]:
        """Per-bucket counts (not cumulative), the sum and each bucket's latest exemplar,
        over all threads."""
        counts = [0] * len(self._bounds)
        exemplars: list[Exemplar | None] = [None] * len(self._bounds)
        total = 0.0
        for shard in list(self._shards.values()):
            total += shard.total
            pairs = zip(shard.counts, shard.exemplars, strict=True)
            for i, (count, exemplar) in enumerate(pairs):
                counts[i] += count
                latest = exemplars[i]
                if exemplar is None:
                    continue
                if latest is None or (exemplar.timestamp or 0.0) > (latest.timestamp or 0.0):
                    exemplars[i] = exemplar
        return counts, total, exemplars


C = TypeVar("C", CounterChild, HistogramChild)


class _Sharded(Generic[C]):
    """A family of children by label values, registered in `registry`; `_family` is the
    metric family it is exposed as."""

    _family: type[CounterMetricFamily] | type[HistogramMetricFamily]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        self._lock = threading.Lock()  # creating a child, not updating one
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> C:
        """The child for these label values."""
        return self._child(tuple(map(str, values)))

    def _child(self, values: tuple[str, ...]) -> C:
        found = self._children.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            with self._lock:
                found = self._children.setdefault(values, self._new_child())
        return found

    def _new_child(self) -> C:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        """The family without samples (for the registry's name checks)."""
        return [self._family(self.name, self.documentation, labels=self.labelnames)]


class ShardedCounter(_Sharded[CounterChild]):
    """A counter (exposed as `<name>_total`) whose children are `CounterChild`."""

    _family = CounterMetricFamily

    def inc(self, amount: float = 1.0) -> None:
        """Add to the unlabelled counter."""
        self._child(()).inc(amount)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def collect(self) -> Iterable[Metric]:
        """The family with each child's sum over threads."""
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value())
        return [family]


class ShardedHistogram(_Sharded[HistogramChild]):
    """A histogram with upper bounds `buckets` (+Inf added) whose children are
    `HistogramChild`."""

    _family = HistogramMetricFamily

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float],
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, amount: float, exemplar: Mapping[str, str] | None = None) -> None:
        """Observe into the unlabelled histogram."""
        self._child(()).observe(amount, exemplar)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def collect(self) -> Iterable[Metric]:
        """The family with cumulative buckets, count and sum over threads."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total, exemplars = child.snapshot()
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            running = 0
            for bound, count, exemplar in zip(self.bounds, counts, exemplars, strict=True):
                running += count
                le = floatToGoString(bound)
                buckets.append((le, running, exemplar) if exemplar else (le, running))
            family.add_metric(list(values), buckets, total)
        return [family]
