"""The demo: embedded broker, synthetic cameras, live progress and a closing summary.

Started by `flows.video` when no Kafka is configured. The camera publishes in a
background thread at the demo frame rate while the dataflow consumes; once the camera
is done, its end offsets bound the source so the flow ends when it has processed
everything, and the summary is printed as the process exits.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.settings import Settings, parse_size
from operators.dead_letters import STALE
from operators.kafka_io import CheckedProducer, producer_config
from operators.stores import detections_from_json, open_store
from operators.tally import Tally
from operators.telemetry.tracing import Tracing, send_tracer
from operators.workers import threads_per_worker, workers_per_process
from tools.camera import camera_index, publish, spread_partition, synthetic_frames
from tools.diagnosis import Readings, RegistrySample, diagnose, readings_between
from tools.embedded import EmbeddedBroker
from tools.evaluation import EvalReport, evaluate_detections
from tools.scene import FRAME_SIZE, render_frame

log = logging.getLogger(__name__)

VERDICT_WINDOW_S = 5.0
"""The live progress line's verdict covers about the last this many seconds."""


@dataclass(frozen=True)
class DemoSummary:
    """What the demo did, read back from the sink."""

    sent: int
    written: int
    dead_letters: int
    detections: int
    seconds: float
    latency_ms: tuple[float, float, float]
    mean_batch_size: float
    accuracy: EvalReport | None
    skipped: int = 0
    """Frames skipped as stale (older than the age limit at the batcher), not inferred;
    not counted in `dead_letters`."""
    frame_size: tuple[int, int] = FRAME_SIZE

    @property
    def missing(self) -> int:
        """Frames sent that neither reached the sink nor became dead letters nor were
        skipped as stale."""
        return self.sent - self.written - self.dead_letters - self.skipped


def summarise(
    store_url: str,
    job_id: str,
    *,
    sent: int,
    seconds: float,
    score_threshold: float,
    frame_size: tuple[int, int],
) -> DemoSummary:
    """Read the job's rows back from the sink and measure them against the ground truth."""
    store = open_store(store_url)
    try:
        rows = [row for row in store.fetch_results() if row["job_id"] == job_id]
        letters = [row for row in store.fetch_dead_letters() if row["job_id"] == job_id]
    finally:
        store.close()
    stale = sum(1 for row in letters if row["reason"] == STALE)
    if not rows:
        return DemoSummary(
            sent,
            0,
            len(letters) - stale,
            0,
            seconds,
            (math.nan,) * 3,
            0.0,
            None,
            skipped=stale,
            frame_size=frame_size,
        )
    latency = np.array([(r["written_ns"] - r["capture_ns"]) / 1e6 for r in rows])
    p50, p95, p99 = (float(v) for v in np.percentile(latency, [50, 95, 99]))
    batches = sum(1.0 / r["batch_size"] for r in rows)
    predictions = [detections_from_json(r["detections"]) for r in rows]
    width, height = frame_size
    truths = [
        render_frame(camera_index(r["camera"]), r["seq"], width=width, height=height).objects
        for r in rows
    ]
    accuracy = evaluate_detections(predictions, truths, score_threshold=score_threshold)
    return DemoSummary(
        sent=sent,
        written=len(rows),
        dead_letters=len(letters) - stale,
        detections=sum(len(p) for p in predictions),
        seconds=seconds,
        latency_ms=(p50, p95, p99),
        mean_batch_size=len(rows) / batches,
        accuracy=accuracy,
        skipped=stale,
        frame_size=frame_size,
    )


def summary_table(summary: DemoSummary, job_id: str, max_frame_age_ms: float = 0.0) -> Table:
    """The summary as a two-column table. Frames skipped as stale have a row of their own
    when an age limit (`max_frame_age_ms`) is set or any was skipped."""
    width, height = summary.frame_size
    table = Table(
        title=f"streamsight demo, job {job_id}, {width}x{height} frames", show_header=False
    )
    p50, p95, p99 = summary.latency_ms
    fps = summary.written / summary.seconds if summary.seconds > 0 else 0.0
    rows = [
        ("frames in", f"{summary.sent}"),
        ("frames processed", f"{summary.written}"),
        ("dead letters", f"{summary.dead_letters}"),
    ]
    if max_frame_age_ms > 0 or summary.skipped:
        limit = f" (older than {max_frame_age_ms:g} ms at the batcher)" if max_frame_age_ms else ""
        rows.append(("skipped (stale)", f"{summary.skipped}{limit}"))
    rows += [
        ("missing", f"{summary.missing}"),
        ("detections", f"{summary.detections}"),
        ("throughput", f"{fps:.1f} frames/s over {summary.seconds:.1f} s"),
        ("latency capture->sink", f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms"),
        ("mean batch size", f"{summary.mean_batch_size:.2f}"),
    ]
    if summary.accuracy is not None:
        acc = summary.accuracy
        rows.append(
            (
                "accuracy vs ground truth",
                f"mAP@0.5 {acc.map50:.3f}, precision {acc.precision:.3f}, recall {acc.recall:.3f}",
            )
        )
    for name, value in rows:
        table.add_row(name, value)
    return table


class Demo:
    """Runs the embedded broker and the synthetic cameras for one demo run."""

    def __init__(self, settings: Settings, tally: Tally, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tally = tally
        self.tracing = tracing or Tracing.disabled()
        self._samples: deque[RegistrySample] = deque()
        self._first_sample: RegistrySample | None = None
        self._usage_text = ""
        self.job_id = settings.demo_job_id or f"demo-{datetime.now():%Y%m%d-%H%M%S}"
        self.per_camera = math.ceil(settings.demo_frames / settings.demo_cameras)
        self.frame_size = parse_size(settings.demo_frame_size)
        self.total = self.per_camera * settings.demo_cameras
        self.sent = 0
        self.error: str | None = None
        self.started = time.monotonic()
        self.broker = EmbeddedBroker()
        for topic in (settings.input_topic, settings.output_topic, settings.dead_letter_topic):
            self.broker.create_topic(topic, settings.partitions)
        self._ends: dict[tuple[str, int], int] | None = None
        self._done = threading.Event()
        self.console = Console(stderr=True)
        self._camera = threading.Thread(target=self._run_camera, name="demo-camera", daemon=True)
        self._progress = threading.Thread(target=self._show_progress, name="progress", daemon=True)

    @property
    def bootstrap(self) -> str:
        """Bootstrap address of the embedded broker."""
        return self.broker.bootstrap

    def end_offsets(self) -> Mapping[tuple[str, int], int] | None:
        """Where each input partition ends, once the camera has finished."""
        return self._ends

    def start(self) -> None:
        """Start the camera and the progress display; print the summary at exit."""
        log.info(
            "embedded broker at %s; demo job %s: %d cameras x %d frames of %s at %s frames/s",
            self.bootstrap,
            self.job_id,
            self.settings.demo_cameras,
            self.per_camera,
            self.settings.demo_frame_size,
            self.settings.demo_fps or "max",
        )
        if self.settings.metrics_enabled:
            self._first_sample = RegistrySample.read(time.monotonic())
            self._samples.append(self._first_sample)
        self._camera.start()
        if self.settings.progress:
            self._progress.start()
        atexit.register(self.finish)

    def _count_sent(self, total: int) -> None:
        self.sent = total

    def _run_camera(self) -> None:
        settings = self.settings
        producer = CheckedProducer(
            producer_config(settings, bootstrap=self.bootstrap, client_id="streamsight-demo-camera")
        )
        try:
            publish(
                producer,
                settings.input_topic,
                synthetic_frames(
                    settings.demo_cameras,
                    self.per_camera,
                    width=self.frame_size[0],
                    height=self.frame_size[1],
                ),
                job_id=self.job_id,
                fps=settings.demo_fps,
                on_sent=self._count_sent,
                partitions=settings.partitions,
                trace_headers=send_tracer(
                    self.tracing,
                    settings.input_topic,
                    self.job_id,
                    partial(spread_partition, partitions=settings.partitions),
                ),
            )
        except Exception as exc:  # reported in the summary and the exit status
            self.error = f"demo camera failed: {exc}"
            log.error(self.error)
        finally:
            ends = {
                tp: end for tp, end in producer.end_offsets.items() if tp[0] == settings.input_topic
            }
            producer.close()
            self._ends = ends
            self._done.set()

    def _status(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        (p95,) = self.tally.latency_percentiles(95)
        fps = self.tally.written / elapsed
        return (
            f"{fps:6.1f} frames/s | batch {self.tally.mean_batch_size():4.1f}"
            f" | p95 {p95:5.0f} ms | dead letters {self.tally.dead_letters}"
            f"{self._resources()}"
        )

    def _readings(self, since: RegistrySample, until: RegistrySample) -> Readings:
        """This process's readings between two samples of its metrics."""
        workers = workers_per_process()
        return readings_between(
            since,
            until,
            workers_per_process=workers,
            model_threads=threads_per_worker(workers, self.settings.cpu_threads),
        )

    def _resources(self) -> str:
        """Lag, CPU per stage (share of one core) and GPU use over the last second, and
        the bound over about the last `VERDICT_WINDOW_S` seconds."""
        if not self.settings.metrics_enabled:
            return ""
        now = time.monotonic()
        if self._samples and now - self._samples[-1].at_s < 1.0:
            return self._usage_text
        sample = RegistrySample.read(now)
        self._samples.append(sample)
        if len(self._samples) < 2:
            return self._usage_text
        last = self._readings(self._samples[-2], sample)
        while len(self._samples) > 2 and now - self._samples[1].at_s >= VERDICT_WINDOW_S:
            self._samples.popleft()
        busiest = sorted((share, stage) for stage, share in last.stage_cpu.items())[::-1][:3]
        cpu = " ".join(f"{stage} {share:.0%}" for share, stage in busiest)
        gpu = "" if last.gpu_utilization is None else f" | gpu {last.gpu_utilization:.0%}"
        verdict = diagnose(self._readings(self._samples[0], sample)).verdict
        self._usage_text = f" | lag {last.lag_records or 0:.0f} | cpu {cpu}{gpu} | {verdict}"
        return self._usage_text

    def _show_progress(self) -> None:
        if not self.console.is_terminal:
            while not self._stopped():
                time.sleep(5)
                print(
                    f"processed {self.tally.written}/{self.total} | {self._status()}",
                    file=sys.stderr,
                )
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            camera = progress.add_task("sent     ", total=self.total, status="")
            sink = progress.add_task("processed", total=self.total, status="")
            while not self._stopped():
                progress.update(camera, completed=self.sent)
                progress.update(
                    sink,
                    completed=self.tally.written + self.tally.dead_letters,
                    status=self._status(),
                )
                time.sleep(0.25)
            progress.update(camera, completed=self.sent)
            progress.update(
                sink, completed=self.tally.written + self.tally.dead_letters, status=self._status()
            )

    def _stopped(self) -> bool:
        done = self.tally.written + self.tally.dead_letters
        return self._finished or (self._done.is_set() and done >= self.sent)

    _finished = False

    def finish(self) -> None:
        """Flush the spans, stop the display, print the summary; exit non-zero if anything
        went missing."""
        self._finished = True
        self.tracing.flush()
        if self._progress.is_alive():
            self._progress.join(timeout=2)
        seconds = time.monotonic() - self.started
        summary = summarise(
            self.settings.sink,
            self.job_id,
            sent=self.sent,
            seconds=seconds,
            score_threshold=self.settings.score_threshold,
            frame_size=self.frame_size,
        )
        if self.settings.progress:
            self.console.print(summary_table(summary, self.job_id, self.settings.max_frame_age_ms))
            if self._first_sample is not None:
                run = self._readings(self._first_sample, RegistrySample.read(time.monotonic()))
                self.console.print(diagnose(run).verdict, markup=False, highlight=False)
            self.console.print(f"detections stored in {self.settings.sink_url.redacted}")
        self.broker.close()
        if self.error or summary.missing:
            self.console.print(f"[red]{self.error or f'{summary.missing} frames missing'}")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
