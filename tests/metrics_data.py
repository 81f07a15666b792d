"""Test data for the metrics tests: frames, batches, results, dead letters, a fake NVML
module, and a registry with every pipeline series populated."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from operators import dead_letters as dl
from operators.batching import FLUSH_SIZE
from operators.frames import DeadLetter, FrameBatch, FrameMeta, FrameResult, PreparedFrame
from operators.telemetry.gpu import GpuSampler
from operators.telemetry.metrics import LagTracker, PipelineMetrics

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TOPIC = "frames"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def traceparent(trace_id: str = TRACE_ID) -> dict[str, str]:
    """A W3C trace carrier for `trace_id`."""
    return {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}


def meta(
    seq: int,
    *,
    job_id: str = "job-a",
    partition: int = 0,
    capture_ns: int | None = None,
    trace_id: str | None = TRACE_ID,
) -> FrameMeta:
    """A frame's metadata: offset = seq, captured at `capture_ns` (now when None)."""
    return FrameMeta(
        frame_id=f"{job_id}/cam/{seq}",
        job_id=job_id,
        camera="cam",
        seq=seq,
        topic=TOPIC,
        partition=partition,
        offset=seq,
        capture_ns=time.time_ns() if capture_ns is None else capture_ns,
        ingest_ns=time.time_ns(),
        content_sha256="0" * 64,
        width=64,
        height=48,
        trace_carrier=traceparent(trace_id) if trace_id else {},
    )


def prepared(m: FrameMeta) -> PreparedFrame:
    """`m` as a prepared 8x8 frame."""
    return PreparedFrame(m, np.zeros((8, 8, 3), dtype=np.uint8), time.time_ns())


def batch(metas: list[FrameMeta], *, reason: str = FLUSH_SIZE, wait_ns: int = 0) -> FrameBatch:
    """A batch of `metas` whose first frame waited `wait_ns`."""
    now = time.time_ns()
    return FrameBatch(
        key=f"{TOPIC}/0",
        frames=tuple(prepared(m) for m in metas),
        flush_reason=reason,
        opened_ns=now - wait_ns,
        dispatched_ns=now,
        batch_id="b1",
    )


def result(m: FrameMeta, batch_size: int = 1) -> FrameResult:
    """An empty detection result for `m`."""
    return FrameResult(
        meta=m,
        detections=(),
        model_name="tinydet",
        model_version="1",
        device="cpu",
        batch_size=batch_size,
        batch_flush_reason=FLUSH_SIZE,
        batch_dispatched_ns=time.time_ns(),
        inferred_ns=time.time_ns(),
    )


def letter(stage: str = "decode", reason: str = dl.CORRUPT_IMAGE, offset: int = 0) -> DeadLetter:
    """A dead letter from `stage` for `reason`."""
    return DeadLetter(
        stage=stage,
        reason=reason,
        detail="test",
        topic=TOPIC,
        partition=0,
        offset=offset,
        key=None,
        headers=(),
        payload=None,
    )


@dataclass
class FakeNvml:
    """A fake NVML (pynvml) module: `devices` GPUs with fixed readings."""

    devices: int = 2
    calls: list[str] = field(default_factory=list)
    NVML_TEMPERATURE_GPU: int = 0
    NVML_CLOCK_SM: int = 1

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=50 + handle, memory=20)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=1024**3 * (handle + 1), total=80 * 1024**3, free=0)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 250_000

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 61

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        if handle == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 1980

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-0000000{handle}".encode()

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"


@dataclass
class FakeTorchCuda:
    """A fake `torch.cuda` with one initialised device."""

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def memory_allocated(self, device: int) -> int:
        return 3 * 1024**2

    def memory_reserved(self, device: int) -> int:
        return 8 * 1024**2


def populated_registry() -> tuple[CollectorRegistry, PipelineMetrics]:
    """A registry with every pipeline, lag and (fake) GPU series holding values."""
    registry = CollectorRegistry()
    lag = LagTracker(registry=registry, read_high_watermark=lambda topic, partition: 20)
    metrics = PipelineMetrics(registry, max_jobs=2, lag=lag)
    gpu = GpuSampler(registry=registry, nvml=FakeNvml(), torch_cuda=FakeTorchCuda())
    gpu.init()
    gpu.sample()
    metas = [meta(i, job_id=f"job-{i % 3}") for i in range(4)]
    b = batch(metas, wait_ns=5_000_000)
    with metrics.measure("decode"):
        prepared(metas[0])
    metrics.record_batch(b, max_size=8)
    with metrics.measure_inference(b, device="cuda:0"):
        [result(x) for x in metas]
    metrics.results_written([result(x) for x in metas], 1, time.time_ns())
    metrics.letters_written([letter()])
    metrics.record_sink_write("results", 0.004)
    lag.refresh()
    return registry, metrics
