"""Finished spans and their export, through OpenTelemetry's public APIs only.

A finished span is a `SpanRecord`: the one definition of a span's fields. The flow's
process writes records (or compact records of a frame's stages, which know the spans they
stand for: `Record.spans`) and pipes them in batches to a child Python process
(`ExportProcess`), so that encoding runs beside the flow's workers, not under their
interpreter lock. There the spans are encoded into an OTLP `ExportTraceServiceRequest`
made of opentelemetry-proto's generated messages (`RequestEncoder`, with the resource and
scope as the SDK's encoder writes them) and sent with the generated gRPC
`TraceServiceStub` (`OtlpGrpcExporter`, configured from the standard `OTEL_EXPORTER_OTLP_*`
variables). Any other exporter (OTLP/HTTP, the console, one a caller makes) gets SDK spans
(`readable_span`) through its public `export`, and encodes them itself.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PBSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
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
from opentelemetry.util.re import parse_env_headers

if TYPE_CHECKING:  # grpc is loaded by the export process only
    import grpc

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 5.0
"""Longest the flush at shutdown may take (a missing collector must not hang the exit)."""
EXPORT_COOLDOWN_S = 30.0
"""After a failed export, batches are dropped for this long instead of retried."""
EXPORT_BATCH = 512
"""Spans per export call in the export process."""
READY = "ready"
"""The export process's first line on its report pipe, once its exporter is built."""

# Records ----------------------------------------------------------------------------------

Attributes = dict[str, str | int | float | bool]
Ctx = tuple[int, int, int, str, bool]
"""A span context as plain values: trace id, span id, trace flags, trace state header,
whether it came from a carrier (remote). Cheaper than the SDK's `SpanContext`, and what the
export process receives."""
SpanLink = tuple[Ctx, Attributes]
"""A link to another span: its context and the link's attributes."""
UNSET_STATUS = (StatusCode.UNSET.value, None)


class Ids(Protocol):
    """Makes span and trace ids (the SDK's id generators do)."""

    def generate_span_id(self) -> int: ...

    def generate_trace_id(self) -> int: ...


class SpanRecord(NamedTuple):
    """A finished span as plain values (pickled at C speed)."""

    name: str
    kind: int
    """A `SpanKind` value."""
    start: int
    end: int
    context: Ctx
    parent: Ctx | None
    attributes: Attributes
    links: Sequence[SpanLink]
    status: tuple[int, str | None]
    """Status code value and description."""

    def spans(self, ids: Ids) -> list[SpanRecord]:
        """The spans this record stands for: itself."""
        return [self]


class Record(Protocol):
    """What the export process receives: a span record, or a compact record of several
    spans, which makes the span ids it leaves out with `ids`."""

    def spans(self, ids: Ids) -> list[SpanRecord]: ...


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
    """The SDK span of a record (for span processors and exporters)."""
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


def span_record(span: ReadableSpan) -> SpanRecord:
    """An SDK span as a record."""
    return SpanRecord(
        span.name,
        span.kind.value,
        span.start_time or 0,
        span.end_time or 0,
        context_record(span.get_span_context()),
        context_record(span.parent) if span.parent is not None else None,
        dict(span.attributes or {}),
        [(context_record(link.context), dict(link.attributes or {})) for link in span.links],
        (span.status.status_code.value, span.status.description),
    )


# Encoding ---------------------------------------------------------------------------------

_KINDS = {
    SpanKind.INTERNAL.value: PBSpan.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER.value: PBSpan.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT.value: PBSpan.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER.value: PBSpan.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER.value: PBSpan.SpanKind.SPAN_KIND_CONSUMER,
}
_LOCAL = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE = _LOCAL | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def key_value(key: str, value: Any) -> KeyValue:
    """An attribute as an OTLP `KeyValue` (bool, str, int or float; others as their text)."""
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


class RequestEncoder:
    """Builds the OTLP export request of span records of one resource and scope from
    opentelemetry-proto's generated messages: the request the SDK's encoder
    (`encode_spans`) builds from the same spans as SDK spans. The resource and scope are
    encoded once, by the SDK's encoder. Each attribute is serialised by protobuf once (a
    `Span` holding just that attribute: the values of a stream recur, stages, jobs,
    cameras, topics) and merged into every span that has it from those bytes: protobuf
    merges concatenated messages field by field, appending to repeated fields, which
    costs half as much as copying `KeyValue` messages. Up to `max_cached` are kept."""

    def __init__(
        self, resource: Resource, scope: InstrumentationScope, max_cached: int = 65_536
    ) -> None:
        probe = ReadableSpan(
            "probe", SpanContext(1, 1, False), resource=resource, instrumentation_scope=scope
        )
        self.template = encode_spans([probe]).resource_spans[0]
        self.template.scope_spans[0].ClearField("spans")
        self.max_cached = max_cached
        self._values: dict[tuple[str, Any, type], bytes] = {}

    def request(self, records: Iterable[SpanRecord]) -> ExportTraceServiceRequest:
        """The request that carries `records`."""
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.CopyFrom(self.template)
        add = resource_spans.scope_spans[0].spans.add
        for record in records:
            self._fill(add(), record)
        return request

    def _attribute(self, key: str, value: Any) -> bytes:
        """The attribute as a serialised `Span` that holds it alone."""
        cache_key = (key, value, type(value))
        found = self._values.get(cache_key)
        if found is None:
            if len(self._values) >= self.max_cached:
                self._values.clear()
            found = PBSpan(attributes=[key_value(key, value)]).SerializeToString()
            self._values[cache_key] = found
        return found

    def _fill(self, span: PBSpan, record: SpanRecord) -> None:
        """Set the fields of `span` to those of `record`, as the SDK's encoder does."""
        name, kind, start, end, context, parent, attributes, links, status = record
        span.trace_id = context[0].to_bytes(16, "big")
        span.span_id = context[1].to_bytes(8, "big")
        if context[3]:
            span.trace_state = context[3]
        if parent is not None:
            span.parent_span_id = parent[1].to_bytes(8, "big")
        span.name = name
        span.kind = _KINDS[kind]
        span.start_time_unix_nano = start
        span.end_time_unix_nano = end
        attribute = self._attribute
        span.MergeFromString(b"".join([attribute(k, v) for k, v in attributes.items()]))
        for link, link_attributes in links:
            span.links.add(
                trace_id=link[0].to_bytes(16, "big"),
                span_id=link[1].to_bytes(8, "big"),
                attributes=[key_value(k, v) for k, v in link_attributes.items()],
                flags=_REMOTE if link[4] else _LOCAL,
            )
        span.status.SetInParent()  # the SDK's encoder always writes a status
        if status[0]:
            span.status.code = status[0]  # type: ignore[assignment]
        if status[1]:
            span.status.message = status[1]
        span.flags = _REMOTE if parent is not None and parent[4] else _LOCAL


# Exporters --------------------------------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value and value.strip() else None


def _traces_env(name: str) -> str | None:
    """`OTEL_EXPORTER_OTLP_TRACES_<name>`, else `OTEL_EXPORTER_OTLP_<name>`."""
    return _env(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or _env(f"OTEL_EXPORTER_OTLP_{name}")


def exporter_kind() -> str:
    """The first exporter named by `OTEL_TRACES_EXPORTER` (default `otlp`), lower case."""
    return (_env("OTEL_TRACES_EXPORTER") or "otlp").split(",")[0].strip().lower()


def otlp_protocol() -> str:
    """`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`: `grpc` (the default) or `http/protobuf`."""
    protocol = _traces_env("PROTOCOL") or "grpc"
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(f"unsupported OTLP protocol {protocol!r}: use grpc or http/protobuf")
    return protocol


def otlp_endpoint() -> tuple[str, int]:
    """Host and port the OTLP exporter sends to (from the standard variables)."""
    default = "http://localhost:4317" if otlp_protocol() == "grpc" else "http://localhost:4318"
    endpoint = _traces_env("ENDPOINT") or default
    parsed = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.hostname or "localhost", port


def reachable(address: tuple[str, int], timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to `address` can be opened (a collector is listening)."""
    try:
        with socket.create_connection(address, timeout=timeout_s):
            return True
    except OSError:
        return False


class RequestExporter(SpanExporter):
    """A span exporter that also sends OTLP requests already built (`export_request`):
    what the export process hands it. SDK spans are encoded by the SDK's encoder."""

    @abstractmethod
    def export_request(self, request: ExportTraceServiceRequest) -> SpanExportResult:
        """Send one OTLP export request."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Encode `spans` with the SDK's encoder and send them."""
        return self.export_request(encode_spans(spans))


def _read(path: str | None) -> bytes | None:
    """The file at `path` (a certificate or key), None for none; unreadable: ValueError."""
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"cannot read OTLP certificate or key {path}: {exc.strerror}") from None


class OtlpGrpcExporter(RequestExporter):
    """Sends OTLP export requests over gRPC with opentelemetry-proto's generated
    `TraceServiceStub`, configured as the SDK's OTLP/gRPC span exporter reads the
    environment: `OTEL_EXPORTER_OTLP_(TRACES_)` `ENDPOINT`, `INSECURE` (else TLS unless the
    endpoint is `http://`), `CERTIFICATE`, `CLIENT_KEY`, `CLIENT_CERTIFICATE`, `HEADERS`,
    `COMPRESSION` (`gzip`) and `TIMEOUT` (seconds, as the SDK reads it; default 10).
    A failed request is a failed export (no retries: `GuardedExporter` pauses)."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
            TraceServiceStub,
        )

        endpoint = _traces_env("ENDPOINT") or "http://localhost:4317"
        parsed = urlsplit(endpoint)
        flag = _traces_env("INSECURE")
        if parsed.scheme == "https":
            insecure = False
        elif flag is not None:
            insecure = flag.lower() == "true"
        else:
            insecure = parsed.scheme == "http"
        target = parsed.netloc or endpoint
        compression = {"gzip": grpc.Compression.Gzip, "none": grpc.Compression.NoCompression}
        named = (_traces_env("COMPRESSION") or "none").lower()
        if named not in compression:
            raise ValueError(f"unsupported OTLP compression {named!r}: use gzip or none")
        headers = _traces_env("HEADERS")
        self.metadata = tuple(parse_env_headers(headers, liberal=True).items()) if headers else ()
        self.timeout_s = float(_traces_env("TIMEOUT") or 10)
        if insecure:
            self.channel = grpc.insecure_channel(target, compression=compression[named])
        else:
            credentials = self._credentials()
            self.channel = grpc.secure_channel(target, credentials, compression=compression[named])
        self.stub = TraceServiceStub(self.channel)

    @staticmethod
    def _credentials() -> grpc.ChannelCredentials:
        import grpc

        for prefix in ("OTEL_EXPORTER_OTLP_TRACES_", "OTEL_EXPORTER_OTLP_"):
            certificate = _env(prefix + "CERTIFICATE")
            if certificate:
                return grpc.ssl_channel_credentials(
                    _read(certificate),
                    _read(_env(prefix + "CLIENT_KEY")),
                    _read(_env(prefix + "CLIENT_CERTIFICATE")),
                )
        return grpc.ssl_channel_credentials()

    def export_request(self, request: ExportTraceServiceRequest) -> SpanExportResult:
        import grpc

        try:
            self.stub.Export(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            log.debug("OTLP export failed: %s", code)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.channel.close()


class EncodingExporter(RequestExporter):
    """Serialises each request and discards the bytes: the CPU cost of exporting
    without a collector (for benchmarks: `setup_tracing(make_exporter=EncodingExporter)`)."""

    def __init__(self) -> None:
        self.spans = 0
        self.bytes = 0

    def export_request(self, request: ExportTraceServiceRequest) -> SpanExportResult:
        self.bytes += len(request.SerializeToString())
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


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
        return self._guarded(lambda: self.inner.export(spans), len(spans))

    def export_request(self, request: ExportTraceServiceRequest, count: int) -> SpanExportResult:
        """Send a request of `count` spans (the inner exporter is a `RequestExporter`)."""
        inner = self.inner
        if not isinstance(inner, RequestExporter):
            raise TypeError(f"{type(inner).__name__} takes spans, not requests")
        return self._guarded(lambda: inner.export_request(request), count)

    def _guarded(self, send: Callable[[], SpanExportResult], count: int) -> SpanExportResult:
        if self.failing:
            self.failures += 1
            return SpanExportResult.FAILURE
        try:
            if self.exported == 0 and self.probe is not None and not self.probe():
                result = SpanExportResult.FAILURE
            else:
                result = send()
        except Exception as exc:  # an exporter must never take the flow down
            result = SpanExportResult.FAILURE
            if not self._warned:
                log.warning("trace export failed: %s", type(exc).__name__)
        if result is SpanExportResult.SUCCESS:
            self.exported += count
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


def otlp_exporter() -> SpanExporter:
    """The OTLP exporter for `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`: `OtlpGrpcExporter`,
    or the SDK's OTLP/HTTP exporter (which reads its environment itself)."""
    if otlp_protocol() == "grpc":
        return OtlpGrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def environment_exporter() -> GuardedExporter:
    """The exporter named by `OTEL_TRACES_EXPORTER` (OTLP or console), guarded."""
    if exporter_kind() == "console":
        return GuardedExporter(ConsoleSpanExporter())
    return GuardedExporter(otlp_exporter(), probe=lambda: reachable(otlp_endpoint()))


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
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.sdk._shared_internal",
)
"""Where the SDK's OTLP/HTTP exporter and batch span processor log each failed export
(logger names only: a renamed module makes the log noisier, nothing else)."""


def quiet_exporter_logs() -> None:
    """Let the exporters' loggers print their first warning only."""
    for name in _EXPORTER_LOGGERS:
        logging.getLogger(name).addFilter(_OnceFilter())


# The export process -----------------------------------------------------------------------


def export_main() -> None:
    """The export process: read the exporter factory, the resource and the scope, then
    batches of records, from stdin (pickles written by `ExportProcess`), export their
    spans, and at the end of input write what was exported as JSON to the file descriptor
    in argv[1]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_exporter_logs()
    source = sys.stdin.buffer
    # The header names the compact record types too: unpickling them loads their module
    # here, before the first batch arrives.
    make_exporter, attributes, schema_url, scope_fields, _ = pickle.load(source)
    name, version, scope_schema = scope_fields
    made = make_exporter() if make_exporter is not None else environment_exporter()
    exporter = made if isinstance(made, GuardedExporter) else GuardedExporter(made)
    resource = Resource(attributes, schema_url)
    scope = InstrumentationScope(name, version, scope_schema)
    encoder = None
    if isinstance(exporter.inner, RequestExporter):
        encoder = RequestEncoder(resource, scope)
    ids = RandomIdGenerator()
    report = os.fdopen(int(sys.argv[1]), "w")
    report.write(READY + "\n")  # the exporter is built: spans can flow
    report.flush()
    received = 0
    while True:
        try:
            batch: list[Record] = pickle.load(source)
        except (EOFError, pickle.UnpicklingError):
            break
        spans = [span for record in batch for span in record.spans(ids)]
        received += len(spans)
        for start in range(0, len(spans), EXPORT_BATCH):
            chunk = spans[start : start + EXPORT_BATCH]
            if encoder is not None:
                exporter.export_request(encoder.request(chunk), len(chunk))
            else:
                exporter.export([readable_span(r, resource, scope) for r in chunk])
    exporter.shutdown()
    stats = {"received": received, "exported": exporter.exported, "failures": exporter.failures}
    with suppress(OSError), report:  # a parent gone without reading it is no error
        report.write(json.dumps(stats))


class ExportProcess(SpanProcessor):
    """A span processor that exports from a child process: records (`on_record`; the
    SDK's finished spans become records) are gathered into batches of `batch_size` (or
    whatever has gathered after `interval_s`, default `OTEL_BSP_SCHEDULE_DELAY` or 1 s) and
    piped to a Python process that builds the exporter (`make_exporter`, an importable
    callable; default: from the `OTEL_*` environment) and exports their spans under
    `resource` and `scope`. `record_types` are the compact record types it will receive
    (loaded there at start). At most `max_batches` wait to be piped; beyond that batches
    are dropped (counted, logged once), so tracing never holds the flow back. The child
    ends when its input closes, also when this process dies."""

    def __init__(
        self,
        resource: Resource,
        make_exporter: Callable[[], SpanExporter] | None = None,
        *,
        scope: InstrumentationScope | None = None,
        record_types: Sequence[type] = (),
        batch_size: int = 256,
        interval_s: float | None = None,
        max_batches: int = 256,
    ) -> None:
        delay_ms = os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "").strip()
        self.interval_s = interval_s if interval_s is not None else float(delay_ms or 1000) / 1000
        self.batch_size = batch_size
        self.dropped = 0
        self.stats: dict[str, int] | None = None
        self._buffer: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: queue.Queue[list[Record] | None] = queue.Queue(max_batches)
        stats_read, stats_write = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # An exporter that loads numpy would start its math library's thread pool, whose
        # threads spin for tens of milliseconds of CPU, next to the flow's workers.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from operators.telemetry.span_export import export_main; export_main()",
                str(stats_write),
            ],
            stdin=subprocess.PIPE,
            pass_fds=(stats_write,),
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the parent only
        )
        os.close(stats_write)
        self._report = os.fdopen(stats_read, "r")
        self._ready = False
        scope = scope or InstrumentationScope("streamsight")
        self._header = (
            make_exporter,
            dict(resource.attributes),
            resource.schema_url,
            (scope.name, scope.version, scope.schema_url),
            tuple(record_types),
        )
        self._writer = threading.Thread(target=self._write, name="span-export-pipe", daemon=True)
        self._writer.start()
        self._timer = threading.Thread(target=self._tick, name="span-export-timer", daemon=True)
        self._timer.start()

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            self.on_record(span_record(span))

    def on_record(self, record: Record) -> None:
        """Queue a record of sampled spans for export."""
        if self._stop.is_set():
            return
        with self._lock:
            self._buffer.append(record)
            if len(self._buffer) >= self.batch_size:
                self._send_locked()

    def _send_locked(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            self._pending.put_nowait(batch)
        except queue.Full:
            if self.dropped == 0:
                log.warning("span export is behind: dropping spans until it catches up")
            self.dropped += len(batch)

    def _write(self) -> None:
        pipe = self.process.stdin
        assert pipe is not None
        try:
            pickle.dump(self._header, pipe, protocol=pickle.HIGHEST_PROTOCOL)
            pipe.flush()  # the child builds its exporter meanwhile
            while (batch := self._pending.get()) is not None:
                pickle.dump(batch, pipe, protocol=pickle.HIGHEST_PROTOCOL)
                pipe.flush()
        except (OSError, ValueError, TypeError, pickle.PicklingError) as exc:
            name = type(exc).__name__
            log.warning("the span export process stopped (%s): spans are dropped", name)
            self._stop.set()
        finally:
            with suppress(OSError):
                pipe.close()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                self._send_locked()

    def wait_ready(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait (at most `timeout_s`) until the export process has started and built its
        exporter; whether it has. Spans recorded before are not lost either way: they
        wait in the pipe."""
        if not self._ready and select.select([self._report], [], [], timeout_s)[0]:
            self._ready = self._report.readline().strip() == READY
        return self._ready

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Hand what has gathered to the export process (which exports it in turn)."""
        with self._lock:
            self._send_locked()
        return True

    def shutdown(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Send the rest, let the export process finish (at most `timeout_s`) and stop it."""
        if self._stop.is_set() and not self._writer.is_alive():
            return
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._send_locked()
            self._stop.set()
        with suppress(queue.Full):
            self._pending.put(None, timeout=timeout_s)
        self._writer.join(max(deadline - time.monotonic(), 0.1))
        try:
            self.process.wait(max(deadline - time.monotonic(), 0.1))
            with self._report as report:
                lines = report.read().splitlines()
            if lines and lines[0] == READY:
                lines = lines[1:]
            self.stats = json.loads(lines[0]) if lines else None
        except subprocess.TimeoutExpired:
            log.warning("span export did not finish in %.0f s; the rest is dropped", timeout_s)
            self.process.kill()
            self.process.wait(1.0)
            self._report.close()
        except (OSError, ValueError):
            self.stats = None
