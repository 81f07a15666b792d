"""The camera producer: its frame sources, `publish`, and the CLI run as a subprocess
against a `python -m tools.embedded` broker."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from operators import contract
from operators.kafka_io import CheckedProducer, DeliveryError, high_watermarks
from tests.fixtures.kafka import (
    REPO_ROOT,
    BrokerProcess,
    ConsumedMessage,
    broker_subprocess,
    read_topic,
    subprocess_env,
)
from tools.camera import (
    OutgoingFrame,
    camera_index,
    file_frames,
    publish,
    spread_partition,
    synthetic_frames,
)
from tools.embedded import EmbeddedBroker
from tools.scene import encode_jpeg, render_frame

pytestmark = pytest.mark.integration

VIDEO_SIZE = (64, 48)


@pytest.fixture(scope="module")
def camera_broker() -> Iterator[BrokerProcess]:
    """A broker subprocess with topics `cam-a`..`cam-e` of 4 partitions each."""
    topics = [arg for name in "abcde" for arg in ("--topic", f"cam-{name}")]
    with broker_subprocess("--partitions", "4", *topics) as broker:
        yield broker


def _run_camera(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.camera", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=subprocess_env(),
    )


def _summary(stdout: str) -> dict[str, str]:
    line = next(line for line in stdout.splitlines() if line.startswith("summary:"))
    return dict(part.split("=", 1) for part in line.removeprefix("summary:").split())


def _check_headers(message: ConsumedMessage, job_id: str) -> None:
    assert message.key is not None
    camera = message.key.decode()
    assert message.header(contract.JOB_ID) == job_id
    assert message.header(contract.CAMERA) == camera
    assert message.header(contract.CONTENT_TYPE) == contract.JPEG
    seq = message.header(contract.SEQ)
    assert seq is not None and seq.isdigit()
    capture = message.header(contract.CAPTURE_TIME_MS)
    assert capture is not None
    assert abs(float(capture) - time.time() * 1000) < 120_000
    traceparent = message.header(contract.TRACEPARENT) or ""
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]", traceparent), traceparent
    assert f"job.id={job_id}" in (message.header(contract.BAGGAGE) or "")
    assert message.value is not None and message.value.startswith(b"\xff\xd8\xff")


def _write_video(path: Path, frames: int) -> list[np.ndarray]:
    width, height = VIDEO_SIZE
    images = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[:, : (i + 1) * width // frames] = (200, 40 + 10 * i, 90)
            images.append(image)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return images


def _write_images(folder: Path) -> dict[str, bytes]:
    """Two JPEGs, one PNG and a stray text file; returns the JPEG files' bytes by name."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    jpegs = {}
    for name in ("a.jpg", "c.jpeg"):
        pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        data = simplejpeg.encode_jpeg(pixels, quality=70, colorspace="RGB")
        (folder / name).write_bytes(data)
        jpegs[name] = data
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return jpegs


def test_cli_synthetic(camera_broker: BrokerProcess) -> None:
    result = _run_camera(
        "--brokers",
        camera_broker.bootstrap,
        "--topic",
        "cam-a",
        "--cameras",
        "3",
        "--frames",
        "4",
        "--fps",
        "0",
        "--job-id",
        "job-synthetic",
    )
    assert result.returncode == 0, result.stderr
    summary = _summary(result.stdout)
    assert summary["sent"] == "12"
    assert summary["delivered"] == "12"
    assert summary["failed"] == "0"
    assert summary["job_id"] == "job-synthetic"

    messages = read_topic(camera_broker.bootstrap, "cam-a", expected=12)
    assert len(messages) == 12
    seqs: dict[str, list[int]] = {}
    for message in messages:
        _check_headers(message, "job-synthetic")
        camera = message.header(contract.CAMERA) or ""
        seq = int(message.header(contract.SEQ) or -1)
        index = camera_index(camera)
        assert message.partition == spread_partition(camera, 4) == index % 4
        assert message.value == encode_jpeg(render_frame(index, seq).rgb, quality=85)
        seqs.setdefault(camera, []).append(seq)
    assert seqs == {f"cam-{i}": [0, 1, 2, 3] for i in range(3)}


def test_cli_synthetic_frames_of_the_size_asked(camera_broker: BrokerProcess) -> None:
    result = _run_camera(
        "--brokers",
        camera_broker.bootstrap,
        "--topic",
        "cam-e",
        "--frames",
        "2",
        "--fps",
        "0",
        "--frame-size",
        "1280x720",
    )
    assert result.returncode == 0, result.stderr
    messages = read_topic(camera_broker.bootstrap, "cam-e", expected=2)
    for message in messages:
        height, width, _, _ = simplejpeg.decode_jpeg_header(message.value)
        assert (width, height) == (1280, 720)
    bad = _run_camera("--brokers", camera_broker.bootstrap, "--frame-size", "1280")
    assert bad.returncode == 2 and "--frame-size" in bad.stderr


def test_cli_video_file(camera_broker: BrokerProcess, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, 10)
    result = _run_camera(
        "--brokers",
        camera_broker.bootstrap,
        "--topic",
        "cam-b",
        "--source",
        str(video),
        "--cameras",
        "2",
        "--fps",
        "0",
        "--job-id",
        "job-video",
    )
    assert result.returncode == 0, result.stderr
    assert _summary(result.stdout)["sent"] == "20"
    messages = read_topic(camera_broker.bootstrap, "cam-b", expected=20)
    assert len(messages) == 20
    seqs: dict[str, set[int]] = {}
    for message in messages:
        _check_headers(message, "job-video")
        assert message.value is not None
        height, width, _, _ = simplejpeg.decode_jpeg_header(message.value)
        assert (width, height) == VIDEO_SIZE
        seqs.setdefault(message.header(contract.CAMERA) or "", set()).add(
            int(message.header(contract.SEQ) or -1)
        )
    assert seqs == {"cam-0": set(range(10)), "cam-1": set(range(10))}


def test_cli_image_folder(camera_broker: BrokerProcess, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    jpegs = _write_images(folder)
    result = _run_camera(
        "--brokers",
        camera_broker.bootstrap,
        "--topic",
        "cam-c",
        "--source",
        str(folder),
        "--fps",
        "0",
        "--job-id",
        "job-images",
    )
    assert result.returncode == 0, result.stderr
    messages = sorted(
        read_topic(camera_broker.bootstrap, "cam-c", expected=3),
        key=lambda m: int(m.header(contract.SEQ) or -1),
    )
    assert len(messages) == 3
    for message in messages:
        _check_headers(message, "job-images")
        assert message.key == b"cam-0"
    assert messages[0].value == jpegs["a.jpg"]
    assert messages[2].value == jpegs["c.jpeg"]
    assert messages[1].value is not None
    assert simplejpeg.decode_jpeg_header(messages[1].value)[:2] == (30, 20)


def test_cli_progress_lines_when_not_a_terminal(camera_broker: BrokerProcess) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.camera",
            "--brokers",
            camera_broker.bootstrap,
            "--topic",
            "cam-d",
            "--frames",
            "3",
            "--fps",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    summary = _summary(result.stdout)
    assert summary["sent"] == "3"
    assert summary["job_id"].startswith("camera-")
    assert "\x1b[" not in result.stdout


def test_cli_exits_non_zero_when_frames_are_not_delivered() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _run_camera(
        "--brokers",
        f"127.0.0.1:{port}",
        "--frames",
        "2",
        "--fps",
        "0",
        "--partitioning",
        "hash",
        "--delivery-timeout",
        "0.5",
        timeout=30,
    )
    assert result.returncode == 1
    assert "not delivered" in result.stderr
    assert "_MSG_TIMED_OUT" in result.stderr
    summary = _summary(result.stdout)
    assert summary["failed"] == "2"
    assert summary["delivered"] == "0"


def test_cli_reports_unreachable_kafka() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _run_camera(
        "--brokers", f"127.0.0.1:{port}", "--frames", "1", "--delivery-timeout", "1", timeout=30
    )
    assert result.returncode == 1
    assert "cannot read Kafka metadata" in result.stderr


def test_cli_requires_brokers() -> None:
    result = _run_camera("--frames", "1")
    assert result.returncode == 2
    assert "--brokers is required" in result.stderr


def test_synthetic_frames_match_the_scene() -> None:
    ticks = list(synthetic_frames(2, 3, width=96, height=64, quality=80, seed=7))
    assert [[(f.camera, f.seq) for f in tick] for tick in ticks] == [
        [("cam-0", s), ("cam-1", s)] for s in range(3)
    ]
    for tick in ticks:
        assert len({f.capture_time_ms for f in tick}) == 1
        for frame in tick:
            expected = render_frame(
                camera_index(frame.camera), frame.seq, width=96, height=64, seed=7
            )
            assert frame.jpeg == encode_jpeg(expected.rgb, quality=80)


def test_file_frames_loop_and_reencode(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    jpegs = _write_images(folder)
    ticks = list(file_frames(folder, 2, loop=True, quality=60, reencode=False, frames_per_camera=7))
    assert [tick[0].seq for tick in ticks] == list(range(7))
    assert all([f.camera for f in tick] == ["cam-0", "cam-1"] for tick in ticks)
    assert ticks[3][1].jpeg == jpegs["a.jpg"]
    assert ticks[5][0].jpeg == jpegs["c.jpeg"]
    reencoded = next(
        file_frames(folder, 1, loop=False, quality=60, reencode=True, frames_per_camera=None)
    )
    assert reencoded[0].jpeg != jpegs["a.jpg"]
    assert simplejpeg.decode_jpeg_header(reencoded[0].jpeg)[:2] == (40, 56)


def test_file_frames_video_stops_at_the_end(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    images = _write_video(video, 6)
    ticks = list(
        file_frames(video, 1, loop=False, quality=95, reencode=False, frames_per_camera=None)
    )
    assert len(ticks) == 6
    decoded = simplejpeg.decode_jpeg(ticks[-1][0].jpeg, colorspace="RGB")
    assert np.abs(decoded.astype(int) - images[-1].astype(int)).mean() < 12


def test_file_frames_rejects_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        next(
            file_frames(
                tmp_path / "empty",
                1,
                loop=False,
                quality=80,
                reencode=False,
                frames_per_camera=None,
            )
        )
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video")
    with pytest.raises(ValueError, match=r"junk\.mp4"):
        next(file_frames(junk, 1, loop=False, quality=80, reencode=False, frames_per_camera=None))


def test_publish_paces_ticks_and_adds_trace_headers(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("publish")
    embedded_broker.create_topic(topic, 2)
    producer = CheckedProducer({"bootstrap.servers": embedded_broker.bootstrap})
    totals: list[int] = []

    def traceparent(frame: OutgoingFrame) -> dict[str, str]:
        return {contract.TRACEPARENT: f"00-{frame.seq:032x}-{1:016x}-01"}

    report = publish(
        producer,
        topic,
        synthetic_frames(2, 6),
        job_id="job-paced",
        fps=20,
        on_sent=totals.append,
        trace_headers=traceparent,
        partitions=2,
    )
    producer.close()
    assert report.sent == 12
    assert totals == [2, 4, 6, 8, 10, 12]
    assert 0.2 <= report.seconds < 2.0
    assert report.end_offsets == {(topic, 0): 6, (topic, 1): 6}
    conf = {"bootstrap.servers": embedded_broker.bootstrap}
    assert high_watermarks(conf, topic) == {0: 6, 1: 6}
    for message in read_topic(conf, topic, expected=12):
        seq = int(message.header(contract.SEQ) or -1)
        assert message.header(contract.TRACEPARENT) == f"00-{seq:032x}-{1:016x}-01"
        assert message.header(contract.JOB_ID) == "job-paced"


def test_publish_stops_on_event(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("stop")
    embedded_broker.create_topic(topic, 1)
    producer = CheckedProducer({"bootstrap.servers": embedded_broker.bootstrap})
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    report = publish(producer, topic, synthetic_frames(1, None), job_id="j", fps=20, stop=stop)
    producer.close()
    assert 2 <= report.sent <= 12
    conf = {"bootstrap.servers": embedded_broker.bootstrap}
    assert high_watermarks(conf, topic) == {0: report.sent}


def test_publish_raises_on_failed_delivery(
    embedded_broker: EmbeddedBroker, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("fail")
    embedded_broker.create_topic(topic, 1)
    producer = CheckedProducer({"bootstrap.servers": embedded_broker.bootstrap})
    try:
        with pytest.raises(DeliveryError, match="_UNKNOWN_PARTITION"):
            publish(producer, topic, synthetic_frames(2, 2), job_id="j", fps=0, partitions=2)
    finally:
        producer.close()
