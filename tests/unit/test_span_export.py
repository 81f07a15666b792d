"""The span export process and its encoder: records of the pipeline's spans encode to the
very request the SDK's OTLP encoder builds, and spans recorded in this process arrive,
all of them, at an exporter running in the child process."""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from operators import dead_letters as dl
from operators.frames import FrameBatch, FrameMeta, FrameResult, PreparedFrame, RawFrame
from operators.telemetry.span_export import (
    EncodedSpans,
    EncodingExporter,
    ExportProcess,
    RecordEncoder,
    SerializedTraceStub,
    accept_encoded_spans,
    readable_span,
    sends_serialized,
    span_record,
)
from operators.telemetry.tracing import (
    INFERRED,
    PREPARED,
    WRITTEN,
    SpanRecorder,
    Tracing,
    expand,
    parent_based_sampler,
    send_tracer,
    setup_tracing,
    traced_infer,
    traced_prepare,
    write_tracer,
)
from tests.fixtures.otlp import OtlpServer
from tools.camera import OutgoingFrame


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def prepare_frames(tracing: Tracing, frames: int = 6) -> list[PreparedFrame | Any]:
    """Send, ingest and preprocess `frames` frames (the last one a dead letter) through
    the tracing wrappers; the prepared frames and the dead letter."""
    send = send_tracer(tracing, "frames", "job-1")
    assert send is not None
    now_ms = time.time() * 1000

    def prepare(raw: RawFrame) -> PreparedFrame | object:
        if raw.offset == frames - 1:
            return dl.reject(raw, stage="decode", reason=dl.CORRUPT_IMAGE, detail="bad")
        meta = FrameMeta(
            f"job-1/cam-0/{raw.offset}", "job-1", "cam-0", raw.offset, raw.topic, 0,
            raw.offset, time.time_ns(), raw.ingest_ns, "ab" * 32, 320, 240,
        )  # fmt: skip
        return PreparedFrame(meta, np.zeros((2, 2, 3), np.uint8), time.time_ns())

    raws = []
    for seq in range(frames):
        carrier = send(OutgoingFrame("cam-0", seq, b"", now_ms))
        headers = tuple((k, v.encode()) for k, v in carrier.items())
        raws.append(
            RawFrame("frames", 0, seq, b"cam-0", b"x", headers, int(now_ms), time.time_ns())
        )
    return [traced_prepare(tracing, prepare)(raw) for raw in raws]  # type: ignore[arg-type]


def trace_frames(tracing: Tracing, frames: int = 6) -> list[FrameResult]:
    """Send, ingest, preprocess, batch, infer and write `frames` frames (the last one a
    dead letter) through the tracing wrappers; the results."""
    outs = prepare_frames(tracing, frames)
    good = tuple(o for o in outs if isinstance(o, PreparedFrame))

    def infer(batch: FrameBatch) -> list[FrameResult]:
        done = time.time_ns()
        return [
            FrameResult(f.meta, (), "det", "1", "cpu", len(batch.frames), "size", 0, done, "b1")
            for f in batch.frames
        ]

    now = time.time_ns()
    batch = FrameBatch("0", good, "size", now, now, "b1")
    results = traced_infer(tracing, infer, {"streamsight.device": "cpu"})(batch)
    writes = write_tracer(tracing, topic="detections", store="sqlite")
    assert writes is not None
    with writes([*results, *(o for o in outs if not isinstance(o, PreparedFrame))]):
        pass
    return results


def test_records_encode_to_the_sdk_encoders_request() -> None:
    memory = InMemorySpanExporter()
    tracing = setup_tracing(exporter=memory, processor=SimpleSpanProcessor, flush_at_exit=False)
    trace_frames(tracing)
    spans = list(memory.get_finished_spans())
    kinds = {span.name for span in spans}
    assert {"preprocess", "batch wait", "inference", "inference batch", "sink write"} <= kinds
    assert any(span.links for span in spans) and any(not span.status.is_ok for span in spans)
    assert any(span.parent is not None and span.parent.is_remote for span in spans)

    records = [span_record(span) for span in spans]
    resource, scope = spans[0].resource, spans[0].instrumentation_scope
    assert scope is not None
    encoder = RecordEncoder(resource, scope)
    expected = encode_spans(spans)
    for _ in range(2):  # the second time from the cache
        assert encoder.encode(records) == expected.SerializeToString(deterministic=True)
        assert encoder.request(records) == expected
    rebuilt: list[ReadableSpan] = [readable_span(r, resource, scope) for r in records]
    assert encode_spans(rebuilt) == expected


def test_an_encoder_with_a_full_cache_starts_over() -> None:
    memory = InMemorySpanExporter()
    tracing = setup_tracing(exporter=memory, processor=SimpleSpanProcessor, flush_at_exit=False)
    trace_frames(tracing)
    spans = list(memory.get_finished_spans())
    scope = spans[0].instrumentation_scope
    assert scope is not None
    encoder = RecordEncoder(spans[0].resource, scope, max_cached=4)
    assert encoder.request([span_record(s) for s in spans]) == encode_spans(spans)
    assert len(encoder._cache) <= 4


def test_edge_values_encode_as_the_sdk_encoder_writes_them() -> None:
    # Lengths on both sides of a varint's byte boundaries, other text and other types,
    # a trace state, and parents local and remote.
    attributes = {
        "empty": "",
        "a127": "a" * 127,
        "a128": "a" * 128,
        "long": "x" * 16_400,
        "text": "caméra 東京",
        "": "no key",
        "zero": 0,
        "negative": -1,
        "largest": (1 << 63) - 1,
        "yes": True,
        "ratio": 0.25,
        "k" * 200: "a long key",
    }
    resource = Resource({"service.name": "edge"})
    scope = InstrumentationScope("edge", "1")
    root = (1 << 127 | 5, 7, 1, "vendor=a", False)
    child = (root[0], 8, 1, "", False)
    remote = (root[0], 9, 1, "", True)
    records = [
        ("root", 0, 10, 20, root, None, attributes, [], (0, None)),
        ("child", 3, 11, 19, child, root, {"s": "b" * 130}, [(remote, {"id": "c" * 128})],
         (2, "failed: " + "d" * 200)),
        ("remote child", 4, 12, 18, (root[0], 10, 1, "vendor=b", False), remote, {}, [],
         (1, None)),
    ]  # fmt: skip
    spans = [readable_span(r, resource, scope) for r in records]
    encoder = RecordEncoder(resource, scope)
    for _ in range(2):  # the second time from the cache
        assert encoder.encode(records) == encode_spans(spans).SerializeToString(deterministic=True)


class PipedRecords:
    """Keeps what the recorder hands to an export process."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []

    def on_record(self, record: tuple[Any, ...]) -> None:
        self.records.append(record)

    def on_end(self, span: ReadableSpan) -> None:
        raise AssertionError("an export process gets records, not SDK spans")


def _described(name: str, kind: int, attributes: Any, code: int) -> tuple[Any, ...]:
    return name, kind, frozenset(dict(attributes).items()), code


def test_a_frame_is_piped_as_one_record_per_stage_that_expands_to_its_spans() -> None:
    provider = TracerProvider(sampler=parent_based_sampler(), shutdown_on_exit=False)
    piped = PipedRecords()
    recorder = SpanRecorder(provider, piped)  # type: ignore[arg-type]
    tracing = Tracing(True, provider.get_tracer("test"), provider, recorder=recorder)
    trace_frames(tracing, frames=40)
    # 40 sends, 39 prepared frames, the dead letter's ingest and preprocess spans, the
    # inference batch span, its frames' wait and inference spans, the sink's write batch.
    assert len(piped.records) == 40 + 39 + 2 + 1 + 1 + 1
    ids = RandomIdGenerator()
    spans = [s for r in piped.records for s in (expand(r, ids) if r[0] in (1, 2, 3) else [r])]
    assert len(spans) == 240
    assert len({span[4][1] for span in spans}) == 240  # every span has its own id
    by_id = {span[4][1]: span for span in spans}
    for span in spans:
        parent = span[5]
        if parent is not None and parent[1] in by_id:
            assert span[4][0] == parent[0]  # a child is in its parent's trace

    memory = InMemorySpanExporter()
    in_process = setup_tracing(exporter=memory, processor=SimpleSpanProcessor, flush_at_exit=False)
    trace_frames(in_process, frames=40)
    expected = Counter(
        _described(s.name, s.kind.value, s.attributes, s.status.status_code.value)
        for s in memory.get_finished_spans()
    )
    assert Counter(_described(s[0], s[1], s[6], s[8][0]) for s in spans) == expected


def test_a_frames_ingest_and_preprocess_spans_are_written_once_with_its_batch() -> None:
    provider = TracerProvider(sampler=parent_based_sampler(), shutdown_on_exit=False)
    piped = PipedRecords()
    recorder = SpanRecorder(provider, piped)  # type: ignore[arg-type]
    tracing = Tracing(True, provider.get_tracer("test"), provider, recorder=recorder)
    outs = prepare_frames(tracing, frames=5)
    good = tuple(o for o in outs if isinstance(o, PreparedFrame))
    sent = {r[4][1] for r in piped.records if r[0] == "send frames"}
    # Decoding leaves them on the frame; the dead letter gets its spans at once.
    assert not [r for r in piped.records if r[0] == PREPARED]
    assert [r[0] for r in piped.records if r[0] not in ("send frames",)] == [
        "process frames",
        "preprocess",
    ]
    assert len(good) == 4 and all(f.pending_spans is not None for f in good)
    camera_carriers = [dict(f.meta.trace_carrier) for f in good]

    def infer(batch: FrameBatch) -> list[FrameResult]:
        return [
            FrameResult(f.meta, (), "det", "1", "cpu", 4, "size", 0, time.time_ns(), "b1")
            for f in batch.frames
        ]

    now = time.time_ns()
    batch = FrameBatch("0", good, "size", now, now, "b1")
    run = traced_infer(tracing, infer)
    run(batch)
    prepared = [r for r in piped.records if r[0] == PREPARED]
    assert len(prepared) == 4 and all(f.pending_spans is None for f in good)
    parents = {r[2][1] for r in prepared}
    assert len(parents) == 4 and parents < sent  # each ingest span is its send's child
    for frame, record, before in zip(good, prepared, camera_carriers, strict=True):
        ingest = record[1]
        assert record[14] == frame.meta.frame_id
        assert frame.meta.trace_carrier["traceparent"] == (
            f"00-{ingest[0]:032x}-{ingest[1]:016x}-01"
        )
        assert frame.meta.trace_carrier != before
    inferred = next(r for r in piped.records if r[0] == INFERRED)
    assert [f[0][1] for f in inferred[6]] == [r[1][1] for r in prepared]  # their parents
    run(batch)  # the same frames again: their ingest spans are not written twice
    assert len([r for r in piped.records if r[0] == PREPARED]) == 4


def test_a_frame_restored_from_a_snapshot_without_pending_spans_is_inferred() -> None:
    provider = TracerProvider(sampler=parent_based_sampler(), shutdown_on_exit=False)
    piped = PipedRecords()
    recorder = SpanRecorder(provider, piped)  # type: ignore[arg-type]
    tracing = Tracing(True, provider.get_tracer("test"), provider, recorder=recorder)
    # Its carrier holds its ingest span's context, written when it was decoded.
    carrier = {"traceparent": f"00-{7:032x}-{11:016x}-01"}
    meta = FrameMeta(
        "job-1/cam-0/0", "job-1", "cam-0", 0, "frames", 0, 0, 0, 0, "ab" * 32, 2, 2, carrier
    )
    fresh = PreparedFrame(meta, np.zeros((2, 2, 3), np.uint8), time.time_ns())
    # The state a snapshot held before frames kept their spans: three fields.
    restored = PreparedFrame.__new__(PreparedFrame)
    restored.__setstate__(fresh.__getstate__()[:3])  # type: ignore[attr-defined]
    again = pickle.loads(pickle.dumps(restored))  # and is snapshotted again
    assert restored.pending_spans is None and again.pending_spans is None
    assert again.meta == fresh.meta and again.prepared_ns == fresh.prepared_ns

    def infer(batch: FrameBatch) -> list[FrameResult]:
        return [
            FrameResult(f.meta, (), "det", "1", "cpu", 1, "size", 0, 1, "b1") for f in batch.frames
        ]

    now = time.time_ns()
    results = traced_infer(tracing, infer)(FrameBatch("0", (restored,), "size", now, now, "b1"))
    assert [r.meta.frame_id for r in results] == ["job-1/cam-0/0"]
    assert not [r for r in piped.records if r[0] == PREPARED]
    assert [r[0] for r in piped.records] == ["inference batch", INFERRED]
    assert [f[0][:2] for f in piped.records[1][6]] == [(7, 11)]  # under its ingest span
    assert meta.trace_carrier == {"traceparent": f"00-{7:032x}-{11:016x}-01"}


def export_40_frames(make_exporter: Any = None) -> Tracing:
    """Trace 40 frames through an export process (its exporter from `make_exporter`, else
    from the environment) and check that it exported all their spans: 40 sends, 40
    ingests, 40 preprocess, 39 x (wait, inference, sink write), 1 dead letter's sink
    write, the inference batch and the sink write batch."""
    tracing = setup_tracing(make_exporter=make_exporter, flush_at_exit=False)
    assert isinstance(tracing.processor, ExportProcess)
    assert tracing.wait_ready(timeout_s=30)
    trace_frames(tracing, frames=40)
    tracing.flush()
    assert tracing.processor.stats == {"received": 240, "exported": 240, "failures": 0}
    return tracing


def test_the_export_process_exports_every_span() -> None:
    tracing = export_40_frames(EncodingExporter)
    assert tracing.exported() == 240
    assert isinstance(tracing.processor, ExportProcess)
    assert tracing.processor.process.poll() == 0


def test_only_otlp_exporters_and_those_that_say_so_get_encoded_requests() -> None:
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http

    assert accept_encoded_spans(EncodingExporter())
    assert not accept_encoded_spans(InMemorySpanExporter())
    assert accept_encoded_spans(http.OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces"))
    request = ExportTraceServiceRequest()
    assert http.encode_spans(EncodedSpans(request, 0)) is request


class CountingIds:
    """Span and trace ids in sequence: two of these make the same ids."""

    def __init__(self) -> None:
        self.last = 0

    def generate_span_id(self) -> int:
        self.last += 1
        return self.last

    def generate_trace_id(self) -> int:
        self.last += 1
        return self.last << 64 | 0xABC


def test_compact_records_encode_as_the_spans_they_expand_to() -> None:
    provider = TracerProvider(sampler=parent_based_sampler(), shutdown_on_exit=False)
    piped = PipedRecords()
    recorder = SpanRecorder(provider, piped)  # type: ignore[arg-type]
    tracing = Tracing(True, provider.get_tracer("test"), provider, recorder=recorder)
    tracing.consumer_group = "detectors"
    results = trace_frames(tracing, frames=12)  # its write batch has a dead letter
    writes = write_tracer(tracing, topic="detections", store="sqlite")
    assert writes is not None
    with writes(results[:5]) as batch:  # results only, one of them already stored
        batch.skipped(results[0])
    with pytest.raises(RuntimeError), writes(results[5:]):  # a failed write batch
        raise RuntimeError("store down")
    seen = Counter(r[0] if isinstance(r[0], int) else "span" for r in piped.records)
    assert seen == {"span": 15, PREPARED: 11, INFERRED: 1, WRITTEN: 3}

    resource = Resource({"service.name": "test"})
    encoder = RecordEncoder(resource, InstrumentationScope("test"))
    direct, expanded = CountingIds(), CountingIds()
    for record in [*piped.records, *piped.records]:  # the second time from the cache
        spans = expand(record, expanded) if isinstance(record[0], int) else [record]
        assert encoder.request_of(encoder.spans(record, direct)) == encoder.encode(spans)
    assert direct.last == expanded.last > 0


def test_otlp_exporters_are_handed_serialised_requests() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http

    grpc_exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9", insecure=True)
    assert sends_serialized(grpc_exporter)
    assert isinstance(grpc_exporter._client, SerializedTraceStub)
    assert sends_serialized(http.OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces"))
    assert sends_serialized(EncodingExporter())
    assert not sends_serialized(InMemorySpanExporter())
    grpc_exporter.shutdown()


def test_the_export_process_sends_over_grpc(
    otlp_receiver: OtlpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    export_40_frames()
    spans = otlp_receiver.receiver.wait_for(240)
    assert len(spans) == 240
    names = Counter(span.name for span in spans)
    assert names["preprocess"] == names["sink write"] == 40  # the dead letter's too
    assert names["inference"] == 39
    frame_ids = {span.attributes.get("streamsight.frame.id") for span in spans}
    assert "job-1/cam-0/38" in frame_ids


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    """Receives OTLP/HTTP trace requests and keeps them decoded."""

    requests: ClassVar[list[ExportTraceServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append(ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(b"")

    def log_message(self, *args: Any) -> None:
        pass


def test_the_export_process_sends_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    _OtlpHttpHandler.requests.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpHttpHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        export_40_frames()
    finally:
        server.shutdown()
    spans = [
        span
        for request in _OtlpHttpHandler.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert len(spans) == 240
    assert Counter(span.name for span in spans)["batch wait"] == 39


def test_a_failed_export_process_is_never_ready() -> None:
    traced = setup_tracing(exporter=InMemorySpanExporter(), flush_at_exit=False)
    assert traced.provider is not None
    processor = ExportProcess(traced.provider.resource, make_exporter=_no_exporter)
    assert not processor.wait_ready(timeout_s=30)
    processor.shutdown(timeout_s=10)
    assert processor.stats is None


def test_the_export_process_runs_on_one_thread() -> None:
    # numpy's math library would start a thread pool that spins for tens of milliseconds
    # of CPU once the process is ready, while the flow's workers run
    processor = ExportProcess(Resource.create({}), make_exporter=EncodingExporter)
    try:
        assert processor.wait_ready(timeout_s=30)
        assert len(os.listdir(f"/proc/{processor.process.pid}/task")) == 1
    finally:
        processor.shutdown(timeout_s=10)
    assert processor.stats == {"received": 0, "exported": 0, "failures": 0}


def _no_exporter() -> EncodingExporter:
    raise RuntimeError("no exporter here")


def test_the_export_process_ends_when_its_parent_stops_writing() -> None:
    traced = setup_tracing(exporter=InMemorySpanExporter(), flush_at_exit=False)
    assert traced.provider is not None
    processor = ExportProcess(traced.provider.resource)
    assert processor.process.poll() is None
    processor.shutdown(timeout_s=10)
    assert processor.process.poll() == 0
    assert processor.stats is not None and processor.stats["received"] == 0


def test_a_dead_export_process_drops_spans_without_stopping_the_flow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracing = setup_tracing(make_exporter=EncodingExporter, flush_at_exit=False)
    assert isinstance(tracing.processor, ExportProcess)
    tracing.processor.process.kill()
    tracing.processor.process.wait(5)
    for _ in range(5):  # more than one batch of 256 records: the pipe write fails
        trace_frames(tracing, frames=20)
        tracing.processor.force_flush()
        time.sleep(0.05)
    started = time.monotonic()
    tracing.flush()
    assert time.monotonic() - started < 7.0
    assert tracing.exported() is None
    assert "span export process stopped" in caplog.text
