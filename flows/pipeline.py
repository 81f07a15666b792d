"""The dataflow's shape: ingest -> decode -> batch -> infer -> sink, with every stage's dead
letters merged into the dead-letter sink. Wiring only: each stage is an operator of
`operators/` whose step id (`operators.stages`) is also its metrics' `stage` label and its
spans' stage, and `StageTelemetry` gives each its metrics and spans by that id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.settings import Settings
from operators.adaptive import AdaptiveBatching, AdaptiveBounds
from operators.batching import batch_frames
from operators.decode import FrameLimits, decode_frames
from operators.frames import DeadLetter, FrameResult
from operators.inference import Infer, infer_batches
from operators.ingest import ingest_frames
from operators.sinks import write_items
from operators.stages import BATCH, DEAD_LETTER_SINK, DEAD_LETTERS, DECODE, INFER, INGEST, SINK
from operators.telemetry.instrument import StageTelemetry
from operators.telemetry.metrics import PipelineMetrics
from operators.telemetry.tracing import Tracing


def adaptive_controller(settings: Settings) -> AdaptiveBatching:
    """The batch-size controller for `settings` (one per dataflow, shared by its workers)."""
    return AdaptiveBatching(
        AdaptiveBounds(
            min_size=1,
            max_size=settings.batch_adaptive_max_size,
            max_delay_s=settings.batch_max_delay_ms / 1000.0,
            latency_slo_s=settings.batch_latency_slo_ms / 1000.0,
            initial_size=min(settings.batch_max_size, settings.batch_adaptive_max_size),
        )
    )


def build_flow(
    settings: Settings,
    *,
    source: Source[Any],
    infer: Infer,
    input_size: tuple[int, int],
    results: Sink[FrameResult],
    dead_letters: Sink[DeadLetter],
    flow_id: str = "streamsight",
    tracing: Tracing | None = None,
    model: Mapping[str, str] | None = None,
    metrics: PipelineMetrics | None = None,
) -> Dataflow:
    """Wire the stages into a Bytewax dataflow reading `source` and writing the two sinks.

    With `tracing`, the ingest, decode and inference stages write per-frame and per-batch
    spans (`model` adds the model's attributes to the inference spans); the sinks trace
    their writes through their own `trace_writes` hook. With `metrics`, each stage's time
    and thread CPU time are measured, and batches, inference and sink writes recorded.
    """
    controller = adaptive_controller(settings) if settings.batch_adaptive else None
    max_size = settings.batch_adaptive_max_size if controller else settings.batch_max_size
    telemetry = StageTelemetry(tracing or Tracing.disabled(), metrics, model or {}, max_size)
    limits = FrameLimits(
        settings.max_frame_bytes, settings.max_pixels, input_size, settings.max_capture_skew_s
    )

    flow = Dataflow(flow_id)
    read = ingest_frames(INGEST, flow, source, telemetry)
    decoded = decode_frames(DECODE, read.oks, limits, telemetry)
    batched = batch_frames(
        BATCH,
        decoded.oks,
        max_size=max_size,
        max_delay_s=settings.batch_max_delay_ms / 1000.0,
        key_by=settings.batch_key,
        max_age_ms=settings.max_frame_age_ms,
        controller=controller,
        instrument=telemetry,
    )
    inferred = infer_batches(INFER, batched.oks, infer, controller, telemetry)
    write_items(SINK, inferred.oks, results, telemetry)
    letters = op.merge(DEAD_LETTERS, read.errs, decoded.errs, batched.errs, inferred.errs)
    write_items(DEAD_LETTER_SINK, letters, dead_letters, telemetry)
    return flow
