"""The publish-batch flow in-process (real Prefect API, real broker): every event of a batch is
published even when one fails; a batch run again publishes nothing new (per-event caching)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flows.publish_batch import BatchRunResult, publish_batch
from tests.integration import test_publish_notification
from tests.integration.test_publish_notification import (
    ARGO,
    BUFR_ASSET,
    Subscriber,
    bufr_event,
    read_artifacts,
    read_flow_run,
)

pytestmark = pytest.mark.timeout(180)
chain = test_publish_notification.chain  # the fixtures, shared
on_session_broker = test_publish_notification.on_session_broker


def numbered_event(i: int) -> dict[str, Any]:
    """The reference event for another file (its own data_id)."""
    event = bufr_event()
    event["id"] = f"batch-{i:03d}"
    asset = event["data"]["assets"].pop(BUFR_ASSET)
    name = f"IOPX01_LFVX_{i:06d}.BU"
    asset["href"] = asset["href"].replace(BUFR_ASSET, name)
    event["data"]["assets"][name] = asset
    return event


def test_batch_publishes_the_others_when_one_fails_and_replays_as_cached(
    on_session_broker: Subscriber,
) -> None:
    events = [numbered_event(i) for i in range(4)]
    bad = events[2]
    for asset in bad["data"]["assets"].values():
        asset["roles"] = ["metadata"]  # a valid event, but nothing a dataset publishes

    state = publish_batch(events=events, dataset="argo", return_state=True)
    assert state.is_failed()
    result: BatchRunResult = state.result(raise_on_failure=False)
    assert [e.status for e in result.events] == ["published", "published", "failed",
                                                 "published"]
    messages = on_session_broker.wait_for(3)
    assert sorted(m["id"] for _, m in messages) == sorted(result.ids)
    assert len({m["properties"]["data_id"] for _, m in messages}) == 3
    assert all(topic == ARGO.topic for topic, _ in messages)

    run_id = state.state_details.flow_run_id
    flow_run = read_flow_run(run_id)
    assert flow_run.name == "batch-4-events-IOPX01_LFVX_000000.BU"
    assert flow_run.state.is_failed() and "IOPX01_LFVX_000002.BU" in flow_run.state.message
    artifacts = read_artifacts(run_id)
    assert set(artifacts) == {"batch-4-events-iopx01-lfvx-000000-bu",
                              "validation-batch-4-events-iopx01-lfvx-000000-bu",
                              "failed-batch-4-events-iopx01-lfvx-000000-bu"}, artifacts.keys()
    failure = artifacts["failed-batch-4-events-iopx01-lfvx-000000-bu"].data
    assert "IOPX01_LFVX_000002.BU" in failure and "batch-002" in failure
    assert "$.data.assets" in failure and "publish-notification/default" in failure
    assert '"metadata"' in failure  # the event as received, to fix and replay
    assert "batch-001" not in failure
    table = json.loads(artifacts["batch-4-events-iopx01-lfvx-000000-bu"].data)
    assert [row["status"] for row in table].count("sent") == 3
    assert any(row["status"].startswith("FAILED") for row in table)
    validation = json.loads(artifacts["validation-batch-4-events-iopx01-lfvx-000000-bu"].data)
    assert {row["event"] for row in validation} == {
        f"IOPX01_LFVX_{i:06d}.BU" for i in (0, 1, 3)}

    # the same batch again (a redelivery grouped the same way): nothing new is published
    again = publish_batch(events=events, dataset="argo", return_state=True)
    assert again.is_failed()
    second: BatchRunResult = again.result(raise_on_failure=False)
    assert [e.status for e in second.events] == ["cached", "cached", "failed", "cached"]
    assert second.ids == result.ids
    assert [m["id"] for _, m in on_session_broker.settle()] == [m["id"] for _, m in messages]
    table = json.loads(read_artifacts(again.state_details.flow_run_id)[
        "batch-4-events-iopx01-lfvx-000000-bu"].data)
    assert [row["status"] for row in table].count("already published (cached)") == 3


def test_batch_of_good_events_completes_and_overlaps_an_earlier_batch(
    on_session_broker: Subscriber,
) -> None:
    """Redelivered events regrouped into another batch: the overlap publishes nothing new."""
    first = publish_batch(events=[numbered_event(i) for i in (10, 11)], return_state=True)
    assert first.is_completed(), first.message
    second = publish_batch(events=[numbered_event(i) for i in (11, 12)], return_state=True)
    assert second.is_completed(), second.message
    one: BatchRunResult = first.result()
    two: BatchRunResult = second.result()
    assert [e.status for e in two.events] == ["cached", "published"]
    assert two.events[0].notifications[0].id == one.events[1].notifications[0].id
    messages = on_session_broker.settle()
    ids = [m["id"] for _, m in messages]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert len({m["properties"]["data_id"] for _, m in messages}) == 3
