"""Task: validate each notification strictly (WNM schema + the checks pywis-pubsub skips).

A failure raises at once (never retried: the same message would fail again), after saving the
report as a table artifact so the operator sees which check failed. Without an artifact key (the
batch flow, which makes one table for the whole batch) no artifact is created here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from chain.ledger import LedgerReader
from flows.artifacts import validation_table_artifact
from wis2.notification import Notification
from wis2.validation import validate_notification


def previous_pubtimes(
    notifications: Iterable[Notification], ledger: LedgerReader,
    published: Callable[[Notification], bool] = lambda note: False,
) -> dict[str, str]:
    """{data_id: pubtime of the last notification this node published for it} for each update
    not published yet: WNM 1.3 wants an update later than the notification it updates (the
    validator's ``update-pubtime`` check). An update already acknowledged by the broker
    (`published`: e.g. its publish receipt is cached; a redelivered old event) is sent no more,
    so it is not compared."""
    out: dict[str, str] = {}
    for note in notifications:
        if note.rel != "update":
            continue
        entry = ledger.get(note.properties.data_id)
        if (entry is None or not entry.pubtime or entry.notification_id == note.id
                or published(note)):
            continue
        out[note.properties.data_id] = entry.pubtime
    return out


@task(name="validate-notifications", cache_policy=NO_CACHE, retries=0)
def validate_notifications_task(
    notifications: list[Notification], topic: str, artifact_key: str | None,
    previous: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Validate every notification; returns the report rows (one per check and message).
    `previous`: `previous_pubtimes` (an update must be later than what it updates).

    The validation table artifact (`artifact_key`) is created here only when a notification is
    invalid, before the run fails; the caller reports valid ones after the publication (an
    artifact is an API request: not on the way from the event to its notification)."""
    rows: list[dict[str, Any]] = []
    reports = []
    for note in notifications:
        report = validate_notification(
            note.to_dict(), topic=topic, profile="publish",
            previous_pubtime=(previous or {}).get(note.properties.data_id))
        reports.append(report)
        rows.extend({"notification": note.id, **row} for row in report.rows())
    ok = all(r.ok for r in reports)
    if artifact_key is not None and not ok:
        validation_table_artifact(rows, key=artifact_key, ok=False)
    logger = get_run_logger()
    for note, report in zip(notifications, reports, strict=True):
        if not report.ok:
            logger.error("notification %s is not valid", note.id)
            report.raise_for_failures()
    logger.info("%d notification(s) valid for %s", len(notifications), topic)
    return rows
