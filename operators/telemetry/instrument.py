"""The one place where the stages get their telemetry: `StageTelemetry(step_id, work)`.

Each stage's operator passes its work (the function, batch logic builder or sink it runs)
through the flow's `StageTelemetry` with its step id; the stage named by that id gets its
spans (`operators.telemetry.tracing`) and its `stage` series (`operators.telemetry.metrics`)
here, so that the wiring in `flows.pipeline` names each stage once and the stages' own
logic knows nothing of telemetry.

| step id            | work                     | spans                         | metrics |
|--------------------|--------------------------|-------------------------------|---------|
| `ingest`           | message or error -> item | error: ingest span            | `wrap` |
| `decode`           | raw frame -> prepared    | ingest and decode spans       | `wrap` |
| `batch`            | batch logic builder      | (the frames', at `infer`)     | batches |
| `infer`            | batch -> results         | batch wait and inference      | inference |
| `sink`             | result sink              | the sink's `trace_writes`     | writes |
| `dead_letter_sink` | dead-letter sink         | the sink's `trace_writes`     | writes |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bytewax.outputs import DynamicSink

from operators import stages
from operators.frames import DeadLetter, RawFrame
from operators.telemetry.metrics import PipelineMetrics
from operators.telemetry.tracing import (
    Tracing,
    traced_infer,
    traced_prepare,
    traced_source_error,
)

W = TypeVar("W")

SINK_NAMES = {stages.SINK: "results", stages.DEAD_LETTER_SINK: "dead_letters"}
"""The `sink` label of each sink stage's write series."""


@dataclass(frozen=True)
class StageTelemetry:
    """The tracing and metrics of a flow (either may be off), applied to a stage's work
    by the stage's step id; `model` holds the model's span attributes (with
    `streamsight.device`, the `device` label of the inference series), `batch_max_size`
    is the largest batch the batcher may make (the batch fill ratio's denominator)."""

    tracing: Tracing = field(default_factory=Tracing.disabled)
    metrics: PipelineMetrics | None = None
    model: Mapping[str, str] = field(default_factory=dict)
    batch_max_size: int = 1

    def __call__(self, step_id: str, work: W, /) -> W:
        """`work` traced and measured as the stage `step_id` names (its last part); work
        of any other step comes back unchanged."""
        stage = stages.stage_of(step_id)
        out: Any = self._traced(stage, work)
        return self._measured(stage, out) if self.metrics is not None else out

    def _traced(self, stage: str, work: Any) -> Any:
        tracing = self.tracing
        if not tracing.enabled:
            return work
        if stage == stages.INGEST:
            return _traced_ingest(tracing, work)
        if stage == stages.DECODE:
            return traced_prepare(tracing, work)
        if stage == stages.INFER:
            return traced_infer(tracing, work, self.model)
        return work

    def _measured(self, stage: str, work: Any) -> Any:
        metrics = self.metrics
        assert metrics is not None
        if stage in (stages.INGEST, stages.DECODE):
            return metrics.wrap(stage, work)
        if stage == stages.BATCH:
            return metrics.measured_batch_builder(work, self.batch_max_size)
        if stage == stages.INFER:
            device = self.model.get("streamsight.device", "cpu")
            return metrics.wrap_inference(work, device=device)
        if stage in SINK_NAMES and isinstance(work, DynamicSink):
            return metrics.measured_sink(work, stage=stage, sink=SINK_NAMES[stage])
        return work


def _traced_ingest(
    tracing: Tracing, receive: Callable[[Any], RawFrame | DeadLetter]
) -> Callable[[Any], RawFrame | DeadLetter]:
    """`receive` with an ingest span (error status) for each consume error it turns into a
    dead letter; a frame's ingest span is written with its decode span (`traced_prepare`)."""
    error_span = traced_source_error(tracing, _same_letter)

    def run(item: Any) -> RawFrame | DeadLetter:
        out = receive(item)
        return error_span(out) if isinstance(out, DeadLetter) else out

    return run


def _same_letter(letter: DeadLetter) -> DeadLetter:
    return letter
