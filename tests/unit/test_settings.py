"""Settings: bad configuration fails with a clear error, secrets stay hidden, and the README
documents every setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.settings import Settings, parse_size

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    missing = [
        name for name in Settings.model_fields if f"`STREAMSIGHT_{name.upper()}`" not in text
    ]
    assert missing == []


def test_secrets_never_show_in_repr_or_dump() -> None:
    settings = Settings(
        security_protocol="sasl_ssl",
        sasl_mechanism="PLAIN",
        sasl_username="svc",
        sasl_password="planted-s3cret",
        ssl_key_password="planted-k3y",
    )
    assert "planted" not in repr(settings)
    assert "planted" not in str(settings.model_dump())
    config = settings.kafka_client_config()
    assert config["sasl.password"] == "planted-s3cret"
    assert config["ssl.key.password"] == "planted-k3y"
    assert config["security.protocol"] == "sasl_ssl"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"STREAMSIGHT_BATCH_MAX_SIZE": "0"}, "batch_max_size"),
        ({"STREAMSIGHT_SECURITY_PROTOCOL": "carrier-pigeon"}, "security_protocol"),
        ({"STREAMSIGHT_SECURITY_PROTOCOL": "sasl_ssl"}, "SASL_MECHANISM"),
        ({"STREAMSIGHT_SINK": "mysql://x"}, "STREAMSIGHT_SINK"),
        ({"STREAMSIGHT_MODEL_INPUT_SIZE": "wide"}, "WxH"),
        ({"STREAMSIGHT_DEMO_FPS": "-1"}, "demo_fps"),
    ],
)
def test_bad_configuration_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert fragment in str(info.value)


def test_blank_brokers_mean_the_embedded_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSIGHT_BROKERS", "  ")
    settings = Settings()
    assert settings.embedded and settings.ends_at_topic_end
    monkeypatch.setenv("STREAMSIGHT_BROKERS", "kafka:9092")
    settings = Settings()
    assert not settings.embedded and not settings.ends_at_topic_end


def test_parse_size() -> None:
    assert parse_size("160x120") == (160, 120)
    with pytest.raises(ValueError):
        parse_size("0x5")
