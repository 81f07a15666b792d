"""Peak memory of the dataflow after N frames through a bounded backlog:
`python -m bench.backlog [--frames N ...] [--backlog B]`.

For each frame count, a `python -m tools.embedded` process serves the topics and a fresh
child process (`--run-flow`) runs the dataflow, while this process keeps the input topic
topped up so that about `backlog` frames wait unwritten until it has published them all.
It then hands the input's end offsets to the child (a JSON file in the run's folder); the
child stops there and prints one JSON line: frames written, stored, dead letters, seconds
(first ingest to last write) and its peak resident set size. The broker, the producer
and the dataflow are three processes, so the child's peak is the dataflow's alone.

The embedded broker keeps at most 5 MiB per partition (`MOCK_PARTITION_BYTES`) and drops
the oldest frames beyond that, read or not, so a backlog must stay well below 4 x 5 MiB
of frames (about 2,200 synthetic frames); a larger one is refused (ValueError). A frame
dropped before the dataflow read it would be missing from the output or come back as a
dead letter: either raises RuntimeError.

The child's peak is `VmHWM` of /proc/self/status where there is one: on Linux,
`getrusage(RUSAGE_SELF).ru_maxrss` keeps the parent's peak across fork and exec, so it
would report the larger of the two.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.table import Table

from flows.settings import Settings, settings_or_exit
from operators.frames import FrameResult
from operators.kafka_io import CheckedProducer, client_config, producer_config
from tools.camera import OutgoingFrame, camera_id, publish, synthetic_frames

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
"""Partitions of each topic, and cameras publishing (one per partition)."""
MOCK_PARTITION_BYTES = 5 * 1024 * 1024
"""What librdkafka's mock cluster keeps per partition (fixed in librdkafka; older message
sets are dropped), so the broker holds at most PARTITIONS x 5 MiB of frames."""
BACKLOG_SHARE = 0.75
"""The largest share of what the broker holds that a backlog may take."""
FRAME_OVERHEAD_BYTES = 512
"""Key, headers and record framing of one frame, rounded up."""
DISTINCT_FRAMES = 64
DEFAULT_FRAME_COUNTS = (10_000, 100_000)
DEFAULT_BACKLOG = 1_500
POLL_S = 0.2
BROKER_START_TIMEOUT_S = 60.0
MIN_FLOW_TIMEOUT_S = 600.0
FLOW_TIMEOUT_S_PER_FRAME = 0.05
ENDS_FILE = "ends.json"

logger = logging.getLogger(__name__)


def _settings() -> Settings:
    return Settings(progress=False, metrics_enabled=False)


def topics(name: str) -> tuple[str, str, str]:
    """The input, output and dead-letter topics of run `name`."""
    return name, f"{name}-out", f"{name}-dlq"


def peak_rss_kib() -> int:
    """This process's own peak resident set size in KiB (VmHWM, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@contextmanager
def broker(names: Sequence[str], stderr_path: Path) -> Iterator[str]:
    """Serve `python -m tools.embedded` with topics `names` (PARTITIONS partitions each);
    yield its bootstrap; stop it on exit. Its stderr goes to `stderr_path`."""
    args = [sys.executable, "-m", "tools.embedded", "--partitions", str(PARTITIONS)]
    for name in names:
        args += ["--topic", name]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        bootstrap = _read_bootstrap(process, time.monotonic() + BROKER_START_TIMEOUT_S)
        if bootstrap is None:
            tail = stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the embedded broker did not start: {tail}")
        yield bootstrap
    finally:
        _stop(process)
        if process.stdout is not None:
            process.stdout.close()


def _read_bootstrap(process: subprocess.Popen[str], deadline: float) -> str | None:
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            return None
        if line.startswith("bootstrap="):
            return line.strip().removeprefix("bootstrap=")
    return None


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _frames(jpegs: Sequence[bytes], first: int, count: int) -> Iterator[list[OutgoingFrame]]:
    """Frames `first` .. `first + count - 1`: frame i is camera i mod PARTITIONS, seq
    i // PARTITIONS, JPEG i mod len(jpegs); one list per PARTITIONS frames."""
    now_ms = time.time() * 1000.0
    for start in range(first, first + count, PARTITIONS):
        yield [
            OutgoingFrame(camera_id(i % PARTITIONS), i // PARTITIONS, jpegs[i % len(jpegs)], now_ms)
            for i in range(start, min(start + PARTITIONS, first + count))
        ]


class _Done:
    """Frames the dataflow has finished with: results plus dead letters it published."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        _, out, dlq = topics(topic)
        self._partitions = [TopicPartition(t, p) for t in (out, dlq) for p in range(PARTITIONS)]
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "backlog-progress", "logger": logger}
        )

    def __call__(self) -> int:
        return sum(
            self._consumer.get_watermark_offsets(tp, timeout=10.0, cached=False)[1]
            for tp in self._partitions
        )

    def close(self) -> None:
        self._consumer.close()


def _feed(
    bootstrap: str,
    topic: str,
    jpegs: Sequence[bytes],
    count: int,
    backlog: int,
    flow: subprocess.Popen[Any],
    deadline: float,
) -> dict[tuple[str, int], int]:
    """Publish `count` frames to `topic`, never more than `backlog` ahead of what the
    dataflow has finished with; the end offsets."""
    producer = CheckedProducer(
        producer_config(_settings(), bootstrap=bootstrap, client_id="backlog-camera")
    )
    done = _Done(bootstrap, topic)
    step = max(backlog // 4, 1)
    sent = 0
    try:
        while sent < count:
            room = min(backlog - (sent - done()), count - sent)
            if room >= min(step, count - sent):
                report = publish(
                    producer,
                    topic,
                    _frames(jpegs, sent, room),
                    job_id="backlog",
                    fps=0.0,
                    partitions=PARTITIONS,
                )
                sent += report.sent
                continue
            if flow.poll() is not None:
                raise RuntimeError(f"the dataflow exited {flow.returncode} after {sent} frames")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dataflow timed out after {sent} frames published")
            time.sleep(POLL_S)
        ends = producer.end_offsets
    finally:
        done.close()
        producer.close()
    if sum(ends.values()) != sent:
        raise RuntimeError(f"{sent} frames sent, end offsets {ends}")
    return ends


@dataclass
class _Written:
    """Counts the frames the result sink wrote; first ingest and last write times."""

    frames: int = 0
    first_in_ns: int = 0
    last_out_ns: int = 0

    def __call__(self, results: Sequence[FrameResult], duplicates: int, written_ns: int) -> None:
        if not results:
            return
        first = min(r.meta.ingest_ns for r in results)
        self.first_in_ns = min(self.first_in_ns, first) if self.frames else first
        self.last_out_ns = max(self.last_out_ns, written_ns)
        self.frames += len(results)


class _EndsFile:
    """End offsets of `topic` from `path` once it exists (None until then)."""

    def __init__(self, path: Path, topic: str) -> None:
        self._path = path
        self._topic = topic
        self._ends: dict[tuple[str, int], int] | None = None

    def __call__(self) -> Mapping[tuple[str, int], int] | None:
        if self._ends is None and self._path.exists():
            saved = json.loads(self._path.read_text())
            self._ends = {(self._topic, int(p)): end for p, end in saved.items()}
        return self._ends


def _write_ends(path: Path, ends: Mapping[tuple[str, int], int]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({str(p): end for (_, p), end in ends.items()}))
    partial.replace(path)


def run_flow(bootstrap: str, topic: str, workdir: Path) -> dict[str, Any]:
    """Run the dataflow over `topic` until the end offsets in `workdir / ENDS_FILE` (tailing
    until that file appears); frames written, stored, dead letters, seconds (first ingest
    to last write) and this process's peak RSS in MiB."""
    from bytewax.testing import run_main

    from flows.pipeline import build_flow
    from operators.detector import load_detector
    from operators.inference import Inferencer
    from operators.ingest import frame_source
    from operators.sinks import DeadLetterSink, ResultSink
    from operators.stores import open_store
    from operators.workers import keep_freed_memory

    keep_freed_memory()  # as `flows.video` does
    settings = _settings()
    _, out, dlq = topics(topic)
    inferencer = Inferencer.create(load_detector(), device="auto")
    url = f"sqlite:///{workdir / f'{topic}.db'}"
    producer = producer_config(settings, bootstrap=bootstrap, client_id="backlog-sink")
    written = _Written()
    flow = build_flow(
        settings,
        source=frame_source(
            bootstrap,
            topic,
            client_config=client_config(settings, bootstrap),
            batch_size=settings.fetch_batch_size,
            tail=True,
            end_offsets=_EndsFile(workdir / ENDS_FILE, topic),
        ),
        infer=inferencer.infer,
        input_size=inferencer.detector.input_size,
        results=ResultSink(
            url, producer, output_topic=out, dead_letter_topic=dlq, on_results=written
        ),
        dead_letters=DeadLetterSink(url, producer, topic=dlq),
        model={"streamsight.device": inferencer.device_name},
    )
    run_main(flow)
    store = open_store(url)
    try:
        stored, letters = store.count_results(), store.count_dead_letters()
    finally:
        store.close()
    return {
        "frames": written.frames,
        "stored": stored,
        "dead_letters": letters,
        "seconds": round((written.last_out_ns - written.first_in_ns) / 1e9, 3),
        "peak_rss_mb": round(peak_rss_kib() / 1024.0, 1),
    }


def _streamed_run(
    count: int, backlog: int, jpegs: Sequence[bytes], workdir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """One run: broker, dataflow process and producer for `count` frames."""
    name = f"backlog-{count}"
    rundir = workdir / name
    rundir.mkdir()
    timeout_s = max(MIN_FLOW_TIMEOUT_S, count * FLOW_TIMEOUT_S_PER_FRAME)
    with broker(topics(name), rundir / "broker.txt") as bootstrap:
        args = [sys.executable, "-m", "bench.backlog", "--run-flow"]
        args += ["--bootstrap", bootstrap, "--topic", name, "--workdir", str(rundir)]
        stdout_path, stderr_path = rundir / "flow.json", rundir / "flow.txt"
        with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
            flow = subprocess.Popen(args, cwd=REPO_ROOT, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + timeout_s
            say(f"{count} frames: publishing with about {backlog} waiting")
            ends = _feed(bootstrap, name, jpegs, count, backlog, flow, deadline)
            _write_ends(rundir / ENDS_FILE, ends)
            say(f"{count} frames: all published, waiting for the dataflow")
            flow.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{count} frames: the dataflow timed out") from None
        finally:
            _stop(flow)
    lines = stdout_path.read_text().strip().splitlines()
    if flow.returncode != 0 or not lines:
        tail = stderr_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{count} frames: the dataflow exited {flow.returncode}: {tail}")
    run: dict[str, Any] = json.loads(lines[-1])
    if not run["frames"] == run["stored"] == count or run["dead_letters"]:
        raise RuntimeError(f"{count} frames published, the dataflow reported {run}")
    return run


def streamed_rss(
    frame_counts: Sequence[int] = DEFAULT_FRAME_COUNTS,
    backlog: int = DEFAULT_BACKLOG,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """For each count in `frame_counts`: frames written, stored, dead letters, seconds and
    peak RSS (MiB) of a dataflow process that wrote that many frames, read through a
    backlog of about `backlog` frames; and the largest count's peak RSS over the
    smallest's. Raises ValueError when the broker could not hold `backlog` frames, and
    RuntimeError when a run did not write each frame published exactly once."""
    if not frame_counts or min(frame_counts) < 1 or len(set(frame_counts)) < len(frame_counts):
        raise ValueError(f"frame counts must be distinct and positive: {frame_counts}")
    per_camera = max(DISTINCT_FRAMES // PARTITIONS, 1)
    jpegs = [f.jpeg for tick in synthetic_frames(PARTITIONS, per_camera) for f in tick]
    frame_bytes = max(len(jpeg) for jpeg in jpegs) + FRAME_OVERHEAD_BYTES
    most = int(BACKLOG_SHARE * PARTITIONS * MOCK_PARTITION_BYTES / frame_bytes)
    if not 1 <= backlog <= most:
        raise ValueError(
            f"backlog {backlog}: the embedded broker holds {PARTITIONS} x "
            f"{MOCK_PARTITION_BYTES >> 20} MiB, so at most {most} frames of {frame_bytes} bytes"
        )
    say = log or (lambda _: None)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="streamsight-backlog-") as tmp:
        for count in frame_counts:
            runs[str(count)] = _streamed_run(count, backlog, jpegs, Path(tmp), say)
            say(f"{count} frames: {runs[str(count)]}")
    smallest, largest = runs[str(min(frame_counts))], runs[str(max(frame_counts))]
    return {
        "runs": runs,
        "backlog_frames": backlog,
        "rss_largest_over_smallest": round(largest["peak_rss_mb"] / smallest["peak_rss_mb"], 3),
    }


def _print(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"dataflow peak RSS, backlog of {report['backlog_frames']} frames")
    for column in ("frames", "seconds", "frames/s", "peak RSS (MiB)"):
        table.add_column(column, justify="right")
    for run in report["runs"].values():
        rate = run["frames"] / run["seconds"] if run["seconds"] > 0 else 0.0
        table.add_row(
            f"{run['frames']:,}",
            f"{run['seconds']:.1f}",
            f"{rate:.0f}",
            f"{run['peak_rss_mb']:.1f}",
        )
    table.caption = f"largest / smallest peak RSS: {report['rss_largest_over_smallest']:.3f}"
    console.print(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure (or, with `--run-flow`, be one run's dataflow process); print the result as
    one JSON line on stdout (and, when measuring, a table on stderr) and return it."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.backlog", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--frames", type=int, action="append", help="frames; repeatable")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="frames waiting")
    parser.add_argument("--run-flow", action="store_true", help="be one run's dataflow")
    parser.add_argument("--bootstrap", help="with --run-flow: the broker")
    parser.add_argument("--topic", help="with --run-flow: the input topic")
    parser.add_argument("--workdir", type=Path, help="with --run-flow: the run's folder")
    args = parser.parse_args(argv)
    settings_or_exit()  # the runs read STREAMSIGHT_* too: a bad one is one line, not a trace
    if args.run_flow:
        if not (args.bootstrap and args.topic and args.workdir):
            parser.error("--run-flow needs --bootstrap, --topic and --workdir")
        result = run_flow(args.bootstrap, args.topic, args.workdir)
    else:
        console = Console(stderr=True)
        result = streamed_rss(
            args.frames or DEFAULT_FRAME_COUNTS, args.backlog, lambda line: console.print(line)
        )
        _print(result, console)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
