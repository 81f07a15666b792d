"""In-process running totals of what the sinks wrote, for live progress and the summary."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from operators.frames import DeadLetter, FrameResult


@dataclass
class Tally:
    """Counts frames, batches, duplicates and dead letters; keeps recent latencies."""

    written: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    detections: int = 0
    batch_sizes: dict[str, int] = field(default_factory=dict)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def results_written(
        self, results: Sequence[FrameResult], duplicates: int, written_ns: int
    ) -> None:
        """Record results the sink stored for the first time, and how many were repeats."""
        with self._lock:
            self.written += len(results)
            self.duplicates += duplicates
            for result in results:
                self.detections += len(result.detections)
                self.batch_sizes[result.batch_id] = result.batch_size
                self.latencies_ms.append((written_ns - result.meta.capture_ns) / 1e6)

    def dead_letters_written(self, letters: Sequence[DeadLetter]) -> None:
        """Record dead letters the sink stored."""
        with self._lock:
            self.dead_letters += len(letters)

    def mean_batch_size(self) -> float:
        """Mean frames per batch over the batches seen so far."""
        with self._lock:
            sizes = list(self.batch_sizes.values())
        return float(np.mean(sizes)) if sizes else 0.0

    def latency_percentiles(self, *qs: float) -> tuple[float, ...]:
        """Capture-to-sink latency percentiles in milliseconds (NaN when empty)."""
        with self._lock:
            values = np.fromiter(self.latencies_ms, dtype=np.float64)
        if values.size == 0:
            return tuple(float("nan") for _ in qs)
        return tuple(float(v) for v in np.percentile(values, qs))
