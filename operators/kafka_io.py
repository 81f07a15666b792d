"""Kafka client helpers: configuration from Settings, a producer whose every delivery is
checked, and high-watermark reads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

if TYPE_CHECKING:
    from types import TracebackType

    from flows.settings import Settings

logger = logging.getLogger(__name__)

LIBRDKAFKA_LOG_INTERVAL_S = 30.0
"""While brokers are unreachable librdkafka logs a line per reconnect attempt, per client
(about 19 a second): its lines pass at most once per this many seconds."""


class OncePerInterval(logging.Filter):
    """Lets one record through per `interval_s`; the next one says how many were held back."""

    def __init__(
        self, interval_s: float, clock: Callable[[], float] = time.monotonic, name: str = ""
    ) -> None:
        super().__init__(name)
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next_at = float("-inf")
        self._held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = self._clock()
            if now < self._next_at:
                self._held_back += 1
                return False
            self._next_at = now + self._interval_s
            held_back, self._held_back = self._held_back, 0
        if held_back:
            record.msg = f"{record.msg} ({held_back} similar line(s) held back)"
        return True


librdkafka_logger = logging.getLogger(f"{__name__}.librdkafka")
"""The logger every librdkafka client of the dataflow writes to (the `logger` property)."""
librdkafka_logger.addFilter(OncePerInterval(LIBRDKAFKA_LOG_INTERVAL_S))

HEADER_HEADROOM_BYTES = 64 * 1024
"""Room above `max_frame_bytes` for the key, headers and record-batch overhead."""

MIN_MESSAGE_MAX_BYTES = 1_000_000

PRODUCER_ONLY_KEYS = frozenset(
    {
        "enable.idempotence",
        "acks",
        "request.required.acks",
        "linger.ms",
        "queue.buffering.max.ms",
        "compression.type",
        "compression.codec",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "batch.size",
        "batch.num.messages",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "retries",
        "message.send.max.retries",
        "retry.backoff.ms",
        "max.in.flight.requests.per.connection",
        "max.in.flight",
        "transactional.id",
        "transaction.timeout.ms",
        "partitioner",
        "sticky.partitioning.linger.ms",
        "enable.gapless.guarantee",
        "request.timeout.ms",
    }
)
"""librdkafka properties that a consumer ignores (with a warning) and are left out of one."""


class DeliveryError(RuntimeError):
    """Raised when messages were not delivered: how many, and the first error.

    The message names topics, partitions and Kafka error codes only: never payload bytes,
    keys or configuration values.
    """

    def __init__(
        self,
        failed: int,
        first_error: KafkaError | None = None,
        *,
        first_topic: str | None = None,
        first_partition: int | None = None,
        in_flight: int = 0,
    ) -> None:
        self.failed = failed
        self.first_error = first_error
        self.first_topic = first_topic
        self.first_partition = first_partition
        self.in_flight = in_flight
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts: list[str] = []
        if self.failed:
            text = f"{self.failed} message(s) failed delivery"
            if self.first_error is not None:
                where = f"topic {self.first_topic!r}"
                if self.first_partition is not None and self.first_partition >= 0:
                    where += f" partition {self.first_partition}"
                text += f"; first error on {where}: {_describe_error(self.first_error)}"
            parts.append(text)
        if self.in_flight:
            parts.append(f"{self.in_flight} message(s) still undelivered after the flush timeout")
        return "; ".join(parts) or "delivery failed"


def _describe_error(error: KafkaError) -> str:
    """`NAME (reason)` of a Kafka error."""
    return f"{error.name()} ({error.str()})"


def client_config(settings: Settings, bootstrap: str | None = None) -> dict[str, Any]:
    """librdkafka settings every client shares: `bootstrap.servers` plus security.

    `bootstrap` overrides `settings.brokers`; a ValueError is raised when neither is set.
    """
    servers = bootstrap or settings.brokers
    if not servers:
        raise ValueError("no Kafka bootstrap servers: set STREAMSIGHT_BROKERS or pass bootstrap")
    return {"bootstrap.servers": servers, **settings.kafka_client_config()}


def producer_config(
    settings: Settings, *, bootstrap: str | None = None, client_id: str
) -> dict[str, Any]:
    """Settings of an idempotent, acks=all producer sized for `settings.max_frame_bytes`."""
    return {
        **client_config(settings, bootstrap),
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "none",
        "message.max.bytes": max(
            MIN_MESSAGE_MAX_BYTES, settings.max_frame_bytes + HEADER_HEADROOM_BYTES
        ),
    }


def consumer_safe(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the producer-only properties a consumer would warn about."""
    return {k: v for k, v in config.items() if k not in PRODUCER_ONLY_KEYS}


class CheckedProducer:
    """A confluent_kafka.Producer whose every delivery report is checked.

    Failures are counted and kept (first error only) until `check` or `flush_and_check`
    raises them as a DeliveryError. librdkafka's own log lines go to the
    `operators.kafka_io` logger unless `config` names another `logger`.
    Not thread-safe: use one instance from one thread.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        conf = dict(config)
        conf.setdefault("logger", librdkafka_logger)
        self._producer = Producer(conf)
        self._end_offsets: dict[tuple[str, int], int] = {}
        self._pending_failures = 0
        self._first_error: tuple[KafkaError, str, int] | None = None
        self._closed = False
        self.delivered = 0
        self.failed = 0

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        topic = message.topic() or ""
        partition = message.partition()
        if partition is None:
            partition = -1
        if error is not None:
            self._record_failure(error, topic, partition)
            return
        self.delivered += 1
        offset = message.offset()
        if offset is not None and offset >= 0:
            key = (topic, partition)
            self._end_offsets[key] = max(self._end_offsets.get(key, 0), offset + 1)

    def _record_failure(self, error: KafkaError, topic: str, partition: int) -> None:
        self.failed += 1
        self._pending_failures += 1
        if self._first_error is None:
            self._first_error = (error, topic, partition)

    def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue one message; when the local queue is full, serve delivery reports and retry.

        Raises DeliveryError (counting the message as failed) when librdkafka refuses it at
        once (e.g. message too large, or a partition the topic is known not to have), and
        when deliveries fail while waiting for room in a full queue.
        """
        kwargs: dict[str, Any] = {"on_delivery": self._on_delivery}
        if key is not None:
            kwargs["key"] = key
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                break
            except KafkaException as exc:
                error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if error is None:
                    raise
                self._record_failure(error, topic, -1 if partition is None else partition)
                self._raise_pending(in_flight=0)
            except BufferError:
                self._producer.poll(0.1)
                self.check()
        self._producer.poll(0)

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve delivery reports for up to `timeout_s`; returns how many were served."""
        return self._producer.poll(timeout_s)

    def check(self) -> None:
        """Raise DeliveryError if a delivery failed since the last check (does not wait)."""
        self._raise_pending(in_flight=0)

    def flush_and_check(self, timeout_s: float = 30.0) -> None:
        """Wait up to `timeout_s` for every queued message; raise DeliveryError if any
        delivery failed since the last check or messages are still in flight."""
        self._raise_pending(in_flight=self._producer.flush(timeout_s))

    def _raise_pending(self, *, in_flight: int) -> None:
        if not self._pending_failures and not in_flight:
            return
        failed, first = self._pending_failures, self._first_error
        self._pending_failures = 0
        self._first_error = None
        error, topic, partition = first if first else (None, None, None)
        raise DeliveryError(
            failed, error, first_topic=topic, first_partition=partition, in_flight=in_flight
        )

    def partition_count(self, topic: str, timeout_s: float = 10.0) -> int | None:
        """Partitions of `topic` from cluster metadata; None when the topic is unknown.

        On clusters that auto-create topics, asking may create it.
        """
        metadata = self._producer.list_topics(topic, timeout=timeout_s)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        return len(found.partitions)

    @property
    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Per (topic, partition): the last delivered offset + 1."""
        return dict(self._end_offsets)

    @property
    def in_flight(self) -> int:
        """Messages queued or sent and not yet reported."""
        return len(self._producer)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush for up to `timeout_s`, purge whatever is left (counted as failed), close.

        Does not raise on failed deliveries: call `flush_and_check` first for that.
        """
        if self._closed:
            return
        self._closed = True
        remaining = self._producer.flush(timeout_s)
        if remaining:
            logger.warning("purging %d undelivered message(s) at close", remaining)
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            deadline = time.monotonic() + 1.0
            while len(self._producer) and time.monotonic() < deadline:
                self._producer.poll(0.05)
        self._producer.close()

    def __enter__(self) -> CheckedProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def high_watermarks(config: dict[str, Any], topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> high watermark of `topic`, read with a short-lived Consumer.

    `config` is a client config (see `client_config`; producer-only keys are dropped).
    Raises KafkaException when the topic does not exist or metadata cannot be read.
    """
    conf = consumer_safe(config)
    conf.setdefault("group.id", "streamsight-watermarks")
    conf.setdefault("enable.auto.commit", False)
    conf.setdefault("logger", librdkafka_logger)
    consumer = Consumer(conf)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        found = metadata.topics.get(topic)
        if found is None:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        if found.error is not None:
            raise KafkaException(found.error)
        return {
            partition: consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s, cached=False
            )[1]
            for partition in sorted(found.partitions)
        }
    finally:
        consumer.close()


class KafkaUnavailable(RuntimeError):
    """The brokers did not answer a metadata request in time; the message names them and
    librdkafka's last error (codes and addresses only, never configuration values)."""


def wait_for_cluster(config: dict[str, Any], topic: str, timeout_s: float) -> None:
    """Return once the cluster at `config["bootstrap.servers"]` serves metadata for `topic`.

    Raises KafkaUnavailable after `timeout_s` (unreachable brokers, a failed TLS or SASL
    login). librdkafka's own lines are not logged: the last error becomes the cause.
    """
    errors: list[KafkaError] = []
    quiet = logging.getLogger(f"{__name__}.probe")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    conf = {
        **consumer_safe(config),
        "client.id": "streamsight-startup-probe",
        "error_cb": errors.append,
        "logger": quiet,
    }
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            admin.list_topics(topic, timeout=max(0.1, min(1.0, remaining)))
            return
        except KafkaException as exc:
            if exc.args and isinstance(exc.args[0], KafkaError):
                errors.append(exc.args[0])
        admin.poll(0)
        if remaining <= 0:
            break
    raise KafkaUnavailable(
        f"cannot reach Kafka at {config.get('bootstrap.servers')} within {timeout_s:g} s: "
        f"{_cause(errors)}"
    )


def _cause(errors: list[KafkaError]) -> str:
    """The most telling of librdkafka's errors: a login error before a refused connection,
    before "all brokers down", before a bare metadata time-out."""

    def rank(error: KafkaError) -> int:
        if error.code() not in (
            KafkaError._TRANSPORT,
            KafkaError._ALL_BROKERS_DOWN,
            KafkaError._TIMED_OUT,
        ):
            return 3
        if error.code() == KafkaError._TRANSPORT and "Failed to get metadata" not in error.str():
            return 2
        return 1 if error.code() == KafkaError._ALL_BROKERS_DOWN else 0

    if not errors:
        return "no answer"
    best = max(range(len(errors)), key=lambda i: (rank(errors[i]), i))
    return _describe_error(errors[best])
