"""The adaptive batch-size controller, driven by a simulated clock and cost model."""

from __future__ import annotations

import pytest

from operators.adaptive import AdaptiveBatching, AdaptiveBounds, BatchLimits
from operators.batching import batch_logic_builder
from tests.unit.test_batching import frame

FIXED_S, PER_FRAME_S = 0.004, 0.0011  # cost model like the CPU detector: t(b) = a + c*b


def cost(size: int) -> float:
    return FIXED_S + PER_FRAME_S * size


def simulate(
    controller: AdaptiveBatching, rate: float, seconds: float, *, keys: int = 4, start: float = 0
) -> tuple[float, float, list[int]]:
    """A single model serving `keys` streams that together offer `rate` frames/s (or a
    backlog when rate is 0); returns (frames/s served, worst latency in s, sizes chosen)."""
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
        took = cost(len(batch))
        now += took
        controller.observe_inference(len(batch), took, wait_s=now - took - batch[0])
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


def test_saturation_grows_batches_to_the_slo_bound() -> None:
    bounds = AdaptiveBounds(max_size=64, latency_slo_s=0.2)
    controller = AdaptiveBatching(bounds)
    fps, _, sizes = simulate(controller, rate=0, seconds=10.0)
    best_fixed = 64 / cost(64)
    assert fps >= 0.95 * best_fixed
    assert cost(sizes[-1]) <= bounds.latency_slo_s / 2


def test_a_backlog_past_a_tight_slo_is_drained_with_the_largest_batches() -> None:
    # Every frame waits longer than 30 ms: the SLO is lost whatever the size, so the
    # controller maximises throughput instead of keeping batches within it.
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.03))
    fps, _, sizes = simulate(controller, rate=0, seconds=5.0)
    assert min(sizes[len(sizes) // 2 :]) == 64
    assert fps >= 0.95 * 64 / cost(64)


def test_follows_load_up_and_down() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    simulate(controller, rate=30.0, seconds=5.0)
    low = controller.limits().max_size
    fps, _, _ = simulate(controller, rate=600.0, seconds=5.0, start=5.0)
    assert fps == pytest.approx(600.0, rel=0.05)
    _, worst, _ = simulate(controller, rate=600.0, seconds=5.0, start=10.0)
    high = controller.limits().max_size
    assert worst < 0.2
    assert high > low
    simulate(controller, rate=30.0, seconds=5.0, start=15.0)
    assert controller.limits().max_size <= low + 1


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


def test_a_backlog_takes_the_largest_size_the_slo_allows() -> None:
    bounds = AdaptiveBounds(max_size=256, latency_slo_s=0.2)
    controller = AdaptiveBatching(bounds)
    for size in (1, 2):
        controller.observe_inference(size, cost(size), wait_s=0.01)
    controller.observe_arrivals("k", 1, 0)
    controller.observe_arrivals("k", 10, 1_000_000_000)
    assert controller.limits().max_size == 1
    # Frames 150 ms old at dispatch: over half the SLO, so the largest batch that fits it.
    for _ in range(30):
        controller.observe_inference(2, cost(2), wait_s=0.15)
    assert controller.limits().max_size == round((0.1 - FIXED_S) / PER_FRAME_S)
    # Frames older than the SLO itself: it is lost, so the largest batch of all.
    controller.observe_inference(2, cost(2), wait_s=5.0)
    assert controller.limits().max_size == 256
    # The frames are waiting: the batch may take its delay bound to fill from them.
    assert controller.limits().max_delay_ns == 50_000_000


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
    assert limits[-20:] == [BatchLimits(1, 0)] * 20


def test_one_stalled_pass_does_not_make_frames_wait() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    simulate(controller, rate=60.0, seconds=5.0)
    steady = controller.limits()
    assert steady == BatchLimits(1, 0)
    controller.observe_inference(1, 0.1)  # 20 times the usual 5.1 ms: the process stalled
    assert controller.limits() == steady
    # A lasting change in the model's cost is followed within a few passes.
    for _ in range(20):
        controller.observe_inference(1, 3 * cost(1))
    assert controller.cost_s(1) == pytest.approx(3 * cost(1), rel=0.2)


def test_a_model_slower_than_the_slo_still_drains_a_backlog_in_large_batches() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    for size in (1, 2):
        controller.observe_inference(size, 0.15 + 0.01 * size, wait_s=5.0)
    assert controller.limits().max_size == 64
    assert controller.limits().max_delay_ns > 0


def test_workers_running_forward_passes_side_by_side_share_the_load() -> None:
    controller = AdaptiveBatching(AdaptiveBounds(max_size=64, latency_slo_s=0.2))
    for size in (1, 2, 4, 8):
        controller.observe_inference(size, cost(size), worker="a")
    for tick in range(11):  # 200 frames/s over a second
        controller.observe_arrivals(f"k{tick % 4}", 20, tick * 100_000_000)
    # One worker: a pass per frame would keep the model busy 200 x 5.1 ms = 102 % of
    # the time, so frames are paired (62 %), waiting for each other at most the delay.
    assert controller.workers() == 1
    alone = controller.limits()
    assert alone.max_size == 2 and alone.max_delay_ns > 0
    for worker in ("a", "b") * 4:
        controller.observe_inference(1, cost(1), worker=worker)
    # Two workers each busy 51 % with a pass per frame: no need to wait for a second one.
    assert controller.workers() == 2
    assert controller.limits() == BatchLimits(1, 0)
