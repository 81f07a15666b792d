"""The dataflow's shape: ingest -> decode -> batch -> infer -> sinks, with dead letters split
out at every stage. Wiring only; the stages live in `operators/`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.settings import Settings
from operators import dead_letters as dl
from operators.adaptive import AdaptiveBatching, AdaptiveBounds
from operators.batching import batch_logic_builder, local_stream_key, stream_key
from operators.decode import FrameLimits, prepare_frame
from operators.frames import DeadLetter, FrameBatch, FrameResult, PreparedFrame
from operators.ingest import error_to_dead_letter, to_raw_frame
from operators.shedding import shed_stale
from operators.telemetry.metrics import PipelineMetrics
from operators.telemetry.tracing import Tracing, traced_infer, traced_prepare, traced_source_error

Infer = Callable[[FrameBatch], list[FrameResult]]


def infer_or_dead_letter(infer: Infer, batch: FrameBatch) -> list[FrameResult | DeadLetter]:
    """Run `infer`; if the model fails, every frame of the batch becomes a dead letter."""
    try:
        return list(infer(batch))
    except Exception as exc:  # a failing batch must not crash the dataflow
        return [
            dl.reject_decoded(
                frame.meta,
                stage="infer",
                reason=dl.INTERNAL_ERROR,
                detail=f"inference failed: {type(exc).__name__}",
            )
            for frame in batch.frames
        ]


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


def observed_infer(controller: AdaptiveBatching, infer: Infer) -> Infer:
    """`infer` with each batch's size, forward time, age and end fed to `controller`. The
    age is that of its first frame when it reached the batcher (capture to prepared): what
    the frames waited before batching, not the batch delay the controller chose itself."""

    def run(batch: FrameBatch) -> list[FrameResult]:
        started = time.perf_counter_ns()
        results = infer(batch)
        ended = time.perf_counter_ns()
        age_ns = 0
        if batch.frames:
            first = batch.frames[0]
            age_ns = max(first.prepared_ns - first.meta.capture_ns, 0)
        controller.observe_inference(
            len(batch.frames),
            (ended - started) / 1e9,
            wait_s=age_ns / 1e9,
            worker=threading.get_ident(),
            ended_ns=ended,
        )
        return results

    return run


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

    With `tracing`, the ingest, decode and inference stages are wrapped in per-frame and
    per-batch spans (`model` adds the model's attributes to the inference spans); the
    sinks trace their writes through their own `trace_writes` hook. With `metrics`, each
    stage's items, time and thread CPU time are measured, and batches and inference
    recorded (the sinks are measured where they are built).
    """
    tracing = tracing or Tracing.disabled()

    def measured(stage: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return metrics.wrap(stage, fn) if metrics is not None else fn

    limits = FrameLimits(
        settings.max_frame_bytes, settings.max_pixels, input_size, settings.max_capture_skew_s
    )
    flow = Dataflow(flow_id)
    messages = op.input("ingest", flow, source)
    received = op.branch("split_source_errors", messages, _is_message)
    raw = op.map("to_raw_frame", received.trues, measured("ingest", to_raw_frame))
    source_errors = op.map(
        "source_error_to_dead_letter",
        received.falses,
        traced_source_error(tracing, error_to_dead_letter),
    )

    prepare = traced_prepare(tracing, partial(prepare_frame, limits=limits))
    decoded = op.map("decode", raw, measured("decode", prepare))
    prepared = op.branch("split_decode_errors", decoded, _is_prepared)
    # Batched on the worker that read the frame: Bytewax's key hashing would otherwise put
    # 3 or all 4 of 4 cameras' batches on one of 2 workers, depending on the topic's name.
    fresh, stale = prepared.trues, None
    if settings.max_frame_age_ms > 0:
        shed = shed_stale("shed_stale", prepared.trues, settings.max_frame_age_ms)
        fresh, stale = shed.oks, shed.errs
    keyed = op.key_on("stream_key", fresh, partial(local_stream_key, by=settings.batch_key))
    controller = adaptive_controller(settings) if settings.batch_adaptive else None
    max_size = settings.batch_adaptive_max_size if controller else settings.batch_max_size
    builder = batch_logic_builder(
        max_size,
        settings.batch_max_delay_ms / 1000.0,
        partial(stream_key, by=settings.batch_key),
        controller=controller,
    )
    if metrics is not None:
        builder = metrics.measured_batch_builder(builder, max_size)
    batches = op.stateful_batch("batch", keyed, builder)
    unkeyed = op.key_rm("unkey", batches)
    if controller is not None:
        infer = observed_infer(controller, infer)
    run_batch = traced_infer(tracing, infer, model)
    if metrics is not None:
        device = (model or {}).get("streamsight.device", "cpu")
        run_batch = metrics.wrap_inference(run_batch, device=device)
    outcomes = op.flat_map("infer", unkeyed, partial(infer_or_dead_letter, run_batch))
    inferred = op.branch("split_infer_errors", outcomes, _is_result)

    op.output("sink", inferred.trues, results)
    letters = [source_errors, prepared.falses, inferred.falses]
    if stale is not None:
        letters.append(stale)
    failed = op.merge("dead_letters", *letters)
    op.output("dead_letter_sink", failed, dead_letters)
    return flow


def _is_message(item: object) -> bool:
    return isinstance(item, KafkaSourceMessage)


def _is_prepared(item: object) -> bool:
    return isinstance(item, PreparedFrame)


def _is_result(item: object) -> bool:
    return isinstance(item, FrameResult)
