"""wis2.delivery: which topics are watched, which notifications expect a cache copy, cache copy
matching fields, the redelivery decision and the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from wis2.delivery import (
    CACHE_NOT_EXPECTED,
    CACHED,
    RELAYED,
    UNDELIVERED,
    cache_copy,
    channel_of,
    due_for_redelivery,
    expects_cache_copy,
    integrity_of,
    parse_time,
    report_markdown,
    subscriptions,
    summarize,
)

CENTRE = "fr-ifremer-argo"
CORE = f"origin/a/wis2/{CENTRE}/data/core/ocean/surface-based-observations/drifting-ocean-profilers"


def test_subscriptions_and_channels() -> None:
    assert subscriptions(CENTRE) == [f"origin/a/wis2/{CENTRE}/#", f"cache/a/wis2/{CENTRE}/#",
                                     f"monitor/a/wis2/{CENTRE}/#"]
    assert channel_of(CORE, CENTRE) == "origin"
    assert channel_of("cache/" + CORE.split("/", 1)[1], CENTRE) == "cache"
    assert channel_of(f"monitor/a/wis2/{CENTRE}/gdc", CENTRE) == "monitor"
    assert channel_of(CORE, "de-dwd") is None
    assert channel_of("diffusion/files/x", CENTRE) is None


@pytest.mark.parametrize(("topic", "properties", "expected"), [
    (CORE, {}, True),
    (CORE, {"cache": True}, True),
    (CORE, {"cache": False}, False),
    (CORE.replace("/core/", "/recommended/"), {}, False),
    (f"origin/a/wis2/{CENTRE}/metadata", {}, False),
])
def test_which_notifications_expect_a_cache_copy(topic: str, properties: dict,
                                                  expected: bool) -> None:
    assert expects_cache_copy(topic, {"properties": properties}) is expected


def test_a_cache_copy_is_matched_by_data_id_and_pubtime() -> None:
    message = {"id": "new-id", "properties": {
        "data_id": "wis2/x/a.nc", "pubtime": "2026-12-05T10:00:00Z", "global-cache": "gc-1",
        "integrity": {"method": "sha512", "value": "abc="}},
        "links": [{"rel": "via", "href": "https://x/other"},
                  {"rel": "canonical", "href": "https://gc-1/a.nc"}]}
    copy = cache_copy(message)
    assert copy is not None
    assert (copy.notification_id, copy.data_id, copy.pubtime, copy.integrity, copy.href,
            copy.global_cache) == ("new-id", "wis2/x/a.nc", "2026-12-05T10:00:00Z",
                                   "sha512:abc=", "https://gc-1/a.nc", "gc-1")
    assert cache_copy({"properties": {"data_id": "x"}}) is None
    assert integrity_of({"properties": {}}) is None


def test_the_redelivery_decision() -> None:
    sent = parse_time("2026-12-05T10:00:00Z")
    later = sent + timedelta(seconds=301)
    assert due_for_redelivery(sent, True, 0, later, 300, 3) == "done"
    assert due_for_redelivery(sent, False, 0, sent + timedelta(seconds=299), 300, 3) == "wait"
    assert due_for_redelivery(sent, False, 0, later, 300, 3) == "redeliver"
    assert due_for_redelivery(sent, False, 3, later, 300, 3) == "undelivered"
    assert due_for_redelivery(sent, False, 0, later, 300, 0) == "undelivered"
    assert parse_time("2026-12-05T10:00:00+00:00") == datetime(2026, 12, 5, 10, tzinfo=UTC)


def test_the_report() -> None:
    records = [
        {"notification_id": "1", "data_id": "d1", "state": RELAYED, "cache_state": CACHED,
         "redeliveries": 0},
        {"notification_id": "2", "data_id": "d2", "state": RELAYED,
         "cache_state": CACHE_NOT_EXPECTED, "redeliveries": 1},
        {"notification_id": "3", "data_id": "d3", "state": UNDELIVERED,
         "cache_state": CACHE_NOT_EXPECTED, "redeliveries": 3},
    ]
    relays = [{"source": "gb-a", "delay_s": 1.0}, {"source": "gb-a", "delay_s": 3.0},
              {"source": "gb-b", "delay_s": 2.0}]
    report = summarize("argo", records, relays)
    assert (report.published, report.relayed, report.undelivered, report.cached,
            report.cache_expected, report.redelivered) == (3, 2, 1, 1, 1, 2)
    assert report.brokers["gb-a"].median_delay_s == 2.0
    assert report.brokers["gb-a"].worst_delay_s == 3.0
    assert report.undelivered_data_ids == ["d3"]
    assert report.undelivered_share == pytest.approx(1 / 3)
    text = report_markdown(report, "24 h")
    assert report.brokers["gb-b"].not_relayed == 2
    assert "| gb-b | 1 | 2 | 2.000 | 2.000 |" in text and "- `d3`" in text
    assert summarize("empty", [], []).undelivered_share == 0.0
