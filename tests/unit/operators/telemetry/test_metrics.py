"""Pipeline metrics: bounded names and labels, stage timing and CPU, batching, inference
with exemplars, per-job compute, sinks, lag arithmetic and the process extras."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from operators import dead_letters as dl
from operators.batching import FLUSH_DEADLINE, FLUSH_REASONS, batch_logic_builder
from operators.frames import FrameBatch, FrameResult
from operators.telemetry.metrics import (
    DEAD_LETTER_STAGES,
    DEVICE_TYPES,
    OTHER,
    SINKS,
    STAGES,
    BoundedLabel,
    LagTracker,
    PipelineMetrics,
    device_type,
    start_metrics_server,
    trace_id_from_carrier,
)
from tests import metrics_data as data
from tests.metrics_data import TRACE_ID, free_port, populated_registry

ALLOWED_LABELS = {
    "stage": set(STAGES) | {OTHER},
    "reason": set(dl.REASONS) | set(FLUSH_REASONS) | {OTHER},
    "sink": set(SINKS) | {OTHER},
    "device": set(DEVICE_TYPES) | {"cuda:0"},
    "job_id": None,
    "topic": None,
    "partition": None,
    "gpu": None,
    "uuid": None,
    "model_name": None,
    "le": None,
}
FORBIDDEN_LABELS = {"frame_id", "offset", "trace_id", "span_id", "seq", "batch_id", "job"}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent."""
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_names_follow_conventions_and_labels_are_bounded() -> None:
    registry, _ = populated_registry()
    families = list(registry.collect())
    ours = [f for f in families if f.name.startswith("streamsight_")]
    assert len(ours) >= 30
    for family in ours:
        assert re.fullmatch(r"streamsight_[a-z0-9_]+", family.name), family.name
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples), family.name
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                assert label not in FORBIDDEN_LABELS, (family.name, label)
                assert label in ALLOWED_LABELS, (family.name, label)
                allowed = ALLOWED_LABELS[label]
                if allowed is not None:
                    assert label_value in allowed, (family.name, label, label_value)


def test_label_sets_exist_before_any_traffic() -> None:
    registry = CollectorRegistry()
    PipelineMetrics(registry)
    for stage in STAGES:
        assert (
            registry.get_sample_value("streamsight_stage_cpu_seconds_total", {"stage": stage}) == 0
        )
        assert registry.get_sample_value(
            "streamsight_stage_duration_seconds_count", {"stage": stage}
        ) == pytest.approx(0.0)
    for stage in DEAD_LETTER_STAGES:
        for reason in dl.REASONS:
            labels = {"stage": stage, "reason": reason}
            assert registry.get_sample_value("streamsight_dead_letters_total", labels) == 0.0
    for reason in FLUSH_REASONS:
        assert registry.get_sample_value("streamsight_batch_flushes_total", {"reason": reason}) == 0


def test_items_per_step_are_left_to_bytewax() -> None:
    # Bytewax counts every step's items (bytewax_item_inp_count_total and
    # bytewax_item_out_count_total by step_id): the registry holds no copy of them.
    registry, _ = populated_registry()
    names = {family.name for family in registry.collect()}
    assert not {name for name in names if "items" in name}, names


def test_measure_records_wall_and_cpu() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    with metrics.measure("decode") as m:
        sum(i * i for i in range(50_000))
        time.sleep(0.02)
    assert m.wall_s >= 0.02
    assert 0 < m.cpu_s < m.wall_s
    assert value(registry, "streamsight_stage_duration_seconds_count", stage="decode") == 1
    assert value(registry, "streamsight_stage_duration_seconds_sum", stage="decode") == m.wall_s
    assert value(registry, "streamsight_stage_cpu_seconds_total", stage="decode") == m.cpu_s
    with metrics.measure("no-such-stage"):
        pass
    assert value(registry, "streamsight_stage_duration_seconds_count", stage=OTHER) == 1


def test_measure_times_a_block_that_raises() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    with pytest.raises(ZeroDivisionError), metrics.measure("infer"):
        _ = 1 / 0
    assert value(registry, "streamsight_stage_duration_seconds_count", stage="infer") == 1


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1


def test_stage_cpu_seconds_add_up_to_process_cpu() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    process0 = time.process_time()
    for _ in range(3):
        with metrics.measure("decode"):
            _burn(0.05)
        with metrics.measure("infer"):
            _burn(0.1)
    process_cpu = time.process_time() - process0
    decode = value(registry, "streamsight_stage_cpu_seconds_total", stage="decode")
    infer = value(registry, "streamsight_stage_cpu_seconds_total", stage="infer")
    assert decode == pytest.approx(0.15, rel=0.15)
    assert infer == pytest.approx(0.3, rel=0.15)
    assert decode + infer == pytest.approx(process_cpu, rel=0.15)


def test_wrap_times_each_call_and_materialises_generators() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    b = data.batch([data.meta(i) for i in range(3)])

    def results(batch: FrameBatch) -> Iterator[FrameResult]:
        for frame in batch.frames:
            time.sleep(0.005)  # work done as the generator runs: timed with the call
            yield data.result(frame.meta)

    wrapped = metrics.wrap("infer", results)
    out = wrapped(b)
    assert isinstance(out, list)
    assert len(out) == 3
    assert value(registry, "streamsight_stage_duration_seconds_count", stage="infer") == 1
    assert value(registry, "streamsight_stage_duration_seconds_sum", stage="infer") >= 0.015
    decode = metrics.wrap("decode", lambda item: None)
    decode(object())
    decode(object())
    assert value(registry, "streamsight_stage_duration_seconds_count", stage="decode") == 2
    with pytest.raises(ZeroDivisionError):
        metrics.wrap("decode", lambda item: 1 / 0)(object())
    assert value(registry, "streamsight_stage_duration_seconds_count", stage="decode") == 3


def test_record_batch() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    metrics.record_batch(
        data.batch([data.meta(i) for i in range(2)], reason=FLUSH_DEADLINE, wait_ns=30_000_000),
        max_size=8,
    )
    assert value(registry, "streamsight_batch_size_frames_sum") == 2
    assert value(registry, "streamsight_batch_fill_ratio_sum") == 0.25
    assert value(registry, "streamsight_batch_wait_seconds_sum") == pytest.approx(0.03)
    assert value(registry, "streamsight_batch_max_size_frames") == 8
    assert value(registry, "streamsight_batch_flushes_total", reason=FLUSH_DEADLINE) == 1


def test_measured_batch_builder_records_every_emitted_batch() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    build = metrics.measured_batch_builder(batch_logic_builder(2, 10.0), max_size=2)
    logic = build(None)
    frames = [data.prepared(data.meta(i)) for i in range(5)]
    emitted, _ = logic.on_batch(frames)
    assert [len(b.frames) for b in emitted] == [2, 2]
    assert logic.snapshot()[0] == (frames[4],)
    emitted, _ = logic.on_eof()
    assert [len(b.frames) for b in emitted] == [1]
    assert value(registry, "streamsight_batch_flushes_total", reason="size") == 2
    assert value(registry, "streamsight_batch_flushes_total", reason="end_of_input") == 1
    # Two logic calls (a batch of frames, the end of input), each timed as the batch stage.
    assert value(registry, "streamsight_stage_duration_seconds_count", stage="batch") == 2
    assert value(registry, "streamsight_batch_fill_ratio_sum") == pytest.approx(2.5)


def test_inference_attributes_device_seconds_to_jobs_by_frames() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    metas = [data.meta(0, job_id="a"), data.meta(1, job_id="a"), data.meta(2, job_id="b")]
    metrics.record_inference(data.batch(metas), 0.3, device="cuda:1")
    seconds = "streamsight_job_device_seconds_total"
    assert value(registry, seconds, job_id="a", device="cuda") == pytest.approx(0.2)
    assert value(registry, seconds, job_id="b", device="cuda") == pytest.approx(0.1)
    assert value(registry, "streamsight_job_frames_total", job_id="a") == 2
    assert value(registry, "streamsight_inference_frames_total") == 3
    assert value(registry, "streamsight_inference_batch_duration_seconds_sum") == 0.3
    assert value(registry, "streamsight_inference_frame_duration_seconds_count") == 3
    assert value(registry, "streamsight_inference_frame_duration_seconds_sum") == pytest.approx(0.3)


def test_jobs_past_the_bound_fold_into_other() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry, max_jobs=2)
    for job in ["a", "b", "c", "d", "a"]:
        metrics.record_inference(data.batch([data.meta(0, job_id=job)]), 0.1, device="cpu")
    jobs = {
        s.labels["job_id"]
        for f in registry.collect()
        if f.name == "streamsight_job_frames"
        for s in f.samples
    }
    assert jobs == {"a", "b", OTHER}
    assert value(registry, "streamsight_job_frames_total", job_id=OTHER) == 2
    assert value(registry, "streamsight_job_frames_total", job_id="a") == 2


def _job_series(registry: CollectorRegistry) -> set[str]:
    return {
        s.labels["job_id"]
        for f in registry.collect()
        if f.name in ("streamsight_job_frames", "streamsight_job_device_seconds")
        for s in f.samples
    }


def test_an_idle_job_gives_its_slot_and_its_series_to_a_new_job() -> None:
    now = [0.0]
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry, max_jobs=2, job_idle_s=60.0, clock=lambda: now[0])

    def infer(job: str) -> None:
        metrics.record_inference(data.batch([data.meta(0, job_id=job)]), 0.1, device="cpu")

    infer("a")
    infer("b")
    now[0] = 50.0
    infer("b")
    infer("c")  # a has been idle 50 s: no slot yet
    assert _job_series(registry) == {"a", "b", OTHER}
    now[0] = 70.0
    infer("c")  # a idle 70 s: its slot and series go to c
    assert _job_series(registry) == {"b", "c", OTHER}
    assert value(registry, "streamsight_job_frames_total", job_id="c") == 1
    now[0] = 200.0
    metrics.jobs.release_idle()  # both idle: slots freed, series gone
    assert _job_series(registry) == {OTHER}
    assert metrics.jobs.admitted == frozenset()


def test_bounded_label_is_thread_safe_and_reserves_other() -> None:
    label = BoundedLabel(1)
    assert label(OTHER) == OTHER
    assert label("x") == "x"
    assert label("y") == OTHER
    assert label.admitted == frozenset({"x"})


def test_exemplars_carry_trace_ids_in_openmetrics() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    metas = [data.meta(i) for i in range(2)]
    other = "0af7651916cd43dd8448eb211c80319c"
    metrics.record_inference(data.batch(metas), 0.02, device="cpu", trace_id=other)
    metrics.results_written([data.result(m) for m in metas], 0, time.time_ns())
    text = openmetrics_latest(registry).decode()
    exemplars: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplars.setdefault(sample.name, set()).add(sample.exemplar.labels["trace_id"])
    assert exemplars["streamsight_inference_frames_total"] == {other}
    assert other in exemplars["streamsight_inference_batch_duration_seconds_bucket"]
    assert exemplars["streamsight_end_to_end_latency_seconds_bucket"] == {TRACE_ID}


def test_trace_id_from_carrier() -> None:
    assert trace_id_from_carrier(data.traceparent()) == TRACE_ID
    assert trace_id_from_carrier({}) is None
    assert trace_id_from_carrier({"traceparent": "garbage"}) is None
    assert trace_id_from_carrier(data.traceparent("0" * 32)) is None


def test_device_type() -> None:
    assert device_type("cuda:3") == "cuda"
    assert device_type("cpu") == "cpu"
    assert device_type("tpu:0") == OTHER


def test_sink_observers() -> None:
    registry = CollectorRegistry()
    lag = LagTracker(registry=registry, read_high_watermark=lambda t, p: 100)
    metrics = PipelineMetrics(registry, lag=lag)
    captured = time.time_ns() - 2_000_000_000
    metas = [data.meta(i, capture_ns=captured) for i in range(3)]
    metrics.results_written([data.result(m) for m in metas], 2, captured + 500_000_000)
    metrics.letters_written(
        [data.letter("decode", dl.CORRUPT_IMAGE, offset=7), data.letter("weird", "nonsense", 1)]
    )
    assert value(registry, "streamsight_sink_rows_written_total", sink="results") == 3
    assert value(registry, "streamsight_sink_rows_written_total", sink="dead_letters") == 2
    assert value(registry, "streamsight_sink_duplicates_ignored_total") == 2
    assert value(registry, "streamsight_end_to_end_latency_seconds_sum") == pytest.approx(1.5)
    labels = {"stage": "decode", "reason": dl.CORRUPT_IMAGE}
    assert value(registry, "streamsight_dead_letters_total", **labels) == 1
    labels = {"stage": OTHER, "reason": dl.INTERNAL_ERROR}
    assert value(registry, "streamsight_dead_letters_total", **labels) == 1
    lag.refresh()
    assert lag.lag_records() == {(data.TOPIC, 0): 100 - 8}


class _Partition:
    def __init__(self) -> None:
        self.written: list[object] = []
        self.closed = False

    def write_batch(self, items: list[object]) -> None:
        time.sleep(0.01)
        self.written += items

    def close(self) -> None:
        self.closed = True


class _Sink:
    def __init__(self) -> None:
        self.partition = _Partition()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return self.partition


def test_measured_sink() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    inner = _Sink()
    sink = metrics.measured_sink(inner, stage="sink", sink="results")  # type: ignore[arg-type]
    partition = sink.build("sink", 0, 1)
    partition.write_batch([1, 2, 3])
    partition.close()
    assert inner.partition.written == [1, 2, 3]
    assert inner.partition.closed
    assert value(registry, "streamsight_stage_duration_seconds_count", stage="sink") == 1
    assert value(registry, "streamsight_stage_duration_seconds_sum", stage="sink") >= 0.01
    assert value(registry, "streamsight_sink_write_duration_seconds_count", sink="results") == 1
    assert value(registry, "streamsight_sink_write_duration_seconds_sum", sink="results") >= 0.01


def test_lag_tracker_arithmetic_and_errors() -> None:
    registry = CollectorRegistry()
    marks = {0: 10, 1: 5}
    now = [10_000_000_000]

    def read(topic: str, partition: int) -> int:
        if partition == 2:
            raise RuntimeError("broker down")
        return marks[partition]

    lag = LagTracker(registry=registry, read_high_watermark=read, clock=lambda: now[0])
    lag.processed("t", 0, 3, 7_000_000_000)
    lag.processed("t", 0, 2, 9_000_000_000)
    lag.processed("t", 1, 4, 8_000_000_000)
    lag.processed("t", 2, 0, 9_500_000_000)
    lag.processed("", -1, -1, 1)
    assert lag.lag_records() == {}
    lag.refresh()
    assert lag.lag_records() == {("t", 0): 6, ("t", 1): 0}
    assert lag.lag_seconds() == {("t", 0): 3.0, ("t", 1): 0.0, ("t", 2): 0.5}
    assert value(registry, "streamsight_kafka_consumer_lag_records", topic="t", partition="0") == 6
    assert value(registry, "streamsight_kafka_consumer_lag_seconds", topic="t", partition="0") == 3
    assert value(registry, "streamsight_kafka_watermark_read_errors_total") == 1
    with pytest.raises(ValueError):
        LagTracker(registry=None)


def test_process_extras() -> None:
    registry = CollectorRegistry()
    PipelineMetrics(registry)
    assert value(registry, "streamsight_process_threads") >= 1
    assert registry.get_sample_value("process_cpu_seconds_total") is not None


def test_metrics_server_serves_openmetrics() -> None:
    registry, _ = populated_registry()
    port = free_port()
    start_metrics_server(port, "127.0.0.1", registry=registry)
    start_metrics_server(port, "127.0.0.1", registry=registry)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read().decode()
    assert f'trace_id="{TRACE_ID}"' in body
    assert body.rstrip().endswith("# EOF")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        plain = response.read().decode()
    assert "streamsight_inference_frames_total 4.0" in plain
    assert "trace_id" not in plain
