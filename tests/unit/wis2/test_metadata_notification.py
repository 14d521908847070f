"""The pure builder of metadata notifications: ids, relations, integrity of the served bytes."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures.paths import ARGO_METADATA, DATA, WCMP2_EXAMPLES
from wis2.errors import InvalidInput
from wis2.metadata_notification import (
    Wcmp2Record,
    build_metadata_notification,
    centre_id_of,
    metadata_data_id,
    parse_record,
    record_datetime,
    record_file_name,
    record_id_of,
)
from wis2.relations import relation_for
from wis2.topics import metadata_topic
from wis2.validation import validate_notification
from wis2.wcmp2 import validate_wcmp2

DEMO = DATA / "demo-metadata.json"


def _argo() -> tuple[bytes, dict]:
    raw = ARGO_METADATA.read_bytes()
    return raw, parse_record(raw)


def test_argo_record_notification_announces_served_bytes() -> None:
    raw, record = _argo()
    pubtime = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    msg = build_metadata_notification(
        record, raw, href="https://example.org/md/argo.json", rel="canonical", pubtime=pubtime
    )
    data = msg.to_dict()
    assert data["conformsTo"] == ["http://wis.wmo.int/spec/wnm/1/conf/core"]
    assert data["geometry"] is None
    props = data["properties"]
    assert props["data_id"] == (
        "wis2/fr-ifremer-argo/metadata/urn:wmo:md:fr-ifremer-argo:cor:msg:argo"
    )
    assert props["metadata_id"] == "urn:wmo:md:fr-ifremer-argo:cor:msg:argo"
    assert props["pubtime"] == "2026-11-28T10:00:00Z"
    assert props["datetime"] == "2025-08-20T14:00:00Z"
    assert props["integrity"] == {
        "method": "sha512",
        "value": base64.b64encode(hashlib.sha512(raw).digest()).decode(),
    }
    (link,) = data["links"]
    assert link["rel"] == "canonical"
    assert link["type"] == "application/geo+json"
    assert link["length"] == len(raw)
    assert link["href"] == "https://example.org/md/argo.json"
    assert len(msg.to_json().encode()) <= 8192


def test_each_build_gets_a_new_uuid_unless_given() -> None:
    raw, record = _argo()
    a = build_metadata_notification(record, raw, href="https://x/a.json", rel="canonical")
    b = build_metadata_notification(record, raw, href="https://x/a.json", rel="canonical")
    assert a.id != b.id
    c = build_metadata_notification(
        record, raw, href="https://x/a.json", rel="update", message_id=a.id
    )
    assert c.id == a.id and c.rel == "update"


def test_deletion_without_bytes_has_metadata_id_and_no_integrity() -> None:
    _, record = _argo()
    msg = build_metadata_notification(record, None, href="https://x/a.json", rel="deletion")
    data = msg.to_dict()
    assert data["links"][0]["rel"] == "deletion"
    assert data["properties"]["metadata_id"] == record["id"]
    assert "integrity" not in data["properties"]
    with pytest.raises(ValueError, match="served bytes"):
        build_metadata_notification(record, None, href="https://x/a.json", rel="update")


PUBLISHED = SimpleNamespace(rel="canonical", checksum="sha512:AAA")


def test_relation_is_decided_by_what_was_already_published() -> None:
    assert relation_for("create", None, republication=True) == "canonical"
    assert relation_for("update", None, republication=True) == "canonical"
    assert relation_for("create", PUBLISHED, republication=True) == "update"
    assert relation_for("update", PUBLISHED, republication=True) == "update"
    assert relation_for("delete", PUBLISHED, republication=True) == "deletion"
    assert relation_for("delete", None, republication=True) == "deletion"


@pytest.mark.parametrize(
    "bad",
    [
        "urn:wmo:md:Fr-Ifremer:argo",  # upper case centre-id
        "urn:wmo:md:ifremer:argo",  # centre-id without a hyphen
        "urn:x:md:fr-ifremer-argo:argo",
        "urn:wmo:md:fr-ifremer-argo:ar go",
        "urn:wmo:md:fr-ifremer-argo:../../etc/passwd",
        "",
    ],
)
def test_broken_identifier_is_named(bad: str) -> None:
    with pytest.raises(InvalidInput) as err:
        record_id_of({"id": bad})
    assert err.value.errors[0].path == "$.id"
    with pytest.raises(ValueError):
        record_file_name(bad)


def test_centre_and_file_name() -> None:
    _, record = _argo()
    assert centre_id_of(record) == "fr-ifremer-argo"
    assert record_file_name(record["id"]) == "urn:wmo:md:fr-ifremer-argo:cor:msg:argo.json"
    assert metadata_data_id("fr-x-y", "urn:wmo:md:fr-x-y:a") == (
        "wis2/fr-x-y/metadata/urn:wmo:md:fr-x-y:a"
    )


def test_datetime_prefers_updated_and_names_bad_field() -> None:
    assert record_datetime({"properties": {"created": "2024-01-01T00:00:00+02:00"}}) == (
        "2023-12-31T22:00:00Z"
    )
    assert record_datetime(
        {"properties": {"created": "2024-01-01T00:00:00Z", "updated": "2024-02-01T00:00:00Z"}}
    ) == "2024-02-01T00:00:00Z"
    with pytest.raises(InvalidInput, match=r"\$\.properties\.updated"):
        record_datetime({"properties": {"updated": "yesterday"}})
    with pytest.raises(InvalidInput, match=r"\$\.properties\.created"):
        record_datetime({"properties": {}})


def test_parse_record_errors_are_clear() -> None:
    with pytest.raises(InvalidInput, match="not valid JSON"):
        parse_record(b"{nope", "record.json")
    with pytest.raises(InvalidInput, match="expected a JSON object"):
        parse_record(b"[1]", "record.json")


def test_pasted_record_round_trips_without_added_members() -> None:
    original = json.loads(DEMO.read_text(encoding="utf-8"))
    model = Wcmp2Record.model_validate(original)
    assert model.to_dict() == original
    assert json.loads(model.to_bytes()) == original
    assert model.to_bytes().endswith(b"\n")
    # extras are kept
    argo = json.loads(ARGO_METADATA.read_text(encoding="utf-8"))
    assert Wcmp2Record.model_validate(argo).to_dict()["linkTemplates"] == argo["linkTemplates"]


RECORDS = [*sorted(WCMP2_EXAMPLES.glob("*.json")), ARGO_METADATA, DEMO]


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_reference_records_validate_and_yield_valid_notifications(
    path: Path, reference_dir: Path
) -> None:
    """Every WCMP2 spec example (all from valid centres), the Argo record and the demo record."""
    raw = path.read_bytes()
    record = parse_record(raw, path.name)
    report = validate_wcmp2(record)
    assert report.ok, report.summary()
    msg = build_metadata_notification(
        record, raw, href=f"https://node.example.org/md/{path.name}", rel="canonical"
    )
    topic = metadata_topic(centre_id_of(record))
    wnm = validate_notification(msg.to_dict(), topic=topic, profile="publish")
    assert wnm.ok, wnm.summary()
    deletion = build_metadata_notification(
        record, None, href="https://x.org/a.json", rel="deletion"
    )
    assert validate_notification(deletion.to_dict(), topic=topic, profile="publish").ok
