"""Span export from a child process, with an OTLP encoder for the pipeline's spans.

Encoding spans to OTLP protobuf is the largest cost of tracing every frame (the SDK's
generic encoder builds every attribute anew: about 45 microseconds per span). Here
finished spans become plain records (`span_record`), the stages of a frame one compact
record (`tracing.expand`); they are piped in batches to a child Python process
(`ExportProcess`), which expands the compact ones, and there `RecordEncoder` turns them
into the same `ExportTraceServiceRequest` the SDK's encoder builds: ids, times and flags
are written in protobuf's wire format, and the encoded attribute of every (key, value)
pair seen before is reused (stages, jobs, cameras, topics: the values of a stream
repeat). The OTLP exporters then send the request as usual.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from struct import pack
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PBSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PBStatus
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    SpanContext,
    SpanKind,
)

from operators.tracing import (
    FLUSH_TIMEOUT_S,
    SCOPE,
    SERVICE_VERSION,
    GuardedExporter,
    SpanRecord,
    context_record,
    environment_exporter,
    expand,
    quiet_exporter_logs,
    readable_span,
)

log = logging.getLogger(__name__)

EXPORT_BATCH = 512
"""Spans per export call in the export process."""
READY = "ready"
"""The export process's first line on its report pipe, once its exporter is built."""

# Records ----------------------------------------------------------------------------------


def span_record(span: ReadableSpan) -> SpanRecord:
    """`span` as plain values."""
    return (
        span.name,
        span.kind.value,
        span.start_time,
        span.end_time,
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
_LINK = PBSpan.Link
_HAS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = _HAS_REMOTE | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_FLAGS_LOCAL = PBSpan(flags=_HAS_REMOTE).SerializeToString()
_FLAGS_REMOTE = PBSpan(flags=_IS_REMOTE).SerializeToString()
_LOW64 = (1 << 64) - 1


def _value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


class RecordEncoder:
    """Encodes span records of one resource and scope into an OTLP request equal to the
    SDK encoder's, keeping up to `max_cached` encoded attributes for reuse."""

    def __init__(
        self, resource: Resource, scope: InstrumentationScope, max_cached: int = 65_536
    ) -> None:
        probe = ReadableSpan(
            "probe", SpanContext(1, 1, False), resource=resource, instrumentation_scope=scope
        )
        template = encode_spans([probe]).resource_spans[0]
        self.resource = template.resource
        self.resource_schema_url = template.schema_url
        self.scope = template.scope_spans[0].scope
        self.scope_schema_url = template.scope_spans[0].schema_url
        self.max_cached = max_cached
        self._cache: dict[tuple[Any, ...], bytes] = {}

    def _attribute(self, key: str, value: Any, owner: type = PBSpan) -> bytes:
        """The attribute serialised as an `attributes` entry of `owner` (a Span or a
        Span.Link: the field numbers differ)."""
        cache_key = (key, value, type(value), owner)
        found = self._cache.get(cache_key)
        if found is None:
            entry = owner(attributes=[KeyValue(key=key, value=_value(value))])
            found = self._encoded(cache_key, entry)
        return found

    def _encoded(self, cache_key: tuple[Any, ...], message: Any) -> bytes:
        """`message` serialised, kept under `cache_key` for reuse."""
        if len(self._cache) >= self.max_cached:
            self._cache.clear()
        found: bytes = message.SerializeToString()
        self._cache[cache_key] = found
        return found

    def _span(self, record: SpanRecord) -> bytes:
        """`record` as a `spans` entry of ScopeSpans: tag, length and the Span message.

        Ids, times and flags (fixed-size fields) are written here in protobuf's wire
        format; names, statuses and attributes are serialised by protobuf once and
        reused."""
        name, kind, start, end, context, parent, attributes, links, status = record
        cache = self._cache
        trace_id = context[0]
        parts = [pack(">BBQQBBQ", 0x0A, 16, trace_id >> 64, trace_id & _LOW64, 0x12, 8, context[1])]
        if context[3]:
            key = (PBSpan, "trace_state", context[3])
            parts.append(cache.get(key) or self._encoded(key, PBSpan(trace_state=context[3])))
        if parent is not None:
            parts.append(pack(">BBQ", 0x22, 8, parent[1]))
        key = (PBSpan, name, kind)
        parts.append(cache.get(key) or self._encoded(key, PBSpan(name=name, kind=_KINDS[kind])))
        parts.append(pack("<BQBQ", 0x39, start, 0x41, end))
        attribute, get = self._attribute, cache.get
        parts += [get((k, v, type(v), PBSpan)) or attribute(k, v) for k, v in attributes.items()]
        for link, link_attributes in links:
            body = [pack(">BBQQBBQ", 0x0A, 16, link[0] >> 64, link[0] & _LOW64, 0x12, 8, link[1])]
            body += [attribute(k, v, _LINK) for k, v in link_attributes.items()]
            body.append(pack("<BI", 0x35, _IS_REMOTE if link[4] else _HAS_REMOTE))
            encoded = b"".join(body)
            parts += [b"\x6a", _varint(len(encoded)), encoded]
        key = (PBStatus, *status)
        parts.append(
            cache.get(key)
            or self._encoded(key, PBSpan(status=PBStatus(code=status[0], message=status[1])))
        )
        parts.append(_FLAGS_REMOTE if parent is not None and parent[4] else _FLAGS_LOCAL)
        span = b"".join(parts)
        return b"".join((b"\x12", _varint(len(span)), span))

    def request(self, records: Sequence[SpanRecord]) -> ExportTraceServiceRequest:
        """The OTLP request that carries `records`."""
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add(schema_url=self.resource_schema_url)
        resource_spans.resource.CopyFrom(self.resource)
        scope_spans = resource_spans.scope_spans.add(schema_url=self.scope_schema_url)
        scope_spans.scope.CopyFrom(self.scope)
        span = self._span
        scope_spans.MergeFromString(b"".join([span(record) for record in records]))
        return request


def _varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class EncodedSpans(Sequence[Any]):
    """An OTLP request already encoded, passed where an exporter expects spans: its length
    is the number of spans; the OTLP exporters of the export process send it as it is."""

    def __init__(self, request: ExportTraceServiceRequest, count: int) -> None:
        self.request = request
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("encoded spans cannot be indexed")

    def __iter__(self) -> Iterator[Any]:
        return iter(())


def _encoded_or_sdk(encode: Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[Any]], Any]:
    def encode_or_pass(spans: Sequence[Any]) -> Any:
        return spans.request if isinstance(spans, EncodedSpans) else encode(spans)

    return encode_or_pass


OTLP_TRACE_MODULES = (
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


def accept_encoded_spans(exporter: object) -> bool:
    """Whether `exporter` can be handed `EncodedSpans`: an OTLP span exporter (gRPC or
    HTTP), whose module's `encode_spans` is made to pass an encoded request through, or
    an exporter that says so (`accepts_encoded`). Meant for the export process only;
    only the module of the exporter in use is touched (no other exporter is imported)."""
    if getattr(exporter, "accepts_encoded", False):
        return True
    module = sys.modules.get(type(exporter).__module__)
    if module is None or module.__name__ not in OTLP_TRACE_MODULES:
        return False
    current = getattr(module, "encode_spans", None)
    if current is None:
        return False
    if getattr(current, "__name__", "") != "encode_or_pass":
        module.encode_spans = _encoded_or_sdk(current)  # type: ignore[attr-defined]
    return True


class EncodingExporter(SpanExporter):
    """Serialises spans to an OTLP request as the OTLP exporters of the export process
    do, then discards the bytes: the CPU cost of exporting without a collector (for
    benchmarks: `setup_tracing(make_exporter=EncodingExporter)`)."""

    accepts_encoded = True

    def __init__(self) -> None:
        self.spans = 0
        self.bytes = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        """Serialise `spans` (an `EncodedSpans` request or SDK spans) and drop them."""
        request = spans.request if isinstance(spans, EncodedSpans) else encode_spans(spans)
        self.bytes += len(request.SerializePartialToString())
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


# The export process -----------------------------------------------------------------------


def export_main() -> None:
    """The export process: read the exporter factory and the resource, then batches of
    span records, from stdin (pickles written by `ExportProcess`), export them, and at
    the end of input write what was exported as JSON to the file descriptor in argv[1]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_exporter_logs()
    source = sys.stdin.buffer
    make_exporter, attributes, schema_url = pickle.load(source)
    made = make_exporter() if make_exporter is not None else environment_exporter()
    exporter = made if isinstance(made, GuardedExporter) else GuardedExporter(made)
    resource = Resource(attributes, schema_url)
    scope = InstrumentationScope(SCOPE, SERVICE_VERSION)
    encoder: RecordEncoder | None = None
    if accept_encoded_spans(exporter.inner):
        encoder = RecordEncoder(resource, scope)
    ids = RandomIdGenerator()
    report = os.fdopen(int(sys.argv[1]), "w")
    report.write(READY + "\n")  # the exporter is built: spans can flow
    report.flush()
    received = 0
    while True:
        try:
            batch = pickle.load(source)
        except (EOFError, pickle.UnpicklingError):
            break
        records: list[SpanRecord] = []
        for record in batch:
            if type(record[0]) is int:  # a compact record of several spans
                records += expand(record, ids)
            else:
                records.append(record)
        received += len(records)
        for start in range(0, len(records), EXPORT_BATCH):
            chunk = records[start : start + EXPORT_BATCH]
            if encoder is not None:
                exporter.export(EncodedSpans(encoder.request(chunk), len(chunk)))
            else:
                exporter.export([readable_span(r, resource, scope) for r in chunk])
    exporter.shutdown()
    stats = {"received": received, "exported": exporter.exported, "failures": exporter.failures}
    with suppress(OSError), report:  # a parent gone without reading it is no error
        report.write(json.dumps(stats))


class ExportProcess(SpanProcessor):
    """A span processor that exports from a child process: finished spans become plain
    records, gathered into batches of `batch_size` (or whatever has gathered after
    `interval_s`, default `OTEL_BSP_SCHEDULE_DELAY` or 1 s) and piped to a Python process
    that builds the exporter (`make_exporter`, an importable callable; default: from the
    `OTEL_*` environment) and exports them. At most `max_batches` wait to be piped; beyond
    that batches are dropped (counted, logged once), so tracing never holds the flow back.
    The child ends when its input closes, also when this process dies."""

    def __init__(
        self,
        resource: Resource,
        make_exporter: Callable[[], SpanExporter] | None = None,
        *,
        batch_size: int = 256,
        interval_s: float | None = None,
        max_batches: int = 256,
    ) -> None:
        delay_ms = os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "").strip()
        self.interval_s = interval_s if interval_s is not None else float(delay_ms or 1000) / 1000
        self.batch_size = batch_size
        self.dropped = 0
        self.stats: dict[str, int] | None = None
        self._buffer: list[SpanRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: queue.Queue[list[SpanRecord] | None] = queue.Queue(max_batches)
        stats_read, stats_write = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from operators.span_export import export_main; export_main()",
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
        self._header = (make_exporter, dict(resource.attributes), resource.schema_url)
        self._writer = threading.Thread(target=self._write, name="span-export-pipe", daemon=True)
        self._writer.start()
        self._timer = threading.Thread(target=self._tick, name="span-export-timer", daemon=True)
        self._timer.start()

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            self.on_record(span_record(span))

    def on_record(self, record: SpanRecord) -> None:
        """Queue a sampled span's record for export."""
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
        except (OSError, ValueError, pickle.PicklingError) as exc:
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
