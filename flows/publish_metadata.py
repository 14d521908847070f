"""The `publish-metadata` and `republish-metadata` flows: WCMP2 discovery metadata on WIS2.

`publish-metadata`: load a WCMP2 record (pasted, or from a path/URL) -> validate it (pywcmp ETS,
plus: each MQTT link's channel is a valid publication topic of the record's centre) -> serve it
(write the exact bytes to ``$WIS2_METADATA_DIR/<record-id>.json`` when this node serves its
records) -> build the metadata notification (integrity and length of the SERVED bytes; ``canonical``
the first time this node publishes the record, ``update`` afterwards, ``deletion`` for a delete,
decided from the publication ledger) -> validate it strictly -> publish it on
``origin/a/wis2/<centre-id>/metadata`` (QoS 1, the MqttBroker block) -> record it in the ledger.

`republish-metadata`: publish again, as ``update``, every record this node currently publishes
(Global Brokers and the Global Discovery Catalogue expect a daily republication).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State
from pydantic import BaseModel

from chain.deployments import PUBLISH_METADATA, PUBLISH_METADATA_FLOW, REPUBLISH_METADATA_FLOW
from chain.failures import UNAVAILABLE, is_infrastructure, unavailable_message
from chain.ledger import Claim, LedgerEntry, LedgerReader, ledger_location, open_ledger
from chain.metrics import FLOW_METRICS
from chain.settings import ChainSettings
from flows.artifacts import artifact_key, failure_artifact, notification_artifact
from flows.pipeline import field_errors_of, recheck_claim
from flows.tasks import (
    build_metadata_notification_task,
    configured_tasks,
    load_broker_connection,
    record_publication_task,
    validate_notifications_task,
)
from flows.tasks.caching import result_storage
from flows.tasks.metadata_record import (
    LoadedRecord,
    deletion_target,
    invalid,
    keep_record_copy,
    load_record_task,
    serve_record_task,
    validate_record_task,
)
from flows.tasks.publish import BrokerReceipt
from wis2.dataset import dataset_names
from wis2.errors import InvalidInput
from wis2.metadata_notification import (
    Wcmp2Record,
    centre_id_of,
    metadata_data_id,
    record_id_of,
)
from wis2.notification import Notification, rfc3339
from wis2.relations import Operation, relation_for
from wis2.topics import metadata_topic

log = logging.getLogger(__name__)

LEDGER_KIND = "wcmp2-record"


class MetadataRunResult(BaseModel):
    """What a run published (the flow's return value)."""

    record_id: str
    data_id: str
    topic: str
    notification_id: str
    rel: str
    href: str
    length: int | None
    integrity: str | None
    served_path: str | None
    sent: bool


def _run_label() -> str:
    params = flow_run.parameters
    record = params.get("record")
    record_id = params.get("record_id")
    if isinstance(record, Wcmp2Record):
        record_id = record.id
    elif isinstance(record, dict):
        record_id = record.get("id")
    name = record_id or params.get("record_location") or "record"
    return f"{params.get('operation') or 'create'}-{name}"


def _replay_lines() -> list[str]:
    return [
        "The ledger records only acknowledged publications (see the run's logs and the "
        "validation table). Fix the record and run the "
        f"`{PUBLISH_METADATA}` deployment again (Prefect UI: Deployments > "
        f"{PUBLISH_METADATA_FLOW} > Run > Custom run), or:",
        "",
        "```sh",
        f"prefect deployment run '{PUBLISH_METADATA}' --param record_location=<path-or-url> "
        "--param operation=create",
        "```",
    ]


def _params_json(**params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        out[key] = value.to_dict() if isinstance(value, Wcmp2Record) else value
    return out


@flow(
    name=PUBLISH_METADATA_FLOW,
    flow_run_name=_run_label,
    description="Validate a WCMP2 discovery metadata record, serve it and publish its WIS2 "
    "notification on origin/a/wis2/<centre-id>/metadata.",
)
def publish_metadata(
    record: Wcmp2Record | None = None,
    record_location: str | None = None,
    public_url: str | None = None,
    operation: Literal["create", "update", "delete"] = "create",
    record_id: str | None = None,
) -> MetadataRunResult | State:
    """Publish (or delete) one WCMP2 discovery metadata record.

    Args:
        record: the WCMP2 record (paste its JSON here), or else:
        record_location: a path or http(s) URL of the record (instead of `record`).
        public_url: where the record is (or will be) served. Optional when the node serves its
            records (WIS2_METADATA_DIR and WIS2_METADATA_BASE_URL set).
        operation: create/update (the relation is canonical the first time this node publishes
            the record, update afterwards) or delete (rel=deletion).
        record_id: for a delete only: the identifier of a record this node published (instead of
            record/record_location).
    """
    settings = ChainSettings()
    logger = get_run_logger()
    label = _run_label()
    started = datetime.now(UTC)
    FLOW_METRICS.use_dataset("", "unknown")  # until the record is known
    try:
        result = _publish_metadata(
            record, record_location, public_url, operation, record_id, settings, label
        )
    except Exception as exc:
        FLOW_METRICS.failure(exc)
        logger.error("metadata publication failed: %s", exc)
        failure_artifact(
            key=artifact_key("failed-metadata", label),
            error=exc,
            received=_params_json(record=record, record_location=record_location,
                                  public_url=public_url, operation=operation,
                                  record_id=record_id),
            field_errors=field_errors_of(exc),
            title="Metadata publication failed",
            received_title="Parameters",
            replay=_replay_lines(),
        )
        if is_infrastructure(exc):  # scheduled again by the recovery (chain.failures)
            return Failed(name=UNAVAILABLE, data=exc, message=unavailable_message(exc))
        raise
    FLOW_METRICS.outcome([result.sent], started)
    return result


def _use_labels(record: dict[str, Any], settings: ChainSettings) -> None:
    """The metrics' labels of this run: the record's centre and dataset (`dataset_names`)."""
    try:
        rid, centre_id = record_id_of(record), centre_id_of(record)
    except InvalidInput:
        return  # the run fails on it: counted under centre_id and dataset "unknown"
    try:
        dataset = dataset_names(settings.datasets_dir).get(rid, rid)
    except (OSError, ValueError) as exc:  # a bad dataset description: not this run's failure
        log.warning("dataset descriptions not read (%s): metrics labelled with %s", exc, rid)
        dataset = rid
    FLOW_METRICS.use_dataset(metadata_topic(centre_id), dataset)


def _ledger_entry(settings: ChainSettings, centre_id: str, record_id: str) -> LedgerEntry | None:
    return open_ledger(ledger_location(settings)).get(metadata_data_id(centre_id, record_id))


def _publish_metadata(
    record: Wcmp2Record | None,
    record_location: str | None,
    public_url: str | None,
    operation: Operation,
    record_id: str | None,
    settings: ChainSettings,
    label: str,
) -> MetadataRunResult:
    loaded: LoadedRecord | None = None
    if operation == "delete" and record is None and not record_location:
        if not record_id:
            raise invalid("$.record_id", "a delete needs record_id (or record/record_location)")
        record_dict: dict[str, Any] = {"id": record_id}
        _use_labels(record_dict, settings)
        record_id_of(record_dict)
    else:
        if record_id:
            raise invalid("$.record_id", "only for a delete without record/record_location")
        loaded = load_record_task(record, record_location, settings.verify_timeout)
        record_dict = loaded.record
        _use_labels(record_dict, settings)
        if operation != "delete":
            validate_record_task(loaded, settings.wcmp2_kpi, label)
    rid = record_id_of(record_dict)
    centre_id = centre_id_of(record_dict)
    # one publication of a record at a time on the whole node: the relation is decided once
    with open_ledger(ledger_location(settings)).claim(
            [metadata_data_id(centre_id, rid)], settings.cache_lock_timeout) as claim:
        return _announce(claim, loaded, record_dict, rid, centre_id, public_url, operation,
                         settings, label)


def _same_entry(before: LedgerEntry | None) -> Callable[[Notification, LedgerEntry | None],
                                                        bool]:
    """`recheck_claim`'s rule for a record: what was decided under the claim holds while the
    ledger's entry is still the one read then (no other run published the record meanwhile)."""
    def holds(note: Notification, entry: LedgerEntry | None) -> bool:
        return (entry.notification_id if entry else None) == (
            before.notification_id if before else None)
    return holds


def _this_notification(note: Notification, ledger: LedgerReader) -> str | None:
    """`recheck_claim`'s `announced_before` for a record: only this very notification."""
    entry = ledger.get(note.properties.data_id)
    return note.id if entry is not None and entry.notification_id == note.id else None


def _announce(
    claim: Claim,
    loaded: LoadedRecord | None,
    record_dict: dict[str, Any],
    rid: str,
    centre_id: str,
    public_url: str | None,
    operation: Operation,
    settings: ChainSettings,
    label: str,
) -> MetadataRunResult:
    logger = get_run_logger()
    topic = metadata_topic(centre_id)
    previous = _ledger_entry(settings, centre_id, rid)
    published_before = previous is not None and previous.rel != "deletion"
    rel = relation_for(operation, previous, republication=True)
    if operation == "update" and not published_before:
        logger.warning("record %s was never published by this node: publishing it as canonical",
                       rid)
    if operation == "create" and published_before:
        logger.info("record %s already published by this node: publishing it as update", rid)

    build = build_metadata_notification_task.with_options(
        result_storage=result_storage(settings)
    )
    if operation == "delete":
        served = deletion_target(rid, public_url, previous, settings)
        if previous is None:
            logger.warning("record %s is not in this node's ledger; announcing its deletion "
                           "anyway", rid)
        notification = build(_deletion_record(record_dict, previous), None, served.href, rel)
    else:
        assert loaded is not None
        served = serve_record_task(loaded, public_url, settings)
        notification = build(loaded.record, loaded.raw, served.href, rel)

    # WNM 1.3: an update is later than the notification it updates (the ledger's)
    earlier = ({notification.properties.data_id: previous.pubtime}
               if rel == "update" and previous is not None and previous.pubtime else None)
    validate_notifications_task([notification], topic, artifact_key("wnm-validation", label),
                                earlier)
    # the claim's locks may have died with their ledger connection (its server restarted)
    # while the relation was decided: taken again, and the record's entry read again
    # (`ClaimLost`, the run scheduled again, when another run published the record meanwhile)
    again = recheck_claim(claim, open_ledger(ledger_location(settings)), [notification],
                          _this_notification, _same_entry(previous))
    receipt: BrokerReceipt | None = None
    if again is not None and again[1][0] is not None:
        logger.info("notification %s of %s was already acknowledged by the broker: not sent "
                    "again", notification.id, rid)
        sent = False
    else:
        connection, origin = load_broker_connection(settings)
        logger.info("publishing %s (rel=%s) on %s via %s (%s)", rid, rel, topic,
                    connection.describe(), origin)
        publish = configured_tasks(settings).publish
        state = publish(notification, topic, connection, return_state=True)
        receipt = state.result()  # raises the publish error after retries
        sent = state.name != "Cached"

    copy = keep_record_copy(loaded, settings.results_dir) if loaded is not None else None
    record_publication_task(
        [notification],
        ledger_location(settings),
        details={
            "kind": LEDGER_KIND, "record_id": rid, "href": served.href,
            "served_path": served.path,
            "record_location": loaded.location if loaded is not None else None,
            "record_copy": str(copy) if copy else None,
        },
        acked={receipt.notification_id: receipt.published_at} if receipt else None,
    )
    if operation == "delete" and served.path:
        Path(served.path).unlink(missing_ok=True)
        logger.info("removed the served record %s", served.path)

    notification_artifact(
        topic, [notification], key=artifact_key("metadata-wnm", label), published=[sent]
    )
    integrity = notification.properties.integrity
    link = notification.links[0]
    return MetadataRunResult(
        record_id=rid,
        data_id=notification.properties.data_id,
        topic=topic,
        notification_id=notification.id,
        rel=rel,
        href=link.href,
        length=link.length,
        integrity=f"{integrity.method}:{integrity.value}" if integrity else None,
        served_path=served.path,
        sent=sent,
    )


def _deletion_record(record: dict[str, Any], previous: LedgerEntry | None) -> dict[str, Any]:
    """What the deletion notification needs: the id and a datetime (the record's, else the last
    publication's)."""
    properties = record.get("properties")
    if isinstance(properties, dict) and (properties.get("updated") or properties.get("created")):
        return record
    when = (previous.pubtime if previous else None) or rfc3339(datetime.now(UTC))
    return {"id": record["id"], "properties": {"updated": when}}


class RepublishResult(BaseModel):
    republished: list[MetadataRunResult]
    failed: dict[str, str]


@flow(
    name=REPUBLISH_METADATA_FLOW,
    description="Publish again (rel=update) every WCMP2 record this node currently publishes.",
)
def republish_metadata() -> RepublishResult:
    """Republish each record of the ledger that is not deleted, from its original location
    (when it was loaded from a path/URL) or from the copy kept when it was last published."""
    settings = ChainSettings()
    logger = get_run_logger()
    entries = {
        key: entry
        for key, entry in open_ledger(ledger_location(settings)).all().items()
        if (entry.model_extra or {}).get("kind") == LEDGER_KIND and entry.rel != "deletion"
    }
    logger.info("%d metadata record(s) to republish", len(entries))
    done: list[MetadataRunResult] = []
    failed: dict[str, str] = {}
    for key, entry in sorted(entries.items()):
        extra = entry.model_extra or {}
        record_id = str(extra.get("record_id") or key)
        location = extra.get("record_location") or extra.get("record_copy")
        if not location:
            failed[record_id] = "no stored location or copy of the record"
            logger.error("cannot republish %s: %s", record_id, failed[record_id])
            continue
        # served by this node: the URL follows WIS2_METADATA_BASE_URL; else the announced URL
        served_here = extra.get("served_path") and settings.metadata_dir is not None
        state = publish_metadata(
            record_location=str(location),
            public_url=None if served_here else extra.get("href"),
            operation="update",
            return_state=True,
        )
        if state.is_completed():
            done.append(state.result())
        else:
            failed[record_id] = state.message or state.name or "failed"
            logger.error("republication of %s failed: %s", record_id, failed[record_id])
    if failed:
        raise RuntimeError(
            f"{len(failed)} record(s) not republished: "
            + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    return RepublishResult(republished=done, failed=failed)
