"""The outgoing WIS2 Notification Message (WNM 1.x) as a pydantic model."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from wis2.relations import LINK_RELATIONS, LinkRel

WNM_CONFORMANCE = "http://wis.wmo.int/spec/wnm/1/conf/core"
ContentEncoding = Literal["utf-8", "base64", "gzip"]  # of inline `properties.content`
IntegrityMethod = Literal["sha256", "sha384", "sha512", "sha3-256", "sha3-384", "sha3-512"]
MAX_MESSAGE_BYTES = 8192
MAX_INLINE_CONTENT_CHARS = 4096


def rfc3339(value: datetime) -> str:
    """Format a datetime as RFC 3339 in UTC with a `Z` suffix (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    text = value.isoformat(timespec="microseconds" if value.microsecond else "seconds")
    return text.replace("+00:00", "Z")


class Integrity(BaseModel):
    method: IntegrityMethod
    value: str  # base64


def decode_content(value: str, encoding: str | None) -> bytes:
    """The data an inline `content` value carries; raises `binascii.Error`, `ValueError`,
    `OSError` or `EOFError` when it is not in `encoding`."""
    if encoding == "gzip":
        return gzip.decompress(base64.b64decode(value, validate=True))
    if encoding == "base64":
        return base64.b64decode(value, validate=True)
    return value.encode("utf-8")


class Content(BaseModel):
    encoding: ContentEncoding
    value: str
    size: int

    def data(self) -> bytes:
        """The bytes this inline content carries (`decode_content`)."""
        return decode_content(self.value, self.encoding)


class Link(BaseModel):
    model_config = ConfigDict(extra="allow")

    href: str
    rel: str
    type: str | None = None
    length: int | None = None
    title: str | None = None


class NotificationProperties(BaseModel):
    model_config = ConfigDict(extra="allow")

    data_id: str
    metadata_id: str | None = None
    pubtime: str
    datetime: str | None = None
    start_datetime: str | None = None
    end_datetime: str | None = None
    integrity: Integrity | None = None
    content: Content | None = None
    cache: bool | None = None  # false: Global Caches do not cache the data (omitted: true)
    wigos_station_identifier: str | None = None


class Notification(BaseModel):
    """A WIS2 Notification Message. Timestamps are kept as RFC 3339 strings exactly as published."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str
    conforms_to: list[str] = Field(default_factory=lambda: [WNM_CONFORMANCE], alias="conformsTo")
    type: Literal["Feature"] = "Feature"
    geometry: dict[str, Any] | None = None
    properties: NotificationProperties
    links: list[Link]

    def to_dict(self) -> dict[str, Any]:
        """The message as JSON-ready data (absent optional fields omitted, geometry kept)."""
        data = self.model_dump(by_alias=True, exclude_none=True)
        data["geometry"] = self.geometry
        order = ["id", "conformsTo", "type", "geometry", "properties", "links"]
        return {key: data[key] for key in order if key in data} | {
            k: v for k, v in data.items() if k not in order
        }

    def to_json(self) -> str:
        """Compact JSON as published on the broker."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    def announcing_link(self) -> Link | None:
        """The one link of relation canonical, update or deletion (None if there is none)."""
        return next((link for link in self.links if link.rel in LINK_RELATIONS), None)

    @property
    def rel(self) -> LinkRel | None:
        """The one canonical/update/deletion relation of this message."""
        link = self.announcing_link()
        return link.rel if link else None  # type: ignore[return-value]
