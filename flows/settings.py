"""One frozen settings object, read from `STREAMSIGHT_*` environment variables.

Every command line loads it through `load_settings()` or `settings_or_exit()`: a bad
setting ends the process with exit status 2 and one line per bad setting,
`streamsight: STREAMSIGHT_X: <what is wrong> (expected <form>)`, never with a value in it
(a value may be a secret) and never with a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import types
from collections.abc import Mapping
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from operators.contract import MAX_ID_LENGTH
from operators.sink_url import SinkUrl, parse_sink_url

DEFAULT_SINK = "sqlite:///.streamsight/detections.db"
ENV_PREFIX = "STREAMSIGHT_"
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
# Mechanisms that log in with a user name and password (librdkafka refuses to start
# without them, with an error far from the setting).
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OTLP_HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DEVICE = re.compile(r"auto|cpu|cuda(?::[0-9]+)?")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# An OTLP header entry as the OpenTelemetry specification (W3C baggage syntax) writes it:
# a token, `=`, and printable ASCII other than `"`, `,`, `;` and `\`. The SDK skips any
# other entry with a warning that prints it, secret and all: it is refused at load instead.
_OTLP_HEADER = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*="
    r"[ \t]*[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*"
)
_OTLP_HEADER_DELIMITER = re.compile(r"[ \t]*,[ \t]*")

# The form a setting takes, for those whose type does not say it (see `expected_form`).
FORMS: dict[str, str] = {
    "brokers": "host:port, comma-separated, or unset for the embedded broker",
    "input_topic": "a Kafka topic name: 1 to 249 of A-Z a-z 0-9 . _ -",
    "output_topic": "a Kafka topic name: 1 to 249 of A-Z a-z 0-9 . _ -",
    "dead_letter_topic": "a Kafka topic name: 1 to 249 of A-Z a-z 0-9 . _ -",
    "sasl_mechanism": "one of " + ", ".join(SASL_MECHANISMS),
    "sasl_username": "a user name, or unset",
    "sasl_password": "a password, or unset",
    "ssl_ca_location": "the path of a CA file or folder, or probe",
    "ssl_certificate_location": "the path of a readable file",
    "ssl_key_location": "the path of a readable file",
    "ssl_key_password": "a password, or unset",
    "model_path": "the path of a readable .pt or .pt2 file, or unset for the built-in model",
    "model_input_size": "WxH, e.g. 320x320",
    "model_classes": "comma-separated class names, e.g. person,car",
    "device": "auto, cpu, cuda or cuda:N",
    "sink": "sqlite:///PATH or postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE",
    "metrics_addr": "an IP address or host name to bind, e.g. 0.0.0.0",
    "demo_job_id": f"1 to {MAX_ID_LENGTH} printable characters without /",
    "demo_frame_size": "WxH, at least 16x16, e.g. 1280x720",
    "log_level": "one of " + ", ".join(LOG_LEVELS),
}


class Settings(BaseSettings):
    """Every setting of the dataflow, the camera and the demo (env prefix `STREAMSIGHT_`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        protected_namespaces=(),
        # "nan" and "inf" parse as floats and slip past every bound.
        allow_inf_nan=False,
        # A ValidationError printed by anyone never shows a value: some are secrets.
        hide_input_in_errors=True,
    )

    # Kafka
    brokers: str | None = Field(
        default=None, description="Kafka bootstrap servers; unset runs the embedded broker"
    )
    input_topic: str = Field(default="frames", description="topic the frames arrive on")
    output_topic: str = Field(default="detections", description="topic detections go to")
    dead_letter_topic: str = Field(
        default="frames-dead-letters", description="topic bad frames go to, with the reason"
    )
    partitions: int = Field(
        default=4, ge=1, le=1024, description="partitions of topics the embedded broker makes"
    )
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] = Field(
        default="plaintext", description="Kafka security.protocol"
    )
    sasl_mechanism: str | None = Field(
        default=None, description="Kafka sasl.mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"
    )
    sasl_username: str | None = Field(default=None, description="Kafka SASL user name")
    sasl_password: SecretStr | None = Field(default=None, description="Kafka SASL password")
    ssl_ca_location: str | None = Field(default=None, description="CA bundle for Kafka TLS")
    ssl_certificate_location: str | None = Field(
        default=None, description="client certificate for Kafka mutual TLS"
    )
    ssl_key_location: str | None = Field(
        default=None, description="client key for Kafka mutual TLS"
    )
    ssl_key_password: SecretStr | None = Field(
        default=None, description="password of the client key"
    )
    fetch_batch_size: int = Field(
        default=64, ge=1, le=10_000, description="messages read per partition per poll"
    )
    broker_wait_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="at start, how long to wait for the brokers' metadata before exiting",
    )
    stop_at_end: bool | None = Field(
        default=None,
        description="stop at the end of the topic instead of tailing it "
        "(default: true for the embedded broker, false for real Kafka)",
    )

    # Frame validation
    max_frame_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="larger messages are dead-lettered"
    )
    max_pixels: int = Field(
        default=40_000_000, ge=1, description="larger images are dead-lettered before decoding"
    )
    max_capture_skew_s: float = Field(
        default=300.0,
        ge=0,
        description="capture times further than this in the future are dead-lettered",
    )

    # Batching
    max_frame_age_ms: float = Field(
        default=0.0,
        ge=0,
        description="frames older than this (capture to batcher) are skipped, not inferred;"
        " 0 = never (live cameras: 10000)",
    )
    batch_max_size: int = Field(default=16, ge=1, le=4096, description="frames per batch")
    batch_max_delay_ms: float = Field(
        default=50.0,
        ge=0,
        description="longest a batch waits, counted from its first frame, before dispatch",
    )
    batch_adaptive: bool = Field(
        default=False,
        description="pick each batch's size and delay online (bounded by the settings below)",
    )
    batch_adaptive_max_size: int = Field(
        default=64, ge=1, le=4096, description="largest batch the adaptive controller may pick"
    )
    batch_latency_slo_ms: float = Field(
        default=200.0, gt=0, description="latency the adaptive controller keeps batches within"
    )
    batch_key: Literal["partition", "camera"] = Field(
        default="partition", description="stream key frames are batched by"
    )

    # Model
    model_path: str | None = Field(
        default=None, description="TorchScript (.pt) or torch.export (.pt2) detector to use"
    )
    model_input_size: str | None = Field(
        default=None, description="WxH input of a plugged-in model (if not in its metadata)"
    )
    model_classes: str | None = Field(
        default=None, description="comma-separated class names of a plugged-in model"
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="auto = fp16 on CUDA, fp32 on CPU"
    )
    score_threshold: float = Field(
        default=0.35, ge=0.0, le=1.0, description="detections below this score are dropped"
    )
    cpu_threads: int = Field(
        default=0,
        ge=0,
        description="the model's threads per worker on CPU; 0 = the cores shared among the"
        " process's workers",
    )

    # Sink
    sink: str = Field(
        default=DEFAULT_SINK, description="sqlite:///PATH or postgresql://... for detections"
    )
    publish_detections: bool = Field(
        default=True, description="also publish detections as JSON to the output topic"
    )
    sink_retry_s: float = Field(
        default=120.0,
        gt=0,
        description="how long the sinks retry an unreachable database, stalling the flow,"
        " before the flow exits",
    )

    # Recovery is Bytewax's own (BYTEWAX_RECOVERY_DIRECTORY, see flows/recovery.py).
    recovery_partitions: int = Field(
        default=8,
        ge=1,
        description="partitions an empty recovery directory gets (at least the maximum"
        " worker count)",
    )

    # Metrics
    metrics_enabled: bool = Field(default=True, description="serve Prometheus metrics")
    metrics_port: int = Field(
        default=9464, ge=1, le=65535, description="port of the /metrics endpoint"
    )
    metrics_addr: str = Field(default="0.0.0.0", description="address /metrics binds to")
    metrics_max_jobs: int = Field(
        default=20, ge=1, le=1000, description="job IDs tracked one by one; the rest are `other`"
    )
    metrics_job_idle_s: float = Field(
        default=600.0,
        gt=0,
        description="a job ID idle this long gives its metric slot to the next new job",
    )
    lag_interval_s: float = Field(
        default=5.0, gt=0, description="seconds between reads of the brokers' high watermarks"
    )
    gpu_sample_interval_s: float = Field(
        default=1.0, gt=0, description="seconds between GPU (NVML) samples"
    )

    # Demo (embedded broker)
    demo_frames: int = Field(default=1800, ge=0, description="frames the demo camera sends")
    demo_cameras: int = Field(default=4, ge=1, le=64, description="synthetic cameras")
    demo_frame_size: str = Field(
        default="320x240", description="WxH of the demo cameras' frames, e.g. 1280x720"
    )
    demo_fps: float = Field(
        default=15.0, ge=0, description="frames/s per demo camera; 0 sends as fast as possible"
    )
    demo_job_id: str | None = Field(
        default=None, description="job ID of the demo frames (default: demo-<start time>)"
    )
    progress: bool = Field(default=True, description="show live progress and the summary")
    log_level: str = Field(default="INFO", description="log level of the dataflow process")

    @field_validator("brokers")
    @classmethod
    def _brokers_form(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for entry in value.split(","):
            _check_broker(entry.strip())
        return value

    @field_validator("input_topic", "output_topic", "dead_letter_topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not _TOPIC.fullmatch(value) or value in (".", ".."):
            raise ValueError("not a Kafka topic name")
        return value

    @field_validator("security_protocol", mode="before")
    @classmethod
    def _protocol_lower(cls, value: object) -> object:
        # librdkafka's own spelling is upper case (SASL_SSL): both are accepted.
        return value.lower() if isinstance(value, str) else value

    @field_validator("sasl_mechanism")
    @classmethod
    def _known_mechanism(cls, value: str | None) -> str | None:
        if value is not None and value.upper() not in SASL_MECHANISMS:
            raise ValueError("not one of the known mechanisms")
        return None if value is None else value.upper()

    @field_validator("sasl_username", "sasl_password", "ssl_key_password")
    @classmethod
    def _not_empty(cls, value: str | SecretStr | None) -> str | SecretStr | None:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is not None and not text:
            raise ValueError("is set but empty")
        return value

    @field_validator("model_input_size")
    @classmethod
    def _input_size_shape(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_size(value)
            except ValueError:
                raise ValueError("not two positive whole numbers joined by x") from None
        return value

    @field_validator("demo_frame_size")
    @classmethod
    def _frame_size_shape(cls, value: str) -> str:
        try:
            width, height = parse_size(value)
        except ValueError:
            raise ValueError("not two positive whole numbers joined by x") from None
        if width < 16 or height < 16:
            raise ValueError("smaller than 16x16")
        return f"{width}x{height}"

    @field_validator("model_classes")
    @classmethod
    def _class_names(cls, value: str | None) -> str | None:
        if value is not None and not all(name.strip() for name in value.split(",")):
            raise ValueError("has an empty class name")
        return value

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if not is_device(value):
            raise ValueError("not a known device")
        return value.strip().lower()

    @field_validator("sink")
    @classmethod
    def _sink_form(cls, value: str) -> str:
        return parse_sink_url(value).url

    @field_validator("metrics_addr")
    @classmethod
    def _bind_address(cls, value: str) -> str:
        if not _host(value):
            raise ValueError("not an IP address or host name")
        return value

    @field_validator("demo_job_id")
    @classmethod
    def _job_id_form(cls, value: str | None) -> str | None:
        if value is not None and (
            not 0 < len(value) <= MAX_ID_LENGTH or not value.isprintable() or "/" in value
        ):
            raise ValueError("not a job ID the dataflow accepts")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # Checked here: logging.basicConfig would fail on it only once the flow starts.
        if value.strip().upper() not in LOG_LEVELS:
            raise ValueError("not a log level")
        return value.strip().upper()

    @model_validator(mode="after")
    def _sasl_complete(self) -> Settings:
        if not self.security_protocol.startswith("sasl"):
            return self
        condition = {"condition": f"security protocol {self.security_protocol}"}
        if not self.sasl_mechanism:
            raise PydanticCustomError(
                "required_with",
                "required with {condition}",
                {"setting": "sasl_mechanism"} | condition,
            )
        if self.sasl_mechanism in PASSWORD_MECHANISMS:
            condition = {"condition": f"SASL mechanism {self.sasl_mechanism}"}
            for setting in ("sasl_username", "sasl_password"):
                if getattr(self, setting) is None:
                    raise PydanticCustomError(
                        "required_with",
                        "required with {condition}",
                        {"setting": setting} | condition,
                    )
        return self

    @property
    def embedded(self) -> bool:
        """True when no Kafka is configured and the embedded broker is used."""
        return self.brokers is None

    @property
    def ends_at_topic_end(self) -> bool:
        """Whether the source stops at the end of the input instead of tailing."""
        return self.embedded if self.stop_at_end is None else self.stop_at_end

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka settings for security, shared by every client the project makes."""
        config: dict[str, str] = {"security.protocol": self.security_protocol}
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": _reveal(self.sasl_password),
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": _reveal(self.ssl_key_password),
        }
        config.update({k: v for k, v in optional.items() if v is not None})
        return config

    @cached_property
    def sink_url(self) -> SinkUrl:
        """The sink URL, parsed (its database system, SQLite file and redacted form)."""
        return parse_sink_url(self.sink)


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def is_device(text: str) -> bool:
    """Whether `text` names a device the model can run on: auto, cpu, cuda or cuda:N."""
    return _DEVICE.fullmatch(text.strip().lower()) is not None


def _readable(path: Path, *, folder: bool = False) -> bool:
    """Whether `path` is a readable file (or, with `folder`, a readable folder)."""
    kind_ok = path.is_file() or (folder and path.is_dir())
    return kind_ok and os.access(path, os.R_OK)


def _host(text: str) -> bool:
    """Whether `text` is an IP address or a host name (labels of letters, digits, - and _)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    name = text.removesuffix(".")
    if not name or len(name) > 253 or re.fullmatch(r"[0-9.]+", name):
        return False  # all digits: a mistyped IPv4 address, not a name
    return all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _check_broker(entry: str) -> None:
    """Raise ValueError unless `entry` is `[scheme://]host[:port]` (IPv6 in brackets)."""
    rest = entry[_SCHEME.match(entry).end() :] if _SCHEME.match(entry) else entry
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        ok = _is_ipv6(host) and (not tail or (tail[0] == ":" and _port(tail[1:])))
    else:
        host, colon, port = rest.partition(":")
        ok = _host(host) and (not colon or _port(port))
    if not ok:
        raise ValueError("not a list of host:port brokers")


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def path_problems(settings: Settings) -> dict[str, str]:
    """What is wrong, by setting, with the paths of `settings` that must name something on
    this machine (checked when a command loads its settings, not when a Settings object is
    made: a test or another host may describe files that are not here)."""
    found: dict[str, str] = {}
    ca = settings.ssl_ca_location
    if ca is not None and ca != "probe" and not _readable(Path(ca), folder=True):
        found["ssl_ca_location"] = "no such readable file or folder"
    for field in ("ssl_certificate_location", "ssl_key_location", "model_path"):
        path = getattr(settings, field)
        if path is not None and not _readable(Path(path)):
            found[field] = "no such readable file"
    return found


def otlp_header_problems(environ: Mapping[str, str]) -> list[str]:
    """One error line per OTLP headers variable of `environ` with an entry the
    OpenTelemetry exporters would skip (and print); never the entry itself."""
    lines = []
    for variable in OTLP_HEADER_VARIABLES:
        entries = _OTLP_HEADER_DELIMITER.split(environ.get(variable, ""))
        for index, entry in enumerate(entries, start=1):
            if entry.strip() and not _OTLP_HEADER.fullmatch(entry):
                lines.append(
                    f"streamsight: {variable}: entry {index} is not a name=value header "
                    "(expected comma-separated name=value pairs, values URL-encoded)"
                )
                break
    return lines


# What a pydantic error type means, said without the value that caused it.
_WHAT = {
    "int_parsing": "not an integer",
    "int_type": "not an integer",
    "int_from_float": "not an integer",
    "float_parsing": "not a number",
    "float_type": "not a number",
    "finite_number": "not a finite number",
    "bool_parsing": "not true or false",
    "bool_type": "not true or false",
    "greater_than": "out of range",
    "greater_than_equal": "out of range",
    "less_than": "out of range",
    "less_than_equal": "out of range",
    "literal_error": "not one of the allowed values",
    "missing": "required",
}


def _unwrap(annotation: Any) -> Any:
    """`X` of `X | None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expected_form(field: str) -> str:
    """The form setting `field` takes, in words: from `FORMS`, else from its type and bounds."""
    if field in FORMS:
        return FORMS[field]
    info = Settings.model_fields[field]
    kind = _unwrap(info.annotation)
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(str(arg) for arg in get_args(kind))
    if kind is bool:
        return "true or false"
    if kind in (int, float):
        noun = "an integer" if kind is int else "a number"
        low = high = ""
        for bound in info.metadata:
            if isinstance(bound, Ge):
                low = _number(bound.ge)
            elif isinstance(bound, Gt):
                low = f"> {_number(bound.gt)}"
            elif isinstance(bound, Le):
                high = _number(bound.le)
            elif isinstance(bound, Lt):
                high = f"< {_number(bound.lt)}"
        if low and high and not low.startswith(">") and not high.startswith("<"):
            return f"{noun} from {low} to {high}"
        parts = [f">= {low}" if low and not low.startswith(">") else low]
        parts.append(f"<= {high}" if high and not high.startswith("<") else high)
        bounds = " and ".join(part for part in parts if part)
        return f"{noun} {bounds}".strip()
    return "text"


def setting_name(field: str) -> str:
    """The environment variable of setting `field`."""
    return f"{ENV_PREFIX}{field.upper()}"


def problems(exc: ValidationError, names: Mapping[str, str] | None = None) -> list[str]:
    """One line per bad setting of `exc`: `streamsight: NAME: <what> (expected <form>)`.
    `names` overrides how a setting is named (e.g. the command-line flag it came from).
    No line holds a value: only the error type, our own messages and the field's form."""
    lines: dict[str, str] = {}
    for error in exc.errors(include_input=False, include_url=False):
        loc = error["loc"]
        field = loc[0] if loc else (error.get("ctx") or {}).get("setting")
        if not isinstance(field, str) or field not in Settings.model_fields:
            lines.setdefault("", "streamsight: settings: invalid (see the README, Configuration)")
            continue
        if error["type"] in ("value_error", "required_with"):
            what = error["msg"].removeprefix("Value error, ")
        else:
            what = _WHAT.get(error["type"], "invalid value")
        lines.setdefault(field, _line(field, what, names))
    return list(lines.values())


def _line(field: str, what: str, names: Mapping[str, str] | None) -> str:
    name = (names or {}).get(field) or setting_name(field)
    return f"streamsight: {name}: {what} (expected {expected_form(field)})"


class SettingsError(ValueError):
    """Bad settings; `lines` says what is wrong, one line per setting, without values."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def read_settings(
    overrides: Mapping[str, Any] | None = None, *, names: Mapping[str, str] | None = None
) -> Settings:
    """The settings from the environment, with `overrides` on top; SettingsError when
    any is bad (also an OTLP headers variable the exporters would skip)."""
    lines: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings(**dict(overrides or {}))
    except ValidationError as exc:
        lines = problems(exc, names)
    else:
        lines = [_line(field, what, names) for field, what in path_problems(settings).items()]
    lines += otlp_header_problems(os.environ)
    if lines or settings is None:
        raise SettingsError(lines)
    return settings


def settings_or_exit(
    overrides: Mapping[str, Any] | None = None, *, names: Mapping[str, str] | None = None
) -> Settings:
    """`read_settings`, or, when a setting is bad, its lines on stderr and exit status 2
    (a SystemExit, so `bytewax.run` importing the flow prints no traceback either)."""
    try:
        return read_settings(overrides, names=names)
    except SettingsError as exc:
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def parse_size(text: str) -> tuple[int, int]:
    """Parse `WxH` into (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"expected WxH, got {text!r}") from exc
    if width <= 0 or height <= 0:
        raise ValueError(f"expected positive WxH, got {text!r}")
    return width, height


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """Read the settings once per process; exits (status 2, one line per bad setting)
    when any is bad."""
    return settings_or_exit()
