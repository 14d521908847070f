"""Tasks of the `publish-metadata` flow on the record itself: load it, validate it, serve it.

A record is pasted (serialised as indented JSON) or read from a path or URL (its exact bytes are
kept: they are what is served and what the notification's integrity covers). Validation is the
WCMP2 test suite plus the identifier and MQTT channels of the record's centre. Serving writes the
bytes under ``WIS2_METADATA_DIR`` when this node serves its records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from chain.files import PUBLIC, write_atomically
from chain.ledger import LedgerEntry
from chain.settings import ChainSettings
from flows.artifacts import artifact_key, validation_table_artifact
from wis2.errors import FieldError, InvalidInput
from wis2.metadata_notification import (
    Wcmp2Record,
    centre_id_of,
    parse_record,
    record_file_name,
    record_id_of,
)
from wis2.wcmp2 import validate_wcmp2

RECORD_COPIES = "metadata-records"  # under WIS2_RESULTS_DIR: what republish-metadata reads


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


class TransientFetchError(RuntimeError):
    """A download failed in a way worth retrying (network, 5xx)."""



def invalid(path: str, message: str, what: str = "parameters") -> InvalidInput:
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
            raise invalid("$.record_location", f"{location}: HTTP {response.status_code}")
        return response.content
    if parsed.scheme not in ("", "file"):
        raise invalid(
            "$.record_location", f"unsupported scheme {parsed.scheme!r} (path, file:, http(s):)"
        )
    path = Path(parsed.path if parsed.scheme == "file" else location).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise invalid("$.record_location", f"cannot read {path}: {exc.strerror or exc}") from exc


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
        raise invalid("$.record", "give either record or record_location, not both")
    if record is not None:
        model = record if isinstance(record, Wcmp2Record) else Wcmp2Record.model_validate(record)
        raw = model.to_bytes()
        return LoadedRecord(record=model.to_dict(), raw=raw, origin="parameter")
    if not record_location:
        raise invalid("$.record", "a record (or record_location) is required")
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


def check_public_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise invalid("$.public_url", f"{url!r} is not an http(s) URL")
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
        raise invalid(
            "$.public_url",
            f"{missing} is not set: set both WIS2_METADATA_DIR and WIS2_METADATA_BASE_URL "
            "to serve records from this node, or neither and give public_url",
            "settings",
        )
    target = Path(directory).expanduser() / record_file_name(record_id) if directory else None
    if public_url:
        return check_public_url(public_url), target
    if base_url:
        return check_public_url(served_url(base_url, record_id)), target
    raise invalid(
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


def deletion_target(
    record_id: str, public_url: str | None, previous: LedgerEntry | None, settings: ChainSettings
) -> ServedRecord:
    """Where a deleted record was announced and served (the ledger's entry, else the settings)."""
    extra = (previous.model_extra or {}) if previous else {}
    if public_url:
        href = check_public_url(public_url)
    elif extra.get("href"):
        href = str(extra["href"])
    else:
        href, _ = serving_plan(record_id, None, settings)
    path = extra.get("served_path")
    if path is None and settings.metadata_dir is not None:
        candidate = Path(settings.metadata_dir).expanduser() / record_file_name(record_id)
        path = str(candidate) if candidate.exists() else None
    return ServedRecord(href=href, path=path)


def keep_record_copy(loaded: LoadedRecord, results_dir: Path) -> Path:
    """A copy of the published bytes (under the results directory) for republishing."""
    copy = Path(results_dir).expanduser().resolve() / RECORD_COPIES / record_file_name(
        loaded.record_id)
    write_atomically(copy, loaded.raw, PUBLIC)
    return copy
