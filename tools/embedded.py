"""An embedded Kafka-protocol broker: librdkafka's mock cluster, started in-process.

The mock cluster ships inside the confluent-kafka wheel's librdkafka. It is created here
through ctypes (`rd_kafka_mock_cluster_new`) on a private, otherwise idle librdkafka
handle, so that topics can be made with an exact partition count
(`rd_kafka_mock_topic_create`) and brokers can be taken down and up for tests. It listens
on loopback; clients in any process connect to `bootstrap` with plain TCP.

Run `python -m tools.embedded [--partitions N] [--topic T ...]` to serve one until
SIGINT/SIGTERM; it prints `bootstrap=HOST:PORT[,...]` on one line when ready.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import signal
import socket
import sys
import threading
import weakref
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType, TracebackType

RD_KAFKA_PRODUCER = 0
RD_KAFKA_CONF_OK = 0
ERR_TOPIC_ALREADY_EXISTS = 36
_ERRSTR_SIZE = 512
_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int


class EmbeddedBrokerError(RuntimeError):
    """The mock cluster could not be started or refused a request."""


def _library_candidates() -> list[Path]:
    """Paths where the confluent-kafka wheel may keep its bundled librdkafka."""
    import confluent_kafka

    package = Path(confluent_kafka.__file__).resolve().parent
    folders = [
        package.parent / "confluent_kafka.libs",
        package / ".libs",
        package / ".dylibs",
        package.parent / "confluent_kafka.dylibs",
        package,
    ]
    patterns = ("librdkafka*.so*", "librdkafka*.dylib", "librdkafka*.dll")
    found: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            for pattern in patterns:
                found.extend(sorted(folder.glob(pattern)))
    return found


@lru_cache(maxsize=1)
def _librdkafka() -> ctypes.CDLL:
    """The librdkafka the confluent-kafka wheel uses, with the mock API's prototypes set."""
    candidates = _library_candidates()
    if not candidates:
        name = ctypes.util.find_library("rdkafka")
        if name is None:
            raise EmbeddedBrokerError("librdkafka not found beside confluent_kafka")
        lib = ctypes.CDLL(name)
    else:
        lib = ctypes.CDLL(str(candidates[0]))
    if not hasattr(lib, "rd_kafka_mock_cluster_new"):
        raise EmbeddedBrokerError("this librdkafka was built without the mock cluster")
    prototypes: dict[str, tuple[object, list[object]]] = {
        "rd_kafka_conf_new": (_c_void_p, []),
        "rd_kafka_conf_set": (
            _c_int,
            [_c_void_p, _c_char_p, _c_char_p, _c_char_p, ctypes.c_size_t],
        ),
        "rd_kafka_conf_destroy": (None, [_c_void_p]),
        "rd_kafka_new": (_c_void_p, [_c_int, _c_void_p, _c_char_p, ctypes.c_size_t]),
        "rd_kafka_destroy": (None, [_c_void_p]),
        "rd_kafka_err2str": (_c_char_p, [_c_int]),
        "rd_kafka_mock_cluster_new": (_c_void_p, [_c_void_p, _c_int]),
        "rd_kafka_mock_cluster_bootstraps": (_c_char_p, [_c_void_p]),
        "rd_kafka_mock_cluster_destroy": (None, [_c_void_p]),
        "rd_kafka_mock_topic_create": (_c_int, [_c_void_p, _c_char_p, _c_int, _c_int]),
        "rd_kafka_mock_broker_set_down": (_c_int, [_c_void_p, ctypes.c_int32]),
        "rd_kafka_mock_broker_set_up": (_c_int, [_c_void_p, ctypes.c_int32]),
    }
    for name, (restype, argtypes) in prototypes.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def _err2str(lib: ctypes.CDLL, code: int) -> str:
    text = lib.rd_kafka_err2str(code)
    return text.decode(errors="replace") if text else f"error {code}"


def _destroy(lib: ctypes.CDLL, handles: list[int | None]) -> None:
    """Destroy the mock cluster, then the handle that owns it (idempotent)."""
    rk, mcluster = handles
    handles[0] = handles[1] = None
    if mcluster:
        lib.rd_kafka_mock_cluster_destroy(mcluster)
    if rk:
        lib.rd_kafka_destroy(rk)


WAKE_AFTER_S = 0.01
"""How long a request to the mock cluster waits before its thread is woken."""


def _wake_until(bootstrap: str, served: threading.Event) -> None:
    """Connect to the first broker of `bootstrap` and hang up, every `WAKE_AFTER_S` until
    `served` is set (a broker that is down refuses; nothing else can wake it)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    while not served.wait(WAKE_AFTER_S):
        with contextlib.suppress(OSError):
            socket.create_connection((host, int(port)), timeout=WAKE_AFTER_S).close()


class EmbeddedBroker:
    """librdkafka's mock cluster, started in-process; speaks the real Kafka protocol on
    loopback to clients in this or any other process.

    `brokers` mock brokers (ids 1..N) are started. Data lives in memory until `close`.
    Topics that clients produce to without creating them first get 4 partitions.
    """

    def __init__(self, brokers: int = 1) -> None:
        if brokers < 1:
            raise ValueError("brokers must be at least 1")
        lib = _librdkafka()
        self._lib = lib
        self._lock = threading.Lock()
        self.brokers = brokers
        errstr = ctypes.create_string_buffer(_ERRSTR_SIZE)
        conf = lib.rd_kafka_conf_new()
        for name, value in (("client.id", "streamsight-embedded-broker"), ("log_level", "3")):
            if (
                lib.rd_kafka_conf_set(conf, name.encode(), value.encode(), errstr, _ERRSTR_SIZE)
                != RD_KAFKA_CONF_OK
            ):
                lib.rd_kafka_conf_destroy(conf)
                raise EmbeddedBrokerError(f"librdkafka refused {name}: {errstr.value.decode()}")
        rk = lib.rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, _ERRSTR_SIZE)
        if not rk:
            lib.rd_kafka_conf_destroy(conf)
            raise EmbeddedBrokerError(f"rd_kafka_new failed: {errstr.value.decode()}")
        mcluster = lib.rd_kafka_mock_cluster_new(rk, brokers)
        if not mcluster:
            lib.rd_kafka_destroy(rk)
            raise EmbeddedBrokerError("rd_kafka_mock_cluster_new failed")
        self._handles: list[int | None] = [rk, mcluster]
        self._finalizer = weakref.finalize(self, _destroy, lib, self._handles)
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(mcluster).decode()

    @property
    def closed(self) -> bool:
        """True once `close` has run."""
        return not self._finalizer.alive

    def _cluster(self) -> int:
        mcluster = self._handles[1]
        if not mcluster:
            raise EmbeddedBrokerError("the embedded broker is closed")
        return mcluster

    def _request(self, function: str, *args: object) -> int:
        """Call the mock API's `function` on the cluster with `args`; its error code.

        The call waits until the mock cluster's thread has served it. That thread reads
        its wake-up pipe after serving its request queue, so a request queued in between
        loses its wake-up and waits for the thread's next poll timeout, a second (seen
        under strace: the pipe's byte read, then `poll(..., 1000)`). Any connection to
        the cluster's listener wakes that poll, so one is made every few milliseconds
        while the call waits.
        """
        with self._lock:
            cluster = self._cluster()
            served = threading.Event()
            waker = threading.Thread(
                target=_wake_until, args=(self.bootstrap, served), name="embedded-waker"
            )
            waker.start()
            try:
                code: int = getattr(self._lib, function)(cluster, *args)
            finally:
                served.set()
                waker.join()
        return code

    def create_topic(
        self, name: str, partitions: int, replication_factor: int = 1, *, exist_ok: bool = False
    ) -> None:
        """Create `name` with exactly `partitions` partitions.

        Raises EmbeddedBrokerError if it exists already (whatever its partition count),
        unless `exist_ok`, which leaves an existing topic as it is.
        """
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        if not 1 <= replication_factor <= self.brokers:
            raise ValueError(f"replication_factor must be between 1 and {self.brokers}")
        code = self._request(
            "rd_kafka_mock_topic_create", name.encode(), partitions, replication_factor
        )
        if code == ERR_TOPIC_ALREADY_EXISTS and exist_ok:
            return
        if code:
            raise EmbeddedBrokerError(f"cannot create topic {name!r}: {_err2str(self._lib, code)}")

    def set_broker_down(self, broker_id: int = 1) -> None:
        """Make broker `broker_id` (1..N) drop its connections and refuse new ones."""
        self._broker_call("rd_kafka_mock_broker_set_down", broker_id)

    def set_broker_up(self, broker_id: int = 1) -> None:
        """Bring broker `broker_id` back after `set_broker_down`."""
        self._broker_call("rd_kafka_mock_broker_set_up", broker_id)

    def _broker_call(self, function: str, broker_id: int) -> None:
        if not 1 <= broker_id <= self.brokers:
            raise ValueError(f"broker_id must be between 1 and {self.brokers}")
        code = self._request(function, broker_id)
        if code:
            raise EmbeddedBrokerError(f"{function}: {_err2str(self._lib, code)}")

    def close(self) -> None:
        """Stop the brokers and drop their data (idempotent)."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.bootstrap
        return f"EmbeddedBroker({state})"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from flows.settings import load_settings

    settings = load_settings()
    parser = argparse.ArgumentParser(
        prog="python -m tools.embedded",
        description="Serve an in-memory Kafka-protocol broker on loopback until "
        "SIGINT/SIGTERM. Prints 'bootstrap=HOST:PORT' once ready.",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=settings.partitions,
        help="partitions of each topic created (default: %(default)s)",
    )
    parser.add_argument(
        "--topic",
        action="append",
        dest="topics",
        metavar="TOPIC",
        help="topic to create; repeat for several (default: the input, output and "
        "dead-letter topics of the settings)",
    )
    parser.add_argument(
        "--no-topics", action="store_true", help="create no topics (clients auto-create)"
    )
    parser.add_argument(
        "--broker-count", type=int, default=1, help="mock brokers to start (default: 1)"
    )
    args = parser.parse_args(argv)
    if args.partitions < 1:
        parser.error("--partitions must be at least 1")
    if args.broker_count < 1:
        parser.error("--broker-count must be at least 1")
    if args.no_topics:
        args.topics = []
    elif not args.topics:
        args.topics = [settings.input_topic, settings.output_topic, settings.dead_letter_topic]
    return args


def main(argv: list[str] | None = None) -> None:
    """Start a broker, create the topics, print `bootstrap=...` and serve until a signal."""
    args = _parse_args(argv)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    with EmbeddedBroker(brokers=args.broker_count) as broker:
        for topic in dict.fromkeys(args.topics):
            broker.create_topic(topic, args.partitions)
        print(f"bootstrap={broker.bootstrap}", flush=True)
        while not stop.wait(0.5):
            pass
    print("embedded broker stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
