"""Prometheus metrics of the pipeline, as a small API the flow wiring calls.

`PipelineMetrics` owns every `streamsight_*` series; label values come from bounded sets
created up front (`STAGES`, `DEAD_LETTER_STAGES`, `dead_letters.REASONS`,
`batching.FLUSH_REASONS`, `SINKS`, `DEVICE_TYPES`), and job IDs are folded into `other`
past `max_jobs` distinct values. Frame, offset and trace IDs never become labels: trace IDs
ride on exemplars, visible in the OpenMetrics exposition. A `stage` label is the stage's
step id (`operators.stages`). Items into and out of each step are Bytewax's own series
(`bytewax_item_inp_count_total`, `bytewax_item_out_count_total` by `step_id`, served on its
API port with `BYTEWAX_DATAFLOW_API_ENABLED`): they are not counted again here.

`LagTracker` reports Kafka consumer lag per partition in records and in seconds;
`start_metrics_server` serves a registry over HTTP (default port `DEFAULT_PORT`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from operators import stages
from operators.batching import FLUSH_REASONS
from operators.dead_letters import INTERNAL_ERROR, REASONS
from operators.frames import DeadLetter, FrameBatch, FrameMeta, FrameResult, PreparedFrame
from operators.telemetry.sharded_metrics import ShardedCounter, ShardedHistogram

log = logging.getLogger(__name__)

PREFIX = "streamsight"
DEFAULT_PORT = 9464
DEFAULT_ADDR = "0.0.0.0"
DEFAULT_MAX_JOBS = 20
DEFAULT_JOB_IDLE_S = 600.0
DEFAULT_LAG_INTERVAL_S = 5.0
OTHER = "other"

STAGES = stages.STAGES
"""Stages the `stage` label takes (anything else is counted as `other`)."""
DEAD_LETTER_STAGES = stages.REJECTING
"""Stages that turn items into dead letters (`DeadLetter.stage`)."""
SINKS = ("results", "dead_letters")
"""The two sinks: detections and dead letters."""
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", OTHER)
"""Values of the `device` label: the torch device type, without the index."""

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_ZERO_TRACE = "0" * 32

T = TypeVar("T")
R = TypeVar("R")


def trace_id_from_carrier(carrier: Mapping[str, str]) -> str | None:
    """The 32-hex trace ID of a W3C `traceparent` in `carrier`; None when absent or invalid."""
    match = _TRACEPARENT.match(carrier.get("traceparent", "").strip().lower())
    if match is None or match.group(1) == _ZERO_TRACE:
        return None
    return match.group(1)


def device_type(device: str) -> str:
    """`cuda:0` -> `cuda`, `cpu` -> `cpu`; a type outside `DEVICE_TYPES` -> `other`."""
    kind = device.split(":", 1)[0].strip().lower()
    return kind if kind in DEVICE_TYPES else OTHER


def _exemplar(trace_id: str | None) -> dict[str, str] | None:
    return {"trace_id": trace_id} if trace_id else None


class BoundedLabel:
    """Maps values to themselves while they hold one of `limit` slots, to `other` otherwise.

    A value idle for `idle_s` gives up its slot (`on_release` is told, to remove its
    series) so that a new value can have it: the slots go to the most recently active
    values. Thread-safe.
    """

    def __init__(
        self,
        limit: int,
        *,
        idle_s: float = float("inf"),
        clock: Callable[[], float] = time.monotonic,
        on_release: Callable[[str], None] | None = None,
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self.idle_s = idle_s
        self._clock = clock
        self._on_release = on_release
        self._last_seen: dict[str, float] = {}
        self._next_sweep = clock() + idle_s
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        """The label value to use for `value`."""
        now = self._clock()
        if now >= self._next_sweep:
            self.release_idle()
        if value == OTHER:
            return OTHER
        with self._lock:
            if value not in self._last_seen and len(self._last_seen) >= self.limit:
                self._release_idle_locked(now)
            if value in self._last_seen or len(self._last_seen) < self.limit:
                self._last_seen[value] = now
                return value
        return OTHER

    def release_idle(self) -> None:
        """Free the slots of values idle for `idle_s` or longer."""
        with self._lock:
            self._release_idle_locked(self._clock())

    def _release_idle_locked(self, now: float) -> None:
        # A sweep a quarter of the idle time later frees a slot at most 1.25 x idle_s late.
        self._next_sweep = now + self.idle_s / 4
        idle = [v for v, seen in self._last_seen.items() if now - seen >= self.idle_s]
        for value in idle:
            del self._last_seen[value]
            if self._on_release is not None:
                self._on_release(value)

    @property
    def admitted(self) -> frozenset[str]:
        """The values that have their own label."""
        with self._lock:
            return frozenset(self._last_seen)


@dataclass
class StageMeasurement:
    """What one `measure` block recorded: wall and CPU seconds."""

    stage: str
    wall_s: float = 0.0
    cpu_s: float = 0.0


class ProcessExtrasCollector(Collector):
    """What prometheus-client's process collector leaves out: OS threads and peak RSS
    (Linux `/proc/self/status`; thread count falls back to Python threads elsewhere)."""

    def __init__(self, status_path: str = "/proc/self/status") -> None:
        self.status_path = Path(status_path)

    def _status(self) -> dict[str, str]:
        try:
            text = self.status_path.read_text()
        except OSError:
            return {}
        fields = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {name.strip(): value.strip() for name, value in fields}

    def collect(self) -> Iterable[Metric]:
        """Yields `streamsight_process_threads` and, on Linux, peak resident memory."""
        status = self._status()
        threads = status.get("Threads")
        yield GaugeMetricFamily(
            f"{PREFIX}_process_threads",
            "OS threads of the process (Python threads where /proc is absent).",
            value=float(threads) if threads else float(threading.active_count()),
        )
        peak = status.get("VmHWM", "").split()
        if len(peak) == 2 and peak[1].lower() == "kb":
            yield GaugeMetricFamily(
                f"{PREFIX}_process_peak_resident_memory_bytes",
                "Peak resident memory of the process.",
                value=float(peak[0]) * 1024,
            )


class PipelineMetrics:
    """Every pipeline metric, registered in `registry`; methods are called by the wiring.

    `max_jobs` bounds the distinct `job_id` label values (the rest fold into `other`); a
    job idle for `job_idle_s` gives its slot to the next new job and its series are removed.
    On a registry other than the default one a process collector is added too (the
    default registry has one already).
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        *,
        max_jobs: int = DEFAULT_MAX_JOBS,
        job_idle_s: float = DEFAULT_JOB_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
        lag: LagTracker | None = None,
    ) -> None:
        self.registry = registry
        self.jobs = BoundedLabel(
            max_jobs, idle_s=job_idle_s, clock=clock, on_release=self._remove_job_series
        )
        self.lag = lag
        p = PREFIX
        r = registry

        self.stage_duration = ShardedHistogram(
            f"{p}_stage_duration_seconds",
            "Wall time of one stage call (one item or batch).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.stage_cpu = ShardedCounter(
            f"{p}_stage_cpu_seconds",
            "CPU time spent by a stage on its own thread.",
            ["stage"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters",
            "Dead letters stored, by the stage that rejected them.",
            ["stage", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            f"{p}_batch_size_frames",
            "Frames per dispatched batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_max_size = Gauge(
            f"{p}_batch_max_size_frames",
            "Configured maximum frames per batch.",
            registry=r,
        )
        self.batch_fill = Histogram(
            f"{p}_batch_fill_ratio",
            "Batch size divided by the maximum batch size.",
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            f"{p}_batch_wait_seconds",
            "Time the first frame of a batch waited before dispatch.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.batch_flushes = Counter(
            f"{p}_batch_flushes",
            "Batches dispatched, by why they were flushed.",
            ["reason"],
            registry=r,
        )
        self.inference_batch = Histogram(
            f"{p}_inference_batch_duration_seconds",
            "Wall time of one forward pass.",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.inference_frame = ShardedHistogram(
            f"{p}_inference_frame_duration_seconds",
            "Forward-pass time per frame (batch time divided by its frames).",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.inference_frames = Counter(
            f"{p}_inference_frames",
            "Frames through the model.",
            registry=r,
        )
        self.job_device_seconds = Counter(
            f"{p}_job_device_seconds",
            "Inference time attributed to a job, each batch split by its frames' jobs.",
            ["job_id", "device"],
            registry=r,
        )
        self.job_frames = Counter(
            f"{p}_job_frames",
            "Frames through the model per job.",
            ["job_id"],
            registry=r,
        )
        self.end_to_end = ShardedHistogram(
            f"{p}_end_to_end_latency_seconds",
            "Capture time to the sink's write, per stored frame.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_write = Histogram(
            f"{p}_sink_write_duration_seconds",
            "Wall time of one sink write batch.",
            ["sink"],
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.sink_rows = Counter(
            f"{p}_sink_rows_written",
            "Rows stored for the first time.",
            ["sink"],
            registry=r,
        )
        self.sink_duplicates = Counter(
            f"{p}_sink_duplicates_ignored",
            "Frames already stored with the same content, skipped by the sink.",
            registry=r,
        )
        self.sink_unavailable = Gauge(
            f"{p}_sink_unavailable",
            "1 while the sink waits for its database to become available (the flow stalls).",
            ["sink"],
            registry=r,
        )
        self.sink_retries = Counter(
            f"{p}_sink_retries",
            "Failed attempts on an unavailable database, each followed by a retry.",
            ["sink"],
            registry=r,
        )

        for stage in STAGES:
            self.stage_duration.labels(stage)
            self.stage_cpu.labels(stage)
        for stage in DEAD_LETTER_STAGES:
            for reason in REASONS:
                self.dead_letters.labels(stage, reason)
        for reason in FLUSH_REASONS:
            self.batch_flushes.labels(reason)
        for sink in SINKS:
            self.sink_write.labels(sink)
            self.sink_rows.labels(sink)
            self.sink_unavailable.labels(sink)
            self.sink_retries.labels(sink)

        self._stage_children: dict[str, tuple[Any, Any]] = {}
        self._extras = ProcessExtrasCollector()
        registry.register(self._extras)
        if registry is not REGISTRY:
            ProcessCollector(registry=registry)

    @staticmethod
    def _stage(stage: str) -> str:
        return stage if stage in STAGES else OTHER

    # Stages -------------------------------------------------------------------------

    @contextmanager
    def measure(
        self,
        stage: str,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> Iterator[StageMeasurement]:
        """Time a block as one call of `stage`.

        Records wall time (`streamsight_stage_duration_seconds`: its count is the stage's
        calls) and CPU time by `cpu_clock` (`streamsight_stage_cpu_seconds_total`; the
        calling thread's by default). Time is recorded even when the block raises.
        """
        label = self._stage(stage)
        measurement = StageMeasurement(label)
        wall0, cpu0 = time.perf_counter(), cpu_clock()
        try:
            yield measurement
        finally:
            measurement.cpu_s = cpu_clock() - cpu0
            measurement.wall_s = time.perf_counter() - wall0
            duration, cpu = self._stage_series(label)
            duration.observe(measurement.wall_s)
            cpu.inc(measurement.cpu_s)

    def _stage_series(self, label: str) -> tuple[Any, Any]:
        """The duration and CPU series of a stage label (looked up once: `labels()` takes
        a lock and builds a key on every call)."""
        found = self._stage_children.get(label)
        if found is None:
            found = self._stage_children[label] = (
                self.stage_duration.labels(label),
                self.stage_cpu.labels(label),
            )
        return found

    def wrap(self, stage: str, fn: Callable[[T], R]) -> Callable[[T], R]:
        """`fn` measured as `stage`, one call per item: for `op.map`, `op.flat_map` and
        `op.filter_map` steps. A generator result is turned into a list so that its work
        is timed.
        """

        # The per-item path of `measure`, inlined: this runs for every frame.
        duration, cpu = self._stage_series(self._stage(stage))
        observe, add_cpu = duration.observe, cpu.inc
        wall_clock, cpu_clock = time.perf_counter, time.thread_time

        def measured(item: T) -> R:
            wall0, cpu0 = wall_clock(), cpu_clock()
            try:
                result = fn(item)
                if isinstance(result, Iterator):
                    result = list(result)  # type: ignore[assignment]
            finally:
                add_cpu(cpu_clock() - cpu0)
                observe(wall_clock() - wall0)
            return result

        measured.__name__ = getattr(fn, "__name__", stage)
        measured.__doc__ = getattr(fn, "__doc__", None)
        return measured

    # Batching -----------------------------------------------------------------------

    def record_batch(self, batch: FrameBatch, max_size: int) -> None:
        """One dispatched batch: its size, fill ratio against `max_size`, how long its first
        frame waited (`dispatched_ns - opened_ns`) and its flush reason."""
        size = len(batch.frames)
        self.batch_max_size.set(max_size)
        self.batch_size.observe(size)
        self.batch_fill.observe(size / max_size if max_size > 0 else 1.0)
        self.batch_wait.observe(max(0, batch.dispatched_ns - batch.opened_ns) / 1e9)
        reason = batch.flush_reason if batch.flush_reason in FLUSH_REASONS else OTHER
        self.batch_flushes.labels(reason).inc()

    def measured_batch_builder(
        self, builder: Callable[[Any], StatefulBatchLogic[Any, FrameBatch, Any]], max_size: int
    ) -> Callable[[Any], StatefulBatchLogic[Any, FrameBatch, Any]]:
        """Wrap an `op.stateful_batch` builder so each logic call is measured as stage
        `batch` and every batch it emits goes to `record_batch`."""

        def build(resume: Any) -> StatefulBatchLogic[Any, FrameBatch, Any]:
            return _MeasuredBatchLogic(builder(resume), self, max_size)

        return build

    # Inference ----------------------------------------------------------------------

    def _remove_job_series(self, job: str) -> None:
        """Drop the per-job series of a job that gave up its slot."""
        with suppress(KeyError):
            self.job_frames.remove(job)
        for device in DEVICE_TYPES:
            with suppress(KeyError):
                self.job_device_seconds.remove(job, device)

    def record_inference(
        self,
        batch: FrameBatch,
        duration_s: float,
        *,
        device: str,
        trace_id: str | None = None,
    ) -> None:
        """One forward pass over `batch` that took `duration_s` on `device` (`cuda:0`, `cpu`).

        Feeds batch and per-frame inference histograms, the frame counter, and each job's
        device-seconds and frames (the batch's time split in proportion to the job's
        frames). `trace_id` (32 hex) becomes the exemplar; without it the first frame's
        `traceparent` is used.
        """
        frames = batch.frames
        n = len(frames)
        if n == 0:
            return
        if trace_id is None:
            trace_id = trace_id_from_carrier(frames[0].meta.trace_carrier)
        exemplar = _exemplar(trace_id)
        self.inference_batch.observe(duration_s, exemplar=exemplar)
        per_frame = duration_s / n
        for _ in range(n):
            self.inference_frame.observe(per_frame)
        self.inference_frames.inc(n, exemplar=exemplar)
        kind = device_type(device)
        by_job = TallyCounter(self.jobs(frame.meta.job_id) for frame in frames)
        for job, count in by_job.items():
            self.job_device_seconds.labels(job, kind).inc(duration_s * count / n)
            self.job_frames.labels(job).inc(count)

    @contextmanager
    def measure_inference(
        self, batch: FrameBatch, *, device: str, trace_id: str | None = None
    ) -> Iterator[StageMeasurement]:
        """`measure("infer")` plus `record_inference` with its wall time.

        A forward pass that raises is timed as a stage call but not as an inference.
        """
        # The forward pass fans out to the framework's own threads, which the calling
        # thread's clock misses: the stage is charged the process's CPU time instead
        # (exact with one worker per process, the recommended layout).
        with self.measure(stages.INFER, cpu_clock=time.process_time) as m:
            yield m
        self.record_inference(batch, m.wall_s, device=device, trace_id=trace_id)

    def wrap_inference(
        self, infer: Callable[[FrameBatch], R], *, device: str
    ) -> Callable[[FrameBatch], R]:
        """`infer` measured with `measure_inference`."""

        def measured(batch: FrameBatch) -> R:
            with self.measure_inference(batch, device=device):
                return infer(batch)

        return measured

    # Sinks --------------------------------------------------------------------------

    def results_written(
        self, results: Sequence[FrameResult], duplicates: int, written_ns: int
    ) -> None:
        """The result sink stored `results` at `written_ns` and skipped `duplicates`
        (signature of the sinks' `on_results`): rows written, duplicates, capture-to-sink
        latency per frame with its trace as exemplar, and the lag tracker's offsets."""
        self.sink_rows.labels("results").inc(len(results))
        if duplicates:
            self.sink_duplicates.inc(duplicates)
        for result in results:
            meta = result.meta
            self.end_to_end.observe(
                max(0, written_ns - meta.capture_ns) / 1e9,
                exemplar=_exemplar(trace_id_from_carrier(meta.trace_carrier)),
            )
            if self.lag is not None:
                self.lag.processed_frame(meta)

    def letters_written(self, letters: Sequence[DeadLetter]) -> None:
        """Dead letters stored (signature of the sinks' `on_letters`): counted by stage and
        reason, rows written, and their offsets given to the lag tracker."""
        self.sink_rows.labels("dead_letters").inc(len(letters))
        for letter in letters:
            stage = letter.stage if letter.stage in DEAD_LETTER_STAGES else OTHER
            reason = letter.reason if letter.reason in REASONS else INTERNAL_ERROR
            self.dead_letters.labels(stage, reason).inc()
            if self.lag is not None:
                self.lag.processed(letter.topic, letter.partition, letter.offset, None)

    def record_sink_write(self, sink: str, duration_s: float) -> None:
        """One write batch of `sink` (`results` or `dead_letters`) took `duration_s`."""
        self.sink_write.labels(sink if sink in SINKS else OTHER).observe(duration_s)

    def sink_outage(self, sink: str, unavailable: bool) -> None:
        """`sink`'s database failed an attempt that will be retried (True) or answers
        again (False); the signature of the sinks' `on_outage`."""
        label = sink if sink in SINKS else OTHER
        self.sink_unavailable.labels(label).set(1 if unavailable else 0)
        if unavailable:
            self.sink_retries.labels(label).inc()

    def measured_sink(self, inner: DynamicSink[T], *, stage: str, sink: str) -> DynamicSink[T]:
        """`inner` with each `write_batch` measured as `stage` and timed as `sink`."""
        return _MeasuredSink(inner, self, stage, sink)


class _MeasuredBatchLogic(StatefulBatchLogic[Any, FrameBatch, Any]):
    def __init__(
        self, inner: StatefulBatchLogic[Any, FrameBatch, Any], metrics: PipelineMetrics, size: int
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self.max_size = size

    def _run(
        self, call: Callable[[], tuple[Iterable[FrameBatch], bool]]
    ) -> tuple[Iterable[FrameBatch], bool]:
        with self.metrics.measure(stages.BATCH):
            emitted, discard = call()
            batches = list(emitted)
        for batch in batches:
            self.metrics.record_batch(batch, self.max_size)
        return batches, discard

    def on_batch(self, values: list[PreparedFrame]) -> tuple[Iterable[FrameBatch], bool]:
        return self._run(lambda: self.inner.on_batch(values))

    def on_notify(self) -> tuple[Iterable[FrameBatch], bool]:
        return self._run(self.inner.on_notify)

    def on_eof(self) -> tuple[Iterable[FrameBatch], bool]:
        return self._run(self.inner.on_eof)

    def notify_at(self) -> Any:
        return self.inner.notify_at()

    def snapshot(self) -> Any:
        return self.inner.snapshot()


class _MeasuredPartition(StatelessSinkPartition[Any]):
    def __init__(
        self, inner: StatelessSinkPartition[Any], metrics: PipelineMetrics, stage: str, sink: str
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self.stage = stage
        self.sink = sink

    def write_batch(self, items: list[Any]) -> None:
        with self.metrics.measure(self.stage) as m:
            self.inner.write_batch(items)
        self.metrics.record_sink_write(self.sink, m.wall_s)

    def close(self) -> None:
        self.inner.close()


class _MeasuredSink(DynamicSink[Any]):
    def __init__(
        self, inner: DynamicSink[Any], metrics: PipelineMetrics, stage: str, sink: str
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self.stage = stage
        self.sink = sink

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _MeasuredPartition:
        partition = self.inner.build(step_id, worker_index, worker_count)
        return _MeasuredPartition(partition, self.metrics, self.stage, self.sink)


# Kafka lag ----------------------------------------------------------------------------

WatermarkReader = Callable[[str, int], int]
"""(topic, partition) -> the partition's high watermark; raises when it cannot be read."""


@dataclass
class _PartitionState:
    next_offset: int
    capture_ns: int | None
    high_watermark: int | None = None


class LagTracker(Collector):
    """Consumer lag per (topic, partition) this process has processed.

    `streamsight_kafka_consumer_lag_records` = high watermark - next offset to process
    (last processed offset + 1), never below 0; `streamsight_kafka_consumer_lag_seconds` =
    now - capture time of the last processed frame, 0 once the partition is caught up.
    High watermarks are read every `interval_s` by a background thread (`start`) with a
    Consumer of its own built from `client_config` (a `group.id` is added; it never
    commits), or by `read_high_watermark` when given. Values are computed at scrape time.
    """

    def __init__(
        self,
        client_config: Mapping[str, Any] | None = None,
        *,
        interval_s: float = DEFAULT_LAG_INTERVAL_S,
        registry: CollectorRegistry | None = REGISTRY,
        read_high_watermark: WatermarkReader | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if client_config is None and read_high_watermark is None:
            raise ValueError("give client_config or read_high_watermark")
        self.interval_s = interval_s
        self.clock = clock
        self._config = dict(client_config or {})
        self._reader = read_high_watermark
        self._consumer: Any = None
        self._partitions: dict[tuple[str, int], _PartitionState] = {}
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.read_errors = 0
        if registry is not None:
            registry.register(self)

    def processed(self, topic: str, partition: int, offset: int, capture_ns: int | None) -> None:
        """The flow has processed `offset` of (topic, partition), captured at `capture_ns`
        (None: keep the last known capture time). Older offsets are ignored."""
        if not topic or partition < 0 or offset < 0:
            return
        key = (topic, partition)
        with self._lock:
            state = self._partitions.get(key)
            if state is None:
                self._partitions[key] = _PartitionState(offset + 1, capture_ns)
            elif offset + 1 > state.next_offset:
                state.next_offset = offset + 1
                if capture_ns is not None:
                    state.capture_ns = capture_ns

    def processed_frame(self, meta: FrameMeta) -> None:
        """`processed` with the coordinates and capture time of a frame."""
        self.processed(meta.topic, meta.partition, meta.offset, meta.capture_ns)

    def _read(self, topic: str, partition: int) -> int:
        if self._reader is not None:
            return self._reader(topic, partition)
        from confluent_kafka import Consumer, TopicPartition

        from operators.kafka_io import consumer_safe, librdkafka_logger

        if self._consumer is None:
            conf = consumer_safe(self._config)
            conf.setdefault("group.id", "streamsight-lag")
            conf.setdefault("enable.auto.commit", False)
            conf.setdefault("logger", librdkafka_logger)
            self._consumer = Consumer(conf)
        _, high = self._consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=max(1.0, self.interval_s), cached=False
        )
        return int(high)

    def refresh(self) -> None:
        """Read the high watermark of every tracked partition once; a failed read keeps
        the previous value and counts in `streamsight_kafka_watermark_read_errors_total`."""
        with self._lock:
            keys = list(self._partitions)
        with self._read_lock:
            for topic, partition in keys:
                try:
                    high = self._read(topic, partition)
                except Exception as exc:  # metrics must never stop the flow
                    self.read_errors += 1
                    log.debug("high watermark of %s/%d: %s", topic, partition, exc)
                    continue
                with self._lock:
                    self._partitions[(topic, partition)].high_watermark = high

    def lag_records(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> records behind, for partitions with a watermark read."""
        with self._lock:
            return {
                key: max(0, s.high_watermark - s.next_offset)
                for key, s in self._partitions.items()
                if s.high_watermark is not None
            }

    def lag_seconds(self) -> dict[tuple[str, int], float]:
        """(topic, partition) -> seconds behind, for partitions with a capture time."""
        now = self.clock()
        with self._lock:
            out: dict[tuple[str, int], float] = {}
            for key, s in self._partitions.items():
                if s.capture_ns is None:
                    continue
                caught_up = s.high_watermark is not None and s.high_watermark <= s.next_offset
                out[key] = 0.0 if caught_up else max(0.0, (now - s.capture_ns) / 1e9)
            return out

    def collect(self) -> Iterable[Metric]:
        """The lag gauges and the read-error counter, computed now."""
        records = GaugeMetricFamily(
            f"{PREFIX}_kafka_consumer_lag_records",
            "Records between the partition's high watermark and the next offset to process.",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(self.lag_records().items()):
            records.add_metric([topic, str(partition)], float(value))
        seconds = GaugeMetricFamily(
            f"{PREFIX}_kafka_consumer_lag_seconds",
            "Now minus the capture time of the partition's last processed frame "
            "(0 when caught up).",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(self.lag_seconds().items()):
            seconds.add_metric([topic, str(partition)], value)
        errors = CounterMetricFamily(
            f"{PREFIX}_kafka_watermark_read_errors",
            "High-watermark reads that failed.",
            value=float(self.read_errors),
        )
        return [records, seconds, errors]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def start(self) -> LagTracker:
        """Start the background thread reading watermarks every `interval_s`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="streamsight-lag", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and close the Consumer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 10)
        with self._read_lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


# Serving ------------------------------------------------------------------------------

_servers: dict[tuple[str, int], object] = {}
_servers_lock = threading.Lock()


def start_metrics_server(
    port: int = DEFAULT_PORT,
    addr: str = DEFAULT_ADDR,
    *,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Serve `registry` on http://addr:port/metrics from a daemon thread (OpenMetrics with
    exemplars when the scraper asks for it, as Prometheus does). A second call for the
    same address is a no-op; a port in use raises OSError."""
    with _servers_lock:
        if (addr, port) in _servers:
            return
        server, _thread = start_http_server(port, addr, registry=registry)
        _servers[(addr, port)] = server
    log.info("serving metrics on http://%s:%d/metrics", addr, port)


_default: PipelineMetrics | None = None
_default_lock = threading.Lock()


def pipeline_metrics(
    max_jobs: int = DEFAULT_MAX_JOBS, job_idle_s: float = DEFAULT_JOB_IDLE_S
) -> PipelineMetrics:
    """The process's `PipelineMetrics` on the default registry (created on first call,
    whose arguments win), shared by the Bytewax worker threads of this process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PipelineMetrics(REGISTRY, max_jobs=max_jobs, job_idle_s=job_idle_s)
        return _default
