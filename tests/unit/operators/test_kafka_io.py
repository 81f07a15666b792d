"""Kafka client configuration from Settings, DeliveryError's message, the start-up wait
for the brokers and the rate limit on librdkafka's lines."""

from __future__ import annotations

import logging
import socket

import pytest
from confluent_kafka import KafkaError
from pydantic import SecretStr

from flows.settings import Settings
from operators.kafka_io import (
    HEADER_HEADROOM_BYTES,
    CheckedProducer,
    DeliveryError,
    KafkaUnavailable,
    OncePerInterval,
    client_config,
    consumer_safe,
    producer_config,
    wait_for_cluster,
)

SASL_PASSWORD = "s3cret-sasl-password"
KEY_PASSWORD = "s3cret-key-password"


def _secure_settings() -> Settings:
    return Settings(
        brokers="kafka-0:9093,kafka-1:9093",
        security_protocol="sasl_ssl",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="camera",
        sasl_password=SASL_PASSWORD,
        ssl_ca_location="/etc/kafka/ca.pem",
        ssl_certificate_location="/etc/kafka/client.pem",
        ssl_key_location="/etc/kafka/client.key",
        ssl_key_password=KEY_PASSWORD,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_client_config_uses_settings_brokers() -> None:
    config = client_config(Settings(brokers="k:9092"))
    assert config == {"bootstrap.servers": "k:9092", "security.protocol": "plaintext"}


def test_client_config_bootstrap_overrides_settings() -> None:
    config = client_config(Settings(brokers="k:9092"), "127.0.0.1:1234")
    assert config["bootstrap.servers"] == "127.0.0.1:1234"


def test_client_config_needs_bootstrap() -> None:
    with pytest.raises(ValueError, match="bootstrap"):
        client_config(Settings(brokers=None))


def test_security_settings_reach_client_config() -> None:
    config = client_config(_secure_settings())
    assert config == {
        "bootstrap.servers": "kafka-0:9093,kafka-1:9093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "camera",
        "sasl.password": SASL_PASSWORD,
        "ssl.ca.location": "/etc/kafka/ca.pem",
        "ssl.certificate.location": "/etc/kafka/client.pem",
        "ssl.key.location": "/etc/kafka/client.key",
        "ssl.key.password": KEY_PASSWORD,
    }


def test_security_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSIGHT_BROKERS", "env-kafka:9093")
    monkeypatch.setenv("STREAMSIGHT_SECURITY_PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("STREAMSIGHT_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("STREAMSIGHT_SASL_USERNAME", "user")
    monkeypatch.setenv("STREAMSIGHT_SASL_PASSWORD", SASL_PASSWORD)
    config = producer_config(Settings(), client_id="camera")
    assert config["bootstrap.servers"] == "env-kafka:9093"
    assert config["security.protocol"] == "sasl_plaintext"
    assert config["sasl.mechanism"] == "PLAIN"
    assert config["sasl.username"] == "user"
    assert config["sasl.password"] == SASL_PASSWORD


def test_secrets_are_secret_strings() -> None:
    settings = _secure_settings()
    assert isinstance(settings.sasl_password, SecretStr)
    assert isinstance(settings.ssl_key_password, SecretStr)
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert SASL_PASSWORD not in shown
    assert KEY_PASSWORD not in shown


def test_producer_config_is_idempotent_and_sized_for_frames() -> None:
    settings = Settings(brokers="k:9092", max_frame_bytes=8 * 1024 * 1024)
    config = producer_config(settings, client_id="streamsight-camera")
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger.ms"] == 5
    assert config["compression.type"] == "none"
    assert config["client.id"] == "streamsight-camera"
    assert config["message.max.bytes"] >= settings.max_frame_bytes + HEADER_HEADROOM_BYTES


def test_producer_config_never_below_librdkafka_default() -> None:
    config = producer_config(Settings(brokers="k:9092", max_frame_bytes=2048), client_id="c")
    assert config["message.max.bytes"] >= 1_000_000


def test_producer_config_carries_security() -> None:
    config = producer_config(_secure_settings(), client_id="c")
    assert config["sasl.password"] == SASL_PASSWORD
    assert config["ssl.key.location"] == "/etc/kafka/client.key"


def test_consumer_safe_drops_producer_properties() -> None:
    config = producer_config(_secure_settings(), client_id="c")
    safe = consumer_safe(config)
    assert "enable.idempotence" not in safe
    assert "acks" not in safe
    assert "linger.ms" not in safe
    assert safe["sasl.password"] == SASL_PASSWORD
    assert safe["bootstrap.servers"] == config["bootstrap.servers"]


def test_delivery_error_message() -> None:
    error = DeliveryError(
        3,
        KafkaError(KafkaError._MSG_TIMED_OUT),
        first_topic="frames",
        first_partition=2,
        in_flight=1,
    )
    text = str(error)
    assert "3 message(s) failed delivery" in text
    assert "'frames' partition 2" in text
    assert "_MSG_TIMED_OUT" in text
    assert "1 message(s) still undelivered" in text
    assert error.failed == 3
    assert error.in_flight == 1


def test_failed_delivery_raises_without_payload_or_key() -> None:
    payload = b"PAYLOAD-MUST-NOT-LEAK-" + bytes(range(32))
    key = b"KEY-MUST-NOT-LEAK"
    producer = CheckedProducer(
        {
            "bootstrap.servers": f"127.0.0.1:{_closed_port()}",
            "message.timeout.ms": 300,
            "log_level": 0,
        }
    )
    try:
        for _ in range(3):
            producer.produce("frames", payload, key=key, headers=[("h", b"HEADER-VALUE")])
        with pytest.raises(DeliveryError) as caught:
            producer.flush_and_check(timeout_s=10)
    finally:
        producer.close()
    text = str(caught.value)
    assert "3 message(s) failed delivery" in text
    assert "_MSG_TIMED_OUT" in text
    for secret in ("PAYLOAD-MUST-NOT-LEAK", "KEY-MUST-NOT-LEAK", "HEADER-VALUE"):
        assert secret not in text
        assert secret not in repr(caught.value)
    assert producer.failed == 3
    assert producer.delivered == 0
    assert producer.end_offsets == {}


def test_flush_and_check_reports_messages_still_in_flight() -> None:
    producer = CheckedProducer(
        {
            "bootstrap.servers": f"127.0.0.1:{_closed_port()}",
            "message.timeout.ms": 60_000,
            "log_level": 0,
        }
    )
    producer.produce("frames", b"x")
    with pytest.raises(DeliveryError, match="1 message\\(s\\) still undelivered"):
        producer.flush_and_check(timeout_s=0.2)
    producer.close(timeout_s=0.1)
    assert producer.failed == 1
    producer.close()


def test_check_clears_after_raising() -> None:
    producer = CheckedProducer(
        {
            "bootstrap.servers": f"127.0.0.1:{_closed_port()}",
            "message.timeout.ms": 200,
            "log_level": 0,
        }
    )
    try:
        producer.produce("frames", b"x")
        with pytest.raises(DeliveryError):
            producer.flush_and_check(timeout_s=10)
        producer.check()
        producer.flush_and_check(timeout_s=1)
    finally:
        producer.close()


def test_message_refused_at_once_raises_delivery_error() -> None:
    producer = CheckedProducer(
        {
            "bootstrap.servers": f"127.0.0.1:{_closed_port()}",
            "message.max.bytes": 1000,
            "log_level": 0,
        }
    )
    try:
        with pytest.raises(DeliveryError, match="MSG_SIZE_TOO_LARGE") as caught:
            producer.produce("frames", b"PAYLOAD" * 1000, partition=0)
    finally:
        producer.close(timeout_s=0.1)
    assert "PAYLOAD" not in str(caught.value)
    assert "'frames' partition 0" in str(caught.value)
    assert producer.failed == 1


def test_once_per_interval_passes_one_line_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    gate = OncePerInterval(30.0, clock=lambda: now[0])
    records = [logging.LogRecord("k", logging.ERROR, "", 0, "line", None, None) for _ in range(5)]
    assert [gate.filter(r) for r in records[:3]] == [True, False, False]
    now[0] += 30.0
    assert gate.filter(records[3])
    assert records[3].getMessage() == "line (2 similar line(s) held back)"
    assert not gate.filter(records[4])


def test_wait_for_cluster_names_the_brokers_and_the_refused_connection() -> None:
    brokers = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(KafkaUnavailable) as caught:
        wait_for_cluster({"bootstrap.servers": brokers}, "frames", timeout_s=1.0)
    text = str(caught.value)
    assert text.startswith(f"cannot reach Kafka at {brokers} within 1 s: _TRANSPORT")
    assert "Connection refused" in text
