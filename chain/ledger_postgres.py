"""The publication ledger in PostgreSQL (``WIS2_LEDGER_URL``), shared by every worker host.

Same semantics and `LedgerEntry` model as the SQLite ledger (`chain.ledger`): a table
``publications`` indexed by key, created on first use. The URL carries no password: libpq's
standard ``PGPASSWORD``, ``PGPASSFILE`` / ``~/.pgpass`` or ``PGSERVICE`` supply it (so it never
appears in flow-run parameters or logs, which carry the URL). Each thread keeps one connection.
A lost connection, or a server that does not answer or is starting up, is retried with backoff
for up to `retry_seconds` (``WIS2_LEDGER_RETRY_SECONDS``; `chain.failures.ride_out`), a write as
well as a read (every write is an idempotent upsert); past that the operation raises
`LedgerUnavailable` naming WIS2_LEDGER_URL (an infrastructure failure: the run is scheduled again
later, `chain.failures`).

Claims (`claim`): session-level advisory locks ``pg_advisory_lock(<64-bit hash of data_id>)``,
taken in ascending key order on a connection dedicated to claims (one per thread, reused:
``pg_advisory_unlock_all()`` at the end of each claim). The
server also releases them when the connection dies: a SIGKILLed worker's claims are free at once;
TCP keepalives (client side and the session's ``tcp_keepalives_*``) notice a dead host within
about 30 s. The same holds for a holder whose server restarts: its locks are gone with its
connection and another run may take the files meanwhile. So the holder confirms its claim
before it publishes (`PgClaim.confirm`: its locks still granted to its own session, else taken
again on a new connection, and the caller reads the ledger again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict

from chain.failures import ride_out
from chain.ledger_entry import (
    SELECT_ENTRIES,
    Claim,
    ClaimTimeout,
    LedgerEntry,
    LedgerUnavailable,
    entries_of_rows,
    new_claims,
)

log = logging.getLogger(__name__)

DEFAULT_RETRY_SECONDS = 120.0  # ChainSettings.ledger_retry_seconds
CONNECT_TIMEOUT_S = 10
# a dead peer is noticed after idle + interval * count seconds of silence (10 + 5 * 4 = 30 s)
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 4}
_SCHEMA_LOCK = 0x77697332  # 'wis2': serializes the concurrent first uses of one database
_SCHEMA = """
CREATE TABLE IF NOT EXISTS publications (
    key TEXT PRIMARY KEY,
    checksum TEXT,
    notification_id TEXT NOT NULL,
    rel TEXT NOT NULL,
    pubtime TEXT,
    recorded_at TEXT NOT NULL,
    extra JSONB NOT NULL DEFAULT '{}'
)"""
_UPSERT = (
    "INSERT INTO publications (key, checksum, notification_id, rel, pubtime, recorded_at, extra) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb) ON CONFLICT (key) DO UPDATE SET "
    "checksum = excluded.checksum, notification_id = excluded.notification_id, "
    "rel = excluded.rel, pubtime = excluded.pubtime, recorded_at = excluded.recorded_at, "
    "extra = excluded.extra")

T = TypeVar("T")


def _connection_error(exc: BaseException) -> bool:
    """A failure of the connection or the server (retried), not of the statement: a lock wait
    past lock_timeout (a claim's timeout) is not one."""
    return (isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
            and not isinstance(exc, errors.LockNotAvailable))


class PostgresLedger:
    """A publication ledger in one PostgreSQL database (a table created on first use)."""

    def __init__(self, url: str, retry_seconds: float | None = None) -> None:
        # the URL appears in messages and flow-run parameters: never with a password
        if "password" in conninfo_to_dict(url):
            raise ValueError("WIS2_LEDGER_URL must not contain a password: set PGPASSWORD or "
                             "~/.pgpass (libpq) on each worker host")
        self.location = url
        self.retry_seconds = DEFAULT_RETRY_SECONDS if retry_seconds is None else retry_seconds
        self._local = threading.local()
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"PostgresLedger({self.location!r})"

    def _ride_out(self, operation: Callable[[], T], doing: str) -> T:
        """`operation()`, retried on connection errors for `retry_seconds`; then
        `LedgerUnavailable` naming WIS2_LEDGER_URL."""
        try:
            return ride_out(operation, seconds=self.retry_seconds,
                            what=f"publication ledger {self.location}",
                            retry_if=_connection_error)
        except psycopg.Error as exc:
            if not _connection_error(exc):
                raise
            raise LedgerUnavailable(
                f"publication ledger WIS2_LEDGER_URL={self.location}: {doing} failed for "
                f"{self.retry_seconds:g} s (WIS2_LEDGER_RETRY_SECONDS): {exc}".strip()) from exc

    def _open(self, *, purpose: str) -> psycopg.Connection[Any]:
        """A new autocommit connection (one attempt: the callers retry)."""
        conn = psycopg.connect(self.location, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name=f"wis2-chain {purpose}", **KEEPALIVES)
        try:
            if not self._schema_ready:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    conn.execute(_SCHEMA)
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, operation: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`operation` on this thread's connection; a lost one is opened again (ride_out)."""

        def attempt() -> T:
            conn = getattr(self._local, "conn", None)
            if conn is None or conn.closed or conn.broken:
                self._local.conn = None
                conn = self._local.conn = self._open(purpose="ledger")
            try:
                return operation(conn)
            except psycopg.OperationalError:
                if conn.broken or conn.closed:
                    conn.close()
                    self._local.conn = None
                raise

        return self._ride_out(attempt, "reading or writing")

    def get(self, key: str) -> LedgerEntry | None:
        """The entry recorded for `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, LedgerEntry]:
        """The entries recorded for `keys` (those never recorded are left out), in one query."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        return entries_of_rows(self._run(lambda c: c.execute(
            SELECT_ENTRIES + " WHERE key = ANY(%s)", (wanted,)).fetchall()))

    def all(self) -> dict[str, LedgerEntry]:
        return entries_of_rows(self._run(lambda c: c.execute(
            SELECT_ENTRIES + " ORDER BY key").fetchall()))

    def record(self, key: str, *, notification_id: str, rel: str, checksum: str | None = None,
               pubtime: str | None = None, **extra: Any) -> LedgerEntry:
        """Record (replace) the last publication for `key`; returns the stored entry."""
        entry = LedgerEntry(
            checksum=checksum, notification_id=notification_id, rel=rel, pubtime=pubtime, **extra
        )
        columns, extra_json = entry.columns()
        self._run(lambda c: c.execute(_UPSERT, (key, *columns, extra_json)))
        log.debug("ledger %s: %s -> %s (%s)", self.location, key, notification_id, rel)
        return entry

    def record_many(self, entries: Mapping[str, LedgerEntry]) -> int:
        """Record (replace) several publications in one transaction (all or none); returns
        how many."""
        rows = [(key, *columns, extra) for key, (columns, extra) in
                ((key, entry.columns()) for key, entry in entries.items())]
        if not rows:
            return 0

        def upsert(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(_UPSERT, rows)

        self._run(upsert)
        log.debug("ledger %s: %d entries recorded", self.location, len(rows))
        return len(rows)

    def forget(self, key: str) -> bool:
        """Remove `key`; True when it was there."""
        return self._run(lambda c: c.execute(
            "DELETE FROM publications WHERE key = %s", (key,)).rowcount > 0)

    def add_missing(self, entries: dict[str, LedgerEntry]) -> int:
        """Add the entries whose key is not recorded yet (an existing entry is kept: it is
        newer); returns how many were added. Moving a node's SQLite ledger here."""
        rows = [(key, *columns, extra) for key, (columns, extra) in
                ((key, entry.columns()) for key, entry in entries.items())]

        def insert(conn: psycopg.Connection[Any]) -> int:
            added = 0
            with conn.transaction(), conn.cursor() as cursor:
                for row in rows:
                    cursor.execute(
                        "INSERT INTO publications (key, checksum, notification_id, rel, pubtime, "
                        "recorded_at, extra) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb) "
                        "ON CONFLICT (key) DO NOTHING", row)
                    added += cursor.rowcount
            return added

        return self._run(insert)

    @contextmanager
    def claim(self, data_ids: Iterable[str], timeout: float | None) -> Iterator[Claim]:
        """Hold `data_ids` for the whole node (advisory locks on a connection of the claim's
        own, kept for the thread's next claim once its locks are released)."""
        with new_claims(self.location, data_ids) as todo:
            if not todo:
                yield Claim()
                return
            held = PgClaim(self, todo, timeout)
            try:
                held.take()
                yield held
            finally:
                held.release()

    def _claim_connection(self) -> psycopg.Connection[Any]:
        idle = getattr(self._local, "claim_conn", None)
        self._local.claim_conn = None
        if idle is not None and not idle.closed and not idle.broken:
            return idle
        conn = self._open(purpose="claim")
        # the server notices a dead client host too (user-settable GUCs)
        for name in ("idle", "interval", "count"):
            conn.execute(f"SET tcp_keepalives_{name} = {KEEPALIVES['keepalives_' + name]}")
        return conn

    def _keep_claim_connection(self, conn: psycopg.Connection[Any]) -> None:
        """Release every advisory lock of the session; keep the connection for the next claim
        (closed instead when anything is wrong: closing releases them too)."""
        try:
            conn.execute("SELECT pg_advisory_unlock_all()")
        except psycopg.Error:
            conn.close()
            return
        old = getattr(self._local, "claim_conn", None)
        if old is not None:
            old.close()
        self._local.claim_conn = conn


class PgClaim(Claim):
    """The advisory locks of one claim, on one connection (`PostgresLedger.claim`)."""

    def __init__(self, ledger: PostgresLedger, todo: list[tuple[int, str]],
                 timeout: float | None) -> None:
        self.ledger, self.todo, self.timeout = ledger, todo, timeout
        self.conn: psycopg.Connection[Any] | None = None

    def take(self) -> None:
        """Take every lock, in key order, on a working connection: a connection lost while
        taking them is replaced and the locks taken again (the server dropped those already
        taken); waiting for another holder is bounded by `timeout` in all (`ClaimTimeout`)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout

        def attempt() -> None:
            self._drop()
            conn = self.conn = self.ledger._claim_connection()
            left = 0 if deadline is None else max(deadline - time.monotonic(), 0.001)
            # 0: wait without limit; lock_timeout also bounds advisory lock waits
            conn.execute(f"SET lock_timeout = {int(left * 1000)}")
            for key, data_id in self.todo:
                try:
                    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
                except errors.LockNotAvailable:
                    raise ClaimTimeout(data_id, self.timeout) from None

        self.ledger._ride_out(attempt, f"claiming {self.todo[0][1]!r}")

    def confirm(self) -> bool:
        """True when this session still holds every lock of the claim (one query); otherwise
        (its connection died: the server released them) take them again and return False."""
        conn = self.conn
        if conn is not None and not conn.closed and not conn.broken:
            try:
                row = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid()").fetchone()
                if row is not None and int(row[0]) >= len(self.todo):
                    return True
            except psycopg.Error as exc:
                log.warning("publication ledger %s: the claim of %s was lost with its "
                            "connection (%s)", self.ledger.location, self.todo[0][1],
                            str(exc).strip())
        log.warning("publication ledger %s: claiming %d data_id(s) again (%s, ...) before "
                    "publishing", self.ledger.location, len(self.todo), self.todo[0][1])
        self.take()
        return False

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()  # a dead or half-claimed session: closing releases its locks
            self.conn = None

    def release(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            if conn.closed or conn.broken:
                conn.close()
            else:
                self.ledger._keep_claim_connection(conn)
