"""The benchmark's cameras: frames published to a topic from a process of their own, as a
camera does not share the dataflow's interpreter, paced or as fast as the broker takes
them, held back so as never to outgrow what the embedded broker keeps.

Kept apart from `bench.pipeline` so that the publishing process starts without the model
and the dataflow (a tenth of the start-up, on the cores the flow is measured on).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from flows.settings import Settings
from operators.kafka_io import CheckedProducer, producer_config
from tools.camera import OutgoingFrame, camera_id, publish

CAMERAS = 4
"""Cameras (a partition each) of a run unless it says otherwise."""
MOCK_PARTITION_BYTES = 5 * 1024 * 1024
"""What the embedded broker (librdkafka's mock cluster) keeps of each partition: past it,
it drops the oldest messages, read or not (checked: 300 messages of 86 kB to one
partition leave its low watermark at 242)."""
BROKER_MARGIN = 0.1
"""The share of a partition left free when a run's frames all wait in the broker at once
(message and batch headers)."""


AHEAD_POLL_S = 0.05
"""How often a producer held back (see `frame_ticks`) asks what the flow has written: each
ask reads every output partition's offsets, on the cores the flow runs on."""


class Feed:
    """A publishing process started for a run: `end_offsets()` returns each partition's
    end offset once it has finished (None before) and raises if it failed; `started_ns`
    and `ended_ns` say when it sent its first and last frame (wall clock, once known)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.started_ns: int | None = None
        self.ended_ns: int | None = None
        self._done: dict[str, Any] = {}
        self._process = process
        threading.Thread(target=self._wait, name="bench-camera", daemon=True).start()

    def _wait(self) -> None:
        out, _ = self._process.communicate()
        if self._process.returncode != 0:
            self._done["error"] = f"the publishing process failed (exit {self._process.returncode})"
            return
        report = json.loads(out)
        self.started_ns, self.ended_ns = report["started_ns"], report["ended_ns"]
        self._done["ends"] = offsets_from_json(json.dumps(report["ends"]))

    def end_offsets(self) -> dict[tuple[str, int], int] | None:
        """The end offsets once the process has finished, else None."""
        if "error" in self._done:
            raise RuntimeError(self._done["error"])
        ends: dict[tuple[str, int], int] | None = self._done.get("ends")
        return ends


def frame_ticks(
    jpegs: Sequence[bytes],
    frames: int,
    processed: Callable[[], int] | None = None,
    max_ahead: int = 0,
    cameras: int = CAMERAS,
) -> Iterator[list[OutgoingFrame]]:
    """`frames` frames (rounded up to whole ticks of `cameras`) re-using the rendered
    `jpegs`; the capture time is stamped when a tick is taken. With `processed` (frames
    the reader has dealt with so far), a tick waits while `max_ahead` frames or more are
    sent and not yet dealt with."""
    known = 0
    for seq in range(-(-frames // cameras)):
        while processed is not None and seq * cameras - known >= max(max_ahead, cameras):
            known = processed()
            if seq * cameras - known >= max(max_ahead, cameras):
                time.sleep(AHEAD_POLL_S)
        now_ms = time.time() * 1000.0
        yield [
            OutgoingFrame(camera_id(i), seq, jpegs[(seq * cameras + i) % len(jpegs)], now_ms)
            for i in range(cameras)
        ]


def partition_bytes(jpegs: Sequence[bytes], frames: int, cameras: int = CAMERAS) -> int:
    """The JPEG bytes of the fullest partition once `frame_ticks` has laid `frames`
    frames of `jpegs` out over `cameras` partitions."""
    ticks = -(-frames // cameras)
    return max(
        sum(len(jpegs[(seq * cameras + i) % len(jpegs)]) for seq in range(ticks))
        for i in range(cameras)
    )


def fits_in_broker(jpegs: Sequence[bytes], frames: int, cameras: int = CAMERAS) -> bool:
    """Whether `frames` frames of `jpegs`, laid out by `frame_ticks` over `cameras`
    partitions, can all wait unread at once: the fullest partition within what the
    embedded broker keeps, less `BROKER_MARGIN`."""
    return partition_bytes(jpegs, frames, cameras) <= (1.0 - BROKER_MARGIN) * MOCK_PARTITION_BYTES


def publish_frames(
    bootstrap: str,
    topic: str,
    jpegs: Sequence[bytes],
    frames: int,
    fps: float = 0.0,
    job: str = "bench",
    *,
    processed: Callable[[], int] | None = None,
    max_ahead: int = 0,
    cameras: int = CAMERAS,
) -> dict[tuple[str, int], int]:
    """Publish `frames` frames of `jpegs` from `cameras` cameras, one partition each, to
    `topic` (paced at `fps` frames/s over all cameras; 0 = unpaced; at most `max_ahead`
    ahead of `processed`, as `frame_ticks`); the end offset of each partition."""
    settings = Settings(progress=False, metrics_enabled=False)
    producer = CheckedProducer(
        producer_config(settings, bootstrap=bootstrap, client_id="bench-camera")
    )
    try:
        report = publish(
            producer,
            topic,
            frame_ticks(jpegs, frames, processed, max_ahead, cameras),
            job_id=job,
            fps=fps / cameras,
            partitions=cameras,
        )
    finally:
        producer.close()
    return dict(report.end_offsets)


class WrittenCount:
    """Messages in `topics` (their high watermarks added up): what a run's flow has
    written to its results and dead-letter topics so far."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-count"})
        self._partitions = [TopicPartition(t, p) for t in topics for p in range(CAMERAS)]

    def __call__(self) -> int:
        return sum(
            self._consumer.get_watermark_offsets(tp, timeout=10.0)[1] for tp in self._partitions
        )

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()


def offsets_json(ends: dict[tuple[str, int], int]) -> str:
    """Each partition's end offset as JSON: `[[topic, partition, offset], ...]`."""
    return json.dumps([[t, p, o] for (t, p), o in ends.items()])


def offsets_from_json(text: str) -> dict[tuple[str, int], int]:
    """The end offsets that `offsets_json` wrote."""
    return {(t, int(p)): int(o) for t, p, o in json.loads(text)}


def publish_main() -> None:
    """The publishing process of a run (`Bench.publish_elsewhere`): argv holds the pickled
    JPEGs' path, the bootstrap, the topic, the frame count, the rate, the topics to stay
    ahead of (comma-separated, or empty), how far, and the cameras; the end offsets and when it sent
    its first and last frames go to stdout as JSON."""
    path, bootstrap, topic, frames, fps, ahead_of, max_ahead, cameras = sys.argv[1:9]
    jpegs = pickle.loads(Path(path).read_bytes())
    written = WrittenCount(bootstrap, ahead_of.split(",")) if ahead_of else None
    started = time.time_ns()
    try:
        ends = publish_frames(
            bootstrap,
            topic,
            jpegs,
            int(frames),
            float(fps),
            processed=written,
            max_ahead=int(max_ahead),
            cameras=int(cameras),
        )
    finally:
        if written is not None:
            written.close()
    report = {"ends": json.loads(offsets_json(ends)), "started_ns": started}
    print(json.dumps(report | {"ended_ns": time.time_ns()}))
