"""The operator's view of delivery: the delivery records in SQLite and in PostgreSQL (a cluster
the test starts), the daily report artifacts per dataset and the check that fails a run when the
undelivered share passes the threshold (flows run in-process against a real Prefect server)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from chain.delivery_store import (
    DeliveryEvent,
    DeliveryRecord,
    DeliveryStore,
    delivery_reports,
    records_location,
)
from flows.delivery_report import delivery_check, delivery_report
from localnode.postgres import PG_USER, PostgresCluster
from wis2.delivery import CACHE_AWAITED, CACHE_NOT_EXPECTED, CACHED, PENDING, RELAYED, UNDELIVERED

pytestmark = pytest.mark.integration
CORE = "origin/a/wis2/fr-ifremer-argo/data/core/ocean/surface-based-observations/" \
       "drifting-ocean-profilers"
SYNOP = "origin/a/wis2/fr-meteofrance/data/core/weather/surface-based-observations/synop"


def record(name: str, dataset: str, state: str, topic: str = CORE, **fields: object
           ) -> DeliveryRecord:
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    message = {"id": f"id-{name}", "properties": {"data_id": f"wis2/x/{name}",
                                                  "pubtime": "2026-12-05T10:00:00Z"}}
    values = {"notification_id": f"id-{name}", "data_id": f"wis2/x/{name}",
              "pubtime": "2026-12-05T10:00:00Z", "topic": topic, "dataset": dataset,
              "payload": json.dumps(message), "published_at": now, "last_sent_at": now,
              "state": state, "cache_state": CACHE_AWAITED} | fields
    return DeliveryRecord(**values)  # type: ignore[arg-type]


def fill(store: DeliveryStore) -> None:
    """argo: 2 relayed (one cached), 1 undelivered after 2 redeliveries; synop: 1 relayed."""
    store.add(record("a1", "argo", PENDING))
    store.add(record("a2", "argo", PENDING, cache_state=CACHE_NOT_EXPECTED))
    store.add(record("a3", "argo", PENDING))
    store.add(record("s1", "synop", PENDING, topic=SYNOP))
    for name, delay in (("a1", 0.5), ("a2", 1.5), ("s1", 0.2)):
        store.add_event(DeliveryEvent(notification_id=f"id-{name}", kind="relay",
                                      source="gb-a:8883", seen_at="2026-12-05T10:00:01Z",
                                      delay_s=delay), state=RELAYED)
    store.add_event(DeliveryEvent(notification_id="id-a1", kind="cache", source="gc-1",
                                  seen_at="2026-12-05T10:00:05Z"), cache_state=CACHED)
    store.mark_sent_again("id-a3", "2026-12-05T10:05:00Z")
    store.mark_sent_again("id-a3", "2026-12-05T10:10:00Z")
    store.mark_undelivered("id-a3", "2026-12-05T10:15:00Z")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_the_records_and_their_report(kind: str, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    if kind == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        cluster.create_database("delivery")
        location = f"postgresql://{PG_USER}@{cluster.host}:{cluster.port}/delivery"
    else:
        location = str(tmp_path / "delivery-records.sqlite3")
    store = DeliveryStore(location)
    fill(store)
    assert not store.add(record("a1", "argo", PENDING))  # recorded once
    a3 = store.get("id-a3")
    assert a3 is not None and (a3.state, a3.redeliveries) == (UNDELIVERED, 2)
    assert json.loads(a3.payload)["id"] == "id-a3"  # the exact message, kept for redelivery
    assert [r.notification_id for r in store.pending()] == []
    # a later relay of an undelivered notification makes it relayed
    assert store.add_event(DeliveryEvent(notification_id="id-a3", kind="relay", source="gb-b",
                                         seen_at="2026-12-05T10:20:00Z", delay_s=1200),
                           state=RELAYED)
    assert store.get("id-a3").state == RELAYED  # type: ignore[union-attr]
    store.set_state("id-a3", UNDELIVERED)
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    reports = {r.dataset: r for r in delivery_reports(store, since)}
    argo = reports["argo"]
    assert (argo.published, argo.relayed, argo.undelivered, argo.cached, argo.cache_expected,
            argo.redelivered) == (3, 2, 1, 1, 2, 1)
    assert argo.undelivered_data_ids == ["wis2/x/a3"]
    assert argo.brokers["gb-a:8883"].median_delay_s == 1.0
    assert argo.brokers["gb-a:8883"].worst_delay_s == 1.5
    assert reports["synop"].published == 1


def artifacts_of(run_id: UUID) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {a.key or "": str(a.data) for a in found}


def test_daily_report_artifacts_and_the_failing_check(
        prefect_api: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    monkeypatch.setenv("WIS2_RESULTS_DIR", str(results))
    monkeypatch.delenv("WIS2_LEDGER_URL", raising=False)
    fill(DeliveryStore(records_location(str(results / "publication-ledger.sqlite3"))))

    state = delivery_report(hours=24, return_state=True)
    assert state.is_completed()
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert set(artifacts) == {"delivery-argo", "delivery-synop"}
    argo = artifacts["delivery-argo"]
    assert "| 3 | 2 | 0 | 1 (33.3%) | 1 | 1 / 2 | 0 |" in argo
    assert "| gb-a:8883 | 2 | 1 | 1.000 | 1.500 |" in argo
    assert "- `wis2/x/a3`" in argo

    assert delivery_check(threshold=0.5, return_state=True).is_completed()
    failed = delivery_check(threshold=0.1, return_state=True)
    assert failed.is_failed()
    message = str(failed.message) + repr(failed.result(raise_on_failure=False))
    assert "argo: 1 of 3 undelivered" in message and "wis2/x/a3" in message
