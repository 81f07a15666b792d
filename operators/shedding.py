"""Shedding: a prepared frame older than the age limit when it reaches the batcher is
skipped, not inferred, and becomes a `stale` dead letter (its bytes stay in Kafka).

Under overload a backlog of live video is worth less than the newest frames: skipping what
is already too old to act on keeps the frames that are inferred within the limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import bytewax.operators as op
from bytewax.dataflow import Stream, operator

from operators import dead_letters as dl
from operators import stages
from operators.frames import DeadLetter, PreparedFrame

STAGE = stages.BATCH
"""Stale frames are skipped at the batcher: their dead letters are the batch stage's."""


def check_age(
    frame: PreparedFrame, *, max_age_ns: int, clock: Callable[[], int] = time.time_ns
) -> PreparedFrame | DeadLetter:
    """`frame` itself while capture to now is at most `max_age_ns`, else a `stale` letter."""
    age_ns = clock() - frame.meta.capture_ns
    if age_ns <= max_age_ns:
        return frame
    return dl.reject_decoded(
        frame.meta,
        stage=STAGE,
        reason=dl.STALE,
        detail=f"{age_ns / 1e6:.0f} ms old at the batcher, over the limit of "
        f"{max_age_ns / 1e6:.0f} ms: skipped",
    )


@dataclass(frozen=True)
class ShedOut:
    """Frames young enough to infer, and the stale ones as dead letters."""

    oks: Stream[PreparedFrame]
    errs: Stream[DeadLetter]


@operator
def shed_stale(
    step_id: str,
    up: Stream[PreparedFrame],
    max_age_ms: float,
    clock: Callable[[], int] = time.time_ns,
) -> ShedOut:
    """Split `up` into frames at most `max_age_ms` old (capture to now) and stale letters."""
    checked = op.map(
        "check_age", up, partial(check_age, max_age_ns=int(max_age_ms * 1e6), clock=clock)
    )
    split = op.branch("split_stale", checked, _is_prepared)
    return ShedOut(split.trues, split.falses)


def _is_prepared(item: object) -> bool:
    return isinstance(item, PreparedFrame)
