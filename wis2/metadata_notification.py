"""WCMP2 discovery metadata records and the WIS2 notifications that announce them (pure: no I/O).

A node announces a discovery metadata record by publishing a WNM on
``origin/a/wis2/<centre-id>/metadata`` whose link points at the served record
(``type: application/geo+json``) and whose integrity/length are those of the served bytes.

Choices made here (documented for operators):

- ``data_id`` is ``wis2/<centre-id>/metadata/<record-id>``: stable for the life of the record, so
  every republication and the deletion of one record share one ``data_id`` and Global Caches and
  the Global Discovery Catalogue see them as versions of the same thing.
- ``metadata_id`` is the record identifier.
- ``datetime`` is the record's ``properties.updated`` (else ``properties.created``): the time the
  record's content is valid from. ``pubtime`` is the publication time.
- ``geometry`` is null: the record itself carries its extent.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from wis2.errors import FieldError, InvalidInput
from wis2.multihash import integrity_of
from wis2.notification import (
    WNM_CONFORMANCE,
    IntegrityMethod,
    Link,
    Notification,
    NotificationProperties,
    rfc3339,
)
from wis2.relations import LinkRel
from wis2.topics import CENTRE_ID

WCMP2_CONFORMANCE = "http://wis.wmo.int/spec/wcmp/2/conf/core"
METADATA_MEDIA_TYPE = "application/geo+json"
RECORD_ID_PATTERN = re.compile(
    rf"^urn:wmo:md:(?P<centre_id>{CENTRE_ID}):(?P<local>[^\s/\\]+)$"
)


class Wcmp2Record(BaseModel):
    """A WCMP2 discovery metadata record (GeoJSON Feature). Only the shape is checked here; the
    WCMP2 test suite (`wis2.wcmp2.validate_wcmp2`) checks the content. Extra members
    (``time``, ``linkTemplates``, ...) are kept as given."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str = Field(description="Record identifier: urn:wmo:md:<centre-id>:<local-identifier>")
    conforms_to: list[str] = Field(
        default_factory=lambda: [WCMP2_CONFORMANCE], alias="conformsTo"
    )
    type: str = "Feature"
    geometry: dict[str, Any] | None = None
    properties: dict[str, Any] = Field(
        description="title, description, type, created, updated, themes, contacts, ..."
    )
    links: list[dict[str, Any]] = Field(
        description="Record links; MQTT links carry the `channel` (topic) of the dataset's data"
    )

    def to_dict(self) -> dict[str, Any]:
        """The record as given (members the user did not set are not added)."""
        return self.model_dump(by_alias=True, exclude_unset=True)

    def to_bytes(self) -> bytes:
        """The bytes served for a record pasted as a parameter (indented UTF-8 JSON)."""
        return record_bytes(self.to_dict())


def record_bytes(record: Mapping[str, Any]) -> bytes:
    """Serialise a record as it is served: 2-space indented UTF-8 JSON with a final newline."""
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def parse_record(data: bytes, source: str = "record") -> dict[str, Any]:
    """Decode a served/loaded record. Raises InvalidInput naming the problem."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidInput([FieldError(path="$", message=f"not UTF-8: {exc}")], source) from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            [FieldError(path="$", message=f"not valid JSON: {exc.msg} (line {exc.lineno})")],
            source,
        ) from exc
    if not isinstance(value, dict):
        raise InvalidInput(
            [FieldError(path="$", message=f"expected a JSON object, got {type(value).__name__}")],
            source,
        )
    return value


def record_id_of(record: Mapping[str, Any]) -> str:
    """The record identifier, checked to be ``urn:wmo:md:<centre-id>:<local-identifier>``."""
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise InvalidInput(
            [FieldError(path="$.id", message="missing record identifier")], "metadata record"
        )
    if not RECORD_ID_PATTERN.fullmatch(record_id):
        raise InvalidInput(
            [
                FieldError(
                    path="$.id",
                    message=f"identifier {record_id!r} is not "
                    "urn:wmo:md:<centre-id>:<local-identifier> (centre-id lower case, "
                    "local identifier without spaces or slashes)",
                )
            ],
            "metadata record",
        )
    return record_id


def centre_id_of(record: Mapping[str, Any]) -> str:
    """The centre-id named in the record identifier."""
    match = RECORD_ID_PATTERN.fullmatch(record_id_of(record))
    assert match is not None
    return match["centre_id"]


def metadata_data_id(centre_id: str, record_id: str) -> str:
    """``data_id`` of every notification about one record: ``wis2/<centre-id>/metadata/<id>``."""
    return f"wis2/{centre_id}/metadata/{record_id}"


def record_file_name(record_id: str) -> str:
    """File name under which a record is served: ``<record-id>.json``."""
    if not RECORD_ID_PATTERN.fullmatch(record_id):
        raise ValueError(f"unsafe record identifier for a file name: {record_id!r}")
    return f"{record_id}.json"


def record_datetime(record: Mapping[str, Any]) -> str:
    """``properties.updated`` (else ``properties.created``) as RFC 3339 UTC."""
    properties = record.get("properties")
    if not isinstance(properties, Mapping):
        raise InvalidInput(
            [FieldError(path="$.properties", message="missing or not an object")],
            "metadata record",
        )
    for name in ("updated", "created"):
        value = properties.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise InvalidInput(
                [FieldError(path=f"$.properties.{name}", message="must be an RFC 3339 string")],
                "metadata record",
            )
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidInput(
                [FieldError(path=f"$.properties.{name}", message=f"not RFC 3339: {value!r}")],
                "metadata record",
            ) from exc
        return rfc3339(parsed)
    raise InvalidInput(
        [FieldError(path="$.properties.created", message="missing (and no properties.updated)")],
        "metadata record",
    )


def build_metadata_notification(
    record: Mapping[str, Any],
    served: bytes | None,
    *,
    href: str,
    rel: LinkRel,
    pubtime: datetime | None = None,
    message_id: str | None = None,
    integrity_method: IntegrityMethod = "sha512",
) -> Notification:
    """The WNM announcing `record` served at `href` with the bytes `served`.

    `served` may be None only for a deletion (the record is gone); otherwise the integrity and the
    link ``length`` are those of exactly these bytes.
    """
    record_id = record_id_of(record)
    centre_id = centre_id_of(record)
    if served is None and rel != "deletion":
        raise ValueError("the served bytes are needed to announce a record")
    properties = NotificationProperties(
        data_id=metadata_data_id(centre_id, record_id),
        metadata_id=record_id,
        pubtime=rfc3339(pubtime or datetime.now(UTC)),
        datetime=record_datetime(record),
        integrity=integrity_of(served, integrity_method) if served is not None else None,
    )
    link = Link(
        href=href,
        rel=rel,
        type=METADATA_MEDIA_TYPE,
        length=len(served) if served is not None else None,
        title=_title(record),
    )
    return Notification(
        id=message_id or str(uuid.uuid4()),
        conformsTo=[WNM_CONFORMANCE],
        geometry=None,
        properties=properties,
        links=[link],
    )


def _title(record: Mapping[str, Any]) -> str | None:
    properties = record.get("properties")
    title = properties.get("title") if isinstance(properties, Mapping) else None
    if isinstance(title, str) and title:
        return title if len(title) <= 200 else title[:197] + "..."
    return None
