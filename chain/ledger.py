"""The publication ledger: what this node last published for each key (a WNM `data_id`).

The flows consult it to choose the link relation of a new notification (`wis2.relations`):
nothing recorded (or a deletion) gives ``canonical``, a different checksum ``update``, the same
checksum a redelivery (nothing new is announced). Keys and extra fields are free-form: the
metadata flow records WCMP2 record identifiers the same way.

It is one SQLite database (``publication-ledger.sqlite3`` in the results directory), indexed by
key so that an archive of a million files costs the same per lookup as ten. WAL journal: a
committed entry survives the process being killed (a power cut may lose the last ones).
Concurrent flow runs of one host (threads or processes) share it safely. A ledger of an earlier
version (``publication-ledger.json`` beside it) is imported once, the first time the database is
opened.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

LEDGER_FILE = "publication-ledger.sqlite3"
LEGACY_FILE = "publication-ledger.json"  # the ledger of versions before 2026-11-29
BUSY_TIMEOUT_S = 60.0

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
_COLUMNS = ("checksum", "notification_id", "rel", "pubtime", "recorded_at")


class LedgerEntry(BaseModel):
    """The last publication recorded for one key."""

    model_config = ConfigDict(extra="allow")

    checksum: str | None = Field(
        default=None, description="Checksum of the published data, e.g. 'sha512:<base64>'"
    )
    notification_id: str = Field(description="`id` of the last notification published")
    rel: str = Field(description="Link relation of that notification: canonical/update/deletion")
    pubtime: str | None = None
    recorded_at: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )


class Ledger:
    """A publication ledger stored in one SQLite database (created on first use)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @classmethod
    def in_dir(cls, directory: Path | str) -> Ledger:
        """The ledger of a results directory."""
        return cls(Path(directory) / LEDGER_FILE)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction (committed on success, rolled back on error)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S,
                                     isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: safe when killed, not on power loss
            conn.executescript(_SCHEMA)
            self._import_legacy(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

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

    def get(self, key: str) -> LedgerEntry | None:
        """The entry recorded for `key`, or None."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT checksum, notification_id, rel, pubtime, recorded_at, extra "
                "FROM publications WHERE key = ?", (key,)).fetchone()
        return None if row is None else _entry(row)

    def all(self) -> dict[str, LedgerEntry]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT key, checksum, notification_id, rel, pubtime, recorded_at, extra "
                "FROM publications ORDER BY key").fetchall()
        return {row[0]: _entry(row[1:]) for row in rows}

    def record(
        self,
        key: str,
        *,
        notification_id: str,
        rel: str,
        checksum: str | None = None,
        pubtime: str | None = None,
        **extra: Any,
    ) -> LedgerEntry:
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


def _upsert(conn: sqlite3.Connection, key: str, entry: LedgerEntry) -> None:
    data = entry.model_dump(mode="json")
    extra = {k: v for k, v in data.items() if k not in _COLUMNS}
    conn.execute(
        "INSERT INTO publications (key, checksum, notification_id, rel, pubtime, recorded_at, "
        "extra) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
        "checksum = excluded.checksum, notification_id = excluded.notification_id, "
        "rel = excluded.rel, pubtime = excluded.pubtime, recorded_at = excluded.recorded_at, "
        "extra = excluded.extra",
        (key, *(data[c] for c in _COLUMNS), json.dumps(extra, sort_keys=True)),
    )


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    checksum, notification_id, rel, pubtime, recorded_at, extra = row
    return LedgerEntry(checksum=checksum, notification_id=notification_id, rel=rel,
                       pubtime=pubtime, recorded_at=recorded_at, **json.loads(extra or "{}"))
