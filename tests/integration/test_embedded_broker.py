"""The embedded broker and the Kafka helpers against it, with real librdkafka clients."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaException

from operators.kafka_io import CheckedProducer, DeliveryError, high_watermarks
from tests.fixtures.kafka import REPO_ROOT, broker_subprocess, read_topic, subprocess_env
from tools.embedded import EmbeddedBroker, EmbeddedBrokerError

pytestmark = pytest.mark.integration

CONSUMER_SCRIPT = r"""
import json, sys
from confluent_kafka import Consumer, KafkaError, TopicPartition
bootstrap, topic, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "round-trip",
                     "enable.partition.eof": True, "enable.auto.commit": False})
partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
seen, at_end = [], set()
while len(seen) < expected or len(at_end) < len(partitions):
    message = consumer.poll(10)
    if message is None:
        break
    if message.error():
        if message.error().code() == KafkaError._PARTITION_EOF:
            at_end.add(message.partition())
            continue
        raise SystemExit(str(message.error()))
    at_end.discard(message.partition())
    seen.append({"partition": message.partition(), "offset": message.offset(),
                 "key": message.key().decode(), "value": message.value().hex(),
                 "headers": [[k, v.decode()] for k, v in message.headers() or []]})
consumer.close()
print(json.dumps(seen))
"""


def _producer(bootstrap: str, **extra: Any) -> CheckedProducer:
    return CheckedProducer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            **extra,
        }
    )


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_topic_gets_exactly_n_partitions(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str], partitions: int
) -> None:
    topic = unique_topic("parts")
    embedded_broker.create_topic(topic, partitions)
    marks = high_watermarks({"bootstrap.servers": embedded_broker.bootstrap}, topic)
    assert marks == dict.fromkeys(range(partitions), 0)


def test_creating_an_existing_topic(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("twice")
    embedded_broker.create_topic(topic, 2)
    with pytest.raises(EmbeddedBrokerError, match="exists"):
        embedded_broker.create_topic(topic, 5)
    embedded_broker.create_topic(topic, 5, exist_ok=True)
    marks = high_watermarks({"bootstrap.servers": embedded_broker.bootstrap}, topic)
    assert sorted(marks) == [0, 1]


def test_topics_are_created_without_waiting_for_the_brokers_timer() -> None:
    # As a flow starts: its input is filled by a producer that then closes, and its
    # output topics are made one after the other. The second of those once waited a
    # second for the mock cluster's thread to notice it.
    with EmbeddedBroker() as broker:
        waits = []
        for round_ in range(3):
            topic = f"frames-{round_}"
            broker.create_topic(topic, 4)
            producer = _producer(broker.bootstrap)
            for i in range(96):
                producer.produce(topic, bytes(8_000), key=str(i % 4).encode())
            producer.flush_and_check(10)
            producer.close()
            for name in ("results", "letters"):
                started = time.perf_counter()
                broker.create_topic(f"{name}-{round_}", 4)
                waits.append(time.perf_counter() - started)
    assert max(waits) < 0.5, [round(w, 3) for w in waits]


def test_create_topic_validates_arguments(embedded_broker: EmbeddedBroker) -> None:
    with pytest.raises(ValueError):
        embedded_broker.create_topic("zero", 0)
    with pytest.raises(ValueError):
        embedded_broker.create_topic("too-many-replicas", 1, replication_factor=2)


def test_round_trip_with_headers_read_by_another_process(
    create_topic: Callable[[str, int], None],
    kafka_bootstrap: str,
    kafka_config: dict[str, Any],
    unique_topic: Callable[..., str],
) -> None:
    topic = unique_topic("round-trip")
    create_topic(topic, 3)
    producer = CheckedProducer({**kafka_config, "enable.idempotence": True, "acks": "all"})
    sent = []
    for i in range(30):
        value = bytes([i]) * (i + 1)
        headers = [("streamsight-seq", str(i).encode()), ("empty", b"")]
        producer.produce(topic, value, key=f"cam-{i % 3}".encode(), headers=headers)
        sent.append((f"cam-{i % 3}", value.hex(), [["streamsight-seq", str(i)], ["empty", ""]]))
    producer.flush_and_check()
    assert producer.delivered == 30
    assert producer.failed == 0
    producer.close()

    result = subprocess.run(
        [sys.executable, "-c", CONSUMER_SCRIPT, kafka_bootstrap, topic, "30"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    received = json.loads(result.stdout)
    assert sorted((m["key"], m["value"], m["headers"]) for m in received) == sorted(sent)
    by_key: dict[str, list[int]] = {}
    for message in received:
        by_key.setdefault(message["key"], []).append(message["partition"])
    assert all(len(set(parts)) == 1 for parts in by_key.values())


def test_end_offsets_match_high_watermarks(
    create_topic: Callable[[str, int], None],
    kafka_config: dict[str, Any],
    unique_topic: Callable[..., str],
) -> None:
    topic = unique_topic("marks")
    create_topic(topic, 4)
    producer = CheckedProducer({**kafka_config, "enable.idempotence": True})
    counts = {0: 5, 1: 0, 2: 3, 3: 1}
    for partition, count in counts.items():
        for _ in range(count):
            producer.produce(topic, b"frame", partition=partition)
    producer.flush_and_check()
    producer.close()
    assert high_watermarks(kafka_config, topic) == counts
    assert producer.end_offsets == {(topic, p): n for p, n in counts.items() if n}


def test_high_watermarks_of_a_missing_topic(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    with pytest.raises(KafkaException):
        high_watermarks({"bootstrap.servers": embedded_broker.bootstrap}, unique_topic("none"))


def test_unknown_partition_fails_delivery(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("two")
    embedded_broker.create_topic(topic, 2)
    producer = _producer(embedded_broker.bootstrap, **{"message.timeout.ms": 5000})
    try:
        producer.produce(topic, b"fine", partition=1)
        producer.flush_and_check(timeout_s=10)
        # librdkafka refuses the message when it is produced once it knows the topic's
        # partitions, else at delivery: either way one DeliveryError.
        with pytest.raises(DeliveryError) as caught:
            producer.produce(topic, b"PAYLOAD-SECRET", partition=9)
            producer.flush_and_check(timeout_s=10)
    finally:
        producer.close()
    assert "1 message(s) failed delivery" in str(caught.value)
    assert "_UNKNOWN_PARTITION" in str(caught.value)
    assert "PAYLOAD-SECRET" not in str(caught.value)
    assert producer.delivered == 1
    assert producer.end_offsets == {(topic, 1): 1}


def test_broker_down_fails_delivery(unique_topic: Callable[..., str]) -> None:
    with EmbeddedBroker(brokers=1) as broker:
        topic = unique_topic("down")
        broker.create_topic(topic, 1)
        before = _producer(broker.bootstrap)
        before.produce(topic, b"before")
        before.flush_and_check()
        before.close()

        producer = _producer(broker.bootstrap, **{"message.timeout.ms": 1000, "log_level": 0})
        try:
            assert producer.partition_count(topic) == 1
            broker.set_broker_down(1)
            for _ in range(3):
                producer.produce(topic, b"PAYLOAD-WHILE-DOWN")
            with pytest.raises(DeliveryError, match="3 message\\(s\\) failed delivery") as caught:
                producer.flush_and_check(timeout_s=10)
        finally:
            producer.close()
        assert "_MSG_TIMED_OUT" in str(caught.value)
        assert "PAYLOAD" not in str(caught.value)
        assert (producer.delivered, producer.failed) == (0, 3)

        broker.set_broker_up(1)
        after = _producer(broker.bootstrap)
        after.produce(topic, b"after")
        after.flush_and_check(timeout_s=15)
        after.close()
        assert [m.value for m in read_topic(broker.bootstrap, topic)] == [b"before", b"after"]


def test_full_local_queue_is_waited_out(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("queue")
    embedded_broker.create_topic(topic, 1)
    producer = _producer(embedded_broker.bootstrap, **{"queue.buffering.max.messages": 2})
    for i in range(40):
        producer.produce(topic, str(i).encode())
    producer.flush_and_check()
    producer.close()
    assert producer.delivered == 40
    values = [m.value for m in read_topic(embedded_broker.bootstrap, topic, expected=40)]
    assert values == [str(i).encode() for i in range(40)]


def test_large_frame_round_trip(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("large")
    embedded_broker.create_topic(topic, 1)
    value = bytes(range(256)) * (6 * 1024 * 1024 // 256)
    producer = _producer(embedded_broker.bootstrap, **{"message.max.bytes": 8 * 1024 * 1024})
    producer.produce(topic, value)
    producer.flush_and_check()
    producer.close()
    conf = {"bootstrap.servers": embedded_broker.bootstrap}
    (message,) = read_topic(conf, topic, expected=1)
    assert message.value == value


def test_close_is_idempotent() -> None:
    broker = EmbeddedBroker()
    assert broker.bootstrap.startswith("127.0.0.1:")
    broker.close()
    broker.close()
    assert broker.closed
    with pytest.raises(EmbeddedBrokerError, match="closed"):
        broker.create_topic("late", 1)


def test_several_brokers() -> None:
    with EmbeddedBroker(brokers=3) as broker:
        assert len(broker.bootstrap.split(",")) == 3
        broker.create_topic("spread", 6)
        conf = {"bootstrap.servers": broker.bootstrap}
        assert high_watermarks(conf, "spread") == dict.fromkeys(range(6), 0)


def test_broker_process_serves_other_processes(
    broker_process: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("auto")
    producer = _producer(broker_process)
    producer.produce(topic, b"hello", key=b"k", headers=[("h", b"v")])
    producer.flush_and_check()
    producer.close()
    (message,) = read_topic(broker_process, topic, expected=1)
    assert (message.key, message.value, message.headers) == (b"k", b"hello", (("h", b"v"),))
    assert len(high_watermarks({"bootstrap.servers": broker_process}, topic)) == 4


def test_broker_main_creates_topics_and_stays_quiet() -> None:
    with broker_subprocess("--partitions", "3", "--topic", "a", "--topic", "b") as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        assert high_watermarks(conf, "a") == {0: 0, 1: 0, 2: 0}
        assert high_watermarks(conf, "b") == {0: 0, 1: 0, 2: 0}
        broker.process.terminate()
        assert broker.process.wait(timeout=10) == 0
        assert broker.process.stdout is not None
        assert broker.process.stdout.read() == ""
        assert "%7|" not in broker.stderr()
        assert "rdkafka" not in broker.stderr()
