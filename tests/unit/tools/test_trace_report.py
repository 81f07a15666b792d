"""`python -m tools.trace_report` against recorded Jaeger query API responses.

No Jaeger binary can run here, so the responses are recorded from the project's own spans:
the traced dataflow runs on Bytewax's TestingSource with an in-memory exporter, and the
spans are written in the JSON model Jaeger's `/api/traces` returns (trace ID, span ID,
operation name, CHILD_OF references, microsecond start and duration, tags, with `error`
and `otel.status_code` for error status, as Jaeger renders OTLP spans). A local HTTP
server answers the command's query with that recording."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.testing import TestingSource, run_main
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from flows.pipeline import build_flow
from flows.settings import Settings
from operators import contract, stages
from operators.detector import load_detector
from operators.inference import Inferencer
from operators.sinks import DeadLetterSink, ResultSink
from operators.telemetry.tracing import send_tracer, setup_tracing, write_tracer
from tools import trace_report as traces
from tools.camera import OutgoingFrame
from tools.scene import encode_jpeg, render_frame

JOB = "job-explore"


def jaeger_response(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """Spans in the JSON model of Jaeger's `/api/traces`."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        trace_id = f"{span.context.trace_id:032x}"
        tags = [
            {"key": k, "type": type(v).__name__, "value": v}
            for k, v in (span.attributes or {}).items()
        ]
        tags.append({"key": "span.kind", "type": "string", "value": span.kind.name.lower()})
        if span.status.status_code is StatusCode.ERROR:
            tags.append({"key": "error", "type": "bool", "value": True})
            tags.append({"key": "otel.status_code", "type": "string", "value": "ERROR"})
        refs = []
        if span.parent is not None:
            refs.append(
                {
                    "refType": "CHILD_OF",
                    "traceID": f"{span.parent.trace_id:032x}",
                    "spanID": f"{span.parent.span_id:016x}",
                }
            )
        for link in span.links:
            refs.append(
                {
                    "refType": "FOLLOWS_FROM",
                    "traceID": f"{link.context.trace_id:032x}",
                    "spanID": f"{link.context.span_id:016x}",
                }
            )
        grouped[trace_id].append(
            {
                "traceID": trace_id,
                "spanID": f"{span.context.span_id:016x}",
                "operationName": span.name,
                "references": refs,
                "startTime": (span.start_time or 0) // 1000,
                "duration": ((span.end_time or 0) - (span.start_time or 0)) // 1000,
                "tags": tags,
                "logs": [],
                "processID": "p1",
            }
        )
    return {
        "data": [
            {
                "traceID": trace_id,
                "spans": group,
                "processes": {"p1": {"serviceName": "streamsight", "tags": []}},
            }
            for trace_id, group in grouped.items()
        ],
        "total": 0,
        "limit": 0,
        "offset": 0,
        "errors": None,
    }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A response recorded from a traced run: 12 good frames and 1 bad one."""
    memory = InMemorySpanExporter()
    tracing = setup_tracing(exporter=memory, processor=SimpleSpanProcessor, flush_at_exit=False)
    hook = send_tracer(tracing, "frames", JOB)
    assert hook is not None
    items = []
    for seq in range(13):
        jpeg = encode_jpeg(render_frame(seq % 2, seq).rgb) if seq < 12 else b"not an image"
        camera = f"cam-{seq % 2}"
        extra = hook(OutgoingFrame(camera, seq, jpeg, 1_700_000_000_000.0 + seq))
        headers = contract.frame_headers(
            job_id=JOB, camera=camera, seq=seq, capture_time_ms=1.7e12 + seq, trace_headers=extra
        )
        items.append(
            KafkaSourceMessage(
                key=camera.encode(),
                value=jpeg,
                topic="frames",
                headers=headers,
                offset=seq,
                partition=seq % 2,
                timestamp=(1, 1_700_000_000_000 + seq),
            )
        )
    inferencer = Inferencer.create(load_detector(), device="cpu")
    url = f"sqlite:///{tmp_path_factory.mktemp('traces') / 'out.db'}"
    flow = build_flow(
        Settings(batch_max_size=4, batch_max_delay_ms=20),
        source=TestingSource(items),
        infer=inferencer.infer,
        input_size=inferencer.detector.input_size,
        results=ResultSink(
            url,
            None,
            output_topic="detections",
            dead_letter_topic="dlq",
            trace_writes=write_tracer(tracing, topic=None, store="sqlite"),
        ),
        dead_letters=DeadLetterSink(
            url,
            None,
            topic="dlq",
            trace_writes=write_tracer(
                tracing, topic="dlq", store="sqlite", stage=stages.DEAD_LETTER_SINK
            ),
        ),
        tracing=tracing,
    )
    run_main(flow)
    tracing.flush()
    return jaeger_response(memory.get_finished_spans())


def camera_only(recorded: dict[str, Any]) -> dict[str, Any]:
    """What a search in the camera's service returns: the same traces (Jaeger returns
    whole traces), some of them only partly stored yet."""
    return {"data": [{**t, "spans": t["spans"][:1]} for t in recorded["data"]]}


@pytest.fixture
def jaeger(recorded: dict[str, Any]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A local server answering `/api/traces` with the recording; yields its URL and the
    queries it received."""
    queries: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            queries.append(query)
            wanted = json.loads(query.get("tags", "{}")).get("job.id")
            if parsed.path == "/api/services":
                body: dict[str, Any] = {"data": ["jaeger", "streamsight", "streamsight-camera"]}
            elif query.get("service") == "streamsight" and wanted == JOB:
                body = recorded
            elif query.get("service") == "streamsight-camera" and wanted == JOB:
                body = camera_only(recorded)
            else:
                body = {"data": []}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", queries
    finally:
        server.shutdown()
        server.server_close()


def test_breakdown_covers_every_stage(recorded: dict[str, Any]) -> None:
    result = traces.breakdown(recorded, JOB)
    assert len(result.frames) == 13
    # The flow's stages by their step ids, after the camera's send.
    assert set(result.stages) == {"send", "ingest", "decode", "batch", "infer", "sink"}
    assert result.stages["infer"][3] == 12 and result.stages["decode"][3] == 13
    for p50, p95, peak, _ in result.stages.values():
        assert 0 <= p50 <= p95 <= peak
    assert result.dominant in result.stages
    assert result.batches >= 3  # 12 frames in batches of at most 4
    assert [f.error for f in result.errors] == ["not_an_image"]


def test_command_queries_jaeger_and_prints_the_report(
    jaeger: tuple[str, list[dict[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, queries = jaeger
    assert traces.main(["--job-id", JOB, "--jaeger", url, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert [q.get("service") for q in queries] == [None, "streamsight", "streamsight-camera"]
    assert json.loads(queries[1]["tags"]) == {"job.id": JOB}
    assert f"job {JOB}: 13 frame traces" in out
    for label in ("camera send", "kafka + ingest", "decode", "batch wait", "inference"):
        assert label in out
    assert "slowest 3 frames:" in out
    assert out.count("  trace ") == 3
    assert "dominant stage:" in out
    assert "1 frames ended with an error" in out


def test_unknown_job_and_unreachable_jaeger(
    jaeger: tuple[str, list[dict[str, str]]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, _ = jaeger
    assert traces.main(["--job-id", "nope", "--jaeger", url]) == 0
    assert "no traces found" in capsys.readouterr().out
    assert traces.main(["--job-id", JOB, "--jaeger", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "cannot query Jaeger" in capsys.readouterr().err
