"""The database layer of the idempotent sink: SQLite or PostgreSQL.

`open_store(url)` takes `sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or
`postgresql://user:password@host:port/dbname` (also `postgres://`), as text or as the
`SinkUrl` that `operators.sink_url` parses it into, and returns a `DetectionStore`. The
tables are created when a store is opened, if they do not exist. A SQLite file's
directory must exist, except the default `.streamsight/`, which is created
when its own parent exists: a mistyped path never creates directories elsewhere.

Frames are keyed by `frame_id` (see `FrameMeta`), dead letters by the Kafka coordinates of
the message and the stage that rejected it, so writing the same result or dead letter
again - after a restart or a replay - changes nothing and is counted as a duplicate.

Schema (PostgreSQL; SQLite has the same columns with INTEGER/TEXT types and the
detections as JSON text)::

    CREATE TABLE IF NOT EXISTS detections (
        frame_id text PRIMARY KEY,
        job_id text NOT NULL,
        camera text NOT NULL,
        seq bigint,
        source_topic text NOT NULL,
        source_partition integer NOT NULL,
        source_offset bigint NOT NULL,
        capture_ns bigint NOT NULL,
        ingest_ns bigint NOT NULL,
        inferred_ns bigint NOT NULL,
        written_ns bigint NOT NULL,
        content_sha256 text NOT NULL,
        width integer NOT NULL,
        height integer NOT NULL,
        model_name text NOT NULL,
        model_version text NOT NULL,
        device text NOT NULL,
        batch_size integer NOT NULL,
        detection_count integer NOT NULL,
        detections jsonb NOT NULL
    );
    CREATE INDEX IF NOT EXISTS detections_job_id ON detections (job_id);
    CREATE TABLE IF NOT EXISTS dead_letters (
        source_topic text NOT NULL,
        source_partition integer NOT NULL,
        source_offset bigint NOT NULL,
        stage text NOT NULL,
        reason text NOT NULL,
        detail text NOT NULL,
        frame_id text,
        job_id text,
        payload_bytes bigint,
        payload_sha256 text,
        written_ns bigint NOT NULL,
        PRIMARY KEY (source_topic, source_partition, source_offset, stage)
    );

`detections` holds one row per processed frame, also when nothing was detected; its
`detections` column is a list of `{"box": [x1, y1, x2, y2], "label": ..., "score": ...}`
(box in original image pixels; a non-finite number is stored as null). `seq` is null when
the producer sent no sequence number. The `*_ns` columns are Unix epoch nanoseconds.
`dead_letters` never holds the payload itself: only its length and SHA-256 (both null
when the message had no value); `detail` is cut to 2000 characters.

SQLite runs in WAL mode with `synchronous=NORMAL` and a busy timeout; every write is one
`BEGIN IMMEDIATE` transaction, so several threads or processes can open and write the same
file at once, each with its own store. PostgreSQL uses psycopg 3 with one connection per
store; rows are written in `frame_id` order (so concurrent writers of overlapping frames
cannot deadlock), and a dropped connection is reopened and the write retried once.

A store object is used by one thread at a time. Errors are `StoreError`s with one-line
messages free of secrets (URLs shown with the password masked): `RowsRejected` when the
database refused the rows themselves (a value out of a column's range, a constraint, text
it cannot encode), so that writing them again fails again; `StoreConnectionError` when it
could not be reached; a plain `StoreError` for anything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql

from operators.frames import DeadLetter, Detection, FrameResult
from operators.sink_url import MASK, SinkUrl, parse_sink_url, redact_url, url_passwords

log = logging.getLogger(__name__)

T = TypeVar("T")

DETAIL_MAX_CHARS = 2000
SQLITE_BUSY_TIMEOUT_S = 30.0
POSTGRES_CONNECT_TIMEOUT_S = 10
POSTGRES_ROWS_PER_STATEMENT = 1000
APPLICATION_NAME = "streamsight-sink"

RESULT_COLUMNS: tuple[str, ...] = (
    "frame_id",
    "job_id",
    "camera",
    "seq",
    "source_topic",
    "source_partition",
    "source_offset",
    "capture_ns",
    "ingest_ns",
    "inferred_ns",
    "written_ns",
    "content_sha256",
    "width",
    "height",
    "model_name",
    "model_version",
    "device",
    "batch_size",
    "detection_count",
    "detections",
)

DEAD_LETTER_COLUMNS: tuple[str, ...] = (
    "source_topic",
    "source_partition",
    "source_offset",
    "stage",
    "reason",
    "detail",
    "frame_id",
    "job_id",
    "payload_bytes",
    "payload_sha256",
    "written_ns",
)

DEAD_LETTER_KEY: tuple[str, ...] = ("source_topic", "source_partition", "source_offset", "stage")

POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS detections (
        frame_id text PRIMARY KEY,
        job_id text NOT NULL,
        camera text NOT NULL,
        seq bigint,
        source_topic text NOT NULL,
        source_partition integer NOT NULL,
        source_offset bigint NOT NULL,
        capture_ns bigint NOT NULL,
        ingest_ns bigint NOT NULL,
        inferred_ns bigint NOT NULL,
        written_ns bigint NOT NULL,
        content_sha256 text NOT NULL,
        width integer NOT NULL,
        height integer NOT NULL,
        model_name text NOT NULL,
        model_version text NOT NULL,
        device text NOT NULL,
        batch_size integer NOT NULL,
        detection_count integer NOT NULL,
        detections jsonb NOT NULL
    );""",
    "CREATE INDEX IF NOT EXISTS detections_job_id ON detections (job_id);",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        source_topic text NOT NULL,
        source_partition integer NOT NULL,
        source_offset bigint NOT NULL,
        stage text NOT NULL,
        reason text NOT NULL,
        detail text NOT NULL,
        frame_id text,
        job_id text,
        payload_bytes bigint,
        payload_sha256 text,
        written_ns bigint NOT NULL,
        PRIMARY KEY (source_topic, source_partition, source_offset, stage)
    );""",
)

SQLITE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS detections (
        frame_id TEXT PRIMARY KEY NOT NULL,
        job_id TEXT NOT NULL,
        camera TEXT NOT NULL,
        seq INTEGER,
        source_topic TEXT NOT NULL,
        source_partition INTEGER NOT NULL,
        source_offset INTEGER NOT NULL,
        capture_ns INTEGER NOT NULL,
        ingest_ns INTEGER NOT NULL,
        inferred_ns INTEGER NOT NULL,
        written_ns INTEGER NOT NULL,
        content_sha256 TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        model_name TEXT NOT NULL,
        model_version TEXT NOT NULL,
        device TEXT NOT NULL,
        batch_size INTEGER NOT NULL,
        detection_count INTEGER NOT NULL,
        detections TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS detections_job_id ON detections (job_id)",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        source_topic TEXT NOT NULL,
        source_partition INTEGER NOT NULL,
        source_offset INTEGER NOT NULL,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        frame_id TEXT,
        job_id TEXT,
        payload_bytes INTEGER,
        payload_sha256 TEXT,
        written_ns INTEGER NOT NULL,
        PRIMARY KEY (source_topic, source_partition, source_offset, stage)
    )""",
)

# Serialises schema creation between processes opening a fresh PostgreSQL database at once.
_SCHEMA_LOCK_ID = 0x5354_5245_414D


class StoreError(RuntimeError):
    """The database could not complete an operation (message free of secrets)."""


class StoreConnectionError(StoreError):
    """The database could not be reached or opened (message free of secrets)."""


class RowsRejected(StoreError):
    """The database refused the rows of a write because of their values (out of a column's
    range, a constraint, text it cannot encode): the same rows fail again, other rows may
    pass. The message is the database's, one line, free of secrets and row values."""


# SQLSTATE classes of errors caused by the rows written: data exception, integrity
# constraint violation, program limit exceeded (e.g. an index row too large).
_ROW_ERROR_CLASSES = ("22", "23", "54")
# What binding a value the column or the driver cannot take raises on the client side.
_VALUE_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, OverflowError)
_SQLITE_ROW_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    *_VALUE_ERRORS,
)


@dataclass(frozen=True)
class WriteOutcome:
    """Rows written by one call: `inserted` new ones, `duplicates` already stored."""

    inserted: int
    duplicates: int


class DetectionStore(Protocol):
    """Where the sink writes per-frame results and dead letters, idempotently."""

    def stored_hashes(self, frame_ids: Sequence[str]) -> dict[str, str]:
        """Map each of `frame_ids` already stored to its stored `content_sha256`."""
        ...

    def write_results(self, results: Sequence[FrameResult], written_ns: int) -> WriteOutcome:
        """Insert one row per result in one transaction; existing frame_ids are skipped."""
        ...

    def write_dead_letters(self, letters: Sequence[DeadLetter], written_ns: int) -> WriteOutcome:
        """Insert dead letters in one transaction; existing (topic, partition, offset,
        stage) keys are skipped."""
        ...

    def count_results(self) -> int:
        """Number of rows in `detections`."""
        ...

    def count_dead_letters(self) -> int:
        """Number of rows in `dead_letters`."""
        ...

    def fetch_results(self) -> list[dict[str, Any]]:
        """Every `detections` row as a dict, detections parsed, ordered by frame_id."""
        ...

    def fetch_dead_letters(self) -> list[dict[str, Any]]:
        """Every `dead_letters` row as a dict, ordered by its key."""
        ...

    def close(self) -> None:
        """Release the connection; further calls are errors."""
        ...


def open_store(url: str | SinkUrl) -> DetectionStore:
    """Open (and create the tables of) the store at `url` (see `operators.sink_url`):
    `sqlite:///PATH` or `postgresql://...` / `postgres://...`. ValueError, with the URL's
    password masked, for a URL of neither form."""
    if isinstance(url, str):
        try:
            url = parse_sink_url(url)
        except ValueError as exc:
            # Without a scheme the text may be anything, a pasted password included.
            shown = repr(redact_url(url)) if "://" in url else "without a scheme"
            raise ValueError(f"unsupported store URL {shown}: {exc}") from None
    if url.path is not None:
        return SQLiteStore(url.path)
    return PostgresStore(url.url)


def _scrub(text: str, url: str) -> str:
    """`text` with the URL's passwords masked."""
    for secret in url_passwords(url):
        text = text.replace(secret, MASK)
    return text


def one_line(text: str) -> str:
    """`text` with its runs of whitespace, line breaks included, made single spaces."""
    return " ".join(text.split())


def _encodable(text: str) -> bool:
    """Whether `text` is valid UTF-8 text (a lone surrogate is not): others cannot be
    stored, so they are never looked up either."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def detection_to_json(detection: Detection) -> dict[str, Any]:
    """One detection as `{"box": [x1, y1, x2, y2], "label": str, "score": float}`."""
    return {
        "box": [_finite(v) for v in detection.box],
        "label": str(detection.label),
        "score": _finite(detection.score),
    }


def result_to_json(result: FrameResult) -> dict[str, Any]:
    """A result as the JSON-able row of `detections` (every column but `written_ns`);
    also the value published on the detections topic."""
    meta = result.meta
    return {
        "frame_id": meta.frame_id,
        "job_id": meta.job_id,
        "camera": meta.camera,
        "seq": None if meta.seq is None else int(meta.seq),
        "source_topic": meta.topic,
        "source_partition": int(meta.partition),
        "source_offset": int(meta.offset),
        "capture_ns": int(meta.capture_ns),
        "ingest_ns": int(meta.ingest_ns),
        "inferred_ns": int(result.inferred_ns),
        "content_sha256": meta.content_sha256,
        "width": int(meta.width),
        "height": int(meta.height),
        "model_name": result.model_name,
        "model_version": result.model_version,
        "device": result.device,
        "batch_size": int(result.batch_size),
        "detection_count": len(result.detections),
        "detections": [detection_to_json(d) for d in result.detections],
    }


def detections_from_json(value: str | bytes | Sequence[Any]) -> tuple[Detection, ...]:
    """Detections back from their JSON text or parsed list (null numbers become NaN)."""
    items = json.loads(value) if isinstance(value, str | bytes) else value

    def number(raw: Any) -> float:
        return math.nan if raw is None else float(raw)

    detections = []
    for item in items:
        x1, y1, x2, y2 = (number(v) for v in item["box"])
        detections.append(
            Detection(box=(x1, y1, x2, y2), label=str(item["label"]), score=number(item["score"]))
        )
    return tuple(detections)


def dead_letter_row(letter: DeadLetter, written_ns: int) -> dict[str, Any]:
    """A dead letter as its `dead_letters` row: payload reduced to length and SHA-256."""
    payload = letter.payload
    return {
        "source_topic": letter.topic,
        "source_partition": int(letter.partition),
        "source_offset": int(letter.offset),
        "stage": letter.stage,
        "reason": letter.reason,
        "detail": letter.detail[:DETAIL_MAX_CHARS],
        "frame_id": letter.frame_id,
        "job_id": letter.job_id,
        "payload_bytes": None if payload is None else len(payload),
        "payload_sha256": None if payload is None else hashlib.sha256(payload).hexdigest(),
        "written_ns": int(written_ns),
    }


def _result_rows(results: Sequence[FrameResult], written_ns: int) -> list[dict[str, Any]]:
    """Rows of `detections` in frame_id order."""
    rows = []
    for result in results:
        row = result_to_json(result)
        row["written_ns"] = int(written_ns)
        rows.append(row)
    rows.sort(key=lambda row: row["frame_id"])
    return rows


def _dead_letter_rows(letters: Sequence[DeadLetter], written_ns: int) -> list[dict[str, Any]]:
    """Rows of `dead_letters` in key order."""
    rows = [dead_letter_row(letter, written_ns) for letter in letters]
    rows.sort(key=lambda row: tuple(row[column] for column in DEAD_LETTER_KEY))
    return rows


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


DEFAULT_DIRECTORY = ".streamsight"
"""The one directory a SQLite store creates when it is missing (the default sink's)."""


def _ensure_directory(file: Path) -> None:
    """Make sure the directory of `file` exists: the default `.streamsight/` is created
    when its parent exists; any other missing directory raises `StoreConnectionError`."""
    directory = file.parent
    if directory.is_dir():
        return
    problem = "is not a directory" if directory.exists() else "does not exist"
    if not directory.exists() and directory.name == DEFAULT_DIRECTORY and directory.parent.is_dir():
        try:
            directory.mkdir(exist_ok=True)  # workers opening the store at once race here
            return
        except OSError as exc:
            problem = f"cannot be created ({exc.strerror})"
    raise StoreConnectionError(
        f"cannot open SQLite store {str(file)!r}: directory {str(directory)!r} {problem}"
        f" (create it first; only a missing {DEFAULT_DIRECTORY}/ is created)"
    )


class SQLiteStore:
    """A store in one SQLite file (WAL mode), safe to share between processes."""

    def __init__(self, path: str | Path) -> None:
        """Open `path` (creating the file, and the default `.streamsight/` directory) and
        create the tables; raises `StoreConnectionError`."""
        self.path = Path(path)
        in_memory = str(path) == ":memory:"
        if not in_memory:
            _ensure_directory(self.path)
        try:
            self._conn = sqlite3.connect(
                str(path),
                timeout=SQLITE_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreConnectionError(f"cannot open SQLite store {str(path)!r}: {exc}") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if not in_memory:
                self._retry_locked(lambda: self._conn.execute("PRAGMA journal_mode = WAL"))
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._retry_locked(
                lambda: self._transaction(lambda conn: [conn.execute(ddl) for ddl in SQLITE_SCHEMA])
            )
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreConnectionError(f"cannot open SQLite store {str(path)!r}: {exc}") from exc

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _retry_locked(step: Callable[[], T]) -> T:
        """Run `step`, repeating it while SQLite reports the file locked without waiting
        (switching a new file to WAL while other connections open it does that)."""
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        delay = 0.005
        while True:
            try:
                return step()
            except sqlite3.OperationalError as exc:
                locked = "locked" in str(exc) or "busy" in str(exc)
                if not locked or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn what SQLite raises into `RowsRejected` (caused by the rows) or `StoreError`."""
        try:
            yield
        except _SQLITE_ROW_ERRORS as exc:
            raise RowsRejected(
                one_line(f"SQLite rejected the rows: {type(exc).__name__}: {exc}")
            ) from None
        except sqlite3.Error as exc:
            raise StoreError(
                one_line(f"SQLite store {str(self.path)!r}: {type(exc).__name__}: {exc}")
            ) from None

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction (taking the write lock up front)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcome = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcome

    def _insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Insert `rows` skipping primary-key conflicts; returns how many were new."""
        statement = (
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) ON CONFLICT DO NOTHING"
        )

        def work(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(statement, rows)
            return conn.total_changes - before

        return self._retry_locked(lambda: self._transaction(work))

    def stored_hashes(self, frame_ids: Sequence[str]) -> dict[str, str]:
        """Map each of `frame_ids` already stored to its stored `content_sha256`."""
        found: dict[str, str] = {}
        unique = sorted({frame_id for frame_id in frame_ids if _encodable(frame_id)})
        with self._errors():
            for chunk in _chunks(unique, 500):
                marks = ", ".join("?" for _ in chunk)
                cursor = self._conn.execute(
                    f"SELECT frame_id, content_sha256 FROM detections WHERE frame_id IN ({marks})",
                    list(chunk),
                )
                found.update(cursor.fetchall())
        return found

    def write_results(self, results: Sequence[FrameResult], written_ns: int) -> WriteOutcome:
        """Insert one row per result in one transaction; existing frame_ids are skipped.
        Raises `RowsRejected` when a row's values cannot be stored (nothing is written)."""
        if not results:
            return WriteOutcome(0, 0)
        with self._errors():
            rows = [
                tuple(_dumps(row[c]) if c == "detections" else row[c] for c in RESULT_COLUMNS)
                for row in _result_rows(results, written_ns)
            ]
            inserted = self._insert("detections", RESULT_COLUMNS, rows)
        return WriteOutcome(inserted, len(rows) - inserted)

    def write_dead_letters(self, letters: Sequence[DeadLetter], written_ns: int) -> WriteOutcome:
        """Insert dead letters in one transaction; existing keys are skipped. Raises
        `RowsRejected` when a row's values cannot be stored (nothing is written)."""
        if not letters:
            return WriteOutcome(0, 0)
        with self._errors():
            rows = [
                tuple(row[c] for c in DEAD_LETTER_COLUMNS)
                for row in _dead_letter_rows(letters, written_ns)
            ]
            inserted = self._insert("dead_letters", DEAD_LETTER_COLUMNS, rows)
        return WriteOutcome(inserted, len(rows) - inserted)

    def _count(self, table: str) -> int:
        return int(self._conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def count_results(self) -> int:
        """Number of rows in `detections`."""
        return self._count("detections")

    def count_dead_letters(self) -> int:
        """Number of rows in `dead_letters`."""
        return self._count("dead_letters")

    def _fetch(self, table: str, columns: Sequence[str], order: str) -> list[dict[str, Any]]:
        cursor = self._conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def fetch_results(self) -> list[dict[str, Any]]:
        """Every `detections` row as a dict, detections parsed, ordered by frame_id."""
        rows = self._fetch("detections", RESULT_COLUMNS, "frame_id")
        for row in rows:
            row["detections"] = json.loads(row["detections"])
        return rows

    def fetch_dead_letters(self) -> list[dict[str, Any]]:
        """Every `dead_letters` row as a dict, ordered by its key."""
        return self._fetch("dead_letters", DEAD_LETTER_COLUMNS, ", ".join(DEAD_LETTER_KEY))

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()


def _pg_clean(value: Any) -> Any:
    """`value` with NUL characters replaced: PostgreSQL text and jsonb reject them."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_pg_clean(item) for item in value]
    if isinstance(value, dict):
        return {key: _pg_clean(item) for key, item in value.items()}
    return value


def _caused_by_rows(exc: psycopg.Error) -> bool:
    """Whether PostgreSQL (or psycopg, before sending) refused the rows' values."""
    if exc.sqlstate:
        return exc.sqlstate[:2] in _ROW_ERROR_CLASSES
    return isinstance(exc, psycopg.DataError)


class PostgresStore:
    """A store in a PostgreSQL database, one psycopg connection per store."""

    _RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

    def __init__(self, url: str) -> None:
        """Connect to `url` and create the tables; raises `StoreConnectionError`."""
        self._url = url
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        try:
            self._run(self._create_schema)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The store's URL with its password masked."""
        return redact_url(self._url)

    def _connect(self) -> psycopg.Connection[Any]:
        """The open connection, (re)connecting when there is none or it broke."""
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        try:
            options: dict[str, Any] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
            if "application_name=" not in self._url:
                options["application_name"] = APPLICATION_NAME
            self._conn = psycopg.connect(self._url, autocommit=False, **options)
        except psycopg.Error as exc:
            message = _scrub(str(exc), self._url)
            raise StoreConnectionError(
                one_line(
                    f"cannot connect to PostgreSQL at {self.url}: {type(exc).__name__}: {message}"
                )
            ) from None
        return self._conn

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `work` in one transaction and commit it. A broken connection is reopened
        once and a deadlock retried (every write is idempotent, so repeating it is safe);
        then errors caused by the rows raise `RowsRejected`, a lost connection
        `StoreConnectionError`, anything else `StoreError`."""
        attempts = 3
        for attempt in range(1, attempts + 1):
            conn = self._connect()
            try:
                outcome = work(conn)
                conn.commit()
                return outcome
            except self._RETRYABLE as exc:
                self._rollback(conn)
                if attempt == attempts:
                    raise StoreError(self._describe(exc)) from None
                log.warning("retrying a store transaction after %s", type(exc).__name__)
                time.sleep(0.05 * attempt)
            except psycopg.Error as exc:
                self._rollback(conn)
                if _caused_by_rows(exc):
                    raise RowsRejected(self._rejection(exc)) from None
                lost = conn.closed or conn.broken
                if lost and attempt < 2:
                    # Info only: when the server is down, the sink's retry warns for it.
                    log.info("PostgreSQL connection lost (%s); reconnecting", type(exc).__name__)
                    continue
                if lost or isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                    raise StoreConnectionError(self._describe(exc)) from None
                raise StoreError(self._describe(exc)) from None
            except _VALUE_ERRORS as exc:  # a value psycopg cannot send, e.g. a lone surrogate
                self._rollback(conn)
                raise RowsRejected(self._rejection(exc)) from None
            except BaseException:
                self._rollback(conn)
                raise
        raise AssertionError("unreachable")

    def _describe(self, exc: BaseException) -> str:
        sqlstate = getattr(exc, "sqlstate", None)
        state = f" [{sqlstate}]" if sqlstate else ""
        message = _scrub(str(exc), self._url)
        return one_line(f"PostgreSQL at {self.url}: {type(exc).__name__}{state}: {message}")

    def _rejection(self, exc: BaseException) -> str:
        """The server's primary message for rows it refused: its DETAIL, which quotes
        the failing row, is left out."""
        sqlstate = getattr(exc, "sqlstate", None)
        state = f" [{sqlstate}]" if sqlstate else ""
        message = str(exc)
        if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
            message = exc.diag.message_primary
        message = _scrub(message, self._url)
        return one_line(f"PostgreSQL rejected the rows: {type(exc).__name__}{state}: {message}")

    @staticmethod
    def _rollback(conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            log.debug("rollback failed", exc_info=True)

    @staticmethod
    def _create_schema(conn: psycopg.Connection[Any]) -> None:
        """Create the missing tables; with all present, needs no CREATE privilege."""
        present = conn.execute(
            "SELECT to_regclass('detections') IS NOT NULL"
            " AND to_regclass('detections_job_id') IS NOT NULL"
            " AND to_regclass('dead_letters') IS NOT NULL"
        ).fetchone()
        if present and present[0]:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
        for ddl in POSTGRES_SCHEMA:
            conn.execute(ddl)

    @staticmethod
    def _insert(
        conn: psycopg.Connection[Any],
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        returning: Sequence[str],
        jsonb_column: str | None = None,
    ) -> int:
        """Insert `rows` in multi-row statements skipping key conflicts; returns how many
        were new (counted by RETURNING)."""
        placeholder = sql.SQL("({})").format(
            sql.SQL(", ").join(
                sql.SQL("%s::jsonb") if column == jsonb_column else sql.SQL("%s")
                for column in columns
            )
        )
        inserted = 0
        for chunk in _chunks(rows, POSTGRES_ROWS_PER_STATEMENT):
            statement = sql.SQL(
                "INSERT INTO {table} ({columns}) VALUES {values} "
                "ON CONFLICT DO NOTHING RETURNING {returning}"
            ).format(
                table=sql.Identifier(table),
                columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
                values=sql.SQL(", ").join([placeholder] * len(chunk)),
                returning=sql.SQL(", ").join(map(sql.Identifier, returning)),
            )
            params = [value for row in chunk for value in row]
            cursor = conn.execute(statement, params)
            inserted += len(cursor.fetchall())
        return inserted

    def stored_hashes(self, frame_ids: Sequence[str]) -> dict[str, str]:
        """Map each of `frame_ids` already stored to its stored `content_sha256`."""
        originals = {
            _pg_clean(frame_id): frame_id for frame_id in frame_ids if _encodable(frame_id)
        }
        if not originals:
            return {}

        def work(conn: psycopg.Connection[Any]) -> dict[str, str]:
            cursor = conn.execute(
                "SELECT frame_id, content_sha256 FROM detections WHERE frame_id = ANY(%s)",
                (sorted(originals),),
            )
            return {originals[frame_id]: sha for frame_id, sha in cursor.fetchall()}

        return self._run(work)

    def write_results(self, results: Sequence[FrameResult], written_ns: int) -> WriteOutcome:
        """Insert one row per result in one transaction; existing frame_ids are skipped.
        Raises `RowsRejected` when a row's values cannot be stored (nothing is written)."""
        if not results:
            return WriteOutcome(0, 0)

        def work(conn: psycopg.Connection[Any]) -> int:
            # Rows are built inside the transaction so that a value that cannot be
            # converted is reported like one the server refuses.
            rows = []
            for row in _result_rows(results, written_ns):
                clean = _pg_clean(row)
                clean["detections"] = _dumps(clean["detections"])
                rows.append(tuple(clean[c] for c in RESULT_COLUMNS))
            return self._insert(
                conn, "detections", RESULT_COLUMNS, rows, ("frame_id",), "detections"
            )

        inserted = self._run(work)
        return WriteOutcome(inserted, len(results) - inserted)

    def write_dead_letters(self, letters: Sequence[DeadLetter], written_ns: int) -> WriteOutcome:
        """Insert dead letters in one transaction; existing keys are skipped. Raises
        `RowsRejected` when a row's values cannot be stored (nothing is written)."""
        if not letters:
            return WriteOutcome(0, 0)

        def work(conn: psycopg.Connection[Any]) -> int:
            rows = [
                tuple(_pg_clean(row[c]) for c in DEAD_LETTER_COLUMNS)
                for row in _dead_letter_rows(letters, written_ns)
            ]
            return self._insert(conn, "dead_letters", DEAD_LETTER_COLUMNS, rows, ("source_offset",))

        inserted = self._run(work)
        return WriteOutcome(inserted, len(letters) - inserted)

    def _count(self, table: str) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()
            return int(row[0]) if row else 0

        return self._run(work)

    def count_results(self) -> int:
        """Number of rows in `detections`."""
        return self._count("detections")

    def count_dead_letters(self) -> int:
        """Number of rows in `dead_letters`."""
        return self._count("dead_letters")

    def _fetch(self, table: str, columns: Sequence[str], order: str) -> list[dict[str, Any]]:
        statement = sql.SQL("SELECT {columns} FROM {table} ORDER BY {order}").format(
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            table=sql.Identifier(table),
            order=sql.SQL(order),
        )

        def work(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            rows = conn.execute(statement).fetchall()
            return [dict(zip(columns, row, strict=True)) for row in rows]

        return self._run(work)

    def fetch_results(self) -> list[dict[str, Any]]:
        """Every `detections` row as a dict, detections parsed, ordered by frame_id."""
        return self._fetch("detections", RESULT_COLUMNS, 'frame_id COLLATE "C"')

    def fetch_dead_letters(self) -> list[dict[str, Any]]:
        """Every `dead_letters` row as a dict, ordered by its key."""
        return self._fetch(
            "dead_letters",
            DEAD_LETTER_COLUMNS,
            'source_topic COLLATE "C", source_partition, source_offset, stage COLLATE "C"',
        )

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
