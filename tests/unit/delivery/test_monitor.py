"""delivery.monitor with a real SQLite store: records, relays, cache copies and reports in any
order, bad messages skipped, redelivery of the exact bytes, then undelivered (the clock is an
argument of `check`: no waiting)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chain.delivery_store import EARLY_SECONDS, DeliveryStore, EarlyMessage
from chain.ledger import SqliteLedger
from chain.metrics import DeliveryMetrics
from delivery.monitor import DeliveryMonitor, ledger_puback_time
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


def test_early_messages_are_kept_in_the_store_across_a_restart(tmp_path: Path) -> None:
    """A relay, a Cache's copy and a Catalogue report received before the node's copy are in
    the delivery store: a new monitor on it (a restart) matches them; they are taken once."""
    location = str(tmp_path / "records.sqlite3")

    def monitor() -> DeliveryMonitor:
        return DeliveryMonitor(CENTRE, DeliveryStore(location), DeliveryMetrics(),
                               lambda t, p: None, relay_timeout=60, max_redeliveries=2,
                               datasets={METADATA_ID: "argo"})

    early = monitor()
    data, meta = message("early.nc"), message("meta") | {"id": "id-meta"}
    early.on_global("gb-a", CORE, raw(data))
    early.on_global("gb-a", CACHE, raw(message("early.nc", **{"global-cache": "gc-1"})
                                       | {"id": "gc-copy"}))
    early.on_global("gb-b", f"monitor/a/wis2/{CENTRE}/gdc",
                    raw({"id": "rep-1", "properties": {"metadata_id": METADATA_ID}}))
    assert sorted(e.kind for e in early.store.early()) == ["cache", "relay", "report"]
    del early  # nothing of it is used again: the restarted monitor has only the store

    restarted = monitor()
    restarted.on_published(CORE, raw(data))
    restarted.on_published(f"origin/a/wis2/{CENTRE}/metadata", raw(meta))
    store = restarted.store
    assert store.get("id-early.nc").state == RELAYED
    assert [e.source for e in store.events(["id-early.nc"], "relay")] == ["gb-a"]
    assert store.get("id-early.nc").cache_state == CACHED
    assert [e.source for e in store.events(["id-meta"], "report")] == ["rep-1"]
    assert store.early() == []
    assert sample(restarted, "wis2_chain_relayed_total", broker="gb-a") == 1


def test_early_messages_expire(tmp_path: Path) -> None:
    store = DeliveryStore(str(tmp_path / "records.sqlite3"))
    old = datetime.now(UTC) - timedelta(seconds=EARLY_SECONDS + 60)
    assert store.keep_early(EarlyMessage(kind="relay", match_key="id-old", source="gb-a",
                                         topic=CORE, message={"id": "id-old"},
                                         seen_at=old.isoformat()), old)
    now = datetime.now(UTC)
    assert store.keep_early(EarlyMessage(kind="relay", match_key="id-new", source="gb-a",
                                         topic=CORE, message={"id": "id-new"},
                                         seen_at=now.isoformat()), now)
    assert [e.match_key for e in store.early()] == ["id-new"]


def test_the_relay_delay_counts_from_the_puback_the_chain_recorded(tmp_path: Path) -> None:
    """The ledger's `puback_at` of this very notification, else the monitor's receipt."""
    ledger = SqliteLedger(tmp_path / "publication-ledger.sqlite3")
    monitor = DeliveryMonitor(CENTRE, DeliveryStore(str(tmp_path / "records.sqlite3")),
                              DeliveryMetrics(), lambda t, p: None, relay_timeout=60,
                              max_redeliveries=2, datasets={METADATA_ID: "argo"},
                              puback_time=ledger_puback_time(ledger))
    acked, unknown, replaced = message("acked.nc"), message("unknown.nc"), message("old.nc")
    puback = datetime.now(UTC) - timedelta(seconds=100)
    ledger.record(acked["properties"]["data_id"], notification_id=acked["id"], rel="canonical",
                  puback_at=puback.isoformat(timespec="milliseconds"))
    # the ledger's entry of this data_id is another (later) notification: not its PUBACK
    ledger.record(replaced["properties"]["data_id"], notification_id="id-newer",
                  rel="update", puback_at=puback.isoformat(timespec="milliseconds"))
    for note in (acked, unknown, replaced):
        monitor.on_published(CORE, raw(note))
        monitor.on_global("gb-a", CORE, raw(note))
    delay = {n["id"]: monitor.store.events([n["id"]], "relay")[0].delay_s
             for n in (acked, unknown, replaced)}
    assert 100 <= delay["id-acked.nc"] < 160
    assert delay["id-unknown.nc"] < 60 and delay["id-old.nc"] < 60  # from the receipt
    bucket = monitor.metrics.registry.get_sample_value
    labels = {"centre_id": CENTRE, "dataset": "argo", "broker": "gb-a"}
    assert bucket("wis2_chain_relay_delay_seconds_bucket", labels | {"le": "60.0"}) == 2
    assert bucket("wis2_chain_relay_delay_seconds_bucket", labels | {"le": "120.0"}) == 3


def test_not_relayed_per_broker(tmp_path: Path) -> None:
    """`wis2_chain_not_relayed`: per watched Broker, what it did not relay of the records past
    the relay timeout (0 when it relayed all); a newer record is not counted yet."""
    monitor = DeliveryMonitor(CENTRE, DeliveryStore(str(tmp_path / "records.sqlite3")),
                              DeliveryMetrics(), lambda t, p: None, relay_timeout=60,
                              max_redeliveries=2, datasets={METADATA_ID: "argo"},
                              brokers=["gb-a", "gb-b"])
    both, only_b = message("both.nc"), message("only-b.nc")
    for note in (both, only_b):
        monitor.on_published(CORE, raw(note))
        monitor.on_global("gb-b", CORE, raw(note))
    monitor.on_global("gb-a", CORE, raw(both))
    now = datetime.now(UTC)
    monitor.check(now)  # both younger than the relay timeout: not counted
    assert sample(monitor, "wis2_chain_not_relayed", broker="gb-a") == 0
    monitor.check(now + timedelta(seconds=61))
    assert sample(monitor, "wis2_chain_not_relayed", broker="gb-a") == 1
    assert monitor.metrics.registry.get_sample_value(
        "wis2_chain_not_relayed", {"centre_id": CENTRE, "dataset": "argo",
                                   "broker": "gb-b"}) == 0
    monitor.on_global("gb-a", CORE, raw(only_b))  # late, but relayed
    monitor.check(now + timedelta(seconds=62))
    assert sample(monitor, "wis2_chain_not_relayed", broker="gb-a") == 0
    monitor.check(now + timedelta(days=2))  # out of the window: back to 0, the series kept
    assert monitor.metrics.registry.get_sample_value(
        "wis2_chain_not_relayed", {"centre_id": CENTRE, "dataset": "argo",
                                   "broker": "gb-a"}) == 0
