"""Per-frame OpenTelemetry traces: setup from the standard `OTEL_*` variables, and wrappers
that the flow wiring puts around the stages.

Each frame is one trace: `send frames` (the camera, PRODUCER) -> `process frames` (ingest,
CONSUMER, child of the context in the Kafka headers) -> `preprocess`, `batch wait`,
`inference` and `sink write` (children of the ingest span). The ingest span's context
travels inside the item (`FrameMeta.trace_carrier`), so any worker can continue the trace.
Inference and sink writes also get one span per batch that links to every frame's context.

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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Any, Protocol
from urllib.parse import quote_plus, urlsplit

from opentelemetry import baggage
from opentelemetry import trace as otel_trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    DEFAULT_TRACE_STATE,
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from operators import contract
from operators.frames import DeadLetter, FrameBatch, FrameMeta, FrameResult, PreparedFrame, RawFrame

log = logging.getLogger(__name__)

SERVICE_NAME = "streamsight"
SERVICE_VERSION = "0.1.0"
SCOPE = "streamsight"
MESSAGING_SYSTEM = "kafka"
FLUSH_TIMEOUT_S = 5.0
"""Longest the flush at shutdown may take (a missing collector must not hang the exit)."""
EXPORT_COOLDOWN_S = 30.0
"""After a failed export, batches are dropped for this long instead of retried."""
MAX_ATTRIBUTE_LENGTH = 256
MAX_LISTED_IDS = 8

# Span names and the `streamsight.stage` of each.
SEND = "send"
INGEST = "ingest"
PREPROCESS = "preprocess"
BATCH_WAIT = "batch_wait"
INFERENCE = "inference"
SINK = "sink"
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
Attributes = dict[str, str | int | float | bool]


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


class _OnceFilter(logging.Filter):
    """Lets the first warning of a logger through and hides the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if self.seen:
            return False
        self.seen = True
        return True


_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.sdk._shared_internal",
)


class GuardedExporter(SpanExporter):
    """Wraps an exporter: never raises, logs the first failure once, and after a failure
    drops batches for `cooldown_s` instead of waiting on retries."""

    def __init__(
        self,
        inner: SpanExporter,
        *,
        cooldown_s: float = EXPORT_COOLDOWN_S,
        probe: Callable[[], bool] | None = None,
    ) -> None:
        self.inner = inner
        self.cooldown_s = cooldown_s
        self.probe = probe
        self.failed_until = 0.0
        self.failures = 0
        self.exported = 0
        self._warned = False

    @property
    def failing(self) -> bool:
        """Whether the last export failed less than `cooldown_s` ago."""
        return time.monotonic() < self.failed_until

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        if self.failing:
            self.failures += 1
            return SpanExportResult.FAILURE
        try:
            if self.exported == 0 and self.probe is not None and not self.probe():
                result = SpanExportResult.FAILURE
            else:
                result = self.inner.export(spans)
        except Exception as exc:  # an exporter must never take the flow down
            result = SpanExportResult.FAILURE
            if not self._warned:
                log.warning("trace export failed: %s", type(exc).__name__)
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
            return result
        self.failures += 1
        self.failed_until = time.monotonic() + self.cooldown_s
        if not self._warned:
            self._warned = True
            log.warning(
                "spans could not be exported (no trace collector at OTEL_EXPORTER_OTLP_ENDPOINT?"
                " OTEL_TRACES_EXPORTER=none turns tracing off); dropping spans for %.0f s after"
                " each failure (further failures are not logged)",
                self.cooldown_s,
            )
        return result

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception:  # shutting down must not raise at exit
            log.debug("span exporter shutdown failed", exc_info=True)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


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


def parent_based_sampler() -> Sampler:
    """The sampler named by `OTEL_TRACES_SAMPLER(_ARG)` (parsed by the SDK), made
    parent-based so that a frame's trace is kept or dropped whole."""
    configured = TracerProvider(shutdown_on_exit=False).sampler
    root = getattr(configured, "_root", None) if isinstance(configured, ParentBased) else None
    return ParentBased(LinkAwareSampler(root if root is not None else configured))


def bytewax_process_id(argv: Sequence[str] | None = None) -> str | None:
    """The Bytewax process id of this process (`-i`, `BYTEWAX_PROCESS_ID` or the pod's
    ordinal in its StatefulSet), or None for a single-process run."""
    args = list(sys.argv if argv is None else argv)
    for index, arg in enumerate(args):
        if arg in ("-i", "--process-id") and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--process-id="):
            return arg.split("=", 1)[1]
    if _env("BYTEWAX_PROCESS_ID"):
        return _env("BYTEWAX_PROCESS_ID")
    pod, statefulset = _env("BYTEWAX_POD_NAME"), _env("BYTEWAX_STATEFULSET_NAME")
    if pod and statefulset and pod.startswith(statefulset + "-"):
        return pod.removeprefix(statefulset + "-")
    return None


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
    process_id = bytewax_process_id()
    if process_id is not None:
        attributes["bytewax.process.id"] = process_id
    if _env("KUBERNETES_SERVICE_HOST") or _env("BYTEWAX_POD_NAME"):
        attributes["k8s.pod.name"] = _env("BYTEWAX_POD_NAME") or _env("POD_NAME") or host
        namespace = _env("POD_NAMESPACE") or _env("K8S_NAMESPACE")
        if namespace:
            attributes["k8s.namespace.name"] = namespace
        if _env("BYTEWAX_STATEFULSET_NAME"):
            attributes["k8s.statefulset.name"] = _env("BYTEWAX_STATEFULSET_NAME") or ""
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


def otlp_exporter() -> SpanExporter:
    """The OTLP exporter for `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`; endpoint, headers,
    certificate, compression and timeout are read from the environment by the exporter."""
    protocol = (
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    raise ValueError(f"unsupported OTLP protocol {protocol!r}: use grpc or http/protobuf")


def otlp_endpoint() -> tuple[str, int]:
    """Host and port the OTLP exporter sends to (from the standard variables)."""
    protocol = (
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    default = "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318"
    endpoint = (
        _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT") or default
    )
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parsed = urlsplit(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.hostname or "localhost", port


def reachable(address: tuple[str, int], timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to `address` can be opened (a collector is listening)."""
    try:
        with socket.create_connection(address, timeout=timeout_s):
            return True
    except OSError:
        return False


def _exporter_kind() -> str:
    """The first exporter named by `OTEL_TRACES_EXPORTER` (default `otlp`), lower case."""
    return (_env("OTEL_TRACES_EXPORTER") or "otlp").split(",")[0].strip().lower()


def environment_exporter() -> GuardedExporter:
    """The exporter named by `OTEL_TRACES_EXPORTER` (OTLP or console), guarded."""
    kind = _exporter_kind()
    if kind == "console":
        return GuardedExporter(ConsoleSpanExporter())
    return GuardedExporter(otlp_exporter(), probe=partial(reachable, otlp_endpoint()))


def quiet_exporter_logs() -> None:
    """Let the exporters' loggers print their first warning only."""
    for name in _EXPORTER_LOGGERS:
        logging.getLogger(name).addFilter(_OnceFilter())


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
    kind = _exporter_kind()
    if kind not in ("otlp", "console", "none"):
        raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {kind!r}: use otlp, console, none")
    if kind == "none" and exporter is None and make_exporter is None:
        return Tracing.disabled()
    if kind == "otlp" and exporter is None and make_exporter is None:
        otlp_exporter().shutdown()  # an unsupported protocol fails here, not in the child
    quiet_exporter_logs()
    resource = build_resource(service_name)
    guarded: GuardedExporter | None = None
    span_processor: SpanProcessor
    if exporter is not None:
        guarded = GuardedExporter(exporter)
        span_processor = processor(guarded)
    else:
        from operators.telemetry.span_export import ExportProcess

        span_processor = ExportProcess(resource, make_exporter)
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
        recorder=SpanRecorder(provider, span_processor),
    )
    if flush_at_exit:
        atexit.register(tracing.flush)
    return tracing


# Finished spans ---------------------------------------------------------------------------

Error = tuple[str, str]
"""A failed step: the reason (`error.type`) and a detail for the status message."""


Ctx = tuple[int, int, int, str, bool]
"""A span context as plain values: trace id, span id, trace flags, trace state header,
whether it came from a carrier (remote). The recorder's currency: cheaper than the SDK's
`SpanContext`, and what the export process receives."""
SpanLink = tuple[Ctx, Attributes]
"""A link to another span: its context and the link's attributes."""
SpanRecord = tuple[Any, ...]
"""A finished span as plain values (pickled at C speed): name, kind, start, end, context,
parent context (or None), attributes, links as (context, attributes), status as (code,
description)."""
_UNSET_STATUS = (StatusCode.UNSET.value, None)


def context_record(context: SpanContext) -> Ctx:
    """The plain-values form of an SDK span context."""
    state = context.trace_state.to_header() if context.trace_state else ""
    return (context.trace_id, context.span_id, int(context.trace_flags), state, context.is_remote)


def span_context(ctx: Ctx) -> SpanContext:
    """The SDK span context of plain values."""
    trace_id, span_id, flags, state, remote = ctx
    trace_state = TraceState.from_header([state]) if state else DEFAULT_TRACE_STATE
    return SpanContext(trace_id, span_id, remote, TraceFlags(flags), trace_state)


def readable_span(
    record: SpanRecord, resource: Resource, scope: InstrumentationScope
) -> ReadableSpan:
    """The SDK span of a record (for exporters other than OTLP)."""
    name, kind, start, end, context, parent, attributes, links, (code, description) = record
    return ReadableSpan(
        name=name,
        context=span_context(context),
        parent=span_context(parent) if parent is not None else None,
        resource=resource,
        attributes=attributes,
        links=tuple(Link(span_context(c), a) for c, a in links),
        kind=SpanKind(kind),
        status=Status(StatusCode(code), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


def sampled(ctx: Ctx | None) -> bool:
    """Whether the span of `ctx` is recorded."""
    return ctx is not None and bool(ctx[2] & TraceFlags.SAMPLED)


def child_context(parent: Ctx, span_id: int) -> Ctx:
    """The context of a span `span_id` under `parent`: its trace and sampled flag."""
    return (parent[0], span_id, parent[2] & TraceFlags.SAMPLED, parent[3], False)


def _status(attributes: Attributes, error: Error | None) -> tuple[int, str | None]:
    """The status of a span (error status and `error.type` for an `error`)."""
    if error is None:
        return _UNSET_STATUS
    reason, detail = error
    attributes["error.type"] = bounded(reason)
    return StatusCode.ERROR.value, bounded(f"{reason}: {detail}" if detail else reason)


class SpanRecorder:
    """Writes spans whose start and end are known once they are written, as every span of
    a frame is: each becomes a finished `ReadableSpan` handed straight to the span
    processor, without the SDK's live-span bookkeeping (context, locks, re-validation of
    attributes), which costs about five times as much per span. A processor with an
    `on_record` method (`ExportProcess`) gets the span as a plain record (`SpanRecord`)
    instead, without any SDK object at all, and the spans of a frame's stages as one
    compact record (`compact`), expanded into spans in the export process.

    Sampling follows the provider's parent-based sampler: a child takes its parent's
    sampled flag, a span with links is sampled when one of them is (`LinkAwareSampler`),
    another root asks the sampler. Attributes must already be bounded (`bounded`), since
    the SDK's span limits are not applied here.
    """

    def __init__(self, provider: TracerProvider, processor: SpanProcessor) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.scope = InstrumentationScope(SCOPE, SERVICE_VERSION)
        self.processor = processor
        self.on_record: Callable[[tuple[Any, ...]], None] | None = getattr(
            processor, "on_record", None
        )

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
        record = (name, kind.value, min(start_ns, end_ns), end_ns, context, parent)
        self._write((*record, attributes, links, status))
        return context

    def compact(self, record: tuple[Any, ...]) -> None:
        """Write the spans of a compact record (see `expand`): as it is to a processor
        that takes records, else expanded here."""
        if self.on_record is not None:
            self.on_record(record)
            return
        for span in expand(record, self.ids):
            self._write(span)

    def _write(self, record: SpanRecord) -> None:
        if self.on_record is not None:
            self.on_record(record)
        else:
            self.processor.on_end(readable_span(record, self.resource, self.scope))


# Compact records --------------------------------------------------------------------------
# The spans of a frame's stages as tuples of the values they are made of, without attribute
# dicts or span ids that nothing refers to: the flow builds and pipes one record per frame
# (or per batch) instead of several spans, and the export process builds the spans.

PREPARED = 1
"""(PREPARED, ingest context, its parent or None, ingest start, ingest end, preprocess
start, preprocess end, topic, partition, offset, consumer group or None, message size,
job, camera, frame id, seq or None, width, height): a prepared frame's ingest and
preprocess spans."""
INFERRED = 2
"""(INFERRED, inference batch context, dispatched, batch id, batch size, flush reason,
frames), each frame (parent context, prepared, inferred, job, camera, frame id,
detections): each frame's batch wait and inference spans."""
WRITTEN = 3
"""(WRITTEN, start, end, destination attributes, failure type or None, writes), each
write (context, parent or None, job, camera, frame id, batch id, detections, outcome,
error or None, the attributes of a dead letter's write or None): each write's sink-write
span and the `sink write batch` span linked to them."""


class Ids(Protocol):
    """Makes span and trace ids (the SDK's id generators are)."""

    def generate_span_id(self) -> int: ...

    def generate_trace_id(self) -> int: ...


def expand(record: tuple[Any, ...], ids: Ids) -> list[SpanRecord]:
    """The spans of a compact record; `ids` makes the span ids it leaves out."""
    if record[0] == PREPARED:
        return _prepared_spans(record, ids)
    if record[0] == INFERRED:
        return _inferred_spans(record, ids)
    if record[0] == WRITTEN:
        return _written_spans(record, ids)
    raise ValueError(f"unknown compact span record {record[0]!r}")


def _prepared_spans(record: tuple[Any, ...], ids: Ids) -> list[SpanRecord]:
    (_, ingest, parent, start, end, started, ended, topic, partition, offset, group, size,
     job, camera, frame_id, seq, width, height) = record  # fmt: skip
    attributes = _frame_step(INGEST, job, camera, frame_id)
    if seq is not None:
        attributes["streamsight.frame.seq"] = seq
    attributes.update(source_attributes(topic, partition, offset, group))
    attributes["messaging.message.body.size"] = size
    step = _frame_step(PREPROCESS, job, camera, frame_id)
    step["streamsight.frame.width"] = width
    step["streamsight.frame.height"] = height
    preprocess = child_context(ingest, ids.generate_span_id())
    return [
        (f"process {topic}", SpanKind.CONSUMER.value, min(start, end), end, ingest, parent,
         _ingest_attributes(attributes), (), _UNSET_STATUS),
        (SPAN_NAMES[PREPROCESS], SpanKind.INTERNAL.value, min(started, ended), ended,
         preprocess, ingest, step, (), _UNSET_STATUS),
    ]  # fmt: skip


def _inferred_spans(record: tuple[Any, ...], ids: Ids) -> list[SpanRecord]:
    _, batch, dispatched, batch_id, size, reason, frames = record
    link: list[SpanLink] = [(batch, {BATCH_ID: batch_id})]
    internal = SpanKind.INTERNAL.value
    spans: list[SpanRecord] = []
    for parent, prepared, inferred, job, camera, frame_id, detections in frames:
        wait = _frame_step(BATCH_WAIT, job, camera, frame_id)
        wait[BATCH_ID] = batch_id
        wait["streamsight.batch.size"] = size
        wait["streamsight.batch.flush_reason"] = reason
        done = _frame_step(INFERENCE, job, camera, frame_id)
        done[BATCH_ID] = batch_id
        done["streamsight.detections"] = detections
        spans += [
            (SPAN_NAMES[BATCH_WAIT], internal, min(prepared, dispatched), dispatched,
             child_context(parent, ids.generate_span_id()), parent, wait, (), _UNSET_STATUS),
            (SPAN_NAMES[INFERENCE], internal, min(dispatched, inferred), inferred,
             child_context(parent, ids.generate_span_id()), parent, done, link, _UNSET_STATUS),
        ]  # fmt: skip
    return spans


def _written_spans(record: tuple[Any, ...], ids: Ids) -> list[SpanRecord]:
    _, started, ended, destination, failure, writes = record
    started = min(started, ended)
    producer = SpanKind.PRODUCER.value
    failed: Error | None = ("sink_error", failure) if failure is not None else None
    spans: list[SpanRecord] = []
    for ctx, parent, job, camera, frame_id, batch_id, detections, outcome, error, extra in writes:
        if not sampled(ctx):
            continue
        if extra is None:
            attributes = _frame_step(SINK, job, camera, frame_id)
            attributes[BATCH_ID] = batch_id
            attributes["streamsight.detections"] = detections
        else:
            attributes = dict(extra)
        attributes["streamsight.sink.outcome"] = outcome
        if outcome == "dead_letter" and error is not None:
            attributes["streamsight.dead_letter.reason"] = error[0]
        attributes.update(destination)
        status = _status(attributes, failed or error)
        spans.append(
            (SPAN_NAMES[SINK], producer, started, ended, ctx, parent, attributes, (), status)
        )
    batch = write_batch_span(started, ended, destination, failed, writes, ids)
    if batch is not None:
        spans.append(batch)
    return spans


def write_batch_span(
    started: int,
    ended: int,
    destination: Attributes,
    failed: Error | None,
    writes: Sequence[tuple[Any, ...]],
    ids: Ids,
) -> SpanRecord | None:
    """The `sink write batch` span of a WRITTEN record's `writes`, linked to each
    frame's span before the sink; None when none of those is sampled."""
    links: list[SpanLink] = []
    jobs: list[str] = []
    cameras: list[str] = []
    for _, parent, job, camera, frame_id, *_ in writes:
        jobs.append(job)
        cameras.append(bounded(camera))
        if parent is not None:
            links.append((parent, {FRAME_ID: bounded(frame_id) if frame_id else ""}))
    if not any(sampled(link) for link, _ in links):
        return None
    attributes = {
        STAGE: SINK,
        SCOPE_ATTR: "batch",
        JOB_ID: joined(jobs),
        CAMERA: joined(cameras),
        "messaging.batch.message_count": len(writes),
        **destination,
    }
    trace_id, span_id = ids.generate_trace_id(), ids.generate_span_id()
    context = (trace_id, span_id, int(TraceFlags.SAMPLED), "", False)
    status = _status(attributes, failed)
    return (SINK_BATCH_SPAN, SpanKind.PRODUCER.value, started, ended, context, None, attributes,
            links, status)  # fmt: skip


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


def as_remote(ctx: Ctx) -> Ctx:
    """`ctx` as a later stage reads it back from the carrier (`span_context_of`)."""
    return (ctx[0], ctx[1], ctx[2] & TraceFlags.SAMPLED, ctx[3], True)


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


def frame_attributes(meta: FrameMeta, stage: str, consumer_group: str | None = None) -> Attributes:
    """Job, camera, frame identity and source coordinates of a frame's messaging span."""
    attributes = step_attributes(meta, stage)
    if meta.seq is not None:
        attributes["streamsight.frame.seq"] = meta.seq
    attributes.update(source_attributes(meta.topic, meta.partition, meta.offset, consumer_group))
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
    A prepared frame keeps what they are made of (`PreparedFrame.pending_spans`) and
    `traced_infer` writes them with its batch (`write_ingest_spans`); a dead letter gets
    them here, and the ingest span's context in its carrier."""
    if not tracing.enabled:
        return prepare
    spans = _recorder(tracing)
    group = tracing.consumer_group

    def run(raw: RawFrame) -> PreparedFrame | DeadLetter:
        started = time.time_ns()
        out = prepare(raw)
        ended = time.time_ns()
        if isinstance(out, PreparedFrame):
            # Between two frames' decoding the caches are cold: a batch's spans cost a
            # fraction as much written in one loop. The frame is new and not yet shared.
            pending = (raw.headers, raw.timestamp_ms, len(raw.value or b""), started, ended)
            object.__setattr__(out, "pending_spans", pending)
            return out
        headers = carrier_from_headers(raw.headers)
        parent = span_context_of(headers)
        start = _ingest_start(raw.timestamp_ms, raw.ingest_ns)
        name = f"process {raw.topic}"
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


def _ingest_start(timestamp_ms: int | None, ingest_ns: int) -> int:
    """When a message's ingest span starts: its Kafka timestamp, unless that is missing
    or later than its ingest."""
    kafka_ns = (timestamp_ms or 0) * 1_000_000
    return kafka_ns if 0 < kafka_ns <= ingest_ns else ingest_ns


def write_ingest_spans(
    spans: SpanRecorder, group: str | None, frames: Sequence[PreparedFrame]
) -> list[Ctx | None]:
    """Write the ingest and preprocess spans that `traced_prepare` left on `frames`, and
    put each ingest span's context in its frame's carrier for the later stages; those
    contexts as read back from the carriers (None for a frame written before)."""
    ingests: list[Ctx | None] = []
    for frame in frames:
        pending = frame.pending_spans
        if pending is None:
            ingests.append(None)
            continue
        object.__setattr__(frame, "pending_spans", None)  # written once
        raw_headers, timestamp_ms, size, started, ended = pending
        meta = frame.meta
        headers = carrier_from_headers(raw_headers)
        parent = span_context_of(headers)
        entries = headers.get("baggage")
        parent_ctx = None
        if entries and entries != _own_baggage(meta.job_id):
            parent_ctx = extract(headers)  # other baggage entries travel on
        topic = meta.topic
        ingest = spans.context(f"process {topic}", parent, kind=SpanKind.CONSUMER)
        if sampled(ingest):
            spans.compact(
                (PREPARED, ingest, parent, _ingest_start(timestamp_ms, meta.ingest_ns),
                 meta.ingest_ns, started, ended, topic, meta.partition, meta.offset, group,
                 size, meta.job_id, meta.camera, meta.frame_id, meta.seq, meta.width,
                 meta.height)
            )  # fmt: skip
        # The carrier is the frame's own dict (parsed from its headers for it alone):
        # updated in place, which spares copying the frame and its metadata.
        meta.trace_carrier.clear()
        meta.trace_carrier.update(carrier_of(ingest, meta.job_id, parent_ctx))
        ingests.append(as_remote(ingest))
    return ingests


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
    group = tracing.consumer_group
    model = {k: bounded(v) for k, v in (model or {}).items()}

    def run(batch: FrameBatch) -> list[FrameResult]:
        frames = batch.frames
        ingests = write_ingest_spans(spans, group, frames)
        metas = [frame.meta for frame in frames]
        parents = [
            ingest if ingest is not None else span_context_of(meta.trace_carrier)
            for meta, ingest in zip(metas, ingests, strict=True)
        ]
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
                    compact.append(
                        (parent, ready, inferred, meta.job_id, meta.camera, meta.frame_id,
                         detections)
                    )  # fmt: skip
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
            spans.compact(
                (INFERRED, context, dispatched, batch.batch_id, len(batch.frames),
                 batch.flush_reason, compact)
            )  # fmt: skip

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

    def values(self) -> tuple[Any, ...]:
        """The write as in a compact `WRITTEN` record."""
        return (
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
    tracing: Tracing, *, topic: str | None, store: str
) -> Callable[[Sequence[Any]], Any] | None:
    """The sinks' `trace_writes` hook: per item a `sink write` span (child of the frame's
    context; error status for dead letters, with the reason), and a `sink write batch`
    span linked to every item's context. `topic` is where the messages go (None when
    nothing is published), `store` the database system. None when tracing is off."""
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
        attributes = _letter_attributes(item, extract(item.trace_carrier), SINK)
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
                    (WRITTEN, started, time.time_ns(), destination, failure,
                     [w.values() for w in written])
                )  # fmt: skip

    return trace_writes
