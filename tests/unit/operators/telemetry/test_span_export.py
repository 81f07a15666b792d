"""The span export process and its encoder: records of the pipeline's spans encode, with
opentelemetry-proto's generated messages, to the very request the SDK's OTLP encoder
builds; spans recorded in this process arrive, all of them, at an exporter running in the
child process; and telemetry leaves the records that flow between stages as they are."""

from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import threading
import time
from collections import Counter
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HTTPSpanExporter,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from operators import dead_letters as dl
from operators import stages
from operators.frames import FrameBatch, FrameMeta, FrameResult, PreparedFrame, RawFrame
from operators.telemetry.span_export import (
    EncodingExporter,
    ExportProcess,
    OtlpGrpcExporter,
    RequestEncoder,
    RequestExporter,
    SpanRecord,
    environment_exporter,
    readable_span,
    span_record,
)
from operators.telemetry.tracing import (
    InferredSpans,
    PreparedSpans,
    SpanRecorder,
    Tracing,
    WrittenSpans,
    parent_based_sampler,
    send_tracer,
    setup_tracing,
    traced_infer,
    traced_prepare,
    write_tracer,
)
from tests.fixtures.otlp import OtlpServer, Receiver
from tools.camera import OutgoingFrame

ROOT = Path(__file__).resolve().parents[4]
COMPACT = (PreparedSpans, InferredSpans, WrittenSpans)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def raw_frames(tracing: Tracing, frames: int) -> list[RawFrame]:
    """`frames` messages as the camera sends them, each with its send span's context."""
    send = send_tracer(tracing, "frames", "job-1")
    assert send is not None
    now_ms = time.time() * 1000
    raws = []
    for seq in range(frames):
        carrier = send(OutgoingFrame("cam-0", seq, b"", now_ms))
        headers = tuple((k, v.encode()) for k, v in carrier.items())
        raws.append(
            RawFrame("frames", 0, seq, b"cam-0", b"x", headers, int(now_ms), time.time_ns())
        )
    return raws


def decode_stage(frames: int, made: list[Any] | None = None) -> Any:
    """A decode stage: a prepared frame per message (its carrier from the message's
    headers), the last one a dead letter; what it returns is kept in `made`."""

    def prepare(raw: RawFrame) -> PreparedFrame | object:
        if raw.offset == frames - 1:
            out: Any = dl.reject(raw, stage="decode", reason=dl.CORRUPT_IMAGE, detail="bad")
        else:
            carrier = {k: v.decode() for k, v in raw.headers}
            meta = FrameMeta(
                f"job-1/cam-0/{raw.offset}", "job-1", "cam-0", raw.offset, raw.topic, 0,
                raw.offset, time.time_ns(), raw.ingest_ns, "ab" * 32, 320, 240, carrier,
            )  # fmt: skip
            out = PreparedFrame(meta, np.zeros((2, 2, 3), np.uint8), time.time_ns())
        if made is not None:
            made.append(out)
        return out

    return prepare


def prepare_frames(
    tracing: Tracing, frames: int = 6, made: list[Any] | None = None
) -> list[PreparedFrame | Any]:
    """Send, ingest and preprocess `frames` frames (the last one a dead letter) through
    the tracing wrappers; the prepared frames and the dead letter."""
    prepare = traced_prepare(tracing, decode_stage(frames, made))
    return [prepare(raw) for raw in raw_frames(tracing, frames)]


def infer_stage(batch: FrameBatch) -> list[FrameResult]:
    done = time.time_ns()
    return [
        FrameResult(f.meta, (), "det", "1", "cpu", len(batch.frames), "size", 0, done, "b1")
        for f in batch.frames
    ]


def trace_frames(tracing: Tracing, frames: int = 6) -> list[FrameResult]:
    """Send, ingest, preprocess, batch, infer and write `frames` frames (the last one a
    dead letter) through the tracing wrappers; the results."""
    outs = prepare_frames(tracing, frames)
    good = tuple(o for o in outs if isinstance(o, PreparedFrame))
    now = time.time_ns()
    batch = FrameBatch("0", good, "size", now, now, "b1")
    results = traced_infer(tracing, infer_stage, {"streamsight.device": "cpu"})(batch)
    writes = write_tracer(tracing, topic="detections", store="sqlite")
    assert writes is not None
    with writes([*results, *(o for o in outs if not isinstance(o, PreparedFrame))]):
        pass
    return results


def test_each_sink_stage_names_its_own_write_spans() -> None:
    memory = InMemorySpanExporter()
    tracing = setup_tracing(exporter=memory, processor=SimpleSpanProcessor, flush_at_exit=False)
    outs = prepare_frames(tracing, 4)
    good = tuple(o for o in outs if isinstance(o, PreparedFrame))
    letters = [o for o in outs if not isinstance(o, PreparedFrame)]
    now = time.time_ns()
    results = traced_infer(tracing, infer_stage, {})(FrameBatch("0", good, "size", now, now, "b"))
    for stage, items in ((stages.SINK, results), (stages.DEAD_LETTER_SINK, letters)):
        writes = write_tracer(tracing, topic=f"to-{stage}", store="sqlite", stage=stage)
        assert writes is not None
        with writes(items):
            pass
    written = [s for s in memory.get_finished_spans() if s.name.startswith("sink write")]
    topics = {s.attributes["streamsight.stage"]: set() for s in written}
    for span in written:
        topics[span.attributes["streamsight.stage"]].add(
            span.attributes["messaging.destination.name"]
        )
    assert topics == {
        stages.SINK: {f"to-{stages.SINK}"},
        stages.DEAD_LETTER_SINK: {f"to-{stages.DEAD_LETTER_SINK}"},
    }


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
    encoder = RequestEncoder(resource, scope)
    expected = encode_spans(spans)
    for _ in range(2):  # the second time from the cache
        request = encoder.request(records)
        assert request == expected
        assert ExportTraceServiceRequest.FromString(request.SerializeToString()) == expected
    rebuilt: list[ReadableSpan] = [readable_span(r, resource, scope) for r in records]
    assert encode_spans(rebuilt) == expected


def test_an_encoder_with_a_full_cache_starts_over() -> None:
    memory = InMemorySpanExporter()
    tracing = setup_tracing(exporter=memory, processor=SimpleSpanProcessor, flush_at_exit=False)
    trace_frames(tracing)
    spans = list(memory.get_finished_spans())
    scope = spans[0].instrumentation_scope
    assert scope is not None
    encoder = RequestEncoder(spans[0].resource, scope, max_cached=4)
    assert encoder.request([span_record(s) for s in spans]) == encode_spans(spans)
    assert len(encoder._values) <= 4


def test_edge_values_encode_as_the_sdk_encoder_writes_them() -> None:
    # Long and short text, other text and other types, a trace state, and parents local
    # and remote.
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
    resource = Resource({"service.name": "edge", "ratio": 0.5, "tags": ("a", "b")})
    scope = InstrumentationScope("edge", "1", "https://example.com/schema")
    root = (1 << 127 | 5, 7, 1, "vendor=a", False)
    child = (root[0], 8, 1, "", False)
    remote = (root[0], 9, 1, "", True)
    records = [
        SpanRecord("root", 0, 10, 20, root, None, attributes, [], (0, None)),
        SpanRecord("child", 3, 11, 19, child, root, {"s": "b" * 130},
                   [(remote, {"id": "c" * 128})], (2, "failed: " + "d" * 200)),
        SpanRecord("remote child", 4, 12, 18, (root[0], 10, 1, "vendor=b", False), remote, {},
                   [], (1, None)),
    ]  # fmt: skip
    spans = [readable_span(r, resource, scope) for r in records]
    encoder = RequestEncoder(resource, scope)
    for _ in range(2):  # the second time from the cache
        assert encoder.request(records) == encode_spans(spans)


class PipedRecords:
    """Keeps what the recorder hands to an export process."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def on_record(self, record: Any) -> None:
        self.records.append(record)

    def on_end(self, span: ReadableSpan) -> None:
        raise AssertionError("an export process gets records, not SDK spans")


def piped_tracing() -> tuple[Tracing, PipedRecords]:
    """Tracing whose spans are kept as the export process would receive them."""
    provider = TracerProvider(sampler=parent_based_sampler(), shutdown_on_exit=False)
    piped = PipedRecords()
    recorder = SpanRecorder(provider, piped)  # type: ignore[arg-type]
    return Tracing(True, provider.get_tracer("test"), provider, recorder=recorder), piped


def _described(name: str, kind: int, attributes: Any, code: int) -> tuple[Any, ...]:
    return name, kind, frozenset(dict(attributes).items()), code


def test_a_frame_is_piped_as_one_record_per_stage_that_expands_to_its_spans() -> None:
    tracing, piped = piped_tracing()
    trace_frames(tracing, frames=40)
    # 40 sends, 39 prepared frames, the dead letter's ingest and preprocess spans, the
    # inference batch span, its frames' wait and inference spans, the sink's write batch.
    assert len(piped.records) == 40 + 39 + 2 + 1 + 1 + 1
    ids = RandomIdGenerator()
    spans = [s for r in piped.records for s in r.spans(ids)]
    assert len(spans) == 240
    assert len({span.context[1] for span in spans}) == 240  # every span has its own id
    by_id = {span.context[1]: span for span in spans}
    for span in spans:
        parent = span.parent
        if parent is not None and parent[1] in by_id:
            assert span.context[0] == parent[0]  # a child is in its parent's trace
    # Records travel to the export process as pickles.
    assert [r.spans for r in pickle.loads(pickle.dumps(piped.records))]

    memory = InMemorySpanExporter()
    in_process = setup_tracing(exporter=memory, processor=SimpleSpanProcessor, flush_at_exit=False)
    trace_frames(in_process, frames=40)
    expected = Counter(
        _described(s.name, s.kind.value, s.attributes, s.status.status_code.value)
        for s in memory.get_finished_spans()
    )
    assert Counter(_described(s.name, s.kind, s.attributes, s.status[0]) for s in spans) == (
        expected
    )


def test_a_frames_ingest_and_preprocess_spans_are_written_when_it_is_decoded() -> None:
    tracing, piped = piped_tracing()
    outs = prepare_frames(tracing, frames=5)
    good = tuple(o for o in outs if isinstance(o, PreparedFrame))
    sent = {r.context[1] for r in piped.records if isinstance(r, SpanRecord)}
    prepared = [r for r in piped.records if isinstance(r, PreparedSpans)]
    assert len(good) == 4 and len(prepared) == 4
    assert {r.parent[1] for r in prepared if r.parent} < sent  # each its send's child
    for frame, record in zip(good, prepared, strict=True):
        ingest = record.ingest
        assert record.frame_id == frame.meta.frame_id
        assert frame.meta.trace_carrier["traceparent"] == (
            f"00-{ingest[0]:032x}-{ingest[1]:016x}-01"
        )
    # The dead letter's spans are records of their own, with its error.
    letter = [r for r in piped.records if isinstance(r, SpanRecord) and r.name != "send frames"]
    assert [r.name for r in letter] == ["process frames", "preprocess"]
    assert letter[1].status[0] == 2

    now = time.time_ns()
    batch = FrameBatch("0", good, "size", now, now, "b1")
    traced_infer(tracing, infer_stage)(batch)
    inferred = next(r for r in piped.records if isinstance(r, InferredSpans))
    assert [f.parent[1] for f in inferred.frames] == [r.ingest[1] for r in prepared]
    assert len([r for r in piped.records if isinstance(r, PreparedSpans)]) == 4


def test_telemetry_leaves_the_stages_records_as_they_are() -> None:
    # The records a stage makes are frozen and shared: tracing makes new ones, with the
    # ingest span's context in their carrier, and never changes those it is given.
    tracing, _ = piped_tracing()
    made: list[Any] = []
    outs = prepare_frames(tracing, frames=4, made=made)
    carriers = [dict(m.meta.trace_carrier) for m in made if isinstance(m, PreparedFrame)]
    assert [o is m for o, m in zip(outs, made, strict=True)] == [False] * 4
    for original, out in zip(made, outs, strict=True):
        if isinstance(original, PreparedFrame):
            assert out.meta.trace_carrier != original.meta.trace_carrier
            assert (out.pixels is original.pixels) and out.meta.frame_id == original.meta.frame_id
            assert [f.name for f in type(out).__dataclass_fields__.values()] == [
                "meta",
                "pixels",
                "prepared_ns",
            ]
        else:
            assert out.trace_carrier and not original.trace_carrier
    good = tuple(o for o in outs if isinstance(o, PreparedFrame))
    given = [dict(f.meta.trace_carrier) for f in good]
    now = time.time_ns()
    results = traced_infer(tracing, infer_stage)(FrameBatch("0", good, "size", now, now, "b1"))
    writes = write_tracer(tracing, topic="detections", store="sqlite")
    assert writes is not None
    with writes(results) as batch:
        batch.failed(results[0], "conflict", "x")
    assert [dict(f.meta.trace_carrier) for f in good] == given
    assert [dict(r.meta.trace_carrier) for r in results] == given
    assert [dict(m.meta.trace_carrier) for m in made if isinstance(m, PreparedFrame)] == carriers


def test_a_frame_its_producer_did_not_sample_is_passed_on_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    tracing, piped = piped_tracing()
    made: list[Any] = []
    outs = prepare_frames(tracing, frames=4, made=made)
    # Nothing to record and nothing to copy: the frame keeps the producer's carrier.
    assert [o is m for o, m in zip(outs, made, strict=True)] == [True, True, True, False]
    trace_ids = {o.meta.trace_carrier["traceparent"].split("-")[1] for o in outs[:3]}
    assert all(o.meta.trace_carrier["traceparent"].endswith("-00") for o in outs[:3])
    now = time.time_ns()
    good = tuple(outs[:3])
    results = traced_infer(tracing, infer_stage)(FrameBatch("0", good, "size", now, now, "b1"))
    writes = write_tracer(tracing, topic="detections", store="sqlite")
    assert writes is not None
    with writes([*results, outs[3]]) as batch:
        carriers = [batch.carrier(r) for r in results]
    assert piped.records == []  # not one span, whole traces dropped
    # Output messages go on in the producer's trace, not sampled.
    assert {c["traceparent"].split("-")[1] for c in carriers} == trace_ids
    assert all(c["traceparent"].endswith("-00") for c in carriers)


def test_a_frame_restored_from_a_snapshot_is_inferred_under_its_carrier() -> None:
    tracing, piped = piped_tracing()
    # Its carrier holds its ingest span's context, written when it was decoded.
    carrier = {"traceparent": f"00-{7:032x}-{11:016x}-01"}
    meta = FrameMeta(
        "job-1/cam-0/0", "job-1", "cam-0", 0, "frames", 0, 0, 0, 0, "ab" * 32, 2, 2, carrier
    )
    fresh = PreparedFrame(meta, np.zeros((2, 2, 3), np.uint8), time.time_ns())
    restored = pickle.loads(pickle.dumps(fresh))
    # A snapshot taken while frames kept their pending spans holds a fourth value.
    older = PreparedFrame.__new__(PreparedFrame)
    older.__setstate__([*fresh.__getstate__(), ("headers", 0, 1, 2, 3)])  # type: ignore[attr-defined]
    for frame in (restored, older):
        assert frame.meta == fresh.meta and frame.prepared_ns == fresh.prepared_ns
        assert pickle.loads(pickle.dumps(frame)).meta == fresh.meta  # snapshotted again

    def infer(batch: FrameBatch) -> list[FrameResult]:
        return [
            FrameResult(f.meta, (), "det", "1", "cpu", 1, "size", 0, 1, "b1") for f in batch.frames
        ]

    now = time.time_ns()
    results = traced_infer(tracing, infer)(FrameBatch("0", (older,), "size", now, now, "b1"))
    assert [r.meta.frame_id for r in results] == ["job-1/cam-0/0"]
    assert not [r for r in piped.records if isinstance(r, PreparedSpans)]
    assert [type(r) for r in piped.records] == [SpanRecord, InferredSpans]
    assert piped.records[0].name == "inference batch"
    assert [f.parent[:2] for f in piped.records[1].frames] == [(7, 11)]  # under its ingest


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


def test_otlp_over_grpc_sends_requests_and_anything_else_gets_sdk_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    grpc_exporter = environment_exporter()
    assert isinstance(grpc_exporter.inner, OtlpGrpcExporter)
    grpc_exporter.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert isinstance(environment_exporter().inner, HTTPSpanExporter)
    assert isinstance(EncodingExporter(), RequestExporter)
    assert not isinstance(InMemorySpanExporter(), RequestExporter)
    encoded = EncodingExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(encoded))
    with provider.get_tracer("test").start_as_current_span("one"):
        pass
    assert encoded.spans == 1 and encoded.bytes > 0  # SDK spans, by the SDK's encoder


class Metadata(Receiver):
    """A receiver that also keeps each request's metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata: list[dict[str, str]] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.metadata.append(dict(context.invocation_metadata()))
        return super().Export(request, context)


def test_the_grpc_exporter_reads_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    receiver = Metadata()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        # No scheme: TLS unless told otherwise, as the SDK's exporter reads it.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=video,api-key=s3")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "3")
        exporter = OtlpGrpcExporter()
        assert exporter.timeout_s == 3.0
        resource, scope = Resource({"service.name": "grpc"}), InstrumentationScope("test")
        record = SpanRecord("one", 0, 1, 2, (5, 6, 1, "", False), None, {"a": 1}, [], (0, None))
        request = RequestEncoder(resource, scope).request([record])
        assert exporter.export_request(request).name == "SUCCESS"
        exporter.shutdown()
    finally:
        server.stop(grace=None)
    assert [s.name for s in receiver.snapshot()] == ["one"]
    assert receiver.metadata[0]["x-tenant"] == "video"
    assert receiver.metadata[0]["api-key"] == "s3"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "brotli")  # read, refused
    with pytest.raises(Exception, match="brotli"):
        OtlpGrpcExporter()


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
    tracing, piped = piped_tracing()
    tracing.consumer_group = "detectors"
    results = trace_frames(tracing, frames=12)  # its write batch has a dead letter
    writes = write_tracer(tracing, topic="detections", store="sqlite")
    assert writes is not None
    with writes(results[:5]) as batch:  # results only, one of them already stored
        batch.skipped(results[0])
    with pytest.raises(RuntimeError), writes(results[5:]):  # a failed write batch
        raise RuntimeError("store down")
    seen = Counter(type(r) for r in piped.records)
    assert seen == {SpanRecord: 15, PreparedSpans: 11, InferredSpans: 1, WrittenSpans: 3}

    resource = Resource({"service.name": "test"})
    scope = InstrumentationScope("test")
    encoder = RequestEncoder(resource, scope)
    direct, expanded = CountingIds(), CountingIds()
    for record in [*piped.records, *piped.records]:  # the second time from the cache
        spans = record.spans(expanded)
        assert spans == record.spans(direct)  # the same ids, the same spans
        sdk = [readable_span(s, resource, scope) for s in spans]
        assert encoder.request(spans) == encode_spans(sdk)
    assert direct.last == expanded.last > 0


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


def _own_private_names(paths: list[Path]) -> set[str]:
    """The `_names` the project's own classes define (`self._x = ...`, class fields)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            mine = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            if mine and isinstance(node.ctx, ast.Store) and node.value.id in ("self", "cls"):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.FunctionDef):
                names.add(node.name)
    return {name for name in names if name.startswith("_")}


def _module_names(tree: ast.Module) -> set[str]:
    """Names bound to modules in `tree`: imported ones, and those taken from `sys.modules`."""
    names = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and "sys.modules" in ast.unparse(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_the_flow_uses_public_opentelemetry_apis_only() -> None:
    # No private module or name of OpenTelemetry is imported, no private attribute of a
    # library object is read or replaced, and no frozen record is changed in place.
    sources = sorted([*ROOT.glob("operators/**/*.py"), *ROOT.glob("flows/*.py")])
    own = _own_private_names(sources + sorted(ROOT.glob("tools/*.py")))
    problems: list[str] = []
    for path in sources:
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text())
        modules_here = _module_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    owner = target.value if isinstance(target, ast.Attribute) else None
                    if isinstance(owner, ast.Name) and owner.id in modules_here:
                        problems.append(f"{where}:{node.lineno} replaces {owner.id}.{target.attr}")
            modules: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[0] == "opentelemetry" and any(p.startswith("_") for p in parts):
                    problems.append(f"{where}:{node.lineno} imports {module}")
            # (confluent-kafka's local error codes, `KafkaError._TRANSPORT`, are public)
            if isinstance(node, ast.Attribute) and node.attr[:2].islower() and node.attr[0] == "_":
                owner = node.value.id if isinstance(node.value, ast.Name) else ""
                dunder = node.attr.startswith("__")
                if owner not in ("self", "cls", "os") and not dunder and node.attr not in own:
                    problems.append(f"{where}:{node.lineno} uses .{node.attr}")
            if isinstance(node, ast.Call):
                func = node.func
                setter = isinstance(func, ast.Name) and func.id == "setattr"
                setter |= isinstance(func, ast.Attribute) and func.attr == "__setattr__"
                first = node.args[0] if node.args else None
                if setter and not (isinstance(first, ast.Name) and first.id == "self"):
                    problems.append(f"{where}:{node.lineno} sets an attribute of another object")
                getter = isinstance(func, ast.Name) and func.id in ("getattr", "hasattr")
                name = node.args[1] if getter and len(node.args) > 1 else None
                text = str(name.value) if isinstance(name, ast.Constant) else ""
                if text[:1] == "_" and text[:2].islower() and text not in own:
                    problems.append(f"{where}:{node.lineno} reads {text}")
    assert problems == [], problems


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_grpc_exporter_sends_over_tls_with_the_configured_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, cert = _certificate(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    receiver = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    record = SpanRecord("tls", 0, 1, 2, (5, 6, 1, "", False), None, {}, [], (0, None))
    request = RequestEncoder(Resource({}), InstrumentationScope("test")).request([record])
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"https://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5")
        untrusted = OtlpGrpcExporter()  # the system's CAs: the certificate is refused
        assert untrusted.export_request(request).name == "FAILURE"
        untrusted.shutdown()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(cert))
        trusted = OtlpGrpcExporter()
        assert trusted.export_request(request).name == "SUCCESS"
        trusted.shutdown()
    finally:
        server.stop(grace=None)
    assert [s.name for s in receiver.snapshot()] == ["tls"]
