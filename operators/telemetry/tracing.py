"""Per-frame OpenTelemetry traces: setup from the standard `OTEL_*` variables, and wrappers
that the flow wiring puts around the stages.

Each frame is one trace: `send frames` (the camera, PRODUCER) -> `process frames` (ingest,
CONSUMER, child of the context in the Kafka headers) -> `preprocess`, `batch wait`,
`inference` and `sink write` (children of the ingest span). The ingest span's context
travels inside the item (`FrameMeta.trace_carrier`, set when the decoded frame is made:
tracing never changes a record it is given), so any worker can continue the trace.
Inference and sink writes also get one span per batch that links to every frame's context.
Finished spans are written as records and exported from a child process (`span_export`).

Configuration is the OpenTelemetry SDK's own: `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`
(`otlp`, the default, `console` or `none`), `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`
(`grpc`, the default, or `http/protobuf`), endpoint, headers, certificate, timeout,
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)` and
`OTEL_BSP_*`. When tracing is off the wrappers return the stage functions unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote_plus

from opentelemetry import baggage
from opentelemetry import trace as otel_trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.environment_variables import OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from operators import contract, stages
from operators.frames import DeadLetter, FrameBatch, FrameMeta, FrameResult, PreparedFrame, RawFrame
from operators.telemetry.span_export import (
    FLUSH_TIMEOUT_S,
    UNSET_STATUS,
    Attributes,
    Ctx,
    ExportProcess,
    GuardedExporter,
    Ids,
    SpanLink,
    SpanRecord,
    context_record,
    exporter_kind,
    otlp_exporter,
    quiet_exporter_logs,
    readable_span,
)
from operators.workers import run_options

log = logging.getLogger(__name__)

SERVICE_NAME = "streamsight"
SERVICE_VERSION = "0.1.0"
SCOPE = "streamsight"
MESSAGING_SYSTEM = "kafka"
MAX_ATTRIBUTE_LENGTH = 256
MAX_LISTED_IDS = 8

# Span names and the `streamsight.stage` of each: the camera's `send`, else the step id of
# the flow's stage the span is part of (`operators.stages`).
SEND = "send"
INGEST = stages.INGEST
PREPROCESS = stages.DECODE
BATCH_WAIT = stages.BATCH
INFERENCE = stages.INFER
SINK = stages.SINK
STAGES = (SEND, INGEST, PREPROCESS, BATCH_WAIT, INFERENCE, SINK)
SPAN_NAMES = {
    PREPROCESS: "preprocess",
    BATCH_WAIT: "batch wait",
    INFERENCE: "inference",
    SINK: "sink write",
}
INFERENCE_BATCH_SPAN = "inference batch"
SINK_BATCH_SPAN = "sink write batch"

JOB_ID = "job.id"
CAMERA = "camera.id"
STAGE = "streamsight.stage"
SCOPE_ATTR = "streamsight.span.scope"
FRAME_ID = "streamsight.frame.id"
BATCH_ID = "streamsight.batch.id"

PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value and value.strip() else None


def bounded(text: str, limit: int = MAX_ATTRIBUTE_LENGTH) -> str:
    """`text` cut to `limit` characters (attributes never hold unbounded strings)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def joined(values: Sequence[str]) -> str:
    """Distinct values in order of appearance, comma-joined, at most `MAX_LISTED_IDS`."""
    distinct = list(dict.fromkeys(values))
    text = ",".join(distinct[:MAX_LISTED_IDS])
    if len(distinct) > MAX_LISTED_IDS:
        text += f",+{len(distinct) - MAX_LISTED_IDS}"
    return bounded(text)


# Setup ------------------------------------------------------------------------------------


class LinkAwareSampler(Sampler):
    """Root sampler: a span with links (a batch span) is sampled exactly when one of the
    contexts it links to is (any of its frames); anything else goes to `root`."""

    def __init__(self, root: Sampler) -> None:
        self.root = root

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if links:
            if any(link.context.trace_flags.sampled for link in links):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return SamplingResult(Decision.DROP)
        return self.root.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkAware{{{self.root.get_description()}}}"


def root_sampler() -> Sampler:
    """The sampler for traces that start here, named by `OTEL_TRACES_SAMPLER` and
    `OTEL_TRACES_SAMPLER_ARG` as the SDK reads them (`always_on`, the default,
    `always_off` or `traceidratio`, each also with `parentbased_`), built from the SDK's
    public samplers; an unknown name or a bad ratio is logged and samples everything."""
    name = (_env(OTEL_TRACES_SAMPLER) or "parentbased_always_on").lower()
    root = name.removeprefix("parentbased_")
    if root == "always_on":
        return ALWAYS_ON
    if root == "always_off":
        return ALWAYS_OFF
    if root == "traceidratio":
        try:
            return TraceIdRatioBased(float(_env(OTEL_TRACES_SAMPLER_ARG) or ""))
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1: sampling all")
            return TraceIdRatioBased(1.0)
    log.warning("unknown OTEL_TRACES_SAMPLER %r: sampling every trace", name)
    return ALWAYS_ON


def parent_based_sampler() -> Sampler:
    """The configured sampler (`root_sampler`) made parent-based, so that a frame's trace
    is kept or dropped whole."""
    return ParentBased(LinkAwareSampler(root_sampler()))


def build_resource(default_service: str = SERVICE_NAME) -> Resource:
    """Service, process and host, the Bytewax process id, and the Kubernetes pod; then
    `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`, which win."""
    host = socket.gethostname()
    attributes: dict[str, str | int] = {
        "service.name": default_service,
        "service.version": SERVICE_VERSION,
        "service.instance.id": f"{host}/{os.getpid()}",
        "host.name": host,
        "process.pid": os.getpid(),
        "process.runtime.name": "cpython",
        "process.runtime.version": ".".join(str(v) for v in sys.version_info[:3]),
    }
    with suppress(ValueError):  # options bytewax.run itself refuses: it reports them
        process_id = run_options().process_id
        if process_id is not None:
            attributes["bytewax.process.id"] = str(process_id)
    if _env("KUBERNETES_SERVICE_HOST") or _env("BYTEWAX_POD_NAME"):
        attributes["k8s.pod.name"] = _env("BYTEWAX_POD_NAME") or _env("POD_NAME") or host
        namespace = _env("POD_NAMESPACE") or _env("K8S_NAMESPACE")
        if namespace:
            attributes["k8s.namespace.name"] = namespace
        if _env("BYTEWAX_STATEFULSET_NAME"):
            attributes["k8s.statefulset.name"] = _env("BYTEWAX_STATEFULSET_NAME") or ""
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


@dataclass
class Tracing:
    """The process's tracing: a tracer when enabled, else `enabled` is False and the
    wrappers leave the stages as they are."""

    enabled: bool
    tracer: otel_trace.Tracer
    provider: TracerProvider | None = None
    processor: SpanProcessor | None = None
    exporter: GuardedExporter | None = None
    consumer_group: str | None = None
    recorder: SpanRecorder | None = None
    _closed: bool = False

    @classmethod
    def disabled(cls) -> Tracing:
        """Tracing switched off."""
        return cls(False, otel_trace.NoOpTracer())

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Export every finished span (bounded by `timeout_s`) and stop exporting."""
        if self._closed or self.provider is None:
            return
        self._closed = True
        processor = self.processor
        if processor is None:
            return
        if self.exporter is None or not self.exporter.failing:
            _bounded(processor.force_flush, timeout_s)
        if not _bounded(processor.shutdown, timeout_s) and self.exporter is not None:
            self.exporter.shutdown()

    def wait_ready(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until the span export process (if any) is ready to export; whether it is."""
        wait = getattr(self.processor, "wait_ready", None)
        return bool(wait(timeout_s)) if wait is not None else True

    def exported(self) -> int | None:
        """Spans the exporter has accepted (from an export process: known after `flush`)."""
        if self.exporter is not None:
            return self.exporter.exported
        stats = getattr(self.processor, "stats", None)
        return int(stats["exported"]) if stats else None


def _bounded(call: Callable[[], object], timeout_s: float) -> bool:
    """Run `call` in a daemon thread for at most `timeout_s`; whether it finished."""
    worker = threading.Thread(target=call, name="trace-flush", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive()


def setup_tracing(
    service_name: str = SERVICE_NAME,
    *,
    exporter: SpanExporter | None = None,
    processor: Callable[[SpanExporter], SpanProcessor] = BatchSpanProcessor,
    make_exporter: Callable[[], SpanExporter] | None = None,
    flush_at_exit: bool = True,
) -> Tracing:
    """Tracing configured from the `OTEL_*` environment.

    Off when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. By default spans
    are exported from a child process (`ExportProcess`) by the exporter that
    `make_exporter` builds there (default: OTLP, or the console with
    `OTEL_TRACES_EXPORTER=console`). With `exporter`, they go through `processor` to it
    in this process instead. A failing exporter is logged once and never raises. The
    provider is the process's own (not the global one) and is flushed at exit.
    """
    if _truthy(os.environ.get("OTEL_SDK_DISABLED")):
        return Tracing.disabled()
    kind = exporter_kind()
    if kind not in ("otlp", "console", "none"):
        raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {kind!r}: use otlp, console, none")
    if kind == "none" and exporter is None and make_exporter is None:
        return Tracing.disabled()
    if kind == "otlp" and exporter is None and make_exporter is None:
        otlp_exporter().shutdown()  # a bad protocol or compression fails here, not in the child
    quiet_exporter_logs()
    resource = build_resource(service_name)
    scope = InstrumentationScope(SCOPE, SERVICE_VERSION)
    guarded: GuardedExporter | None = None
    span_processor: SpanProcessor
    if exporter is not None:
        guarded = GuardedExporter(exporter)
        span_processor = processor(guarded)
    else:
        compact = (PreparedSpans, InferredSpans, WrittenSpans)
        span_processor = ExportProcess(resource, make_exporter, scope=scope, record_types=compact)
    provider = TracerProvider(
        resource=resource,
        sampler=parent_based_sampler(),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(span_processor)
    tracing = Tracing(
        True,
        provider.get_tracer(SCOPE, SERVICE_VERSION),
        provider=provider,
        processor=span_processor,
        exporter=guarded,
        recorder=SpanRecorder(provider, span_processor, scope),
    )
    if flush_at_exit:
        atexit.register(tracing.flush)
    return tracing


# Finished spans ---------------------------------------------------------------------------

Error = tuple[str, str]
"""A failed step: the reason (`error.type`) and a detail for the status message."""


def sampled(ctx: Ctx | None) -> bool:
    """Whether the span of `ctx` is recorded."""
    return ctx is not None and bool(ctx[2] & TraceFlags.SAMPLED)


def child_context(parent: Ctx, span_id: int) -> Ctx:
    """The context of a span `span_id` under `parent`: its trace and sampled flag."""
    return (parent[0], span_id, parent[2] & TraceFlags.SAMPLED, parent[3], False)


def _status(attributes: Attributes, error: Error | None) -> tuple[int, str | None]:
    """The status of a span (error status and `error.type` for an `error`)."""
    if error is None:
        return UNSET_STATUS
    reason, detail = error
    attributes["error.type"] = bounded(reason)
    return StatusCode.ERROR.value, bounded(f"{reason}: {detail}" if detail else reason)


class SpanRecorder:
    """Writes spans whose start and end are known once they are written, as every span of
    a frame is: each becomes a finished span handed straight to the span processor,
    without the SDK's live-span bookkeeping (context, locks, re-validation of
    attributes), which costs about five times as much per span. A processor with an
    `on_record` method (`ExportProcess`) gets the span as a record (`SpanRecord`) instead,
    without any SDK object at all, and the spans of a frame's stages as one compact record
    (`PreparedSpans`, `InferredSpans`, `WrittenSpans`), which the export process expands.

    Sampling follows the provider's parent-based sampler: a child takes its parent's
    sampled flag, a span with links is sampled when one of them is (`LinkAwareSampler`),
    another root asks the sampler. Attributes must already be bounded (`bounded`), since
    the SDK's span limits are not applied here.
    """

    def __init__(
        self,
        provider: TracerProvider,
        processor: SpanProcessor,
        scope: InstrumentationScope | None = None,
    ) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.scope = scope or InstrumentationScope(SCOPE, SERVICE_VERSION)
        self.processor = processor
        self.on_record: Callable[[Any], None] | None = getattr(processor, "on_record", None)

    def context(
        self,
        name: str,
        parent: Ctx | None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes | None = None,
        links: Sequence[SpanLink] = (),
    ) -> Ctx:
        """The context of a new span: in `parent`'s trace with its sampled flag, or (no
        parent) a new trace that the sampler keeps or drops."""
        span_id = self.ids.generate_span_id()
        if parent is not None:
            return child_context(parent, span_id)
        trace_id = self.ids.generate_trace_id()
        if links:
            return (trace_id, span_id, int(any(sampled(c) for c, _ in links)), "", False)
        decision = self.sampler.should_sample(Context(), trace_id, name, kind, attributes)
        state = decision.trace_state.to_header() if decision.trace_state else ""
        return (trace_id, span_id, int(decision.decision.is_sampled()), state, False)

    def record(
        self,
        name: str,
        parent: Ctx | None,
        start_ns: int,
        end_ns: int,
        attributes: Attributes,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        links: Sequence[SpanLink] = (),
        error: Error | None = None,
        context: Ctx | None = None,
    ) -> Ctx:
        """Write one finished span (under `context` when given, else a new one) and
        return its context; an `error` sets `error.type` and the error status."""
        if context is None:
            context = self.context(name, parent, kind=kind, attributes=attributes, links=links)
        if not sampled(context):
            return context
        status = _status(attributes, error)
        start = min(start_ns, end_ns)
        self._write(
            SpanRecord(name, kind.value, start, end_ns, context, parent, attributes, links, status)
        )
        return context

    def compact(self, record: PreparedSpans | InferredSpans | WrittenSpans) -> None:
        """Write the spans of a compact record: as it is to a processor that takes
        records, else expanded here."""
        if self.on_record is not None:
            self.on_record(record)
            return
        for span in record.spans(self.ids):
            self._write(span)

    def _write(self, record: SpanRecord) -> None:
        if self.on_record is not None:
            self.on_record(record)
        else:
            self.processor.on_end(readable_span(record, self.resource, self.scope))


# Compact records --------------------------------------------------------------------------
# The spans of a frame's stages as the values they are made of, without attribute dicts or
# span ids that nothing refers to: the flow builds and pipes one record per frame (or per
# batch) instead of several spans, and the export process builds the spans (`spans`). These
# and `SpanRecord` are the only places where spans' fields are laid out.


class PreparedSpans(NamedTuple):
    """A decoded frame's ingest (CONSUMER) and preprocess spans."""

    ingest: Ctx
    parent: Ctx | None
    """The context in the message's headers (the camera's send span), if any."""
    start: int
    end: int
    started: int
    """Preprocess start and end."""
    ended: int
    topic: str
    partition: int
    offset: int
    group: str | None
    size: int
    job: str
    camera: str
    frame_id: str
    seq: int | None
    width: int
    height: int

    def spans(self, ids: Ids) -> list[SpanRecord]:
        """The two spans; `ids` makes the preprocess span's id."""
        attributes = _frame_step(INGEST, self.job, self.camera, self.frame_id)
        if self.seq is not None:
            attributes["streamsight.frame.seq"] = self.seq
        attributes.update(source_attributes(self.topic, self.partition, self.offset, self.group))
        attributes["messaging.message.body.size"] = self.size
        step = _frame_step(PREPROCESS, self.job, self.camera, self.frame_id)
        step["streamsight.frame.width"] = self.width
        step["streamsight.frame.height"] = self.height
        preprocess = child_context(self.ingest, ids.generate_span_id())
        consumer, internal = SpanKind.CONSUMER.value, SpanKind.INTERNAL.value
        return [
            SpanRecord(
                f"process {self.topic}", consumer, min(self.start, self.end), self.end,
                self.ingest, self.parent, _ingest_attributes(attributes), (), UNSET_STATUS,
            ),
            SpanRecord(
                SPAN_NAMES[PREPROCESS], internal, min(self.started, self.ended), self.ended,
                preprocess, self.ingest, step, (), UNSET_STATUS,
            ),
        ]  # fmt: skip


class InferredFrame(NamedTuple):
    """One frame of an `InferredSpans` record."""

    parent: Ctx
    """The frame's ingest span."""
    prepared: int
    inferred: int
    job: str
    camera: str
    frame_id: str
    detections: int


class InferredSpans(NamedTuple):
    """The batch wait and inference spans of each frame of a batch."""

    batch: Ctx
    """The `inference batch` span, which each inference span links to."""
    dispatched: int
    batch_id: str
    size: int
    reason: str
    frames: list[InferredFrame]

    def spans(self, ids: Ids) -> list[SpanRecord]:
        """Two spans per frame; `ids` makes their ids."""
        dispatched, batch_id = self.dispatched, self.batch_id
        link: list[SpanLink] = [(self.batch, {BATCH_ID: batch_id})]
        internal = SpanKind.INTERNAL.value
        spans: list[SpanRecord] = []
        for parent, prepared, inferred, job, camera, frame_id, detections in self.frames:
            wait = _frame_step(BATCH_WAIT, job, camera, frame_id)
            wait[BATCH_ID] = batch_id
            wait["streamsight.batch.size"] = self.size
            wait["streamsight.batch.flush_reason"] = self.reason
            done = _frame_step(INFERENCE, job, camera, frame_id)
            done[BATCH_ID] = batch_id
            done["streamsight.detections"] = detections
            spans += [
                SpanRecord(
                    SPAN_NAMES[BATCH_WAIT], internal, min(prepared, dispatched), dispatched,
                    child_context(parent, ids.generate_span_id()), parent, wait, (),
                    UNSET_STATUS,
                ),
                SpanRecord(
                    SPAN_NAMES[INFERENCE], internal, min(dispatched, inferred), inferred,
                    child_context(parent, ids.generate_span_id()), parent, done, link,
                    UNSET_STATUS,
                ),
            ]  # fmt: skip
        return spans


class SinkWrite(NamedTuple):
    """One item of a `WrittenSpans` record."""

    context: Ctx
    """Its sink-write span's context."""
    parent: Ctx | None
    job: str
    camera: str
    frame_id: str
    batch_id: str
    detections: int
    outcome: str
    error: Error | None
    letter: Attributes | None
    """The attributes of a dead letter's write (None for a frame's result)."""


class WrittenSpans(NamedTuple):
    """A write batch's `sink write` spans and the `sink write batch` span linked to them."""

    started: int
    ended: int
    destination: Attributes
    failure: str | None
    """The exception type when the whole write failed."""
    writes: list[SinkWrite]
    stage: str
    """The sink's step id: `sink` or `dead_letter_sink`."""

    def spans(self, ids: Ids) -> list[SpanRecord]:
        """One span per sampled write, and the batch span; `ids` makes its ids."""
        started = min(self.started, self.ended)
        producer = SpanKind.PRODUCER.value
        failed: Error | None = ("sink_error", self.failure) if self.failure is not None else None
        spans: list[SpanRecord] = []
        for write in self.writes:
            if not sampled(write.context):
                continue
            if write.letter is None:
                attributes = _frame_step(self.stage, write.job, write.camera, write.frame_id)
                attributes[BATCH_ID] = write.batch_id
                attributes["streamsight.detections"] = write.detections
            else:
                attributes = dict(write.letter)
            attributes["streamsight.sink.outcome"] = write.outcome
            if write.outcome == "dead_letter" and write.error is not None:
                attributes["streamsight.dead_letter.reason"] = write.error[0]
            attributes.update(self.destination)
            status = _status(attributes, failed or write.error)
            spans.append(
                SpanRecord(
                    SPAN_NAMES[SINK], producer, started, self.ended, write.context, write.parent,
                    attributes, (), status,
                )
            )  # fmt: skip
        batch = self._batch_span(started, failed, ids)
        if batch is not None:
            spans.append(batch)
        return spans

    def _batch_span(self, started: int, failed: Error | None, ids: Ids) -> SpanRecord | None:
        """The `sink write batch` span, linked to each frame's span before the sink;
        None when none of those is sampled."""
        links: list[SpanLink] = []
        for write in self.writes:
            if write.parent is not None:
                frame_id = bounded(write.frame_id) if write.frame_id else ""
                links.append((write.parent, {FRAME_ID: frame_id}))
        if not any(sampled(link) for link, _ in links):
            return None
        attributes: Attributes = {
            STAGE: self.stage,
            SCOPE_ATTR: "batch",
            JOB_ID: joined([w.job for w in self.writes]),
            CAMERA: joined([bounded(w.camera) for w in self.writes]),
            "messaging.batch.message_count": len(self.writes),
            **self.destination,
        }
        sampled_flag = int(TraceFlags.SAMPLED)
        context = (ids.generate_trace_id(), ids.generate_span_id(), sampled_flag, "", False)
        status = _status(attributes, failed)
        return SpanRecord(
            SINK_BATCH_SPAN, SpanKind.PRODUCER.value, started, self.ended, context, None,
            attributes, links, status,
        )  # fmt: skip


# Context and attributes -------------------------------------------------------------------


def extract(carrier: Mapping[str, str]) -> Context:
    """The context (trace and baggage) held by a carrier of W3C headers."""
    return PROPAGATOR.extract(dict(carrier))


def span_context_of(carrier: Mapping[str, str]) -> Ctx | None:
    """The span context in a carrier's `traceparent` (None when there is none). The
    carriers this module writes are read directly; anything else goes through the W3C
    propagator."""
    header = carrier.get("traceparent")
    if not header:
        return None
    parts = header.split("-")
    if len(parts) == 4 and parts[0] == "00" and len(parts[1]) == 32 and len(parts[2]) == 16:
        try:
            trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
            flags = int(parts[3], 16) & TraceFlags.SAMPLED
        except ValueError:
            trace_id = span_id = 0
        if trace_id and span_id:
            return (trace_id, span_id, flags, carrier.get("tracestate", ""), True)
    return remote_parent(extract(carrier))


def remote_parent(context: Context) -> Ctx | None:
    """The span context held by an extracted context, or None."""
    found = otel_trace.get_current_span(context).get_span_context()
    return context_record(found) if found.is_valid else None


def carrier_of(ctx: Ctx, job_id: str | None, parent: Context | None = None) -> dict[str, str]:
    """The W3C headers that continue the trace under `ctx`: `traceparent`, `tracestate`,
    and as `baggage` the parent's entries with the job ID."""
    carrier = {"traceparent": f"00-{ctx[0]:032x}-{ctx[1]:016x}-{ctx[2]:02x}"}
    if ctx[3]:
        carrier["tracestate"] = ctx[3]
    entries = dict(baggage.get_all(parent)) if parent is not None else {}
    if not entries:
        if job_id:
            carrier["baggage"] = _own_baggage(job_id)
        return carrier
    if job_id:
        entries[JOB_ID] = job_id
    carrier["baggage"] = ",".join(
        f"{quote_plus(str(k))}={quote_plus(str(v))}" for k, v in entries.items()
    )
    return carrier


def carrier_from_headers(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    """The trace headers of a Kafka message."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in contract.TRACE_HEADERS and value and name not in carrier:
            try:
                carrier[name] = value.decode("ascii")
            except UnicodeDecodeError:
                continue
    return carrier


def source_attributes(
    topic: str, partition: int, offset: int, consumer_group: str | None = None
) -> Attributes:
    """OTel messaging attributes of a message read from Kafka."""
    attributes: Attributes = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": bounded(topic),
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
    }
    if consumer_group:
        attributes["messaging.consumer.group.name"] = bounded(consumer_group)
    return attributes


def step_attributes(meta: FrameMeta, stage: str) -> Attributes:
    """Stage, job, camera and frame identity of a frame's internal span (preprocess,
    batch wait, inference): the source coordinates live on the trace's ingest span."""
    return _frame_step(stage, meta.job_id, meta.camera, meta.frame_id)


def _frame_step(stage: str, job_id: str, camera: str, frame_id: str) -> Attributes:
    return {
        STAGE: stage,
        SCOPE_ATTR: "frame",
        JOB_ID: bounded(job_id),
        CAMERA: bounded(camera),
        FRAME_ID: bounded(frame_id),
    }


def _recorder(tracing: Tracing) -> SpanRecorder:
    if tracing.recorder is None:
        raise ValueError("tracing is enabled but has no span recorder")
    return tracing.recorder


# Camera -----------------------------------------------------------------------------------


class OutgoingFrameLike(Protocol):
    """What the send span needs of a frame the camera publishes."""

    camera: str
    seq: int
    capture_time_ms: float


def send_tracer(
    tracing: Tracing,
    topic: str,
    job_id: str,
    partition_of: Callable[[str], int | None] | None = None,
) -> Callable[[Any], dict[str, str]] | None:
    """The camera's `trace_headers` hook: a `send <topic>` PRODUCER span per frame (from
    capture to hand-over to the producer), whose context and the job ID (as baggage) go
    into the message headers. None when tracing is off."""
    if not tracing.enabled:
        return None
    spans = _recorder(tracing)
    name = f"send {topic}"
    base: Attributes = {
        STAGE: SEND,
        SCOPE_ATTR: "frame",
        JOB_ID: bounded(job_id),
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": bounded(topic),
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
    }

    def headers(frame: OutgoingFrameLike) -> dict[str, str]:
        now = time.time_ns()
        attributes = dict(base)
        attributes[CAMERA] = bounded(frame.camera)
        attributes["streamsight.frame.seq"] = frame.seq
        attributes["messaging.kafka.message.key"] = bounded(frame.camera)
        partition = partition_of(frame.camera) if partition_of is not None else None
        if partition is not None:
            attributes["messaging.destination.partition.id"] = str(partition)
        context = spans.record(
            name,
            None,
            int(frame.capture_time_ms * 1e6),
            now,
            attributes,
            kind=SpanKind.PRODUCER,
        )
        return carrier_of(context, job_id)

    return headers


# Ingest and preprocess --------------------------------------------------------------------


def _printable(value: bytes | None) -> str | None:
    if not value:
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(text) <= contract.MAX_ID_LENGTH and text.isprintable() else None


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


def _job_of(job_id: str | None, headers: Sequence[tuple[str, bytes | None]], ctx: Context) -> str:
    found = job_id or _printable(_header(headers, contract.JOB_ID))
    if not found:
        value = baggage.get_baggage(JOB_ID, ctx)
        found = str(value) if value else None
    return bounded(found or contract.DEFAULT_JOB_ID)


def _camera_of(headers: Sequence[tuple[str, bytes | None]], key: bytes | None) -> str:
    return bounded(_printable(_header(headers, contract.CAMERA)) or _printable(key) or "unknown")


def _letter_attributes(letter: DeadLetter, ctx: Context, stage: str) -> Attributes:
    attributes: Attributes = {
        STAGE: stage,
        SCOPE_ATTR: "frame",
        JOB_ID: _job_of(letter.job_id, letter.headers, ctx),
        CAMERA: _camera_of(letter.headers, letter.key),
        "streamsight.dead_letter.stage": letter.stage,
        "streamsight.dead_letter.reason": letter.reason,
    }
    if letter.frame_id:
        attributes[FRAME_ID] = bounded(letter.frame_id)
    return attributes


def _ingest_attributes(attributes: Attributes) -> Attributes:
    return {
        **attributes,
        STAGE: INGEST,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
    }


@lru_cache(maxsize=1024)
def _own_baggage(job_id: str) -> str:
    """The baggage header that carries nothing but `job_id` (what the camera sends)."""
    return f"{JOB_ID}={quote_plus(job_id)}"


def traced_prepare(
    tracing: Tracing, prepare: Callable[[RawFrame], PreparedFrame | DeadLetter]
) -> Callable[[RawFrame], PreparedFrame | DeadLetter]:
    """Wrap the decode stage: the ingest CONSUMER span (child of the Kafka headers'
    context, from the message's Kafka timestamp to its ingest) and a `preprocess` span.
    The frame or dead letter that comes out is a copy of the stage's whose carrier
    (`trace_carrier`) holds the ingest span's context, for the later stages."""
    if not tracing.enabled:
        return prepare
    spans = _recorder(tracing)
    group = tracing.consumer_group

    def run(raw: RawFrame) -> PreparedFrame | DeadLetter:
        started = time.time_ns()
        out = prepare(raw)
        ended = time.time_ns()
        headers = carrier_from_headers(raw.headers)
        parent = span_context_of(headers)
        if isinstance(out, PreparedFrame) and _unsampled(parent, headers, out.meta):
            return out  # the producer's decision travels on in the frame's own carrier
        start = _ingest_start(raw.timestamp_ms, raw.ingest_ns)
        name = f"process {raw.topic}"
        if isinstance(out, PreparedFrame):
            meta = out.meta
            entries = headers.get("baggage")
            parent_ctx = None
            if entries and entries != _own_baggage(meta.job_id):
                parent_ctx = extract(headers)  # other baggage entries travel on
            ingest = spans.context(name, parent, kind=SpanKind.CONSUMER)
            if sampled(ingest):
                spans.compact(
                    PreparedSpans(
                        ingest, parent, start, raw.ingest_ns, started, ended, raw.topic,
                        raw.partition, raw.offset, group, len(raw.value or b""), meta.job_id,
                        meta.camera, meta.frame_id, meta.seq, meta.width, meta.height,
                    )
                )  # fmt: skip
            carrier = carrier_of(ingest, meta.job_id, parent_ctx)
            return replace(out, meta=replace(meta, trace_carrier=carrier))
        parent_ctx = extract(headers)
        attributes = {
            **_letter_attributes(out, parent_ctx, INGEST),
            **source_attributes(raw.topic, raw.partition, raw.offset, group),
        }
        attributes["messaging.message.body.size"] = len(raw.value or b"")
        ingest = spans.record(
            name, parent, start, raw.ingest_ns, _ingest_attributes(attributes),
            kind=SpanKind.CONSUMER,
        )  # fmt: skip
        step = {**attributes, STAGE: PREPROCESS}
        spans.record(
            SPAN_NAMES[PREPROCESS], ingest, started, ended, step, error=(out.reason, out.detail)
        )
        return replace(out, trace_carrier=carrier_of(ingest, str(attributes[JOB_ID]), parent_ctx))

    return run


def _unsampled(parent: Ctx | None, headers: Mapping[str, str], meta: FrameMeta) -> bool:
    """Whether a frame's trace was dropped by its producer (not sampled) and its carrier
    already says so: then none of its spans is recorded."""
    if parent is None or sampled(parent):
        return False
    return meta.trace_carrier.get("traceparent") == headers.get("traceparent")


def _ingest_start(timestamp_ms: int | None, ingest_ns: int) -> int:
    """When a message's ingest span starts: its Kafka timestamp, unless that is missing
    or later than its ingest."""
    kafka_ns = (timestamp_ms or 0) * 1_000_000
    return kafka_ns if 0 < kafka_ns <= ingest_ns else ingest_ns


def traced_source_error(
    tracing: Tracing, to_letter: Callable[[Any], DeadLetter]
) -> Callable[[Any], DeadLetter]:
    """Wrap the conversion of a source error: an ingest span with error status."""
    if not tracing.enabled:
        return to_letter
    spans = _recorder(tracing)

    def run(error: Any) -> DeadLetter:
        letter = to_letter(error)
        now = time.time_ns()
        parent_ctx = extract(carrier_from_headers(letter.headers))
        attributes = {
            **_letter_attributes(letter, parent_ctx, INGEST),
            **source_attributes(
                letter.topic, letter.partition, letter.offset, tracing.consumer_group
            ),
        }
        ingest = spans.record(
            f"process {letter.topic}",
            remote_parent(parent_ctx),
            now,
            now,
            _ingest_attributes(attributes),
            kind=SpanKind.CONSUMER,
            error=(letter.reason, letter.detail),
        )
        carrier = carrier_of(ingest, str(attributes[JOB_ID]), parent_ctx)
        return replace(letter, trace_carrier=carrier)

    return run


# Batch wait and inference -----------------------------------------------------------------


def batch_attributes(metas: Sequence[FrameMeta], stage: str) -> Attributes:
    """Attributes of a span over a batch: jobs, cameras, topics and the message count."""
    partitions = {str(m.partition) for m in metas}
    attributes: Attributes = {
        STAGE: stage,
        SCOPE_ATTR: "batch",
        JOB_ID: joined([m.job_id for m in metas]),
        CAMERA: joined([m.camera for m in metas]),
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": joined([m.topic for m in metas]),
        "messaging.batch.message_count": len(metas),
        "messaging.operation.type": "process",
    }
    if len(partitions) == 1:
        attributes["messaging.destination.partition.id"] = partitions.pop()
    return attributes


def _model_attributes(result: FrameResult | None, model: Mapping[str, str]) -> Attributes:
    attributes: Attributes = {k: bounded(v) for k, v in model.items()}
    if result is not None:
        attributes.update(
            {
                "streamsight.model.name": bounded(result.model_name),
                "streamsight.model.version": bounded(result.model_version),
                "streamsight.device": bounded(result.device),
            }
        )
    return attributes


def traced_infer(
    tracing: Tracing,
    infer: Callable[[FrameBatch], list[FrameResult]],
    model: Mapping[str, str] | None = None,
) -> Callable[[FrameBatch], list[FrameResult]]:
    """Wrap the inference stage: per frame a `batch wait` span (prepared -> dispatched)
    and an `inference` span (dispatched -> inferred, linked to the batch span); per batch
    an `inference batch` span linked to every frame's context. `model` holds
    `streamsight.model.name`, `streamsight.model.version` and `streamsight.device`."""
    if not tracing.enabled:
        return infer
    spans = _recorder(tracing)
    model = {k: bounded(v) for k, v in (model or {}).items()}

    def run(batch: FrameBatch) -> list[FrameResult]:
        frames = batch.frames
        metas = [frame.meta for frame in frames]
        parents = [span_context_of(meta.trace_carrier) for meta in metas]
        if all(parent is not None and not sampled(parent) for parent in parents):
            return infer(batch)  # none of these frames' traces is recorded
        batch_id = batch.batch_id
        links: list[SpanLink] = [
            (parent, {FRAME_ID: bounded(meta.frame_id)})
            for meta, parent in zip(metas, parents, strict=True)
            if parent is not None
        ]
        described = {
            **batch_attributes(metas, INFERENCE),
            BATCH_ID: batch_id,
            "streamsight.batch.size": len(frames),
            "streamsight.batch.flush_reason": batch.flush_reason,
            **model,
        }
        context = spans.context(INFERENCE_BATCH_SPAN, None, attributes=described, links=links)
        dispatched = batch.dispatched_ns
        started = time.time_ns()
        try:
            results = infer(batch)
        except Exception as exc:
            ended = time.time_ns()
            error = ("internal_error", f"inference failed: {type(exc).__name__}")
            spans.record(
                INFERENCE_BATCH_SPAN, None, started, ended, described, links=links, error=error,
                context=context,
            )  # fmt: skip
            waited = [
                (p, f.prepared_ns, ended, f.meta, 0) for f, p in zip(frames, parents, strict=True)
            ]
            record_steps(batch, context, waited, error)
            raise
        ended = time.time_ns()
        described.update(_model_attributes(results[0] if results else None, model))
        described["streamsight.detections"] = sum(len(r.detections) for r in results)
        spans.record(
            INFERENCE_BATCH_SPAN, None, started, ended, described, links=links, context=context
        )
        steps = []
        prepared = {id(meta): frame.prepared_ns for meta, frame in zip(metas, frames, strict=True)}
        for index, result in enumerate(results):
            meta = result.meta
            parent = parents[index] if index < len(metas) and meta is metas[index] else None
            if parent is None:
                parent = span_context_of(meta.trace_carrier)
            ready = prepared.get(id(meta), dispatched)
            steps.append((parent, ready, result.inferred_ns, meta, len(result.detections)))
        record_steps(batch, context, steps)
        return results

    def record_steps(
        batch: FrameBatch,
        context: Ctx,
        steps: list[tuple[Ctx | None, int, int, FrameMeta, int]],
        error: Error | None = None,
    ) -> None:
        """The batch wait and inference spans of each frame (parent, prepared,
        inferred, metadata, detections): in one compact record but for failed
        batches and frames without a trace."""
        dispatched = batch.dispatched_ns
        compact = []
        for parent, ready, inferred, meta, detections in steps:
            if parent is not None and error is None:
                if sampled(parent):
                    frame = InferredFrame(
                        parent, ready, inferred, meta.job_id, meta.camera, meta.frame_id,
                        detections,
                    )  # fmt: skip
                    compact.append(frame)
                continue
            wait = step_attributes(meta, BATCH_WAIT)
            wait[BATCH_ID] = batch.batch_id
            wait["streamsight.batch.size"] = len(batch.frames)
            wait["streamsight.batch.flush_reason"] = batch.flush_reason
            spans.record(SPAN_NAMES[BATCH_WAIT], parent, min(ready, dispatched), dispatched, wait)
            done = step_attributes(meta, INFERENCE)
            done[BATCH_ID] = batch.batch_id
            if error is None:
                done["streamsight.detections"] = detections
            spans.record(
                SPAN_NAMES[INFERENCE], parent, dispatched, inferred, done,
                links=[(context, {BATCH_ID: batch.batch_id})], error=error,
            )  # fmt: skip
        if compact:
            record = InferredSpans(
                context, dispatched, batch.batch_id, len(batch.frames), batch.flush_reason,
                compact,
            )  # fmt: skip
            spans.compact(record)

    return run


# Sink writes ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Write:
    """The sink-write span of one item, written when the write batch ends."""

    context: Ctx
    parent: Ctx | None
    job_id: str
    camera: str
    frame_id: str
    batch_id: str = ""
    detections: int = 0
    outcome: str = "written"
    error: Error | None = None
    letter: Attributes | None = None
    """The attributes of a dead letter's write (None for a frame's result)."""

    def values(self) -> SinkWrite:
        """The write as in a `WrittenSpans` record."""
        return SinkWrite(
            self.context, self.parent, self.job_id, self.camera, self.frame_id,
            self.batch_id, self.detections, self.outcome, self.error, self.letter,
        )  # fmt: skip


class _FrameWrites:
    """The sink-write spans of one write batch, by item."""

    def __init__(self) -> None:
        self.spans: dict[int, _Write] = {}

    def carrier(self, item: object) -> dict[str, str]:
        """Headers that continue the item's trace under its sink-write span."""
        found = self.spans.get(id(item))
        return carrier_of(found.context, found.job_id) if found else {}

    def skipped(self, item: object) -> None:
        """The item was already stored: nothing written."""
        found = self.spans.get(id(item))
        if found:
            found.outcome = "duplicate"

    def failed(self, item: object, reason: str, detail: str) -> None:
        """The item became a dead letter here."""
        found = self.spans.get(id(item))
        if found:
            found.outcome = "dead_letter"
            found.error = (reason, detail)


def write_tracer(
    tracing: Tracing, *, topic: str | None, store: str, stage: str = SINK
) -> Callable[[Sequence[Any]], Any] | None:
    """The sinks' `trace_writes` hook: per item a `sink write` span (child of the frame's
    context; error status for dead letters, with the reason), and a `sink write batch`
    span linked to every item's context. `topic` is where the messages go (None when
    nothing is published), `store` the database system, `stage` the sink's step id (the
    spans' stage). None when tracing is off."""
    if not tracing.enabled:
        return None
    spans = _recorder(tracing)
    name = SPAN_NAMES[SINK]
    destination: Attributes = {"db.system.name": store}
    if topic is not None:
        destination.update(
            {
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.destination.name": bounded(topic),
                "messaging.operation.type": "send",
            }
        )

    def write_of(item: Any) -> _Write:
        if isinstance(item, FrameResult):
            meta = item.meta
            parent = span_context_of(meta.trace_carrier)
            context = spans.context(name, parent, kind=SpanKind.PRODUCER)
            return _Write(
                context, parent, meta.job_id, meta.camera, meta.frame_id, item.batch_id,
                len(item.detections),
            )  # fmt: skip
        parent = span_context_of(item.trace_carrier)
        attributes = _letter_attributes(item, extract(item.trace_carrier), stage)
        attributes["streamsight.source.topic"] = bounded(item.topic)
        attributes["streamsight.source.partition"] = item.partition
        attributes["streamsight.source.offset"] = item.offset
        context = spans.context(name, parent, kind=SpanKind.PRODUCER)
        return _Write(
            context, parent, str(attributes[JOB_ID]), str(attributes[CAMERA]),
            str(attributes.get(FRAME_ID, "")), outcome="dead_letter",
            error=(item.reason, item.detail), letter=attributes,
        )  # fmt: skip

    @contextmanager
    def trace_writes(items: Sequence[Any]) -> Iterator[_FrameWrites]:
        started = time.time_ns()
        writes = _FrameWrites()
        for item in items:
            writes.spans[id(item)] = write_of(item)
        failure: str | None = None
        try:
            yield writes
        except BaseException as exc:
            failure = type(exc).__name__
            raise
        finally:
            written = writes.spans.values()
            if any(sampled(w.context) or sampled(w.parent) for w in written):
                spans.compact(
                    WrittenSpans(
                        started, time.time_ns(), destination, failure,
                        [w.values() for w in written], stage,
                    )
                )  # fmt: skip

    return trace_writes
