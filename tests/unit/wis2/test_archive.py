"""wis2.archive: the entries of a backfill source (directory, JSON lines, STAC), bad entries named
by position and JSON path, never stopping the others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pystac
import pytest

from tests.fixtures.paths import BUFR_EVENT
from wis2.archive import count_archive, event_for_item, read_archive
from wis2.errors import InvalidInput


def event(i: int) -> dict[str, Any]:
    data = json.loads(BUFR_EVENT.read_text(encoding="utf-8"))
    data["id"] = f"archive-{i:03d}"
    return data


def item(i: int) -> dict[str, Any]:
    """The reference event's STAC item for another file."""
    data = event(i)["data"]
    data["id"] = f"item-{i:03d}"
    return data


def test_directory_of_events_in_name_order_with_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text(json.dumps(event(1)))
    (tmp_path / "sub" / "b.json").write_text(json.dumps(event(2)))
    bad = event(3)
    del bad["data"]["assets"][next(iter(bad["data"]["assets"]))]["href"]
    (tmp_path / "c.json").write_text(json.dumps(bad))
    (tmp_path / "notes.txt").write_text("not an event")

    entries = list(read_archive(tmp_path))
    assert [e.position for e in entries] == ["a.json", "c.json", "sub/b.json"]
    assert [e.ok for e in entries] == [True, False, True]
    assert entries[1].errors[0].path.startswith("$.data.assets[")
    assert entries[1].errors[0].path.endswith(".href")
    assert count_archive(tmp_path) == 3


def test_json_lines_name_the_bad_line_and_go_on(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    lines = [json.dumps(event(1)), "", "{not json", json.dumps({"specversion": "1.0"}),
             json.dumps(event(2))]
    source.write_text("\n".join(lines) + "\n")

    entries = list(read_archive(source))
    assert [e.position for e in entries] == ["events.jsonl:1", "events.jsonl:3",
                                             "events.jsonl:4", "events.jsonl:5"]
    assert [e.ok for e in entries] == [True, False, False, True]
    assert entries[1].errors[0].path == "$" and "not JSON" in entries[1].errors[0].message
    assert {"$.id", "$.source", "$.type", "$.data"} <= {err.path for err in entries[2].errors}
    assert count_archive(source) == 4


def test_operation_override(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    source.write_text(json.dumps(event(1)) + "\n")
    [entry] = read_archive(source, operation="delete")
    assert entry.event is not None and entry.event["operation"] == "delete"


def test_stac_item_collection_gives_one_event_per_item(tmp_path: Path) -> None:
    broken = item(3)
    broken["assets"] = "nothing"
    source = tmp_path / "items.json"
    source.write_text(json.dumps({"type": "FeatureCollection",
                                  "features": [item(1), item(2), broken]}))

    entries = list(read_archive(source))
    assert [e.position for e in entries] == ["items.json#item-001", "items.json#item-002",
                                             "items.json#item-003"]
    assert [e.ok for e in entries] == [True, True, False]
    first = entries[0].event
    assert first is not None and first["data"]["id"] == "item-001"
    assert first["id"].startswith("backfill-") and first["source"] == "wis2-chain-backfill"
    # deterministic: the same item read again is the same event
    assert next(read_archive(source)).event["id"] == first["id"]
    assert count_archive(source) == 3


def test_static_stac_catalog_is_read_recursively(tmp_path: Path) -> None:
    catalog = pystac.Catalog(id="archive", description="an archive")
    child = pystac.Catalog(id="2026", description="a year")
    catalog.add_child(child)
    for i in (1, 2):
        child.add_item(pystac.Item.from_dict(item(i)))
    catalog.normalize_hrefs(str(tmp_path / "stac"))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)

    entries = list(read_archive(tmp_path / "stac" / "catalog.json"))
    assert sorted(e.position for e in entries) == ["catalog.json#item-001",
                                                   "catalog.json#item-002"]
    assert all(e.ok for e in entries), [e.errors for e in entries]
    hrefs = [next(iter(e.event["data"]["assets"].values()))["href"] for e in entries]
    assert all(h.startswith("https://") for h in hrefs)


def test_a_changed_checksum_is_another_event() -> None:
    one, two = item(1), item(1)
    asset = next(iter(two["assets"].values()))
    asset["file:checksum"] = "1220" + "ab" * 32
    assert event_for_item(one)["id"] != event_for_item(two)["id"]
    assert event_for_item(one)["id"] == event_for_item(item(1))["id"]


def test_a_missing_source_is_refused_with_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        list(read_archive(tmp_path / "nowhere"))
    assert caught.value.errors[0].path == "$.source"
