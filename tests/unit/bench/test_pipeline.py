"""The benchmark's GPU utilisation (averaged over the rate's window only) and the rule
that no figure comes from a degenerate window."""

from __future__ import annotations

import pytest

from bench.pipeline import (
    MIN_WINDOW_FRAMES,
    MIN_WINDOW_S,
    SAMPLED_TELEMETRY_TARGET,
    TARGETS,
    FlowRun,
    GpuUtilisation,
    RunResult,
    overload_figures,
    ratio_text,
    round_ratio,
    summarise,
    telemetry_sampling,
    until_valid,
    window_problem,
)


def test_gpu_utilisation_is_averaged_over_the_window_asked() -> None:
    gpu = GpuUtilisation()
    # Idle while the flow starts (t < 10) and ends (t > 20), busy in between.
    gpu.samples = [(t, 0.0 if t < 10 or t > 20 else 95.0) for t in range(0, 31)]
    assert gpu.mean_between(10, 20) == 95.0
    assert gpu.mean == round(11 * 95.0 / 31, 1)
    assert gpu.mean_between(40, 50) is None
    assert GpuUtilisation().mean is None


def flow_run(frames: int, window_ns: int) -> FlowRun:
    """A run whose `frames` rows were written evenly over `window_ns` after the first."""
    start = 10**18
    step = window_ns // max(frames - 1, 1)
    rows = [(start - 5_000_000, start - 4_000_000, start + i * step, 16) for i in range(frames)]
    return FlowRun(rows=rows, cpu_s=1.0, wall_s=1.0)


def test_a_window_of_too_few_frames_or_too_short_is_invalid() -> None:
    # The degenerate quick run that once reported a ratio of 17.0.
    problem = window_problem(96, 0.002)
    assert problem is not None and "96 frames" in problem and "2 ms" in problem
    assert window_problem(MIN_WINDOW_FRAMES - 1, 10.0) is not None
    assert window_problem(10_000, MIN_WINDOW_S * 0.9) is not None
    assert window_problem(MIN_WINDOW_FRAMES, MIN_WINDOW_S) is None


def test_a_run_carries_its_window_and_whether_it_is_valid() -> None:
    short = summarise(flow_run(96, 2_000_000))
    assert not short.valid and short.problem is not None
    assert short.as_dict()["window"] == {
        "frames": 95,
        "seconds": 0.002,
        "valid": False,
        "problem": short.problem,
    }
    long = summarise(flow_run(1_201, 2_000_000_000))
    assert long.valid and long.problem is None
    assert long.as_dict()["window"]["frames"] == 1_200


def result(fps: float, *, valid: bool = True) -> RunResult:
    frames, seconds = (1_000, 1_000 / fps) if valid else (96, 0.002)
    return RunResult(
        frames=frames,
        seconds=seconds,
        cpu_util=0.5,
        fps=fps,
        latency_ms={"p50": 1.0, "p99": 2.0},
        mean_batch=16.0,
        peak_rss_mb=1.0,
        window_frames=frames,
    )


def test_an_invalid_window_is_rerun_with_more_frames_a_bounded_number_of_times() -> None:
    asked: list[int] = []

    def run_at(frames: int) -> RunResult:
        asked.append(frames)
        return result(100.0, valid=len(asked) == 3)

    final = until_valid(run_at, 96, reruns=4, max_frames=100_000)
    assert final.valid and len(asked) == 3
    assert asked[0] == 96 and asked[1] > asked[0] and asked[2] > asked[1]
    assert all(n % 4 == 0 for n in asked)  # whole ticks of the cameras

    asked.clear()
    never = until_valid(lambda n: (asked.append(n), result(100.0, valid=False))[1], 96, 2, 10**6)
    assert not never.valid and len(asked) == 3
    asked.clear()
    capped = until_valid(lambda n: (asked.append(n), result(100.0, valid=False))[1], 96, 9, 1_000)
    assert max(asked) <= 1_000 and not capped.valid


def test_a_ratio_comes_only_from_rounds_whose_windows_are_all_valid() -> None:
    good = [([result(100.0)], [result(95.0)]), ([result(100.0)], [result(90.0)])]
    ratio = round_ratio(good)
    assert ratio.value == pytest.approx(0.925) and ratio.problem is None
    assert ratio.rounds == [pytest.approx(0.95), pytest.approx(0.9)]
    # A round with one degenerate run is left out; the ratio is the valid rounds' median.
    mixed = [([result(100.0)], [result(1_700.0, valid=False)]), *good[:1]]
    ratio = round_ratio(mixed)
    assert ratio.value == pytest.approx(0.95) and ratio.rounds == [None, pytest.approx(0.95)]
    # With none valid there is no figure, only the reason.
    degenerate = [([result(100.0, valid=False)], [result(1_700.0, valid=False)])]
    ratio = round_ratio(degenerate)
    assert ratio.value is None and ratio.problem is not None and "96 frames" in ratio.problem
    assert ratio_text(ratio) == f"invalid: {ratio.problem}"
    assert "17" not in ratio_text(ratio)


def test_an_overload_run_accounts_for_every_frame_and_the_lag_when_the_load_ends() -> None:
    t0 = 10**18
    ms = 1_000_000
    # Ten frames captured 100 ms apart, each written 50 ms later; three skipped as stale
    # and one other dead letter, written 200 ms after the load ended; one frame never seen.
    rows = [
        (t0 + i * 100 * ms, t0 + i * 100 * ms, t0 + i * 100 * ms + 50 * ms, 4) for i in range(10)
    ]
    letters = [("stale", t0 + 1_200 * ms)] * 3 + [("bad_image", t0 + 1_200 * ms)]
    run = FlowRun(rows=rows, cpu_s=1.0, wall_s=1.0, letters=letters)
    figures = overload_figures(run, 15, t0, t0 + 1_000 * ms, warm_up_s=0.2)
    assert figures["processed"] == 10 and figures["skipped_stale"] == 3
    assert figures["dead_letters"] == 1 and figures["unaccounted"] == 1
    # The frames captured in the warm-up are left out of the latency.
    assert figures["latency_frames"] == 8
    assert figures["latency_ms"] == {"p50": 50.0, "p99": 50.0}
    # When the load ended, the ten processed frames were done: five were still waiting.
    assert figures["lag_at_end"] == 5 and figures["catch_up_s"] == 0.2
    timeline = figures["lag_timeline"]
    assert timeline[0] == [0.0, 0] and timeline[-1][1] == 1
    assert [t for t, _ in timeline] == sorted(t for t, _ in timeline)
    assert len(figures["latency_points"]) == 10


@pytest.mark.parametrize(
    ("sampler", "arg", "label", "target"),
    [
        (None, None, "every frame traced", TARGETS["telemetry_on_over_off"]),
        ("parentbased_always_on", None, "every frame traced", TARGETS["telemetry_on_over_off"]),
        ("parentbased_traceidratio", "1", "every frame traced", TARGETS["telemetry_on_over_off"]),
        ("parentbased_traceidratio", "0.1", "10% of frames traced", SAMPLED_TELEMETRY_TARGET),
        ("always_off", None, "no frame traced", SAMPLED_TELEMETRY_TARGET),
    ],
)
def test_telemetrys_target_follows_the_configured_sampling(
    monkeypatch: pytest.MonkeyPatch, sampler: str | None, arg: str | None, label: str, target: float
) -> None:
    for name, value in (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", arg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert telemetry_sampling() == (label, target)
    assert TARGETS["telemetry_on_over_off"] == 0.90 and SAMPLED_TELEMETRY_TARGET == 0.97
