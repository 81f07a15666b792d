"""The benchmark's cameras: how many frames wait in the embedded broker at once, and how
far a camera held back runs ahead of the flow."""

from __future__ import annotations

import pytest

from bench.feed import (
    BROKER_MARGIN,
    MOCK_PARTITION_BYTES,
    fits_in_broker,
    frame_ticks,
    partition_bytes,
)
from bench.pipeline import FULL, QUICK, Plan
from tools.camera import synthetic_frames


def rendered(width: int, height: int, count: int = 64) -> list[bytes]:
    """`count` synthetic JPEGs at `width` x `height`, four cameras' worth."""
    return [
        f.jpeg for tick in synthetic_frames(4, count // 4, width=width, height=height) for f in tick
    ]


def test_a_partition_holds_the_bytes_of_every_fourth_frame_it_is_given() -> None:
    jpegs = [b"a" * 10, b"b" * 20, b"c" * 30, b"d" * 40, b"e" * 50]
    # Ticks of two cameras: partition 0 gets frames 0, 2, 4, 1 (10 + 30 + 50 + 20),
    # partition 1 frames 1, 3, 0, 2 (20 + 40 + 10 + 30).
    assert partition_bytes(jpegs, 8, cameras=2) == 110
    # An odd count is rounded up to whole ticks, as the cameras send them.
    assert partition_bytes(jpegs, 7, cameras=2) == 110


@pytest.mark.parametrize("plan", [FULL, QUICK], ids=["full", "quick"])
def test_a_saturation_run_at_320x240_waits_in_the_broker_before_the_flow_starts(
    plan: Plan,
) -> None:
    # A run that does not fit is fed during the run by a process that shares the cores
    # with the flow it measures, which reads about a tenth lower.
    jpegs = rendered(320, 240)
    assert fits_in_broker(jpegs, plan.saturation_frames)


def test_more_than_a_partition_keeps_does_not_fit() -> None:
    jpegs = rendered(320, 240)
    limit = (1.0 - BROKER_MARGIN) * MOCK_PARTITION_BYTES
    frames = 4 * int(limit / min(len(j) for j in jpegs) + 1)
    assert not fits_in_broker(jpegs, frames)
    assert fits_in_broker(jpegs, frames, cameras=16)
    # 1080p frames: a 240-frame run is fed during the run.
    assert not fits_in_broker(rendered(1920, 1080, 16), 240)


def test_frames_fed_alongside_a_run_stay_a_bounded_count_ahead_of_it() -> None:
    done = {"frames": 0}
    ahead: list[int] = []

    def processed() -> int:
        # The reader catches up by a tick each time it is asked.
        done["frames"] = min(done["frames"] + 4, sent["frames"])
        return done["frames"]

    sent = {"frames": 0}
    for tick in frame_ticks([b"a", b"b"], 40, processed, max_ahead=8):
        sent["frames"] += len(tick)
        ahead.append(sent["frames"] - done["frames"])
    assert sent["frames"] == 40
    assert max(ahead) <= 8
