"""The publication ledger in PostgreSQL (``WIS2_LEDGER_URL``), shared by every worker host.

Same semantics and `LedgerEntry` model as the SQLite ledger (`chain.ledger`): a table
``publications`` indexed by key, created on first use. The URL carries no password: libpq's
standard ``PGPASSWORD``, ``PGPASSFILE`` / ``~/.pgpass`` or ``PGSERVICE`` supply it (so it never
appears in flow-run parameters or logs, which carry the URL). Each thread keeps one connection;
a lost connection is reopened, and after `CONNECT_ATTEMPTS` failed attempts the operation raises
`LedgerUnavailable` naming WIS2_LEDGER_URL (never ignored: a publication whose record fails is
recorded by the rerun of its event).

Claims (`claim`): session-level advisory locks ``pg_advisory_lock(<64-bit hash of data_id>)``,
taken in ascending key order on a connection dedicated to claims (one per thread, reused:
``pg_advisory_unlock_all()`` at the end of each claim). The
server also releases them when the connection dies: a SIGKILLed worker's claims are free at once;
TCP keepalives (client side and the session's ``tcp_keepalives_*``) notice a dead host within
about 30 s.
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

from chain.ledger_entry import (
    SELECT_ENTRIES,
    ClaimTimeout,
    LedgerEntry,
    LedgerUnavailable,
    entries_of_rows,
    new_claims,
)

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 4  # about 7 s of retries (0.5, 1, 2 s apart) before LedgerUnavailable
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


class PostgresLedger:
    """A publication ledger in one PostgreSQL database (a table created on first use)."""

    def __init__(self, url: str) -> None:
        # the URL appears in messages and flow-run parameters: never with a password
        if "password" in conninfo_to_dict(url):
            raise ValueError("WIS2_LEDGER_URL must not contain a password: set PGPASSWORD or "
                             "~/.pgpass (libpq) on each worker host")
        self.location = url
        self._local = threading.local()
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"PostgresLedger({self.location!r})"

    def _open(self, *, purpose: str) -> psycopg.Connection[Any]:
        """A new autocommit connection (retried; `LedgerUnavailable` after the last attempt)."""
        delay = 0.5
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                conn = psycopg.connect(self.location, autocommit=True,
                                       connect_timeout=CONNECT_TIMEOUT_S,
                                       application_name=f"wis2-chain {purpose}", **KEEPALIVES)
                break
            except psycopg.OperationalError as exc:
                if attempt == CONNECT_ATTEMPTS:
                    raise LedgerUnavailable(
                        f"publication ledger WIS2_LEDGER_URL={self.location}: cannot "
                        f"connect after {attempt} attempts: {exc}".strip()) from exc
                log.warning("publication ledger %s: cannot connect (%s); retrying in %g s",
                            self.location, str(exc).strip(), delay)
                time.sleep(delay)
                delay *= 2
        if not self._schema_ready:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(_SCHEMA)
            self._schema_ready = True
        return conn

    def _run(self, operation: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`operation` on this thread's connection; a lost connection is reopened once."""
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            if conn is None or conn.closed:
                conn = self._local.conn = self._open(purpose="ledger")
            try:
                return operation(conn)
            except psycopg.OperationalError as exc:
                conn.close()
                self._local.conn = None
                if attempt == 2 or not conn.broken:
                    raise LedgerUnavailable(
                        f"publication ledger WIS2_LEDGER_URL={self.location}: "
                        f"{exc}".strip()) from exc
                log.warning("publication ledger %s: connection lost (%s); reconnecting",
                            self.location, str(exc).strip())
        raise AssertionError("unreachable")

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
    def claim(self, data_ids: Iterable[str], timeout: float | None) -> Iterator[None]:
        """Hold `data_ids` for the whole node (advisory locks on a connection of the claim's
        own, kept for the thread's next claim once its locks are released)."""
        with new_claims(self.location, data_ids) as todo:
            if not todo:
                yield
                return
            conn = self._claim_connection()
            try:
                # 0: wait without limit; lock_timeout also bounds advisory lock waits
                conn.execute(f"SET lock_timeout = {int((timeout or 0) * 1000)}")
                for key, data_id in todo:
                    try:
                        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
                    except errors.LockNotAvailable:
                        raise ClaimTimeout(data_id, timeout) from None
                    except psycopg.OperationalError as exc:
                        raise LedgerUnavailable(
                            f"publication ledger WIS2_LEDGER_URL={self.location}: claiming "
                            f"{data_id!r} failed: {exc}".strip()) from exc
                yield
            finally:
                self._release(conn)

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

    def _release(self, conn: psycopg.Connection[Any]) -> None:
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
