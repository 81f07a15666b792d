"""Consumer lag against a Kafka-protocol broker: the tracker's records lag equals the
broker's high watermark minus the next offset to process, read by its background thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from operators.kafka_io import CheckedProducer, high_watermarks
from operators.telemetry.metrics import LagTracker

pytestmark = pytest.mark.integration


def _produce(config: dict[str, Any], topic: str, counts: dict[int, int]) -> None:
    with CheckedProducer(dict(config)) as producer:
        for partition, count in counts.items():
            for i in range(count):
                producer.produce(topic, f"frame-{i}".encode(), partition=partition)
        producer.flush_and_check()


def test_lag_records_equal_high_watermark_minus_next_offset(
    kafka_config: dict[str, Any],
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
) -> None:
    topic = unique_topic("lag")
    create_topic(topic, 3)
    _produce(kafka_config, topic, {0: 10, 1: 5, 2: 3})
    marks = high_watermarks(kafka_config, topic)
    assert marks == {0: 10, 1: 5, 2: 3}

    registry = CollectorRegistry()
    tracker = LagTracker(kafka_config, interval_s=0.2, registry=registry)
    captured = time.time_ns() - 4_000_000_000
    processed = {0: 3, 1: 4}
    for partition, offset in processed.items():
        tracker.processed(topic, partition, offset, captured)
    tracker.start()
    try:
        deadline = time.monotonic() + 15
        while len(tracker.lag_records()) < len(processed):
            assert time.monotonic() < deadline, "no watermark read within 15 s"
            time.sleep(0.05)
        expected = {p: marks[p] - (offset + 1) for p, offset in processed.items()}
        for partition, lag in expected.items():
            got = registry.get_sample_value(
                "streamsight_kafka_consumer_lag_records",
                {"topic": topic, "partition": str(partition)},
            )
            assert got == lag
        assert expected == {0: 6, 1: 0}
        seconds = tracker.lag_seconds()
        assert seconds[(topic, 0)] >= 4.0
        assert seconds[(topic, 1)] == 0.0

        _produce(kafka_config, topic, {1: 2})
        tracker.processed(topic, 0, 9, time.time_ns())
        deadline = time.monotonic() + 15
        while tracker.lag_records() != {(topic, 0): 0, (topic, 1): 2}:
            assert time.monotonic() < deadline, tracker.lag_records()
            time.sleep(0.05)
        assert high_watermarks(kafka_config, topic)[1] - (4 + 1) == 2
        assert tracker.read_errors == 0
    finally:
        tracker.close()
