"""delivery.monitor with a real SQLite store: records, relays, cache copies and reports in any
order, bad messages skipped, redelivery of the exact bytes, then undelivered (the clock is an
argument of `check`: no waiting)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chain.delivery_store import DeliveryStore
from chain.metrics import DeliveryMetrics
from delivery.monitor import DeliveryMonitor
from wis2.delivery import CACHE_MISMATCH, CACHE_NOT_EXPECTED, CACHED, RELAYED, UNDELIVERED

CENTRE = "fr-ifremer-argo"
CORE = f"origin/a/wis2/{CENTRE}/data/core/ocean/surface-based-observations/drifting-ocean-profilers"
CACHE = "cache/" + CORE.split("/", 1)[1]
METADATA_ID = "urn:wmo:md:fr-ifremer-argo:cor:msg:argo"


def message(name: str, **properties: object) -> dict:
    return {"id": f"id-{name}", "type": "Feature", "properties": {
        "data_id": f"wis2/{CENTRE}/data/core/argo/{name}", "metadata_id": METADATA_ID,
        "pubtime": "2026-12-05T10:00:00Z",
        "integrity": {"method": "sha512", "value": f"{name}="}, **properties},
        "links": [{"rel": "canonical", "href": f"https://node/{name}"}]}


def raw(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DeliveryMonitor, list[tuple[str, bytes]]]:
    sent: list[tuple[str, bytes]] = []
    monitor = DeliveryMonitor(CENTRE, DeliveryStore(str(tmp_path / "records.sqlite3")),
                              DeliveryMetrics(), lambda t, p: sent.append((t, p)),
                              relay_timeout=60, max_redeliveries=2,
                              datasets={METADATA_ID: "argo"})
    return monitor, sent


def sample(monitor: DeliveryMonitor, name: str, **labels: str) -> float:
    value = monitor.metrics.registry.get_sample_value(
        name, {"centre_id": CENTRE, "dataset": "argo", **labels})
    return value or 0.0


def test_relays_in_any_order_and_once_per_broker(setup) -> None:
    monitor, _sent = setup
    first, second = message("a.nc"), message("b.nc")
    monitor.on_global("gb-a", CORE, raw(second))  # before the node's own copy
    record = monitor.on_published(CORE, raw(first))
    assert record is not None and record.dataset == "argo" and record.state == "pending"
    monitor.on_global("gb-a", CORE, raw(first))
    monitor.on_global("gb-a", CORE, raw(first))  # a repeat by the same Broker
    monitor.on_global("gb-b", CORE, raw(first))
    monitor.on_published(CORE, raw(second))
    monitor.on_published(CORE, raw(second))  # our redelivery coming back: recorded once
    store = monitor.store
    assert store.get("id-a.nc").state == RELAYED
    assert store.get("id-b.nc").state == RELAYED
    assert [e.source for e in store.events(["id-a.nc"], "relay")] == ["gb-a", "gb-b"]
    assert sample(monitor, "wis2_chain_relayed_total", broker="gb-a") == 2
    assert sample(monitor, "wis2_chain_delivery_recorded_total") == 2
    assert monitor.metrics.registry.get_sample_value(
        "wis2_chain_relay_delay_seconds_count",
        {"centre_id": CENTRE, "dataset": "argo", "broker": "gb-a"}) == 2


def test_cache_copies_and_catalogue_reports(setup) -> None:
    monitor, _sent = setup
    good, bad = message("good.nc"), message("bad.nc")
    copy_good = message("good.nc", **{"global-cache": "gc-1"}) | {"id": "gc-copy-1"}
    monitor.on_global("gb-a", CACHE, raw(copy_good))  # the copy before the node's own
    monitor.on_published(CORE, raw(good))
    monitor.on_published(CORE, raw(bad))
    copy_bad = message("bad.nc", **{"global-cache": "gc-1",
                                    "integrity": {"method": "sha512", "value": "other="}})
    monitor.on_global("gb-a", CACHE, raw(copy_bad | {"id": "gc-copy-2"}))
    monitor.on_global("gb-b", CACHE, raw(copy_bad | {"id": "gc-copy-2"}))  # via the other GB
    assert monitor.store.get("id-good.nc").cache_state == CACHED
    assert monitor.store.get("id-bad.nc").cache_state == CACHE_MISMATCH
    assert sample(monitor, "wis2_chain_cache_integrity_mismatches_total", cache="gc-1") == 1

    recommended = message("r.nc") | {"id": "id-r"}
    monitor.on_published(CORE.replace("/core/", "/recommended/"), raw(recommended))
    assert monitor.store.get("id-r").cache_state == CACHE_NOT_EXPECTED

    meta = message("meta") | {"id": "id-meta"}
    monitor.on_published(f"origin/a/wis2/{CENTRE}/metadata", raw(meta))
    report = {"id": "rep-1", "properties": {"metadata_id": METADATA_ID, "kpi": {"score": 90}}}
    monitor.on_global("gb-a", f"monitor/a/wis2/{CENTRE}/gdc", raw(report))
    events = monitor.store.events(["id-meta"], "report")
    assert [e.source for e in events] == ["rep-1"]
    assert events[0].detail["properties"]["kpi"] == {"score": 90}


def test_bad_messages_are_logged_and_skipped(setup, caplog: pytest.LogCaptureFixture) -> None:
    monitor, _sent = setup
    caplog.set_level(logging.WARNING)
    assert monitor.on_published(CORE, b"not json") is None
    assert monitor.on_published(CORE, b"[1, 2]") is None
    assert monitor.on_published(CORE, raw({"id": "x", "properties": {}})) is None
    monitor.on_global("gb-a", CACHE, raw({"id": "y", "properties": {}}))
    monitor.on_global("gb-a", f"monitor/a/wis2/{CENTRE}/gdc", raw({"id": "z"}))
    monitor.on_global("gb-a", CORE, b"\xff\xfe")
    text = caplog.text
    assert "is not JSON" in text and "is not a JSON object" in text
    assert "$.properties.data_id, $.properties.pubtime" in text
    assert "has no properties.data_id/pubtime" in text and "has no properties.metadata_id" in text


def test_redelivery_of_the_exact_message_then_undelivered(setup) -> None:
    monitor, sent = setup
    lost, relayed = message("lost.nc"), message("ok.nc")
    payload = raw(lost)
    monitor.on_published(CORE, payload)
    monitor.on_published(CORE, raw(relayed))
    monitor.on_global("gb-a", CORE, raw(relayed))
    now = datetime.now(UTC)
    assert monitor.check(now + timedelta(seconds=30)) == {"redelivered": 0, "undelivered": 0}
    assert monitor.check(now + timedelta(seconds=61)) == {"redelivered": 1, "undelivered": 0}
    assert sent == [(CORE, payload)]  # the very bytes: same id, same pubtime
    record = monitor.store.get("id-lost.nc")
    assert record.redeliveries == 1
    # the next wait counts from the redelivery (its last_sent_at, recorded now)
    assert monitor.check(now + timedelta(seconds=90))["redelivered"] == 0
    assert monitor.check(now + timedelta(seconds=200)) == {"redelivered": 1, "undelivered": 0}
    assert monitor.check(now + timedelta(seconds=400)) == {"redelivered": 0, "undelivered": 1}
    assert sent == [(CORE, payload)] * 2
    assert monitor.store.get("id-lost.nc").state == UNDELIVERED
    assert monitor.check(now + timedelta(seconds=900)) == {"redelivered": 0, "undelivered": 0}
    assert sample(monitor, "wis2_chain_undelivered_total") == 1
    assert sample(monitor, "wis2_chain_redelivered_total") == 2
    assert monitor.metrics.registry.get_sample_value("wis2_chain_delivery_pending") == 0


def test_redelivery_keeps_cache_false_and_expects_no_cache_copy(setup) -> None:
    """A not-cached file's notification (`properties.cache: false`, issue 26) is redelivered as
    the very bytes published, so Caches are still told not to cache it (wis2box#1069: lost)."""
    monitor, sent = setup
    big = message("big.grib2", cache=False)
    payload = raw(big)
    monitor.on_published(CORE, payload)
    now = datetime.now(UTC)
    assert monitor.check(now + timedelta(seconds=61)) == {"redelivered": 1, "undelivered": 0}
    assert sent == [(CORE, payload)]
    assert json.loads(sent[0][1])["properties"]["cache"] is False
    monitor.on_global("gb-a", CORE, payload)  # relayed at last: delivered, no cache copy due
    record = monitor.store.get("id-big.grib2")
    assert (record.state, record.cache_state) == (RELAYED, CACHE_NOT_EXPECTED)
