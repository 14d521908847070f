"""The publication ledger: what this node last published for each key (a WNM `data_id`), and the
claims that make one run at a time decide and record a key's publication.

The flows consult it to choose the link relation of a new notification (`wis2.relations`):
nothing recorded (or a deletion) gives ``canonical``, a different checksum ``update``, the same
checksum a redelivery (nothing new is announced). It records only publications the broker
acknowledged. Keys and extra fields are free-form: the metadata flow records WCMP2 record
identifiers the same way.

Where it lives (`ledger_location(settings)`, a string without secrets that flows pass to tasks):

- ``WIS2_LEDGER_URL`` unset: one SQLite database, ``publication-ledger.sqlite3`` in
  ``WIS2_RESULTS_DIR`` (the embedded default, zero set-up; one worker host). Indexed by key, WAL
  journal: a committed entry survives the process being killed. A JSON ledger of an earlier
  version (``publication-ledger.json`` beside it) is imported once.
- ``WIS2_LEDGER_URL=postgresql://user@host:5432/db``: a table ``publications`` in that PostgreSQL
  database (created on first use), shared by every worker host of the node
  (`chain.ledger_postgres`).

API (one interface, two implementations)::

    ledger = open_ledger(location)            # location: ledger_location(settings)
    ledger.get(key) -> LedgerEntry | None
    ledger.get_many(keys) -> {key: LedgerEntry}  # one query; keys never recorded are left out
    ledger.record(key, notification_id=..., rel=..., checksum=..., pubtime=..., **extra)
    ledger.record_many({key: LedgerEntry, ...})  # one transaction (a batch run's record)
    ledger.all(), ledger.forget(key)
    with ledger.claim(data_ids, timeout) as claim:  # held from the build to the ledger record
        ...
        if not claim.confirm(): ...           # before publishing: lost and taken again, read again

`claim` holds every given data_id for the whole node until the block exits: a second claim of any
of them (another thread, process or worker host) waits; a claim inside a claim of the same
thread takes only what that thread does not hold yet (a batch may claim all its data_ids, then
`publish_event` claims each event's again without waiting for itself). Keys are taken in one
global order (no deadlock between two claims of overlapping sets). A claim waiting longer than
`timeout` seconds (None: no limit) raises `ClaimTimeout` naming the data_id. A holder that dies
(even SIGKILL) releases its claims at once: SQLite ledger, byte-range locks of one file,
``<results dir>/claims.lock``, one open file per claim (released by the kernel); PostgreSQL
ledger, session advisory locks on a connection of the claim's own (released by the server when
the connection ends; TCP keepalives notice a dead host within about 30 s).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, closing, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from chain.ledger_entry import (
    SELECT_ENTRIES,
    Claim,
    ClaimLost,
    ClaimTimeout,
    LedgerEntry,
    LedgerUnavailable,
    claim_key,
    entries_of_rows,
    new_claims,
    ordered_claims,
)
from chain.ledger_postgres import PostgresLedger

if TYPE_CHECKING:
    from chain.settings import ChainSettings

__all__ = ["Claim", "ClaimLost", "ClaimTimeout", "Ledger", "LedgerEntry", "LedgerReader",
           "LedgerSnapshot", "LedgerUnavailable", "PostgresLedger", "SqliteLedger", "claim_key",
           "ledger_location", "open_ledger", "ordered_claims"]

log = logging.getLogger(__name__)

LEDGER_FILE = "publication-ledger.sqlite3"
LEGACY_FILE = "publication-ledger.json"  # the ledger of versions before 2026-11-29
BUSY_TIMEOUT_S = 60.0
_IN_CHUNK = 500  # keys per `IN (...)` query (SQLite's variable limit is 32766 since 3.32)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS publications (
    key TEXT PRIMARY KEY,
    checksum TEXT,
    notification_id TEXT NOT NULL,
    rel TEXT NOT NULL,
    pubtime TEXT,
    recorded_at TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS imports (source TEXT PRIMARY KEY, entries INTEGER NOT NULL);
"""
class Ledger(Protocol):
    """What every publication ledger offers (see the module docstring)."""

    location: str

    def get(self, key: str) -> LedgerEntry | None: ...

    def get_many(self, keys: Iterable[str]) -> dict[str, LedgerEntry]: ...

    def all(self) -> dict[str, LedgerEntry]: ...

    def record(self, key: str, *, notification_id: str, rel: str, checksum: str | None = None,
               pubtime: str | None = None, **extra: Any) -> LedgerEntry: ...

    def record_many(self, entries: Mapping[str, LedgerEntry]) -> int: ...

    def forget(self, key: str) -> bool: ...

    def claim(self, data_ids: Iterable[str], timeout: float | None
              ) -> AbstractContextManager[Claim]: ...


class LedgerReader(Protocol):
    """What choosing a relation reads: a ledger, or a `LedgerSnapshot` of it."""

    def get(self, key: str) -> LedgerEntry | None: ...


class LedgerSnapshot:
    """The entries of `keys`, read in one query (`Ledger.get_many`), answering `get` for those
    keys; any other key is read from the ledger. Valid while `keys` are claimed (`Ledger.claim`):
    no other run records them meanwhile."""

    def __init__(self, ledger: Ledger, keys: Iterable[str]) -> None:
        self.ledger = ledger
        self.keys = frozenset(keys)
        self.entries = ledger.get_many(self.keys)

    def get(self, key: str) -> LedgerEntry | None:
        return self.entries.get(key) if key in self.keys else self.ledger.get(key)


@contextmanager
def sqlite_transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to the SQLite database `path` (in WAL mode) in a write transaction
    (``BEGIN IMMEDIATE``), committed on success, rolled back on error."""
    with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: safe when killed, not on power loss
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def prepare_sqlite(path: Path, setup: Callable[[sqlite3.Connection], None]) -> None:
    """The SQLite database `path` in WAL mode (persistent: stored in the file), then
    `setup(conn)` (its schema...), under a file lock shared with the other processes: concurrent
    first connections would otherwise fail with 'database is locked' (switching to WAL does not
    wait for the busy timeout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".init-lock")
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            setup(conn)


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def ledger_location(settings: ChainSettings) -> str:
    """Where the node's ledger lives: WIS2_LEDGER_URL, else the SQLite file of WIS2_RESULTS_DIR."""
    if settings.ledger_url:
        return settings.ledger_url
    return str(Path(settings.results_dir).expanduser().resolve() / LEDGER_FILE)


@lru_cache(maxsize=16)
def open_ledger(location: str) -> Ledger:
    """The ledger at `location` (a PostgreSQL URL, else an SQLite file path); one per process."""
    if is_postgres_url(location):
        from chain.settings import ChainSettings

        return PostgresLedger(location, retry_seconds=ChainSettings().ledger_retry_seconds)
    return SqliteLedger(location)


class SqliteLedger:
    """A publication ledger stored in one SQLite database (created on first use)."""

    _ready: set[Path] = set()
    _ready_lock = threading.Lock()

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    @classmethod
    def in_dir(cls, directory: Path | str) -> SqliteLedger:
        """The ledger of a results directory."""
        return cls(Path(directory) / LEDGER_FILE)

    def _prepare(self) -> None:
        """Journal mode, schema and legacy import: once per process (`prepare_sqlite`)."""
        with self._ready_lock:
            if self.path in self._ready:
                return

            def setup(conn: sqlite3.Connection) -> None:
                conn.executescript(_SCHEMA)
                self._import_legacy(conn)

            prepare_sqlite(self.path, setup)
            self._ready.add(self.path)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction (committed on success, rolled back on error)."""
        self._prepare()
        with sqlite_transaction(self.path) as conn:
            yield conn

    def _import_legacy(self, conn: sqlite3.Connection) -> None:
        legacy = self.path.with_name(LEGACY_FILE)
        if not legacy.is_file():
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM imports WHERE source = ?",
                            (str(legacy),)).fetchone() is None:
                data = json.loads(legacy.read_text(encoding="utf-8") or "{}")
                if not isinstance(data, dict):
                    raise ValueError(f"publication ledger {legacy} must hold a JSON object")
                for key, raw in data.items():
                    _upsert(conn, key, LedgerEntry.model_validate(raw))
                conn.execute("INSERT INTO imports VALUES (?, ?)", (str(legacy), len(data)))
                log.info("imported %d entries of %s into %s", len(data), legacy, self.path)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads (no write lock: WAL readers never wait for a writer)."""
        self._prepare()
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)) as conn:
            yield conn

    def get(self, key: str) -> LedgerEntry | None:
        """The entry recorded for `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, LedgerEntry]:
        """The entries recorded for `keys` (those never recorded are left out), in one read."""
        wanted = sorted(set(keys))
        found: dict[str, LedgerEntry] = {}
        if not wanted:
            return found
        with self._reading() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start:start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))  # placeholders only: the keys are bound
                found.update(entries_of_rows(conn.execute(
                    SELECT_ENTRIES + f" WHERE key IN ({marks})", chunk)))
        return found

    def all(self) -> dict[str, LedgerEntry]:
        with self._connect() as conn:
            return entries_of_rows(conn.execute(SELECT_ENTRIES + " ORDER BY key").fetchall())

    def record(self, key: str, *, notification_id: str, rel: str, checksum: str | None = None,
               pubtime: str | None = None, **extra: Any) -> LedgerEntry:
        """Record (replace) the last publication for `key`; returns the stored entry."""
        entry = LedgerEntry(
            checksum=checksum, notification_id=notification_id, rel=rel, pubtime=pubtime, **extra
        )
        with self._connect() as conn:
            _upsert(conn, key, entry)
        log.debug("ledger %s: %s -> %s (%s)", self.path, key, notification_id, rel)
        return entry

    def record_many(self, entries: Mapping[str, LedgerEntry]) -> int:
        """Record (replace) several publications in one transaction; returns how many."""
        with self._connect() as conn:
            for key, entry in entries.items():
                _upsert(conn, key, entry)
        log.debug("ledger %s: %d entries recorded", self.path, len(entries))
        return len(entries)

    def forget(self, key: str) -> bool:
        """Remove `key`; True when it was there."""
        with self._connect() as conn:
            return conn.execute("DELETE FROM publications WHERE key = ?", (key,)).rowcount > 0

    @contextmanager
    def claim(self, data_ids: Iterable[str], timeout: float | None) -> Iterator[Claim]:
        """Hold `data_ids`: one byte-range lock per data_id (the byte its claim key names) in one
        file, ``claims.lock`` beside the database, all on the claim's own open file (`ByteLocks`):
        a claim of any number of data_ids holds one file descriptor."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with new_claims(self.location, data_ids) as todo:
            if not todo:
                yield Claim()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with ByteLocks(self.path.parent / CLAIMS_FILE) as locks:
                for key, data_id in todo:
                    locks.lock(key & CLAIM_OFFSET_MASK, deadline, data_id, timeout)
                yield Claim()


CLAIMS_FILE = "claims.lock"
# A claim key (signed 64-bit) as a byte offset a lock of one byte can start at (below 2**63 - 1)
CLAIM_OFFSET_MASK = (1 << 62) - 1


class _Flock(ctypes.Structure):
    """`struct flock` (fcntl(2)), off_t 64-bit."""

    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]


class ByteLocks:
    """Exclusive locks of single bytes of one file, on an open file description of their own
    (Linux open file description locks, `F_OFD_SETLK`): they exclude any other holder, another
    thread of this process as much as another process, and the kernel releases them all when
    the file is closed or the process dies (even SIGKILL). The file never grows (a lock may lie
    past its end), nothing is created or removed per lock, and a claim of any size holds one
    descriptor (a lock file per data_id took a worker running batches of 200 past the 1,024
    descriptors that `select()`, and so paho-mqtt's loop, can watch)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> ByteLocks:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # releases every lock of this holder

    def lock(self, offset: int, deadline: float | None, data_id: str,
             timeout: float | None) -> None:
        """Lock byte `offset`, waiting while another holder has it (`ClaimTimeout` naming
        `data_id` past `deadline`)."""
        request = bytes(_Flock(l_type=fcntl.F_WRLCK, l_whence=os.SEEK_SET, l_start=offset,
                               l_len=1, l_pid=0))
        pause = 0.01
        while True:
            try:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, request)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise ClaimTimeout(data_id, timeout) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _upsert(conn: sqlite3.Connection, key: str, entry: LedgerEntry) -> None:
    columns, extra = entry.columns()
    conn.execute(
        "INSERT INTO publications (key, checksum, notification_id, rel, pubtime, recorded_at, "
        "extra) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
        "checksum = excluded.checksum, notification_id = excluded.notification_id, "
        "rel = excluded.rel, pubtime = excluded.pubtime, recorded_at = excluded.recorded_at, "
        "extra = excluded.extra",
        (key, *columns, extra),
    )
