"""The events of an archive to backfill, read from one SOURCE path.

A source is one of:
- a directory of CloudEvent JSON files (``*.json``, read in name order, sub-directories included);
- a JSON-lines file (``*.jsonl`` / ``*.ndjson``: one CloudEvent per line, blank lines skipped);
- a STAC ItemCollection or a static STAC catalog (a JSON file whose ``type`` is
  ``FeatureCollection`` or ``Catalog``/``Collection``, read with pystac): each item becomes one
  event announcing its assets, with a deterministic id (the same item with the same checksums is
  the same event, so a second backfill finds it already published);
- a single CloudEvent JSON file.

`read_archive` yields one `ArchiveEntry` per entry, in order: the parsed event, or the field
errors that refused it, always with its position (``file``, ``file:line`` or ``catalog#item``) so
that an operator can find and fix it. A bad entry never stops the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pystac
from pydantic import BaseModel

from wis2.cloudevent import CloudEvent, parse_event
from wis2.errors import FieldError, InvalidInput
from wis2.relations import Operation

SourceKind = Literal["directory", "jsonl", "stac", "event"]
BACKFILL_SOURCE = "wis2-chain-backfill"  # `source` of the events made from STAC items
BACKFILL_TYPE = "int.wmo.wis2.backfill.item"  # `type` of those events
JSONL_SUFFIXES = (".jsonl", ".ndjson")
STAC_TYPES = ("FeatureCollection", "Catalog", "Collection")


class ArchiveEntry(BaseModel):
    """One entry of a source: an event, or why it was refused."""

    position: str  # where it is: a file, `file:line`, or `catalog#item-id`
    event: dict[str, Any] | None = None  # the CloudEvent as JSON, ready for a flow run
    errors: list[FieldError] = []

    @property
    def ok(self) -> bool:
        return self.event is not None


def source_kind(path: Path) -> SourceKind:
    """What kind of source `path` is; `InvalidInput` naming the problem otherwise."""
    if path.is_dir():
        return "directory"
    if not path.is_file():
        raise InvalidInput([FieldError(path="$.source", message=f"{path}: no such file or "
                                       "directory")], "backfill source")
    if path.suffix.lower() in JSONL_SUFFIXES:
        return "jsonl"
    try:
        with path.open("rb") as handle:
            head = json.loads(handle.read())
    except (OSError, ValueError) as exc:
        raise InvalidInput([FieldError(path="$.source", message=f"{path}: not a JSON file, a "
                                       f"JSON-lines file or a directory ({exc})")],
                           "backfill source") from None
    if isinstance(head, dict) and head.get("type") in STAC_TYPES:
        return "stac"
    return "event"


def read_archive(source: str | Path, operation: Operation | None = None) -> Iterator[ArchiveEntry]:
    """Every entry of `source`, in order; `operation` overrides each event's operation."""
    path = Path(source).expanduser()
    kind = source_kind(path)
    if kind == "directory":
        entries = _directory(path)
    elif kind == "jsonl":
        entries = _jsonl(path)
    elif kind == "stac":
        entries = _stac(path)
    else:
        entries = iter([_checked(str(path), path.read_bytes())])
    for entry in entries:
        if entry.event is not None and operation is not None:
            entry.event["operation"] = operation
        yield entry


def count_archive(source: str | Path) -> int:
    """How many entries `read_archive` will yield (for progress), without parsing events."""
    path = Path(source).expanduser()
    kind = source_kind(path)
    if kind == "directory":
        return sum(1 for _ in _event_files(path))
    if kind == "jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if kind == "stac":
        return sum(1 for _ in _stac(path))
    return 1


def _checked(position: str, raw: bytes | str | dict[str, Any]) -> ArchiveEntry:
    try:
        event: CloudEvent = parse_event(raw)
    except InvalidInput as exc:
        return ArchiveEntry(position=position, errors=exc.errors)
    return ArchiveEntry(position=position, event=event.to_dict())


def _event_files(directory: Path) -> Iterator[Path]:
    return (p for p in sorted(directory.rglob("*.json")) if p.is_file())


def _directory(directory: Path) -> Iterator[ArchiveEntry]:
    for file in _event_files(directory):
        position = str(file.relative_to(directory))
        try:
            raw = file.read_bytes()
        except OSError as exc:
            yield ArchiveEntry(position=position, errors=[
                FieldError(path="$", message=f"cannot read: {exc.strerror or exc}")])
            continue
        yield _checked(position, raw)


def _jsonl(path: Path) -> Iterator[ArchiveEntry]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield _checked(f"{path.name}:{number}", line)


def _stac(path: Path) -> Iterator[ArchiveEntry]:
    """Items of an ItemCollection or (recursively) of a static catalog, as events."""
    try:
        document = json.loads(path.read_bytes())
        if document.get("type") == "FeatureCollection":
            items = _collection_items(path, document)
        else:
            catalog = pystac.read_file(str(path))
            items = (
                (f"{path.name}#{item.id}", item) for item in catalog.get_items(recursive=True)
            )
        for position, item in items:
            if isinstance(item, ArchiveEntry):
                yield item
                continue
            item.make_asset_hrefs_absolute()
            yield _checked(position, event_for_item(item.to_dict(include_self_link=False)))
    except (OSError, ValueError, pystac.STACError) as exc:
        yield ArchiveEntry(position=path.name, errors=[
            FieldError(path="$", message=f"not a readable STAC catalog: {exc}")])


def _collection_items(
    path: Path, document: dict[str, Any]
) -> Iterator[tuple[str, pystac.Item] | tuple[str, ArchiveEntry]]:
    features = document.get("features")
    if not isinstance(features, list):
        yield "", ArchiveEntry(position=path.name, errors=[
            FieldError(path="$.features", message="an ItemCollection needs a features list")])
        return
    for index, feature in enumerate(features):
        position = f"{path.name}#{feature.get('id', index) if isinstance(feature, dict) else index}"
        try:
            yield position, pystac.Item.from_dict(feature, root=None, preserve_dict=True)
        except Exception as exc:  # pystac raises many kinds for a malformed item
            yield "", ArchiveEntry(position=position, errors=[
                FieldError(path=f"$.features[{index}]", message=f"not a STAC item: {exc}")])


def event_for_item(item: dict[str, Any]) -> dict[str, Any]:
    """A CloudEvent announcing a STAC item's assets. Its id is derived from the item id and the
    assets' checksums: the same file announced again is the same event."""
    assets = item.get("assets") if isinstance(item.get("assets"), dict) else {}
    checksums = sorted(
        (key, str(asset.get("file:checksum", "")) if isinstance(asset, dict) else "")
        for key, asset in assets.items()
    )
    material = json.dumps([item.get("id"), checksums], separators=(",", ":"))
    digest = hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]
    return {
        "specversion": "1.0",
        "id": f"backfill-{digest}",
        "source": BACKFILL_SOURCE,
        "type": BACKFILL_TYPE,
        "datacontenttype": "application/json",
        "data": item,
    }
