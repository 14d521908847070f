"""Tasks: build the WIS2 notifications of one event (cached: one event -> one set of messages)
and the notification of one discovery metadata record (cached per flow run).

The link relation of a data notification comes from the event and from the publication ledger: a
file whose ``data_id`` was already published with a different checksum is announced with
``rel=update``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE
from prefect.logging import get_run_logger

from chain.ledger import LedgerReader, open_ledger
from wis2.cloudevent import CloudEvent
from wis2.dataset import DatasetDescription
from wis2.mapping import build_notifications
from wis2.metadata_notification import build_metadata_notification
from wis2.notification import Notification
from wis2.relations import relation_for

from .caching import BUILD_CACHE


def checksum_of(notification: Notification) -> str | None:
    """The ledger's checksum of a notification: ``<method>:<base64 digest>``."""
    integrity = notification.properties.integrity
    return f"{integrity.method}:{integrity.value}" if integrity else None


def notifications_for(
    event: CloudEvent, dataset: DatasetDescription, ledger: LedgerReader, pubtime: datetime
) -> list[Notification]:
    """Notifications for the event, with ``rel=update`` where the ledger says the file changed."""
    built = build_notifications(event, dataset, pubtime=pubtime)
    needs_update = [
        note.rel == "canonical"
        and relation_for("create", ledger.get(note.properties.data_id), checksum_of(note))
        == "update"
        for note in built
    ]
    if not any(needs_update):
        return built
    updates = build_notifications(event, dataset, operation="update", pubtime=pubtime)
    return [
        update if flag else note
        for note, update, flag in zip(built, updates, needs_update, strict=True)
    ]


@task(name="build-notifications", cache_policy=BUILD_CACHE, persist_result=True, retries=0)
def build_notifications_task(
    event: CloudEvent, dataset: DatasetDescription, ledger: str
) -> list[Notification]:
    """Build (once per event identity) the notifications announcing the event's data files.
    `ledger`: the ledger's location (`chain.ledger.ledger_location`)."""
    notifications = notifications_for(
        event, dataset, open_ledger(ledger), pubtime=datetime.now(UTC)
    )
    logger = get_run_logger()
    for note in notifications:
        logger.info(
            "built notification %s for %s (rel=%s)", note.id, note.properties.data_id, note.rel
        )
    return notifications


@task(
    name="build-metadata-notification",
    cache_policy=INPUTS + TASK_SOURCE + RUN_ID,
    persist_result=True,
)
def build_metadata_notification_task(
    record: dict[str, Any], served: bytes | None, href: str, rel: str
) -> Notification:
    """The notification (cached per flow run: a retried run publishes the same message)."""
    return build_metadata_notification(record, served, href=href, rel=rel)  # type: ignore[arg-type]
