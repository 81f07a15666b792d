"""The whole dataflow on Bytewax's TestingSource/TestingSink: every good frame comes out
once with detections, every bad one as a dead letter, and the flow never crashes."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import KafkaError as ConfluentKafkaError
from prometheus_client import CollectorRegistry

from flows.pipeline import build_flow
from flows.settings import Settings
from operators import contract, stages
from operators import dead_letters as dl
from operators.detector import load_detector
from operators.frames import DeadLetter, FrameBatch, FrameResult
from operators.inference import Inferencer
from operators.telemetry import tracing
from operators.telemetry.metrics import OTHER, PipelineMetrics
from operators.workers import cores, threads_per_worker
from tests.helpers import frame_headers
from tools.scene import encode_jpeg, render_frame


@pytest.fixture(scope="module")
def inferencer() -> Inferencer:
    return Inferencer.create(load_detector(), device="cpu")


def message(value: bytes | None, seq: int, partition: int, headers=None) -> KafkaSourceMessage:
    return KafkaSourceMessage(
        key=b"cam-0",
        value=value,
        topic="frames",
        headers=list(frame_headers(seq=seq, camera=f"cam-{partition}"))
        if headers is None
        else headers,
        offset=seq,
        partition=partition,
        timestamp=(1, 1_700_000_000_000),
    )


def scene_jpeg(camera: int, seq: int) -> bytes:
    return encode_jpeg(render_frame(camera, seq).rgb)


def run(settings: Settings, items: list, inferencer: Inferencer, infer=None, metrics=None):
    results: list[FrameResult] = []
    letters: list[DeadLetter] = []
    flow = build_flow(
        settings,
        source=TestingSource(items),
        infer=infer or inferencer.infer,
        input_size=inferencer.detector.input_size,
        results=TestingSink(results),
        dead_letters=TestingSink(letters),
        metrics=metrics,
    )
    run_main(flow)
    return results, letters


def test_good_and_bad_frames_each_come_out_once(inferencer: Inferencer) -> None:
    good = [message(scene_jpeg(p, s), s, p) for p in range(2) for s in range(7)]
    bad = [
        message(b"", 100, 0),
        message(b"not a jpeg", 101, 1),
        message(scene_jpeg(0, 1)[:300], 102, 0),
    ]
    error = KafkaError(
        ConfluentKafkaError(ConfluentKafkaError._MSG_TIMED_OUT), message(None, 103, 1)
    )
    settings = Settings(batch_max_size=4, batch_max_delay_ms=10_000)
    results, letters = run(settings, [*good[:5], *bad, error, *good[5:]], inferencer)

    ids = Counter(r.meta.frame_id for r in results)
    assert set(ids) == {f"job-1/cam-{p}/{s}" for p in range(2) for s in range(7)}
    assert max(ids.values()) == 1
    assert {(d.reason, d.offset) for d in letters} == {
        (dl.EMPTY, 100),
        (dl.NOT_AN_IMAGE, 101),
        (dl.CORRUPT_IMAGE, 102),
        (dl.KAFKA_ERROR, 103),
    }
    assert all(r.batch_size <= 4 for r in results)
    # Batches are per partition and flushed by size, then by end of input.
    reasons = Counter((r.meta.partition, r.batch_flush_reason) for r in results)
    assert reasons == {
        (0, "size"): 4,
        (0, "end_of_input"): 3,
        (1, "size"): 4,
        (1, "end_of_input"): 3,
    }
    # The model finds objects on the synthetic scenes, in original image coordinates.
    assert sum(len(r.detections) for r in results) >= len(results)
    for r in results:
        for d in r.detections:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 < x2 <= r.meta.width and 0 <= y1 < y2 <= r.meta.height


def test_the_flow_is_the_data_path_of_the_stages_step_ids() -> None:
    flow = build_flow(
        Settings(),
        source=TestingSource([]),
        infer=lambda batch: [],
        input_size=(64, 64),
        results=TestingSink([]),
        dead_letters=TestingSink([]),
    )
    path = (stages.INGEST, stages.DECODE, stages.BATCH, stages.INFER, stages.SINK)
    merged = (stages.DEAD_LETTERS, stages.DEAD_LETTER_SINK)
    assert [step.step_id for step in flow.substeps] == [
        f"streamsight.{step}" for step in (*path, *merged)
    ]
    assert (*path, stages.DEAD_LETTER_SINK) == stages.STAGES
    # The spans of the flow's stages carry the same names (the camera's `send` aside).
    assert set(tracing.STAGES) - {tracing.SEND} <= set(stages.STAGES)


def test_every_stage_is_measured_under_its_step_id(inferencer: Inferencer) -> None:
    registry = CollectorRegistry()
    good = [message(scene_jpeg(0, s), s, 0) for s in range(3)]
    error = KafkaError(
        ConfluentKafkaError(ConfluentKafkaError._MSG_TIMED_OUT), message(None, 103, 0)
    )
    items = [*good, message(b"not a jpeg", 101, 0), error]
    results, letters = run(
        Settings(batch_max_size=2), items, inferencer, metrics=PipelineMetrics(registry)
    )
    assert len(results) == 3
    # Each dead letter names the stage that made it: the step id of that stage's operator.
    assert sorted(d.stage for d in letters) == sorted([stages.INGEST, stages.DECODE])

    def calls(stage: str) -> float:
        found = registry.get_sample_value(
            "streamsight_stage_duration_seconds_count", {"stage": stage}
        )
        return found or 0.0

    assert {stage: calls(stage) > 0 for stage in stages.STAGES} == dict.fromkeys(
        stages.STAGES, True
    )
    assert calls(OTHER) == 0
    assert calls(stages.INGEST) == len(items)  # one call per message or error read
    assert calls(stages.DECODE) == len(items) - 1


def test_a_failing_model_turns_its_batch_into_dead_letters(inferencer: Inferencer) -> None:
    def broken(batch: FrameBatch) -> list[FrameResult]:
        raise RuntimeError("CUDA out of memory")

    items = [message(scene_jpeg(0, s), s, 0) for s in range(3)]
    results, letters = run(Settings(batch_max_size=8), items, inferencer, infer=broken)
    assert results == []
    assert sorted(d.offset for d in letters) == [0, 1, 2]
    assert {(d.stage, d.reason) for d in letters} == {("infer", dl.INTERNAL_ERROR)}


def test_workers_share_the_cores_on_cpu() -> None:
    assert threads_per_worker(1) == cores()
    assert threads_per_worker(cores() + 1) == 1
    assert threads_per_worker(2, setting=3) == 3


def test_the_cpu_thread_setting_reaches_worker_threads_started_after_it() -> None:
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    seen: list[int] = []

    def worker() -> None:
        inferencer.forward(np.zeros((1, height, width, 3), np.uint8))
        seen.append(torch.get_num_threads())

    try:
        inferencer = Inferencer.create(load_detector(), device="cpu", cpu_threads=wanted)
        width, height = inferencer.detector.input_size
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [wanted]


def test_frames_older_than_the_age_limit_are_skipped_and_accounted_for(
    inferencer: Inferencer,
) -> None:
    now_ms = time.time() * 1000

    def aged(seq: int, age_ms: float) -> KafkaSourceMessage:
        headers = frame_headers(
            seq=seq, **{contract.CAPTURE_TIME_MS: f"{now_ms - age_ms:.3f}".encode()}
        )
        return message(scene_jpeg(0, seq), seq, 0, headers=list(headers))

    items = [aged(s, 60_000 if s % 2 else 0) for s in range(6)]
    results, letters = run(Settings(max_frame_age_ms=30_000), items, inferencer)
    assert sorted(r.meta.seq for r in results) == [0, 2, 4]
    assert sorted(d.offset for d in letters) == [1, 3, 5]
    assert {(d.stage, d.reason) for d in letters} == {("batch", dl.STALE)}
    assert all(d.payload is None and d.frame_id for d in letters)

    results, letters = run(Settings(max_frame_age_ms=0), items, inferencer)
    assert sorted(r.meta.seq for r in results) == list(range(6))
    assert letters == []
