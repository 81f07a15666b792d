"""The pipeline benchmark: `python -m bench.pipeline [--quick] [--out DIR]`.

On the embedded broker, with synthetic frames rendered once and re-published, it measures
the dataflow at saturation (a topic filled before the flow starts) and at paced offered
loads, the naive consume-decode-infer-produce loop a user would write first, and the
compute-bound ceiling (decode + preprocess + model on frames in memory). It prints a
table, writes `pipeline.json` and PNG plots to `--out`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import pickle
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from bytewax.testing import cluster_main
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from PIL import Image
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from bench.backlog import peak_rss_kib, streamed_rss
from bench.ceilings import stage_ceilings
from bench.feed import (
    CAMERAS,
    MOCK_PARTITION_BYTES,
    Feed,
    fits_in_broker,
    offsets_from_json,
    offsets_json,
    publish_frames,
)
from flows.pipeline import build_flow
from flows.settings import Settings, parse_size, settings_or_exit
from operators.dead_letters import STALE
from operators.decode import FrameLimits, decode_pixels
from operators.detector import DEFAULT_WIDTHS, LoadedDetector, TinyDet, load_detector
from operators.frames import DeadLetter, FrameResult
from operators.inference import Inferencer
from operators.ingest import frame_source
from operators.kafka_io import client_config, producer_config
from operators.sinks import DeadLetterSink, ResultSink
from operators.telemetry.metrics import PipelineMetrics
from operators.telemetry.span_export import EncodingExporter
from operators.telemetry.tracing import Tracing, root_sampler, setup_tracing, write_tracer
from operators.workers import freeze_startup_heap, keep_freed_memory, threads_per_worker
from tools.camera import synthetic_frames
from tools.embedded import EmbeddedBroker

TARGETS = {
    "pipeline_over_ceiling": 0.85,
    "pipeline_over_naive": 3.0,
    "telemetry_on_over_off": 0.90,
    "adaptive_over_best_fixed": 0.95,
    "rss_100k_over_10k": 1.10,
}
SAMPLED_TELEMETRY_TARGET = 0.97
"""Telemetry on / off with fewer than every frame traced (and every metric); `TARGETS`
holds the target with every frame traced."""
GPU_TARGETS = {"pipeline_over_naive": 5.0, "gpu_utilisation_pct": 90.0}
"""Where the model runs on a GPU: these replace or join `TARGETS`."""
MIN_WINDOW_FRAMES = 500
MIN_WINDOW_S = 1.0
"""A rate is a figure only from a window of at least this many frames over at least this
long: a busy machine can squeeze a short run's writes into a few milliseconds (96 frames
in 2 ms once gave a ratio of 17)."""
OVERLOAD_CAMERAS = 16
"""Cameras (a partition each) of the overload runs: the backlog that builds without an age
limit must fit in what the embedded broker keeps (`MOCK_PARTITION_BYTES` a partition)."""
PACED_WARM_UP_S = 2.0
"""Seconds at the start of a paced run whose frames do not count toward its latency."""
DEFAULT_FRAME_SIZE = (320, 240)
PARTS = ("throughput", "telemetry", "sweeps", "adaptive", "overload", "backlog")
"""What a run measures (`--parts`): the pipeline, naive loop and ceilings in rounds;
telemetry on and off and the other worker layout in the same rounds; the batch-size, delay
and load sweeps; adaptive batching against fixed settings; the overload runs; the memory of
a long backlog."""
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
"""Bytewax workers by default: two, so that one decodes and does Kafka I/O while the other
runs the model."""
EndOffsets = Callable[[], dict[tuple[str, int], int] | None]
"""Returns each partition's end offset once the frames are all published (None before)."""


@dataclass(frozen=True)
class WorkerLayout:
    """How the dataflow's workers run: `processes` processes (a Bytewax cluster on
    loopback, as `python -m flows.processes` starts it) of `workers` worker threads."""

    processes: int
    workers: int

    @property
    def total(self) -> int:
        """Workers in all."""
        return self.processes * self.workers

    @property
    def name(self) -> str:
        """`processes` when each process has one worker of several, else `threads`."""
        return "processes" if self.processes > 1 else "threads"

    def describe(self) -> str:
        """E.g. `2 processes of 1 worker`."""
        return (
            f"{self.processes} process{'es' if self.processes > 1 else ''} of"
            f" {self.workers} worker{'s' if self.workers > 1 else ''}"
        )

    def other(self) -> WorkerLayout | None:
        """The same workers the other way (threads of one process, or single-worker
        processes); None for a single worker."""
        if self.total == 1:
            return None
        return WorkerLayout(1, self.total) if self.processes > 1 else WorkerLayout(self.total, 1)


def shipped_layout(workers: int, device: str) -> WorkerLayout:
    """The layout the container image runs `workers` workers in: single-worker processes
    on CPU (they share no interpreter lock), one process of worker threads on a GPU (they
    share one CUDA context)."""
    return WorkerLayout(workers, 1) if device == "cpu" else WorkerLayout(1, workers)


def telemetry_sampling() -> tuple[str, float]:
    """How the configured sampler (`OTEL_TRACES_SAMPLER`) traces the frames of a
    "telemetry on" run, and the on / off ratio it is held to."""
    sampler = root_sampler()
    rate = sampler.rate if isinstance(sampler, TraceIdRatioBased) else 0.0
    if sampler is ALWAYS_ON:
        rate = 1.0
    if rate >= 1:
        return "every frame traced", TARGETS["telemetry_on_over_off"]
    label = f"{rate * 100:g}% of frames traced" if rate > 0 else "no frame traced"
    return label, SAMPLED_TELEMETRY_TARGET


def window_problem(frames: int, seconds: float) -> str | None:
    """Why a rate of `frames` frames over `seconds` is no figure (None when it is one)."""
    if frames >= MIN_WINDOW_FRAMES and seconds >= MIN_WINDOW_S:
        return None
    span = f"{seconds * 1e3:.0f} ms" if seconds < 1.0 else f"{seconds:.1f} s"
    return (
        f"{frames} frames in {span}: a rate needs at least {MIN_WINDOW_FRAMES} frames over"
        f" at least {MIN_WINDOW_S:g} s"
    )


@dataclass(frozen=True)
class Rate:
    """Frames/s measured over a window of `frames` frames and `seconds` seconds."""

    frames: int
    seconds: float

    @property
    def fps(self) -> float:
        """Frames per second over the window."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def problem(self) -> str | None:
        """Why the window gives no figure, or None."""
        return window_problem(self.frames, self.seconds)

    @property
    def valid(self) -> bool:
        """Whether the window is long enough to give a figure."""
        return self.problem is None

    def window(self) -> dict[str, Any]:
        """The window as JSON: frames, seconds, valid and the problem."""
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "valid": self.valid,
            "problem": self.problem,
        }


@dataclass
class RunResult:
    """One dataflow run: frames written, the rate's window and per-frame latency."""

    frames: int
    seconds: float
    cpu_util: float
    fps: float
    latency_ms: dict[str, float]
    mean_batch: float
    peak_rss_mb: float
    gpu_utilisation: float | None = None
    spans_exported: int | None = None
    window_frames: int = 0
    """Frames counted in the rate, over `seconds`."""
    latency_frames: int = 0
    """Frames whose latency the percentiles are of."""

    @property
    def problem(self) -> str | None:
        """Why the run's rate is no figure (its window too short), or None."""
        return window_problem(self.window_frames, self.seconds)

    @property
    def valid(self) -> bool:
        """Whether the run's rate is a figure."""
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "frames_per_s": round(self.fps, 1),
            "window": Rate(self.window_frames, self.seconds).window(),
            "cpu_utilisation": round(self.cpu_util, 3),
            "latency_ms": {k: round(v, 1) for k, v in self.latency_ms.items()},
            "latency_frames": self.latency_frames,
            "mean_batch": round(self.mean_batch, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "gpu_utilisation": self.gpu_utilisation,
            "spans_exported": self.spans_exported,
        }


def until_valid(
    run_at: Callable[[int], RunResult], frames: int, reruns: int, max_frames: int
) -> RunResult:
    """`run_at(frames)`, run again with more frames (at most `reruns` times, never more
    than `max_frames`) while its window is too short to give a figure; the last run."""
    result = run_at(frames)
    for _ in range(reruns):
        if result.valid or frames >= max_frames:
            break
        frames = _more_frames(frames, result, max_frames)
        result = run_at(frames)
    return result


def _more_frames(frames: int, result: RunResult, max_frames: int) -> int:
    """Enough frames for a valid window, from what `frames` gave: at least twice as many,
    in whole ticks of the cameras, at most `max_frames`."""
    needed = 1.25 * MIN_WINDOW_FRAMES
    if result.window_frames >= MIN_WINDOW_FRAMES:
        # A long enough count at a trustworthy rate: what lasts long enough at that rate.
        needed = max(needed, 1.25 * result.fps * MIN_WINDOW_S)
    # The frames outside the window (the first batch) come on top.
    target = max(2 * frames, math.ceil(needed) + frames - result.window_frames)
    target = -(-target // CAMERAS) * CAMERAS
    return min(target, max_frames // CAMERAS * CAMERAS)


class Windowed(Protocol):
    """A measured rate that says whether its window gives a figure."""

    @property
    def fps(self) -> float: ...

    @property
    def problem(self) -> str | None: ...


@dataclass(frozen=True)
class Ratio:
    """A ratio of rates taken in rounds: the median of the rounds whose windows were all
    valid (`value`, None when none was), each round's ratio (None where a window was too
    short) and, without a value, why."""

    value: float | None
    rounds: list[float | None]
    problem: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "value": None if self.value is None else round(self.value, 3),
            "rounds": [None if r is None else round(r, 3) for r in self.rounds],
            "problem": self.problem,
        }


def round_ratio(rounds: Sequence[tuple[Sequence[Windowed], Sequence[Windowed]]]) -> Ratio:
    """The ratio of each round's second rates to its first (their means), over the rounds
    in which every rate's window is valid; their median is the figure."""
    values: list[float | None] = []
    problems: list[str] = []
    for below, above in rounds:
        bad = [r.problem for r in (*below, *above) if r.problem is not None]
        denominator = statistics.fmean(r.fps for r in below)
        if bad or denominator <= 0:
            problems += bad or ["no frames"]
            values.append(None)
            continue
        values.append(statistics.fmean(r.fps for r in above) / denominator)
    valid = [v for v in values if v is not None]
    if not valid:
        return Ratio(None, values, problems[0] if problems else "not measured")
    return Ratio(statistics.median(valid), values, None)


def ratio_text(ratio: Ratio) -> str:
    """The ratio as the table shows it: the figure, or `invalid: <why>`."""
    if ratio.value is None:
        return f"invalid: {ratio.problem}"
    return f"{ratio.value:.2f}"


class GpuUtilisation:
    """Samples the GPU's utilisation (percent, via NVML) in a thread while it runs."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[int, float]] = []  # (time.time_ns(), percent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append((time.time_ns(), float(torch.cuda.utilization())))
            except Exception:  # no NVML: no figure
                return

    def __enter__(self) -> GpuUtilisation:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        """Mean utilisation over all samples, or None without any."""
        return self.mean_between(0, 2**63)

    def mean_between(self, start_ns: int, end_ns: int) -> float | None:
        """Mean utilisation of the samples taken from `start_ns` to `end_ns`, or None
        without any."""
        return _mean_between(self.samples, start_ns, end_ns)


def _mean_between(samples: Sequence[tuple[int, float]], start_ns: int, end_ns: int) -> float | None:
    values = [value for at, value in samples if start_ns <= at <= end_ns]
    return round(statistics.fmean(values), 1) if values else None


def scaled_detector(scale: int, input_size: tuple[int, int] | None = None) -> LoadedDetector:
    """The shipped detector (`scale` 1), or the same architecture `scale` times wider with
    untrained weights: about `scale`**2 times the compute per frame, for measuring a
    GPU-bound pipeline (its detections are meaningless; its cost is a large detector's).
    `input_size` (W, H) runs it at that input instead of its own (it is fully
    convolutional: the cost grows with the input's pixels)."""
    detector = load_detector(input_size=input_size)
    if scale == 1:
        return detector
    widths = tuple(w * scale for w in DEFAULT_WIDTHS)
    module = TinyDet(len(detector.classes), widths=widths).eval()
    return replace(detector, module=module, name=f"{detector.name}-x{scale}-untrained")


@dataclass
class _Collected:
    rows: list[tuple[int, int, int, int]] = field(default_factory=list)
    letters: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, results: Sequence[FrameResult], duplicates: int, written_ns: int) -> None:
        with self.lock:
            self.rows.extend(
                (r.meta.capture_ns, r.meta.ingest_ns, written_ns, r.batch_size) for r in results
            )

    def letters_written(self, letters: Sequence[DeadLetter]) -> None:
        """Dead letters (their reason, and when) as the dead-letter sink stores them."""
        now = time.time_ns()
        with self.lock:
            self.letters.extend((letter.reason, now) for letter in letters)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 and p99 of `values` (NaN when empty)."""
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


@dataclass
class FlowRun:
    """What one process saw of a dataflow run: per-frame rows (capture, ingest and write
    times in ns, batch size), dead letters (reason, write time in ns), its CPU and wall
    seconds, GPU samples, spans exported and peak memory."""

    rows: list[tuple[int, int, int, int]]
    cpu_s: float
    wall_s: float
    gpu_samples: list[tuple[int, float]] = field(default_factory=list)
    spans_exported: int | None = None
    peak_rss_mb: float = 0.0
    letters: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def merged(cls, runs: Sequence[FlowRun]) -> FlowRun:
        """The runs of a cluster's processes as one: rows, CPU, spans and memory added up,
        the longest wall time."""
        spans = [r.spans_exported for r in runs]
        return cls(
            rows=[row for r in runs for row in r.rows],
            letters=[letter for r in runs for letter in r.letters],
            cpu_s=sum(r.cpu_s for r in runs),
            wall_s=max(r.wall_s for r in runs),
            gpu_samples=sorted(s for r in runs for s in r.gpu_samples),
            spans_exported=None if None in spans else sum(s for s in spans if s),
            peak_rss_mb=sum(r.peak_rss_mb for r in runs),
        )


def run_dataflow(
    inferencer: Inferencer,
    bootstrap: str,
    settings: Settings,
    topic: str,
    database: Path,
    outputs: tuple[str, str],
    *,
    telemetry: bool = False,
    end_offsets: EndOffsets | None = None,
    workers: int = 1,
    cluster: tuple[Sequence[str], int] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FlowRun:
    """Run the dataflow over `topic` to its end (or to `end_offsets` once known), writing
    to the `outputs` topics (results, dead letters) and `database`. `cluster` makes this
    process one of a cluster: the peers' addresses and this process's index. `on_ready`
    is called once the flow is built, just before it starts."""
    collected = _Collected()
    out, dlq = outputs
    url = f"sqlite:///{database}"
    tracing = (
        setup_tracing(make_exporter=EncodingExporter, flush_at_exit=False)
        if telemetry
        else Tracing.disabled()
    )
    # The export process starts once per flow; its start-up is not part of the rate.
    tracing.wait_ready()
    metrics = PipelineMetrics(CollectorRegistry()) if telemetry else None
    observers: list[Callable[[Sequence[FrameResult], int, int], None]] = [collected]
    if metrics is not None:
        observers.append(metrics.results_written)

    def on_results(results: Sequence[FrameResult], duplicates: int, written_ns: int) -> None:
        for observe in observers:
            observe(results, duplicates, written_ns)

    producer = producer_config(settings, bootstrap=bootstrap, client_id="bench-sink")
    results: Any = ResultSink(
        url,
        producer,
        output_topic=out,
        dead_letter_topic=dlq,
        on_results=on_results,
        trace_writes=write_tracer(tracing, topic=out, store="sqlite"),
    )
    flow = build_flow(
        settings,
        source=frame_source(
            bootstrap,
            topic,
            client_config=client_config(settings, bootstrap),
            batch_size=settings.fetch_batch_size,
            tail=False,
            end_offsets=end_offsets,
        ),
        infer=inferencer.infer,
        input_size=inferencer.detector.input_size,
        results=results,
        dead_letters=DeadLetterSink(url, producer, topic=dlq, on_letters=collected.letters_written),
        tracing=tracing,
        metrics=metrics,
        model={"streamsight.device": inferencer.device_name},
    )
    # As `python -m bytewax.run flows.video -w N` does: the workers share the cores
    # (the naive loop and the ceilings keep torch's default, all cores); a cluster's
    # processes share them too.
    addresses, index = cluster if cluster is not None else ([], 0)
    threads = torch.get_num_threads()
    if inferencer.device.type == "cpu":
        torch.set_num_threads(threads_per_worker(workers * max(len(addresses), 1)))
    if on_ready is not None:
        on_ready()
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    try:
        with GpuUtilisation() as gpu:
            cluster_main(flow, list(addresses), index, worker_count_per_proc=workers)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - wall0
    cpu = _cpu_s() - cpu0
    tracing.flush()
    return FlowRun(
        rows=collected.rows,
        letters=collected.letters,
        cpu_s=cpu,
        wall_s=wall,
        gpu_samples=gpu.samples,
        spans_exported=tracing.exported(),
        peak_rss_mb=peak_rss_mb(),
    )


def summarise(run: FlowRun, *, skip_first_s: float = 0.0) -> RunResult:
    """The figures of a run; the frames captured in its first `skip_first_s` seconds are
    left out of its latency."""
    rows = run.rows
    if not rows:
        raise RuntimeError("the dataflow wrote nothing")
    # Sustained rate: from the first batch written to the last, counting the frames
    # written after the first batch. The first write waits for the sink producer's
    # one-time start-up (its idempotent producer id: 0.5 s on the embedded broker).
    first_out = min(r[2] for r in rows)
    last_out = max(r[2] for r in rows)
    counted = sum(1 for r in rows if r[2] > first_out)
    # A window under 1 ms (a run so short that each process wrote once) would give no rate;
    # either way, a window too short to be a figure is marked so (`RunResult.valid`).
    if counted and last_out - first_out >= 1_000_000:
        seconds = (last_out - first_out) / 1e9
    else:
        counted, seconds = len(rows), max((last_out - min(r[1] for r in rows)) / 1e9, 1e-9)
    cutoff = min(r[0] for r in rows) + int(skip_first_s * 1e9)
    latency = [(r[2] - r[0]) / 1e6 for r in rows if r[0] >= cutoff]
    return RunResult(
        frames=len(rows),
        seconds=seconds,
        cpu_util=run.cpu_s / run.wall_s / (os.cpu_count() or 1),
        fps=counted / seconds,
        latency_ms=percentiles(latency),
        mean_batch=len(rows) / sum(1.0 / r[3] for r in rows),
        peak_rss_mb=run.peak_rss_mb,
        # Over the same window as the rate: the flow's start-up and end leave it idle.
        gpu_utilisation=_mean_between(run.gpu_samples, first_out, last_out),
        spans_exported=run.spans_exported,
        window_frames=counted,
        latency_frames=len(latency),
    )


StartFeed = Callable[[Sequence[str]], EndOffsets]
"""Starts publishing a run's frames once the flow is ready, given the topics the flow writes
results and dead letters to; returns the call that gives the end offsets once known."""


class Bench:
    """The broker, the model and the frames shared by every measurement."""

    def __init__(
        self,
        workdir: Path,
        distinct_frames: int,
        model_scale: int = 1,
        layout: WorkerLayout | str = "shipped",
        workers: int = 1,
        frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        """`layout`: a `WorkerLayout`, or `shipped`, `processes` or `threads` for `workers`
        workers that way (`shipped`: as the image runs them on this device). The cameras
        send `frame_size` (W, H) frames; `input_size` runs the detector at that input
        instead of its own."""
        self.workdir = workdir
        self.model_scale = model_scale
        self.frame_size = frame_size
        self.input_size = input_size
        self.broker = EmbeddedBroker()
        self.inferencer = Inferencer.create(scaled_detector(model_scale, input_size), device="auto")
        if layout == "shipped":
            layout = shipped_layout(workers, self.inferencer.device.type)
        elif layout == "processes":
            layout = WorkerLayout(workers, 1)
        elif layout == "threads":
            layout = WorkerLayout(1, workers)
        if not isinstance(layout, WorkerLayout):
            raise ValueError(f"unknown layout {layout!r}")
        self.layout = layout
        per_camera = max(distinct_frames // CAMERAS, 1)
        width, height = frame_size
        self.jpegs = [
            f.jpeg
            for tick in synthetic_frames(CAMERAS, per_camera, width=width, height=height)
            for f in tick
        ]
        self.reruns = 0
        """How many times a saturation run whose window is too short runs again."""
        self.max_frames = 20_000
        """The most frames a rerun may take."""
        self._ids = itertools.count()

    @property
    def bootstrap(self) -> str:
        """The embedded broker's address."""
        return self.broker.bootstrap

    def max_ahead(self, cameras: int = CAMERAS) -> int:
        """Frames that may wait unread in a topic of `cameras` partitions: what the
        embedded broker keeps of each (`MOCK_PARTITION_BYTES`) with room to spare, in
        whole ticks."""
        largest = max(len(j) for j in self.jpegs)
        per_partition = int(0.5 * MOCK_PARTITION_BYTES / largest)
        return max(per_partition, 1) * cameras

    def fits(self, frames: int, cameras: int = CAMERAS) -> bool:
        """Whether `frames` frames can all wait in a topic of `cameras` partitions at once
        (see `fits_in_broker`)."""
        return fits_in_broker(self.jpegs, frames, cameras)

    def topic(self, name: str, partitions: int = CAMERAS) -> str:
        """A fresh topic with one partition per camera."""
        topic = f"{name}-{next(self._ids)}"
        self.broker.create_topic(topic, partitions)
        return topic

    def publish(
        self,
        topic: str,
        frames: int,
        fps: float = 0.0,
        job: str = "bench",
        cameras: int = CAMERAS,
    ) -> dict[tuple[str, int], int]:
        """Publish frames (paced at `fps` frames/s over all cameras; 0 = unpaced); the
        end offset of each partition."""
        return publish_frames(self.bootstrap, topic, self.jpegs, frames, fps, job, cameras=cameras)

    def publish_elsewhere(
        self,
        topic: str,
        frames: int,
        fps: float,
        ahead_of: Sequence[str] = (),
        cameras: int = CAMERAS,
    ) -> Feed:
        """Start publishing as `publish` does, from a process of its own (a camera does
        not share the dataflow's interpreter). With `ahead_of` (the topics the flow writes
        its results and dead letters to), it stays at most `max_ahead` frames ahead of
        what the flow has written there: the broker drops what a partition holds beyond
        its size, read or not."""
        jpegs = self.workdir / "jpegs.pickle"
        if not jpegs.exists():
            jpegs.write_bytes(pickle.dumps(self.jpegs))
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from bench.feed import publish_main; publish_main()",
                str(jpegs),
                self.bootstrap,
                topic,
                str(frames),
                str(fps),
                ",".join(ahead_of),
                str(self.max_ahead(cameras) if ahead_of else 0),
                str(cameras),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        return Feed(process)

    def run_flow(
        self,
        settings: Settings,
        topic: str,
        *,
        telemetry: bool = False,
        feed: StartFeed | None = None,
        skip_first_s: float = 0.0,
        layout: WorkerLayout | None = None,
    ) -> RunResult:
        """Run the dataflow (in `layout`, the bench's by default) over `topic` to its end,
        or, with `feed`, to the end offsets that the call `feed` returns once they are
        known: `feed` starts publishing when the flow is ready to read."""
        run = self.flow_run(settings, topic, telemetry=telemetry, feed=feed, layout=layout)
        return summarise(run, skip_first_s=skip_first_s)

    def flow_run(
        self,
        settings: Settings,
        topic: str,
        *,
        telemetry: bool = False,
        feed: StartFeed | None = None,
        layout: WorkerLayout | None = None,
    ) -> FlowRun:
        """As `run_flow`, the run's rows and letters unsummarised."""
        layout = layout or self.layout
        n = next(self._ids)
        if layout.processes > 1:
            return self._run_cluster(settings, topic, n, layout, telemetry=telemetry, feed=feed)
        outputs = self._outputs(n)
        end_offsets = feed(outputs) if feed is not None else None
        return run_dataflow(
            self.inferencer,
            self.bootstrap,
            settings,
            topic,
            self.workdir / f"run-{n}.db",
            outputs,
            telemetry=telemetry,
            end_offsets=end_offsets,
            workers=layout.workers,
        )

    def _outputs(self, n: int, member: int | None = None) -> tuple[str, str]:
        """Fresh results and dead-letter topics for run `n` (of one cluster member)."""
        suffix = f"{n}" if member is None else f"{n}-{member}"
        outputs = (f"bench-out-{suffix}", f"bench-dlq-{suffix}")
        for name in outputs:
            self.broker.create_topic(name, CAMERAS)
        return outputs

    def _run_cluster(
        self,
        settings: Settings,
        topic: str,
        n: int,
        layout: WorkerLayout,
        *,
        telemetry: bool,
        feed: StartFeed | None,
    ) -> FlowRun:
        """Run `layout.processes` processes of `layout.workers` workers (as `-i`/`-a`
        start them), which share the cores; each loads its own model first, and `feed`
        starts once every one is ready. Their runs merged (memory: their peaks added)."""
        addresses = [f"localhost:{port}" for port in free_ports(layout.processes)]
        ends_file = self.workdir / f"run-{n}-ends.json"
        members: list[tuple[dict[str, Any], subprocess.Popen[bytes]]] = []
        try:
            for index in range(layout.processes):
                spec = {
                    "bootstrap": self.bootstrap,
                    "topic": topic,
                    "settings": settings.model_dump(mode="json", exclude_defaults=True),
                    "database": str(self.workdir / f"run-{n}-{index}.db"),
                    "outputs": self._outputs(n, index),
                    "telemetry": telemetry,
                    "cluster": [addresses, index],
                    "workers": layout.workers,
                    "model_scale": self.model_scale,
                    "input_size": self.input_size,
                    "ends": str(ends_file) if feed is not None else None,
                    "ready": str(self.workdir / f"run-{n}-{index}.ready"),
                    "report": str(self.workdir / f"run-{n}-{index}.json"),
                    # Its output (the peers' "connection refused, retrying" while the
                    # cluster forms, warnings), shown if it fails.
                    "log": str(self.workdir / f"run-{n}-{index}.log"),
                }
                members.append((spec, _start_member(spec)))
            deadline = time.monotonic() + MEMBER_TIMEOUT_S
            for spec, process in members:
                while not Path(spec["ready"]).exists():
                    _check_member(spec, process, deadline, running=True)
                    time.sleep(0.05)
            outputs = [name for spec, _ in members for name in spec["outputs"]]
            end_offsets = feed(outputs) if feed is not None else None
            runs = []
            for spec, process in members:
                while process.poll() is None:
                    if end_offsets is not None and not ends_file.exists():
                        ends = end_offsets()  # raises if the publishing process failed
                        if ends is not None:
                            write_end_offsets(ends_file, ends)
                    _check_member(spec, process, deadline)
                    time.sleep(0.05)
                _check_member(spec, process, deadline)
                runs.append(FlowRun(**json.loads(Path(spec["report"]).read_text())))
        finally:
            for _, process in members:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return FlowRun.merged(runs)

    def saturation(
        self,
        settings: Settings,
        frames: int,
        *,
        telemetry: bool = False,
        layout: WorkerLayout | None = None,
        cameras: int = CAMERAS,
    ) -> RunResult:
        """Frames/s over a topic filled before the flow starts; run again with more frames
        (`reruns` times at most) while the rate's window is too short to be a figure."""

        def run_at(count: int) -> RunResult:
            topic = self.topic("bench-sat", cameras)
            if self.fits(count, cameras):
                self.publish(topic, count, cameras=cameras)
                return self.run_flow(settings, topic, telemetry=telemetry, layout=layout)
            # More frames than the broker keeps (large frames): published during the run,
            # never more than it keeps ahead of what the flow has written, so the flow
            # never waits for them.
            return self.run_flow(
                settings,
                topic,
                telemetry=telemetry,
                layout=layout,
                feed=lambda outputs: (
                    self.publish_elsewhere(topic, count, 0.0, outputs, cameras).end_offsets
                ),
            )

        return until_valid(run_at, frames, self.reruns, self.max_frames)

    def paced(
        self, settings: Settings, fps: float, seconds: float, warm_up_s: float = PACED_WARM_UP_S
    ) -> RunResult:
        """Latency at `fps` offered frames/s, the flow tailing the topic while a producer
        process publishes for `warm_up_s` + `seconds`; the frames of the first
        `warm_up_s` are left out (the flow's start-up, and the burst of frames that
        waited for it, which an adaptive controller needs about a second to settle
        after)."""
        topic = self.topic("bench-paced")
        frames = max(int(fps * (warm_up_s + seconds)), CAMERAS)
        # Below capacity the flow keeps up and the producer never waits; past it (or
        # at a quick run's rough capacity) it waits rather than outgrow the broker.
        return self.run_flow(
            settings,
            topic,
            feed=lambda outputs: (
                self.publish_elsewhere(
                    topic, frames, fps, () if self.fits(frames) else outputs
                ).end_offsets
            ),
            skip_first_s=warm_up_s,
        )

    def overload(
        self,
        settings: Settings,
        fps: float,
        seconds: float,
        warm_up_s: float = PACED_WARM_UP_S,
        cameras: int = CAMERAS,
    ) -> dict[str, Any]:
        """Offer `fps` frames/s (more than the flow can take) from `cameras` cameras for
        `warm_up_s` + `seconds`, the flow tailing the topic until it has processed or
        skipped every frame: the figures of `overload_figures`."""
        topic = self.topic("bench-overload", cameras)
        frames = max(int(fps * (warm_up_s + seconds)), cameras)
        feeds: list[Feed] = []

        def feed(_: Sequence[str]) -> EndOffsets:
            feeds.append(self.publish_elsewhere(topic, frames, fps, cameras=cameras))
            return feeds[0].end_offsets

        run = self.flow_run(settings, topic, feed=feed)
        sent = sum((feeds[0].end_offsets() or {}).values())
        started, ended = feeds[0].started_ns, feeds[0].ended_ns
        if started is None or ended is None:
            raise RuntimeError("the publishing process reported no times")
        figures = overload_figures(run, sent, started, ended, warm_up_s)
        figures["offered_fps"] = round(fps, 1)
        figures["cameras"] = cameras
        figures["max_frame_age_ms"] = settings.max_frame_age_ms
        return figures

    def naive(self, frames: int) -> dict[str, Any]:
        """The loop a user writes first: consume, decode with Pillow, run the model on one
        frame, produce the result as JSON; frames/s from first message to last delivered."""
        topic = self.topic("bench-naive")
        out = self.topic("bench-naive-out")
        done = 0
        remaining = -(-frames // CAMERAS) * CAMERAS
        feeder: threading.Thread | None = None
        if self.fits(frames):
            remaining = sum(self.publish(topic, frames).values())
        else:
            # Large frames: published alongside, at most `max_ahead` ahead of the loop.
            feeder = threading.Thread(
                target=publish_frames,
                args=(self.bootstrap, topic, self.jpegs, frames),
                kwargs={"processed": lambda: done, "max_ahead": self.max_ahead()},
                name="naive-camera",
                daemon=True,
            )
            feeder.start()
        detector = self.inferencer.detector
        width, height = detector.input_size
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "naive",
                "enable.auto.commit": False,
            }
        )
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(CAMERAS)])
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        started: float | None = None
        while done < remaining:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            if started is None:
                started = time.perf_counter()
            image = Image.open(io.BytesIO(msg.value())).convert("RGB")
            sx, sy = image.width / width, image.height / height
            pixels = np.array(image.resize((width, height)))[None]
            raw = self.inferencer.forward(pixels)[0]
            kept = raw[raw[:, 4] >= self.inferencer.score_threshold]
            body = {
                "topic": msg.topic(),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "detections": [
                    {
                        "box": [float(x1 * sx), float(y1 * sy), float(x2 * sx), float(y2 * sy)],
                        "label": detector.classes[int(c)],
                        "score": round(float(s), 4),
                    }
                    for x1, y1, x2, y2, s, c in kept
                ],
            }
            producer.produce(out, json.dumps(body).encode(), key=msg.key())
            producer.poll(0)
            done += 1
        producer.flush(30)
        wall = time.perf_counter() - wall0
        seconds = time.perf_counter() - (started or wall0)
        cpu = _cpu_s() - cpu0
        consumer.close()
        if feeder is not None:
            feeder.join()
        return {
            "frames": done,
            "seconds": round(seconds, 3),
            "frames_per_s": round(done / seconds, 1),
            "window": Rate(done, seconds).window(),
            "cpu_utilisation": round(cpu / wall / (os.cpu_count() or 1), 3),
        }

    def compute_ceiling(self, batch_size: int, seconds: float, min_frames: int = 0) -> Rate:
        """Frames/s of decode + preprocess + model at `batch_size` on frames in memory,
        over at least `seconds` and `min_frames` frames (after one warm-up batch)."""
        limits = FrameLimits(64 * 1024 * 1024, 100_000_000, self.inferencer.detector.input_size)
        jpegs = self.jpegs
        position = 0
        frames = 0
        started = time.perf_counter()
        warm = True
        while True:
            chunk = [jpegs[(position + i) % len(jpegs)] for i in range(batch_size)]
            position += batch_size
            pixels = np.stack([decode_pixels(j, limits)[0] for j in chunk])
            self.inferencer.forward(pixels)
            if warm:
                warm, started = False, time.perf_counter()
                continue
            frames += batch_size
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and frames >= max(4 * batch_size, min_frames):
                return Rate(frames, elapsed)


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    saturation_frames: int
    naive_frames: int
    paced_seconds: float
    """Seconds of each paced run's offered load that count, after `paced_warm_up_s`."""
    ceiling_seconds: float
    batch_sizes: tuple[int, ...]
    delays_ms: tuple[float, ...]
    loads: tuple[float, ...]
    distinct_frames: int
    repeats: int = 5
    paced_warm_up_s: float = PACED_WARM_UP_S
    adaptive_rounds: int = 5
    """Rounds comparing adaptive batching with the default at each of `adaptive_loads`, and
    with the best fixed size at saturation."""
    backlog_runs: tuple[int, ...] = (10_000, 100_000)
    reruns: int = 2
    """How many times a saturation run whose window is too short runs again, with more
    frames."""
    ceiling_frames: int = MIN_WINDOW_FRAMES
    """The fewest frames the compute-bound ceiling is measured over."""
    adaptive_loads: tuple[float, ...] = (0.2, 0.7, 1.0)
    """Offered loads (shares of capacity) at which adaptive batching meets the default."""
    overload_load: float = 1.5
    overload_seconds: float = 30.0
    overload_max_frames: int | None = None
    """The most frames an overload run offers (its seconds shortened to fit)."""
    max_frame_age_ms: float = 1000.0
    """The age limit of the overload run that sheds stale frames."""
    indicative: bool = False
    """A short run: its ratios indicate, they do not measure."""
    parts: frozenset[str] = frozenset(PARTS)


FULL = Plan(
    2000, 600, 6.0, 2.0, (1, 4, 16, 64), (0.0, 10.0, 50.0, 100.0), (0.2, 0.5, 0.7, 0.9), 256
)
QUICK = Plan(
    96,
    32,
    0.5,
    0.2,
    (1, 16),
    (50.0,),
    (0.7,),
    16,
    repeats=1,
    adaptive_rounds=1,
    backlog_runs=(300, 900),
    reruns=0,
    ceiling_frames=0,
    adaptive_loads=(0.7,),
    paced_warm_up_s=0.5,
    overload_seconds=1.0,
    overload_max_frames=640,
    indicative=True,
)
"""Every part once, on a few frames: a check of the code path, not a measurement."""


MEMBER_TIMEOUT_S = 600.0
"""How long the processes of a cluster run may take, start-up included."""


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback right now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_end_offsets(path: Path, ends: dict[tuple[str, int], int]) -> None:
    """Write each partition's end offset to `path` as JSON, at once (a reader never sees
    half of it)."""
    partial = path.with_suffix(".partial")
    partial.write_text(offsets_json(ends))
    os.replace(partial, path)


def end_offsets_from(path: Path) -> EndOffsets:
    """A call that returns the end offsets written to `path` (None before they are)."""
    known: dict[tuple[str, int], int] = {}

    def end_offsets() -> dict[tuple[str, int], int] | None:
        if not known:
            if not path.exists():
                return None
            known.update(offsets_from_json(path.read_text()))
        return known

    return end_offsets


def _check_member(
    spec: dict[str, Any], process: subprocess.Popen[bytes], deadline: float, running: bool = False
) -> None:
    """Raise if cluster member `process` failed (or, `running`, exited at all) or the
    run is past `deadline`."""
    code = process.poll()
    if code not in (None, 0) or (running and code is not None):
        log = Path(spec["log"]).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"a cluster process exited early (exit {code}):\n{log}")
    if time.monotonic() > deadline:
        raise RuntimeError("a cluster process did not finish in time")


def _start_member(spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    with open(spec["log"], "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from bench.pipeline import member_main; member_main()",
                json.dumps(spec),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )


def member_main() -> None:
    """One process of a cluster run (`Bench.run_flow`): argv holds its spec as JSON; it loads
    the model, runs its part of the cluster and writes its `FlowRun` as JSON to the
    spec's report path."""
    spec = json.loads(sys.argv[1])
    keep_freed_memory()  # as `flows.video` does
    input_size = tuple(spec["input_size"]) if spec["input_size"] else None
    inferencer = Inferencer.create(scaled_detector(spec["model_scale"], input_size), device="auto")
    freeze_startup_heap()
    addresses, index = spec["cluster"]
    results, letters = spec["outputs"]
    run = run_dataflow(
        inferencer,
        spec["bootstrap"],
        Settings(**spec["settings"]),
        spec["topic"],
        Path(spec["database"]),
        (results, letters),
        telemetry=spec["telemetry"],
        end_offsets=end_offsets_from(Path(spec["ends"])) if spec["ends"] else None,
        workers=spec["workers"],
        cluster=(addresses, index),
        on_ready=Path(spec["ready"]).touch,
    )
    # Its own peak: ru_maxrss would keep the benchmark process's, from before the exec.
    run.peak_rss_mb = peak_rss_kib() / 1024.0
    Path(spec["report"]).write_text(json.dumps(asdict(run)))


OVERLOAD_STEP_S = 0.5
"""The overload run's lag is sampled this often for its plot."""


def overload_figures(
    run: FlowRun, sent: int, started_ns: int, ended_ns: int, warm_up_s: float
) -> dict[str, Any]:
    """The figures of an overload run in which `sent` frames were offered from `started_ns`
    to `ended_ns` (wall clock): the latency of the frames processed (those captured after
    the first `warm_up_s`), frames skipped as stale, other dead letters, frames never
    accounted for, the lag (frames sent and not yet processed or skipped) when the offered
    load ended and how long the flow took to catch up after, and the lag and latency over
    time for a plot."""
    cutoff = started_ns + int(warm_up_s * 1e9)
    latency = [(w - c) / 1e6 for c, _, w, _ in run.rows if c >= cutoff]
    stale = sum(1 for reason, _ in run.letters if reason == STALE)
    done_at = sorted([row[2] for row in run.rows] + [at for _, at in run.letters])
    last = done_at[-1] if done_at else ended_ns
    span = max(ended_ns - started_ns, 1)
    timeline = []
    step = int(OVERLOAD_STEP_S * 1e9)
    for at in range(started_ns, max(last, ended_ns) + step, step):
        # The camera is paced: what it has sent grows evenly until it ends.
        offered = sent if at >= ended_ns else sent * (at - started_ns) // span
        timeline.append(
            [round((at - started_ns) / 1e9, 2), max(offered - bisect_right(done_at, at), 0)]
        )
    points = sorted((c, (w - c) / 1e6) for c, _, w, _ in run.rows)
    every = max(len(points) // 2000, 1)
    pct = percentiles(latency)
    return {
        "sent": sent,
        "offered_seconds": round(span / 1e9, 2),
        "processed": len(run.rows),
        "skipped_stale": stale,
        "dead_letters": len(run.letters) - stale,
        "unaccounted": sent - len(run.rows) - len(run.letters),
        "latency_ms": {k: round(v, 1) for k, v in pct.items()},
        "latency_frames": len(latency),
        "lag_at_end": sent - bisect_right(done_at, ended_ns),
        "catch_up_s": round(max(last - ended_ns, 0) / 1e9, 2),
        "lag_timeline": timeline,
        "latency_points": [
            [round((c - started_ns) / 1e9, 3), round(ms, 1)] for c, ms in points[::every]
        ],
    }


def run(
    plan: Plan,
    out: Path,
    console: Console,
    model_scale: int = 1,
    workers: int = DEFAULT_WORKERS,
    layout: str = "shipped",
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    input_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Every measurement of the plan, with `workers` workers laid out as `layout`
    (`shipped`, `processes` or `threads`), cameras sending `frame_size` frames and the
    detector at `input_size` (its own by default); the report as a dict."""
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # as `flows.video` does: the naive loop and ceilings share it
    with tempfile.TemporaryDirectory(prefix="streamsight-bench-") as tmp:
        bench = Bench(
            Path(tmp), plan.distinct_frames, model_scale, layout, workers, frame_size, input_size
        )
        bench.reruns = plan.reruns
        freeze_startup_heap()  # as `flows.video` does once it is built
        try:
            return _measure(bench, plan, out, console)
        finally:
            bench.broker.close()


def _median_fps(runs: Sequence[RunResult]) -> float:
    """The median rate of the runs whose windows are valid (of all, if none is)."""
    valid = [r.fps for r in runs if r.valid] or [r.fps for r in runs]
    return statistics.median(valid)


def _measure(bench: Bench, plan: Plan, out: Path, console: Console) -> dict[str, Any]:
    base = Settings(progress=False, metrics_enabled=False)
    default_size = base.batch_max_size
    parts = plan.parts

    def fixed(size: int, delay_ms: float) -> Settings:
        return base.model_copy(update={"batch_max_size": size, "batch_max_delay_ms": delay_ms})

    adaptive = base.model_copy(update={"batch_adaptive": True})
    log = console.log
    layout = bench.layout
    frames = plan.saturation_frames
    width, height = bench.frame_size
    in_w, in_h = bench.inferencer.detector.input_size
    log(f"{width}x{height} frames, the detector at {in_w}x{in_h}, {layout.describe()}")
    if plan.indicative:
        log("a quick run: its ratios are indicative, not measurements")
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "device": bench.inferencer.device_name,
            "model": bench.inferencer.detector.name,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(),
            "torch_threads_per_worker": (
                threads_per_worker(layout.total) if bench.inferencer.device.type == "cpu" else None
            ),
            # Other work on the machine: the figures are only as steady as it is.
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "frame_size": [width, height],
        "model_input_size": [in_w, in_h],
        "jpeg_bytes_mean": round(statistics.fmean(len(j) for j in bench.jpegs)),
        "workers": layout.total,
        "layout": asdict(layout) | {"name": layout.name},
        "settings": {
            "batch_max_size": default_size,
            "batch_max_delay_ms": base.batch_max_delay_ms,
            "fetch_batch_size": base.fetch_batch_size,
            "partitions": CAMERAS,
        },
        "parts": [p for p in PARTS if p in parts],
        "indicative": plan.indicative,
        "window_rule": {"min_frames": MIN_WINDOW_FRAMES, "min_seconds": MIN_WINDOW_S},
    }
    ratios: dict[str, Ratio] = {}
    sat_runs: list[RunResult] = []
    if "throughput" in parts:
        sat_runs = _throughput(bench, plan, base, report, ratios, log)
        capacity = _median_fps(sat_runs)
    else:
        log("capacity: the pipeline at saturation")
        sat_runs = [bench.saturation(base, frames)]
        capacity = sat_runs[0].fps
        report["pipeline"] = {
            "saturation": [r.as_dict() for r in sat_runs],
            "frames_per_s": round(capacity, 1),
        }
    report["capacity_frames_per_s"] = round(capacity, 1)

    by_size: dict[int, RunResult] = {default_size: sat_runs[0]}
    if "sweeps" in parts:
        log("throughput vs batch size (saturation)")
        for size in plan.batch_sizes:
            if size not in by_size:
                by_size[size] = bench.saturation(fixed(size, 50.0), frames)
        rate = 0.7 * capacity
        log(f"latency vs batch size at {rate:.0f} frames/s")
        lat_size = {
            size: bench.paced(fixed(size, 50.0), rate, plan.paced_seconds, plan.paced_warm_up_s)
            for size in plan.batch_sizes
        }
        log(f"latency vs max delay at {rate:.0f} frames/s")
        lat_delay = {
            d: bench.paced(fixed(default_size, d), rate, plan.paced_seconds, plan.paced_warm_up_s)
            for d in plan.delays_ms
        }
        log("latency vs offered load")
        by_load = {
            load: bench.paced(base, load * capacity, plan.paced_seconds, plan.paced_warm_up_s)
            for load in plan.loads
        }
        at_rate = (
            lat_delay.get(base.batch_max_delay_ms)
            or lat_size.get(default_size)
            or by_load[min(plan.loads)]
        )
        report["pipeline"]["offered_fps"] = round(rate, 1)
        report["pipeline"]["latency_at_70pct"] = at_rate.as_dict()
        report["sweeps"] = {
            "batch_size_saturation": {str(k): v.as_dict() for k, v in sorted(by_size.items())},
            "batch_size_latency": {str(k): v.as_dict() for k, v in lat_size.items()},
            "max_delay_latency": {str(k): v.as_dict() for k, v in lat_delay.items()},
            "offered_load": {str(k): v.as_dict() for k, v in by_load.items()},
        }

    if "adaptive" in parts:
        report["adaptive"] = _adaptive(bench, plan, base, adaptive, capacity, by_size, ratios, log)

    if "overload" in parts:
        report["overload"] = _overload(bench, plan, base, log)

    memory: dict[str, Any] | None = None
    if "backlog" in parts and plan.backlog_runs:
        counts = ", ".join(f"{n:,}" for n in plan.backlog_runs)
        log(f"peak RSS after {counts} frames through a bounded backlog (own processes)")
        memory = streamed_rss(plan.backlog_runs, log=log)
    report["memory"] = memory

    not_run = Ratio(None, [], "not measured in this run")
    report["ratio_details"] = {
        name: ratios.get(name, not_run).as_dict()
        for name in (
            "pipeline_over_naive",
            "pipeline_over_ceiling",
            "telemetry_on_over_off",
            "adaptive_over_best_fixed",
        )
    }
    report["ratios"] = {name: d["value"] for name, d in report["ratio_details"].items()}
    report["ratios"]["rss_100k_over_10k"] = memory["rss_largest_over_smallest"] if memory else None
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"]["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    gpu_busy = report["pipeline"].get("gpu_utilisation_pct")
    sampling, telemetry_target = telemetry_sampling()
    report["telemetry_sampling"] = sampling
    report["targets"] = {**TARGETS, "telemetry_on_over_off": telemetry_target}
    if gpu_busy is not None:
        report["targets"].update(GPU_TARGETS)
    _print(report, console)
    (out / "pipeline.json").write_text(json.dumps(report, indent=2))
    report["plots"] = plot(report, out)
    return report


def _overload(bench: Bench, plan: Plan, base: Settings, log: Callable[..., None]) -> dict[str, Any]:
    """The capacity with `OVERLOAD_CAMERAS` cameras, then `plan.overload_load` times it
    offered for `plan.overload_seconds` (less if the backlog would outgrow what the
    embedded broker keeps), without an age limit and with `plan.max_frame_age_ms`."""
    cameras = OVERLOAD_CAMERAS
    log(f"overload: the capacity with {cameras} cameras")
    capacity = bench.saturation(base, plan.saturation_frames, cameras=cameras)
    offered = plan.overload_load * capacity.fps
    # Without an age limit the unread backlog grows by the excess every second; the
    # broker drops what a partition holds past its size, so the run stays within it.
    room = 0.8 * MOCK_PARTITION_BYTES * cameras / statistics.fmean(len(j) for j in bench.jpegs)
    # What the flow takes is known only from a valid window; without one, the whole
    # offer may wait unread.
    grows = (plan.overload_load - 1.0) * capacity.fps if capacity.valid else offered
    total = min(plan.overload_seconds + plan.paced_warm_up_s, room / max(grows, 1e-9))
    if plan.overload_max_frames is not None:
        total = min(total, plan.overload_max_frames / offered)
    warm_up = min(plan.paced_warm_up_s, total / 2)
    seconds = total - warm_up
    limited = base.model_copy(update={"max_frame_age_ms": plan.max_frame_age_ms})
    log(
        f"overload: {offered:.0f} frames/s ({plan.overload_load:.0%} of {capacity.fps:.0f}) for"
        f" {seconds:.1f} s after {warm_up:.1f} s, without an age limit, then with"
        f" STREAMSIGHT_MAX_FRAME_AGE_MS={plan.max_frame_age_ms:g}"
    )
    return {
        "cameras": cameras,
        "capacity": capacity.as_dict(),
        "load": plan.overload_load,
        "seconds": round(seconds, 2),
        "seconds_asked": plan.overload_seconds,
        "warm_up_s": round(warm_up, 2),
        "without_limit": bench.overload(base, offered, seconds, warm_up, cameras),
        "with_limit": bench.overload(limited, offered, seconds, warm_up, cameras),
    }


def _throughput(
    bench: Bench,
    plan: Plan,
    base: Settings,
    report: dict[str, Any],
    ratios: dict[str, Ratio],
    log: Callable[..., None],
) -> list[RunResult]:
    """Rounds of the pipeline at saturation (with telemetry off, on, on and off, one
    worker, and the other layout when telemetry is measured), the naive loop and the
    compute-bound ceiling; then the stage ceilings. Fills the report's `pipeline`,
    `other_layout`, `naive` and `ceilings`; the saturation runs with telemetry off."""
    layout = bench.layout
    other = layout.other() if "telemetry" in plan.parts else None
    telemetry = "telemetry" in plan.parts
    frames = plan.saturation_frames
    default_size = base.batch_max_size
    extra = ""
    if telemetry:
        extra = ", telemetry off, on, on and off"
        if layout.total > 1:
            extra += ", the pipeline with 1 worker"
        if other is not None:
            extra += f", the same workers as {other.describe()} off, on, on and off"
    log(
        f"{plan.repeats} rounds of: saturation as {layout.describe()}{extra}, the naive loop,"
        " the compute-bound ceiling"
    )
    # The machine's speed drifts between runs by more than the effects measured, so the
    # figures compared are taken in rounds, one of each per round, and each ratio is the
    # median of its rounds' ratios (of the rounds whose windows are all valid).
    sat_runs: list[RunResult] = []
    tel_runs: list[RunResult] = []
    tel_rounds: list[tuple[list[RunResult], list[RunResult]]] = []
    one_worker_runs: list[RunResult] = []
    other_runs: list[RunResult] = []
    other_tel_runs: list[RunResult] = []
    other_tel_rounds: list[tuple[list[RunResult], list[RunResult]]] = []
    other_over_rounds: list[tuple[list[RunResult], list[RunResult]]] = []
    naive_rounds: list[tuple[list[Rate], list[RunResult]]] = []
    ceiling_rounds: list[tuple[list[Rate], list[RunResult]]] = []
    naive_runs: list[dict[str, Any]] = []
    ceiling_runs: list[Rate] = []

    def off_on_on_off(shape: WorkerLayout) -> tuple[list[RunResult], list[RunResult]]:
        # Off, on, on, off: the order of the runs and a steady drift of the machine's
        # speed cancel out of telemetry's ratio.
        off = [bench.saturation(base, frames, layout=shape)]
        on = [bench.saturation(base, frames, telemetry=True, layout=shape) for _ in "ab"]
        off.append(bench.saturation(base, frames, layout=shape))
        return off, on

    for _ in range(plan.repeats):
        if telemetry:
            off, on = off_on_on_off(layout)
            tel_runs += on
            tel_rounds.append((off, on))
        else:
            off = [bench.saturation(base, frames)]
        sat_runs += off
        if telemetry and layout.total > 1:
            one_worker_runs.append(bench.saturation(base, frames, layout=WorkerLayout(1, 1)))
        if other is not None:
            other_off, other_on = off_on_on_off(other)
            other_runs += other_off
            other_tel_runs += other_on
            other_tel_rounds.append((other_off, other_on))
            other_over_rounds.append((off, other_off))
        naive = bench.naive(plan.naive_frames)
        naive_runs.append(naive)
        naive_rate = Rate(naive["window"]["frames"], naive["window"]["seconds"])
        naive_rounds.append(([naive_rate], off))
        ceiling = bench.compute_ceiling(default_size, plan.ceiling_seconds, plan.ceiling_frames)
        ceiling_runs.append(ceiling)
        ceiling_rounds.append(([ceiling], off))
    capacity = _median_fps(sat_runs)
    ratios["pipeline_over_naive"] = round_ratio(naive_rounds)
    ratios["pipeline_over_ceiling"] = round_ratio(ceiling_rounds)
    if telemetry:
        ratios["telemetry_on_over_off"] = round_ratio(tel_rounds)
    ceiling_fps = [c.fps for c in ceiling_runs]
    valid_ceilings = [c.fps for c in ceiling_runs if c.valid] or ceiling_fps
    log("stage ceilings")
    stages = stage_ceilings(
        bench.inferencer,
        bench.jpegs,
        sorted({1, default_size, *plan.batch_sizes}),
        plan.ceiling_seconds,
    )
    gpu_samples = [r.gpu_utilisation for r in sat_runs if r.gpu_utilisation is not None]
    tel_fps = _median_fps(tel_runs) if tel_runs else None
    report["pipeline"] = {
        "saturation": [r.as_dict() for r in sat_runs],
        "frames_per_s": round(capacity, 1),
        "valid_windows": sum(r.valid for r in sat_runs),
        "spread": round(_spread([r.fps for r in sat_runs]), 3),
        "telemetry_on": [r.as_dict() for r in tel_runs],
        "telemetry_medians_on_over_off": (
            round(tel_fps / capacity, 3) if tel_fps is not None else None
        ),
        "telemetry_rounds": ratios["telemetry_on_over_off"].as_dict()["rounds"]
        if telemetry
        else [],
        "one_worker": [r.as_dict() for r in one_worker_runs],
        "one_worker_frames_per_s": (
            round(_median_fps(one_worker_runs), 1) if one_worker_runs else None
        ),
        # The dataflow's own processes (in-process runs share the benchmark's).
        "dataflow_peak_rss_mb": (
            round(max(r.peak_rss_mb for r in sat_runs + tel_runs), 1)
            if layout.processes > 1
            else None
        ),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "gpu_utilisation_pct": statistics.median(gpu_samples) if gpu_samples else None,
    }
    over = round_ratio(other_over_rounds)
    other_tel = round_ratio(other_tel_rounds)
    report["other_layout"] = (
        {
            "layout": asdict(other) | {"name": other.name},
            "saturation": [r.as_dict() for r in other_runs],
            "telemetry_on": [r.as_dict() for r in other_tel_runs],
            "frames_per_s": round(_median_fps(other_runs), 1),
            "over_pipeline": over.as_dict()["value"],
            "over_pipeline_rounds": over.as_dict()["rounds"],
            "over_pipeline_problem": over.problem,
            "telemetry_on_over_off": other_tel.as_dict()["value"],
            "telemetry_rounds": other_tel.as_dict()["rounds"],
            "telemetry_problem": other_tel.problem,
        }
        if other is not None
        else None
    )
    report["naive"] = {
        "runs": naive_runs,
        "frames_per_s": round(statistics.median(r["frames_per_s"] for r in naive_runs), 1),
    }
    report["ceilings"] = {
        "compute_bound_frames_per_s": {
            "runs": [round(v, 1) for v in ceiling_fps],
            "windows": [c.window() for c in ceiling_runs],
            "mean": round(statistics.fmean(ceiling_fps), 1),
            "median": round(statistics.median(valid_ceilings), 1),
            "spread": round(_spread(ceiling_fps), 3),
            "batch_size": default_size,
        },
        "stages": stages,
    }
    return sat_runs


def _adaptive(
    bench: Bench,
    plan: Plan,
    base: Settings,
    adaptive: Settings,
    capacity: float,
    by_size: dict[int, RunResult],
    ratios: dict[str, Ratio],
    log: Callable[..., None],
) -> dict[str, Any]:
    """Adaptive batching against the best fixed size at saturation, and against the
    default (and, at the lowest load, batch 1 with no delay) at each offered load."""

    def fixed(size: int, delay_ms: float) -> Settings:
        return base.model_copy(update={"batch_max_size": size, "batch_max_delay_ms": delay_ms})

    frames = plan.saturation_frames
    # The best of several single runs is biased upward by the machine's drift, so the
    # best fixed size is run again against adaptive, in rounds of fixed, adaptive,
    # adaptive, fixed.
    best_size = max(by_size, key=lambda size: by_size[size].fps)
    log(
        f"{plan.adaptive_rounds} rounds at saturation of: batch {best_size} (the best fixed"
        " size), adaptive, adaptive, the same fixed size"
    )
    sat_rounds: list[tuple[list[RunResult], list[RunResult]]] = []
    for _ in range(plan.adaptive_rounds):
        fixed_runs = [bench.saturation(fixed(best_size, 50.0), frames)]
        adaptive_runs = [bench.saturation(adaptive, frames) for _ in "ab"]
        fixed_runs.append(bench.saturation(fixed(best_size, 50.0), frames))
        sat_rounds.append((fixed_runs, adaptive_runs))
    sat_ratio = round_ratio(sat_rounds)
    ratios["adaptive_over_best_fixed"] = sat_ratio
    valid_rounds = [i for i, r in enumerate(sat_ratio.rounds) if r is not None]
    middle = (
        valid_rounds[_median_index([sat_ratio.rounds[i] or 0.0 for i in valid_rounds])]
        if valid_rounds
        else 0
    )
    adaptive_sat = sat_rounds[middle][1][0]

    low = min(plan.adaptive_loads)
    settings = {"default": base, "batch_1": fixed(1, 0.0), "adaptive": adaptive}
    loads = ", ".join(f"{x:.0%}" for x in plan.adaptive_loads)
    log(
        f"{plan.adaptive_rounds} rounds at each of {loads}"
        f" load of: the default and adaptive in turns (at {low:.0%}, batch 1 with no delay"
        " between them)"
    )
    by_load: dict[str, Any] = {}
    low_rounds: list[dict[str, RunResult]] = []
    for load in plan.adaptive_loads:
        rounds: list[dict[str, RunResult]] = []
        for turn in range(plan.adaptive_rounds):
            # First one then the other in turns, so that a drift of the machine's speed
            # favours neither.
            order = ["adaptive", "default"] if turn % 2 else ["default", "adaptive"]
            if load == low:
                order.insert(1, "batch_1")
            rounds.append(
                {
                    who: bench.paced(
                        settings[who], load * capacity, plan.paced_seconds, plan.paced_warm_up_s
                    )
                    for who in order
                }
            )
        if load == low:
            low_rounds = rounds
        by_load[f"{load:g}"] = _load_rounds(rounds, load * capacity)
    report: dict[str, Any] = {
        "saturation": adaptive_sat.as_dict(),
        "best_fixed_size": best_size,
        "saturation_rounds": sat_ratio.as_dict()["rounds"],
        "saturation_round_frames_per_s": [
            {"fixed": [round(r.fps, 1) for r in f], "adaptive": [round(r.fps, 1) for r in a]}
            for f, a in sat_rounds
        ],
        "over_best_fixed_saturation": sat_ratio.as_dict()["value"],
        "by_load": by_load,
    }
    low_ratios = [
        min(r["default"].latency_ms["p99"], r["batch_1"].latency_ms["p99"])
        / max(r["adaptive"].latency_ms["p99"], 1e-9)
        for r in low_rounds
    ]
    middle_low = low_rounds[_median_index(low_ratios)]
    report |= {
        "low_load": middle_low["adaptive"].as_dict(),
        "low_load_fixed": {
            "default": middle_low["default"].as_dict(),
            "batch_1": middle_low["batch_1"].as_dict(),
        },
        "low_load_p99_ms_best_fixed": round(
            min(middle_low["default"].latency_ms["p99"], middle_low["batch_1"].latency_ms["p99"]),
            1,
        ),
        "low_load_p99_over_adaptive": round(statistics.median(low_ratios), 3),
        "low_load_rounds": [round(r, 3) for r in low_ratios],
    }
    if "0.7" in by_load:
        mid = by_load["0.7"]
        report |= {
            "at_70pct": mid["median_round"]["adaptive"],
            "at_70pct_rounds": [
                {who: r[who]["latency_ms"] for who in ("default", "adaptive")}
                for r in mid["rounds"]
            ],
            "at_70pct_median_ms": mid["median_ms"],
            "at_70pct_p99_default_over_adaptive": mid["p99_default_over_adaptive"],
        }
    return report


def _load_rounds(rounds: Sequence[dict[str, RunResult]], offered: float) -> dict[str, Any]:
    """The rounds at one offered load: each run's figures, the default's p99 over
    adaptive's per round and their median, and the medians of p50 and p99 and batch."""
    ratios = [
        r["default"].latency_ms["p99"] / max(r["adaptive"].latency_ms["p99"], 1e-9) for r in rounds
    ]
    middle = rounds[_median_index(ratios)]
    return {
        "offered_fps": round(offered, 1),
        "rounds": [{who: run.as_dict() for who, run in r.items()} for r in rounds],
        "p99_default_over_adaptive_rounds": [round(x, 3) for x in ratios],
        "p99_default_over_adaptive": round(statistics.median(ratios), 3),
        "median_round": {who: run.as_dict() for who, run in middle.items()},
        "median_ms": {
            who: {
                q: round(statistics.median(r[who].latency_ms[q] for r in rounds), 1)
                for q in ("p50", "p99")
            }
            for who in rounds[0]
        },
        "mean_batch": {
            who: round(statistics.median(r[who].mean_batch for r in rounds), 2) for who in rounds[0]
        },
    }


def _median_index(values: Sequence[float]) -> int:
    """The index of the median of `values` (the upper one of an even count)."""
    return sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]


def _spread(values: Sequence[float]) -> float:
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / mean if mean else 0.0


def _runs_text(runs: Sequence[dict[str, Any]]) -> str:
    """Each run's rate, `(invalid)` after those whose window was too short."""
    return ", ".join(
        f"{x['frames_per_s']:.0f}" + ("" if x.get("window", {}).get("valid", True) else "*")
        for x in runs
    )


def _ratio_cell(report: dict[str, Any], name: str) -> str:
    detail = report["ratio_details"][name]
    ratio = Ratio(detail["value"], detail["rounds"], detail["problem"])
    rounds = ", ".join("-" if r is None else f"{r:.2f}" for r in detail["rounds"])
    return ratio_text(ratio) + (f" (rounds {rounds})" if rounds and ratio.value else "")


def _print(report: dict[str, Any], console: Console) -> None:
    width, height = report["frame_size"]
    in_w, in_h = report["model_input_size"]
    table = Table(
        title=f"streamsight pipeline benchmark on {report['machine']['device']}:"
        f" {width}x{height} frames, detector input {in_w}x{in_h}",
        caption=(
            "a quick run: its ratios are indicative, not measurements; * a window too short"
            " to be a figure"
            if report["indicative"]
            else "* a window too short to be a figure"
        ),
    )
    for column in ("measure", "value", "target"):
        table.add_column(column)
    p = report["pipeline"]
    t = report["targets"]
    layout = report["layout"]
    shape = WorkerLayout(layout["processes"], layout["workers"]).describe()
    rows = [
        (
            f"pipeline at saturation, {shape}, frames/s",
            f"{p['frames_per_s']:.0f} ({_runs_text(p['saturation'])})",
            "",
        ),
        ("CPU utilisation", f"{p['saturation'][0]['cpu_utilisation']:.0%}", ""),
    ]
    if p.get("gpu_utilisation_pct") is not None:
        gpu = ", ".join(
            "-" if x["gpu_utilisation"] is None else f"{x['gpu_utilisation']:.0f}"
            for x in p["saturation"]
        )
        rows.append(
            (
                "GPU utilisation at saturation (NVML, from first to last batch written), %",
                f"{p['gpu_utilisation_pct']:.0f} ({gpu})",
                f">= {t['gpu_utilisation_pct']:.0f}",
            )
        )
    if p.get("one_worker"):
        rows.append(
            (
                "pipeline at saturation, 1 worker",
                f"{p['one_worker_frames_per_s']:.0f} ({_runs_text(p['one_worker'])})",
                "",
            )
        )
    other = report.get("other_layout")
    if other:
        name = other["layout"]["name"]
        other_shape = WorkerLayout(other["layout"]["processes"], other["layout"]["workers"])
        over = Ratio(
            other["over_pipeline"], other["over_pipeline_rounds"], other["over_pipeline_problem"]
        )
        tel = Ratio(
            other["telemetry_on_over_off"], other["telemetry_rounds"], other["telemetry_problem"]
        )
        rows += [
            (
                f"the same workers as {other_shape.describe()}, frames/s",
                f"{other['frames_per_s']:.0f} ({_runs_text(other['saturation'])})",
                "",
            ),
            (f"{name} / {layout['name']} (median of rounds)", ratio_text(over), ""),
            (f"telemetry on / off as {name}", ratio_text(tel), ""),
        ]
    if p.get("dataflow_peak_rss_mb") is not None:
        rows.append(
            (
                "peak RSS of the dataflow's processes together",
                f"{p['dataflow_peak_rss_mb']:.0f} MiB",
                "",
            )
        )
    if "peak_rss_mb" in p:
        rows.append(
            (
                "peak RSS, benchmark process (broker and all topics)",
                f"{p['peak_rss_mb']:.0f} MiB",
                "",
            )
        )
    if "latency_at_70pct" in p:
        lat = p["latency_at_70pct"]
        rows.append(
            (
                f"latency at {p['offered_fps']:.0f} frames/s",
                f"p50 {lat['latency_ms']['p50']:.0f} ms, p99 {lat['latency_ms']['p99']:.0f} ms",
                "",
            )
        )
    if "naive" in report:
        naive = report["naive"]
        ceiling = report["ceilings"]["compute_bound_frames_per_s"]
        ceiling_runs = ", ".join(
            f"{v:.0f}" + ("" if w["valid"] else "*")
            for v, w in zip(ceiling["runs"], ceiling["windows"], strict=True)
        )
        rows += [
            (
                "naive loop, frames/s",
                f"{naive['frames_per_s']:.0f} ({_runs_text(naive['runs'])})",
                "",
            ),
            (
                f"compute-bound ceiling (batch {ceiling['batch_size']}), frames/s",
                f"{ceiling['median']:.0f} ({ceiling_runs})",
                "",
            ),
        ]
        if p["telemetry_on"]:
            rows.append(("telemetry on, frames/s", _runs_text(p["telemetry_on"]), ""))
        rows += [
            (
                "pipeline / naive",
                _ratio_cell(report, "pipeline_over_naive"),
                f">= {t['pipeline_over_naive']}",
            ),
            (
                "pipeline / ceiling",
                _ratio_cell(report, "pipeline_over_ceiling"),
                f">= {t['pipeline_over_ceiling']}",
            ),
        ]
        if p["telemetry_on"]:
            rows.append(
                (
                    f"telemetry on / off, {report['telemetry_sampling']} (median of rounds"
                    " off, on, on, off)",
                    _ratio_cell(report, "telemetry_on_over_off"),
                    f">= {t['telemetry_on_over_off']}",
                )
            )
    adaptive = report.get("adaptive")
    if adaptive:
        rows += [
            (
                "adaptive / best fixed (saturation; median of rounds fixed, adaptive,"
                " adaptive, fixed)",
                f"{_ratio_cell(report, 'adaptive_over_best_fixed')}; batch"
                f" {adaptive['best_fixed_size']}",
                f">= {t['adaptive_over_best_fixed']}",
            ),
            (
                "adaptive low load: best fixed p99 / adaptive p99 (median round)",
                f"{adaptive['low_load_p99_over_adaptive']:.2f} "
                f"({adaptive['low_load_p99_ms_best_fixed']:.0f} / "
                f"{adaptive['low_load']['latency_ms']['p99']:.0f} ms)",
                f">= {t['adaptive_over_best_fixed']}",
            ),
        ]
        for load, at in adaptive["by_load"].items():
            mid = at["median_ms"]
            rows.append(
                (
                    f"at {float(load):.0%} load ({at['offered_fps']:.0f} frames/s): p50 / p99 ms,"
                    " adaptive (default); default p99 / adaptive p99, median of rounds",
                    f"{mid['adaptive']['p50']:.0f} / {mid['adaptive']['p99']:.0f}"
                    f" ({mid['default']['p50']:.0f} / {mid['default']['p99']:.0f});"
                    f" {at['p99_default_over_adaptive']:.2f} (rounds"
                    f" {', '.join(f'{v:.2f}' for v in at['p99_default_over_adaptive_rounds'])})",
                    ">= 0.95",
                )
            )
    overload = report.get("overload")
    if overload:
        for key, label in (("without_limit", "no age limit"), ("with_limit", "age limit")):
            o: dict[str, Any] = overload[key]
            limit = f" {o['max_frame_age_ms']:g} ms" if o["max_frame_age_ms"] else ""
            rows.append(
                (
                    f"overload {o['offered_fps']:.0f} frames/s ({overload['load']:.0%} of"
                    f" capacity, {overload['cameras']} cameras) for {o['offered_seconds']:.0f} s,"
                    f" {label}{limit}",
                    f"p99 {o['latency_ms']['p99']:.0f} ms of {o['processed']} processed;"
                    f" {o['skipped_stale']} skipped; lag at end {o['lag_at_end']};"
                    f" caught up {o['catch_up_s']:.1f} s later",
                    "",
                )
            )
    memory = report.get("memory")
    if memory:
        runs = memory["runs"]
        peaks = " / ".join(f"{runs[k]['peak_rss_mb']:.0f}" for k in runs)
        rows.append(
            (
                f"peak RSS after {' / '.join(f'{int(k):,}' for k in runs)} frames, MiB",
                f"{peaks}: ratio {memory['rss_largest_over_smallest']:.3f}",
                f"<= {t['rss_100k_over_10k']}",
            )
        )
    sweeps = report.get("sweeps", {})
    for size, row in sweeps.get("batch_size_saturation", {}).items():
        rows.append((f"saturation, batch {size}", f"{row['frames_per_s']:.0f} frames/s", ""))
    for name in ("batch_size_latency", "max_delay_latency", "offered_load"):
        for key, row in sweeps.get(name, {}).items():
            lm = row["latency_ms"]
            rows.append(
                (
                    f"{name} {key}",
                    f"p50 {lm['p50']:.0f} / p99 {lm['p99']:.0f} ms, batch {row['mean_batch']:.1f}",
                    "",
                )
            )
    for row in rows:
        table.add_row(*row)
    console.print(table)


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """Throughput and latency vs batch size and max delay, latency vs offered load, the
    overload runs' lag and latency over time, adaptive against the default by load."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweeps = report.get("sweeps")

    def latency_lines(ax: Any, data: dict[str, Any], xs: list[float]) -> None:
        for q in ("p50", "p99"):
            ax.plot(xs, [data[k]["latency_ms"][q] for k in data], marker="o", label=q)
        ax.set_ylabel("latency capture->sink (ms)")
        ax.legend()

    if sweeps:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        sat = sweeps["batch_size_saturation"]
        ax1.plot([int(k) for k in sat], [v["frames_per_s"] for v in sat.values()], marker="o")
        if "ceilings" in report:
            ax1.axhline(
                report["ceilings"]["compute_bound_frames_per_s"]["median"], ls="--", c="gray"
            )
        ax1.set(xscale="log", xlabel="batch max size", ylabel="frames/s at saturation")
        lat = sweeps["batch_size_latency"]
        latency_lines(ax2, lat, [int(k) for k in lat])
        ax2.set(
            xscale="log", xlabel=f"batch max size ({report['pipeline']['offered_fps']} frames/s)"
        )
        fig.tight_layout()
        fig.savefig(out / "batch_size.png", dpi=90)
        written.append(str(out / "batch_size.png"))

        for name, data, xlabel in (
            ("max_delay.png", sweeps["max_delay_latency"], "batch max delay (ms)"),
            ("offered_load.png", sweeps["offered_load"], "offered load (share of capacity)"),
        ):
            fig, ax = plt.subplots(figsize=(5, 4))
            latency_lines(ax, data, [float(k) for k in data])
            ax.set_xlabel(xlabel)
            fig.tight_layout()
            fig.savefig(out / name, dpi=90)
            written.append(str(out / name))

    overload = report.get("overload")
    if overload:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for key, colour in (("without_limit", "tab:red"), ("with_limit", "tab:blue")):
            o = overload[key]
            label = (
                f"max frame age {o['max_frame_age_ms']:g} ms"
                if o["max_frame_age_ms"]
                else "no age limit"
            )
            ts, lags = zip(*o["lag_timeline"], strict=True) if o["lag_timeline"] else ((), ())
            ax1.plot(ts, lags, c=colour, label=label)
            ax1.axvline(o["offered_seconds"], c="gray", ls=":")
            if o["latency_points"]:
                xs, ys = zip(*o["latency_points"], strict=True)
                ax2.scatter(xs, ys, s=2, c=colour, label=label)
        ax1.set(xlabel="seconds since the load began", ylabel="lag (frames sent, not yet done)")
        ax1.legend()
        ax2.set(
            xlabel="capture time (s since the load began)",
            ylabel="latency capture->sink of processed frames (ms)",
        )
        ax2.legend(markerscale=4)
        offered = overload["without_limit"]["offered_fps"]
        fig.suptitle(f"overload: {offered:.0f} frames/s offered (dotted: the load ends)")
        fig.tight_layout()
        fig.savefig(out / "overload.png", dpi=90)
        written.append(str(out / "overload.png"))

    adaptive = report.get("adaptive")
    if adaptive and adaptive.get("by_load"):
        fig, ax = plt.subplots(figsize=(5, 4))
        loads = [float(k) for k in adaptive["by_load"]]
        for who, marker in (("default", "o"), ("adaptive", "s")):
            p99 = [v["median_ms"][who]["p99"] for v in adaptive["by_load"].values()]
            ax.plot(loads, p99, marker=marker, label=f"{who} p99")
        ax.set(xlabel="offered load (share of capacity)", ylabel="p99 latency (ms), median round")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "adaptive.png", dpi=90)
        written.append(str(out / "adaptive.png"))
    plt.close("all")
    return written


def _size(text: str) -> tuple[int, int]:
    """`WxH` as (width, height), for argparse."""
    try:
        width, height = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 1280x720, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError("a frame is at least 16x16")
    return width, height


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds, for tests: ratios are indicative"
    )
    parser.add_argument("--out", type=Path, default=Path(".streamsight/benchmark"))
    parser.add_argument("--frames", type=int, help="frames per saturation run")
    parser.add_argument(
        "--frame-size",
        type=_size,
        default=DEFAULT_FRAME_SIZE,
        help="WxH of the cameras' frames (default 320x240)",
    )
    parser.add_argument(
        "--input-size",
        type=_size,
        help="WxH to run the detector at (default: its own, 160x120 for the shipped one)",
    )
    parser.add_argument(
        "--model-scale",
        type=int,
        default=1,
        help="run a detector this many times wider (untrained; compute only)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"Bytewax workers of the dataflow, in all (default {DEFAULT_WORKERS})",
    )
    parser.add_argument(
        "--layout",
        choices=("shipped", "processes", "threads"),
        default="shipped",
        help="the workers as single-worker processes or as threads of one process;"
        " shipped (the default): processes on CPU, threads on a GPU, as the image runs them",
    )
    parser.add_argument(
        "--parts",
        help=f"comma-separated, of {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="rounds of each comparison")
    parser.add_argument("--paced-seconds", type=float, help="seconds of each paced run")
    parser.add_argument("--overload-seconds", type=float, help="seconds of offered overload")
    parser.add_argument(
        "--max-frame-age-ms", type=float, help="the age limit of the overload run that sheds"
    )
    parser.add_argument(
        "--no-backlog", action="store_true", help="skip the peak-RSS runs (minutes)"
    )
    args = parser.parse_args(argv)
    if args.model_scale < 1 or args.workers < 1:
        parser.error("--model-scale and --workers must be at least 1")
    settings_or_exit()  # the runs read STREAMSIGHT_* too: a bad one is one line, not a trace
    plan = QUICK if args.quick else FULL
    if args.parts:
        parts = frozenset(p.strip() for p in args.parts.split(","))
        if not parts <= set(PARTS):
            parser.error(f"--parts: each of {', '.join(PARTS)}")
        plan = replace(plan, parts=parts)
    if args.no_backlog:
        plan = replace(plan, backlog_runs=())
    if args.frames:
        plan = replace(
            plan,
            saturation_frames=args.frames,
            naive_frames=max(plan.naive_frames, args.frames // 4),
        )
    if args.rounds:
        plan = replace(plan, repeats=args.rounds, adaptive_rounds=args.rounds)
    if args.paced_seconds:
        plan = replace(plan, paced_seconds=args.paced_seconds)
    if args.overload_seconds:
        plan = replace(plan, overload_seconds=args.overload_seconds)
    if args.max_frame_age_ms:
        plan = replace(plan, max_frame_age_ms=args.max_frame_age_ms)
    return run(
        plan,
        args.out,
        Console(stderr=True),
        args.model_scale,
        args.workers,
        args.layout,
        args.frame_size,
        args.input_size,
    )


if __name__ == "__main__":
    main()
