"""The benchmark's code path, end to end in quick mode (every part once, on a few frames):
it reports every figure (speed not checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.pipeline import main

pytestmark = pytest.mark.integration


WINDOW_RATIOS = (
    "pipeline_over_naive",
    "pipeline_over_ceiling",
    "telemetry_on_over_off",
    "adaptive_over_best_fixed",
)


def test_quick_pipeline_benchmark_reports_every_figure(tmp_path: Path) -> None:
    # The workers as threads of this process (no cluster to form for each run); the
    # other layout, single-worker processes, runs in the same rounds.
    report = main(["--quick", "--layout", "threads", "--out", str(tmp_path)])
    assert (tmp_path / "pipeline.json").is_file()
    for name in ("batch_size.png", "max_delay.png", "offered_load.png", "overload.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "adaptive.png").stat().st_size > 0
    assert report["frame_size"] == [320, 240] and report["model_input_size"] == [160, 120]
    # A quick run's windows (96 frames) are too short to be figures: its ratios say why
    # instead of giving a number, and the run says its ratios are indicative.
    assert report["indicative"] is True
    for name in WINDOW_RATIOS:
        assert report["ratios"][name] is None, name
        assert "a rate needs at least 500 frames" in report["ratio_details"][name]["problem"]
    assert report["layout"] == {"processes": 1, "workers": 2, "name": "threads"}
    pipeline = report["pipeline"]
    # One round: telemetry off, on, on, off.
    assert len(pipeline["saturation"]) == 2 and len(pipeline["telemetry_on"]) == 2
    assert len(pipeline["telemetry_rounds"]) == 1
    assert len(pipeline["one_worker"]) == 1
    for run in pipeline["saturation"] + pipeline["telemetry_on"] + pipeline["one_worker"]:
        assert run["frames"] == 96 and run["frames_per_s"] > 0
        assert run["cpu_utilisation"] > 0 and run["peak_rss_mb"] > 0
    # Runs in this process: the dataflow has no memory of its own to report.
    assert pipeline["dataflow_peak_rss_mb"] is None
    assert set(pipeline["latency_at_70pct"]["latency_ms"]) == {"p50", "p99"}
    # The same workers as single-worker processes (one cluster), in the same rounds;
    # every frame read and stored once across the processes.
    other = report["other_layout"]
    assert other["layout"] == {"processes": 2, "workers": 1, "name": "processes"}
    assert len(other["saturation"]) == 2 and len(other["telemetry_on"]) == 2
    assert len(other["over_pipeline_rounds"]) == len(other["telemetry_rounds"]) == 1
    for run in other["saturation"] + other["telemetry_on"]:
        assert run["frames"] == 96 and run["frames_per_s"] > 0 and run["peak_rss_mb"] > 0
    for run in other["telemetry_on"]:
        assert run["spans_exported"] >= 5 * run["frames"]
    assert len(report["naive"]["runs"]) == 1
    ceiling = report["ceilings"]["compute_bound_frames_per_s"]
    assert len(ceiling["runs"]) == 1 and ceiling["median"] > 0
    assert len(report["adaptive"]["low_load_rounds"]) == 1
    assert set(report["adaptive"]["by_load"]) == {"0.7"}
    for at in report["adaptive"]["by_load"].values():
        assert len(at["p99_default_over_adaptive_rounds"]) == 1
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
    # Overload, with and without the age limit: every frame offered is processed,
    # dead-lettered or skipped as stale. A quick run's capacity is no figure, so it
    # offers no more frames than its plan allows.
    overload = report["overload"]
    assert overload["cameras"] == 16 and overload["seconds"] > 0
    assert 0 < overload["without_limit"]["sent"] <= 640 + 16
    assert overload["without_limit"]["max_frame_age_ms"] == 0
    assert overload["with_limit"]["max_frame_age_ms"] == 1000
    for run in (overload["without_limit"], overload["with_limit"]):
        assert run["sent"] > 0 and run["unaccounted"] == 0
        assert run["processed"] + run["skipped_stale"] + run["dead_letters"] == run["sent"]
        assert run["lag_timeline"] and set(run["latency_ms"]) == {"p50", "p99"}
    assert overload["without_limit"]["skipped_stale"] == 0


def test_large_frames_are_fed_during_the_run_and_the_report_names_the_sizes(
    tmp_path: Path,
) -> None:
    # 1080p frames: more than the embedded broker keeps of a partition (5 MiB), so the
    # saturation runs publish alongside the flow, never far ahead of it.
    report = main(
        [
            "--quick",
            "--out",
            str(tmp_path),
            "--frame-size",
            "1920x1080",
            "--input-size",
            "320x180",
            "--parts",
            "throughput",
            "--frames",
            "240",
        ]
    )
    assert report["frame_size"] == [1920, 1080] and report["model_input_size"] == [320, 180]
    assert report["ceilings"]["stages"]["frame_size"] == [1920, 1080]
    assert report["parts"] == ["throughput"]
    # On CPU the workers run as the image runs them: single-worker processes, one
    # cluster; every frame read and stored once across them.
    assert report["layout"] == {"processes": 2, "workers": 1, "name": "processes"}
    assert report["pipeline"]["dataflow_peak_rss_mb"] > 0
    assert report["pipeline"]["saturation"]
    for run in report["pipeline"]["saturation"]:
        assert run["frames"] == 240 and run["peak_rss_mb"] > 0
    assert "sweeps" not in report and "overload" not in report and "adaptive" not in report
