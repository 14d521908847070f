"""The incoming file-diffusion event: a CloudEvent 1.0 envelope whose `data` is a STAC 1.1 item
with the `file` extension. `parse_event` turns raw bytes into a `CloudEvent` or raises
`InvalidInput` listing every bad field with its JSON path (`UnreadableEvent` when the bytes are
not UTF-8 JSON text at all); `CloudEvent.to_dict` is the event as JSON data."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from wis2.errors import FieldError, InvalidInput, field_errors_from
from wis2.multihash import decode_multihash, integrity_from_multihash
from wis2.notification import Integrity
from wis2.relations import Operation

_DELETE_WORDS = {"delete", "deleted", "deletion", "removed", "remove"}
_UPDATE_WORDS = {"update", "updated", "modified", "changed", "modify"}
_URL_SCHEMES = {"http", "https", "ftp", "ftps"}


def _position_problems(position: list[float]) -> list[str]:
    if len(position) not in (2, 3):
        return ["a position is [longitude, latitude] or [longitude, latitude, altitude]"]
    problems = []
    lon, lat = position[0], position[1]
    if not -180 <= lon <= 180:
        problems.append(f"longitude {lon} out of range [-180, 180]")
    if not -90 <= lat <= 90:
        problems.append(f"latitude {lat} out of range [-90, 90]")
    if len(position) == 3 and not math.isfinite(position[2]):
        problems.append(f"altitude {position[2]} is not a finite number")
    return problems


class PointGeometry(BaseModel):
    """GeoJSON Point: `coordinates` is [longitude, latitude(, altitude)]."""

    model_config = ConfigDict(extra="allow")

    type: Literal["Point"]
    coordinates: list[float]

    @field_validator("coordinates")
    @classmethod
    def _position(cls, value: list[float]) -> list[float]:
        if problems := _position_problems(value):
            raise ValueError("; ".join(problems))
        return value


class PolygonGeometry(BaseModel):
    """GeoJSON Polygon: closed linear rings of at least 4 positions, the first is the exterior."""

    model_config = ConfigDict(extra="allow")

    type: Literal["Polygon"]
    coordinates: list[list[list[float]]] = Field(min_length=1)

    @field_validator("coordinates")
    @classmethod
    def _rings(cls, value: list[list[list[float]]]) -> list[list[list[float]]]:
        problems = []
        for r, ring in enumerate(value):
            if len(ring) < 4:
                problems.append(f"ring [{r}] has {len(ring)} positions, a linear ring needs >= 4")
            elif ring[0] != ring[-1]:
                problems.append(f"ring [{r}] is not closed (last position != first)")
            for p, position in enumerate(ring):
                problems += [f"[{r}][{p}]: {problem}" for problem in _position_problems(position)]
        if problems:
            raise ValueError("; ".join(problems))
        return value


# WNM accepts Point and Polygon geometries (or null).
Geometry = Annotated[PointGeometry | PolygonGeometry, Field(discriminator="type")]
_GEOMETRY_TAGS = {"Point", "Polygon"}


class StacAsset(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    href: str
    type: str | None = None
    title: str | None = None
    roles: list[str] = Field(default_factory=list)
    created: AwareDatetime | None = None
    file_size: int | None = Field(default=None, alias="file:size", ge=0)
    file_checksum: str | None = Field(default=None, alias="file:checksum")

    @field_validator("href")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            host = parts.hostname
        except ValueError as exc:
            raise ValueError(f"href {value!r} is not a valid URL ({exc})") from None
        if parts.scheme.lower() not in _URL_SCHEMES or not host:
            raise ValueError(f"href {value!r} is not an absolute http(s) or ftp URL")
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(f"href {value!r} contains spaces or control characters")
        return value

    @field_validator("file_checksum")
    @classmethod
    def _multihash(cls, value: str | None) -> str | None:
        if value is not None:
            decode_multihash(value)
        return value

    @property
    def integrity(self) -> Integrity | None:
        return integrity_from_multihash(self.file_checksum) if self.file_checksum else None

    @property
    def file_name(self) -> str:
        return urlsplit(self.href).path.rstrip("/").rsplit("/", 1)[-1]


class StacProperties(BaseModel):
    model_config = ConfigDict(extra="allow")

    datetime: AwareDatetime | None = None
    start_datetime: AwareDatetime | None = None
    end_datetime: AwareDatetime | None = None

    @field_validator("datetime", "start_datetime", "end_datetime", mode="before")
    @classmethod
    def _rfc3339_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be an RFC 3339 date-time string with a time zone")
        return value

    @model_validator(mode="after")
    def _has_time(self) -> StacProperties:
        start, end = self.start_datetime, self.end_datetime
        if self.datetime is None and start is None and end is None:
            raise ValueError("no time: give datetime, or start_datetime and end_datetime")
        if (start is None) != (end is None):
            raise ValueError("start_datetime and end_datetime go together")
        if start is not None and end is not None and start > end:
            raise ValueError("start_datetime is after end_datetime")
        return self


class StacItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["Feature"]
    stac_version: str = Field(pattern=r"^1\.")
    stac_extensions: list[str] = Field(default_factory=list)
    id: str = Field(min_length=1)
    geometry: Geometry | None
    bbox: list[float] | None = None
    properties: StacProperties
    links: list[dict[str, Any]] = Field(default_factory=list)
    assets: dict[str, StacAsset] = Field(min_length=1)

    @field_validator("bbox")
    @classmethod
    def _bbox(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if len(value) not in (4, 6):
            raise ValueError("bbox has 4 (2D) or 6 (3D) numbers")
        half = len(value) // 2
        for lon in (value[0], value[half]):
            if not -180 <= lon <= 180:
                raise ValueError(f"bbox longitude {lon} out of range [-180, 180]")
        for lat in (value[1], value[half + 1]):
            if not -90 <= lat <= 90:
                raise ValueError(f"bbox latitude {lat} out of range [-90, 90]")
        if value[1] > value[half + 1]:
            raise ValueError("bbox south latitude is above its north latitude")
        return value


class CloudEvent(BaseModel):
    """A CloudEvent 1.0 announcing data files; extension attributes are kept.

    The optional extension attribute `operation` (create, update or delete) says explicitly what
    happened to the files; without it the event `type` decides (see `operation`).
    """

    specversion: Literal["1.0"]
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    subject: str | None = None
    time: AwareDatetime | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: StacItem
    operation_: Operation | None = Field(default=None, alias="operation")

    model_config = ConfigDict(
        extra="allow", populate_by_name=True, title="CloudEvent with a STAC item"
    )

    @property
    def operation(self) -> Operation:
        if self.operation_ is not None:
            return self.operation_
        word = self.type.rsplit(".", 1)[-1].lower()
        if word in _DELETE_WORDS:
            return "delete"
        if word in _UPDATE_WORDS:
            return "update"
        return "create"

    def identity_key(self) -> str:
        """Same event (redelivered) -> same key; same file with a new checksum -> new key."""
        checksums = sorted((k, a.file_checksum or "") for k, a in self.data.assets.items())
        material = json.dumps([self.source, self.id, checksums], separators=(",", ":"))
        return hashlib.sha256(material.encode()).hexdigest()

    def file_label(self) -> str:
        """Short label of the file(s) handled, for flow-run names."""
        assets = [a for a in self.data.assets.values() if "data" in a.roles] or list(
            self.data.assets.values()
        )
        label = assets[0].file_name or self.data.id
        return label if len(assets) == 1 else f"{label}+{len(assets) - 1}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class UnreadableEvent(InvalidInput):
    """The raw event is not UTF-8 JSON text, so no field could be read. `cause` is the decoder's
    error (`UnicodeDecodeError`, `json.JSONDecodeError`, `RecursionError` or `ValueError`), for
    callers that word the problem their own way (the MQTT listener's dead-letter reasons)."""

    def __init__(
        self, errors: Iterable[FieldError], what: str = "event", cause: BaseException | None = None
    ) -> None:
        super().__init__(errors, what)
        self.cause = cause


def _event_errors(exc: ValidationError) -> list[FieldError]:
    """Field errors with JSON paths as the user wrote them (no union tags such as `Point`)."""
    errors = field_errors_from(exc)
    for error in errors:
        for tag in _GEOMETRY_TAGS:
            error.path = error.path.replace(f".geometry.{tag}", ".geometry")
        error.path = error.path.replace(".operation_", ".operation")
        if error.message.startswith(("Unable to extract tag", "Input tag")):
            error.message = f"geometry type must be 'Point' or 'Polygon' ({error.message})"
    return errors or [FieldError(path="$", message=str(exc))]


def parse_event(raw: bytes | str | Mapping[str, Any]) -> CloudEvent:
    """Parse and check an event; raise `InvalidInput` (what="event") with every problem found."""
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"not UTF-8 text (byte {exc.start})"
            raise UnreadableEvent([FieldError(path="$", message=message)], cause=exc) from None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            message = f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            raise UnreadableEvent([FieldError(path="$", message=message)], cause=exc) from None
        except RecursionError as exc:
            message = "not JSON that can be read: nested too deeply"
            raise UnreadableEvent([FieldError(path="$", message=message)], cause=exc) from None
        except ValueError as exc:  # e.g. an integer with too many digits
            message = f"not JSON that can be read: {exc}"
            raise UnreadableEvent([FieldError(path="$", message=message)], cause=exc) from None
    if not isinstance(raw, Mapping):
        message = f"a CloudEvent is a JSON object, not {type(raw).__name__}"
        raise InvalidInput([FieldError(path="$", message=message)], "event")
    try:
        return CloudEvent.model_validate(dict(raw))
    except ValidationError as exc:
        raise InvalidInput(_event_errors(exc), "event") from None
    except (RecursionError, TypeError, ValueError) as exc:  # defensive: never anything else
        raise InvalidInput([FieldError(path="$", message=str(exc))], "event") from None
