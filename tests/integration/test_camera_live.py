"""The camera CLI on live streams: FFmpeg serves a 1280x720 test pattern on loopback
(MPEG-TS or MJPEG over HTTP, or MPEG-4 published to an RTSP server), `python -m
tools.camera` reads it into the embedded broker.

FFmpeg and rtsp-server-perl come from `.ci/install-system-packages.sh`; without them these
tests are skipped, except under CI=true, where that is a failure. Sources run at 10
frames/s to keep the load on a shared 2-core machine modest.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import simplejpeg

from bench.pipeline import free_ports
from operators import contract
from operators.kafka_io import high_watermarks
from tests.fixtures.kafka import REPO_ROOT, ConsumedMessage, read_topic, subprocess_env
from tools.embedded import EmbeddedBroker

pytestmark = pytest.mark.integration

SIZE = (1280, 720)
RATE = 10
WAIT_S = 30.0
MPEGTS = ("-c:v", "mpeg2video", "-q:v", "6", "-f", "mpegts")
MJPEG = ("-c:v", "mjpeg", "-q:v", "6", "-f", "mpjpeg")


def _require(tool: str) -> str:
    """The path of `tool` (a Debian package of the same name); skip the test without it,
    fail under CI=true."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} not found: install the Debian package `{tool}`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (.ci/install-system-packages.sh)")
        pytest.skip(message)
    return path


@dataclass
class StreamServer:
    """`ffmpeg -re` serving a live test pattern to one HTTP client at `url`; restartable
    on the same port."""

    ffmpeg: str
    url: str
    codec: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start serving (FFmpeg listens at once and streams to the first client)."""
        width, height = SIZE
        self.process = subprocess.Popen(
            [
                self.ffmpeg,
                "-hide_banner",
                "-loglevel",
                "error",
                "-re",
                "-f",
                "lavfi",
                "-i",
                f"testsrc=size={width}x{height}:rate={RATE}",
                *self.codec,
                "-listen",
                "1",
                self.url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        """Kill the server (works on a stopped one too) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the connection stays open and no data comes (a stalled stream)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)


@pytest.fixture
def stream_server() -> Iterator[Callable[[tuple[str, ...], str], StreamServer]]:
    """`stream_server(codec, path)`: a started StreamServer on a free port; killed after."""
    ffmpeg = _require("ffmpeg")
    servers: list[StreamServer] = []

    def _start(codec: tuple[str, ...], path: str) -> StreamServer:
        (port,) = free_ports(1)
        server = StreamServer(ffmpeg, f"http://127.0.0.1:{port}/{path}", codec)
        server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.kill()


@dataclass
class CameraRun:
    """A `python -m tools.camera` subprocess whose output goes to files."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"camera did not finish: {self.stderr.read_text()}") from None

    def summary(self) -> dict[str, str]:
        line = next(
            line for line in self.stdout.read_text().splitlines() if line.startswith("summary:")
        )
        return dict(part.split("=", 1) for part in line.removeprefix("summary:").split())

    def log_lines(self, word: str) -> list[str]:
        return [line for line in self.stderr.read_text().splitlines() if word in line]


@pytest.fixture
def camera(tmp_path: Path) -> Iterator[Callable[..., CameraRun]]:
    """`camera(*args)`: start the camera CLI (quiet); killed after the test if still up."""
    runs: list[CameraRun] = []

    def _start(*args: str) -> CameraRun:
        index = len(runs)
        stdout, stderr = tmp_path / f"camera-{index}.out", tmp_path / f"camera-{index}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "tools.camera", "--quiet", *args],
                cwd=REPO_ROOT,
                env=subprocess_env(OTEL_TRACES_EXPORTER="none"),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        runs.append(CameraRun(process, stdout, stderr))
        return runs[-1]

    yield _start
    for run in runs:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait(10)


def _wait_for(condition: Callable[[], bool], what: str, run: CameraRun) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {run.stderr.read_text()}")
        if run.process.poll() is not None:
            raise AssertionError(f"camera exited waiting for {what}: {run.stderr.read_text()}")
        time.sleep(0.05)


def _frames_in(bootstrap: str, topic: str) -> int:
    return sum(high_watermarks({"bootstrap.servers": bootstrap}, topic).values())


def _check_live_frame(message: ConsumedMessage, job_id: str) -> float:
    """Assert the contract's headers and a 1280x720 JPEG; returns the capture time (ms)."""
    assert message.key == b"cam-0"
    assert message.header(contract.JOB_ID) == job_id
    assert message.header(contract.CAMERA) == "cam-0"
    assert message.header(contract.CONTENT_TYPE) == contract.JPEG
    assert (message.header(contract.SEQ) or "").isdigit()
    assert message.value is not None and message.value.startswith(b"\xff\xd8\xff")
    height, width, _, _ = simplejpeg.decode_jpeg_header(message.value)
    assert (width, height) == SIZE
    capture = float(message.header(contract.CAPTURE_TIME_MS) or "nan")
    assert abs(capture - time.time() * 1000) < 120_000
    return capture


def _topic(broker: EmbeddedBroker, name: str) -> str:
    broker.create_topic(name, 1)
    return name


def test_mpegts_stream_resumes_after_the_server_restarts(
    embedded_broker: EmbeddedBroker,
    unique_topic: Callable[..., str],
    stream_server: Callable[[tuple[str, ...], str], StreamServer],
    camera: Callable[..., CameraRun],
) -> None:
    topic = _topic(embedded_broker, unique_topic("live-ts"))
    server = stream_server(MPEGTS, "live.ts")
    run = camera(
        *("--brokers", embedded_broker.bootstrap, "--topic", topic),
        *("--source", server.url, "--frames", "14", "--reconnect-max", "1"),
        *("--job-id", "job-live-ts"),
    )
    _wait_for(lambda: _frames_in(embedded_broker.bootstrap, topic) >= 3, "the first frames", run)
    server.kill()
    _wait_for(lambda: bool(run.log_lines(" lost (")), "the outage to be logged", run)
    server.start()
    restarted_ms = time.time() * 1000
    assert run.wait() == 0, run.stderr.read_text()

    summary = run.summary()
    assert summary["sent"] == summary["delivered"] == "14"
    assert summary["failed"] == "0"
    assert summary["outages"] == "1"
    assert float(summary["outage_seconds"]) > 0
    assert summary["dropped"] == "0"
    assert len(run.log_lines(" lost (")) == 1
    assert len(run.log_lines(" back after ")) == 1
    messages = read_topic(embedded_broker.bootstrap, topic, expected=14)
    assert len(messages) == 14
    captures = [_check_live_frame(message, "job-live-ts") for message in messages]
    seqs = [int(message.header(contract.SEQ) or -1) for message in messages]
    assert seqs == sorted(set(seqs))
    assert max(captures) > restarted_ms, "no frame came from the restarted server"
    assert min(captures) < restarted_ms


def test_mjpeg_stream_is_decimated_by_fps(
    embedded_broker: EmbeddedBroker,
    unique_topic: Callable[..., str],
    stream_server: Callable[[tuple[str, ...], str], StreamServer],
    camera: Callable[..., CameraRun],
) -> None:
    topic = _topic(embedded_broker, unique_topic("live-mjpeg"))
    server = stream_server(MJPEG, "live.mjpg")
    fps = 3.0
    run = camera(
        *("--brokers", embedded_broker.bootstrap, "--topic", topic),
        *("--source", server.url, "--frames", "6", "--fps", str(fps)),
        *("--job-id", "job-live-mjpeg"),
    )
    assert run.wait() == 0, run.stderr.read_text()
    summary = run.summary()
    assert summary["sent"] == summary["delivered"] == "6"
    assert summary["outages"] == "0"
    assert int(summary["decimated"]) > 0
    assert int(summary["decoded"]) >= 6 + int(summary["decimated"])
    messages = read_topic(embedded_broker.bootstrap, topic, expected=6)
    assert len(messages) == 6
    captures = sorted(_check_live_frame(message, "job-live-mjpeg") for message in messages)
    # The decimator's bound: n frames kept span at least (n - 1.5) intervals (50 ms slack
    # for the wall clock against the monotonic one it uses).
    assert captures[-1] - captures[0] >= (len(captures) - 1.5) * 1000 / fps - 50


def test_stalled_stream_times_out_and_is_reopened(
    embedded_broker: EmbeddedBroker,
    unique_topic: Callable[..., str],
    stream_server: Callable[[tuple[str, ...], str], StreamServer],
    camera: Callable[..., CameraRun],
) -> None:
    topic = _topic(embedded_broker, unique_topic("live-stall"))
    server = stream_server(MJPEG, "live.mjpg")
    run = camera(
        *("--brokers", embedded_broker.bootstrap, "--topic", topic),
        *("--source", server.url, "--frames", "8", "--read-timeout", "1"),
        *("--reconnect-max", "1", "--job-id", "job-live-stall"),
    )
    _wait_for(lambda: _frames_in(embedded_broker.bootstrap, topic) >= 2, "the first frames", run)
    server.pause()
    paused = time.monotonic()
    _wait_for(lambda: bool(run.log_lines(" lost (timed out")), "the stall to be detected", run)
    detected_after = time.monotonic() - paused
    server.kill()
    server.start()
    assert run.wait() == 0, run.stderr.read_text()

    summary = run.summary()
    assert summary["sent"] == summary["delivered"] == "8"
    assert summary["outages"] == "1"
    assert len(run.log_lines(" back after ")) == 1
    assert detected_after >= 0.5  # the read timeout, not an error, ended the stall
    messages = read_topic(embedded_broker.bootstrap, topic, expected=8)
    assert len(messages) == 8
    for message in messages:
        _check_live_frame(message, "job-live-stall")


def test_credentials_in_the_url_stay_out_of_the_output(
    embedded_broker: EmbeddedBroker,
    unique_topic: Callable[..., str],
    stream_server: Callable[[tuple[str, ...], str], StreamServer],
    camera: Callable[..., CameraRun],
) -> None:
    """A source that never comes up is retried (logged once), and its password and query
    string never reach the logs or the summary."""
    topic = _topic(embedded_broker, unique_topic("live-secret"))
    (port,) = free_ports(1)
    run = camera(
        *("--brokers", embedded_broker.bootstrap, "--topic", topic),
        *("--source", f"rtsp://admin:pw-s3cret@127.0.0.1:{port}/h264?token=tok-s3cret"),
        *("--reconnect-max", "0.2", "--job-id", "job-live-secret"),
    )
    _wait_for(lambda: bool(run.log_lines("not available yet")), "the first failed open", run)
    time.sleep(1.0)  # several more attempts, none of them logged
    run.process.send_signal(signal.SIGINT)
    assert run.wait() == 0, run.stderr.read_text()
    output = run.stdout.read_text() + run.stderr.read_text()
    assert "s3cret" not in output
    assert len(run.log_lines("not available yet")) == 1
    assert "rtsp://***@127.0.0.1" in output
    summary = run.summary()
    assert summary["sent"] == "0"
    assert summary["outages"] == "0"


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_rtsp_stream_over_udp(
    embedded_broker: EmbeddedBroker,
    unique_topic: Callable[..., str],
    camera: Callable[..., CameraRun],
    tmp_path: Path,
) -> None:
    """rtsp-server-perl relays RTP over UDP only (it answers 400 to TCP-interleaved
    clients): the camera is told `-o rtsp_transport=udp`."""
    ffmpeg, server = _require("ffmpeg"), _require("rtsp-server-perl")
    topic = _topic(embedded_broker, unique_topic("live-rtsp"))
    client_port, source_port, rtp_port = free_ports(3)
    width, height = SIZE
    relay = [
        server, "-c", str(client_port), "-s", str(source_port),
        "--client_listen_address", "127.0.0.1", "--source_listen_address", "127.0.0.1",
        "--rtp_start_port", str(rtp_port),
    ]  # fmt: skip
    publisher = [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate={RATE}",
        "-c:v", "mpeg4", "-q:v", "6", "-f", "rtsp", f"rtsp://127.0.0.1:{source_port}/live",
    ]  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with (tmp_path / "rtsp-server.log").open("wb") as log:
            processes.append(
                subprocess.Popen(relay, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            )
        _wait_for_port(source_port)
        processes.append(
            subprocess.Popen(
                publisher,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        run = camera(
            *("--brokers", embedded_broker.bootstrap, "--topic", topic),
            *("--source", f"rtsp://127.0.0.1:{client_port}/live", "-o", "rtsp_transport=udp"),
            *("--frames", "5", "--reconnect-max", "0.5", "--job-id", "job-live-rtsp"),
        )
        assert run.wait() == 0, run.stderr.read_text()
    finally:
        for process in reversed(processes):
            process.kill()
            process.wait(10)
    summary = run.summary()
    assert summary["sent"] == summary["delivered"] == "5"
    messages = read_topic(embedded_broker.bootstrap, topic, expected=5)
    assert len(messages) == 5
    for message in messages:
        _check_live_frame(message, "job-live-rtsp")


def test_frames_are_dropped_oldest_first_while_kafka_is_down(
    unique_topic: Callable[..., str],
    stream_server: Callable[[tuple[str, ...], str], StreamServer],
    camera: Callable[..., CameraRun],
) -> None:
    """With the broker down, the Kafka client's queue (bounded at --queue-frames) fills,
    sending waits, and the capture queue drops its oldest frames instead of growing; once
    the broker is back, the newest frames are delivered and nothing fails."""
    server = stream_server(MJPEG, "live.mjpg")
    with EmbeddedBroker() as broker:  # of its own: this test takes it down
        topic = _topic(broker, unique_topic("live-overload"))
        run = camera(
            *("--brokers", broker.bootstrap, "--topic", topic, "--source", server.url),
            *("--frames", "12", "--queue-frames", "2", "--job-id", "job-live-overload"),
        )
        _wait_for(lambda: _frames_in(broker.bootstrap, topic) >= 2, "the first frames", run)
        broker.set_broker_down()
        _wait_for(lambda: bool(run.log_lines("dropping the oldest")), "frames dropped", run)
        broker.set_broker_up()
        assert run.wait() == 0, run.stderr.read_text()
        messages = read_topic(broker.bootstrap, topic, expected=12)

    summary = run.summary()
    assert summary["sent"] == summary["delivered"] == "12"
    assert summary["failed"] == "0"
    assert int(summary["dropped"]) > 0
    assert len(run.log_lines("dropping the oldest")) == 1
    assert len(messages) == 12
    seqs = [int(message.header(contract.SEQ) or -1) for message in messages]
    # Sequence numbers count captured frames: the dropped ones leave a gap (frames
    # dropped after the last one sent are counted too, so no exact sum).
    assert seqs == sorted(set(seqs))
    assert seqs[-1] - seqs[0] + 1 > 12
    for message in messages:
        _check_live_frame(message, "job-live-overload")
