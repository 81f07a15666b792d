"""The camera producer's live-source parts: source names, FFmpeg options, decimation, the
bounded queue, and a capture from a real FFmpeg source (lavfi) sent through a fake slow
producer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import simplejpeg

from tools.camera import (
    Decimator,
    FrameQueue,
    LiveCapture,
    LiveSource,
    LiveStats,
    OutgoingFrame,
    is_live_source,
    live_video_frames,
    main,
    parse_ffmpeg_options,
    publish,
    redact_url,
)


def _tick(seq: int, cameras: int = 1) -> list[OutgoingFrame]:
    return [OutgoingFrame(f"cam-{i}", seq, b"\xff\xd8\xff", 0.0) for i in range(cameras)]


@pytest.mark.parametrize(
    "source",
    [
        "rtsp://cam.local:554/stream1",
        "RTSPS://cam.local/stream",
        "http://127.0.0.1:8080/live.ts",
        "https://example.org/cam.mjpg",
        "tcp://127.0.0.1:9000",
        "udp://239.0.0.1:1234",
        "/dev/video0",
    ],
)
def test_live_sources_are_recognised(source: str) -> None:
    assert is_live_source(source)


@pytest.mark.parametrize("source", ["synthetic", "clip.mp4", "./stills/", "file://clip.mp4"])
def test_files_are_not_live(source: str) -> None:
    assert not is_live_source(source)


def test_redact_url_hides_credentials_and_query() -> None:
    assert redact_url("rtsp://admin:s3cret@10.0.0.5:554/h264?token=abc#x") == (
        "rtsp://***@10.0.0.5:554/h264?***#***"
    )
    assert redact_url("http://127.0.0.1:8080/live.ts") == "http://127.0.0.1:8080/live.ts"
    assert redact_url("/dev/video0") == "/dev/video0"


def test_ffmpeg_options_parse_and_errors_name_the_key_only() -> None:
    assert parse_ffmpeg_options(["rtsp_transport=udp", "a=1=2", "a=3", "empty="]) == {
        "rtsp_transport": "udp",
        "a": "3",
        "empty": "",
    }
    with pytest.raises(ValueError, match="number 2 is not KEY=VALUE") as caught:
        parse_ffmpeg_options(["a=1", "headers:Authorization Bearer sekrit"])
    assert "sekrit" not in str(caught.value)
    with pytest.raises(ValueError, match="number 1"):
        parse_ffmpeg_options(["=sekrit"])


def test_live_source_defaults() -> None:
    rtsp = LiveSource.of("rtsp://cam/stream")
    assert rtsp.options == {"rtsp_transport": "tcp", "fpsprobesize": "0"}
    assert rtsp.demuxer is None
    udp = LiveSource.of("rtsps://cam/stream", {"rtsp_transport": "udp", "fpsprobesize": "5"})
    assert udp.options == {"rtsp_transport": "udp", "fpsprobesize": "5"}
    assert LiveSource.of("http://cam/live.ts").options == {"fpsprobesize": "0"}
    webcam = LiveSource.of("/dev/video2", {"video_size": "1280x720"})
    assert webcam.demuxer == "v4l2"
    assert LiveSource.of("/dev/video2", demuxer="video4linux2").demuxer == ("video4linux2")
    assert LiveSource.of("rtsp://u:pw@cam/s").name == "rtsp://***@cam/s"


def _kept(decimator: Decimator, times: list[float]) -> list[float]:
    return [t for t in times if decimator.keep(t)]


def test_decimator_keeps_at_most_fps() -> None:
    source = [i / 25 for i in range(250)]  # 10 s at 25 frames/s
    kept = _kept(Decimator(10), source)
    assert 99 <= len(kept) <= 101
    for start in range(10):
        assert sum(start <= t < start + 1 for t in kept) <= 11


def test_decimator_keeps_a_jittery_source_at_its_own_rate() -> None:
    jitter = [0.0, 0.012, -0.015, 0.018, -0.006]
    source = [i / 25 + jitter[i % 5] + 0.02 for i in range(100)]
    assert len(_kept(Decimator(25), source)) == 100
    assert len(_kept(Decimator(0), source)) == 100


def test_decimator_bound_holds_for_every_run() -> None:
    """Over any run, n kept frames span at least (n - 1.5) intervals."""
    times = sorted({round(0.003 * i + 0.05 * ((i * 7919) % 13) / 13, 6) for i in range(2000)})
    for fps in (2, 7, 30):
        kept = _kept(Decimator(fps), times)
        assert kept[-1] - kept[0] >= (len(kept) - 1.5) / fps - 1e-9


def test_decimator_restarts_after_a_gap() -> None:
    decimator = Decimator(4)
    # Due every 0.25 s; a frame up to half an interval early is kept.
    assert _kept(decimator, [0.0, 0.0625, 0.125, 0.25, 0.375, 0.5]) == [0.0, 0.125, 0.375]
    # After a long gap the schedule starts again from the frame kept.
    assert _kept(decimator, [10.0, 10.0625, 10.125, 10.25]) == [10.0, 10.125]


def test_frame_queue_drops_the_oldest_and_counts_frames() -> None:
    queue = FrameQueue(3)
    assert [queue.put(_tick(seq, cameras=2)) for seq in range(5)] == [0, 0, 0, 2, 2]
    assert queue.dropped == 4
    assert len(queue) == 3
    got = [queue.get(0.0) for _ in range(3)]
    assert [tick[0].seq for tick in got if tick] == [2, 3, 4]
    assert queue.get(0.01) is None
    assert not queue.done
    queue.close()
    assert queue.done
    assert queue.get(5.0) is None  # closed: returns at once


def test_frame_queue_get_wakes_on_put() -> None:
    queue = FrameQueue(1)
    threading.Timer(0.05, queue.put, args=(_tick(7),)).start()
    tick = queue.get(10.0)
    assert tick is not None and tick[0].seq == 7


class SlowFakeProducer:
    """A fake of `CheckedProducer` standing in for a Kafka that cannot keep up: its first
    `produce` blocks until `release` is set. Records what was sent."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.sent: list[tuple[str, int]] = []
        self.end_offsets: dict[tuple[str, int], int] = {}

    def produce(self, topic: str, value: bytes | None, **kwargs: object) -> None:
        if not self.sent:
            self.blocked.set()
            assert self.release.wait(30)
        assert value is not None
        self.sent.append((topic, simplejpeg.decode_jpeg_header(value)[0]))

    def check(self) -> None:
        pass

    def flush_and_check(self, timeout_s: float = 30.0) -> None:
        pass


def _lavfi_source(size: str = "96x64", rate: int = 50) -> LiveSource:
    """A real FFmpeg source paced in real time, opened without a server."""
    return LiveSource(
        url=f"testsrc=size={size}:rate={rate},realtime", demuxer="lavfi", read_timeout_s=2
    )


def test_capture_drops_the_oldest_frames_when_the_producer_is_slow() -> None:
    capture = LiveCapture(_lavfi_source(), queue_frames=3, frames_per_camera=5)
    producer = SlowFakeProducer()
    sent_seqs: list[int] = []

    def _send() -> None:
        def _recording() -> Iterator[list[OutgoingFrame]]:
            for tick in capture.ticks():
                sent_seqs.append(tick[0].seq)
                yield tick

        publish(producer, "frames", _recording(), job_id="j", fps=0)  # type: ignore[arg-type]

    sender = threading.Thread(target=_send)
    sender.start()
    assert producer.blocked.wait(30)
    deadline = time.monotonic() + 30
    while capture.stats.dropped < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    producer.release.set()
    sender.join(30)
    assert not sender.is_alive()

    assert capture.stats.dropped >= 5
    assert len(sent_seqs) == 5
    assert sent_seqs[0] == 0
    # The frames queued during the stall were the newest three; the older ones were dropped.
    assert sent_seqs[1] >= 6
    assert sent_seqs == sorted(set(sent_seqs))
    assert producer.sent == [("frames", 64)] * 5  # sent at the source's own size
    assert capture.stats.decoded >= 8


def test_capture_ends_with_the_source_error() -> None:
    capture = LiveCapture(LiveSource(url="nosuchprotocol://x"))
    with pytest.raises(ValueError, match="cannot open nosuchprotocol://x"):
        next(capture.ticks())


def test_capture_stops_on_the_stop_event() -> None:
    capture = LiveCapture(_lavfi_source(rate=10), fps=5)
    stop = threading.Event()
    ticks = capture.ticks(stop)
    first = next(ticks)
    assert first[0].seq == 0
    stop.set()
    assert list(ticks) == []


def test_a_source_that_ends_is_reopened_and_each_outage_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real FFmpeg source that ends after 4 frames, reopened after 20 ms.
    source = LiveSource(
        url="testsrc=size=64x48:rate=20:duration=0.2",
        demuxer="lavfi",
        backoff_initial_s=0.02,
        backoff_max_s=0.02,
    )
    stats = LiveStats()
    stop = threading.Event()
    arrivals: list[float] = []
    with caplog.at_level("WARNING", logger="tools.camera"):
        for frame, arrived in live_video_frames(source, stop=stop, stats=stats):
            assert (frame.width, frame.height) == (64, 48)
            arrivals.append(arrived)
            if stats.outages == 2:
                stop.set()
    assert stats.outages == 2
    # Two passes of 4 frames, then the first frame of the third ends the second outage.
    assert stats.decoded == len(arrivals) == 9
    assert stats.outage_seconds > 0
    assert arrivals == sorted(arrivals)
    assert abs(arrivals[0] - time.time() * 1000) < 60_000
    lost = [r.getMessage() for r in caplog.records if " lost (end of stream)" in r.getMessage()]
    back = [r.getMessage() for r in caplog.records if " back after " in r.getMessage()]
    assert len(lost) == len(back) == 2
    assert back[1].endswith("(outage 2)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "rtsp://cam/s", "-o", "Authorization: s3cret"], "number 1 is not KEY="),
        (["--source", "http://cam/live.ts", "--loop"], "--loop does not apply"),
        (["--source", "synthetic", "-o", "rtsp_transport=udp"], "live sources only"),
        (["--source", "udp://0.0.0.0:1234", "--read-timeout", "0"], "--read-timeout must be"),
        (["--source", "tcp://cam:9000", "--queue-frames", "0"], "--queue-frames must be"),
    ],
)
def test_cli_rejects_bad_live_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--brokers", "127.0.0.1:9", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "s3cret" not in err
