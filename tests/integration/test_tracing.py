"""Per-frame traces end to end: the real flow on the Kafka-protocol broker, exporting over
OTLP/gRPC to a receiver started by the test (tests.fixtures.otlp decodes the protobuf
export requests). Every frame must be one whole trace from the camera's send to the sink's
write, whatever the sampling ratio."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from operators import contract
from operators import dead_letters as dl
from operators.detector import load_detector
from operators.inference import Inferencer
from operators.kafka_io import CheckedProducer
from operators.telemetry.tracing import Tracing, send_tracer, setup_tracing
from tests.fixtures.kafka import read_topic, subprocess_env
from tests.fixtures.otlp import OtlpServer, ReceivedSpan
from tests.helpers import jpeg_bytes
from tests.integration.test_kafka_flow import run_flow
from tools.camera import OutgoingFrame, publish, spread_partition, synthetic_frames

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JOB = "trace-job"
FRAME_STAGES = {
    "process": "CONSUMER",
    "preprocess": "INTERNAL",
    "batch wait": "INTERNAL",
    "inference": "INTERNAL",
    "sink write": "PRODUCER",
}
BAD_PAYLOAD = b"definitely not an image"


@pytest.fixture(scope="module")
def inferencer() -> Inferencer:
    return Inferencer.create(load_detector(), device="cpu")


@pytest.fixture
def topics(create_topic, unique_topic) -> dict[str, str]:
    names = {
        "input": unique_topic("frames"),
        "output": unique_topic("detections"),
        "dlq": unique_topic("dead-letters"),
    }
    for name in names.values():
        create_topic(name, 4)
    return names


def otel_env(monkeypatch: pytest.MonkeyPatch, server: OtlpServer, **extra: str) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "streamsight-test")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def publish_frames(
    config: dict[str, Any], topic: str, tracing: Tracing, *, cameras: int, frames: int
) -> None:
    """Good frames with context, bad frames with context, one good frame without any
    context, and a conflicting repeat of cam-0/0 (dead-lettered by the sink)."""
    producer = CheckedProducer({**config, "enable.idempotence": True, "acks": "all"})
    hook = send_tracer(tracing, topic, JOB, lambda camera: spread_partition(camera, 4))
    assert hook is not None
    try:
        publish(
            producer,
            topic,
            synthetic_frames(cameras, frames),
            job_id=JOB,
            fps=0,
            partitions=4,
            trace_headers=hook,
        )
        bad = [(b"", 1), (BAD_PAYLOAD, 2), (jpeg_bytes()[:400], 3)]
        for value, seq in bad:
            extra = hook(OutgoingFrame("cam-bad", seq, value, 1_700_000_000_000.0))
            headers = contract.frame_headers(
                job_id=JOB, camera="cam-bad", seq=seq, capture_time_ms=1.7e12, trace_headers=extra
            )
            producer.produce(topic, value, key=b"cam-bad", headers=headers, partition=1)
        plain = contract.frame_headers(
            job_id=JOB, camera="cam-plain", seq=0, capture_time_ms=1.7e12
        )
        producer.produce(topic, jpeg_bytes(), key=b"cam-plain", headers=plain, partition=2)
        other = next(iter(synthetic_frames(2, 1)))[1]
        extra = hook(OutgoingFrame("cam-0", 0, other.jpeg, other.capture_time_ms))
        headers = contract.frame_headers(
            job_id=JOB,
            camera="cam-0",
            seq=0,
            capture_time_ms=other.capture_time_ms,
            trace_headers=extra,
        )
        producer.produce(topic, other.jpeg, key=b"cam-0", headers=headers, partition=0)
        producer.flush_and_check()
    finally:
        producer.close()


def by_trace(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    traces: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return traces


def frame_traces(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    return {
        trace_id: group
        for trace_id, group in by_trace(spans).items()
        if all(s.attributes.get("streamsight.span.scope") == "frame" for s in group)
    }


def stage_spans(trace: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    found: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for span in trace:
        found[span.name.split(" ")[0] if span.kind in ("CONSUMER",) else span.name].append(span)
    return found


def check_complete(trace: list[ReceivedSpan], *, with_send: bool = True) -> dict[str, ReceivedSpan]:
    """One span per stage, each with the right parent; returns them by stage."""
    names = stage_spans(trace)
    sends = [s for s in trace if s.kind == "PRODUCER" and s.name.startswith("send ")]
    assert len(sends) == (1 if with_send else 0), [s.name for s in trace]
    for name, kind in FRAME_STAGES.items():
        assert len(names[name]) == 1, (name, [s.name for s in trace])
        assert names[name][0].kind == kind
    ingest = names["process"][0]
    if with_send:
        assert sends[0].parent_span_id == ""
        assert ingest.parent_span_id == sends[0].span_id
    else:
        assert ingest.parent_span_id == ""
    for name in ("preprocess", "batch wait", "inference", "sink write"):
        assert names[name][0].parent_span_id == ingest.span_id, name
    assert len(trace) == len(FRAME_STAGES) + len(sends)
    out = {name: spans[0] for name, spans in names.items()}
    if sends:
        out["send"] = sends[0]
    return out


def check_attributes_are_safe(spans: list[ReceivedSpan]) -> None:
    for span in spans:
        for key, value in span.attributes.items():
            assert isinstance(value, str | int | float | bool), (key, value)
            if isinstance(value, str):
                assert len(value) <= 256, key
                assert BAD_PAYLOAD.decode() not in value and "\ufffd" not in value, key
        assert BAD_PAYLOAD.decode() not in span.status_message


def test_every_frame_is_one_trace_from_camera_to_sink(
    kafka_config, topics, tmp_path, inferencer, otlp_receiver, monkeypatch
) -> None:
    otel_env(monkeypatch, otlp_receiver, OTEL_BSP_SCHEDULE_DELAY="200")
    tracing = setup_tracing(flush_at_exit=False)
    assert tracing.enabled
    cameras, frames = 3, 6
    publish_frames(kafka_config, topics["input"], tracing, cameras=cameras, frames=frames)
    run_flow(kafka_config, topics, f"sqlite:///{tmp_path / 'out.db'}", inferencer, tracing)
    tracing.flush()
    spans = otlp_receiver.receiver.snapshot()
    assert spans, "nothing exported"
    assert all(s.resource["service.name"] == "streamsight-test" for s in spans)
    assert all("process.pid" in s.resource for s in spans)
    assert all(s.attributes.get("job.id") == JOB for s in spans), {
        s.name for s in spans if s.attributes.get("job.id") != JOB
    }
    check_attributes_are_safe(spans)

    traces = frame_traces(spans)
    good: dict[str, dict[str, ReceivedSpan]] = {}
    letters: dict[str, dict[str, ReceivedSpan]] = {}
    for trace in traces.values():
        ingest = next(s for s in trace if s.kind == "CONSUMER")
        frame_id = ingest.attributes.get("streamsight.frame.id", "")
        camera = ingest.attributes["camera.id"]
        if camera == "cam-bad":
            letters[str(ingest.attributes["messaging.kafka.offset"])] = {s.name: s for s in trace}
            continue
        if any(s.is_error for s in trace):
            letters["conflict"] = {s.name: s for s in trace}
            continue
        stages = check_complete(trace, with_send=camera != "cam-plain")
        assert frame_id not in good
        good[frame_id] = stages
        for span in stages.values():
            assert span.attributes["camera.id"] == camera
            if span.kind != "PRODUCER" or span.name == "sink write":
                assert span.attributes["streamsight.frame.id"] == frame_id, span.name
            # Messaging attributes on the messaging spans only (OTel conventions).
            messaging = span.kind in ("PRODUCER", "CONSUMER")
            assert ("messaging.system" in span.attributes) == messaging, span.name
        assert stages["process"].attributes["messaging.destination.name"] == topics["input"]
        assert stages["sink write"].attributes["messaging.destination.name"] == topics["output"]
        assert "messaging.destination.partition.id" in stages["process"].attributes
        assert stages["process"].attributes["messaging.kafka.offset"] >= 0
        wait, infer = stages["batch wait"], stages["inference"]
        assert wait.end_ns == infer.start_ns  # both meet at the batch's dispatch
        assert wait.attributes["streamsight.batch.id"] == infer.attributes["streamsight.batch.id"]
    expected = {f"{JOB}/cam-{c}/{s}" for c in range(cameras) for s in range(frames)}
    assert set(good) == expected | {f"{JOB}/cam-plain/0"}

    # Dead letters: one trace each, ending with error status and the reason.
    assert len(letters) == 4, sorted(letters)
    for key, trace in letters.items():
        sink = trace["sink write"]
        assert sink.is_error and sink.kind == "PRODUCER"
        if key == "conflict":
            assert sink.attributes["error.type"] == dl.DUPLICATE_FRAME_CONFLICT
            assert sink.attributes["messaging.destination.name"] == topics["output"]
        else:
            assert trace["preprocess"].is_error
            assert sink.attributes["streamsight.dead_letter.reason"] in (
                dl.EMPTY,
                dl.NOT_AN_IMAGE,
                dl.CORRUPT_IMAGE,
            )
            assert sink.attributes["messaging.destination.name"] == topics["dlq"]
            assert sink.status_message.startswith(sink.attributes["error.type"])

    # Batch spans link to exactly the frames of their batch.
    ingest_of = {s.span_id: s for s in spans if s.kind == "CONSUMER"}
    members: dict[str, set[str]] = defaultdict(set)
    for stages in [*good.values(), letters["conflict"]]:
        members[stages["inference"].attributes["streamsight.batch.id"]].add(
            stages[next(n for n in stages if n.startswith("process"))].span_id
        )
    inference_batches = [s for s in spans if s.name == "inference batch"]
    assert {s.attributes["streamsight.batch.id"] for s in inference_batches} == set(members)
    for batch in inference_batches:
        linked = {span_id for _, span_id, _ in batch.links}
        assert linked == members[batch.attributes["streamsight.batch.id"]]
        assert batch.attributes["messaging.batch.message_count"] == len(linked)
        assert batch.attributes["streamsight.device"] == "cpu"
        assert batch.attributes["streamsight.model.name"]
        assert all(ingest_of[span_id].trace_id == tid for tid, span_id, _ in batch.links)
    sink_batches = [s for s in spans if s.name == "sink write batch"]
    linked_by_sinks = [span_id for b in sink_batches for _, span_id, _ in b.links]
    every_ingest = {stages["process"].span_id for stages in good.values()}
    every_ingest |= {
        t[next(n for n in t if n.startswith("process"))].span_id for t in letters.values()
    }
    assert sorted(linked_by_sinks) == sorted(every_ingest)
    for batch in sink_batches:
        assert batch.attributes["messaging.batch.message_count"] == len(batch.links)

    # Output messages carry the trace onward, under the frame's sink-write span.
    published = read_topic(kafka_config, topics["output"], expected=len(good))
    for message in published:
        stages = good[message.key.decode()]
        traceparent = message.header("traceparent") or ""
        assert traceparent.split("-")[1:3] == [
            stages["sink write"].trace_id,
            stages["sink write"].span_id,
        ]
        assert f"job.id={JOB}" in (message.header("baggage") or "")
    dead = read_topic(kafka_config, topics["dlq"], expected=4)
    sink_span_ids = {t["sink write"].span_id for t in letters.values()}
    assert {(m.header("traceparent") or "-x-y").split("-")[2] for m in dead} == sink_span_ids


def test_sampled_traces_are_whole(
    kafka_config, topics, tmp_path, inferencer, otlp_receiver, monkeypatch
) -> None:
    otel_env(
        monkeypatch,
        otlp_receiver,
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.1",
    )
    tracing = setup_tracing(flush_at_exit=False)
    cameras, frames = 4, 20
    publish_frames(kafka_config, topics["input"], tracing, cameras=cameras, frames=frames)
    run_flow(kafka_config, topics, f"sqlite:///{tmp_path / 'out.db'}", inferencer, tracing)
    tracing.flush()
    spans = otlp_receiver.receiver.snapshot()
    traces = frame_traces(spans)
    complete = 0
    for trace in traces.values():
        ingest = next(s for s in trace if s.kind == "CONSUMER")
        camera = ingest.attributes["camera.id"]
        if camera == "cam-bad":  # send, ingest, preprocess, sink write (dead letter)
            assert [s.is_error for s in trace].count(True) == 2 and len(trace) == 4
        elif any(s.is_error for s in trace):  # the identity conflict, refused by the sink
            assert len(trace) == 6
        else:
            check_complete(trace, with_send=camera != "cam-plain")
            complete += camera != "cam-plain"
    assert complete < cameras * frames  # sampling did drop frames
    exported = {s.span_id for t in traces.values() for s in t}
    for batch in (s for s in spans if s.attributes.get("streamsight.span.scope") == "batch"):
        assert any(span_id in exported for _, span_id, _ in batch.links)
    assert all(s.parent_span_id == "" for s in spans if s.name.endswith("batch"))


PLANTED_SECRET = "planted-trace-s3cret"


def test_demo_flushes_its_spans_at_exit(tmp_path: Path, otlp_receiver: OtlpServer) -> None:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("OTEL_")}
    env.update(
        {
            "STREAMSIGHT_SINK": f"sqlite:///{tmp_path / 'detections.db'}",
            "STREAMSIGHT_DEMO_FRAMES": "24",
            "STREAMSIGHT_DEMO_FPS": "0",
            "STREAMSIGHT_DEMO_JOB_ID": "demo-traced",
            "STREAMSIGHT_PROGRESS": "false",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "60000",  # nothing is exported before the exit flush
            "STREAMSIGHT_SASL_PASSWORD": PLANTED_SECRET,
            "STREAMSIGHT_SSL_KEY_PASSWORD": PLANTED_SECRET,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    spans = otlp_receiver.receiver.snapshot()
    traces = frame_traces(spans)
    assert len(traces) == 24
    for trace in traces.values():
        stages = check_complete(trace)
        assert stages["send"].attributes["job.id"] == "demo-traced"
    assert all(s.resource["service.name"] == "streamsight" for s in spans)
    # A password in the configuration reaches no span, resource or log line.
    for span in spans:
        values = [*span.attributes.values(), *span.resource.values()]
        assert not any(PLANTED_SECRET in str(v) for v in values)
    assert PLANTED_SECRET not in proc.stdout + proc.stderr
