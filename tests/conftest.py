"""Shared fixtures: a real PostgreSQL server and a Kafka-protocol broker."""

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.kafka", "tests.fixtures.otlp"]
