"""The adaptive batch-size controller, driven by a simulated clock and cost model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from operators.adaptive import EFFICIENCY, AdaptiveBatching, AdaptiveBounds, BatchLimits
from operators.batching import batch_logic_builder
from tests.unit.operators.test_batching import frame

FIXED_S, PER_FRAME_S = 0.004, 0.0011  # cost model like the CPU detector: t(b) = a + c*b


def cost(size: int) -> float:
    return FIXED_S + PER_FRAME_S * size


def efficient(limit: int) -> int:
    """The smallest size within `EFFICIENCY` of the frames per second of `limit`."""
    return next(s for s in range(1, limit + 1) if s / cost(s) >= EFFICIENCY * limit / cost(limit))


def simulate(
    controller: AdaptiveBatching,
    rate: float,
    seconds: float,
    *,
    keys: int = 4,
    start: float = 0,
    pass_s: Callable[[int], float] = cost,
    timed: bool = False,
) -> tuple[float, float, list[int]]:
    """A single model serving `keys` streams that together offer `rate` frames/s (or a
    backlog when rate is 0), its passes taking `pass_s(size)`, their ends told to the
    controller when `timed`; returns (frames/s served, worst latency in s, sizes chosen)."""
    now = start
    queue: list[float] = []  # arrival times
    served, worst, sizes = 0, 0.0, []
    next_arrival = start
    backlog = rate == 0
    while now < start + seconds:
        if backlog:
            while len(queue) < 256:
                queue.append(now)
        else:
            while next_arrival <= now:
                queue.append(next_arrival)
                next_arrival += 1.0 / rate
        if queue:
            controller.observe_arrivals(f"k{len(queue) % keys}", len(queue), int(now * 1e9))
        limits = controller.limits(int(now * 1e9))
        if not queue:
            now = next_arrival
            continue
        opened = queue[0]
        ready = len(queue) >= limits.max_size or now - opened >= limits.max_delay_ns / 1e9
        if not ready:
            now = max(min(opened + limits.max_delay_ns / 1e9, next_arrival), now + 1e-6)
            continue
        batch, queue = queue[: limits.max_size], queue[limits.max_size :]
        took = pass_s(len(batch))
        now += took
        ended = int(now * 1e9) if timed else None
        controller.observe_inference(len(batch), took, wait_s=now - took - batch[0], ended_ns=ended)
        worst = max(worst, now - batch[0]) if now > start + 1.0 else worst
        served += len(batch)
        sizes.append(len(batch))
    return served / (now - start), worst, sizes


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        AdaptiveBounds(min_size=4, max_size=2)
    with pytest.raises(ValueError):
        AdaptiveBounds(target_load=1.5)
    with pytest.raises(ValueError):
        AdaptiveBounds(latency_slo_s=0)


def test_starts_from_the_initial_size_without_waiting() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(min_size=2, max_size=32, initial_size=8))
    assert controller.limits() == BatchLimits(8, 0)
    assert controller.cost_s(8) is None
    assert AdaptiveBatching(AdaptiveBounds(max_size=64)).limits().max_size == 16
    assert AdaptiveBatching(AdaptiveBounds(max_size=1)).limits() == BatchLimits(1, 0)
    with pytest.raises(ValueError):
        AdaptiveBounds(max_size=8, initial_size=16)


def test_a_flow_started_on_a_backlog_takes_the_largest_batches_from_the_first() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    controller.observe_arrivals("k", 100, 0, age_s=0.05)
    assert controller.limits() == BatchLimits(16, 0)
    controller.observe_arrivals("k", 100, 1_000_000, age_s=1.5)  # older than the SLO
    assert controller.limits() == BatchLimits(64, 50_000_000)


def test_learns_a_linear_cost_model() -> None:
    controller = AdaptiveBatching(AdaptiveBounds())
    for size in (1, 4, 16, 32, 8):
        controller.observe_inference(size, cost(size))
    for size in (1, 10, 64):
        assert controller.cost_s(size) == pytest.approx(cost(size), rel=1e-6)


def test_low_load_keeps_batches_small_and_latency_low() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    fps, worst, sizes = simulate(controller, rate=40.0, seconds=10.0)
    assert fps == pytest.approx(40.0, rel=0.05)
    assert worst < 0.02
    assert max(sizes[len(sizes) // 2 :]) <= 2


def test_a_backlog_older_than_the_slo_drains_in_the_largest_batches() -> None:
    bounds = AdaptiveBounds(max_size=64, latency_slo_s=0.2)
    controller = AdaptiveBatching(bounds)
    fps, _, sizes = simulate(controller, rate=0, seconds=10.0)
    # 256 frames wait: each is 0.3 s old when its batch opens, past the SLO whatever the
    # size, so the controller drains at the most frames per second.
    assert fps >= 0.95 * 64 / cost(64)
    assert set(sizes[len(sizes) // 2 :]) == {64}


def test_a_backlog_drains_at_the_size_timed_fastest() -> None:
    # Passes of more than 32 frames cost 40 % more per frame (a CPU's caches): 32 frames
    # carry the most frames per second (816, against 740 for 16 and 624 for 64).
    def pass_s(size: int) -> float:
        return FIXED_S + PER_FRAME_S * size * (1.4 if size > 32 else 1.0)

    best = 32 / pass_s(32)
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    fps, _, sizes = simulate(controller, rate=0, seconds=10.0, pass_s=pass_s, timed=True)
    late = sizes[len(sizes) // 2 :]
    # Each size is timed, then the fastest kept; one pass in 16 times another again.
    assert {16, 32, 64} <= set(sizes[: len(sizes) // 2])
    assert late.count(32) >= 0.85 * len(late)
    assert {16, 64} & set(late)
    assert fps >= 0.95 * best


def test_a_backlog_drains_in_the_largest_batches_when_they_are_timed_fastest() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    fps, _, sizes = simulate(controller, rate=0, seconds=10.0, timed=True)
    late = sizes[len(sizes) // 2 :]
    assert late.count(64) >= 0.85 * len(late)
    assert fps >= 0.95 * 64 / cost(64)


def test_high_load_within_the_slo_stops_batches_short_of_the_largest_size() -> None:
    bounds = AdaptiveBounds(max_size=64, latency_slo_s=0.2)
    controller = AdaptiveBatching(bounds)
    fps, worst, sizes = simulate(controller, rate=700.0, seconds=10.0)
    # Batches of one frame could not keep up (700 x 5.1 ms = 357 % of the model); past
    # the size that gives 97 % of the frames per second of the largest one within half
    # the SLO, larger batches would only add latency.
    assert fps == pytest.approx(700.0, rel=0.05)
    assert worst < bounds.latency_slo_s
    fits = int((0.1 - FIXED_S) / PER_FRAME_S)
    late = sizes[len(sizes) // 2 :]
    assert max(late) <= efficient(fits) < 64
    assert sum(late) / len(late) >= 3


def test_a_backlog_past_a_tight_slo_is_drained_at_the_best_throughput() -> None:
    # Every frame waits longer than 30 ms: the SLO is lost whatever the size, so the
    # controller maximises throughput instead of keeping batches within it (15 ms).
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.03))
    fps, _, sizes = simulate(controller, rate=0, seconds=5.0)
    assert set(sizes[len(sizes) // 2 :]) == {64}
    assert fps >= 0.95 * 64 / cost(64)


def test_follows_load_up_and_down() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    _, _, low = simulate(controller, rate=30.0, seconds=5.0)
    fps, _, _ = simulate(controller, rate=600.0, seconds=5.0, start=5.0)
    assert fps == pytest.approx(600.0, rel=0.05)
    _, worst, high = simulate(controller, rate=600.0, seconds=5.0, start=10.0)
    assert worst < 0.2
    # One frame per pass at 30 frames/s; at 600 (a pass per frame would need 306 % of
    # the model) each batch takes the frames that arrived during the last pass.
    assert set(low[len(low) // 2 :]) == {1}
    assert sum(high) / len(high) >= 3
    _, _, again = simulate(controller, rate=30.0, seconds=5.0, start=15.0)
    assert set(again[len(again) // 2 :]) == {1}


def test_batch_logic_takes_its_limits_from_the_controller() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=8, latency_slo_s=0.2))
    for size in (1, 8):
        controller.observe_inference(size, cost(size))
    clock = iter(range(0, 10**12, 10**9))  # one second per reading: rate known at once
    logic = batch_logic_builder(64, 0.05, key_of=lambda f: "k", controller=controller)(None)
    logic.clock = lambda: next(clock)
    logic.on_batch([frame(0)])
    batches, _ = logic.on_batch([frame(i) for i in range(1, 21)])
    assert logic.batcher.max_size == controller.limits().max_size <= 8
    assert all(len(b.frames) <= 8 for b in batches)


def test_batch_logic_tells_the_controller_how_old_arriving_frames_are() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    logic = batch_logic_builder(64, 0.05, key_of=lambda f: "k", controller=controller)(None)
    late = [dataclasses.replace(frame(i), prepared_ns=1_000_000_000) for i in range(100)]
    batches, _ = logic.on_batch(late)  # captured 1 s before they were prepared
    assert [len(b.frames) for b in batches] == [64]


def test_a_backlog_fills_batches_up_to_the_efficient_size() -> None:
    bounds = AdaptiveBounds(max_size=256, latency_slo_s=0.2)
    controller = AdaptiveBatching(bounds)
    for size in (1, 2):
        controller.observe_inference(size, cost(size), wait_s=0.01)
    controller.observe_arrivals("k", 1, 0)
    controller.observe_arrivals("k", 10, 1_000_000_000)
    fits = int((0.1 - FIXED_S) / PER_FRAME_S)  # the largest pass within half the SLO
    # 10 frames/s: a batch is what arrived together, up to the efficient size; no wait.
    assert controller.limits() == BatchLimits(efficient(fits), 0)
    # Frames 150 ms old at dispatch: over half the SLO. The batch may take its delay
    # bound to fill from the waiting frames, up to the efficient size within the SLO.
    for _ in range(30):
        controller.observe_inference(2, cost(2), wait_s=0.15)
    assert controller.limits() == BatchLimits(efficient(fits), 50_000_000)
    # Frames older than the SLO itself: it is lost, so throughput alone bounds the size.
    controller.observe_inference(2, cost(2), wait_s=5.0)
    assert controller.limits() == BatchLimits(256, 50_000_000)


def test_frames_that_always_arrive_late_are_no_backlog() -> None:
    bounds = AdaptiveBounds(max_size=256, latency_slo_s=0.2)
    controller = AdaptiveBatching(bounds)
    controller.observe_arrivals("k", 1, 0)
    controller.observe_arrivals("k", 10, 1_000_000_000)
    # Every frame is 150 ms old when it reaches the batcher (a slow trip from the
    # cameras, or a busy worker's queue): more than half the SLO, yet nothing piles up.
    # Batches that waited to fill would only add to it.
    for size in (1, 2) * 40:
        controller.observe_inference(size, cost(size), wait_s=0.15)
    fits = int((0.1 - FIXED_S) / PER_FRAME_S)
    assert controller.limits() == BatchLimits(efficient(fits), 0)
    # 40 ms older: less than half the SLO more than the youngest recent frames.
    for _ in range(10):
        controller.observe_inference(2, cost(2), wait_s=0.19)
    assert controller.limits() == BatchLimits(efficient(fits), 0)
    # Older than the SLO: a backlog, drained at the most frames per second.
    for _ in range(10):
        controller.observe_inference(2, cost(2), wait_s=0.26)
    assert controller.limits() == BatchLimits(256, 50_000_000)


def test_a_burst_that_waited_for_the_start_is_not_read_as_the_arrival_rate() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    for size in (1, 2):
        controller.observe_inference(size, cost(size), wait_s=0.005)
    # 1,000 frames that waited 2 s for the flow's start reach the batcher in 0.5 s.
    for tick in range(51):
        controller.observe_inference(16, cost(16), wait_s=2.0)
        controller.observe_arrivals(f"k{tick % 4}", 20, tick * 10_000_000)
    assert controller.limits().max_size > 1
    # Then the cameras' own 40 frames/s, each frame fresh: one frame per batch, no wait.
    limits = []
    for tick in range(60):
        now = 500_000_000 + tick * 25_000_000
        controller.observe_arrivals(f"k{tick % 4}", 1, now)
        controller.observe_inference(1, cost(1), wait_s=0.002)
        limits.append(controller.limits(now))
    assert 30 <= controller.arrival_rate() <= 50
    assert [limit.max_delay_ns for limit in limits[-20:]] == [0] * 20


def test_one_stalled_pass_does_not_make_frames_wait() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    _, _, sizes = simulate(controller, rate=60.0, seconds=5.0)
    assert set(sizes[-20:]) == {1}
    before = controller.cost_s(1)
    assert before is not None and controller.limits().max_delay_ns == 0
    controller.observe_inference(1, 0.1)  # 20 times the usual 5.1 ms: the process stalled
    assert controller.cost_s(1) < 1.5 * before
    assert controller.limits().max_delay_ns == 0
    # A lasting change in the model's cost is followed within a few passes.
    for _ in range(20):
        controller.observe_inference(1, 3 * cost(1))
    assert controller.cost_s(1) == pytest.approx(3 * cost(1), rel=0.2)


def test_batches_do_not_shrink_below_the_sizes_measured() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    # Passes of 16 and 64 frames that cost more per frame the larger they are (two
    # workers' passes contending for the cores): the fit finds no fixed cost, so by the
    # model one frame per pass would be as fast as any batch.
    for _ in range(10):
        controller.observe_inference(16, 0.032, wait_s=0.05)
        controller.observe_inference(64, 0.150, wait_s=0.05)
    assert controller.cost_s(1) == pytest.approx(0.0025, rel=0.2)
    # A pass of one frame was never measured: the model does not speak for it.
    assert controller.limits().max_size == 16


def test_a_backlog_drains_in_batches_no_smaller_than_the_starting_size() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    # Passes of 1 to 4 frames that cost the same per frame: by the model a batch of one
    # is as fast as any, but each batch also costs a dataflow step and a sink write.
    for _ in range(8):
        for size in (1, 2, 4):
            controller.observe_inference(size, 0.002 * size, wait_s=0.001)
    assert controller.limits().max_size == 1
    for _ in range(10):
        controller.observe_inference(1, 0.002, wait_s=0.15)  # frames 150 ms old: a backlog
    assert controller.limits() == BatchLimits(16, 50_000_000)


def test_a_model_slower_than_the_slo_still_drains_a_backlog_in_large_batches() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    for size in (1, 2):
        controller.observe_inference(size, 0.15 + 0.01 * size, wait_s=5.0)
    # No batch fits the SLO: the largest drains the backlog fastest.
    assert controller.limits().max_size == 64
    assert controller.limits().max_delay_ns > 0


def test_workers_running_forward_passes_side_by_side_share_the_load() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    for size in (1, 2, 4, 8):
        controller.observe_inference(size, cost(size), worker="a")
    for tick in range(11):  # 1,000 frames/s over a second
        controller.observe_arrivals(f"k{tick % 4}", 100, tick * 100_000_000)
    size = efficient(64)
    # One worker: even full batches keep the model busy 1000 x 1.2 ms = 120 % of the
    # time, so each batch waits to fill, at most the delay bound.
    assert controller.workers() == 1
    alone = controller.limits()
    assert alone.max_size == size and alone.max_delay_ns > 0
    for worker in ("a", "b") * 4:
        controller.observe_inference(size, cost(size), worker=worker)
    # Two workers each busy 60 %: a batch takes what arrived, with no wait.
    assert controller.workers() == 2
    assert controller.limits() == BatchLimits(size, 0)
