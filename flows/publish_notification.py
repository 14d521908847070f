"""The `publish-notification` flow: one file-diffusion CloudEvent -> WIS2 notification(s) published.

Steps (each a Prefect task): load the dataset -> build the notifications (cached per event
identity) -> validate them strictly -> verify the data (optional) -> publish (cached per
notification id, retried) -> record them in the publication ledger. Every run leaves artifacts:
the published notification(s) and topic, the validation table, a link to the data; a failed run
leaves the error and the exact event JSON to fix and replay.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State
from pydantic import BaseModel

from chain.deployments import PUBLISH_NOTIFICATION_FLOW
from chain.failures import UNAVAILABLE, is_infrastructure, unavailable_message
from chain.metrics import FLOW_METRICS
from chain.settings import ChainSettings
from flows.artifacts import (
    artifact_key,
    data_link_artifacts,
    failure_artifact,
    notification_artifact,
    validation_table_artifact,
)
from flows.pipeline import (
    NotificationOutcome,
    Pipeline,
    as_event,
    event_json,
    file_label,
    publish_event,
)
from wis2.cloudevent import CloudEvent
from wis2.errors import InvalidInput

log = logging.getLogger(__name__)

__all__ = [
    "NotificationOutcome",
    "NotificationRunResult",
    "as_event",
    "event_json",
    "file_label",
    "publish_notification",
]


class NotificationRunResult(BaseModel):
    """What a run published (also the flow's return value)."""

    event_id: str
    dataset: str
    topic: str
    verified: bool
    notifications: list[NotificationOutcome]

    @property
    def ids(self) -> list[str]:
        return [n.id for n in self.notifications]


def run_name() -> str:
    return file_label(flow_run.parameters.get("event"))


@flow(
    name=PUBLISH_NOTIFICATION_FLOW,
    flow_run_name=run_name,
    validate_parameters=False,  # the flow parses the event itself to name the bad fields
    description="Turn one file-diffusion CloudEvent (STAC item) into WIS2 notification(s), "
    "validate and publish them.",
)
def publish_notification(event: CloudEvent, dataset: str | None = None
                         ) -> NotificationRunResult | State:
    """Publish the WIS2 notification(s) announcing the file(s) of `event`.

    A failure of a service (`chain.failures`: ledger, result store, broker, Prefect API) ends
    the run in a Failed state named `Unavailable`, which the recovery schedules again; any other
    failure is the event's: raised, the run Failed for an operator.

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
        FLOW_METRICS.failure(exc)
        failure_artifact(
            key=artifact_key("failed", label),
            error=exc,
            received=event_json(event),
            field_errors=errors,
        )
        if is_infrastructure(exc):
            return Failed(name=UNAVAILABLE, data=exc, message=unavailable_message(exc))
        raise


def _publish(
    raw_event: Any, dataset_name: str, settings: ChainSettings, label: str
) -> NotificationRunResult:
    event = as_event(raw_event)
    pipeline = Pipeline.load(dataset_name, settings)
    done = publish_event(event, pipeline, validation_key=artifact_key("validation", label))
    topic = pipeline.dataset.topic
    notification_artifact(
        topic, done.notifications, key=artifact_key("wnm", label), published=done.sent
    )
    validation_table_artifact(done.validation_rows, key=artifact_key("validation", label),
                              ok=True)
    data_link_artifacts(done.notifications, key=artifact_key("data", label))
    return NotificationRunResult(
        event_id=event.id,
        dataset=pipeline.dataset.name,
        topic=topic,
        verified=settings.verify_data,
        notifications=done.published(),
    )
