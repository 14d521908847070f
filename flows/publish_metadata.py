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

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlparse

import httpx
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID, TASK_SOURCE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from chain.deployments import PUBLISH_METADATA, PUBLISH_METADATA_FLOW, REPUBLISH_METADATA_FLOW
from chain.files import PUBLIC, write_atomically
from chain.ledger import Ledger, LedgerEntry
from chain.settings import ChainSettings
from flows.artifacts import artifact_key, notification_artifact, validation_table_artifact
from flows.tasks import configured_tasks, load_broker_connection
from flows.tasks.build import checksum_of
from flows.tasks.caching import result_storage
from wis2.errors import FieldError, InvalidInput
from wis2.metadata_notification import (
    Wcmp2Record,
    build_metadata_notification,
    centre_id_of,
    metadata_data_id,
    parse_record,
    record_file_name,
    record_id_of,
)
from wis2.notification import Notification, rfc3339
from wis2.relations import Operation, relation_for
from wis2.topics import metadata_topic
from wis2.validation import validate_notification
from wis2.wcmp2 import validate_wcmp2

log = logging.getLogger(__name__)

LEDGER_KIND = "wcmp2-record"
RECORD_COPIES = "metadata-records"


class LoadedRecord(BaseModel):
    """A record and the exact bytes it was read as (or serialised to, when pasted)."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    record: dict[str, Any]
    raw: bytes
    origin: str  # "parameter", a path or a URL
    location: str | None = None  # record_location, when given

    @property
    def record_id(self) -> str:
        return record_id_of(self.record)

    @property
    def centre_id(self) -> str:
        return centre_id_of(self.record)


class ServedRecord(BaseModel):
    href: str
    path: str | None = None  # the file written under WIS2_METADATA_DIR, if any


class MetadataPublication(BaseModel):
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


class TransientFetchError(RuntimeError):
    """A download failed in a way worth retrying (network, 5xx)."""


# --------------------------------------------------------------------------- loading


def _invalid(path: str, message: str, what: str = "parameters") -> InvalidInput:
    return InvalidInput([FieldError(path=path, message=message)], what)


def fetch_location(location: str, timeout: float = 30.0) -> bytes:
    """Bytes of a record at a local path, a ``file://`` URL or an http(s) URL."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        try:
            response = httpx.get(location, timeout=timeout, follow_redirects=True)
        except httpx.TransportError as exc:
            raise TransientFetchError(f"cannot download {location}: {exc}") from exc
        if response.status_code >= 500:
            raise TransientFetchError(f"{location}: HTTP {response.status_code}")
        if response.status_code != 200:
            raise _invalid("$.record_location", f"{location}: HTTP {response.status_code}")
        return response.content
    if parsed.scheme not in ("", "file"):
        raise _invalid(
            "$.record_location", f"unsupported scheme {parsed.scheme!r} (path, file:, http(s):)"
        )
    path = Path(parsed.path if parsed.scheme == "file" else location).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _invalid("$.record_location", f"cannot read {path}: {exc.strerror or exc}") from exc


def _retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except TransientFetchError:
        return True
    except Exception:
        return False
    return False


@task(
    name="load-record",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[2, 5, 10],
    retry_condition_fn=_retry_transient,
)
def load_record_task(
    record: Wcmp2Record | dict[str, Any] | None,
    record_location: str | None,
    timeout: float = 30.0,
) -> LoadedRecord:
    """The record and its bytes: a pasted record is serialised as indented JSON; a record read
    from a path or URL keeps its exact bytes."""
    if record is not None and record_location:
        raise _invalid("$.record", "give either record or record_location, not both")
    if record is not None:
        model = record if isinstance(record, Wcmp2Record) else Wcmp2Record.model_validate(record)
        raw = model.to_bytes()
        return LoadedRecord(record=model.to_dict(), raw=raw, origin="parameter")
    if not record_location:
        raise _invalid("$.record", "a record (or record_location) is required")
    raw = fetch_location(record_location, timeout)
    if urlparse(record_location).scheme == "":  # keep an absolute path for republication
        record_location = str(Path(record_location).expanduser().resolve())
    return LoadedRecord(
        record=parse_record(raw, f"metadata record {record_location}"),
        raw=raw,
        origin=record_location,
        location=record_location,
    )


# --------------------------------------------------------------------------- validation


@task(name="validate-record", cache_policy=NO_CACHE, retries=0)
def validate_record_task(loaded: LoadedRecord, kpi: bool, label: str) -> list[dict[str, Any]]:
    """WCMP2 test suite, identifier and channels (valid topics of the record's centre); a table
    artifact; raises `ValidationFailed` naming the failed checks."""
    logger = get_run_logger()
    report = validate_wcmp2(loaded.record, kpi=kpi)
    rows = report.rows()
    validation_table_artifact(rows, key=artifact_key("wcmp2", label), ok=report.ok)
    if not report.ok:
        logger.error("record %s is not valid: %s", report.subject, report.summary())
        report.raise_for_failures()
    record_id = loaded.record_id  # also a safe file name (InvalidInput naming $.id otherwise)
    logger.info("record %s is valid WCMP2 (centre %s)", record_id, loaded.centre_id)
    return rows


# --------------------------------------------------------------------------- serving


def served_url(base_url: str, record_id: str) -> str:
    return f"{base_url.rstrip('/')}/{quote(record_file_name(record_id), safe=':')}"


def _check_public_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _invalid("$.public_url", f"{url!r} is not an http(s) URL")
    return url


def serving_plan(
    record_id: str, public_url: str | None, settings: ChainSettings
) -> tuple[str, Path | None]:
    """(href, file to write or None). Serving needs both WIS2_METADATA_DIR and
    WIS2_METADATA_BASE_URL; otherwise `public_url` is required. A given `public_url` wins as the
    announced href (e.g. a proxy in front of the metadata directory)."""
    directory, base_url = settings.metadata_dir, settings.metadata_base_url
    if (directory is None) != (base_url is None):
        missing = "WIS2_METADATA_BASE_URL" if base_url is None else "WIS2_METADATA_DIR"
        raise _invalid(
            "$.public_url",
            f"{missing} is not set: set both WIS2_METADATA_DIR and WIS2_METADATA_BASE_URL "
            "to serve records from this node, or neither and give public_url",
            "settings",
        )
    target = Path(directory).expanduser() / record_file_name(record_id) if directory else None
    if public_url:
        return _check_public_url(public_url), target
    if base_url:
        return _check_public_url(served_url(base_url, record_id)), target
    raise _invalid(
        "$.public_url",
        "required: where the record is served (or set WIS2_METADATA_DIR and "
        "WIS2_METADATA_BASE_URL so that this node serves it)",
    )


@task(name="serve-record", cache_policy=NO_CACHE, retries=0)
def serve_record_task(
    loaded: LoadedRecord, public_url: str | None, settings: ChainSettings
) -> ServedRecord:
    """Write the exact record bytes under the metadata directory (when configured)."""
    href, target = serving_plan(loaded.record_id, public_url, settings)
    if target is not None:
        write_atomically(target, loaded.raw, PUBLIC)
        get_run_logger().info("record served as %s (%d bytes) at %s", target, len(loaded.raw), href)
    else:
        get_run_logger().info("record announced at %s (served elsewhere)", href)
    return ServedRecord(href=href, path=str(target) if target else None)


# --------------------------------------------------------------------------- notification


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


@task(name="validate-metadata-notification", cache_policy=NO_CACHE, retries=0)
def validate_metadata_notification_task(
    notification: Notification, topic: str, label: str
) -> list[dict[str, Any]]:
    """Strict WNM validation ("publish" profile) for the metadata topic; raises on failure."""
    report = validate_notification(notification.to_dict(), topic=topic, profile="publish")
    rows = list(report.rows())
    validation_table_artifact(rows, key=artifact_key("wnm-validation", label), ok=report.ok)
    if not report.ok:
        get_run_logger().error("metadata notification %s is not valid", notification.id)
        report.raise_for_failures()
    return rows


@task(name="record-metadata-publication", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=1)
def record_metadata_task(
    notification: Notification,
    loaded: LoadedRecord | None,
    served: ServedRecord,
    settings: ChainSettings,
) -> LedgerEntry:
    """Record the publication in the ledger; keep a copy of the published bytes for republishing."""
    record_id = notification.properties.metadata_id or ""
    copy: Path | None = None
    if loaded is not None:
        copy = result_storage(settings) / RECORD_COPIES / record_file_name(record_id)
        write_atomically(copy, loaded.raw, PUBLIC)
    return Ledger.in_dir(settings.results_dir).record(
        notification.properties.data_id,
        notification_id=notification.id,
        rel=notification.rel or "canonical",
        checksum=checksum_of(notification),
        pubtime=notification.properties.pubtime,
        kind=LEDGER_KIND,
        record_id=record_id,
        href=served.href,
        served_path=served.path,
        record_location=loaded.location if loaded is not None else None,
        record_copy=str(copy) if copy else None,
    )


# --------------------------------------------------------------------------- flows


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


def _failure_markdown(error: BaseException, params: dict[str, Any]) -> str:
    errors = error.errors if isinstance(error, InvalidInput) else []
    lines = ["# Metadata publication failed", "", f"**{type(error).__name__}**: {error}", ""]
    if errors:
        lines += ["| field | problem |", "|---|---|"]
        lines += [f"| `{e.path}` | {e.message.replace('|', '/')} |" for e in errors]
        lines.append("")
    lines += [
        "The ledger records only acknowledged publications (see the run's logs and the "
        "validation table). Fix the record and run the "
        f"`{PUBLISH_METADATA}` deployment again (Prefect UI: Deployments > "
        f"{PUBLISH_METADATA_FLOW} > Run > "
        "Custom run), or:",
        "",
        "```sh",
        f"prefect deployment run '{PUBLISH_METADATA}' --param record_location=<path-or-url> "
        "--param operation=create",
        "```",
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(params, indent=2, ensure_ascii=False, default=str)[:20000],
        "```",
    ]
    return "\n".join(lines)


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
) -> MetadataPublication:
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
    try:
        return _publish_metadata(
            record, record_location, public_url, operation, record_id, settings, label
        )
    except Exception as exc:
        logger.error("metadata publication failed: %s", exc)
        create_markdown_artifact(
            markdown=_failure_markdown(
                exc,
                _params_json(record=record, record_location=record_location,
                             public_url=public_url, operation=operation, record_id=record_id),
            ),
            key=artifact_key("failed-metadata", label),
            description=f"Failed: {exc}"[:500],
        )
        raise


def _ledger_entry(settings: ChainSettings, centre_id: str, record_id: str) -> LedgerEntry | None:
    return Ledger.in_dir(settings.results_dir).get(metadata_data_id(centre_id, record_id))


def _publish_metadata(
    record: Wcmp2Record | None,
    record_location: str | None,
    public_url: str | None,
    operation: Operation,
    record_id: str | None,
    settings: ChainSettings,
    label: str,
) -> MetadataPublication:
    logger = get_run_logger()
    loaded: LoadedRecord | None = None
    if operation == "delete" and record is None and not record_location:
        if not record_id:
            raise _invalid("$.record_id", "a delete needs record_id (or record/record_location)")
        record_dict: dict[str, Any] = {"id": record_id}
        record_id_of(record_dict)
    else:
        if record_id:
            raise _invalid("$.record_id", "only for a delete without record/record_location")
        loaded = load_record_task(record, record_location, settings.verify_timeout)
        record_dict = loaded.record
        if operation != "delete":
            validate_record_task(loaded, settings.wcmp2_kpi, label)
    rid = record_id_of(record_dict)
    centre_id = centre_id_of(record_dict)
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
        served = _deletion_target(rid, public_url, previous, settings)
        if previous is None:
            logger.warning("record %s is not in this node's ledger; announcing its deletion "
                           "anyway", rid)
        notification = build(_deletion_record(record_dict, previous), None, served.href, rel)
    else:
        assert loaded is not None
        served = serve_record_task(loaded, public_url, settings)
        notification = build(loaded.record, loaded.raw, served.href, rel)

    validate_metadata_notification_task(notification, topic, label)
    connection, origin = load_broker_connection(settings)
    logger.info("publishing %s (rel=%s) on %s via %s (%s)", rid, rel, topic,
                connection.describe(), origin)
    publish = configured_tasks(settings).publish
    state = publish(notification, topic, connection, return_state=True)
    state.result()  # raises the publish error after retries
    sent = state.name != "Cached"

    record_metadata_task(notification, loaded, served, settings)
    if operation == "delete" and served.path:
        Path(served.path).unlink(missing_ok=True)
        logger.info("removed the served record %s", served.path)

    notification_artifact(
        topic, [notification], key=artifact_key("metadata-wnm", label), published=[sent]
    )
    integrity = notification.properties.integrity
    link = notification.links[0]
    return MetadataPublication(
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


def _deletion_target(
    record_id: str, public_url: str | None, previous: LedgerEntry | None, settings: ChainSettings
) -> ServedRecord:
    extra = (previous.model_extra or {}) if previous else {}
    if public_url:
        href = _check_public_url(public_url)
    elif extra.get("href"):
        href = str(extra["href"])
    else:
        href, _ = serving_plan(record_id, None, settings)
    path = extra.get("served_path")
    if path is None and settings.metadata_dir is not None:
        candidate = Path(settings.metadata_dir).expanduser() / record_file_name(record_id)
        path = str(candidate) if candidate.exists() else None
    return ServedRecord(href=href, path=path)


class RepublishResult(BaseModel):
    republished: list[MetadataPublication]
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
        for key, entry in Ledger.in_dir(settings.results_dir).all().items()
        if (entry.model_extra or {}).get("kind") == LEDGER_KIND and entry.rel != "deletion"
    }
    logger.info("%d metadata record(s) to republish", len(entries))
    done: list[MetadataPublication] = []
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
