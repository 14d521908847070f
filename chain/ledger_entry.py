"""The publication ledger's entry model, errors and claim keys, shared by its two
implementations (`chain.ledger`: SQLite, `chain.ledger_postgres`: PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

COLUMNS = ("checksum", "notification_id", "rel", "pubtime", "recorded_at")


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

    def columns(self) -> tuple[tuple[Any, ...], str]:
        """The stored columns (`COLUMNS` order) and the extra fields as JSON."""
        data = self.model_dump(mode="json")
        extra = {k: v for k, v in data.items() if k not in COLUMNS}
        return tuple(data[c] for c in COLUMNS), json.dumps(extra, sort_keys=True)


class ClaimTimeout(TimeoutError):
    """A data_id stayed claimed by another run for longer than the claim's timeout."""

    def __init__(self, data_id: str, timeout: float | None) -> None:
        self.data_id = data_id
        super().__init__(
            f"data_id {data_id!r} is being published by another run and was not released "
            f"within {timeout or 0:g} s (WIS2_CACHE_LOCK_TIMEOUT); run this event again later")


class LedgerUnavailable(RuntimeError):
    """The ledger's database cannot be reached (after retries)."""


class ClaimLost(RuntimeError):
    """A claim's locks died with their connection and what was decided under them no longer
    holds (another run recorded one of its files meanwhile): the run is retried as a whole."""


class Claim:
    """A held claim (`Ledger.claim`). `confirm()` before publishing: True when the claim has
    been held without a break since it was taken; False when its locks were lost (their
    connection died) and have been taken again: whatever was read from the ledger under the
    claim must be read again. A claim that cannot be taken again raises (`ClaimTimeout`,
    `LedgerUnavailable`). Lock files (SQLite ledger) cannot be lost: always True."""

    def confirm(self) -> bool:
        return True


def claim_key(data_id: str) -> int:
    """A data_id as a signed 64-bit integer (PostgreSQL advisory lock key; the byte a claim on
    a SQLite ledger locks)."""
    return int.from_bytes(hashlib.sha256(data_id.encode("utf-8")).digest()[:8], "big",
                          signed=True)


def ordered_claims(data_ids: Iterable[str]) -> list[tuple[int, str]]:
    """(key, first data_id of that key) in ascending key order, each key once: the order every
    claim takes its locks in (keys are 64-bit: two data_ids never share one in practice, so
    claims of different files never wait for each other)."""
    keys: dict[int, str] = {}
    for data_id in sorted(set(data_ids)):
        keys.setdefault(claim_key(data_id), data_id)
    return sorted(keys.items())


_HELD = threading.local()  # per thread: {ledger location: keys held by its claims}


@contextmanager
def new_claims(location: str, data_ids: Iterable[str]) -> Iterator[list[tuple[int, str]]]:
    """The keys of `ordered_claims` this thread does not hold yet (a claim inside a claim of the
    same thread, e.g. per event inside a claim of the whole batch, does not wait for itself);
    they count as held by this thread until the block exits."""
    held: dict[str, set[int]] = _HELD.__dict__.setdefault("by_location", {})
    mine = held.setdefault(location, set())
    todo = [(key, data_id) for key, data_id in ordered_claims(data_ids)
            if key not in mine]
    mine.update(key for key, _ in todo)
    try:
        yield todo
    finally:
        mine.difference_update(key for key, _ in todo)


# The entries of both ledgers' `publications` table, keyed: `entries_of_rows` reads its rows.
SELECT_ENTRIES = ("SELECT key, checksum, notification_id, rel, pubtime, recorded_at, extra "
                  "FROM publications")


def entries_of_rows(rows: Iterable[tuple[Any, ...]]) -> dict[str, LedgerEntry]:
    """{key: entry} from rows of `SELECT_ENTRIES`."""
    return {row[0]: entry_of_row(row[1:]) for row in rows}


def entry_of_row(row: tuple[Any, ...] | Any) -> LedgerEntry:
    """An entry from (checksum, notification_id, rel, pubtime, recorded_at, extra JSON)."""
    checksum, notification_id, rel, pubtime, recorded_at, extra = row
    if isinstance(extra, str):
        extra = json.loads(extra or "{}")
    return LedgerEntry(checksum=checksum, notification_id=notification_id, rel=rel,
                       pubtime=pubtime, recorded_at=recorded_at, **(extra or {}))
