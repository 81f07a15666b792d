"""Shedding stale frames: the age is capture to the batcher, the limit is inclusive, and a
stale frame becomes a `stale` dead letter that keeps its identity but not its pixels."""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from operators import dead_letters as dl
from operators.shedding import check_age, shed_stale
from tests import metrics_data as data

NOW_NS = 1_800_000_000 * 10**9


def _frame(age_ms: float):
    return data.prepared(data.meta(0, capture_ns=NOW_NS - int(age_ms * 1e6)))


def test_a_frame_at_the_limit_passes_and_one_past_it_is_stale() -> None:
    fresh = _frame(500)
    assert check_age(fresh, max_age_ns=500_000_000, clock=lambda: NOW_NS) is fresh
    letter = check_age(_frame(501), max_age_ns=500_000_000, clock=lambda: NOW_NS)
    assert (letter.stage, letter.reason) == ("batch", dl.STALE)
    assert letter.payload is None
    assert letter.frame_id == fresh.meta.frame_id
    assert "501 ms old" in letter.detail


def test_shed_stale_splits_a_stream() -> None:
    frames = [_frame(age) for age in (0, 2_000, 10, 5_000)]
    kept: list = []
    skipped: list = []
    flow = Dataflow("shed")
    out = shed_stale("shed", op.input("in", flow, TestingSource(frames)), 1_000, lambda: NOW_NS)
    op.output("kept", out.oks, TestingSink(kept))
    op.output("skipped", out.errs, TestingSink(skipped))
    run_main(flow)
    assert kept == [frames[0], frames[2]]
    assert [d.reason for d in skipped] == [dl.STALE, dl.STALE]
