"""Filling a topic with good synthetic frames and a known set of bad ones, and reading back
what the SQLite sink stored."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Any

from operators import contract
from operators.kafka_io import CheckedProducer
from tests.helpers import frame_headers, jpeg_bytes
from tools.camera import publish, synthetic_frames

BAD_FRAMES: list[tuple[bytes, tuple[tuple[str, bytes], ...]]] = [
    (b"", frame_headers(job="job-bad", seq=1)),
    (b"definitely not an image", frame_headers(job="job-bad", seq=2)),
    (jpeg_bytes()[:400], frame_headers(job="job-bad", seq=3)),
    (jpeg_bytes(), frame_headers(job="job-bad", seq=4, **{contract.SEQ: b"x"})),
    (jpeg_bytes(), frame_headers(job="job-bad", seq=5, **{contract.CONTENT_TYPE: b"text/csv"})),
]


# Besides BAD_FRAMES, fill_topic re-sends frame cam-0/0 twice: once with the same bytes (a
# duplicate, skipped) and once with other bytes (a conflict, dead-lettered).
DEAD_LETTERS = len(BAD_FRAMES) + 1


def flow_topics(
    create_topic: Callable[[str, int], None],
    unique_topic: Callable[[str], str],
    partitions: int = 4,
) -> dict[str, str]:
    """Fresh `frames`, `detections` and `dead` topics: {role: topic name}."""
    topics = {k: unique_topic(k) for k in ("frames", "detections", "dead")}
    for name in topics.values():
        create_topic(name, partitions)
    return topics


def flow_settings(bootstrap: str, topics: Mapping[str, str], sink: Path) -> dict[str, str]:
    """The settings that point a flow at `topics` (see `flow_topics`) on `bootstrap` and
    at a SQLite sink in the file `sink`."""
    return {
        "STREAMSIGHT_BROKERS": bootstrap,
        "STREAMSIGHT_INPUT_TOPIC": topics["frames"],
        "STREAMSIGHT_OUTPUT_TOPIC": topics["detections"],
        "STREAMSIGHT_DEAD_LETTER_TOPIC": topics["dead"],
        "STREAMSIGHT_SINK": f"sqlite:///{sink}",
    }


def fill_topic(
    config: dict[str, Any],
    topic: str,
    *,
    cameras: int,
    frames_per_camera: int,
    job_id: str,
    first_seq: int = 0,
) -> set[str]:
    """Publish synthetic frames `first_seq..first_seq + frames_per_camera - 1` of each
    camera, BAD_FRAMES and two repeats of cam-0/0; return the good frames' identities."""
    producer = CheckedProducer({**config, "enable.idempotence": True, "acks": "all"})
    try:
        publish(
            producer,
            topic,
            islice(synthetic_frames(cameras, first_seq + frames_per_camera), first_seq, None),
            job_id=job_id,
            fps=0,
            partitions=4,
        )
        for value, headers in BAD_FRAMES:
            producer.produce(topic, value, key=b"cam-bad", headers=list(headers))
        first = next(iter(synthetic_frames(1, 1)))[0]
        other = next(iter(synthetic_frames(2, 1)))[1]
        for jpeg in (first.jpeg, other.jpeg):
            headers = contract.frame_headers(
                job_id=job_id, camera="cam-0", seq=0, capture_time_ms=first.capture_time_ms
            )
            producer.produce(topic, jpeg, key=b"cam-0", headers=headers, partition=0)
        producer.flush_and_check()
    finally:
        producer.close()
    seqs = range(first_seq, first_seq + frames_per_camera)
    return {f"{job_id}/cam-{c}/{s}" for c in range(cameras) for s in seqs}


def stored(db: Path) -> tuple[int, int, int]:
    """(rows, distinct frame ids, dead letters) in the sink; 0s before it exists."""
    if not db.exists():
        return 0, 0, 0
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            rows, distinct = conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT frame_id) FROM detections"
            ).fetchone()
            (letters,) = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        except sqlite3.OperationalError:
            return 0, 0, 0
    return rows, distinct, letters


def frame_ids(db: Path) -> set[str]:
    """Every frame id in the sink."""
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return {frame_id for (frame_id,) in conn.execute("SELECT frame_id FROM detections")}


def assert_stored_once(db: Path, expected: set[str]) -> None:
    """The sink holds every frame of `expected` exactly once, nothing else, and the
    topic's planted dead letters."""
    rows, distinct, letters = stored(db)
    assert rows == distinct == len(expected)
    assert frame_ids(db) == expected
    assert letters == DEAD_LETTERS
