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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bytewax.testing import cluster_main
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from PIL import Image
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from bench.backlog import peak_rss_kib, streamed_rss
from bench.ceilings import stage_ceilings
from flows.pipeline import build_flow
from flows.settings import Settings, settings_or_exit
from operators.decode import FrameLimits, decode_pixels
from operators.detector import DEFAULT_WIDTHS, LoadedDetector, TinyDet, load_detector
from operators.frames import FrameResult
from operators.inference import Inferencer
from operators.ingest import frame_source
from operators.kafka_io import CheckedProducer, client_config, producer_config
from operators.sinks import DeadLetterSink, ResultSink
from operators.telemetry.metrics import PipelineMetrics
from operators.telemetry.span_export import EncodingExporter
from operators.telemetry.tracing import Tracing, setup_tracing, write_tracer
from operators.workers import freeze_startup_heap, keep_freed_memory, threads_per_worker
from tools.camera import OutgoingFrame, camera_id, publish, synthetic_frames
from tools.embedded import EmbeddedBroker

TARGETS = {
    "pipeline_over_ceiling": 0.85,
    "pipeline_over_naive": 3.0,
    "telemetry_on_over_off": 0.95,
    "adaptive_over_best_fixed": 0.95,
    "rss_100k_over_10k": 1.10,
}
GPU_TARGETS = {"pipeline_over_naive": 5.0, "gpu_utilisation_pct": 90.0}
"""Where the model runs on a GPU: these replace or join `TARGETS`."""
CAMERAS = 4
PACED_WARM_UP_S = 2.0
"""Seconds at the start of a paced run whose frames do not count toward its latency."""
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


@dataclass
class RunResult:
    """One dataflow run: frames written and per-frame timestamps."""

    frames: int
    seconds: float
    cpu_util: float
    fps: float
    latency_ms: dict[str, float]
    mean_batch: float
    peak_rss_mb: float
    gpu_utilisation: float | None = None
    spans_exported: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "frames_per_s": round(self.fps, 1),
            "cpu_utilisation": round(self.cpu_util, 3),
            "latency_ms": {k: round(v, 1) for k, v in self.latency_ms.items()},
            "mean_batch": round(self.mean_batch, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "gpu_utilisation": self.gpu_utilisation,
            "spans_exported": self.spans_exported,
        }


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


def scaled_detector(scale: int) -> LoadedDetector:
    """The shipped detector (`scale` 1), or the same architecture `scale` times wider with
    untrained weights: about `scale`**2 times the compute per frame, for measuring a
    GPU-bound pipeline (its detections are meaningless; its cost is a large detector's)."""
    detector = load_detector()
    if scale == 1:
        return detector
    widths = tuple(w * scale for w in DEFAULT_WIDTHS)
    module = TinyDet(len(detector.classes), widths=widths).eval()
    return replace(detector, module=module, name=f"{detector.name}-x{scale}-untrained")


@dataclass
class _Collected:
    rows: list[tuple[int, int, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, results: Sequence[FrameResult], duplicates: int, written_ns: int) -> None:
        with self.lock:
            self.rows.extend(
                (r.meta.capture_ns, r.meta.ingest_ns, written_ns, r.batch_size) for r in results
            )


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
    times in ns, batch size), its CPU and wall seconds, GPU samples, spans exported and
    peak memory."""

    rows: list[tuple[int, int, int, int]]
    cpu_s: float
    wall_s: float
    gpu_samples: list[tuple[int, float]] = field(default_factory=list)
    spans_exported: int | None = None
    peak_rss_mb: float = 0.0

    @classmethod
    def merged(cls, runs: Sequence[FlowRun]) -> FlowRun:
        """The runs of a cluster's processes as one: rows, CPU, spans and memory added up,
        the longest wall time."""
        spans = [r.spans_exported for r in runs]
        return cls(
            rows=[row for r in runs for row in r.rows],
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
        dead_letters=DeadLetterSink(url, producer, topic=dlq),
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
    # A window under 1 ms (a run so short that each process wrote once) would give no rate.
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
    )


class Bench:
    """The broker, the model and the frames shared by every measurement."""

    def __init__(
        self,
        workdir: Path,
        distinct_frames: int,
        model_scale: int = 1,
        layout: WorkerLayout | str = "shipped",
        workers: int = 1,
    ) -> None:
        """`layout`: a `WorkerLayout`, or `shipped`, `processes` or `threads` for `workers`
        workers that way (`shipped`: as the image runs them on this device)."""
        self.workdir = workdir
        self.model_scale = model_scale
        self.broker = EmbeddedBroker()
        self.inferencer = Inferencer.create(scaled_detector(model_scale), device="auto")
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
        self.jpegs = [f.jpeg for tick in synthetic_frames(CAMERAS, per_camera) for f in tick]
        self._ids = itertools.count()

    @property
    def bootstrap(self) -> str:
        """The embedded broker's address."""
        return self.broker.bootstrap

    def topic(self, name: str) -> str:
        """A fresh topic with one partition per camera."""
        topic = f"{name}-{next(self._ids)}"
        self.broker.create_topic(topic, CAMERAS)
        return topic

    def publish(
        self, topic: str, frames: int, fps: float = 0.0, job: str = "bench"
    ) -> dict[tuple[str, int], int]:
        """Publish frames (paced at `fps` frames/s over all cameras; 0 = unpaced); the
        end offset of each partition."""
        return publish_frames(self.bootstrap, topic, self.jpegs, frames, fps, job)

    def publish_elsewhere(self, topic: str, frames: int, fps: float) -> EndOffsets:
        """Start publishing as `publish` does, from a process of its own (a camera does
        not share the dataflow's interpreter); a call that returns the end offsets once
        it has finished (None before) and raises if it failed."""
        jpegs = self.workdir / "jpegs.pickle"
        if not jpegs.exists():
            jpegs.write_bytes(pickle.dumps(self.jpegs))
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from bench.pipeline import publish_main; publish_main()",
                str(jpegs),
                self.bootstrap,
                topic,
                str(frames),
                str(fps),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        done: dict[str, Any] = {}

        def wait() -> None:
            out, _ = process.communicate()
            if process.returncode != 0:
                done["error"] = f"the publishing process failed (exit {process.returncode})"
                return
            done["ends"] = offsets_from_json(out)

        def end_offsets() -> dict[tuple[str, int], int] | None:
            if "error" in done:
                raise RuntimeError(done["error"])
            ends: dict[tuple[str, int], int] | None = done.get("ends")
            return ends

        threading.Thread(target=wait, name="bench-camera", daemon=True).start()
        return end_offsets

    def run_flow(
        self,
        settings: Settings,
        topic: str,
        *,
        telemetry: bool = False,
        feed: Callable[[], EndOffsets] | None = None,
        skip_first_s: float = 0.0,
        layout: WorkerLayout | None = None,
    ) -> RunResult:
        """Run the dataflow (in `layout`, the bench's by default) over `topic` to its end,
        or, with `feed`, to the end offsets that the call `feed` returns once they are
        known: `feed` starts publishing when the flow is ready to read."""
        layout = layout or self.layout
        n = next(self._ids)
        if layout.processes > 1:
            run = self._run_cluster(settings, topic, n, layout, telemetry=telemetry, feed=feed)
        else:
            outputs = self._outputs(n)
            end_offsets = feed() if feed is not None else None
            run = run_dataflow(
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
        return summarise(run, skip_first_s=skip_first_s)

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
        feed: Callable[[], EndOffsets] | None,
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
            end_offsets = feed() if feed is not None else None
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
    ) -> RunResult:
        """Frames/s over a topic filled before the flow starts."""
        topic = self.topic("bench-sat")
        self.publish(topic, frames)
        return self.run_flow(settings, topic, telemetry=telemetry, layout=layout)

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
        return self.run_flow(
            settings,
            topic,
            feed=lambda: self.publish_elsewhere(topic, frames, fps),
            skip_first_s=warm_up_s,
        )

    def naive(self, frames: int) -> dict[str, Any]:
        """The loop a user writes first: consume, decode with Pillow, run the model on one
        frame, produce the result as JSON; frames/s from first message to last delivered."""
        topic = self.topic("bench-naive")
        ends = self.publish(topic, frames)
        out = self.topic("bench-naive-out")
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
        remaining = sum(ends.values())
        done = 0
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
        return {
            "frames": done,
            "seconds": round(seconds, 3),
            "frames_per_s": round(done / seconds, 1),
            "cpu_utilisation": round(cpu / wall / (os.cpu_count() or 1), 3),
        }

    def compute_ceiling(self, batch_size: int, seconds: float) -> float:
        """Frames/s of decode + preprocess + model at `batch_size` on frames in memory."""
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
            if elapsed >= seconds and frames >= 4 * batch_size:
                return frames / elapsed


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    saturation_frames: int
    naive_frames: int
    paced_seconds: float
    ceiling_seconds: float
    batch_sizes: tuple[int, ...]
    delays_ms: tuple[float, ...]
    loads: tuple[float, ...]
    distinct_frames: int
    repeats: int = 5
    adaptive_rounds: int = 5
    """Rounds comparing adaptive batching with fixed settings, at saturation and at low load."""
    backlog_runs: tuple[int, ...] = (10_000, 100_000)


FULL = Plan(
    2200, 600, 6.0, 2.0, (1, 4, 16, 64), (0.0, 10.0, 50.0, 100.0), (0.2, 0.5, 0.7, 0.9), 256
)
QUICK = Plan(
    96,
    32,
    1.5,
    0.2,
    (1, 16),
    (0.0, 50.0),
    (0.3, 0.7),
    16,
    repeats=2,
    adaptive_rounds=1,
    backlog_runs=(300, 900),
)


def frame_ticks(jpegs: Sequence[bytes], frames: int) -> Iterator[list[OutgoingFrame]]:
    """`frames` frames (rounded up to whole ticks of CAMERAS) re-using the rendered
    `jpegs`; the capture time is stamped when a tick is taken."""
    for seq in range(-(-frames // CAMERAS)):
        now_ms = time.time() * 1000.0
        yield [
            OutgoingFrame(camera_id(i), seq, jpegs[(seq * CAMERAS + i) % len(jpegs)], now_ms)
            for i in range(CAMERAS)
        ]


def publish_frames(
    bootstrap: str,
    topic: str,
    jpegs: Sequence[bytes],
    frames: int,
    fps: float = 0.0,
    job: str = "bench",
) -> dict[tuple[str, int], int]:
    """Publish `frames` frames of `jpegs` to `topic` (paced at `fps` frames/s over all
    cameras; 0 = unpaced); the end offset of each partition."""
    settings = Settings(progress=False, metrics_enabled=False)
    producer = CheckedProducer(
        producer_config(settings, bootstrap=bootstrap, client_id="bench-camera")
    )
    try:
        report = publish(
            producer,
            topic,
            frame_ticks(jpegs, frames),
            job_id=job,
            fps=fps / CAMERAS,
            partitions=CAMERAS,
        )
    finally:
        producer.close()
    return dict(report.end_offsets)


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


def offsets_json(ends: dict[tuple[str, int], int]) -> str:
    """Each partition's end offset as JSON: `[[topic, partition, offset], ...]`."""
    return json.dumps([[t, p, o] for (t, p), o in ends.items()])


def offsets_from_json(text: str) -> dict[tuple[str, int], int]:
    """The end offsets that `offsets_json` wrote."""
    return {(t, int(p)): int(o) for t, p, o in json.loads(text)}


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
    inferencer = Inferencer.create(scaled_detector(spec["model_scale"]), device="auto")
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


def publish_main() -> None:
    """The publishing process of a paced run: argv holds the pickled JPEGs' path, the
    bootstrap, the topic, the frame count and the rate; the end offsets go to stdout as
    JSON."""
    path, bootstrap, topic, frames, fps = sys.argv[1:6]
    jpegs = pickle.loads(Path(path).read_bytes())
    ends = publish_frames(bootstrap, topic, jpegs, int(frames), float(fps))
    print(offsets_json(ends))


def run(
    plan: Plan,
    out: Path,
    console: Console,
    model_scale: int = 1,
    workers: int = DEFAULT_WORKERS,
    layout: str = "shipped",
) -> dict[str, Any]:
    """Every measurement of the plan, with `workers` workers laid out as `layout`
    (`shipped`, `processes` or `threads`); the report as a dict."""
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # as `flows.video` does: the naive loop and ceilings share it
    with tempfile.TemporaryDirectory(prefix="streamsight-bench-") as tmp:
        bench = Bench(Path(tmp), plan.distinct_frames, model_scale, layout, workers)
        freeze_startup_heap()  # as `flows.video` does once it is built
        try:
            return _measure(bench, plan, out, console)
        finally:
            bench.broker.close()


def _measure(bench: Bench, plan: Plan, out: Path, console: Console) -> dict[str, Any]:
    base = Settings(progress=False, metrics_enabled=False)
    default_size = base.batch_max_size

    def fixed(size: int, delay_ms: float) -> Settings:
        return base.model_copy(update={"batch_max_size": size, "batch_max_delay_ms": delay_ms})

    adaptive = base.model_copy(update={"batch_adaptive": True})
    log = console.log
    layout = bench.layout
    other = layout.other()
    extra = "" if layout.total == 1 else ", the pipeline with 1 worker"
    if other is not None:
        extra += f", the same workers as {other.describe()} off, on, on and off"
    log(
        f"{plan.repeats} rounds of: saturation as {layout.describe()}, telemetry off, on, on"
        f" and off{extra}, the naive loop, the compute-bound ceiling"
    )
    # The machine's speed drifts between runs by more than the effects measured, so the
    # figures compared are taken in rounds, one of each per round, and each ratio is the
    # median of its rounds' ratios.
    frames = plan.saturation_frames
    sat_runs: list[RunResult] = []
    tel_runs: list[RunResult] = []
    round_fps: list[float] = []
    paired: list[float] = []
    one_worker_runs: list[RunResult] = []
    other_runs: list[RunResult] = []
    other_tel_runs: list[RunResult] = []
    other_paired: list[float] = []
    other_over: list[float] = []
    naive_runs: list[dict[str, Any]] = []
    ceiling_runs: list[float] = []

    def off_on_on_off(shape: WorkerLayout) -> tuple[list[RunResult], list[RunResult], float]:
        # Off, on, on, off: the order of the runs and a steady drift of the machine's
        # speed cancel out of telemetry's ratio.
        off = [bench.saturation(base, frames, layout=shape)]
        on = [bench.saturation(base, frames, telemetry=True, layout=shape) for _ in "ab"]
        off.append(bench.saturation(base, frames, layout=shape))
        return off, on, sum(r.fps for r in on) / sum(r.fps for r in off)

    for _ in range(plan.repeats):
        off, on, ratio = off_on_on_off(layout)
        sat_runs += off
        tel_runs += on
        round_fps.append(statistics.fmean(r.fps for r in off))
        paired.append(ratio)
        if layout.total > 1:
            one_worker_runs.append(bench.saturation(base, frames, layout=WorkerLayout(1, 1)))
        if other is not None:
            off, on, ratio = off_on_on_off(other)
            other_runs += off
            other_tel_runs += on
            other_paired.append(ratio)
            other_over.append(statistics.fmean(r.fps for r in off) / round_fps[-1])
        naive_runs.append(bench.naive(plan.naive_frames))
        ceiling_runs.append(bench.compute_ceiling(default_size, plan.ceiling_seconds))
    capacity = statistics.median(r.fps for r in sat_runs)
    ceiling = {
        "runs": [round(v, 1) for v in ceiling_runs],
        "mean": round(statistics.fmean(ceiling_runs), 1),
        "median": round(statistics.median(ceiling_runs), 1),
        "spread": round(_spread(ceiling_runs), 3),
    }
    log("stage ceilings")
    stages = stage_ceilings(
        bench.inferencer,
        bench.jpegs,
        sorted({1, default_size, *plan.batch_sizes}),
        plan.ceiling_seconds,
    )

    log("throughput vs batch size (saturation)")
    by_size: dict[int, RunResult] = {default_size: sat_runs[0]}
    for size in plan.batch_sizes:
        if size not in by_size:
            by_size[size] = bench.saturation(fixed(size, 50.0), plan.saturation_frames)
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
        fixed_runs = [bench.saturation(fixed(best_size, 50.0), plan.saturation_frames)]
        adaptive_runs = [bench.saturation(adaptive, plan.saturation_frames) for _ in "ab"]
        fixed_runs.append(bench.saturation(fixed(best_size, 50.0), plan.saturation_frames))
        sat_rounds.append((fixed_runs, adaptive_runs))
    sat_ratios = [sum(r.fps for r in a) / sum(r.fps for r in f) for f, a in sat_rounds]
    adaptive_sat = sat_rounds[_median_index(sat_ratios)][1][0]

    rate = 0.7 * capacity
    log(f"latency vs batch size at {rate:.0f} frames/s")
    lat_size = {
        size: bench.paced(fixed(size, 50.0), rate, plan.paced_seconds) for size in plan.batch_sizes
    }
    log(f"latency vs max delay at {rate:.0f} frames/s")
    lat_delay = {
        d: bench.paced(fixed(default_size, d), rate, plan.paced_seconds) for d in plan.delays_ms
    }
    log("latency vs offered load")
    by_load = {load: bench.paced(base, load * capacity, plan.paced_seconds) for load in plan.loads}
    low = min(plan.loads)
    log(
        f"{plan.adaptive_rounds} rounds at {low:.0%} load of: the default, batch 1 with no"
        " delay, adaptive; then at 70% of: the default and adaptive, in turns"
    )
    low_rounds: list[tuple[RunResult, RunResult, RunResult]] = []
    for _ in range(plan.adaptive_rounds):
        low_rounds.append(
            (
                bench.paced(base, low * capacity, plan.paced_seconds),
                bench.paced(fixed(1, 0.0), low * capacity, plan.paced_seconds),
                bench.paced(adaptive, low * capacity, plan.paced_seconds),
            )
        )
    low_ratios = [
        min(default.latency_ms["p99"], unbatched.latency_ms["p99"])
        / max(adaptive.latency_ms["p99"], 1e-9)
        for default, unbatched, adaptive in low_rounds
    ]
    middle = _median_index(low_ratios)
    low_default, unbatched_low, adaptive_low = low_rounds[middle]
    # At 70 % load each round runs the default and adaptive, first one then the other in
    # turns, so that a drift of the machine's speed favours neither.
    mid_rounds: list[tuple[RunResult, RunResult]] = []
    for turn in range(plan.adaptive_rounds):
        swap = turn % 2 == 1
        first = bench.paced(adaptive if swap else base, rate, plan.paced_seconds)
        second = bench.paced(base if swap else adaptive, rate, plan.paced_seconds)
        mid_rounds.append((second, first) if swap else (first, second))
    mid_ratios = [d.latency_ms["p99"] / max(a.latency_ms["p99"], 1e-9) for d, a in mid_rounds]
    adaptive_mid = mid_rounds[_median_index(mid_ratios)][1]
    at_rate = lat_delay.get(base.batch_max_delay_ms) or lat_size.get(default_size) or by_load[low]

    memory: dict[str, Any] | None = None
    if plan.backlog_runs:
        counts = ", ".join(f"{n:,}" for n in plan.backlog_runs)
        log(f"peak RSS after {counts} frames through a bounded backlog (own processes)")
        memory = streamed_rss(plan.backlog_runs, log=log)

    naive_fps = statistics.median(r["frames_per_s"] for r in naive_runs)
    gpu_samples = [r.gpu_utilisation for r in sat_runs if r.gpu_utilisation is not None]
    gpu_busy = statistics.median(gpu_samples) if gpu_samples else None
    tel_fps = statistics.median(r.fps for r in tel_runs)
    best_fixed_low = min(low_default.latency_ms["p99"], unbatched_low.latency_ms["p99"])
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
        },
        "workers": layout.total,
        "layout": asdict(layout) | {"name": layout.name},
        "settings": {
            "batch_max_size": default_size,
            "batch_max_delay_ms": base.batch_max_delay_ms,
            "fetch_batch_size": base.fetch_batch_size,
            "partitions": CAMERAS,
        },
        "pipeline": {
            "saturation": [r.as_dict() for r in sat_runs],
            "frames_per_s": round(capacity, 1),
            "spread": round(_spread([r.fps for r in sat_runs]), 3),
            "telemetry_on": [r.as_dict() for r in tel_runs],
            "telemetry_medians_on_over_off": round(tel_fps / capacity, 3),
            "telemetry_rounds": [round(r, 3) for r in paired],
            "one_worker": [r.as_dict() for r in one_worker_runs],
            "one_worker_frames_per_s": (
                round(statistics.median(r.fps for r in one_worker_runs), 1)
                if one_worker_runs
                else None
            ),
            "offered_fps": round(rate, 1),
            "latency_at_70pct": at_rate.as_dict(),
            # The dataflow's own processes (in-process runs share the benchmark's).
            "dataflow_peak_rss_mb": (
                round(max(r.peak_rss_mb for r in sat_runs + tel_runs), 1)
                if layout.processes > 1
                else None
            ),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "gpu_utilisation_pct": gpu_busy,
        },
        "other_layout": (
            {
                "layout": asdict(other) | {"name": other.name},
                "saturation": [r.as_dict() for r in other_runs],
                "telemetry_on": [r.as_dict() for r in other_tel_runs],
                "frames_per_s": round(statistics.median(r.fps for r in other_runs), 1),
                "over_pipeline": round(statistics.median(other_over), 3),
                "over_pipeline_rounds": [round(r, 3) for r in other_over],
                "telemetry_on_over_off": round(statistics.median(other_paired), 3),
                "telemetry_rounds": [round(r, 3) for r in other_paired],
            }
            if other is not None
            else None
        ),
        "naive": {"runs": naive_runs, "frames_per_s": round(naive_fps, 1)},
        "ceilings": {"compute_bound_frames_per_s": ceiling, "stages": stages},
        "sweeps": {
            "batch_size_saturation": {str(k): v.as_dict() for k, v in sorted(by_size.items())},
            "batch_size_latency": {str(k): v.as_dict() for k, v in lat_size.items()},
            "max_delay_latency": {str(k): v.as_dict() for k, v in lat_delay.items()},
            "offered_load": {str(k): v.as_dict() for k, v in by_load.items()},
        },
        "adaptive": {
            "saturation": adaptive_sat.as_dict(),
            "low_load": adaptive_low.as_dict(),
            "low_load_fixed": {
                "default": low_default.as_dict(),
                "batch_1": unbatched_low.as_dict(),
            },
            "at_70pct": adaptive_mid.as_dict(),
            "best_fixed_size": best_size,
            "saturation_rounds": [round(r, 3) for r in sat_ratios],
            "saturation_round_frames_per_s": [
                {"fixed": [round(r.fps, 1) for r in f], "adaptive": [round(r.fps, 1) for r in a]}
                for f, a in sat_rounds
            ],
            "over_best_fixed_saturation": round(statistics.median(sat_ratios), 3),
            "low_load_p99_ms_best_fixed": round(best_fixed_low, 1),
            "low_load_p99_over_adaptive": round(statistics.median(low_ratios), 3),
            "low_load_rounds": [round(r, 3) for r in low_ratios],
            "at_70pct_rounds": [
                {"default": d.as_dict()["latency_ms"], "adaptive": a.as_dict()["latency_ms"]}
                for d, a in mid_rounds
            ],
            "at_70pct_median_ms": {
                who: {
                    q: round(statistics.median(r[i].latency_ms[q] for r in mid_rounds), 1)
                    for q in ("p50", "p99")
                }
                for i, who in enumerate(("default", "adaptive"))
            },
            "at_70pct_p99_default_over_adaptive": round(statistics.median(mid_ratios), 3),
        },
        "ratios": {
            "pipeline_over_naive": round(
                statistics.median(
                    fps / n["frames_per_s"] for fps, n in zip(round_fps, naive_runs, strict=True)
                ),
                3,
            ),
            "pipeline_over_ceiling": round(
                statistics.median(fps / c for fps, c in zip(round_fps, ceiling_runs, strict=True)),
                3,
            ),
            # Each round's two telemetry runs against the two around them, then the
            # median: the machine's speed drifts between runs more than telemetry costs.
            "telemetry_on_over_off": round(statistics.median(paired), 3),
            "adaptive_over_best_fixed": round(statistics.median(sat_ratios), 3),
            "rss_100k_over_10k": memory["rss_largest_over_smallest"] if memory else None,
        },
        "memory": memory,
        "targets": {**TARGETS, **GPU_TARGETS} if gpu_busy is not None else TARGETS,
    }
    _print(report, console)
    (out / "pipeline.json").write_text(json.dumps(report, indent=2))
    report["plots"] = plot(report, out)
    return report


def _median_index(values: Sequence[float]) -> int:
    """The index of the median of `values` (the upper one of an even count)."""
    return sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]


def _spread(values: Sequence[float]) -> float:
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / mean if mean else 0.0


def _print(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"streamsight pipeline benchmark on {report['machine']['device']}")
    for column in ("measure", "value", "target"):
        table.add_column(column)
    p = report["pipeline"]
    r = report["ratios"]
    t = report["targets"]
    sat = ", ".join(f"{x['frames_per_s']:.0f}" for x in p["saturation"])
    tel = ", ".join(f"{x['frames_per_s']:.0f}" for x in p["telemetry_on"])
    naive = ", ".join(f"{x['frames_per_s']:.0f}" for x in report["naive"]["runs"])
    ceiling = report["ceilings"]["compute_bound_frames_per_s"]
    lat = p["latency_at_70pct"]
    mid = report["adaptive"]["at_70pct_median_ms"]
    layout = report["layout"]
    shape = WorkerLayout(layout["processes"], layout["workers"]).describe()
    rows = [
        (f"pipeline at saturation, {shape}, frames/s", f"{p['frames_per_s']:.0f} ({sat})", ""),
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
    if p["one_worker"]:
        one = ", ".join(f"{x['frames_per_s']:.0f}" for x in p["one_worker"])
        rows.append(
            ("pipeline at saturation, 1 worker", f"{p['one_worker_frames_per_s']:.0f} ({one})", "")
        )
    other = report.get("other_layout")
    if other:
        runs = ", ".join(f"{x['frames_per_s']:.0f}" for x in other["saturation"])
        rounds = ", ".join(f"{v:.2f}" for v in other["over_pipeline_rounds"])
        name = other["layout"]["name"]
        other_shape = WorkerLayout(other["layout"]["processes"], other["layout"]["workers"])
        rows += [
            (
                f"the same workers as {other_shape.describe()}, frames/s",
                f"{other['frames_per_s']:.0f} ({runs})",
                "",
            ),
            (
                f"{name} / {layout['name']} (median of rounds)",
                f"{other['over_pipeline']:.2f} ({rounds})",
                "",
            ),
            (
                f"telemetry on / off as {name}",
                f"{other['telemetry_on_over_off']:.2f} (rounds"
                f" {', '.join(f'{v:.2f}' for v in other['telemetry_rounds'])})",
                "",
            ),
        ]
    if p["dataflow_peak_rss_mb"] is not None:
        rows.append(
            (
                "peak RSS of the dataflow's processes together",
                f"{p['dataflow_peak_rss_mb']:.0f} MiB",
                "",
            )
        )
    rows += [
        ("peak RSS, benchmark process (broker and all topics)", f"{p['peak_rss_mb']:.0f} MiB", ""),
        (
            f"latency at {p['offered_fps']:.0f} frames/s",
            f"p50 {lat['latency_ms']['p50']:.0f} ms, p99 {lat['latency_ms']['p99']:.0f} ms",
            "",
        ),
        ("naive loop, frames/s", f"{report['naive']['frames_per_s']:.0f} ({naive})", ""),
        (
            "compute-bound ceiling, frames/s",
            f"{ceiling['median']:.0f} ({', '.join(f'{v:.0f}' for v in ceiling['runs'])})",
            "",
        ),
        ("telemetry on, frames/s", tel, ""),
        ("pipeline / naive", f"{r['pipeline_over_naive']:.2f}", f">= {t['pipeline_over_naive']}"),
        (
            "pipeline / ceiling",
            f"{r['pipeline_over_ceiling']:.2f}",
            f">= {t['pipeline_over_ceiling']}",
        ),
        (
            "telemetry on / off (median of rounds off, on, on, off)",
            f"{r['telemetry_on_over_off']:.2f} (rounds"
            f" {', '.join(f'{v:.2f}' for v in p['telemetry_rounds'])};"
            f" medians {p['telemetry_medians_on_over_off']:.2f})",
            f">= {t['telemetry_on_over_off']}",
        ),
        (
            "adaptive / best fixed (saturation; median of rounds fixed, adaptive, adaptive, fixed)",
            f"{r['adaptive_over_best_fixed']:.2f} (batch {report['adaptive']['best_fixed_size']};"
            f" rounds {', '.join(f'{v:.2f}' for v in report['adaptive']['saturation_rounds'])})",
            f">= {t['adaptive_over_best_fixed']}",
        ),
        (
            "adaptive low load: best fixed p99 / adaptive p99 (median round)",
            f"{report['adaptive']['low_load_p99_over_adaptive']:.2f} "
            f"({report['adaptive']['low_load_p99_ms_best_fixed']:.0f} / "
            f"{report['adaptive']['low_load']['latency_ms']['p99']:.0f} ms)",
            f">= {t['adaptive_over_best_fixed']}",
        ),
        (
            "adaptive at 70 % load: p50 / p99, ms (medians of rounds; the default's)",
            f"{mid['adaptive']['p50']:.0f} / {mid['adaptive']['p99']:.0f}"
            f" ({mid['default']['p50']:.0f} / {mid['default']['p99']:.0f}); default p99 /"
            f" adaptive p99 {report['adaptive']['at_70pct_p99_default_over_adaptive']:.2f}",
            "",
        ),
    ]
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
    for size, row in report["sweeps"]["batch_size_saturation"].items():
        rows.append((f"saturation, batch {size}", f"{row['frames_per_s']:.0f} frames/s", ""))
    for name in ("batch_size_latency", "max_delay_latency", "offered_load"):
        for key, row in report["sweeps"][name].items():
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
    """Throughput and latency vs batch size and max delay, latency vs offered load."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = report["sweeps"]
    written = []

    def latency_lines(ax: Any, data: dict[str, Any], xs: list[float]) -> None:
        for q in ("p50", "p99"):
            ax.plot(xs, [data[k]["latency_ms"][q] for k in data], marker="o", label=q)
        ax.set_ylabel("latency capture->sink (ms)")
        ax.legend()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    sat = sweeps["batch_size_saturation"]
    ax1.plot([int(k) for k in sat], [v["frames_per_s"] for v in sat.values()], marker="o")
    ax1.axhline(report["ceilings"]["compute_bound_frames_per_s"]["median"], ls="--", c="gray")
    ax1.set(xscale="log", xlabel="batch max size", ylabel="frames/s at saturation")
    lat = sweeps["batch_size_latency"]
    latency_lines(ax2, lat, [int(k) for k in lat])
    ax2.set(xscale="log", xlabel=f"batch max size ({report['pipeline']['offered_fps']} frames/s)")
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
    plt.close("all")
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--out", type=Path, default=Path(".streamsight/benchmark"))
    parser.add_argument("--frames", type=int, help="frames per saturation run")
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
        "--no-backlog", action="store_true", help="skip the peak-RSS runs (minutes)"
    )
    args = parser.parse_args(argv)
    if args.model_scale < 1 or args.workers < 1:
        parser.error("--model-scale and --workers must be at least 1")
    settings_or_exit()  # the runs read STREAMSIGHT_* too: a bad one is one line, not a trace
    plan = QUICK if args.quick else FULL
    if args.no_backlog:
        plan = replace(plan, backlog_runs=())
    if args.frames:
        plan = replace(
            plan,
            saturation_frames=args.frames,
            naive_frames=max(plan.naive_frames, args.frames // 4),
        )
    return run(plan, args.out, Console(stderr=True), args.model_scale, args.workers, args.layout)


if __name__ == "__main__":
    main()
