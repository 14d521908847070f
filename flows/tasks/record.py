"""Task: record what was published in the publication ledger (for later relation decisions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from chain.ledger import open_ledger
from wis2.notification import Notification

from .build import checksum_of, not_cached
from .publish import puback_extra


@task(name="record-publication", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def record_publication_task(
    notifications: list[Notification], ledger: str, details: dict[str, Any] | None = None,
    acked: Mapping[str, str] | None = None,
) -> int:
    """Record each notification against its data_id (with `details`, extra fields of the entry:
    what the metadata flow needs to republish a record); returns how many were recorded.
    `ledger`: the ledger's location (`chain.ledger.ledger_location`); `acked`: {notification
    id: the time of its PUBACK} (`BrokerReceipt.published_at`), kept as `puback_at`."""
    for note in notifications:
        open_ledger(ledger).record(
            note.properties.data_id,
            notification_id=note.id,
            rel=note.rel or "canonical",
            checksum=checksum_of(note),
            pubtime=note.properties.pubtime,
            **not_cached(note),
            **puback_extra((acked or {}).get(note.id)),
            **(details or {}),
        )
    return len(notifications)
