"""The `publish-notification` flow: one file-diffusion CloudEvent -> WIS2 notification(s) published.

Steps (each a Prefect task): load the dataset -> build the notifications (cached per event
identity) -> validate them strictly -> verify the data (optional) -> publish (cached per
notification id, retried) -> record them in the publication ledger. Every run leaves artifacts:
the published notification(s) and topic, the validation table, a link to the data; a failed run
leaves the error and the exact event JSON to fix and replay.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.artifacts import (
    artifact_key,
    data_link_artifacts,
    failure_artifact,
    notification_artifact,
)
from flows.ledger import Ledger
from flows.settings import ChainSettings
from flows.tasks import (
    PublishReceipt,
    configured_tasks,
    load_broker_connection,
    load_dataset_task,
    record_publication_task,
    validate_notifications_task,
)
from flows.wis2.cloudevent import CloudEvent, parse_event
from flows.wis2.errors import FieldError, InvalidInput

log = logging.getLogger(__name__)

DEPLOYMENT = "publish-notification/default"


class PublishedNotification(BaseModel):
    id: str
    data_id: str
    rel: str | None
    pubtime: str
    href: str | None
    sent: bool  # False: published by an earlier run (cached), not sent again


class PublishResult(BaseModel):
    """What a run published (also the flow's return value)."""

    event_id: str
    dataset: str
    topic: str
    verified: bool
    notifications: list[PublishedNotification]

    @property
    def ids(self) -> list[str]:
        return [n.id for n in self.notifications]


def as_event(event: CloudEvent | dict[str, Any] | str | bytes) -> CloudEvent:
    """The event as a model; `InvalidInput` naming the bad fields otherwise."""
    if isinstance(event, CloudEvent):
        return event
    return parse_event(event)


def event_json(event: Any) -> Any:
    """The event as the operator should see it (JSON data, as received when possible)."""
    if isinstance(event, BaseModel):
        return event.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(event, bytes | str):
        try:
            return json.loads(event)
        except ValueError:
            return event if isinstance(event, str) else event.decode("utf-8", "replace")
    return event


def file_label(event: Any) -> str:
    """A name for the run: the handled file (``IOPX01_LFVX_251403.BU``), else the event id."""
    try:
        return as_event(event).file_label()
    except Exception:
        raw = event_json(event)
        if isinstance(raw, dict) and raw.get("id"):
            return f"invalid-event-{raw['id']}"
        return "invalid-event"


def run_name() -> str:
    return file_label(flow_run.parameters.get("event"))


@flow(
    name="publish-notification",
    flow_run_name=run_name,
    validate_parameters=False,  # the flow parses the event itself to name the bad fields
    description="Turn one file-diffusion CloudEvent (STAC item) into WIS2 notification(s), "
    "validate and publish them.",
)
def publish_notification(event: CloudEvent, dataset: str | None = None) -> PublishResult:
    """Publish the WIS2 notification(s) announcing the file(s) of `event`.

    Args:
        event: the CloudEvent announcing the file (its `data` is a STAC 1.1 item).
        dataset: name of the dataset (Wis2Dataset block or data/datasets/<name>.json);
            default: WIS2_DEFAULT_DATASET.
    """
    settings = ChainSettings()
    logger = get_run_logger()
    label = file_label(event)
    try:
        return _publish(event, dataset or settings.default_dataset, settings, label)
    except Exception as exc:
        errors = exc.errors if isinstance(exc, InvalidInput) else []
        logger.error("publication of %s failed: %s", label, exc)
        failure_artifact(
            key=artifact_key("failed", label),
            error=exc,
            event=event_json(event),
            field_errors=errors,
            deployment=DEPLOYMENT,
        )
        raise


def _publish(
    raw_event: Any, dataset_name: str, settings: ChainSettings, label: str
) -> PublishResult:
    logger = get_run_logger()
    event = as_event(raw_event)
    dataset = load_dataset_task(dataset_name, settings.datasets_dir)
    tasks = configured_tasks(settings)
    ledger_path = str(Ledger.in_dir(settings.results_dir).path)

    notifications = tasks.build(event, dataset, ledger_path)
    if not notifications:
        raise InvalidInput(
            [FieldError(path="$.data.assets", message="no data asset to announce")], what="event"
        )
    validate_notifications_task(notifications, dataset.topic, artifact_key("validation", label))

    if settings.verify_data:
        tasks.verify(notifications, settings.verify_timeout)
    else:
        logger.info("data verification is off (WIS2_VERIFY_DATA=false)")

    connection, origin = load_broker_connection(settings)
    logger.info("publishing on %s via %s (%s)", dataset.topic, connection.describe(), origin)
    sent: list[bool] = []
    for note in notifications:
        state = tasks.publish(note, dataset.topic, connection, return_state=True)
        receipt: PublishReceipt = state.result()  # raises the publish error after retries
        sent.append(state.name != "Cached")
        logger.info("notification %s: %s", receipt.notification_id,
                    "sent" if sent[-1] else "already published (cached)")

    fresh = [note for note, was_sent in zip(notifications, sent, strict=True) if was_sent]
    if fresh:
        record_publication_task(fresh, ledger_path)

    notification_artifact(
        dataset.topic, notifications, key=artifact_key("wnm", label), published=sent
    )
    data_link_artifacts(notifications, key=artifact_key("data", label))
    return PublishResult(
        event_id=event.id,
        dataset=dataset.name,
        topic=dataset.topic,
        verified=settings.verify_data,
        notifications=[
            PublishedNotification(
                id=note.id,
                data_id=note.properties.data_id,
                rel=note.rel,
                pubtime=note.properties.pubtime,
                href=next((lk.href for lk in note.links if lk.rel == note.rel), None),
                sent=was_sent,
            )
            for note, was_sent in zip(notifications, sent, strict=True)
        ],
    )
