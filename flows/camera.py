"""The camera producer: publishes JPEG frames to Kafka, one message per frame.

Key = camera id, value = JPEG, headers from `operators.contract.frame_headers`. Frames come
from synthetic scenes (`operators.scene`), a video file (decoded with PyAV) or a folder of
images. Every delivery report is checked: a lost frame ends the run with an error.

    python -m flows.camera --brokers HOST:PORT --cameras 4 --fps 15 --frames 300
    python -m flows.camera --brokers HOST:PORT --source clip.mp4 --loop --fps 25

Library use (e.g. from a background thread): `synthetic_frames` or `file_frames` make the
ticks, `publish` sends them through a `CheckedProducer`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import signal
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import simplejpeg

from operators.contract import MAX_ID_LENGTH, frame_headers
from operators.kafka_io import CheckedProducer, DeliveryError, producer_config

if TYPE_CHECKING:
    from types import FrameType

    from flows.settings import Settings

logger = logging.getLogger(__name__)

CAMERA_PREFIX = "cam-"
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe"})
JPEG_MAGIC = b"\xff\xd8\xff"
MAX_LAG_S = 1.0
"""When publishing falls this far behind its schedule, the schedule restarts from now."""
PROGRESS_INTERVAL_S = 5.0

TraceHeaders = Callable[["OutgoingFrame"], dict[str, str]]


@dataclass(frozen=True, slots=True)
class OutgoingFrame:
    """One frame to publish: camera id, per-camera sequence number, JPEG bytes and the
    capture time in milliseconds since the epoch."""

    camera: str
    seq: int
    jpeg: bytes
    capture_time_ms: float


@dataclass(frozen=True, slots=True)
class PublishReport:
    """What `publish` sent: frames, wall seconds, and the end offset (last delivered + 1)
    of every (topic, partition) the producer delivered to."""

    sent: int
    seconds: float
    end_offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        """Frames per second over all cameras."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def camera_id(index: int) -> str:
    """The id of camera `index`: `cam-<index>`."""
    return f"{CAMERA_PREFIX}{index}"


def camera_index(camera: str) -> int:
    """The index of a `cam-<index>` camera id (ValueError for other ids)."""
    if not camera.startswith(CAMERA_PREFIX):
        raise ValueError(f"not a synthetic camera id: {camera!r}")
    return int(camera.removeprefix(CAMERA_PREFIX))


def spread_partition(camera: str, partitions: int) -> int:
    """Partition of `camera` when cameras are spread evenly: `cam-i` -> i mod partitions
    (other ids by CRC-32). Hashing a handful of keys often leaves partitions idle."""
    try:
        index = camera_index(camera)
    except ValueError:
        index = zlib.crc32(camera.encode())
    return index % partitions


def _now_ms() -> float:
    return time.time() * 1000.0


def _ticks_range(frames_per_camera: int | None) -> Iterable[int]:
    if frames_per_camera is None:
        return itertools.count()
    if frames_per_camera < 0:
        raise ValueError("frames_per_camera must be >= 0")
    return range(frames_per_camera)


def synthetic_frames(
    cameras: int,
    frames_per_camera: int | None,
    *,
    width: int = 320,
    height: int = 240,
    quality: int = 85,
    seed: int = 0,
) -> Iterator[list[OutgoingFrame]]:
    """Yield one list per tick, one frame per camera (`cam-0`, `cam-1`, ...).

    Camera `cam-i` frame `seq` is `operators.scene.render_frame(i, seq, ...)`, so the
    ground truth can be recomputed from (camera index, seq). `capture_time_ms` is stamped
    when the tick is taken. Unbounded when `frames_per_camera` is None.
    """
    from operators.scene import encode_jpeg, render_frame

    if cameras < 1:
        raise ValueError("cameras must be at least 1")
    for seq in _ticks_range(frames_per_camera):
        captured = _now_ms()
        yield [
            OutgoingFrame(
                camera=camera_id(index),
                seq=seq,
                jpeg=encode_jpeg(
                    render_frame(index, seq, width=width, height=height, seed=seed).rgb,
                    quality=quality,
                ),
                capture_time_ms=captured,
            )
            for index in range(cameras)
        ]


def encode_rgb(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB uint8 H x W x 3 image."""
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(rgb), quality=int(quality), colorspace="RGB", colorsubsampling="420"
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_jpeg(path: Path, *, quality: int, reencode: bool) -> bytes | None:
    """JPEG bytes of one image file: JPEGs unchanged unless `reencode`, others converted.

    Returns None (with a warning) for a file that cannot be read as an image.
    """
    data = path.read_bytes()
    if not reencode and data.startswith(JPEG_MAGIC):
        return data
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        logger.warning("skipping %s: not a readable image (%s)", path.name, type(exc).__name__)
        return None
    return encode_rgb(rgb, quality)


def _folder_pass(paths: list[Path], *, quality: int, reencode: bool) -> Iterator[bytes]:
    for path in paths:
        jpeg = _image_jpeg(path, quality=quality, reencode=reencode)
        if jpeg is not None:
            yield jpeg


def _video_pass(path: Path, *, quality: int) -> Iterator[bytes]:
    """JPEG of every frame of the first video stream of `path`."""
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise ValueError(f"cannot open {path} as a video: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                raise ValueError(f"cannot decode {path}: {exc}") from exc
            yield encode_rgb(frame.to_ndarray(format="rgb24"), quality)


def _source_pass(path: Path, *, quality: int, reencode: bool) -> Iterator[bytes]:
    """One pass over a folder of images, a single image or a video file."""
    if path.is_dir():
        paths = _image_files(path)
        if not paths:
            raise ValueError(f"no image files in {path}")
        return _folder_pass(paths, quality=quality, reencode=reencode)
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _folder_pass([path], quality=quality, reencode=reencode)
    return _video_pass(path, quality=quality)


def _source_jpegs(path: Path, *, loop: bool, quality: int, reencode: bool) -> Iterator[bytes]:
    while True:
        produced = False
        for jpeg in _source_pass(path, quality=quality, reencode=reencode):
            produced = True
            yield jpeg
        if not produced:
            raise ValueError(f"{path} yielded no frames")
        if not loop:
            return


def file_frames(
    path: Path,
    cameras: int,
    *,
    loop: bool,
    quality: int,
    reencode: bool,
    frames_per_camera: int | None,
) -> Iterator[list[OutgoingFrame]]:
    """Yield one list per tick: every camera (`cam-0`, ...) gets the same source frame.

    `path` is a video file (anything FFmpeg reads; frames re-encoded at `quality`), an
    image or a folder of images (sorted by name; JPEGs pass through unchanged unless
    `reencode`, other formats are converted). Sequence numbers keep counting across loops.
    Ends at the end of the source (unless `loop`) or after `frames_per_camera` ticks.
    """
    if cameras < 1:
        raise ValueError("cameras must be at least 1")
    jpegs = _source_jpegs(Path(path), loop=loop, quality=quality, reencode=reencode)
    for seq, jpeg in zip(_ticks_range(frames_per_camera), jpegs, strict=False):
        captured = _now_ms()
        yield [
            OutgoingFrame(camera=camera_id(i), seq=seq, jpeg=jpeg, capture_time_ms=captured)
            for i in range(cameras)
        ]


def publish(
    producer: CheckedProducer,
    topic: str,
    ticks: Iterable[list[OutgoingFrame]],
    *,
    job_id: str,
    fps: float,
    stop: threading.Event | None = None,
    on_sent: Callable[[int], None] | None = None,
    trace_headers: TraceHeaders | None = None,
    partitions: int | None = None,
    flush_timeout_s: float = 30.0,
) -> PublishReport:
    """Send every tick's frames to `topic`, paced at `fps` ticks per second (0 = unpaced).

    Ticks are scheduled by absolute time (no drift); a tick is pulled from `ticks` only when
    it is due, so capture times match send times. `stop` ends the run early; `on_sent`
    gets the total frames sent so far after each tick; `trace_headers(frame)` adds headers
    (e.g. W3C `traceparent`). With `partitions`, camera `cam-i` goes to partition
    i mod `partitions` (`spread_partition`); without, the producer hashes the key.
    Flushes (up to `flush_timeout_s`) and checks every delivery at the end: raises
    DeliveryError on any failed or undelivered frame (also as soon as one is seen mid-run).
    """
    if fps < 0:
        raise ValueError("fps must be >= 0")
    if partitions is not None and partitions < 1:
        raise ValueError("partitions must be at least 1")
    interval = 1.0 / fps if fps > 0 else 0.0
    started = time.monotonic()
    anchor, due_ticks = started, 0
    sent = 0
    iterator = iter(ticks)
    while stop is None or not stop.is_set():
        if interval:
            delay = anchor + due_ticks * interval - time.monotonic()
            if delay > 0:
                if stop is not None:
                    if stop.wait(delay):
                        break
                else:
                    time.sleep(delay)
            elif delay < -MAX_LAG_S:
                anchor, due_ticks = time.monotonic(), 0
        tick = next(iterator, None)
        if tick is None:
            break
        for frame in tick:
            extra = trace_headers(frame) if trace_headers is not None else None
            partition = None if partitions is None else spread_partition(frame.camera, partitions)
            producer.produce(
                topic,
                frame.jpeg,
                key=frame.camera.encode(),
                headers=frame_headers(
                    job_id=job_id,
                    camera=frame.camera,
                    seq=frame.seq,
                    capture_time_ms=frame.capture_time_ms,
                    trace_headers=extra,
                ),
                partition=partition,
            )
            sent += 1
        due_ticks += 1
        producer.check()
        if on_sent is not None:
            on_sent(sent)
    producer.flush_and_check(flush_timeout_s)
    return PublishReport(
        sent=sent, seconds=time.monotonic() - started, end_offsets=producer.end_offsets
    )


class _Progress:
    """Progress of a run: a rich bar on a terminal, else a line every few seconds."""

    def __init__(self, total: int | None, out: TextIO, *, enabled: bool = True) -> None:
        self._total = total
        self._out = out
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar = None
        self._task = None
        if enabled and out.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("[bold]frames"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>8.1f} frames/s"),
                TimeElapsedColumn(),
                console=Console(file=out),
            )
            self._bar.start()
            self._task = self._bar.add_task("frames", total=total, rate=0.0)
        self._enabled = enabled

    def __call__(self, sent: int) -> None:
        now = time.monotonic()
        rate = sent / max(now - self._started, 1e-9)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=sent, rate=rate)
        elif self._enabled and now - self._last_line >= PROGRESS_INTERVAL_S:
            self._last_line = now
            total = f"/{self._total}" if self._total is not None else ""
            print(f"sent {sent}{total} frames ({rate:.1f} frames/s)", file=self._out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _default_job_id() -> str:
    return f"camera-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.camera",
        description="Publish camera frames (JPEG) to Kafka with the streamsight headers. "
        "Kafka security comes from STREAMSIGHT_* settings; passwords only from the "
        "environment (STREAMSIGHT_SASL_PASSWORD, STREAMSIGHT_SSL_KEY_PASSWORD).",
    )
    parser.add_argument(
        "--brokers",
        default=settings.brokers,
        help="Kafka bootstrap servers (default: STREAMSIGHT_BROKERS)",
    )
    parser.add_argument(
        "--topic", default=settings.input_topic, help="topic to publish to (default: %(default)s)"
    )
    parser.add_argument(
        "--source",
        default="synthetic",
        help="'synthetic', a video file or a folder of images (default: %(default)s)",
    )
    parser.add_argument(
        "--fps", type=float, default=15.0, help="frames/s per camera; 0 = as fast as possible"
    )
    parser.add_argument("--cameras", type=int, default=1, help="cameras cam-0..cam-N-1")
    parser.add_argument(
        "--job-id", help="job ID header (default: a new unique id per run, camera-<time>-<hex>)"
    )
    parser.add_argument(
        "--frames",
        type=int,
        help="frames per camera (default: the source once; unbounded for synthetic)",
    )
    parser.add_argument("--loop", action="store_true", help="replay a file or folder source")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality 1-100")
    parser.add_argument(
        "--reencode", action="store_true", help="re-encode JPEG images of a folder source"
    )
    parser.add_argument("--width", type=int, default=320, help="synthetic frame width")
    parser.add_argument("--height", type=int, default=240, help="synthetic frame height")
    parser.add_argument("--seed", type=int, default=0, help="synthetic scene seed")
    parser.add_argument("--client-id", default="streamsight-camera", help="Kafka client.id")
    parser.add_argument(
        "--delivery-timeout",
        type=float,
        default=30.0,
        help="seconds a frame may wait for delivery before it counts as failed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--partitioning",
        choices=["spread", "hash"],
        default="spread",
        help="spread: camera cam-i to partition i mod N (N read from the topic's metadata); "
        "hash: the producer's key hash (default: %(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress, summary only")
    security = parser.add_argument_group("Kafka security (override STREAMSIGHT_* settings)")
    security.add_argument(
        "--security-protocol", choices=["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
    )
    security.add_argument("--sasl-mechanism")
    security.add_argument("--sasl-username")
    security.add_argument("--ssl-ca-location")
    security.add_argument("--ssl-certificate-location")
    security.add_argument("--ssl-key-location")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.brokers:
        parser.error("--brokers is required (or set STREAMSIGHT_BROKERS)")
    if args.fps < 0:
        parser.error("--fps must be >= 0")
    if args.cameras < 1:
        parser.error("--cameras must be at least 1")
    if args.frames is not None and args.frames < 0:
        parser.error("--frames must be >= 0")
    if args.delivery_timeout <= 0:
        parser.error("--delivery-timeout must be > 0")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be between 1 and 100")
    if args.width < 16 or args.height < 16:
        parser.error("--width and --height must be at least 16")
    if not args.job_id or len(args.job_id) > MAX_ID_LENGTH:
        parser.error(f"--job-id must be 1 to {MAX_ID_LENGTH} characters")
    if args.source != "synthetic" and not Path(args.source).exists():
        parser.error(f"--source {args.source}: no such file or folder")


def _settings_with(args: argparse.Namespace) -> Settings:
    from flows.settings import Settings

    overrides = {
        "brokers": args.brokers,
        "security_protocol": args.security_protocol,
        "sasl_mechanism": args.sasl_mechanism,
        "sasl_username": args.sasl_username,
        "ssl_ca_location": args.ssl_ca_location,
        "ssl_certificate_location": args.ssl_certificate_location,
        "ssl_key_location": args.ssl_key_location,
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    """Run the camera CLI; exits 0 when every frame was delivered, 1 on any failure."""
    from pydantic import ValidationError

    from flows.settings import Settings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        base = Settings()
    except ValidationError as exc:
        print(f"error: invalid STREAMSIGHT_* settings: {exc}", file=sys.stderr)
        sys.exit(2)
    parser = _parser(base)
    args = parser.parse_args(argv)
    if args.job_id is None:
        args.job_id = _default_job_id()
    _validate(parser, args)
    try:
        settings = _settings_with(args)
    except ValidationError as exc:
        print(f"error: invalid Kafka settings: {exc}", file=sys.stderr)
        sys.exit(2)

    if args.source == "synthetic":
        ticks = synthetic_frames(
            args.cameras,
            args.frames,
            width=args.width,
            height=args.height,
            quality=args.quality,
            seed=args.seed,
        )
    else:
        ticks = file_frames(
            Path(args.source),
            args.cameras,
            loop=args.loop,
            quality=args.quality,
            reencode=args.reencode,
            frames_per_camera=args.frames,
        )
    sys.exit(_run(args, settings, ticks))


class _Unreachable(Exception):
    """Kafka metadata could not be read."""

    def __init__(self, brokers: str, cause: Exception) -> None:
        super().__init__(f"cannot read Kafka metadata from {brokers}: {cause}")


def _run(args: argparse.Namespace, settings: Settings, ticks: Iterable[list[OutgoingFrame]]) -> int:
    """Publish `ticks` as the CLI does; returns the exit status."""
    from confluent_kafka import KafkaException

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    total = args.frames * args.cameras if args.frames is not None else None
    progress = _Progress(total, sys.stdout, enabled=not args.quiet)
    sent = 0

    def _on_sent(count: int) -> None:
        nonlocal sent
        sent = count
        progress(count)

    from operators.tracing import send_tracer, setup_tracing

    tracing = setup_tracing("streamsight-camera")
    config = producer_config(settings, client_id=args.client_id)
    config["message.timeout.ms"] = max(1, int(args.delivery_timeout * 1000))
    producer = CheckedProducer(config)
    started = time.monotonic()
    status = 0
    try:
        partitions = None
        if args.partitioning == "spread":
            try:
                partitions = producer.partition_count(
                    args.topic, timeout_s=min(10.0, args.delivery_timeout)
                )
            except KafkaException as exc:
                raise _Unreachable(settings.brokers or "", exc) from exc
            if partitions is None:
                logger.warning("topic %r not found: partitioning by key hash", args.topic)
        report = publish(
            producer,
            args.topic,
            ticks,
            job_id=args.job_id,
            fps=args.fps,
            stop=stop,
            on_sent=_on_sent,
            partitions=partitions,
            flush_timeout_s=args.delivery_timeout + 5.0,
            trace_headers=send_tracer(
                tracing,
                args.topic,
                args.job_id,
                None if partitions is None else partial(spread_partition, partitions=partitions),
            ),
        )
        sent = report.sent
    except _Unreachable as exc:
        status = 1
        print(f"error: {exc}", file=sys.stderr)
    except DeliveryError as exc:
        status = 1
        print(f"error: frames were not delivered to {args.topic!r}: {exc}", file=sys.stderr)
    except KafkaException as exc:
        status = 1
        print(f"error: Kafka refused a frame: {exc}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        status = 1
        print(f"error: source {args.source}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        status = 130
    finally:
        progress.close()
        producer.close()
        tracing.flush()
    seconds = time.monotonic() - started
    failed = producer.failed + max(0, sent - producer.delivered - producer.failed)
    fps = producer.delivered / seconds if seconds > 0 else 0.0
    print(
        f"summary: sent={sent} delivered={producer.delivered} failed={failed} "
        f"seconds={seconds:.2f} fps={fps:.1f} topic={args.topic} job_id={args.job_id}",
        flush=True,
    )
    if status == 0 and failed:
        status = 1
    return status


if __name__ == "__main__":
    main()
