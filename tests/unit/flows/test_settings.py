"""Settings: bad configuration fails with one clear line per bad setting and no value in it,
secrets stay hidden, and the README documents every setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.settings import (
    Settings,
    SettingsError,
    expected_form,
    load_settings,
    parse_size,
    read_settings,
    settings_or_exit,
)

README = Path(__file__).resolve().parents[3] / "README.md"
PLANTED = "pl4nted-Secret-9d2e"

# One bad value per setting, as it would be written in the environment. Every setting of
# `Settings` must have one: a new setting without a case here fails
# `test_every_setting_has_a_bad_value_case`.
BAD_VALUES: dict[str, str] = {
    "brokers": "kafka:notaport",
    "input_topic": "frames and more",
    "output_topic": "..",
    "dead_letter_topic": "x" * 250,
    "partitions": "0",
    "security_protocol": "bogus",
    "sasl_mechanism": "MD5",
    "sasl_username": "",
    "sasl_password": "",
    "ssl_ca_location": "/nonexistent/ca.pem",
    "ssl_certificate_location": "/nonexistent/client.pem",
    "ssl_key_location": "/nonexistent/client.key",
    "ssl_key_password": "",
    "fetch_batch_size": "0",
    "broker_wait_s": "0",
    "stop_at_end": "maybe",
    "max_frame_bytes": "10",
    "max_pixels": "0",
    "max_capture_skew_s": "-1",
    "max_frame_age_ms": "-1",
    "batch_max_size": "-1",
    "batch_max_delay_ms": "-5",
    "batch_adaptive": "sometimes",
    "batch_adaptive_max_size": "5000",
    "batch_latency_slo_ms": "0",
    "batch_key": "frame",
    "model_path": "/nonexistent/model.pt",
    "model_input_size": "wide",
    "model_classes": "cat,,dog",
    "device": "gpu",
    "precision": "fp8",
    "score_threshold": "1.5",
    "cpu_threads": "-1",
    "sink": "sqlite://",
    "publish_detections": "perhaps",
    "sink_retry_s": "0",
    "recovery_partitions": "0",
    "metrics_enabled": "loud",
    "metrics_port": "99999",
    "metrics_addr": "not an address",
    "metrics_max_jobs": "0",
    "metrics_job_idle_s": "0",
    "lag_interval_s": "-1",
    "gpu_sample_interval_s": "0",
    "demo_frames": "-1",
    "demo_cameras": "0",
    "demo_frame_size": "1280 by 720",
    "demo_fps": "-1",
    "demo_job_id": "job/1",
    "progress": "kinda",
    "log_level": "LOUD",
}


def env_name(field: str) -> str:
    return f"STREAMSIGHT_{field.upper()}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No STREAMSIGHT_* or OTEL_* variables from the caller."""
    for name in list(os.environ):
        if name.startswith(("STREAMSIGHT_", "OTEL_")):
            monkeypatch.delenv(name)
    return monkeypatch


def error_lines(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[str]:
    """The lines `read_settings` reports for `env` (it must fail)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        read_settings()
    return info.value.lines


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    missing = [
        name for name in Settings.model_fields if f"`STREAMSIGHT_{name.upper()}`" not in text
    ]
    assert missing == []


def test_every_setting_has_a_bad_value_case() -> None:
    assert sorted(BAD_VALUES) == sorted(Settings.model_fields)


def test_every_setting_says_its_expected_form() -> None:
    for name in Settings.model_fields:
        assert expected_form(name), name


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_a_bad_value_is_one_line_naming_the_variable_without_the_value(
    field: str, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv(env_name(field), BAD_VALUES[field])
    with pytest.raises(SystemExit) as exited:
        settings_or_exit()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    line = err.strip()
    assert line.startswith(f"streamsight: {env_name(field)}: "), line
    assert "(expected " in line and line.endswith(")"), line
    assert "Traceback" not in line and "pydantic" not in line, line
    # The value is never repeated (short ones and `sqlite://`, which the message names as
    # the scheme to write, would match by chance).
    if len(BAD_VALUES[field]) > 3 and BAD_VALUES[field] != "sqlite://":
        assert BAD_VALUES[field] not in line.removeprefix(f"streamsight: {env_name(field)}:")


def test_load_settings_exits_the_same_way(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("STREAMSIGHT_LOG_LEVEL", "LOUD")
    load_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            load_settings()
    finally:
        load_settings.cache_clear()
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("streamsight: STREAMSIGHT_LOG_LEVEL: ")


def test_each_bad_setting_gets_its_own_line(clean_env: pytest.MonkeyPatch) -> None:
    lines = error_lines(
        clean_env,
        {
            "STREAMSIGHT_BATCH_MAX_SIZE": "-1",
            "STREAMSIGHT_METRICS_PORT": "99999",
            "STREAMSIGHT_SINK": "x",
        },
    )
    assert sorted(line.split(":")[1].strip() for line in lines) == [
        "STREAMSIGHT_BATCH_MAX_SIZE",
        "STREAMSIGHT_METRICS_PORT",
        "STREAMSIGHT_SINK",
    ]


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"STREAMSIGHT_SECURITY_PROTOCOL": "sasl_ssl"}, "SASL_MECHANISM", "required"),
        (
            {"STREAMSIGHT_SECURITY_PROTOCOL": "sasl_ssl", "STREAMSIGHT_SASL_MECHANISM": "PLAIN"},
            "SASL_USERNAME",
            "required",
        ),
        (
            {
                "STREAMSIGHT_SECURITY_PROTOCOL": "sasl_plaintext",
                "STREAMSIGHT_SASL_MECHANISM": "SCRAM-SHA-256",
                "STREAMSIGHT_SASL_USERNAME": "svc",
            },
            "SASL_PASSWORD",
            "required",
        ),
        ({"STREAMSIGHT_BATCH_MAX_SIZE": "many"}, "BATCH_MAX_SIZE", "not an integer"),
        ({"STREAMSIGHT_BATCH_MAX_SIZE": "0"}, "BATCH_MAX_SIZE", "an integer from 1 to 4096"),
        ({"STREAMSIGHT_SCORE_THRESHOLD": "nan"}, "SCORE_THRESHOLD", "finite"),
        ({"STREAMSIGHT_BATCH_MAX_DELAY_MS": "inf"}, "BATCH_MAX_DELAY_MS", "finite"),
        ({"STREAMSIGHT_SECURITY_PROTOCOL": "carrier-pigeon"}, "SECURITY_PROTOCOL", "sasl_ssl"),
        ({"STREAMSIGHT_MODEL_INPUT_SIZE": "0x5"}, "MODEL_INPUT_SIZE", "WxH"),
        ({"STREAMSIGHT_SINK": "mysql://x"}, "SINK", "sqlite:///PATH"),
        ({"STREAMSIGHT_LOG_LEVEL": "10"}, "LOG_LEVEL", "DEBUG, INFO"),
    ],
)
def test_bad_configuration_is_a_clear_error(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], variable: str, fragment: str
) -> None:
    lines = error_lines(clean_env, env)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"streamsight: STREAMSIGHT_{variable}: "), lines
    assert fragment in lines[0], lines


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        (
            "sink",
            [
                "sqlite:///x.db",
                "sqlite:////tmp/x.db",
                "postgresql://u:p@db:5432/streamsight",
                "postgres://db/streamsight",
                "postgresql:///streamsight",
                "POSTGRESQL://db/streamsight",
            ],
            [
                "sqlite://",
                "sqlite:///",
                "sqlite://x.db",
                "x",
                "",
                "mysql://db/x",
                "postgresql://u:p@db:port/x",
                "postgresql://u:p@db:70000/x",
                "postgresql:/x",
            ],
        ),
        ("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "CPU"], ["gpu", "cuda:", "cuda:x"]),
        (
            "metrics_addr",
            ["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "metrics.svc.local"],
            ["", "999.0.0.1", "host name", "-bad", "a..b", "http://x"],
        ),
        ("log_level", ["DEBUG", "info", "Warning", "ERROR", "CRITICAL"], ["LOUD", "10", ""]),
        (
            "brokers",
            ["kafka:9092", "a:9092,b:9093", "kafka", "[::1]:9092", "10.0.0.1:9092", " "],
            ["kafka:0", "kafka:65536", "a:9092,,b:9092", "a b:9092", "kafka:x"],
        ),
        ("sasl_mechanism", ["PLAIN", "scram-sha-512", "OAUTHBEARER", "GSSAPI"], ["MD5", ""]),
        ("input_topic", ["frames", "a.b_c-1"], ["", ".", "..", "a b", "a/b", "x" * 250]),
        ("model_classes", ["person", "person,car"], ["", ",", "a,,b", "a, "]),
        ("demo_job_id", ["demo-1", "x" * 128], ["", "a/b", "x" * 129, "tab\there"]),
        ("demo_frame_size", ["320x240", "1280X720", "16x16"], ["15x240", "1280", "0x0", "a x b"]),
        ("security_protocol", ["plaintext", "PLAINTEXT", "Ssl"], ["tls", "sasl"]),
    ],
)
def test_accepted_and_refused_forms(
    clean_env: pytest.MonkeyPatch, field: str, good: list[str], bad: list[str]
) -> None:
    for value in good:
        clean_env.setenv(env_name(field), value)
        read_settings()
    for value in bad:
        clean_env.setenv(env_name(field), value)
        with pytest.raises(SettingsError) as info:
            read_settings()
        assert info.value.lines[0].startswith(f"streamsight: {env_name(field)}: "), value


def test_normalised_values(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("STREAMSIGHT_LOG_LEVEL", "debug")
    clean_env.setenv("STREAMSIGHT_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("STREAMSIGHT_SASL_MECHANISM", "scram-sha-256")
    clean_env.setenv("STREAMSIGHT_SASL_USERNAME", "svc")
    clean_env.setenv("STREAMSIGHT_SASL_PASSWORD", PLANTED)
    clean_env.setenv("STREAMSIGHT_DEVICE", "CUDA:1")
    settings = read_settings()
    assert settings.log_level == "DEBUG"
    assert settings.security_protocol == "sasl_ssl"
    assert settings.sasl_mechanism == "SCRAM-SHA-256"
    assert settings.device == "cuda:1"


def test_existing_files_are_accepted(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("ca.pem", "model.pt"):
        (tmp_path / name).write_text("x")
    clean_env.setenv("STREAMSIGHT_SSL_CA_LOCATION", str(tmp_path / "ca.pem"))
    clean_env.setenv("STREAMSIGHT_MODEL_PATH", str(tmp_path / "model.pt"))
    read_settings()


def test_overrides_are_named_as_given(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as info:
        read_settings({"sasl_mechanism": "MD5"}, names={"sasl_mechanism": "--sasl-mechanism"})
    assert info.value.lines == [
        "streamsight: --sasl-mechanism: not one of the known mechanisms "
        "(expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI)"
    ]


SECRET_ENV = {
    "STREAMSIGHT_SASL_PASSWORD": PLANTED,
    "STREAMSIGHT_SSL_KEY_PASSWORD": PLANTED,
    "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer%20{PLANTED}",
}


@pytest.mark.parametrize(
    "env",
    [
        {env_name(field): value}
        for field, value in BAD_VALUES.items()
        if field not in ("sasl_password", "ssl_key_password")
    ]
    + [
        {"STREAMSIGHT_SINK": f"postgresql://svc:{PLANTED}@db:notaport/x"},
        {"STREAMSIGHT_SINK": f"postgresql://svc:{PLANTED}@db:99999/x"},
        {"STREAMSIGHT_SINK": f"mysql://svc:{PLANTED}@db/x"},
        {"STREAMSIGHT_SINK": f"{PLANTED}"},
        {"STREAMSIGHT_SECURITY_PROTOCOL": "sasl_ssl"},
        {"OTEL_EXPORTER_OTLP_HEADERS": f'authorization="{PLANTED}"'},
        {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"{PLANTED}"},
        {"OTEL_EXPORTER_OTLP_HEADERS": f"a=1,{PLANTED}\\x"},
    ],
    ids=lambda env: ",".join(env),
)
def test_no_secret_in_any_error(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**SECRET_ENV, **env}.items():
        clean_env.setenv(name, value)
    with pytest.raises(SystemExit):
        settings_or_exit()
    out = capsys.readouterr()
    assert PLANTED not in out.out + out.err
    assert PLANTED.lower() not in (out.out + out.err).lower()


def test_malformed_otlp_headers_are_one_line(clean_env: pytest.MonkeyPatch) -> None:
    lines = error_lines(clean_env, {"OTEL_EXPORTER_OTLP_HEADERS": f"a=1,b={PLANTED}\\"})
    assert lines == [
        "streamsight: OTEL_EXPORTER_OTLP_HEADERS: entry 2 is not a name=value header "
        "(expected comma-separated name=value pairs, values URL-encoded)"
    ]
    clean_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=abc%20d,x-tenant = t1 ,")
    read_settings()


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


def test_validation_error_itself_still_hides_secrets(clean_env: pytest.MonkeyPatch) -> None:
    # Settings() raised directly (not through read_settings) must not carry the password
    # in its message either: the cross-setting checks report without the input.
    clean_env.setenv("STREAMSIGHT_SASL_PASSWORD", PLANTED)
    clean_env.setenv("STREAMSIGHT_SECURITY_PROTOCOL", "sasl_ssl")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert PLANTED not in str(info.value)


def test_blank_brokers_mean_the_embedded_broker(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("STREAMSIGHT_BROKERS", "  ")
    settings = Settings()
    assert settings.embedded and settings.ends_at_topic_end
    clean_env.setenv("STREAMSIGHT_BROKERS", "kafka:9092")
    settings = Settings()
    assert not settings.embedded and not settings.ends_at_topic_end


def test_parse_size() -> None:
    assert parse_size("160x120") == (160, 120)
    with pytest.raises(ValueError):
        parse_size("0x5")
