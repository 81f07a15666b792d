"""The benchmarks run end to end in quick mode and report every figure (speed not checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.pipeline import main

pytestmark = pytest.mark.integration


def test_quick_pipeline_benchmark_reports_every_figure(tmp_path: Path) -> None:
    report = main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "pipeline.json").is_file()
    for name in ("batch_size.png", "max_delay.png", "offered_load.png"):
        assert (tmp_path / name).stat().st_size > 0
    # On CPU the workers run as the image runs them: single-worker processes, one cluster.
    assert report["layout"] == {"processes": 2, "workers": 1, "name": "processes"}
    pipeline = report["pipeline"]
    assert len(pipeline["saturation"]) == 4 and len(pipeline["telemetry_on"]) == 4
    assert len(pipeline["telemetry_rounds"]) == 2
    assert len(pipeline["one_worker"]) == 2
    # Every frame is read and stored once across the processes.
    for run in pipeline["saturation"] + pipeline["telemetry_on"] + pipeline["one_worker"]:
        assert run["frames"] == 96 and run["frames_per_s"] > 0
        assert run["cpu_utilisation"] > 0 and run["peak_rss_mb"] > 0
    assert pipeline["dataflow_peak_rss_mb"] > 0
    assert set(pipeline["latency_at_70pct"]["latency_ms"]) == {"p50", "p99"}
    # The same workers as threads of one process, in the same rounds.
    other = report["other_layout"]
    assert other["layout"] == {"processes": 1, "workers": 2, "name": "threads"}
    assert len(other["saturation"]) == 4 and len(other["telemetry_on"]) == 4
    assert len(other["over_pipeline_rounds"]) == len(other["telemetry_rounds"]) == 2
    for run in other["saturation"] + other["telemetry_on"]:
        assert run["frames"] == 96 and run["frames_per_s"] > 0
    for run in other["telemetry_on"]:
        assert run["spans_exported"] >= 5 * run["frames"]
    assert len(report["naive"]["runs"]) == 2
    ceiling = report["ceilings"]["compute_bound_frames_per_s"]
    assert len(ceiling["runs"]) == 2 and ceiling["median"] > 0
    assert len(report["adaptive"]["low_load_rounds"]) == 1
    assert len(report["adaptive"]["saturation_rounds"]) == 1
    assert str(report["adaptive"]["best_fixed_size"]) in report["sweeps"]["batch_size_saturation"]
    assert report["ceilings"]["stages"]["batches"]
    assert set(report["ratios"]) == {
        "pipeline_over_naive",
        "pipeline_over_ceiling",
        "telemetry_on_over_off",
        "adaptive_over_best_fixed",
        "rss_100k_over_10k",
    }
    # Every frame's five spans (and the batches') went through the export process.
    for run in pipeline["telemetry_on"]:
        assert run["spans_exported"] >= 5 * run["frames"]
    memory = report["memory"]
    assert set(memory["runs"]) == {"300", "900"}
    for count, run in memory["runs"].items():
        assert run["frames"] == run["stored"] == int(count) and run["dead_letters"] == 0
        assert run["peak_rss_mb"] > 0
    assert report["ratios"]["rss_100k_over_10k"] == memory["rss_largest_over_smallest"] > 0
    assert set(report["sweeps"]) == {
        "batch_size_saturation",
        "batch_size_latency",
        "max_delay_latency",
        "offered_load",
    }
    assert {"saturation", "low_load", "at_70pct"} <= set(report["adaptive"])
    mid = report["adaptive"]["at_70pct_rounds"]
    assert len(mid) == 1 and set(mid[0]) == {"default", "adaptive"}
    assert report["adaptive"]["at_70pct"]["latency_ms"] == mid[0]["adaptive"]
