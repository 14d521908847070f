"""Tasks: build the WIS2 notifications of one event (cached: one event -> one set of messages)
and the notification of one discovery metadata record (cached per flow run).

The link relation of a data notification comes from the event and from the publication ledger: a
file whose ``data_id`` was already published with a different checksum is announced with
``rel=update``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE
from prefect.logging import get_run_logger

from chain.ledger import LedgerReader, open_ledger
from wis2.cloudevent import CloudEvent
from wis2.dataset import DatasetDescription
from wis2.mapping import build_notifications, data_assets
from wis2.metadata_notification import build_metadata_notification
from wis2.multihash import integrity_of
from wis2.notification import MAX_INLINE_CONTENT_CHARS, Notification
from wis2.relations import DATA_RELATIONS, relation_for

from .caching import BUILD_CACHE
from .verify import fetch_small_file

log = logging.getLogger(__name__)


def checksum_of(notification: Notification) -> str | None:
    """The ledger's checksum of a notification: ``<method>:<base64 digest>``."""
    integrity = notification.properties.integrity
    return f"{integrity.method}:{integrity.value}" if integrity else None


def not_cached(notification: Notification) -> dict[str, Any]:
    """The ledger entry's ``cache: false`` extra field for a notification Global Caches must
    not cache (``{}`` otherwise): what a delivery check or a redelivery of the entry needs to
    know without the message (no cache copy expected)."""
    return {"cache": False} if notification.properties.cache is False else {}


def small_contents(
    event: CloudEvent, dataset: DatasetDescription, timeout: float = 30.0
) -> dict[str, bytes]:
    """{asset key: bytes} of the event's data files small enough to be inlined (announced
    ``file:size`` at most 4096 bytes), for a core dataset with `inline_content`; a file that
    cannot be fetched or does not match its announced size and checksum is left out (announced
    by its link only; the verification step reports a mismatch)."""
    if (not dataset.inline_content or dataset.data_policy != "core"
            or event.operation == "delete"):
        return {}
    small = [(key, asset) for key, asset in data_assets(event.data, dataset)
             if asset.file_size is not None and asset.file_size <= MAX_INLINE_CONTENT_CHARS
             and dataset.href_refusal(asset.href) is None]  # a refused file: never fetched
    out: dict[str, bytes] = {}
    if not small:
        return out
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for key, asset in small:
            try:
                data = fetch_small_file(client, asset.href, asset.file_size or 0)
            except httpx.HTTPError as exc:
                log.warning("%s not inlined: %s", asset.href, exc)
                continue
            expected = asset.integrity
            if data is None or (expected is not None and integrity_of(
                    data, expected.method).value != expected.value):
                log.warning("%s not inlined: not the announced size and checksum", asset.href)
                continue
            out[key] = data
    return out


def notifications_for(
    event: CloudEvent, dataset: DatasetDescription, ledger: LedgerReader, pubtime: datetime,
    contents: dict[str, bytes] | None = None,
) -> list[Notification]:
    """Notifications for the event, with ``rel=update`` where the ledger says the file changed;
    `contents`: the bytes of small files to inline (`small_contents`)."""
    built = build_notifications(event, dataset, pubtime=pubtime, contents=contents)
    needs_update = [
        note.rel == "canonical"
        and relation_for("create", ledger.get(note.properties.data_id), checksum_of(note))
        == "update"
        for note in built
    ]
    if not any(needs_update):
        return built
    updates = build_notifications(event, dataset, operation="update", pubtime=pubtime,
                                  contents=contents)
    return [
        update if flag else note
        for note, update, flag in zip(built, updates, needs_update, strict=True)
    ]


def outdated(event: CloudEvent, notifications: list[Notification],
             ledger: LedgerReader) -> list[str]:
    """The data_ids whose link relation in `notifications` (the event's build, maybe cached by
    an earlier run of the event) the ledger now contradicts: another event recorded a new
    version, or a deletion, of the file since they were built (`notifications_for` would
    decide otherwise now). Only a create's relation comes from the ledger."""
    if event.operation != "create":
        return []
    return [note.properties.data_id for note in notifications
            if note.rel in DATA_RELATIONS and (note.rel == "update") != (relation_for(
                "create", ledger.get(note.properties.data_id), checksum_of(note)) == "update")]


def current_build(
    event: CloudEvent, dataset: DatasetDescription, notifications: list[Notification],
    ledger: LedgerReader, announced: Callable[[Notification], bool],
) -> list[Notification] | None:
    """None when `notifications` (the event's build, maybe cached: a rerun, a redelivery) still
    hold against the ledger (read under the claim of their data_ids). Otherwise the event's
    notifications built again against it, for the caller to cache and use instead: a
    notification not announced yet announces its file as the ledger now requires; one already
    announced (`announced`: the broker acknowledged it) is kept as it was, so that a rerun
    sends the same message id again, never a second one."""
    stale = outdated(event, notifications, ledger)
    if not stale or all(announced(note) for note in notifications
                        if note.properties.data_id in stale):
        return None
    again = notifications_for(event, dataset, ledger, pubtime=datetime.now(UTC),
                              contents=small_contents(event, dataset))
    kept = [old if announced(old) else new
            for old, new in zip(notifications, again, strict=True)]
    log.warning("event %s: built before another event recorded a new version of %s: built "
                "again against the ledger", event.id, ", ".join(stale))
    return kept


@task(name="build-notifications", cache_policy=BUILD_CACHE, persist_result=True, retries=0)
def build_notifications_task(
    event: CloudEvent, dataset: DatasetDescription, ledger: str
) -> list[Notification]:
    """Build (once per event identity) the notifications announcing the event's data files.
    `ledger`: the ledger's location (`chain.ledger.ledger_location`)."""
    notifications = notifications_for(
        event, dataset, open_ledger(ledger), pubtime=datetime.now(UTC),
        contents=small_contents(event, dataset),
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
