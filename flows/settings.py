"""One frozen settings object, read from `STREAMSIGHT_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SINK = "sqlite:///.streamsight/detections.db"


class Settings(BaseSettings):
    """Every setting of the dataflow, the camera and the demo (env prefix `STREAMSIGHT_`)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMSIGHT_", frozen=True, extra="ignore", protected_namespaces=()
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

    # Recovery (real Kafka only)
    recovery_dir: str = Field(
        default=".streamsight/recovery", description="Bytewax recovery partitions directory"
    )
    recovery_partitions: int = Field(
        default=8, ge=1, description="recovery partitions (at least the maximum worker count)"
    )
    snapshot_interval_s: float = Field(
        default=5.0, gt=0, description="seconds between recovery snapshots"
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
    def _brokers_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @field_validator("model_input_size")
    @classmethod
    def _input_size_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @model_validator(mode="after")
    def _sasl_complete(self) -> Settings:
        if self.security_protocol.startswith("sasl") and not self.sasl_mechanism:
            raise ValueError("STREAMSIGHT_SASL_MECHANISM is required with a SASL protocol")
        if self.sink.split(":", 1)[0] not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("STREAMSIGHT_SINK must start with sqlite:/// or postgresql://")
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

    def sqlite_path(self) -> Path | None:
        """The SQLite file of a `sqlite:///` sink, else None."""
        if not self.sink.startswith("sqlite:"):
            return None
        return Path(self.sink.removeprefix("sqlite:///").removeprefix("sqlite://"))


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


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
    """Read the settings once per process."""
    return Settings()
