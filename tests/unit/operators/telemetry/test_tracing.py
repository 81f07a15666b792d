"""Tracing setup from the standard OTEL_* variables: off means the stages run unwrapped,
the sampler is always parent-based, resources name the process and pod, and a missing
collector never hangs or crashes anything. Exports over OTLP/HTTP to a receiver in the
test that decodes the protobuf request."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace.sampling import ParentBased

from operators.telemetry import tracing
from operators.telemetry.tracing import Tracing, setup_tracing


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "BYTEWAX_", "KUBERNETES_", "POD_")):
            monkeypatch.delenv(name)


def stage(item: object) -> object:
    return item


def test_disabled_tracing_leaves_the_stages_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("OTEL_SDK_DISABLED", "true"), ("OTEL_TRACES_EXPORTER", "none")):
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            off = setup_tracing(flush_at_exit=False)
        assert not off.enabled
        assert tracing.traced_prepare(off, stage) is stage
        assert tracing.traced_infer(off, stage) is stage
        assert tracing.traced_source_error(off, stage) is stage
        assert tracing.send_tracer(off, "frames", "job") is None
        assert tracing.write_tracer(off, topic="out", store="sqlite") is None
    Tracing.disabled().flush()


def test_sampler_is_parent_based_whatever_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    sampler = tracing.parent_based_sampler()
    assert isinstance(sampler, ParentBased)
    assert "0.25" in sampler.get_description()


@pytest.mark.parametrize(
    ("name", "arg", "root"),
    [
        ("parentbased_traceidratio", "0.25", "TraceIdRatioBased{0.25}"),
        ("traceidratio", "0.5", "TraceIdRatioBased{0.5}"),
        ("parentbased_always_off", None, "AlwaysOffSampler"),
        ("always_on", None, "AlwaysOnSampler"),
        (None, None, "AlwaysOnSampler"),
        ("traceidratio", "lots", "TraceIdRatioBased{1.0}"),
        ("traceidratio", "2", "TraceIdRatioBased{1.0}"),
        ("jaeger_remote", None, "AlwaysOnSampler"),
    ],
)
def test_the_root_sampler_is_built_from_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, name: str | None, arg: str | None, root: str
) -> None:
    if name is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    description = tracing.parent_based_sampler().get_description()
    # Parent-based once, around the configured root: a frame's trace is whole or absent.
    assert description.count("ParentBased") == 1
    assert description.startswith(f"ParentBased{{root:LinkAware{{{root}}}")


def test_roots_are_sampled_at_the_configured_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    sampler = tracing.parent_based_sampler()
    kept = sum(
        sampler.should_sample(None, trace_id, "send frames").decision.is_sampled()
        for trace_id in range(0, 1 << 64, (1 << 64) // 1000)
    )
    assert 80 <= kept <= 120


def test_resource_names_service_process_and_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("BYTEWAX_POD_NAME", "streamsight-2")
    monkeypatch.setenv("BYTEWAX_STATEFULSET_NAME", "streamsight")
    monkeypatch.setenv("POD_NAMESPACE", "video")
    attributes = tracing.build_resource().attributes
    assert attributes["service.name"] == "streamsight"
    assert attributes["k8s.pod.name"] == "streamsight-2"
    assert attributes["k8s.namespace.name"] == "video"
    assert attributes["bytewax.process.id"] == "2"
    assert attributes["process.pid"] == os.getpid()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "video-eu")
    assert tracing.build_resource().attributes["service.name"] == "video-eu"


def test_missing_collector_neither_hangs_nor_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    traced = setup_tracing(flush_at_exit=False)
    hook = tracing.send_tracer(traced, "frames", "job")
    assert hook is not None
    from tools.camera import OutgoingFrame

    for seq in range(50):
        hook(OutgoingFrame("cam-0", seq, b"", time.time() * 1000))
    started = time.monotonic()
    traced.flush()
    assert time.monotonic() - started < 3.0
    assert traced.exported() == 0


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]]]:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.append(request)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_exports_over_otlp_http(monkeypatch: pytest.MonkeyPatch, http_receiver) -> None:
    url, received = http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{url}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=video")
    traced = setup_tracing(flush_at_exit=False)
    hook = tracing.send_tracer(traced, "frames", "job-http")
    assert hook is not None
    from tools.camera import OutgoingFrame

    carrier = hook(OutgoingFrame("cam-0", 7, b"", time.time() * 1000))
    assert carrier["traceparent"].startswith("00-") and "job.id=job-http" in carrier["baggage"]
    traced.flush()
    spans = [
        span
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [span.name for span in spans] == ["send frames"]
    attributes = {a.key: a.value for a in spans[0].attributes}
    assert attributes["job.id"].string_value == "job-http"
    assert attributes["messaging.destination.name"].string_value == "frames"
    assert spans[0].trace_id.hex() == carrier["traceparent"].split("-")[1]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "brotli"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
    ],
)
def test_a_bad_exporter_setting_fails_at_setup(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    # Refused here, in the flow's process, not later in the export process.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4317")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=value.split("/")[-1]):
        setup_tracing(flush_at_exit=False)
