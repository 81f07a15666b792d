"""GPU metrics from NVML, sampled by a background thread, plus this process's CUDA memory.

Names follow Prometheus conventions (base units, ratios 0-1) and map one to one onto the
DCGM exporter's fields, so dashboards built for either read the same:

| streamsight metric                          | DCGM field                 | note              |
|---------------------------------------------|----------------------------|-------------------|
| streamsight_gpu_utilization_ratio           | DCGM_FI_DEV_GPU_UTIL       | DCGM: percent     |
| streamsight_gpu_memory_utilization_ratio    | DCGM_FI_DEV_MEM_COPY_UTIL  | DCGM: percent     |
| streamsight_gpu_memory_used_bytes           | DCGM_FI_DEV_FB_USED        | DCGM: MiB         |
| streamsight_gpu_memory_total_bytes          | DCGM_FI_DEV_FB_TOTAL       | DCGM: MiB         |
| streamsight_gpu_power_watts                 | DCGM_FI_DEV_POWER_USAGE    | watts in both     |
| streamsight_gpu_temperature_celsius         | DCGM_FI_DEV_GPU_TEMP       | degrees C in both |
| streamsight_gpu_sm_clock_hertz              | DCGM_FI_DEV_SM_CLOCK       | DCGM: MHz         |

Every GPU series has the labels `gpu` (NVML index, DCGM's `gpu`) and `uuid` (DCGM's
`UUID`); `streamsight_gpu_info` (value 1) adds `model_name` (DCGM's `modelName`).
`streamsight_cuda_memory_allocated_bytes` and `streamsight_cuda_memory_reserved_bytes`
(label `device`, e.g. `cuda:0`) are torch's own allocator figures for this process, only
once the process has initialised CUDA.

Without NVML (no driver, no GPU, or nvidia-ml-py missing) `GpuSampler.start` logs one line
and the collector yields nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "streamsight"
DEFAULT_INTERVAL_S = 1.0

DCGM_FIELDS = {
    f"{PREFIX}_gpu_utilization_ratio": "DCGM_FI_DEV_GPU_UTIL",
    f"{PREFIX}_gpu_memory_utilization_ratio": "DCGM_FI_DEV_MEM_COPY_UTIL",
    f"{PREFIX}_gpu_memory_used_bytes": "DCGM_FI_DEV_FB_USED",
    f"{PREFIX}_gpu_memory_total_bytes": "DCGM_FI_DEV_FB_TOTAL",
    f"{PREFIX}_gpu_power_watts": "DCGM_FI_DEV_POWER_USAGE",
    f"{PREFIX}_gpu_temperature_celsius": "DCGM_FI_DEV_GPU_TEMP",
    f"{PREFIX}_gpu_sm_clock_hertz": "DCGM_FI_DEV_SM_CLOCK",
}
"""streamsight GPU metric -> the DCGM exporter field it corresponds to."""

_HELP = {
    f"{PREFIX}_gpu_utilization_ratio": "Fraction of the last sample period a kernel ran.",
    f"{PREFIX}_gpu_memory_utilization_ratio": "Fraction of the sample period memory was "
    "read or written.",
    f"{PREFIX}_gpu_memory_used_bytes": "Device memory in use, all processes.",
    f"{PREFIX}_gpu_memory_total_bytes": "Device memory installed.",
    f"{PREFIX}_gpu_power_watts": "Power draw.",
    f"{PREFIX}_gpu_temperature_celsius": "GPU die temperature.",
    f"{PREFIX}_gpu_sm_clock_hertz": "Streaming multiprocessor clock.",
}


@dataclass(frozen=True)
class GpuSample:
    """One device's readings; a field NVML could not give is None."""

    index: int
    uuid: str
    name: str
    values: dict[str, float | None]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuSampler(Collector):
    """Samples every NVML device each `interval_s` on a daemon thread; `collect` serves
    the latest sample (nothing until the first one, nothing without NVML).

    `nvml` is the pynvml module (imported from nvidia-ml-py when None); `torch_cuda` is
    `torch.cuda` (imported lazily when None; pass False to leave torch out).
    """

    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        registry: CollectorRegistry | None = REGISTRY,
        nvml: ModuleType | Any | None = None,
        torch_cuda: Any = None,
    ) -> None:
        self.interval_s = interval_s
        self._nvml = nvml
        self._torch_cuda = torch_cuda
        self._handles: list[Any] = []
        self._samples: list[GpuSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = False
        self.sample_errors = 0
        if registry is not None:
            registry.register(self)

    def init(self) -> bool:
        """Load and initialise NVML and list the devices; False (logged once) when there is
        no NVML or no device."""
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            count = int(self._nvml.nvmlDeviceGetCount())
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            log.info("GPU metrics off: NVML not available (%s)", exc)
            return False
        if not self._handles:
            log.info("GPU metrics off: NVML reports no GPU")
            return False
        self.available = True
        log.info("GPU metrics on: %d device(s) sampled every %.1fs", count, self.interval_s)
        return True

    def _read(self, index: int, handle: Any) -> GpuSample:
        nvml = self._nvml
        values: dict[str, float | None] = {}

        def read(name: str, getter: Any) -> None:
            try:
                values[name] = float(getter())
            except Exception:
                values[name] = None

        utilization: list[Any] = []

        def util(attr: str) -> float:
            if not utilization:
                utilization.append(nvml.nvmlDeviceGetUtilizationRates(handle))
            return getattr(utilization[0], attr) / 100.0

        memory: list[Any] = []

        def mem(attr: str) -> float:
            if not memory:
                memory.append(_memory_info(nvml, handle))
            return getattr(memory[0], attr)

        read(f"{PREFIX}_gpu_utilization_ratio", lambda: util("gpu"))
        read(f"{PREFIX}_gpu_memory_utilization_ratio", lambda: util("memory"))
        read(f"{PREFIX}_gpu_memory_used_bytes", lambda: mem("used"))
        read(f"{PREFIX}_gpu_memory_total_bytes", lambda: mem("total"))
        read(f"{PREFIX}_gpu_power_watts", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        read(
            f"{PREFIX}_gpu_temperature_celsius",
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        )
        read(
            f"{PREFIX}_gpu_sm_clock_hertz",
            lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM) * 1e6,
        )
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except Exception:
            uuid = ""
        try:
            name = _text(nvml.nvmlDeviceGetName(handle))
        except Exception:
            name = ""
        return GpuSample(index, uuid, name, values)

    def sample(self) -> list[GpuSample]:
        """Read every device now, keep the result for `collect`, and return it."""
        if not self.available:
            return []
        samples = [self._read(i, handle) for i, handle in enumerate(self._handles)]
        self.sample_errors += sum(v is None for s in samples for v in s.values.values())
        with self._lock:
            self._samples = samples
        return samples

    def _cuda_memory(self) -> list[tuple[str, float, float]]:
        cuda = self._torch_cuda
        if cuda is False:
            return []
        try:
            if cuda is None:
                import torch

                cuda = torch.cuda
            if not (cuda.is_available() and cuda.is_initialized()):
                return []
            return [
                (f"cuda:{i}", float(cuda.memory_allocated(i)), float(cuda.memory_reserved(i)))
                for i in range(cuda.device_count())
            ]
        except Exception:
            return []

    def collect(self) -> Iterable[Metric]:
        """The latest sample as gauges, and torch's CUDA memory when CUDA is in use."""
        with self._lock:
            samples = list(self._samples)
        families: list[Metric] = []
        if samples:
            info = GaugeMetricFamily(
                f"{PREFIX}_gpu_info", "GPU model, value 1.", labels=["gpu", "uuid", "model_name"]
            )
            for s in samples:
                info.add_metric([str(s.index), s.uuid, s.name], 1.0)
            families.append(info)
            for name, help_text in _HELP.items():
                family = GaugeMetricFamily(name, help_text, labels=["gpu", "uuid"])
                for s in samples:
                    value = s.values.get(name)
                    if value is not None:
                        family.add_metric([str(s.index), s.uuid], value)
                families.append(family)
        cuda = self._cuda_memory()
        if cuda:
            allocated = GaugeMetricFamily(
                f"{PREFIX}_cuda_memory_allocated_bytes",
                "Device memory held by this process's tensors (torch).",
                labels=["device"],
            )
            reserved = GaugeMetricFamily(
                f"{PREFIX}_cuda_memory_reserved_bytes",
                "Device memory reserved by this process's torch caching allocator.",
                labels=["device"],
            )
            for device, alloc, res in cuda:
                allocated.add_metric([device], alloc)
                reserved.add_metric([device], res)
            families += [allocated, reserved]
        return families

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as exc:  # a sampling failure must not end the thread
                log.debug("GPU sample failed: %s", exc)
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> bool:
        """Initialise NVML and start sampling; False (no thread) when NVML is unavailable."""
        if self._thread is not None:
            return True
        if not self.available and not self.init():
            return False
        self._thread = threading.Thread(target=self._run, name="streamsight-gpu", daemon=True)
        self._thread.start()
        return True

    def close(self) -> None:
        """Stop sampling and shut NVML down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None
        if self.available:
            self.available = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown: %s", exc)


def _memory_info(nvml: Any, handle: Any) -> Any:
    """Device memory as nvidia-smi reports it: the v2 query, whose `used` leaves out what
    the driver reserves (the v1 query counts it as used); v1 where v2 is missing."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except (TypeError, getattr(nvml, "NVMLError", TypeError)):
            pass
    return nvml.nvmlDeviceGetMemoryInfo(handle)
