"""STAC item -> WIS2 Notification Messages: one notification per data asset."""

from __future__ import annotations

import base64
import gzip
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import NAMESPACE_URL, UUID, uuid5

from wis2.cloudevent import CloudEvent, StacAsset, StacItem
from wis2.dataset import DatasetDescription
from wis2.errors import FieldError, InvalidInput, json_path
from wis2.notification import (
    MAX_INLINE_CONTENT_CHARS,
    Content,
    ContentEncoding,
    Link,
    Notification,
    NotificationProperties,
    rfc3339,
)
from wis2.relations import DATA_RELATIONS, RELATION_OF_OPERATION, Operation
from wis2.stations import station_link, wsi_problem

_BOOLEAN_TEXT = {"true": True, "false": False}


def data_assets(item: StacItem, dataset: DatasetDescription) -> list[tuple[str, StacAsset]]:
    """The assets that are data files: roles intersect the dataset's data roles; an item whose
    assets carry no roles at all publishes every asset."""
    assets = list(item.assets.items())
    if not any(asset.roles for _, asset in assets):
        return assets
    wanted = set(dataset.data_roles)
    return [(key, asset) for key, asset in assets if wanted & set(asset.roles)]


def data_id_for(
    dataset: DatasetDescription, item: StacItem, asset_key: str, asset: StacAsset
) -> str:
    """The stable, meaningful `data_id` of one file, from the dataset's template."""
    href_path = unquote(urlsplit(asset.href).path).lstrip("/")
    for prefix in dataset.href_strip_prefixes:
        if href_path.startswith(prefix):
            href_path = href_path.removeprefix(prefix)
            break
    try:
        data_id = _format_data_id(dataset, item, asset_key, href_path)
    except (AttributeError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"dataset {dataset.name!r}: data_id_template {dataset.data_id_template!r} is invalid "
            f"({exc!r}); placeholders: centre_id, data_policy, topic_path, href_path, href_name, "
            "asset_key, item_id"
        ) from None
    return data_id.lstrip("/").removeprefix("origin/")


def data_ids_of(event: CloudEvent, dataset: DatasetDescription) -> list[str]:
    """The data_ids the event's notifications will announce (known before building them)."""
    return [data_id_for(dataset, event.data, key, asset)
            for key, asset in data_assets(event.data, dataset)]


def _format_data_id(
    dataset: DatasetDescription, item: StacItem, asset_key: str, href_path: str
) -> str:
    return dataset.data_id_template.format(
        centre_id=dataset.centre_id,
        data_policy=dataset.data_policy,
        topic_path=dataset.topic_path,
        href_path=href_path,
        href_name=PurePosixPath(href_path).name,
        asset_key=asset_key,
        item_id=item.id,
    )


def media_type_for(dataset: DatasetDescription, asset: StacAsset) -> str:
    if asset.type:
        return asset.type
    suffix = PurePosixPath(urlsplit(asset.href).path).suffix
    return dataset.media_types.get(suffix) or dataset.media_types.get(suffix.lower()) or (
        dataset.default_media_type
    )


def inline_content(data: bytes, encoding: ContentEncoding | None = None) -> Content | None:
    """The `content` object for small data, or None when its encoded value is too long (or the
    data is not UTF-8 text for `encoding` utf-8).

    `encoding` None: utf-8 when the data is UTF-8 text, else base64. gzip: the gzip-compressed
    data, base64-encoded (`size` is the size of the file, uncompressed). The 4096-character
    limit is checked on the encoded value."""
    if encoding is None:
        try:
            data.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            encoding = "base64"
    if encoding == "utf-8":
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    elif encoding == "gzip":
        value = base64.b64encode(gzip.compress(data, mtime=0)).decode("ascii")
    else:
        value = base64.b64encode(data).decode("ascii")
    if len(value) > MAX_INLINE_CONTENT_CHARS or len(data) > MAX_INLINE_CONTENT_CHARS:
        return None
    return Content(encoding=encoding, value=value, size=len(data))


def _boolean(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _BOOLEAN_TEXT.get(value.strip().lower())
    return None


def cache_of(event: CloudEvent, dataset: DatasetDescription) -> bool:
    """Whether Global Caches may cache the event's files: the event's `cache` extension
    attribute, else its STAC item's `cache` property, else the dataset's `cache`. A value that
    is not a boolean (or the text true/false) is refused with its JSON path."""
    for path, holder in (("$.cache", event.model_extra),
                         ("$.data.properties.cache", event.data.properties.model_extra)):
        if holder and "cache" in holder:
            value = _boolean(holder["cache"])
            if value is None:
                raise InvalidInput([FieldError(
                    path=path, message=f"{holder['cache']!r} is not a boolean (true or false)")],
                    "event")
            return value
    return dataset.cache


def station_of(item: StacItem, dataset: DatasetDescription) -> str | None:
    """The WIGOS station identifier of the item (its `wigos_station_property`), checked."""
    name = dataset.wigos_station_property
    value = (item.properties.model_extra or {}).get(name)
    if value is None:
        return None
    if problem := wsi_problem(value):
        raise InvalidInput(
            [FieldError(path=json_path(("data", "properties", name)), message=problem)], "event")
    return value


# Namespace of the notification ids (UUIDv5): an id is a name in it, see `notification_id`.
NOTIFICATION_NAMESPACE = uuid5(NAMESPACE_URL, "urn:wis2-chain:notification")


def notification_id(event: CloudEvent, operation: Operation, dataset: str, data_id: str) -> UUID:
    """The id of the notification announcing `data_id` for this event: a UUID (version 5)
    derived from the event identity (source, id, asset checksums), the operation, the dataset and
    the data_id. The same event gives the same id on any host, after any crash, retry or re-run
    (Global Brokers drop a repeated id); a changed file or another operation gives another."""
    name = "\n".join((event.identity_key(), operation, dataset, data_id))
    return uuid5(NOTIFICATION_NAMESPACE, name)


def build_notifications(
    event: CloudEvent,
    dataset: DatasetDescription,
    *,
    operation: Operation | None = None,
    pubtime: datetime | None = None,
    contents: Mapping[str, bytes] | None = None,
    new_id: Callable[[], UUID] | None = None,
) -> list[Notification]:
    """One notification per data asset of the event's item; ids from `notification_id` unless
    `new_id` gives them."""
    item = event.data
    assets = data_assets(item, dataset)
    if not assets:
        roles = ", ".join(dataset.data_roles)
        raise InvalidInput(
            [FieldError(path="$.data.assets", message=f"no asset with a data role ({roles})")],
            "event",
        )
    refused = [
        FieldError(path=json_path(("data", "assets", key, "href")), message=reason)
        for key, asset in assets
        if (reason := dataset.href_refusal(asset.href))
    ]
    if refused:
        raise InvalidInput(refused, "event")
    operation = operation or event.operation
    rel = RELATION_OF_OPERATION[operation]
    cache = cache_of(event, dataset)
    station = station_of(item, dataset)
    published = rfc3339(pubtime or datetime.now(UTC))
    props = item.properties
    if props.start_datetime is not None and props.end_datetime is not None:
        times = {"start_datetime": rfc3339(props.start_datetime),
                 "end_datetime": rfc3339(props.end_datetime)}
    else:
        times = {"datetime": rfc3339(props.datetime)}  # type: ignore[arg-type]
    geometry = item.geometry.model_dump() if item.geometry else None

    notifications = []
    for key, asset in assets:
        data_id = data_id_for(dataset, item, key, asset)
        content = None
        if (dataset.inline_content and dataset.data_policy == "core" and contents
                and key in contents and rel != "deletion"):
            content = inline_content(contents[key], dataset.content_encoding)
        protected = {"security": dataset.security} if (
            dataset.security and rel in DATA_RELATIONS) else {}
        link = Link(href=asset.href, rel=rel, type=media_type_for(dataset, asset),
                    length=asset.file_size, **protected)
        links = [link, station_link(station)] if station else [link]
        notifications.append(
            Notification(
                id=str(new_id() if new_id else notification_id(event, operation, dataset.name,
                                                                data_id)),
                geometry=geometry,
                properties=NotificationProperties(
                    data_id=data_id,
                    metadata_id=dataset.metadata_id,
                    pubtime=published,
                    integrity=asset.integrity,
                    content=content,
                    cache=None if cache else False,  # omitted when true (the WNM default)
                    wigos_station_identifier=station,
                    **times,
                ),
                links=links,
            )
        )
    return notifications
