"""`StageTelemetry`: the one wrapper that gives a stage its metrics and spans by step id."""

from __future__ import annotations

from bytewax.testing import TestingSink
from prometheus_client import CollectorRegistry

from operators import stages
from operators.batching import batch_logic_builder
from operators.telemetry.instrument import StageTelemetry
from operators.telemetry.metrics import PipelineMetrics
from tests import metrics_data as data


def _calls(registry: CollectorRegistry, stage: str) -> float:
    found = registry.get_sample_value("streamsight_stage_duration_seconds_count", {"stage": stage})
    return found or 0.0


def test_without_tracing_and_metrics_the_work_is_left_as_it_is() -> None:
    telemetry = StageTelemetry()
    for stage in stages.STAGES:
        work = object()
        assert telemetry(f"streamsight.{stage}", work) is work


def test_a_stage_is_named_by_the_last_part_of_its_step_id() -> None:
    registry = CollectorRegistry()
    telemetry = StageTelemetry(metrics=PipelineMetrics(registry))
    decode = telemetry("streamsight.decode", lambda raw: raw)
    assert decode("frame") == "frame"
    assert _calls(registry, stages.DECODE) == 1
    # A step that is not a stage is not measured, whatever its path.
    work = lambda item: item  # noqa: E731
    assert telemetry("streamsight.decode.split", work) is work
    assert telemetry("streamsight.dead_letters", work) is work


def test_every_stage_is_measured_as_its_step_id() -> None:
    registry = CollectorRegistry()
    telemetry = StageTelemetry(
        metrics=PipelineMetrics(registry), model={"streamsight.device": "cpu"}, batch_max_size=4
    )
    telemetry(stages.INGEST, lambda message: message)("message")
    telemetry(stages.DECODE, lambda raw: raw)("raw")
    logic = telemetry(stages.BATCH, batch_logic_builder(4, 10.0))(None)
    logic.on_batch([data.prepared(data.meta(i)) for i in range(4)])
    metas = [data.meta(i) for i in range(2)]
    infer = telemetry(stages.INFER, lambda batch: [data.result(f.meta) for f in batch.frames])
    assert len(infer(data.batch(metas))) == 2
    for stage in (stages.SINK, stages.DEAD_LETTER_SINK):
        written: list[object] = []
        sink = telemetry(stage, TestingSink(written))
        partition = sink.build(stage, 0, 1)
        partition.write_batch(["item"])
        assert written == ["item"]
    assert {stage: _calls(registry, stage) for stage in stages.STAGES} == dict.fromkeys(
        stages.STAGES, 1.0
    )
    assert registry.get_sample_value("streamsight_batch_fill_ratio_sum") == 1.0
    assert registry.get_sample_value("streamsight_inference_frames_total") == 2
    for sink in ("results", "dead_letters"):
        count = "streamsight_sink_write_duration_seconds_count"
        assert registry.get_sample_value(count, {"sink": sink}) == 1
