"""WCMP2 validation: the Argo record and the specification examples pass; broken identifiers,
channels and schema errors fail with messages naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.paths import ARGO_METADATA, DATA, WCMP2_EXAMPLES
from wis2.topics import metadata_topic, publication_topic_problem
from wis2.wcmp2 import centre_id_of_record, validate_wcmp2

ARGO_CHANNEL = (
    "origin/a/wis2/fr-ifremer-argo/data/core/ocean/surface-based-observations/"
    "drifting-ocean-profilers"
)


def _argo() -> dict[str, Any]:
    return json.loads(ARGO_METADATA.read_text())


def _failed(record: Any) -> dict[str, str]:
    report = validate_wcmp2(record)
    assert not report.ok
    return {c.id: c.message for c in report.failures}


def test_argo_record_passes() -> None:
    report = validate_wcmp2(ARGO_METADATA.read_bytes())
    assert report.ok, report.summary()
    assert report.kind == "wcmp2"
    assert report.subject == "urn:wmo:md:fr-ifremer-argo:cor:msg:argo"
    ids = {c.id for c in report.checks}
    assert {"identifier", "schema", "channels", "ets:identifier"} <= ids
    assert sum(1 for c in report.checks if c.id.startswith("ets:")) >= 10
    assert "kpi" not in ids
    assert "1 valid channel" in next(c.message for c in report.checks if c.id == "channels")


def _examples() -> list[Path]:
    return sorted(WCMP2_EXAMPLES.glob("*.json"))


def test_demo_record_passes() -> None:
    report = validate_wcmp2((DATA / "demo-metadata.json").read_bytes())
    assert report.ok, report.summary()


def test_there_are_spec_examples() -> None:
    assert len(_examples()) >= 10


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_every_spec_example_passes(path: Path) -> None:
    record = json.loads(path.read_text())
    centre = centre_id_of_record(record.get("id"))
    assert centre is not None and publication_topic_problem(metadata_topic(centre)) is None
    report = validate_wcmp2(path.read_bytes())
    assert report.ok, report.summary()
    assert not report.failures


@pytest.mark.parametrize(
    "identifier",
    ["urn:wmo:md:Bad Id", "argo", "urn:wmo:md::x",
     "urn:wmo:md:fr-ifremer-argo:cor:msg:argo\n"],  # `$` once let a final newline through
)
def test_broken_identifier_is_named(identifier: str) -> None:
    record = _argo() | {"id": identifier}
    failed = _failed(record)
    assert repr(identifier) in failed["identifier"]
    assert "urn:wmo:md:<centre-id>:<local-id>" in failed["identifier"]


def test_invalid_channel_is_named() -> None:
    record = _argo()
    bad = "origin/a/wis2/fr-ifremer-argo/data/core/bogus"
    record["links"][1]["channel"] = bad
    failed = _failed(record)
    assert bad in failed["channels"]


def test_channel_of_another_centre_is_refused() -> None:
    record = _argo()
    other = ARGO_CHANNEL.replace("fr-ifremer-argo", "fr-meteofrance")
    record["links"][1]["channel"] = other
    failed = _failed(record)
    assert other in failed["channels"] and "fr-ifremer-argo" in failed["channels"]


def test_cache_channel_of_own_topic_is_accepted() -> None:
    record = _argo()
    record["links"].append({"rel": "items", "href": "mqtts://globalbroker.example.org",
                            "channel": ARGO_CHANNEL.replace("origin/", "cache/", 1),
                            "type": "application/geo+json"})
    report = validate_wcmp2(record)
    assert report.ok, report.summary()


def test_schema_errors_carry_json_paths() -> None:
    record = _argo()
    del record["properties"]["title"]
    record["time"] = "tomorrow"
    failed = _failed(record)
    assert "$.properties" in failed["schema"] and "'title'" in failed["schema"]
    assert "$.time" in failed["schema"]


@pytest.mark.parametrize(("raw", "words"), [(b"\xff", "UTF-8"), ("{", "not JSON"),
                                            ("[]", "JSON object")])
def test_bad_input_is_a_failed_check(raw: bytes | str, words: str) -> None:
    assert words in _failed(raw)["json"]


def test_kpi_only_on_request_and_never_an_error() -> None:
    report = validate_wcmp2(_argo(), kpi=True)
    kpi = [c for c in report.checks if c.id == "kpi"]
    assert len(kpi) == 1 and kpi[0].severity == "warning"
    assert report.ok
