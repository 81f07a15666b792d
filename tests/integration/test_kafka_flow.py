"""The dataflow through Bytewax's real KafkaSource against a Kafka-protocol broker (the
embedded one, or a real Kafka when STREAMSIGHT_TEST_BROKERS is set), writing to SQLite
and to a real PostgreSQL server, and publishing detections and dead letters."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import pytest
from bytewax.testing import cluster_main, run_main

from flows.pipeline import build_flow
from flows.settings import Settings
from operators import contract, stages
from operators import dead_letters as dl
from operators.detector import load_detector
from operators.frames import FrameBatch, FrameResult
from operators.inference import Inferencer
from operators.ingest import EndOffsets, frame_source
from operators.kafka_io import CheckedProducer
from operators.sinks import DeadLetterSink, ResultSink
from operators.stores import open_store
from operators.telemetry.tracing import Tracing, write_tracer
from operators.workers import routed_worker
from tests.fixtures.kafka import read_topic
from tests.helpers import jpeg_bytes
from tests.integration.kafka_frames import DEAD_LETTERS, fill_topic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inferencer() -> Inferencer:
    return Inferencer.create(load_detector(), device="cpu")


def run_flow(
    config: dict[str, Any],
    topics: dict[str, str],
    sink_url: str,
    inferencer: Inferencer,
    tracing: Tracing | None = None,
    *,
    workers: int = 1,
    infer: Any = None,
    end_offsets: EndOffsets | None = None,
    max_frame_age_ms: float = 0.0,
) -> None:
    """Run the flow in-process over `topics["input"]` to its end (or to `end_offsets`
    once they are known), on `workers` worker threads; traced with `tracing`; `infer`
    replaces the inferencer's."""
    traced = tracing or Tracing.disabled()
    settings = Settings(batch_max_size=8, batch_max_delay_ms=20, max_frame_age_ms=max_frame_age_ms)
    producer = {**config, "enable.idempotence": True, "acks": "all"}
    flow = build_flow(
        settings,
        source=frame_source(
            config["bootstrap.servers"],
            topics["input"],
            client_config=config,
            batch_size=32,
            tail=False,
            end_offsets=end_offsets,
        ),
        infer=infer or inferencer.infer,
        input_size=inferencer.detector.input_size,
        results=ResultSink(
            sink_url,
            producer,
            output_topic=topics["output"],
            dead_letter_topic=topics["dlq"],
            trace_writes=write_tracer(traced, topic=topics["output"], store="sqlite"),
        ),
        dead_letters=DeadLetterSink(
            sink_url,
            producer,
            topic=topics["dlq"],
            trace_writes=write_tracer(
                traced, topic=topics["dlq"], store="sqlite", stage=stages.DEAD_LETTER_SINK
            ),
        ),
        tracing=traced,
        model={"streamsight.device": inferencer.device_name},
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)


@pytest.fixture
def topics(create_topic, unique_topic) -> dict[str, str]:
    names = {"input": unique_topic("frames"), "output": unique_topic("detections")}
    names["dlq"] = unique_topic("dead-letters")
    for name in names.values():
        create_topic(name, 4)
    return names


def check_outputs(config: dict[str, Any], topics: dict[str, str], expected: set[str], url: str):
    store = open_store(url)
    try:
        rows = store.fetch_results()
        letters = store.fetch_dead_letters()
    finally:
        store.close()
    assert Counter(r["frame_id"] for r in rows) == Counter(expected)
    assert all(r["model_name"] and r["model_version"] for r in rows)
    assert sum(r["detection_count"] for r in rows) > len(rows)
    assert len(letters) == DEAD_LETTERS

    published = read_topic(config, topics["output"], expected=len(expected))
    assert {m.key.decode() for m in published} == expected
    body = json.loads(published[0].value)
    assert body["frame_id"] == published[0].key.decode()
    assert isinstance(body["detections"], list)

    dead = read_topic(config, topics["dlq"], expected=DEAD_LETTERS)
    assert len(dead) == DEAD_LETTERS
    reasons = Counter(m.header(contract.DLQ_REASON) for m in dead)
    assert reasons == Counter(
        {
            dl.EMPTY: 1,
            dl.NOT_AN_IMAGE: 1,
            dl.CORRUPT_IMAGE: 1,
            dl.BAD_HEADER: 1,
            dl.UNSUPPORTED_CONTENT_TYPE: 1,
            dl.DUPLICATE_FRAME_CONFLICT: 1,
        }
    )
    by_reason = {m.header(contract.DLQ_REASON): m for m in dead}
    assert by_reason[dl.NOT_AN_IMAGE].value == b"definitely not an image"
    assert by_reason[dl.NOT_AN_IMAGE].header(contract.DLQ_TOPIC) == topics["input"]
    assert by_reason[dl.NOT_AN_IMAGE].header(contract.JOB_ID) == "job-bad"


def test_flow_through_kafka_into_sqlite(
    kafka_config, topics, tmp_path, inferencer: Inferencer
) -> None:
    expected = fill_topic(
        kafka_config, topics["input"], cameras=4, frames_per_camera=12, job_id="j1"
    )
    url = f"sqlite:///{tmp_path / 'out.db'}"
    run_flow(kafka_config, topics, url, inferencer)
    check_outputs(kafka_config, topics, expected, url)


def test_flow_through_kafka_into_postgresql(
    kafka_config, topics, postgres_store_url, inferencer: Inferencer
) -> None:
    expected = fill_topic(
        kafka_config, topics["input"], cameras=3, frames_per_camera=10, job_id="j2"
    )
    run_flow(kafka_config, topics, postgres_store_url, inferencer)
    check_outputs(kafka_config, topics, expected, postgres_store_url)


def test_rerunning_over_the_same_topic_adds_nothing(
    kafka_config, topics, tmp_path, inferencer: Inferencer
) -> None:
    expected = fill_topic(
        kafka_config, topics["input"], cameras=2, frames_per_camera=8, job_id="j3"
    )
    url = f"sqlite:///{tmp_path / 'out.db'}"
    run_flow(kafka_config, topics, url, inferencer)
    run_flow(kafka_config, topics, url, inferencer)  # no recovery: re-reads from the start
    store = open_store(url)
    try:
        assert store.count_results() == len(expected)
        assert store.count_dead_letters() == DEAD_LETTERS
    finally:
        store.close()
    # The sink skipped the second run's frames entirely, so nothing was published twice.
    published = read_topic(kafka_config, topics["output"], expected=len(expected))
    assert len(published) == len(expected)


def test_two_workers_share_the_inference_evenly(
    kafka_config, create_topic, unique_topic, tmp_path, inferencer: Inferencer
) -> None:
    # A topic whose partitions Bytewax's key hashing alone would not split 2 / 2 between
    # two workers: without batching where the frames are read, one worker would run the
    # model for 3 or all 4 cameras.
    name = unique_topic("frames")
    while sorted(Counter(routed_worker(f"{name}/{p}", 2) for p in range(4)).values()) == [2, 2]:
        name = unique_topic("frames")
    topics = {"input": name, "output": unique_topic("detections")}
    topics["dlq"] = unique_topic("dead-letters")
    for topic in topics.values():
        create_topic(topic, 4)
    expected = fill_topic(
        kafka_config, topics["input"], cameras=4, frames_per_camera=12, job_id="j4"
    )
    partitions_of: dict[int, set[int]] = defaultdict(set)
    frames_of: Counter[int] = Counter()

    def infer(batch: FrameBatch) -> list[FrameResult]:
        thread = threading.get_ident()
        partitions_of[thread].update(f.meta.partition for f in batch.frames)
        frames_of[thread] += len(batch.frames)
        return inferencer.infer(batch)

    url = f"sqlite:///{tmp_path / 'out.db'}"
    run_flow(kafka_config, topics, url, inferencer, workers=2, infer=infer)
    check_outputs(kafka_config, topics, expected, url)
    assert len(partitions_of) == 2
    assert sorted(len(p) for p in partitions_of.values()) == [2, 2]
    assert set.union(*partitions_of.values()) == {0, 1, 2, 3}
    assert sorted(frames_of.values()) == [24, 26]  # cam-0 also has the 2 conflicting repeats


def test_every_frame_sent_is_stored_dead_lettered_or_skipped_as_stale(
    kafka_config, topics, tmp_path, inferencer: Inferencer
) -> None:
    """A topic holding a backlog of old frames beside fresh ones: with an age limit, each
    message comes out exactly once, as a row, a dead letter or a `stale` skip."""
    fresh = fill_topic(kafka_config, topics["input"], cameras=2, frames_per_camera=6, job_id="j")
    old_ms = time.time() * 1000 - 120_000
    producer = CheckedProducer({**kafka_config, "enable.idempotence": True, "acks": "all"})
    try:
        for seq in range(8):
            headers = contract.frame_headers(
                job_id="backlog", camera="cam-9", seq=seq, capture_time_ms=old_ms + seq
            )
            producer.produce(topics["input"], jpeg_bytes(), key=b"cam-9", headers=headers)
        producer.flush_and_check()
    finally:
        producer.close()
    url = f"sqlite:///{tmp_path / 'out.db'}"
    run_flow(kafka_config, topics, url, inferencer, max_frame_age_ms=60_000)

    store = open_store(url)
    try:
        rows = store.fetch_results()
        letters = store.fetch_dead_letters()
    finally:
        store.close()
    stale = [d for d in letters if d["reason"] == dl.STALE]
    assert Counter(r["frame_id"] for r in rows) == Counter(fresh)
    assert sorted(d["frame_id"] for d in stale) == [f"backlog/cam-9/{s}" for s in range(8)]
    assert len(letters) - len(stale) == DEAD_LETTERS
    # fill_topic also re-sends cam-0/0 with its own bytes: a duplicate, stored once.
    sent = len(fresh) + DEAD_LETTERS + 1 + 8
    assert len(rows) + len(letters) + 1 == sent
