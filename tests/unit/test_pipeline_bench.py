"""The benchmark's GPU utilisation: averaged over the rate's window only."""

from __future__ import annotations

from bench.pipeline import GpuUtilisation


def test_gpu_utilisation_is_averaged_over_the_window_asked() -> None:
    gpu = GpuUtilisation()
    # Idle while the flow starts (t < 10) and ends (t > 20), busy in between.
    gpu.samples = [(t, 0.0 if t < 10 or t > 20 else 95.0) for t in range(0, 31)]
    assert gpu.mean_between(10, 20) == 95.0
    assert gpu.mean == round(11 * 95.0 / 31, 1)
    assert gpu.mean_between(40, 50) is None
    assert GpuUtilisation().mean is None
