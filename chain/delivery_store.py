"""Delivery records beside the publication ledger: for each notification this node published, the
exact message, which Global Broker relayed it and when, which Global Cache republished it, the
Catalogue's reports, its redeliveries and its state (`wis2.delivery`).

Where they live follows the ledger (`chain.ledger.ledger_location`): an SQLite database
``delivery-records.sqlite3`` beside ``publication-ledger.sqlite3`` in ``WIS2_RESULTS_DIR``, or
two tables (``deliveries``, ``delivery_events``) in the ledger's PostgreSQL database
(``WIS2_LEDGER_URL``) on a node with several hosts. Written by the delivery monitor
(`delivery/`), read by the daily report flow and ``wis2-chain delivery status``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from chain.ledger import is_postgres_url, prepare_sqlite, sqlite_transaction
from chain.ledger_postgres import PostgresLedger
from wis2.delivery import (
    CACHE_AWAITED,
    CACHE_NOT_EXPECTED,
    PENDING,
    RELAYED,
    DeliveryReport,
    summarize,
)

RECORDS_FILE = "delivery-records.sqlite3"
_SCHEMA_LOCK = 0x77697332_64656C76  # advisory lock of the tables' creation ("wis2delv")
EARLY_SECONDS = 3600.0  # how long an early message (matching no record yet) is kept
MAX_EARLY = 10000  # early messages kept at most
T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS deliveries (
    notification_id TEXT PRIMARY KEY,
    data_id TEXT NOT NULL,
    metadata_id TEXT,
    pubtime TEXT NOT NULL,
    topic TEXT NOT NULL,
    dataset TEXT NOT NULL,
    payload TEXT NOT NULL,
    published_at TEXT NOT NULL,
    last_sent_at TEXT NOT NULL,
    state TEXT NOT NULL,
    cache_state TEXT NOT NULL,
    redeliveries INTEGER NOT NULL DEFAULT 0,
    undelivered_at TEXT
)""",
    "CREATE INDEX IF NOT EXISTS deliveries_data_id ON deliveries (data_id, pubtime)",
    "CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state, published_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_published ON deliveries (published_at)",
    """CREATE TABLE IF NOT EXISTS delivery_events (
    notification_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    delay_s DOUBLE PRECISION,
    detail TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (notification_id, kind, source)
)""",
    # what a Global Broker delivered before the node's own copy of the notification it
    # matches (`DeliveryStore.keep_early`): kept across a restart, for `EARLY_SECONDS` at most
    """CREATE TABLE IF NOT EXISTS delivery_early (
    kind TEXT NOT NULL,
    match_key TEXT NOT NULL,
    source TEXT NOT NULL,
    topic TEXT NOT NULL,
    message TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (kind, match_key, source, topic)
)""",
    "CREATE INDEX IF NOT EXISTS delivery_early_seen ON delivery_early (seen_at)",
)
_RECORD_COLUMNS = ("notification_id", "data_id", "metadata_id", "pubtime", "topic", "dataset",
                   "payload", "published_at", "last_sent_at", "state", "cache_state",
                   "redeliveries", "undelivered_at")
_SELECT_RECORDS = ("SELECT notification_id, data_id, metadata_id, pubtime, topic, dataset, "
                   "payload, published_at, last_sent_at, state, cache_state, redeliveries, "
                   "undelivered_at FROM deliveries")
_INSERT_RECORD = ("INSERT INTO deliveries (notification_id, data_id, metadata_id, pubtime, "
                  "topic, dataset, payload, published_at, last_sent_at, state, cache_state, "
                  "redeliveries, undelivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT (notification_id) DO NOTHING RETURNING notification_id")
_EVENT_COLUMNS = ("notification_id", "kind", "source", "seen_at", "delay_s", "detail")
_SELECT_EVENTS = ("SELECT notification_id, kind, source, seen_at, delay_s, detail "
                  "FROM delivery_events WHERE notification_id IN ")
_INSERT_EVENT = ("INSERT INTO delivery_events (notification_id, kind, source, seen_at, delay_s, "
                 "detail) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (notification_id, kind, source) "
                 "DO NOTHING RETURNING notification_id")


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class DeliveryRecord(BaseModel):
    """One published notification and what became of it."""

    notification_id: str = Field(description="The notification's `id`")
    data_id: str
    metadata_id: str | None = None
    pubtime: str
    topic: str = Field(description="The origin topic it was published on")
    dataset: str = Field(description="The dataset (its metrics label)")
    payload: str = Field(description="The exact message published (resent as is)")
    published_at: str = Field(description="When the node's broker delivered it to the monitor")
    last_sent_at: str = Field(description="When it was last sent (published or redelivered)")
    state: str = Field(default=PENDING, description="pending, relayed or undelivered")
    cache_state: str = Field(default=CACHE_NOT_EXPECTED,
                             description="not-expected, awaited, cached or integrity-mismatch")
    redeliveries: int = 0
    undelivered_at: str | None = None


class EarlyMessage(BaseModel):
    """A relay (kind `relay`, matched by `id`), a Cache's copy (`cache`, by "data_id pubtime")
    or a Catalogue report (`report`, by metadata_id) received before the record it matches."""

    kind: str
    match_key: str
    source: str = Field(description="The Global Broker it came from")
    topic: str
    message: dict[str, Any]
    seen_at: str


_SELECT_EARLY = ("SELECT kind, match_key, source, topic, message, seen_at FROM delivery_early "
                 "ORDER BY seen_at")
_TAKE_EARLY = ("DELETE FROM delivery_early WHERE kind = ? AND match_key = ? "
               "RETURNING kind, match_key, source, topic, message, seen_at")


def _early_message(row: tuple[Any, ...]) -> EarlyMessage:
    """An `EarlyMessage` from a row of `_SELECT_EARLY` or `_TAKE_EARLY`."""
    kind, key, source, topic, message, seen_at = row
    return EarlyMessage(kind=kind, match_key=key, source=source, topic=topic,
                        message=json.loads(message), seen_at=seen_at)


class DeliveryEvent(BaseModel):
    """A relay by a Broker, a copy by a Cache, or a Catalogue report."""

    notification_id: str
    kind: str = Field(description="relay, cache or report")
    source: str = Field(description="The Broker's name, the Cache's global-cache, 'catalogue'")
    seen_at: str
    delay_s: float | None = Field(default=None, description="Seconds after the publication")
    detail: dict[str, Any] = Field(default_factory=dict)


def records_location(ledger_location: str) -> str:
    """The delivery records of a ledger: its PostgreSQL database, or a file beside it."""
    if is_postgres_url(ledger_location):
        return ledger_location
    return str(Path(ledger_location).with_name(RECORDS_FILE))


class DeliveryStore:
    """The delivery records (SQLite file or PostgreSQL URL: `records_location`)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._postgres = PostgresLedger(location) if is_postgres_url(location) else None
        self._ready = False
        self._init_lock = threading.Lock()

    # ---- plumbing: one SQL text for both databases (`?` placeholders) ----------------------
    def _prepare_sqlite(self) -> None:
        """WAL journal and tables, once per store object (`prepare_sqlite`: the monitor and a
        reader creating the file at once would otherwise see 'database is locked')."""
        with self._init_lock:
            if self._ready:
                return

            def setup(conn: sqlite3.Connection) -> None:
                conn.execute("BEGIN IMMEDIATE")
                for ddl in _SCHEMA:
                    conn.execute(ddl)
                conn.execute("COMMIT")

            prepare_sqlite(Path(self.location), setup)
            self._ready = True

    def _run(self, statements: Callable[[Callable[..., list[tuple[Any, ...]]]], T]) -> T:
        """`statements(execute)` in one transaction; `execute(sql, params)` returns the rows."""
        if self._postgres is None:
            self._prepare_sqlite()
            with sqlite_transaction(Path(self.location)) as conn:
                return statements(lambda sql, params=(): conn.execute(sql, params).fetchall())

        def on_postgres(conn: Any) -> T:
            with conn.transaction():
                if not self._ready:  # one creator at a time: CREATE ... IF NOT EXISTS races
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for ddl in _SCHEMA:
                        conn.execute(ddl)

                def execute(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
                    cursor = conn.execute(sql.replace("?", "%s"), params)
                    return cursor.fetchall() if cursor.description else []

                result = statements(execute)
            self._ready = True
            return result

        return self._postgres._run(on_postgres)

    # ---- writes ----------------------------------------------------------------------------
    def add(self, record: DeliveryRecord) -> bool:
        """Record a publication seen on the node's broker; False when already recorded (a
        redelivery of ours, or the node's broker resending after a reconnection)."""
        values = tuple(getattr(record, c) for c in _RECORD_COLUMNS)
        return bool(self._run(lambda execute: execute(_INSERT_RECORD, values)))

    def add_event(self, event: DeliveryEvent, *, state: str | None = None,
                  cache_state: str | None = None) -> bool:
        """Record an event (the first of each notification, kind and source is kept) and set
        the record's state / cache state; False when that event was already recorded."""

        def statements(execute: Callable[..., list[tuple[Any, ...]]]) -> bool:
            values = (event.notification_id, event.kind, event.source, event.seen_at,
                      event.delay_s, json.dumps(event.detail, sort_keys=True))
            new = execute(_INSERT_EVENT, values)
            if state is not None:
                execute("UPDATE deliveries SET state = ?, undelivered_at = NULL "
                        "WHERE notification_id = ?", (state, event.notification_id))
            if cache_state is not None:
                execute("UPDATE deliveries SET cache_state = ? WHERE notification_id = ? "
                        "AND cache_state <> 'integrity-mismatch'",
                        (cache_state, event.notification_id))
            return bool(new)

        return self._run(statements)

    def set_state(self, notification_id: str, state: str) -> None:
        self._run(lambda execute: execute(
            "UPDATE deliveries SET state = ? WHERE notification_id = ?", (state, notification_id)))

    def mark_sent_again(self, notification_id: str, at: str) -> None:
        self._run(lambda execute: execute(
            "UPDATE deliveries SET redeliveries = redeliveries + 1, last_sent_at = ? "
            "WHERE notification_id = ? AND state = ?", (at, notification_id, PENDING)))

    def watch_again(self, notification_id: str, at: str) -> None:
        """An operator sent it again (`wis2-chain delivery resend`): pending, redeliveries
        counted anew from `at`."""
        self._run(lambda execute: execute(
            "UPDATE deliveries SET state = ?, redeliveries = 0, last_sent_at = ?, "
            "undelivered_at = NULL WHERE notification_id = ? AND state <> ?",
            (PENDING, at, notification_id, RELAYED)))

    def mark_undelivered(self, notification_id: str, at: str) -> None:
        self._run(lambda execute: execute(
            "UPDATE deliveries SET state = 'undelivered', undelivered_at = ? "
            "WHERE notification_id = ? AND state = ?", (at, notification_id, PENDING)))

    def keep_early(self, early: EarlyMessage, now: datetime) -> bool:
        """Keep a message that matches no record yet (`take_early` hands it over when the record
        comes), after expiring those older than `EARLY_SECONDS`; False when `MAX_EARLY` are kept
        already (it is not kept)."""
        cutoff = (now - timedelta(seconds=EARLY_SECONDS)).isoformat(timespec="milliseconds")

        def statements(execute: Callable[..., list[tuple[Any, ...]]]) -> bool:
            execute("DELETE FROM delivery_early WHERE seen_at < ?", (cutoff,))
            if execute("SELECT COUNT(*) FROM delivery_early")[0][0] >= MAX_EARLY:
                return False
            execute("INSERT INTO delivery_early (kind, match_key, source, topic, message, "
                    "seen_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, match_key, source, "
                    "topic) DO NOTHING",
                    (early.kind, early.match_key, early.source, early.topic,
                     json.dumps(early.message, sort_keys=True), early.seen_at))
            return True

        return self._run(statements)

    def take_early(self, keys: list[tuple[str, str]]) -> list[EarlyMessage]:
        """The early messages of these (kind, match_key), removed from the store."""

        def statements(execute: Callable[..., list[tuple[Any, ...]]]) -> list[EarlyMessage]:
            found: list[EarlyMessage] = []
            for kind, key in keys:
                found += map(_early_message, execute(_TAKE_EARLY, (kind, key)))
            return sorted(found, key=lambda e: e.seen_at)

        return self._run(statements)

    def early(self) -> list[EarlyMessage]:
        """Every early message kept."""
        return list(map(_early_message, self._run(lambda execute: execute(_SELECT_EARLY))))

    # ---- reads -----------------------------------------------------------------------------
    def _records(self, where: str = "", params: tuple[Any, ...] = ()) -> list[DeliveryRecord]:
        rows = self._run(lambda execute: execute(
            f"{_SELECT_RECORDS} {where} ORDER BY published_at, notification_id", params))
        return [DeliveryRecord(**dict(zip(_RECORD_COLUMNS, row, strict=True))) for row in rows]

    def get(self, notification_id: str) -> DeliveryRecord | None:
        found = self._records("WHERE notification_id = ?", (notification_id,))
        return found[0] if found else None

    def pending(self) -> list[DeliveryRecord]:
        """Notifications no watched Broker relayed yet (and not given up)."""
        return self._records("WHERE state = ?", (PENDING,))

    def by_data_id(self, data_id: str, pubtime: str | None = None) -> list[DeliveryRecord]:
        if pubtime is None:
            return self._records("WHERE data_id = ?", (data_id,))
        return self._records("WHERE data_id = ? AND pubtime = ?", (data_id, pubtime))

    def latest_metadata(self, metadata_id: str) -> DeliveryRecord | None:
        found = self._records("WHERE metadata_id = ? AND topic LIKE ?",
                              (metadata_id, "%/metadata%"))
        return found[-1] if found else None

    def since(self, published_after: str, dataset: str | None = None) -> list[DeliveryRecord]:
        """Records published at or after `published_after` (ISO UTC), of one dataset or all."""
        if dataset is None:
            return self._records("WHERE published_at >= ?", (published_after,))
        return self._records("WHERE published_at >= ? AND dataset = ?",
                             (published_after, dataset))

    def not_relayed(self, broker: str, published_from: str, published_to: str
                    ) -> dict[tuple[str, str], int]:
        """{(topic, dataset): how many} of the records published between the two times (ISO
        UTC) that `broker` did not relay (0 for a topic and dataset it relayed everything of)."""
        rows = self._run(lambda execute: execute(
            "SELECT topic, dataset, SUM(CASE WHEN EXISTS (SELECT 1 FROM delivery_events e "
            "WHERE e.notification_id = d.notification_id AND e.kind = 'relay' "
            "AND e.source = ?) THEN 0 ELSE 1 END) FROM deliveries d WHERE published_at >= ? "
            "AND published_at <= ? GROUP BY topic, dataset",
            (broker, published_from, published_to)))
        return {(topic, dataset): int(count) for topic, dataset, count in rows}

    def events(self, notification_ids: list[str], kind: str | None = None
               ) -> list[DeliveryEvent]:
        """The events of these notifications (of one kind, or all)."""
        found: list[DeliveryEvent] = []
        for start in range(0, len(notification_ids), 500):
            chunk = notification_ids[start:start + 500]
            sql = _SELECT_EVENTS + "(" + ", ".join("?" * len(chunk)) + ")"
            params: tuple[Any, ...] = tuple(chunk)
            if kind is not None:
                sql += " AND kind = ?"
                params += (kind,)
            rows = self._run(lambda execute, s=sql, p=params: execute(
                s + " ORDER BY seen_at", p))
            found += [DeliveryEvent(**{**dict(zip(_EVENT_COLUMNS, row, strict=True)),
                                       "detail": json.loads(row[5] or "{}")}) for row in rows]
        return found


def initial_states(expects_cache: bool) -> tuple[str, str]:
    """(state, cache_state) of a new record."""
    return PENDING, CACHE_AWAITED if expects_cache else CACHE_NOT_EXPECTED


__all__ = ["RELAYED", "DeliveryEvent", "DeliveryRecord", "DeliveryStore", "EarlyMessage",
           "delivery_reports", "initial_states", "now_utc", "records_location"]


def delivery_reports(store: DeliveryStore, since: str) -> list[DeliveryReport]:
    """One report per dataset of the notifications published since `since` (ISO UTC)."""
    records = store.since(since)
    relays = store.events([r.notification_id for r in records], "relay")
    dataset_of = {r.notification_id: r.dataset for r in records}
    reports = []
    for dataset in sorted(set(dataset_of.values())):
        reports.append(summarize(
            dataset, [r.model_dump() for r in records if r.dataset == dataset],
            [e.model_dump() for e in relays
             if dataset_of.get(e.notification_id) == dataset and e.delay_s is not None]))
    return reports
