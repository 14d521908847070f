"""The `publish-batch` flow: several file-diffusion CloudEvents -> their WIS2 notifications.

The MQTT listener starts one run of it for a burst of events (see listener/service.py) instead
of one `publish-notification` run per event. The events go through the same steps as with the
per-event pipeline, all at once, in a constant number of task runs per batch run
(`flows.batch_pipeline`: build-batch, validate-batch, verify-batch, publish-batch, record-batch),
with the same per-event caches (build per event identity, publication per notification id). One
event failing never stops the others: the run ends Failed with one artifact listing each failed
event, its bad fields and its exact JSON to replay with `publish-notification`. An event already
published by an earlier run (a redelivery grouped into another batch, or a single run) publishes
nothing new: same notification id, not sent again, shown as "already published (cached)".
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from chain.deployments import PUBLISH_BATCH_FLOW, PUBLISH_NOTIFICATION, batch_run_name
from chain.failures import UNAVAILABLE, is_infrastructure
from chain.settings import ChainSettings
from flows.artifacts import artifact_key, batch_failure_artifact, batch_table_artifact
from flows.batch_pipeline import publish_events
from flows.pipeline import (
    NotificationOutcome,
    Pipeline,
    event_json,
    field_errors_of,
    file_label,
)
from wis2.cloudevent import CloudEvent
from wis2.validation import ValidationFailed

log = logging.getLogger(__name__)



class EventOutcome(BaseModel):
    """What happened to one event of the batch."""

    event_id: str | None
    label: str
    status: Literal["published", "cached", "failed"]  # cached: every notification published earlier
    notifications: list[NotificationOutcome] = []
    error: str | None = None


class BatchRunResult(BaseModel):
    """What a batch run did (the flow's return value, also when it ends Failed)."""

    dataset: str
    topic: str | None
    verified: bool
    events: list[EventOutcome]

    @property
    def failed(self) -> list[EventOutcome]:
        return [e for e in self.events if e.status == "failed"]

    @property
    def ids(self) -> list[str]:
        return [n.id for e in self.events for n in e.notifications]


def batch_label(events: Any) -> str:
    """``batch-<n>-events-<first file>``."""
    events = events if isinstance(events, list) else []
    return batch_run_name(len(events), file_label(events[0]) if events else "none")


def run_name() -> str:
    return batch_label(flow_run.parameters.get("events"))


def _event_id(raw: Any) -> str | None:
    data = event_json(raw)
    return str(data["id"]) if isinstance(data, dict) and data.get("id") is not None else None


@flow(
    name=PUBLISH_BATCH_FLOW,
    flow_run_name=run_name,
    validate_parameters=False,  # each event is parsed on its own: a bad one fails alone
    description="Publish the WIS2 notifications of several file-diffusion CloudEvents (a burst "
    "grouped by the MQTT listener); one failed event does not stop the others.",
)
def publish_batch(events: list[CloudEvent], dataset: str | None = None) -> State:
    """Publish the WIS2 notification(s) of each event of `events`, one after the other.

    Args:
        events: the CloudEvents announcing the files (each `data` is a STAC 1.1 item).
        dataset: name of the dataset (Wis2Dataset block or data/datasets/<name>.json);
            default: WIS2_DEFAULT_DATASET.
    """
    settings = ChainSettings()
    logger = get_run_logger()
    events = list(events or [])
    label = batch_label(events)
    dataset_name = dataset or settings.default_dataset
    outcomes: list[EventOutcome] = []
    failures: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []

    def failed(raw: Any, exc: BaseException) -> None:
        event_label = file_label(raw)
        logger.error("event %s of the batch failed: %s", event_label, exc)
        outcomes.append(EventOutcome(event_id=_event_id(raw), label=event_label,
                                     status="failed", error=f"{type(exc).__name__}: {exc}"))
        failures.append({"label": event_label, "event_id": _event_id(raw), "error": exc,
                         "field_errors": field_errors_of(exc), "event": event_json(raw)})
        rows.append({"event": event_label, "event_id": _event_id(raw), "notification": "",
                     "data_id": "", "status": f"FAILED: {exc}"[:300]})

    pipeline: Pipeline | None = None
    try:
        pipeline = Pipeline.load(dataset_name, settings)
    except Exception as exc:  # no dataset: every event fails, with the reason
        for raw in events:
            failed(raw, exc)

    for item in publish_events(events, pipeline) if pipeline is not None else []:
        done = item.done
        if done is None:
            exc = item.error or RuntimeError("not published")
            if isinstance(exc, ValidationFailed):
                validation.append({"event": item.label, "notification": exc.report.subject,
                                   **exc.report.summary_row()})
            failed(item.raw, exc)
            continue
        published = done.published()
        validation += [{"event": item.label, **row} for row in done.validation_rows]
        cached = not any(n.sent for n in published)
        outcomes.append(EventOutcome(event_id=done.event.id, label=item.label,
                                     status="cached" if cached else "published",
                                     notifications=published))
        rows += [{"event": item.label, "event_id": done.event.id,
                  "notification": n.id, "data_id": n.data_id,
                  "status": "sent" if n.sent else "already published (cached)"}
                 for n in published]

    result = BatchRunResult(
        dataset=pipeline.dataset.name if pipeline else dataset_name,
        topic=pipeline.dataset.topic if pipeline else None,
        verified=settings.verify_data,
        events=outcomes,
    )
    sent = sum(n.sent for e in outcomes for n in e.notifications)
    summary = (f"{len(events)} event(s): {sent} notification(s) sent, "
               f"{sum(e.status == 'cached' for e in outcomes)} event(s) already published, "
               f"{len(failures)} failed")
    batch_table_artifact(rows, key=artifact_key(label), description=summary)
    if validation:
        batch_table_artifact(
            validation, key=artifact_key("validation", label),
            description="Validation of the batch's notifications: "
            + ("passed" if all(r.get("result") != "FAILED" for r in validation) else "FAILED"))
    logger.info("batch %s: %s", label, summary)
    if failures:
        batch_failure_artifact(key=artifact_key("failed", label), failures=failures,
                               total=len(events), deployment=PUBLISH_NOTIFICATION)
        names = ", ".join(f"{f['label']} ({_first_line(f)})" for f in failures)
        unavailable = sum(is_infrastructure(f["error"]) for f in failures)
        if unavailable:  # scheduled again by the recovery: the same events, the same ids
            return Failed(name=UNAVAILABLE, data=result, message=(
                f"{len(failures)} of {len(events)} event(s) failed, {unavailable} because a "
                f"service was unavailable: the run is scheduled again "
                f"(WIS2_RECOVERY_MAX_RETRIES): {names}")[:2000])
        return Failed(message=f"{len(failures)} of {len(events)} event(s) failed: {names}"[:2000],
                      data=result)
    return Completed(message=summary, data=result)


def _first_line(failure: dict[str, Any]) -> str:
    errors = failure["field_errors"]
    if errors:
        return str(errors[0])
    return str(failure["error"]).splitlines()[0] if str(failure["error"]) else "error"
