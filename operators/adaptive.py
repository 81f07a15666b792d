"""Adaptive batching: an online controller that picks each batch's size and delay bounds.

The controller learns the model's cost per batch, `t(b) = fixed + per_frame * b` (least
squares over exponentially weighted observations), and the arrival rate of frames. The
size bound is the smallest batch that comes within 3 % of the frames per second of the
largest one whose forward pass fits half the latency SLO: larger batches would gain
little, and a worker runs one pass at a time, so every stream it serves waits for each.
With no delay, a batch holds whatever arrived together: one frame at low load, and as
load grows, the frames that arrived during the last pass, so batches follow load on
their own. A batch waits to fill only when even full batches would keep the model busier
than `target_load` (with several worker threads running forward passes side by side,
the load is shared among them): the delay is then the time it needs to fill at the
observed rate, capped so that waiting plus the forward pass stays within the SLO.

When frames pile up before the batcher (a backlog: they reach it more than half the SLO
older than the youngest of the recent passes' frames), the batch takes the configured
delay bound to fill from the waiting frames, and is no smaller than the starting size.
Once frames are older than the SLO, or when no batch fits it (a heavy model), the SLO is
lost whatever the size: the backlog then drains at the size that carries the most frames
per second through a worker's whole cycle, timed pass end to pass end for the starting
size, its doublings and the largest (the largest is not always fastest: on CPU a pass of
64 frames can cost more per frame than one of 16). The age that
frames always have there (their trip from the camera, a busy worker's queue at high
load) is no backlog. Arrivals during a backlog do not count toward the arrival rate:
they come as fast as they are read, not as the cameras send them.

Pure logic driven by explicit clock readings (integer nanoseconds), safe to share between
the worker threads of a process.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

RECENT_PASSES = 64
"""How many recent forward passes say how many workers run them."""
RECENT_SIZES = 32
"""How many recent forward passes bound the sizes the cost model speaks for (their weight
in the fit: the oldest of them counts 0.9 ** 32 = 4 % as much as the newest)."""
OUTLIER_FACTOR = 3.0
"""A forward pass counts toward the cost model as at most this many times its estimate."""
EFFICIENCY = 0.97
"""Batches grow only while they still gain more than this share of the largest allowed
batch's frames per second."""
DRAIN_SAMPLES = 3
"""Passes timed at each drain size before the controller settles on the fastest."""
DRAIN_PROBE_EVERY = 16
"""Once settled, one drain pass in this many goes to the size timed longest ago."""
RECENT_CYCLES = 8
"""How many recent timed passes of a drain size say how fast it drains."""


@dataclass(frozen=True, slots=True)
class AdaptiveBounds:
    """What the controller may choose and what it aims for."""

    min_size: int = 1
    max_size: int = 64
    max_delay_s: float = 0.05
    latency_slo_s: float = 0.2
    target_load: float = 0.8
    decay: float = 0.9
    rate_window_s: float = 0.5
    initial_size: int | None = None
    """The size to start from, before any batch has been measured (default: `max_size`,
    capped at 16): a fixed setting that works, which the controller then tunes."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        if self.max_delay_s < 0 or self.latency_slo_s <= 0:
            raise ValueError("max_delay_s must be >= 0 and latency_slo_s > 0")
        if not 0 < self.target_load < 1 or not 0 < self.decay < 1:
            raise ValueError("target_load and decay must be in (0, 1)")
        if self.initial_size is not None and not (
            self.min_size <= self.initial_size <= self.max_size
        ):
            raise ValueError("need min_size <= initial_size <= max_size")

    def start(self) -> BatchLimits:
        """The limits before anything is known: `initial_size` with no delay. Frames
        arrive in bursts of a whole fetch: starting at size 1 would cut a first backlog
        into batches of one, while a batch of what arrived together takes a burst whole
        and keeps a single frame at low load from waiting."""
        size = self.initial_size or max(self.min_size, min(self.max_size, 16))
        return BatchLimits(size, 0)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The bounds for the next batch: flush at `max_size` frames or after `max_delay_ns`."""

    max_size: int
    max_delay_ns: int


class AdaptiveBatching:
    """Chooses batch limits from observed inference cost and arrival rate."""

    def __init__(self, bounds: AdaptiveBounds) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        # Weighted sums for the least-squares fit of seconds = fixed + per_frame * size.
        self._w = self._wx = self._wy = self._wxx = self._wxy = 0.0
        self._sizes: set[int] = set()
        self._rate = 0.0
        self._window_start: int | None = None
        self._window_frames = 0
        self._keys: dict[str, int] = {}
        self._wait_s = 0.0
        self._workers: deque[Hashable] = deque(maxlen=RECENT_PASSES)
        self._recent_sizes: deque[int] = deque(maxlen=RECENT_SIZES)
        self._recent_waits: deque[float] = deque(maxlen=RECENT_PASSES)
        # Draining a backlog: the frames per second each drain size carried through a
        # worker's whole cycle (pass end to pass end), and when each was last timed.
        self._drain_rates: dict[int, deque[float]] = {}
        self._drain_timed: dict[int, int] = {}
        self._drain_passes = 0
        self._draining = False
        self._last_end: dict[Hashable, tuple[int, bool]] = {}
        self._drain_sizes = self._drain_candidates()
        self._limits = bounds.start()

    # Observations ---------------------------------------------------------------------

    def observe_arrivals(self, key: str, frames: int, now_ns: int, age_s: float = 0.0) -> None:
        """`frames` frames of stream `key` reached the batcher at `now_ns`, the first of
        them `age_s` old (since capture)."""
        with self._lock:
            self._keys[key] = now_ns
            if self._w == 0 and age_s > self._wait_s:
                # Before any forward pass the arrivals' age is all that is known of the
                # wait: a flow started on a backlog drains it from its first batch.
                self._wait_s = age_s
                self._update()
            if self._backlog():
                # A backlog: frames arrive as fast as they are read, not as they are sent
                # (a burst that waited for the flow's start-up reads as thousands per
                # second). The rate is measured afresh once the backlog has drained.
                self._rate = 0.0
                self._window_start, self._window_frames = now_ns, 0
                return
            if self._window_start is None:
                self._window_start = now_ns
            self._window_frames += frames
            elapsed = (now_ns - self._window_start) / 1e9
            if elapsed >= self.bounds.rate_window_s:
                rate = self._window_frames / elapsed
                self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
                self._window_start, self._window_frames = now_ns, 0
                self._update()

    def observe_inference(
        self,
        size: int,
        seconds: float,
        wait_s: float = 0.0,
        worker: Hashable = None,
        ended_ns: int | None = None,
    ) -> None:
        """A forward pass over `size` frames took `seconds`; its first frame was `wait_s`
        old (since capture) when it reached the batcher. `worker` names who ran it (a
        thread id): the workers among the recent passes run forward passes side by side.
        `ended_ns`, when the pass ended, times the worker's whole cycle from its previous
        pass, which is how a backlog's drain size is chosen (see `_drain_size`)."""
        if size < 1 or seconds < 0:
            return
        d = self.bounds.decay
        with self._lock:
            if ended_ns is not None:
                self._time_cycle(size, worker, ended_ns)
            expected = self._cost(size)
            if expected is not None:
                # A pass stalled by something else (the process preempted, a garbage
                # collection) says little about the model: it counts as at most a few
                # times what was expected, so the estimate follows a lasting change in a
                # few passes but one stall does not make frames wait to fill batches.
                seconds = min(seconds, OUTLIER_FACTOR * expected)
            self._workers.append(worker)
            self._recent_sizes.append(size)
            self._w = d * self._w + 1.0
            self._wx = d * self._wx + size
            self._wy = d * self._wy + seconds
            self._wxx = d * self._wxx + size * size
            self._wxy = d * self._wxy + size * seconds
            self._sizes.add(size)
            self._wait_s = 0.8 * self._wait_s + 0.2 * wait_s if self._wait_s else wait_s
            self._recent_waits.append(wait_s)
            self._update()

    def _time_cycle(self, size: int, worker: Hashable, ended_ns: int) -> None:
        """Time the worker's cycle that ended with this pass: frames per second of the
        drain size it ran at, when this pass and the one before were both draining (a
        busy worker; otherwise the cycle holds idle time)."""
        previous = self._last_end.get(worker)
        self._last_end[worker] = (ended_ns, self._draining)
        if previous is None or not (previous[1] and self._draining) or ended_ns <= previous[0]:
            return
        drain = next((c for c in self._drain_sizes if c >= size), self.bounds.max_size)
        rates = self._drain_rates.setdefault(drain, deque(maxlen=RECENT_CYCLES))
        rates.append(size * 1e9 / (ended_ns - previous[0]))
        self._drain_passes += 1
        self._drain_timed[drain] = self._drain_passes

    # Model ----------------------------------------------------------------------------

    def cost_s(self, size: int) -> float | None:
        """Estimated seconds of one forward pass over `size` frames (None before any)."""
        with self._lock:
            return self._cost(size)

    def _cost(self, size: int) -> float | None:
        if self._w == 0:
            return None
        mean_x, mean_y = self._wx / self._w, self._wy / self._w
        var = self._wxx / self._w - mean_x * mean_x
        if len(self._sizes) < 2 or var <= 1e-12:
            # One size seen: assume the cost is per frame (the pessimistic reading).
            return mean_y * size / max(mean_x, 1.0)
        slope = (self._wxy / self._w - mean_x * mean_y) / var
        slope = max(slope, 0.0)
        fixed = max(mean_y - slope * mean_x, 0.0)
        if slope == 0.0 and fixed == 0.0:
            return mean_y
        return fixed + slope * size

    def workers(self) -> int:
        """Workers that ran the recent forward passes (at least 1)."""
        with self._lock:
            return self._worker_count()

    def _worker_count(self) -> int:
        return max(len(set(self._workers)), 1)

    def arrival_rate(self) -> float:
        """Frames per second reaching the batcher, over all stream keys."""
        with self._lock:
            return self._rate

    # Decision -------------------------------------------------------------------------

    def _backlog(self) -> bool:
        """Whether frames wait in a backlog: they reach the batcher older than the SLO, or
        more than half of it older than the youngest of the recent passes. The age a frame
        always has there (its trip from the camera, decoding, a busy worker's queue at
        high load) is no backlog: batches that wait to fill would only add to it."""
        slo = self.bounds.latency_slo_s
        if self._wait_s > slo:
            return True
        floor = min(self._recent_waits) if self._recent_waits else 0.0
        return self._wait_s - floor > slo / 2

    def limits(self, now_ns: int | None = None) -> BatchLimits:
        """The bounds for the next batch."""
        with self._lock:
            if now_ns is not None:
                stale = [k for k, seen in self._keys.items() if now_ns - seen > 5_000_000_000]
                for key in stale:
                    del self._keys[key]
            return self._limits

    def _efficient_size(self, limit: int) -> int:
        """The smallest size whose frames per second come within `EFFICIENCY` of those of
        `limit`: larger batches gain little more but take longer, and a worker runs one
        pass at a time, so every other stream it serves waits for it. The fit speaks
        only for the sizes recent passes had: it picks no smaller size than those (a
        model fitted to batches of 16 and 64 says little about the fixed cost of one
        frame), and until two sizes have been measured, it is `limit` itself."""
        if len(self._sizes) < 2:
            return limit
        best = limit / max(self._cost(limit) or 0.0, 1e-12)
        for size in range(max(self.bounds.min_size, min(self._recent_sizes)), limit):
            if size / max(self._cost(size) or 0.0, 1e-12) >= EFFICIENCY * best:
                return size
        return limit

    def _drain_candidates(self) -> list[int]:
        """The sizes a backlog past its SLO may drain at: the starting size, doubling up
        to the largest allowed."""
        b = self.bounds
        size = b.start().max_size
        sizes = []
        while size < b.max_size:
            sizes.append(size)
            size *= 2
        return [*sizes, b.max_size]

    def _drain_size(self) -> int:
        """The size that drains a backlog fastest once its SLO is lost. Which one that is
        depends on more than the forward pass (a batch also costs a dataflow step, a sink
        transaction and a produce; on CPU a large pass can cost more per frame than a
        smaller one), so each candidate's whole cycle is timed for a few passes, the
        largest first, then the fastest is kept, and now and then the one timed longest
        ago is timed again. Until passes are timed (no `ended_ns`), the largest."""
        candidates = self._drain_sizes
        if not self._last_end or len(candidates) == 1:
            return self.bounds.max_size
        for size in reversed(candidates):
            if len(self._drain_rates.get(size, ())) < DRAIN_SAMPLES:
                return size
        if self._drain_passes % DRAIN_PROBE_EVERY == 0:
            return min(candidates, key=lambda c: self._drain_timed.get(c, 0))
        return max(candidates, key=lambda c: statistics.median(self._drain_rates[c]))

    def _update(self) -> None:
        b = self.bounds
        slo = b.latency_slo_s
        self._draining = False
        if self._cost(1) is None and self._wait_s <= slo:
            self._limits = b.start()
            return
        # The largest size whose forward pass leaves half the SLO for waiting and queueing.
        cap = b.min_size
        for size in range(b.min_size, b.max_size + 1):
            cost = self._cost(size) or 0.0
            if cost <= slo / 2:
                cap = size
        fits = (self._cost(cap) or 0.0) <= slo / 2
        rate = self._rate
        workers = self._worker_count()
        keys = max(len(self._keys), 1)
        if self._backlog():
            # Frames reach the batcher late: a backlog, so the most frames per second.
            # They are already waiting, so the batch fills as fast as they are handed over;
            # the delay only bounds a lull (with none, each batch would hold no more than
            # one hand-over and the backlog would drain in small, slow batches).
            # Nor does it drain in batches smaller than the starting size: the cost model
            # knows the forward pass only, not the work each batch brings outside it (a
            # step of the dataflow, the sink's transaction, a produce). When frames are
            # already older than the SLO, or not even the smallest batch fits it, the SLO
            # is lost whatever the size: the backlog drains at the size that carries the
            # most frames per second through the whole flow, as timed (`_drain_size`).
            # With no pass measured yet, every size fits.
            if not fits or self._wait_s > slo:
                size = self._drain_size()
                self._draining = True
            else:
                size = max(self._efficient_size(cap), min(b.start().max_size, cap))
            delay_s = b.max_delay_s if size > 1 else 0.0
        else:
            size = self._efficient_size(cap)
            if rate <= 0 or rate * (self._cost(size) or 0.0) / size / workers <= b.target_load:
                # The model keeps up even if no batch waits to fill: a batch takes what
                # arrived together, up to `size`. At low load that is one frame; as load
                # grows, more frames arrive during each pass and the next batch takes them.
                delay_s = 0.0
            else:
                # Only full batches keep up: each waits for its frames, within the SLO.
                fill_s = size * keys / rate
                room = max(slo - (self._cost(size) or 0.0) - self._wait_s, 0.0)
                delay_s = min(fill_s, room, b.max_delay_s)
        self._limits = BatchLimits(size, int(delay_s * 1e9) if math.isfinite(delay_s) else 0)
