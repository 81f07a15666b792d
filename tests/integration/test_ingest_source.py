"""The frame source against a Kafka-protocol broker, through Bytewax's public source API
only: its partition consumers get the fetch-wait and prefetch bounds, a bounded source
stops at its end offsets, and the source never reads or swaps KafkaSource's private
state (Bytewax workers share one source object across threads)."""

from __future__ import annotations

import ast
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bytewax.connectors import kafka as bytewax_kafka

from operators import ingest
from operators.ingest import FETCH_WAIT_MAX_MS, PREFETCH_MAX_KBYTES, frame_source
from operators.kafka_io import OncePerInterval, librdkafka_logger
from tests.integration.kafka_frames import fill_topic

pytestmark = pytest.mark.integration


@pytest.fixture
def every_librdkafka_line(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every line librdkafka logs, none held back by the once-per-interval filter."""
    held = [f for f in librdkafka_logger.filters if isinstance(f, OncePerInterval)]
    for found in held:
        librdkafka_logger.removeFilter(found)
    try:
        with caplog.at_level(logging.DEBUG, logger=librdkafka_logger.name):
            yield caplog
    finally:
        for found in held:
            librdkafka_logger.addFilter(found)


def read_all(source: Any, step_id: str = "read") -> list[Any]:
    """Every item of every partition of `source`, through the public source API, until
    each partition ends."""
    items: list[Any] = []
    for part in source.list_parts():
        partition = source.build_part(step_id, part, None)
        try:
            while True:
                try:
                    items += partition.next_batch()
                except StopIteration:
                    break
        finally:
            partition.close()
    return items


def test_partition_consumers_get_the_fetch_wait_and_prefetch_bounds(
    kafka_bootstrap: str,
    kafka_config: dict[str, Any],
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
    every_librdkafka_line: pytest.LogCaptureFixture,
) -> None:
    topic = unique_topic("frames")
    create_topic(topic, 1)
    fill_topic(kafka_config, topic, cameras=1, frames_per_camera=3, job_id="ingest")
    config = {k: v for k, v in kafka_config.items() if k != "bootstrap.servers"}
    source = frame_source(
        kafka_bootstrap,
        topic,
        client_config={**config, "debug": "conf"},  # each client logs its configuration
        batch_size=10,
        tail=False,
    )
    read_all(source)
    lines = [record.getMessage() for record in every_librdkafka_line.records]
    consumers = {
        re.search(r"rdkafka#(consumer-\d+)", line).group(1)  # type: ignore[union-attr]
        for line in lines
        if "rdkafka#consumer-" in line and "Client configuration" in line
    }
    assert consumers, lines[:20]
    text = "\n".join(lines)
    assert re.search(rf"fetch\.wait\.max\.ms = {FETCH_WAIT_MAX_MS}\b", text)
    assert re.search(rf"queued\.max\.messages\.kbytes = {PREFETCH_MAX_KBYTES}\b", text)
    # The admin client that lists the partitions gets them too; Bytewax never polls it,
    # so librdkafka's warning that they are consumer properties is never served.
    assert "CONFWARN" not in text


def test_a_bounded_source_stops_at_its_end_offsets(
    kafka_bootstrap: str,
    kafka_config: dict[str, Any],
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
) -> None:
    topic = unique_topic("frames")
    create_topic(topic, 2)
    fill_topic(kafka_config, topic, cameras=2, frames_per_camera=5, job_id="bounded")
    config = {k: v for k, v in kafka_config.items() if k != "bootstrap.servers"}
    ends = {(topic, 0): 2, (topic, 1): 0}
    source = frame_source(
        kafka_bootstrap,
        topic,
        client_config=config,
        batch_size=1,
        tail=True,  # it would tail for ever without its end offsets
        end_offsets=lambda: ends,
    )
    items = read_all(source)
    assert sorted((m.partition, m.offset) for m in items) == [(0, 0), (0, 1)]


def kafka_source_private_attributes() -> set[str]:
    """The `self._name` attributes of Bytewax's KafkaSource."""
    tree = ast.parse(inspect.getsource(bytewax_kafka.KafkaSource))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    }


def test_the_source_uses_no_private_state_of_kafka_source() -> None:
    private = kafka_source_private_attributes()
    assert "_add_config" in private  # the reading above finds what it looks for
    tree = ast.parse(Path(inspect.getfile(ingest)).read_text())
    used = sorted(
        {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} & private
    )
    assert used == []
