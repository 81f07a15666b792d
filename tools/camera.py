"""The camera producer: publishes JPEG frames to Kafka, one message per frame.

Key = camera id, value = JPEG, headers from `operators.contract.frame_headers`. Frames come
from synthetic scenes (`tools.scene`), a video file (decoded with PyAV), a folder of
images, or a live source that FFmpeg opens through PyAV (RTSP, HTTP, TCP or UDP stream, V4L2
device). Every delivery report is checked: a lost frame ends the run with an error.

A live source is read on a thread of its own into a bounded queue (`LiveCapture`): it is
paced by the source, reopened with capped backoff when it drops or stalls, and when Kafka
cannot keep up the oldest queued frames are dropped (and counted) rather than memory grown.
Its capture time is each frame's wall-clock arrival at the producer.

    python -m tools.camera --brokers HOST:PORT --cameras 4 --fps 15 --frames 300
    python -m tools.camera --brokers HOST:PORT --source clip.mp4 --loop --fps 25
    python -m tools.camera --brokers HOST:PORT --source rtsp://cam.local/stream --fps 10

Library use (e.g. from a background thread): `synthetic_frames`, `file_frames` or
`LiveCapture.ticks` make the ticks, `publish` sends them through a `CheckedProducer`.
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
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import simplejpeg

from operators.contract import MAX_ID_LENGTH, frame_headers
from operators.kafka_io import CheckedProducer, DeliveryError, producer_config

if TYPE_CHECKING:
    from types import FrameType

    import av

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

    Camera `cam-i` frame `seq` is `tools.scene.render_frame(i, seq, ...)`, so the
    ground truth can be recomputed from (camera index, seq). `capture_time_ms` is stamped
    when the tick is taken. Unbounded when `frames_per_camera` is None.
    """
    from tools.scene import encode_jpeg, render_frame

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


LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https", "tcp", "udp"})
"""URL schemes read as live streams (FFmpeg's protocols of the same names)."""
V4L2_PREFIX = "/dev/video"
DEFAULT_QUEUE_FRAMES = 30
"""Frames a live source may queue ahead of Kafka (about 1 s at 25-30 frames/s)."""
QUEUE_POLL_S = 0.1
"""How often a sender waiting for a live frame looks at its stop event."""


def is_live_source(source: str) -> bool:
    """True for a stream URL (rtsp, rtsps, http, https, tcp, udp) or a V4L2 device path."""
    scheme, sep, _ = source.partition("://")
    if sep and scheme.lower() in LIVE_SCHEMES:
        return True
    return source.startswith(V4L2_PREFIX) or Path(source).is_char_device()


def redact_url(source: str) -> str:
    """`source` fit for logs: user and password, query and fragment replaced by `***`."""
    parts = urlsplit(source)
    if not parts.scheme or not parts.netloc:
        return source
    _, at, host = parts.netloc.rpartition("@")
    netloc = f"***@{host}" if at else host
    hidden = ("***" if parts.query else "", "***" if parts.fragment else "")
    return urlunsplit((parts.scheme, netloc, parts.path, *hidden))


def parse_ffmpeg_options(pairs: Iterable[str]) -> dict[str, str]:
    """`["key=value", ...]` as a dict (later keys win); ValueError for a malformed pair."""
    options: dict[str, str] = {}
    for number, pair in enumerate(pairs, start=1):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            # The text may hold a secret (e.g. an Authorization header): name its position.
            raise ValueError(f"FFmpeg option number {number} is not KEY=VALUE")
        options[key] = value
    return options


@dataclass(frozen=True, slots=True)
class LiveSource:
    """A live stream for FFmpeg (through PyAV): URL or V4L2 device, demuxer, options,
    timeouts in seconds and the reconnect backoff (doubling from `backoff_initial_s` up to
    `backoff_max_s`)."""

    url: str
    options: dict[str, str] = field(default_factory=dict)
    demuxer: str | None = None
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0

    @classmethod
    def of(cls, url: str, options: dict[str, str] | None = None, **kwargs: Any) -> LiveSource:
        """A source with this project's defaults, each overridden by an option given:
        `fpsprobesize=0` (FFmpeg otherwise reads about 20 frames to guess the frame rate
        before the first one comes out, then hands them over in a burst: 2.3 s at 10
        frames/s), RTSP over TCP (interleaved; fewer lost packets than UDP and one port
        through firewalls), and the `v4l2` demuxer for a device path."""
        opts = dict(options or {})
        opts.setdefault("fpsprobesize", "0")
        scheme = url.partition("://")[0].lower()
        if scheme in {"rtsp", "rtsps"}:
            opts.setdefault("rtsp_transport", "tcp")
        if kwargs.get("demuxer") is None and "://" not in url:
            kwargs["demuxer"] = "v4l2"
        return cls(url=url, options=opts, **kwargs)

    @property
    def name(self) -> str:
        """The source as it may be logged (credentials redacted)."""
        return redact_url(self.url)


@dataclass(slots=True)
class LiveStats:
    """Counters of a live capture: frames decoded, frames skipped by `--fps`, frames
    dropped from the full queue (oldest first), outages and their total seconds."""

    decoded: int = 0
    decimated: int = 0
    dropped: int = 0
    outages: int = 0
    outage_seconds: float = 0.0


class Decimator:
    """Keeps at most `fps` frames per second of a source paced by itself (all when 0).

    Keeps a frame at or after half an interval before its due time, then moves the due
    time one interval on, so that arrival jitter does not skip frames of a source already
    at or below `fps`; over any span T at most T * fps + 1.5 frames are kept. After a
    gap of an interval or more, the schedule restarts from the frame kept.
    """

    def __init__(self, fps: float) -> None:
        if fps < 0:
            raise ValueError("fps must be >= 0")
        self._interval = 1.0 / fps if fps > 0 else 0.0
        self._due: float | None = None

    def keep(self, now: float) -> bool:
        """Whether the frame that arrived at `now` (seconds, monotonic) is kept."""
        interval = self._interval
        if not interval:
            return True
        if self._due is None or now - self._due >= interval:
            self._due = now + interval
            return True
        if now < self._due - interval / 2:
            return False
        self._due += interval
        return True


class FrameQueue:
    """Bounded FIFO of ticks from a capture thread to the sender.

    When it is full, `put` drops the oldest tick (counted in `dropped`, in frames): for
    live video a late frame is worth less than the newest one. Thread-safe.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._ticks: deque[list[OutgoingFrame]] = deque()
        self._capacity = capacity
        self._ready = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, tick: list[OutgoingFrame]) -> int:
        """Queue `tick`; returns the frames dropped to make room (0 or the oldest tick's)."""
        with self._ready:
            dropped = 0
            if len(self._ticks) >= self._capacity:
                dropped = len(self._ticks.popleft())
                self.dropped += dropped
            self._ticks.append(tick)
            self._ready.notify()
            return dropped

    def get(self, timeout_s: float) -> list[OutgoingFrame] | None:
        """The oldest tick, waiting up to `timeout_s`; None when there is none yet."""
        with self._ready:
            if not self._ticks and not self._closed:
                self._ready.wait(timeout_s)
            return self._ticks.popleft() if self._ticks else None

    def close(self) -> None:
        """No more ticks will come: `get` stops waiting."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    @property
    def done(self) -> bool:
        """Closed and empty."""
        with self._ready:
            return self._closed and not self._ticks

    def __len__(self) -> int:
        with self._ready:
            return len(self._ticks)


def _is_permanent(exc: Exception) -> bool:
    """Errors no reconnect can fix: unknown protocol, demuxer, decoder or option."""
    import av

    permanent = (
        av.error.ProtocolNotFoundError,
        av.error.DemuxerNotFoundError,
        av.error.DecoderNotFoundError,
        av.error.OptionNotFoundError,
    )
    return isinstance(exc, permanent) or (
        isinstance(exc, ValueError) and not isinstance(exc, av.FFmpegError)
    )


def _reason(exc: BaseException | None) -> str:
    """Why a stream stopped, without the URL FFmpeg puts into its messages."""
    import av

    if exc is None:
        return "end of stream"
    if isinstance(exc, av.error.ExitError):
        # What FFmpeg reports when PyAV's open or read timeout interrupts it.
        return "timed out or interrupted"
    strerror = getattr(exc, "strerror", None)
    return f"{type(exc).__name__}: {strerror}" if strerror else type(exc).__name__


class _Outages:
    """Logs each outage of a live source once when it starts and once when it ends,
    and counts it; waiting for a source that never delivered is not an outage. An outage
    lasts from the last frame before it (a stall includes its read timeout) to the next."""

    def __init__(self, source: LiveSource, stats: LiveStats) -> None:
        self._source = source
        self._stats = stats
        self._since: float | None = None
        self._last_frame: float | None = None

    def failed(self, reason: str) -> None:
        """A read or (re)open failed, or the stream ended: begins an outage if none is on."""
        if self._since is not None:
            return
        self._since = time.monotonic() if self._last_frame is None else self._last_frame
        if self._last_frame is not None:
            self._stats.outages += 1
            logger.warning(
                "live source %s lost (%s); reconnecting with backoff up to %.3g s",
                self._source.name,
                reason,
                self._source.backoff_max_s,
            )
        else:
            logger.warning(
                "live source %s not available yet (%s); retrying with backoff up to %.3g s",
                self._source.name,
                reason,
                self._source.backoff_max_s,
            )

    def frame(self) -> None:
        """A frame arrived: ends the outage, if one is on, with its duration."""
        now = time.monotonic()
        if self._since is not None:
            seconds = now - self._since
            if self._last_frame is not None:
                self._stats.outage_seconds += seconds
                logger.warning(
                    "live source %s back after %.1f s (outage %d)",
                    self._source.name,
                    seconds,
                    self._stats.outages,
                )
            else:
                logger.warning("live source %s available after %.1f s", self._source.name, seconds)
            self._since = None
        self._last_frame = now


def live_video_frames(
    source: LiveSource, *, stop: threading.Event, stats: LiveStats
) -> Iterator[tuple[av.VideoFrame, float]]:
    """Yield (decoded frame, wall-clock arrival in ms since the epoch) from `source` until
    `stop` is set, reopening it whenever it fails, ends or stalls past `read_timeout_s`.

    Reopens wait `backoff_initial_s`, doubling up to `backoff_max_s` (reset by the next
    frame). Raises ValueError for what no reopen can fix (unknown protocol, demuxer,
    decoder or option; no video stream). Each outage is logged once and counted in
    `stats`.
    """
    import av

    outages = _Outages(source, stats)
    backoff = source.backoff_initial_s
    while not stop.is_set():
        failure: Exception | None = None
        try:
            container = av.open(
                source.url,
                format=source.demuxer,
                options=dict(source.options),
                timeout=(source.open_timeout_s, source.read_timeout_s),
            )
        except (av.FFmpegError, OSError, ValueError) as exc:
            if _is_permanent(exc):
                raise ValueError(f"cannot open {source.name}: {_reason(exc)}") from None
            failure = exc
        else:
            with container:
                if not container.streams.video:
                    raise ValueError(f"{source.name} has no video stream")
                stream = container.streams.video[0]
                # Slice threads only: frame threads would hold frames back for latency.
                stream.thread_type = "SLICE"
                try:
                    for frame in container.decode(stream):
                        arrived = _now_ms()
                        outages.frame()
                        backoff = source.backoff_initial_s
                        stats.decoded += 1
                        yield frame, arrived
                        if stop.is_set():
                            return
                except (av.FFmpegError, OSError) as exc:
                    failure = exc
        if stop.is_set():
            return
        outages.failed(_reason(failure))
        if stop.wait(backoff):
            return
        backoff = min(backoff * 2, source.backoff_max_s)


class LiveCapture:
    """Captures a live source on a background thread into a bounded `FrameQueue`.

    Frames are paced by the source; `fps` > 0 keeps at most that many per second
    (`Decimator`). Each kept frame is JPEG-encoded at the stream's own size and stamped
    with its wall-clock arrival time; all `cameras` get the same frame, with one sequence
    number per capture. `stats` counts frames decoded, decimated, dropped and outages.
    """

    def __init__(
        self,
        source: LiveSource,
        *,
        cameras: int = 1,
        fps: float = 0.0,
        quality: int = 85,
        queue_frames: int = DEFAULT_QUEUE_FRAMES,
        frames_per_camera: int | None = None,
    ) -> None:
        if cameras < 1:
            raise ValueError("cameras must be at least 1")
        self.source = source
        self.stats = LiveStats()
        self._cameras = cameras
        self._decimator = Decimator(fps)
        self._quality = quality
        self._queue = FrameQueue(queue_frames)
        self._frames_per_camera = frames_per_camera
        self._error: BaseException | None = None
        self._warned_drop = False

    def _capture(self, halt: threading.Event) -> None:
        seq = 0
        try:
            for frame, arrived in live_video_frames(self.source, stop=halt, stats=self.stats):
                if not self._decimator.keep(time.monotonic()):
                    self.stats.decimated += 1
                    continue
                jpeg = encode_rgb(frame.to_ndarray(format="rgb24"), self._quality)
                tick = [
                    OutgoingFrame(camera=camera_id(i), seq=seq, jpeg=jpeg, capture_time_ms=arrived)
                    for i in range(self._cameras)
                ]
                seq += 1
                if self._queue.put(tick) and not self._warned_drop:
                    self._warned_drop = True
                    logger.warning(
                        "Kafka is not keeping up with %s: dropping the oldest queued frames "
                        "(total at exit)",
                        self.source.name,
                    )
                self.stats.dropped = self._queue.dropped
        except BaseException as exc:  # handed to the sender's thread, which raises it
            self._error = exc
        finally:
            self._queue.close()

    def ticks(
        self, stop: threading.Event | None = None
    ) -> Generator[list[OutgoingFrame], None, None]:
        """Start capturing; yield queued ticks oldest first until `stop` is set, the
        `frames_per_camera` limit or a capture error (raised here). Closing the iterator
        stops the capture thread."""
        halt = threading.Event()
        thread = threading.Thread(
            target=self._capture, args=(halt,), name="camera-capture", daemon=True
        )
        thread.start()
        try:
            for _ in _ticks_range(self._frames_per_camera):
                tick = None
                while tick is None:
                    if stop is not None and stop.is_set():
                        return
                    tick = self._queue.get(QUEUE_POLL_S)
                    if tick is None and self._queue.done:
                        if self._error is not None:
                            raise self._error
                        return
                yield tick
        finally:
            halt.set()
            # A read blocked in FFmpeg returns within the read timeout; the thread is a
            # daemon, so a stuck device cannot keep the process alive.
            thread.join(self.source.read_timeout_s + 1.0)
            self.stats.dropped = self._queue.dropped

    def summary(self) -> str:
        """`key=value` fields of `stats` for the summary line."""
        s = self.stats
        return (
            f"decoded={s.decoded} decimated={s.decimated} dropped={s.dropped} "
            f"outages={s.outages} outage_seconds={s.outage_seconds:.1f}"
        )


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
        prog="python -m tools.camera",
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
        help="'synthetic', a video file, a folder of images, or a live source: a stream URL "
        "(rtsp://, rtsps://, http(s)://, tcp://, udp://) or a V4L2 device such as /dev/video0 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--fps",
        type=float,
        help="frames/s per camera: the pace of a synthetic or file source (default 15; "
        "0 = as fast as possible); a live source is paced by itself and keeps at most this "
        "many (default: every frame)",
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
    parser.add_argument(
        "--frame-size", help="synthetic frame size WxH, e.g. 1280x720 (sets --width, --height)"
    )
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
    live = parser.add_argument_group("live sources")
    live.add_argument(
        "-o",
        "--ffmpeg-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="FFmpeg option for opening the stream, repeatable (e.g. rtsp_transport=udp, "
        "rw_timeout=5000000, video_size=1280x720 for a webcam); RTSP defaults to TCP",
    )
    live.add_argument(
        "--demuxer",
        help="FFmpeg demuxer to use instead of probing (default: v4l2 for a device path)",
    )
    live.add_argument(
        "--open-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for a stream to open (default: %(default)s)",
    )
    live.add_argument(
        "--read-timeout",
        type=float,
        default=5.0,
        help="seconds without data after which a stream counts as stalled and is reopened "
        "(default: %(default)s)",
    )
    live.add_argument(
        "--reconnect-max",
        type=float,
        default=10.0,
        help="longest wait between reopen attempts; waits double from 0.5 s (default: %(default)s)",
    )
    live.add_argument(
        "--queue-frames",
        type=int,
        default=DEFAULT_QUEUE_FRAMES,
        help="frames per camera that may wait for Kafka, in this queue and again in the "
        "Kafka client's; when full the oldest is dropped (default: %(default)s)",
    )
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
    if args.fps is not None and args.fps < 0:
        parser.error("--fps must be >= 0")
    if args.cameras < 1:
        parser.error("--cameras must be at least 1")
    if args.frames is not None and args.frames < 0:
        parser.error("--frames must be >= 0")
    if args.delivery_timeout <= 0:
        parser.error("--delivery-timeout must be > 0")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be between 1 and 100")
    if args.frame_size is not None:
        from flows.settings import parse_size

        try:
            args.width, args.height = parse_size(args.frame_size)
        except ValueError:
            parser.error("--frame-size must be WxH, e.g. 1280x720")
    if args.width < 16 or args.height < 16:
        parser.error("--width and --height (--frame-size) must be at least 16")
    if not args.job_id or len(args.job_id) > MAX_ID_LENGTH:
        parser.error(f"--job-id must be 1 to {MAX_ID_LENGTH} characters")
    if is_live_source(args.source):
        _validate_live(parser, args)
        return
    if args.ffmpeg_option or args.demuxer:
        parser.error("--ffmpeg-option and --demuxer apply to live sources only")
    if args.source != "synthetic" and not Path(args.source).exists():
        parser.error(f"--source {args.source}: no such file or folder")


def _validate_live(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.loop:
        parser.error("--loop does not apply to a live source")
    for name in ("open_timeout", "read_timeout", "reconnect_max"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.queue_frames < 1:
        parser.error("--queue-frames must be at least 1")
    try:
        parse_ffmpeg_options(args.ffmpeg_option)
    except ValueError as exc:
        parser.error(str(exc))


def _settings_with(args: argparse.Namespace) -> Settings:
    """The settings with the Kafka flags on top; exits with one line per bad one."""
    from flows.settings import settings_or_exit

    overrides = {
        "brokers": args.brokers,
        "security_protocol": args.security_protocol,
        "sasl_mechanism": args.sasl_mechanism,
        "sasl_username": args.sasl_username,
        "ssl_ca_location": args.ssl_ca_location,
        "ssl_certificate_location": args.ssl_certificate_location,
        "ssl_key_location": args.ssl_key_location,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    # A bad value is named as the flag it came from, not as the variable it overrides.
    return settings_or_exit(given, names={k: "--" + k.replace("_", "-") for k in given})


def main(argv: list[str] | None = None) -> None:
    """Run the camera CLI; exits 0 when every frame was delivered, 1 on any failure."""
    from flows.settings import settings_or_exit

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    base = settings_or_exit()  # one line per bad STREAMSIGHT_* setting, no values, exit 2
    parser = _parser(base)
    args = parser.parse_args(argv)
    if args.job_id is None:
        args.job_id = _default_job_id()
    _validate(parser, args)
    settings = _settings_with(args)

    sys.exit(_run(args, settings, _frames_of(args)))


def _frames_of(args: argparse.Namespace) -> Iterable[list[OutgoingFrame]] | LiveCapture:
    """The ticks of the CLI's source, or the capture of a live one (started by `_run`)."""
    if is_live_source(args.source):
        source = LiveSource.of(
            args.source,
            parse_ffmpeg_options(args.ffmpeg_option),
            demuxer=args.demuxer,
            open_timeout_s=args.open_timeout,
            read_timeout_s=args.read_timeout,
            backoff_initial_s=min(0.5, args.reconnect_max),
            backoff_max_s=args.reconnect_max,
        )
        return LiveCapture(
            source,
            cameras=args.cameras,
            fps=args.fps or 0.0,
            quality=args.quality,
            queue_frames=args.queue_frames,
            frames_per_camera=args.frames,
        )
    if args.fps is None:
        args.fps = 15.0
    if args.source == "synthetic":
        return synthetic_frames(
            args.cameras,
            args.frames,
            width=args.width,
            height=args.height,
            quality=args.quality,
            seed=args.seed,
        )
    return file_frames(
        Path(args.source),
        args.cameras,
        loop=args.loop,
        quality=args.quality,
        reencode=args.reencode,
        frames_per_camera=args.frames,
    )


class _Unreachable(Exception):
    """Kafka metadata could not be read."""

    def __init__(self, brokers: str, cause: Exception) -> None:
        super().__init__(f"cannot read Kafka metadata from {brokers}: {cause}")


def _run(
    args: argparse.Namespace,
    settings: Settings,
    frames: Iterable[list[OutgoingFrame]] | LiveCapture,
) -> int:
    """Publish `frames` (ticks, or a live capture) as the CLI does; returns the exit status."""
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

    from operators.telemetry.tracing import send_tracer, setup_tracing

    tracing = setup_tracing("streamsight-camera")
    config = producer_config(settings, client_id=args.client_id)
    config["message.timeout.ms"] = max(1, int(args.delivery_timeout * 1000))
    live = frames if isinstance(frames, LiveCapture) else None
    live_ticks = None
    ticks: Iterable[list[OutgoingFrame]]
    if live is not None:
        # Bound the Kafka client's queue too: when it is full, produce() waits and the
        # capture's own queue drops its oldest frames instead of memory growing.
        config["queue.buffering.max.messages"] = args.queue_frames * args.cameras
        ticks = live_ticks = live.ticks(stop)
    else:
        ticks = frames
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
            fps=0.0 if live is not None else args.fps,
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
        print(f"error: source {redact_url(args.source)}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        status = 130
    finally:
        if live_ticks is not None:
            live_ticks.close()  # stops the capture thread
        progress.close()
        producer.close()
        tracing.flush()
    seconds = time.monotonic() - started
    failed = producer.failed + max(0, sent - producer.delivered - producer.failed)
    fps = producer.delivered / seconds if seconds > 0 else 0.0
    print(
        f"summary: sent={sent} delivered={producer.delivered} failed={failed} "
        f"seconds={seconds:.2f} fps={fps:.1f} topic={args.topic} job_id={args.job_id}"
        + (f" {live.summary()}" if live is not None else ""),
        flush=True,
    )
    if status == 0 and failed:
        status = 1
    return status


if __name__ == "__main__":
    main()
