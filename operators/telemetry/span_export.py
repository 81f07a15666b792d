"""Span export from a child process, with an OTLP encoder for the pipeline's spans.

Encoding spans to OTLP protobuf is the largest cost of tracing every frame (the SDK's
generic encoder builds every attribute anew: about 45 microseconds per span). Here
finished spans become plain records (`span_record`), the stages of a frame one compact
record (`tracing.expand`); they are piped in batches to a child Python process
(`ExportProcess`), where `RecordEncoder` writes the request the SDK's encoder would build
straight in protobuf's wire format: the spans of a compact record without building them
first, and the encoded attributes that recur (stages, jobs, cameras, topics: the values of
a stream repeat) reused. The OTLP exporters then send the serialised request as it is
(`SerializedRequest`; for gRPC through `SerializedTraceStub`).
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
from functools import lru_cache
from struct import pack
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PBSpan
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

from operators.telemetry.tracing import (
    BATCH_ID,
    BATCH_WAIT,
    CAMERA,
    FLUSH_TIMEOUT_S,
    FRAME_ID,
    INFERENCE,
    INFERRED,
    INGEST,
    JOB_ID,
    MESSAGING_SYSTEM,
    PREPARED,
    PREPROCESS,
    SCOPE,
    SCOPE_ATTR,
    SERVICE_VERSION,
    SINK,
    SPAN_NAMES,
    STAGE,
    WRITTEN,
    Attributes,
    Ctx,
    GuardedExporter,
    Ids,
    SpanRecord,
    bounded,
    child_context,
    context_record,
    environment_exporter,
    expand,
    quiet_exporter_logs,
    readable_span,
    sampled,
    write_batch_span,
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


_SPAN_ATTRIBUTE = 0x4A
"""The tag of Span.attributes (field 9, length-delimited)."""
_LINK_ATTRIBUTE = 0x22
"""The tag of Span.Link.attributes (field 4, length-delimited)."""
_INT64 = range(-(1 << 63), 1 << 63)
_UNSET = PBSpan(status=PBStatus()).SerializeToString()
_STEP, _SOURCE = "step", "source"
"""Cache keys of attribute groups (attribute keys are never these)."""
_SEQ = "streamsight.frame.seq"
_OFFSET = "messaging.kafka.offset"
_BODY_SIZE = "messaging.message.body.size"
_WIDTH, _HEIGHT = "streamsight.frame.width", "streamsight.frame.height"
_BATCH_SIZE = "streamsight.batch.size"
_FLUSH_REASON = "streamsight.batch.flush_reason"
_DETECTIONS = "streamsight.detections"
_OUTCOME = "streamsight.sink.outcome"
_DESTINATION = "destination"
_U64 = (1 << 64) - 1


def _any_value(value: Any) -> bytes | None:
    """`value` (bool, str, int or float) as a serialised AnyValue; None for other types."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        text = value.encode("utf-8", "replace")
        return b"".join((b"\x0a", _varint(len(text)), text))
    if isinstance(value, int):
        if value in _INT64:
            return b"\x18" + _varint(value & _U64)
        return None
    if isinstance(value, float):
        return pack("<Bd", 0x21, value)
    return None


@lru_cache(maxsize=1024)
def _key_field(key: str) -> bytes:
    """The `key` field (1) of a KeyValue; nothing for an empty key, as protobuf writes it."""
    name = key.encode("utf-8", "replace")
    return b"".join((b"\x0a", _varint(len(name)), name)) if name else b""


def _attribute_entry(tag: int, key: str, value: Any) -> bytes:
    """The attribute `key` = `value` as an `attributes` entry under `tag` (of a Span or a
    Span.Link), in protobuf's wire format; types other than bool, str, int and float
    are written as their string, as protobuf serialises them."""
    if type(value) is str:  # the common case, written in one go
        text = value.encode("utf-8", "replace")
        short = _SHORT_VARINTS
        head = _key_field(key)
        size = len(text)
        any_size = 1 + (1 if size < 0x80 else 2) + size  # an AnyValue's string_value
        pair_size = len(head) + 1 + (1 if any_size < 0x80 else 2) + any_size
        if pair_size < _SHORT:
            return b"".join((
                _TAGS[tag], short[pair_size], head, b"\x12", short[any_size], b"\x0a",
                short[size], text,
            ))  # fmt: skip
    encoded_value = _any_value(value)
    if encoded_value is None:
        owner = PBSpan if tag == _SPAN_ATTRIBUTE else _LINK
        return owner(attributes=[KeyValue(key=key, value=_value(value))]).SerializeToString()
    pair = b"".join((_key_field(key), b"\x12", _varint(len(encoded_value)), encoded_value))
    return b"".join((_TAGS[tag], _varint(len(pair)), pair))


def _ids(context: Ctx) -> bytes:
    """The trace id and span id fields (1 and 2) of a Span or a Span.Link."""
    trace_id = context[0]
    return pack(">BBQQBBQ", 0x0A, 16, trace_id >> 64, trace_id & _LOW64, 0x12, 8, context[1])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length and `payload`."""
    return b"".join((_varint(number << 3 | 2), _varint(len(payload)), payload))


class RecordEncoder:
    """Encodes span records of one resource and scope into the serialised OTLP request
    that the SDK's encoder builds, keeping up to `max_cached` encoded attributes (and
    names and statuses) for reuse."""

    def __init__(
        self, resource: Resource, scope: InstrumentationScope, max_cached: int = 65_536
    ) -> None:
        probe = ReadableSpan(
            "probe", SpanContext(1, 1, False), resource=resource, instrumentation_scope=scope
        )
        template = encode_spans([probe]).resource_spans[0]
        scope_spans = template.scope_spans[0]
        # Fields in the order protobuf writes them: a ResourceSpans is its resource (1),
        # its ScopeSpans (2) and schema URL (3); a ScopeSpans its scope (1), spans (2)
        # and schema URL (3).
        self._resource_head = ResourceSpans(resource=template.resource).SerializeToString()
        self._resource_tail = ResourceSpans(schema_url=template.schema_url).SerializeToString()
        self._scope_head = ScopeSpans(scope=scope_spans.scope).SerializeToString()
        self._scope_tail = ScopeSpans(schema_url=scope_spans.schema_url).SerializeToString()
        self.max_cached = max_cached
        self._cache: dict[tuple[Any, ...], bytes] = {}
        self._process = self._attributes(
            (_SOURCE, "process"),
            lambda: {"messaging.operation.type": "process", "messaging.operation.name": "process"},
        )
        internal = SpanKind.INTERNAL.value
        self._preprocess = self._head(SPAN_NAMES[PREPROCESS], internal)
        self._wait = self._head(SPAN_NAMES[BATCH_WAIT], internal)
        self._inference = self._head(SPAN_NAMES[INFERENCE], internal)

    def _attribute(self, key: str, value: Any, tag: int = _SPAN_ATTRIBUTE) -> bytes:
        """The attribute as an `attributes` entry under `tag` (a Span's or a Link's)."""
        cache_key = (key, value, type(value), tag)
        found = self._cache.get(cache_key)
        if found is None:
            found = _attribute_entry(tag, key, value)
            self._keep(cache_key, found)
        return found

    def _keep(self, cache_key: tuple[Any, ...], encoded: bytes) -> None:
        if len(self._cache) >= self.max_cached:
            self._cache.clear()
        self._cache[cache_key] = encoded

    def _encoded(self, cache_key: tuple[Any, ...], message: Any) -> bytes:
        """`message` serialised, kept under `cache_key` for reuse."""
        found: bytes = message.SerializeToString()
        self._keep(cache_key, found)
        return found

    def _head(self, name: str, kind: int) -> bytes:
        """A span's name and kind fields."""
        key = (PBSpan, name, kind)
        return self._cache.get(key) or self._encoded(key, PBSpan(name=name, kind=_KINDS[kind]))

    def _status(self, status: tuple[int, str | None]) -> bytes:
        key = (PBStatus, *status)
        return self._cache.get(key) or self._encoded(
            key, PBSpan(status=PBStatus(code=status[0], message=status[1]))
        )

    def _entry(
        self,
        context: Ctx,
        parent: Ctx | None,
        head: bytes,
        start: int,
        end: int,
        body: list[bytes],
        status: bytes = _UNSET,
    ) -> bytes:
        """A span as a `spans` entry of ScopeSpans (tag, length, the Span message), from
        its contexts, name and kind (`head`), times, attributes and links (`body`, encoded
        entries) and status. Fields go in the order protobuf writes them."""
        if context[3]:
            key = (PBSpan, "trace_state", context[3])
            state = self._cache.get(key) or self._encoded(key, PBSpan(trace_state=context[3]))
            ids = b"".join((_ids(context), state))
            if parent is not None:
                ids += pack(">BBQ", 0x22, 8, parent[1])
        elif parent is not None:  # a frame's span: ids and parent id in one go
            high, low = context[0] >> 64, context[0] & _LOW64
            ids = pack(">BBQQBBQBBQ", 0x0A, 16, high, low, 0x12, 8, context[1], 0x22, 8, parent[1])
        else:
            ids = _ids(context)
        times = pack("<BQBQ", 0x39, start, 0x41, end)
        flags = _FLAGS_REMOTE if parent is not None and parent[4] else _FLAGS_LOCAL
        span = b"".join((ids, head, times, *body, status, flags))
        return b"".join((b"\x12", _varint(len(span)), span))

    def _span(self, record: SpanRecord) -> bytes:
        """`record` as a `spans` entry of ScopeSpans. Names and statuses are serialised by
        protobuf once and reused; the rest is written here in protobuf's wire format."""
        name, kind, start, end, context, parent, attributes, links, status = record
        attribute, get = self._attribute, self._cache.get
        body = [
            get((k, v, type(v), _SPAN_ATTRIBUTE)) or attribute(k, v) for k, v in attributes.items()
        ]
        for link, link_attributes in links:
            body.append(self._link(link, link_attributes))
        head = self._head(name, kind)
        return self._entry(context, parent, head, start, end, body, self._status(status))

    def _link(self, link: Ctx, attributes: Attributes) -> bytes:
        """A link as a `links` entry of a Span."""
        body = [_ids(link)]
        # A link's attributes name the frame or batch it links to: seldom seen again.
        body += [_attribute_entry(_LINK_ATTRIBUTE, k, v) for k, v in attributes.items()]
        body.append(pack("<BI", 0x35, _IS_REMOTE if link[4] else _HAS_REMOTE))
        encoded = b"".join(body)
        return b"".join((b"\x6a", _varint(len(encoded)), encoded))

    def _attributes(self, key: tuple[Any, ...], attributes: Callable[[], Attributes]) -> bytes:
        """Several attributes that recur together, encoded once under `key`."""
        found = self._cache.get(key)
        if found is None:
            found = b"".join(
                _attribute_entry(_SPAN_ATTRIBUTE, k, v) for k, v in attributes().items()
            )
            self._keep(key, found)
        return found

    def _step(self, stage: str, job: str, camera: str) -> bytes:
        """The stage, scope, job and camera attributes that open a frame's span."""
        return self._attributes(
            (_STEP, stage, job, camera),
            lambda: {
                STAGE: stage,
                SCOPE_ATTR: "frame",
                JOB_ID: bounded(job),
                CAMERA: bounded(camera),
            },
        )

    def spans(self, record: tuple[Any, ...], ids: Ids) -> list[bytes]:
        """The `spans` entries of a record: a span record's, or the spans a compact record
        expands to (`tracing.expand`), those of a frame's stages written directly here."""
        kind = record[0]
        if kind == PREPARED:
            return self._prepared(record, ids)
        if kind == INFERRED:
            return self._inferred(record, ids)
        if kind == WRITTEN:
            return self._written(record, ids)
        if type(kind) is int:
            return [self._span(span) for span in expand(record, ids)]
        return [self._span(record)]

    def _prepared(self, record: tuple[Any, ...], ids: Ids) -> list[bytes]:
        """A frame's ingest and preprocess spans: as `tracing.expand` builds them."""
        (_, ingest, parent, start, end, started, ended, topic, partition, offset, group, size,
         job, camera, frame_id, seq, width, height) = record  # fmt: skip
        attribute = self._attribute
        frame = attribute(FRAME_ID, bounded(frame_id))
        body = [self._step(INGEST, job, camera), frame]
        if seq is not None:  # one per frame, like the offset: not worth keeping
            body.append(_attribute_entry(_SPAN_ATTRIBUTE, _SEQ, seq))
        body.append(
            self._attributes(
                (_SOURCE, topic, partition),
                lambda: {
                    "messaging.system": MESSAGING_SYSTEM,
                    "messaging.destination.name": bounded(topic),
                    "messaging.destination.partition.id": str(partition),
                },
            )
        )
        body.append(_attribute_entry(_SPAN_ATTRIBUTE, _OFFSET, offset))
        if group:
            body.append(attribute("messaging.consumer.group.name", bounded(group)))
        body += (attribute(_BODY_SIZE, size), self._process)
        consumer = self._head(f"process {topic}", SpanKind.CONSUMER.value)
        preprocess = child_context(ingest, ids.generate_span_id())
        step = [self._step(PREPROCESS, job, camera), frame]
        step += (attribute(_WIDTH, width), attribute(_HEIGHT, height))
        return [
            self._entry(ingest, parent, consumer, min(start, end), end, body),
            self._entry(preprocess, ingest, self._preprocess, min(started, ended), ended, step),
        ]

    def _inferred(self, record: tuple[Any, ...], ids: Ids) -> list[bytes]:
        """Each frame's batch wait and inference spans: as `tracing.expand` builds them."""
        _, batch, dispatched, batch_id, size, reason, frames = record
        attribute = self._attribute
        batch_attributes = attribute(BATCH_ID, batch_id)
        waited = b"".join(
            (batch_attributes, attribute(_BATCH_SIZE, size), attribute(_FLUSH_REASON, reason))
        )
        link = self._link(batch, {BATCH_ID: batch_id})
        entry, step = self._entry, self._step
        spans: list[bytes] = []
        for parent, prepared, inferred, job, camera, frame_id, detections in frames:
            frame = attribute(FRAME_ID, bounded(frame_id))
            wait = child_context(parent, ids.generate_span_id())
            done = child_context(parent, ids.generate_span_id())
            found = attribute(_DETECTIONS, detections)
            spans += (
                entry(wait, parent, self._wait, min(prepared, dispatched), dispatched,
                      [step(BATCH_WAIT, job, camera), frame, waited]),
                entry(done, parent, self._inference, min(dispatched, inferred), inferred,
                      [step(INFERENCE, job, camera), frame, batch_attributes, found, link]),
            )  # fmt: skip
        return spans

    def _written(self, record: tuple[Any, ...], ids: Ids) -> list[bytes]:
        """A sink batch's write spans and its `sink write batch` span: as `tracing.expand`
        builds them. Batches with dead letters (whose writes carry attributes of their
        own) or a failure go through `tracing.expand`."""
        _, started, ended, destination, failure, writes = record
        if failure is not None or any(w[8] is not None or w[9] is not None for w in writes):
            return [self._span(span) for span in expand(record, ids)]
        started = min(started, ended)
        attribute, step, entry = self._attribute, self._step, self._entry
        to = self._attributes((_DESTINATION, *destination.items()), lambda: destination)
        head = self._head(SPAN_NAMES[SINK], SpanKind.PRODUCER.value)
        spans: list[bytes] = []
        for ctx, parent, job, camera, frame_id, batch_id, detections, outcome, _, _ in writes:
            if sampled(ctx):
                body = [step(SINK, job, camera), attribute(FRAME_ID, bounded(frame_id))]
                body += (attribute(BATCH_ID, batch_id), attribute(_DETECTIONS, detections))
                body += (attribute(_OUTCOME, outcome), to)
                spans.append(entry(ctx, parent, head, started, ended, body))
        batch = write_batch_span(started, ended, destination, None, writes, ids)
        if batch is not None:
            spans.append(self._span(batch))
        return spans

    def encode(self, records: Sequence[SpanRecord]) -> bytes:
        """The serialised OTLP request that carries `records` (empty for none)."""
        return self.request_of([self._span(record) for record in records])

    def request_of(self, spans: Sequence[bytes]) -> bytes:
        """The serialised OTLP request that carries `spans` entries (empty for none)."""
        if not spans:
            return b""
        scope_spans = b"".join((self._scope_head, *spans, self._scope_tail))
        resource_spans = b"".join(
            (self._resource_head, _field(2, scope_spans), self._resource_tail)
        )
        return _field(1, resource_spans)

    def request(self, records: Sequence[SpanRecord]) -> ExportTraceServiceRequest:
        """The OTLP request that carries `records`, as a message."""
        return ExportTraceServiceRequest.FromString(self.encode(records))


def _long_varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf varint, built byte by byte."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SHORT = 1 << 14
_SHORT_VARINTS = tuple(_long_varint(value) for value in range(_SHORT))
"""The varints of one and two bytes, by value: lengths in a span are these."""
_TAGS = tuple(bytes((tag,)) for tag in range(256))


def _varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf varint."""
    return _SHORT_VARINTS[value] if value < _SHORT else _long_varint(value)


class SerializedRequest:
    """An OTLP request already serialised, where an exporter expects the request message:
    the OTLP HTTP exporter and `SerializedTraceStub` only ask it for its bytes."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def SerializeToString(self, **_: Any) -> bytes:
        """The request's bytes."""
        return self.payload

    SerializePartialToString = SerializeToString


class EncodedSpans(Sequence[Any]):
    """An OTLP request already encoded (a message or a `SerializedRequest`), passed where
    an exporter expects spans: its length is the number of spans; the OTLP exporters of
    the export process send it as it is."""

    def __init__(self, request: ExportTraceServiceRequest | SerializedRequest, count: int) -> None:
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


GRPC_TRACE_MODULE = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
HTTP_TRACE_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
OTLP_TRACE_MODULES = (GRPC_TRACE_MODULE, HTTP_TRACE_MODULE)
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


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


def _serialized(request: Any) -> bytes:
    data: bytes = request.SerializeToString()
    return data


class SerializedTraceStub:
    """The OTLP trace service's client stub, whose serialiser also takes a
    `SerializedRequest` (the generated stub's takes request messages only)."""

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=_serialized,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


def sends_serialized(exporter: object) -> bool:
    """Whether `exporter` (one that `accept_encoded_spans`) can be handed a
    `SerializedRequest`: one that says so (`accepts_serialized`), the OTLP HTTP exporter
    (which only serialises the request), or the OTLP gRPC exporter once its stub is a
    `SerializedTraceStub` (done here, where its channel and stub are where this version of
    the exporter keeps them). Otherwise the export process parses each request into a
    message for it."""
    if getattr(exporter, "accepts_serialized", False):
        return True
    module = type(exporter).__module__
    if module == HTTP_TRACE_MODULE:
        return True
    if module != GRPC_TRACE_MODULE:
        return False
    channel = getattr(exporter, "_channel", None)
    if channel is None or not hasattr(exporter, "_stub") or not hasattr(exporter, "_client"):
        return False
    exporter._stub = SerializedTraceStub  # type: ignore[attr-defined]  # on reconnection too
    exporter._client = SerializedTraceStub(channel)  # type: ignore[attr-defined]
    return True


class EncodingExporter(SpanExporter):
    """Serialises spans to an OTLP request as the OTLP exporters of the export process
    do, then discards the bytes: the CPU cost of exporting without a collector (for
    benchmarks: `setup_tracing(make_exporter=EncodingExporter)`)."""

    accepts_encoded = True
    accepts_serialized = True

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
    serialized = encoder is not None and sends_serialized(exporter.inner)
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
        if encoder is None:
            records: list[SpanRecord] = []
            for record in batch:
                is_compact = type(record[0]) is int  # a compact record of several spans
                records += expand(record, ids) if is_compact else [record]
            received += len(records)
            for start in range(0, len(records), EXPORT_BATCH):
                chunk = records[start : start + EXPORT_BATCH]
                exporter.export([readable_span(r, resource, scope) for r in chunk])
            continue
        spans: list[bytes] = []
        for record in batch:
            spans += encoder.spans(record, ids)
        received += len(spans)
        for start in range(0, len(spans), EXPORT_BATCH):
            chunk = spans[start : start + EXPORT_BATCH]
            payload = encoder.request_of(chunk)
            request = (
                SerializedRequest(payload)
                if serialized
                else ExportTraceServiceRequest.FromString(payload)
            )
            exporter.export(EncodedSpans(request, len(chunk)))
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
