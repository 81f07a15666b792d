"""GPU metrics on CPU-only machines: a fake NVML module (`FakeNvml`) stands in for pynvml;
without NVML there is one log line, no GPU series and no crash."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from operators.telemetry.gpu import DCGM_FIELDS, GpuSampler
from tests.metrics_data import FakeNvml, FakeTorchCuda


def gpu_value(registry: CollectorRegistry, name: str, gpu: str) -> float | None:
    return registry.get_sample_value(name, {"gpu": gpu, "uuid": f"GPU-0000000{gpu}"})


def test_fake_nvml_readings_become_dcgm_comparable_gauges() -> None:
    registry = CollectorRegistry()
    fake = FakeNvml(devices=2)
    sampler = GpuSampler(registry=registry, nvml=fake, torch_cuda=False)
    assert sampler.init()
    sampler.sample()
    assert gpu_value(registry, "streamsight_gpu_utilization_ratio", "0") == 0.5
    assert gpu_value(registry, "streamsight_gpu_utilization_ratio", "1") == 0.51
    assert gpu_value(registry, "streamsight_gpu_memory_utilization_ratio", "0") == 0.2
    assert gpu_value(registry, "streamsight_gpu_memory_used_bytes", "1") == 2 * 1024**3
    assert gpu_value(registry, "streamsight_gpu_memory_total_bytes", "0") == 80 * 1024**3
    assert gpu_value(registry, "streamsight_gpu_power_watts", "0") == 250.0
    assert gpu_value(registry, "streamsight_gpu_temperature_celsius", "0") == 61
    assert gpu_value(registry, "streamsight_gpu_sm_clock_hertz", "0") == 1980e6
    assert gpu_value(registry, "streamsight_gpu_sm_clock_hertz", "1") is None
    info = {"gpu": "0", "uuid": "GPU-00000000", "model_name": "NVIDIA H100 80GB HBM3"}
    assert registry.get_sample_value("streamsight_gpu_info", info) == 1
    assert sampler.sample_errors == 1
    assert registry.get_sample_value("streamsight_cuda_memory_allocated_bytes", {}) is None
    assert set(DCGM_FIELDS) <= {f.name for f in registry.collect()}


def test_background_thread_samples_and_stops() -> None:
    registry = CollectorRegistry()
    fake = FakeNvml(devices=1)
    sampler = GpuSampler(interval_s=0.05, registry=registry, nvml=fake, torch_cuda=FakeTorchCuda())
    assert sampler.start()
    deadline = time.monotonic() + 5
    while gpu_value(registry, "streamsight_gpu_power_watts", "0") is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    labels = {"device": "cuda:0"}
    assert registry.get_sample_value("streamsight_cuda_memory_allocated_bytes", labels) == 3 << 20
    assert registry.get_sample_value("streamsight_cuda_memory_reserved_bytes", labels) == 8 << 20
    sampler.close()
    assert fake.calls == ["init", "shutdown"]


class _BrokenNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise RuntimeError("NVML Shared Library Not Found")


@pytest.mark.parametrize("fake", [_BrokenNvml(), FakeNvml(devices=0)])
def test_without_nvml_one_log_line_and_no_series(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    sampler = GpuSampler(registry=registry, nvml=fake, torch_cuda=False)
    with caplog.at_level(logging.INFO, logger="operators.telemetry.gpu"):
        assert not sampler.start()
        assert sampler.sample() == []
    assert len(caplog.records) == 1
    assert "GPU metrics off" in caplog.records[0].getMessage()
    assert list(registry.collect()) == []
    sampler.close()


def test_real_pynvml_on_this_machine_does_not_crash() -> None:
    registry = CollectorRegistry()
    sampler = GpuSampler(registry=registry)
    started = sampler.start()
    try:
        names = {f.name for f in registry.collect()}
        if not started:
            assert not any(n.startswith("streamsight_gpu_") for n in names)
    finally:
        sampler.close()


class FakeNvmlWithMemoryV2(FakeNvml):
    """Fake NVML (stand-in for pynvml) with the v2 memory query, which reports what the
    driver reserves apart from `used`, as nvidia-smi shows it."""

    nvmlMemory_v2 = 0x02000028

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> object:
        if version == self.nvmlMemory_v2:
            return SimpleNamespace(used=1024**3, reserved=512 * 1024**2, total=80 * 1024**3)
        return SimpleNamespace(used=1024**3 + 512 * 1024**2, total=80 * 1024**3, free=0)


def test_memory_used_leaves_out_driver_reserved_memory_like_nvidia_smi() -> None:
    registry = CollectorRegistry()
    sampler = GpuSampler(registry=registry, nvml=FakeNvmlWithMemoryV2(devices=1), torch_cuda=False)
    assert sampler.init()
    sampler.sample()
    assert gpu_value(registry, "streamsight_gpu_memory_used_bytes", "0") == 1024**3
