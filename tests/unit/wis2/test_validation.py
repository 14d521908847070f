"""Strict WNM validation: spec examples, the original chain's defects, the chain's own output, and
one mutation per check (each failure must name the field and the problem)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.paths import BUFR_EVENT, NETCDF_EVENT, ORIGINAL_NOTIFICATIONS, WNM_EXAMPLES
from wis2.validation import (
    CheckResult,
    ValidationFailed,
    ValidationReport,
    validate_notification,
)

ARGO_TOPIC = (
    "origin/a/wis2/fr-ifremer-argo/data/core/ocean/surface-based-observations/"
    "drifting-ocean-profilers"
)
ORIGINAL_DATA = ORIGINAL_NOTIFICATIONS / "IOPX01_LFVX_251403-msg-notification.json"


def _failed(report: ValidationReport) -> dict[str, str]:
    return {c.id: c.message for c in report.failures}


def _good() -> dict[str, Any]:
    """A strict, valid message of this node (the original chain's, with its two defects fixed)."""
    message = json.loads(ORIGINAL_DATA.read_text())
    digest = hashlib.sha512(b"argo profile").digest()
    message["properties"]["integrity"] = {
        "method": "sha512", "value": base64.b64encode(digest).decode()
    }
    message["properties"]["data_id"] = message["properties"]["data_id"].replace(
        "/core/data/", "/data/core/"
    )
    return message


def test_good_message_passes_publish_profile() -> None:
    report = validate_notification(_good(), topic=ARGO_TOPIC)
    assert report.ok, report.summary()
    assert not report.warnings
    ids = {c.id for c in report.checks}
    assert {"schema", "ets:links", "integrity-encoding", "single-link-relation", "size",
            "data-id", "topic", "timestamps-utc", "temporal-form"} <= ids
    assert "kpi" not in ids


@pytest.mark.parametrize("path", sorted(WNM_EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_every_spec_example_passes_spec_profile(path: Path) -> None:
    report = validate_notification(path.read_bytes(), profile="spec")
    assert report.ok, report.summary()
    assert all(w.id in {"integrity-encoding", "content-size", "data-id"} for w in report.warnings)


# What the publish profile refuses in each specification example: only the integrity encoding
# (hex, placeholder or absent digests) and, for example1, its illustrative content size.
PUBLISH_FAILURES = {
    "eumetsat-msg-seviri-core-notification.json": {"integrity-encoding": "looks like hex"},
    "eumetsat-msg-seviri-recommended-api-notification.json": {
        "integrity-encoding": "looks like hex"},
    "eumetsat-msg-seviri-recommended-notification.json": {"integrity-encoding": "looks like hex"},
    "example1.json": {"integrity-encoding": "not valid base64",
                      "content-size": "decoded size 27"},
    "example2.json": {"integrity-encoding": "not valid base64"},
    "example3.json": {"integrity-encoding": "no integrity given"},
    "example4.json": {},
}


def test_the_expectations_cover_every_spec_example() -> None:
    assert set(PUBLISH_FAILURES) == {p.name for p in WNM_EXAMPLES.glob("*.json")}


@pytest.mark.parametrize("name", sorted(PUBLISH_FAILURES))
def test_spec_examples_fail_publish_only_on_integrity_encoding(name: str) -> None:
    report = validate_notification((WNM_EXAMPLES / name).read_bytes(), profile="publish")
    failed = _failed(report)
    expected = PUBLISH_FAILURES[name]
    assert set(failed) == set(expected), report.summary()
    for check, words in expected.items():
        assert words in failed[check]
    assert report.ok is (not expected)


def test_spec_example_hex_integrity_is_an_error_for_publication() -> None:
    path = WNM_EXAMPLES / "eumetsat-msg-seviri-core-notification.json"
    report = validate_notification(path.read_bytes())
    assert not report.ok
    assert "looks like hex" in _failed(report)["integrity-encoding"]


def test_original_chain_notification_fails_publish_profile_naming_both_defects() -> None:
    report = validate_notification(ORIGINAL_DATA.read_bytes())
    failed = _failed(report)
    assert set(failed) == {"integrity-encoding", "data-id"}, report.summary()
    assert "looks like hex" in failed["integrity-encoding"]
    assert "base64 sha512" in failed["integrity-encoding"]
    assert "'core/data' order" in failed["data-id"]
    with pytest.raises(ValidationFailed) as raised:
        report.raise_for_failures()
    assert isinstance(raised.value, ValueError)
    assert "integrity-encoding" in str(raised.value) and "data-id" in str(raised.value)
    assert "looks like hex" in str(raised.value)

    spec = validate_notification(ORIGINAL_DATA.read_bytes(), profile="spec")
    assert spec.ok
    assert {w.id for w in spec.warnings} == {"integrity-encoding", "data-id"}


@pytest.mark.parametrize("event", [BUFR_EVENT, NETCDF_EVENT], ids=lambda p: p.stem)
def test_the_chain_builds_strict_messages(event: Path) -> None:
    from chain.settings import ChainSettings
    from wis2.cloudevent import parse_event
    from wis2.dataset import load_dataset
    from wis2.mapping import build_notifications

    settings = ChainSettings()
    dataset = load_dataset(settings.default_dataset, settings.datasets_dir)
    notifications = build_notifications(parse_event(event.read_bytes()), dataset)
    assert notifications
    for notification in notifications:
        report = validate_notification(notification.to_dict(), topic=dataset.topic)
        assert report.ok, report.summary()
        assert report.raise_for_failures() is report


def _mutate(**changes: Any) -> dict[str, Any]:
    message = _good()
    for dotted, value in changes.items():
        target = message
        *parents, leaf = dotted.split("__")
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return message


_DELETE = object()


@pytest.mark.parametrize(
    ("message", "check", "words"),
    [
        (_mutate(id="not-a-uuid"), "schema", ["$.id", "uuid"]),
        (_mutate(properties__pubtime="yesterday"), "schema", ["$.properties.pubtime"]),
        (_mutate(properties__pubtime="2025-03-14T03:00:00+02:00"), "timestamps-utc",
         ["properties.pubtime", "UTC"]),
        (_mutate(properties__pubtime=_DELETE), "timestamps-utc", ["pubtime is missing"]),
        (_mutate(properties__pubtime="2025-03-14T03:00:00Z\n"), "timestamps-utc",
         ["properties.pubtime", "UTC"]),
        (_mutate(properties__datetime="2025-03-14T03:00:00z"), "timestamps-utc",
         ["properties.datetime"]),
        (_mutate(properties__start_datetime="2025-03-14T00:00:00Z",
                 properties__end_datetime="2025-03-14T01:00:00Z"), "temporal-form", ["not both"]),
        (_mutate(properties__datetime=_DELETE), "temporal-form", ["missing time"]),
        (_mutate(properties__integrity={"method": "sha512", "value": "A2KNxvks...S8qfSCw=="}),
         "integrity-encoding", ["not valid base64"]),
        (_mutate(properties__integrity={"method": "sha256",
                                        "value": base64.b64encode(b"x" * 20).decode()}),
         "integrity-encoding", ["20 bytes", "32 bytes"]),
        (_mutate(properties__integrity={"method": "md5", "value": "AAAA"}),
         "integrity-encoding", ["md5"]),
        (_mutate(properties__data_id="origin/a/wis2/fr-ifremer-argo/data/core/x"), "data-id",
         ["must not start with a channel"]),
        (_mutate(properties__data_id=_DELETE), "data-id", ["data_id missing"]),
    ],
    ids=["uuid", "pubtime-format", "pubtime-offset", "no-pubtime", "pubtime-newline",
         "datetime-lower-z", "both-times", "no-time",
         "placeholder-integrity", "short-digest", "bad-method", "data-id-channel", "no-data-id"],
)
def test_each_defect_names_its_field(message: dict[str, Any], check: str, words: list[str]) -> None:
    report = validate_notification(message)
    assert not report.ok
    failed = _failed(report)
    assert check in failed, report.summary()
    for word in words:
        assert word in failed[check]


def test_link_relations_exactly_one() -> None:
    message = _good()
    update = copy.deepcopy(message["links"][0]) | {"rel": "update"}
    message["links"].append(update)
    failed = _failed(validate_notification(message))
    relation = failed["single-link-relation"]
    assert "canonical" in relation and "update" in relation

    message["links"] = [link for link in message["links"] if link["rel"] not in
                        ("canonical", "update")] + [{"href": "https://x.org/a", "rel": "item"}]
    failed = _failed(validate_notification(message))
    assert "found none" in failed["single-link-relation"]


def test_two_canonical_links_fail() -> None:
    message = _good()
    message["links"].append(copy.deepcopy(message["links"][0]) | {"href": "https://x.org/b"})
    report = validate_notification(message, topic=ARGO_TOPIC)
    failed = _failed(report)
    assert "single-link-relation" in failed, report.summary()
    assert "['canonical', 'canonical']" in failed["single-link-relation"]
    assert "exactly one" in failed["single-link-relation"]


def test_an_extra_link_of_another_relation_is_fine() -> None:
    message = _good()
    message["links"].append({"href": "https://x.org/about", "rel": "describedby",
                             "type": "text/html"})
    assert validate_notification(message, topic=ARGO_TOPIC).ok


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        ("", "empty"),
        ("origin/a/wis2/fr-ifremer-argo/core/data/ocean", "level 5 is 'core'"),
        ("origin/a/wis2/no-such-centre/data/core/ocean/surface-based-observations/"
         "drifting-ocean-profilers", "centre-id 'no-such-centre'"),
        ("origin/a/wis2/fr-ifremer-argo/data/core/ocean/no-such-sub-discipline",
         "not in the WIS2 Topic Hierarchy"),
        ("origin/a/wis2/fr-ifremer-argo/data/core", "data policy and an earth-system"),
        ("cache/a/wis2/fr-ifremer-argo/data/core/ocean", "does not start with"),
        ("origin/a/wis2/fr-ifremer-argo/data/core/Ocean", "lowercase"),
        ("origin/a/wis2/fr-ifremer-argo/data/core/ocean/+", "wildcards"),
    ],
)
def test_invalid_topics_fail_the_topic_check(topic: str, words: str) -> None:
    report = validate_notification(_good(), topic=topic)
    failed = _failed(report)
    assert set(failed) == {"topic"}, report.summary()
    assert words in failed["topic"]


def test_message_size_limit() -> None:
    message = _good()
    message["properties"]["title"] = "x" * 9000
    failed = _failed(validate_notification(message))
    assert "at most 8192" in failed["size"]


def test_inline_content_limits() -> None:
    message = _good()
    raw = b"a" * 4000
    message["properties"]["content"] = {
        "encoding": "base64", "value": base64.b64encode(raw).decode(), "size": len(raw)
    }
    failed = _failed(validate_notification(message))
    assert "content.value" in failed["content-size"] and "4096" in failed["content-size"]

    message["properties"]["content"] = {"encoding": "base64", "value": "!!notbase64", "size": 3}
    assert "not base64" in _failed(validate_notification(message))["content-size"]

    message["properties"]["content"] = {"encoding": "utf-8", "value": "hello", "size": 6}
    assert "decoded size 5" in _failed(validate_notification(message))["content-size"]

    message["properties"]["content"]["size"] = 5
    report = validate_notification(message)
    assert report.ok, report.summary()


def test_topic_checks() -> None:
    message = _good()
    assert validate_notification(message, topic=ARGO_TOPIC).ok

    wrong_order = ARGO_TOPIC.replace("/data/core/", "/core/data/")
    failed = _failed(validate_notification(message, topic=wrong_order))
    assert "topic" in failed and "'core'" in failed["topic"]

    other_centre = ARGO_TOPIC.replace("fr-ifremer-argo", "fr-meteofrance")
    failed = _failed(validate_notification(message, topic=other_centre))
    assert "metadata_id" in failed["topic"] and "fr-meteofrance" in failed["topic"]

    failed = _failed(validate_notification(message, topic=ARGO_TOPIC + "/#"))
    assert "wildcard" in failed["topic"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b"\xff\xfe", "not UTF-8"), ("{", "not JSON"), ("[1, 2]", "JSON object"), ("", "not JSON")],
)
def test_bad_input_is_a_failed_check_not_an_exception(raw: bytes | str, words: str) -> None:
    report = validate_notification(raw)
    assert not report.ok
    assert words in _failed(report)["json"]
    assert report.subject == "?"


def test_empty_object_says_which_fields_are_required() -> None:
    failed = _failed(validate_notification({}))
    assert "'id' is a required property" in failed["schema"]
    assert "'links' is a required property" in failed["schema"]


def test_report_rows_summary_and_kpi_flag() -> None:
    report = validate_notification(ORIGINAL_DATA.read_bytes(), profile="spec")
    rows = report.rows()
    assert all(set(row) == {"check", "result", "message"} for row in rows)
    results = {row["check"]: row["result"] for row in rows}
    assert results["integrity-encoding"] == "WARNING"
    assert results["schema"] == "PASSED"
    assert "valid" in report.summary() and "2 warnings" in report.summary()
    failing = ValidationReport(subject="s", kind="wnm", checks=[
        CheckResult(id="size", passed=False, severity="error", message="too big")])
    assert "size: too big" in failing.summary()
    assert failing.summary_row() == {"result": "FAILED", "checks": "1 of 1 failed",
                                     "details": "size FAILED: too big"}
    passed = report.summary_row()
    assert passed["result"] == "PASSED" and passed["checks"] == f"{len(rows)} passed"
    assert passed["details"].count("integrity-encoding WARNING") == 1  # warnings are named

    with_kpi = validate_notification(_good(), kpi=True)
    kpi = [c for c in with_kpi.checks if c.id == "kpi"]
    assert len(kpi) == 1 and kpi[0].severity == "warning"  # never blocks publication
    assert with_kpi.ok


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_wnm_keys = st.sampled_from(["id", "type", "geometry", "properties", "links", "conformsTo"])
_prop_keys = st.sampled_from(["pubtime", "datetime", "integrity", "data_id", "content",
                              "metadata_id", "start_datetime", "end_datetime"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    top=st.dictionaries(_wnm_keys, _json, max_size=6),
    props=st.dictionaries(_prop_keys, _json, max_size=8),
    links=_json,
)
def test_validation_never_raises(top: dict[str, Any], props: dict[str, Any], links: Any) -> None:
    top = top | {"properties": props} if props else top
    if links is not None:
        top["links"] = links
    report = validate_notification(top, topic="origin/a/wis2/x")
    assert isinstance(report, ValidationReport)
    assert report.summary()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert not validate_notification(raw).ok


# ---- WNM 1.3 semantics ------------------------------------------------------------------------


def test_global_cache_is_refused_for_publication_and_reported_for_third_parties() -> None:
    message = _good()
    message["properties"]["global-cache"] = "de-dwd-global-cache"
    failed = _failed(validate_notification(message, topic=ARGO_TOPIC))
    assert set(failed) == {"global-cache"}
    assert "only by a Global Cache" in failed["global-cache"]
    report = validate_notification(message, profile="spec")
    assert "global-cache" not in _failed(report)
    assert any(c.id == "global-cache" and c.passed for c in report.checks)


def test_an_update_must_be_later_than_what_it_updates() -> None:
    message = _good()
    message["links"][0]["rel"] = "update"
    pubtime = message["properties"]["pubtime"]
    assert validate_notification(message, previous_pubtime="2020-01-01T00:00:00Z").ok
    for earlier_or_same in (pubtime, "2099-01-01T00:00:00.5Z"):
        failed = _failed(validate_notification(message, previous_pubtime=earlier_or_same))
        assert set(failed) == {"update-pubtime"}
        assert "not later than" in failed["update-pubtime"]
    # no previous publication known, or not an update: nothing to compare
    assert validate_notification(message).ok
    message["links"][0]["rel"] = "canonical"
    assert validate_notification(message, previous_pubtime="2099-01-01T00:00:00Z").ok


def test_extra_links_beside_the_one_announcing_link_are_accepted() -> None:
    message = _good()
    message["links"] += [
        {"href": "https://oscar.wmo.int/surface/#/search/station/stationReportDetails/"
                 "0-20000-0-06447", "rel": "via", "type": "text/html"},
        {"href": "https://x.org/dataset", "rel": "collection"},
        {"href": "https://x.org/about", "rel": "about", "type": "text/html"},
    ]
    report = validate_notification(message, topic=ARGO_TOPIC)
    assert report.ok, report.summary()


def test_a_bad_station_identifier_fails_its_check() -> None:
    message = _good()
    message["properties"]["wigos_station_identifier"] = "0-20000-06447"
    failed = _failed(validate_notification(message))
    assert set(failed) == {"wigos-station-identifier"}
    assert "properties.wigos_station_identifier" in failed["wigos-station-identifier"]


def test_recommended_data_is_never_inlined() -> None:
    topic = ("origin/a/wis2/fr-meteofrance/data/recommended/weather/prediction/forecast/"
             "medium-range/deterministic/global")
    message = _good()
    message["properties"]["data_id"] = "wis2/fr-meteofrance/data/recommended/x.grib2"
    message["properties"]["metadata_id"] = "urn:wmo:md:fr-meteofrance:nwp"
    assert validate_notification(message, topic=topic).ok
    message["properties"]["content"] = {"encoding": "utf-8", "value": "GRIB", "size": 4}
    failed = _failed(validate_notification(message, topic=topic))
    assert set(failed) == {"topic"} and "never inlined" in failed["topic"]


def test_gzip_content_size_is_the_decompressed_size() -> None:
    import gzip

    raw = b"observation " * 100
    message = _good()
    value = base64.b64encode(gzip.compress(raw)).decode()
    message["properties"]["content"] = {"encoding": "gzip", "value": value, "size": len(raw)}
    assert validate_notification(message).ok
    message["properties"]["content"]["size"] = len(raw) - 1
    assert "decoded size" in _failed(validate_notification(message))["content-size"]
    message["properties"]["content"]["value"] = base64.b64encode(raw).decode()  # not gzip
    assert "not gzip" in _failed(validate_notification(message))["content-size"]


def test_a_link_security_object_is_checked_by_the_schema() -> None:
    message = _good()
    message["links"][0]["security"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    assert validate_notification(message, topic=ARGO_TOPIC).ok
    message["links"][0]["security"] = {"bearer": {"type": "http"}}
    assert "schema" in _failed(validate_notification(message, topic=ARGO_TOPIC))


def _pywis_pubsub_ets(message: dict[str, Any]) -> list[tuple[str, str]] | str:
    """pywis-pubsub's own ETS on `message`: each test's id and code, or why it stopped."""
    from pywis_pubsub.ets import WNMTestSuite

    try:
        results = WNMTestSuite(copy.deepcopy(message)).run_tests(fail_on_schema_validation=True)
    except ValueError:
        return "stopped: the message fails the WNM schema"
    return [(t["id"], t["code"]) for t in results["ets-report"]["tests"]]


def _ets_rows(report: ValidationReport) -> list[tuple[str, bool]]:
    return [(c.id, c.passed) for c in report.checks if c.id == "ets" or c.id.startswith("ets:")]


_ETS_CASES = {
    **{p.name: json.loads(p.read_text()) for p in sorted(WNM_EXAMPLES.glob("*.json"))},
    "original-chain": json.loads(ORIGINAL_DATA.read_text()),
    "good": _good(),
    "not-a-uuid": _mutate(id="not-a-uuid"),  # fails the schema with and without formats
    "pubtime-not-a-date": _mutate(properties__pubtime="yesterday"),  # a format error only
    "no-links": _mutate(links=_DELETE),
    "no-data-id": _mutate(properties__data_id=_DELETE),
}


@pytest.mark.parametrize("name", sorted(_ETS_CASES))
def test_the_ets_answers_as_pywis_pubsubs_own(name: str) -> None:
    """The ETS run with its schema test answered from the schema loaded once (it reads and
    builds the schema per message in pywis-pubsub) passes and fails exactly what pywis-pubsub's
    own suite does."""
    message = _ETS_CASES[name]
    own = _pywis_pubsub_ets(message)
    rows = _ets_rows(validate_notification(copy.deepcopy(message), profile="spec"))
    if isinstance(own, str):
        assert rows == [("ets", False)], rows
    else:
        assert rows == [("ets:" + test_id.rsplit("/", 1)[-1], code != "FAILED")
                        for test_id, code in own]


def test_the_wnm_schema_has_no_format_under_a_not() -> None:
    """What lets the ETS's schema test be skipped when the format-checking "schema" check
    passed: checking formats can only add errors, unless a `not` holds a `format`."""
    from wis2.wnm_schema import wnm_schema

    def formats_under_not(node: Any, negated: bool = False) -> bool:
        if isinstance(node, dict):
            return (negated and "format" in node) or any(
                formats_under_not(value, negated or key == "not") for key, value in node.items())
        if isinstance(node, list):
            return any(formats_under_not(item, negated) for item in node)
        return False

    assert not formats_under_not(wnm_schema())
