"""The backfill flow and `wis2-chain backfill` against a real Prefect server and a real broker:
every file of an archive announced once, bad entries named, a second run publishes nothing new,
changed files become updates, deletions, STAC sources, the rate limit, and a backfill killed in
the middle (SIGKILL) then started again publishes only what is missing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Scheduled

from chain.deployments import PUBLISH_NOTIFICATION_FLOW
from flows.backfill import BackfillCounts, backfill
from flows.live_priority import count_live_runs
from tests.fixtures.gates import GatedFileServer
from tests.fixtures.waiting import wait_for
from tests.integration import test_publish_notification
from tests.integration.test_publish_batch import numbered_event
from tests.integration.test_publish_notification import (
    Subscriber,
    read_artifacts,
    read_flow_run,
)
from tests.integration.test_wnm_features import flow_logs

pytestmark = pytest.mark.timeout(240)
chain = test_publish_notification.chain  # the fixtures, shared
on_session_broker = test_publish_notification.on_session_broker


def write_events(directory: Path, events: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for event in events:
        (directory / f"{event['id']}.json").write_text(json.dumps(event), encoding="utf-8")
    return directory


@pytest.fixture(autouse=True)
def no_live_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of other tests on the session's server are not this file's live events: the
    backfills here do not wait for them (but `test_a_backfill_gives_way_to_live_runs`)."""
    monkeypatch.setenv("WIS2_BACKFILL_YIELD_SECONDS", "0")


def run_backfill(source: Path, **kwargs: Any) -> tuple[Any, BackfillCounts]:
    kwargs.setdefault("rate", 0)
    state = backfill(source=str(source), return_state=True, **kwargs)
    return state, state.result(raise_on_failure=False)


def data_ids(messages: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [m["properties"]["data_id"] for _, m in messages]


def test_directory_backfill_then_again_publishes_nothing_new(
    tmp_path: Path, on_session_broker: Subscriber
) -> None:
    events = [numbered_event(i) for i in range(100, 106)]
    bad = numbered_event(106)
    bad["data"]["assets"][next(iter(bad["data"]["assets"]))]["href"] = "not-a-url"
    source = write_events(tmp_path / "archive", [*events, bad])

    state, counts = run_backfill(source, batch_size=4)
    assert state.is_failed() and "1 of 7 entries failed" in state.message
    assert (counts.published, counts.failed, counts.already_published) == (6, 1, 0)
    assert counts.failures[0]["position"] == "batch-106.json"
    assert "href" in counts.failures[0]["reason"]
    messages = on_session_broker.wait_for(6)
    assert len(set(data_ids(messages))) == 6 == len(messages)

    run_id = state.state_details.flow_run_id
    assert read_flow_run(run_id).name == "backfill-archive"
    artifacts = read_artifacts(run_id)
    assert float(artifacts["progress-backfill-archive"].data) == 100.0
    table = json.loads(artifacts["backfill-backfill-archive"].data)
    outcomes = {row["outcome"]: row for row in table}
    assert outcomes["published"]["count"] == "6" and outcomes["failed"]["count"] == "1"
    assert outcomes["FAILED"]["position"] == "batch-106.json"
    assert "$.data.assets" in outcomes["FAILED"]["reason"]

    again, second = run_backfill(source, batch_size=4)
    assert (second.published, second.already_published, second.failed) == (0, 6, 1)
    assert len(on_session_broker.settle()) == 6  # nothing more on the topic
    assert again.is_failed()


def test_changed_files_are_updates_and_delete_announces_deletions(
    tmp_path: Path, on_session_broker: Subscriber
) -> None:
    events = [numbered_event(i) for i in (200, 201)]
    state, counts = run_backfill(write_events(tmp_path / "v1", events))
    assert state.is_completed() and counts.published == 2

    changed = []
    for event in events:
        event = json.loads(json.dumps(event))
        event["id"] += "-v2"
        asset = next(iter(event["data"]["assets"].values()))
        asset["file:checksum"] = "1220" + hashlib.sha256(event["id"].encode()).hexdigest()
        changed.append(event)
    state, counts = run_backfill(write_events(tmp_path / "v2", changed))
    assert state.is_completed() and (counts.updates, counts.published) == (2, 0)

    state, counts = run_backfill(tmp_path / "v2", operation="delete")
    assert state.is_completed() and counts.deletions == 2
    rels = [m["links"][0]["rel"] for _, m in on_session_broker.wait_for(6)]
    assert rels.count("canonical") == 2 and rels.count("update") == 2
    assert rels.count("deletion") == 2


def test_stac_items_already_published_live_are_not_announced_again(
    tmp_path: Path, on_session_broker: Subscriber
) -> None:
    live = [numbered_event(i) for i in (300, 301)]
    state, _ = run_backfill(write_events(tmp_path / "live", live))
    assert state.is_completed()
    items = [event["data"] for event in live] + [numbered_event(302)["data"]]
    for i, item in enumerate(items):
        item["id"] = f"stac-item-{i}"
    collection = tmp_path / "items.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": items}))

    state, counts = run_backfill(collection)
    assert state.is_completed(), state.message
    assert (counts.already_published, counts.published) == (2, 1)
    messages = on_session_broker.settle()
    assert len(messages) == 3 and len(set(data_ids(messages))) == 3


def test_dry_run_publishes_nothing(tmp_path: Path, on_session_broker: Subscriber) -> None:
    source = write_events(tmp_path / "dry", [numbered_event(i) for i in (400, 401, 402)])
    state, counts = run_backfill(source, dry_run=True)
    assert state.is_completed() and counts.would_publish == 3 and counts.published == 0
    assert on_session_broker.settle(1.0) == []


def test_rate_limit_holds(tmp_path: Path, on_session_broker: Subscriber) -> None:
    """10 notifications at 5/s take at least 2 s (a slow machine only takes longer)."""
    source = write_events(tmp_path / "paced", [numbered_event(i) for i in range(500, 510)])
    started = time.monotonic()
    state, counts = run_backfill(source, rate=5, batch_size=5)
    assert state.is_completed() and counts.published == 10
    assert time.monotonic() - started >= 2.0


# --------------------------------------------------------------------------------------------
# live events first


def live_run(due: datetime) -> tuple[UUID, UUID]:
    """A run of a live deployment (`publish-notification`) of its own, due at `due`; no worker
    takes it. (deployment id, run id)"""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(PUBLISH_NOTIFICATION_FLOW)
        deployment_id = client.create_deployment(flow_id=flow_id,
                                                 name=f"live-{uuid.uuid4().hex[:8]}")
        return deployment_id, client.create_flow_run_from_deployment(
            deployment_id, state=Scheduled(scheduled_time=due)).id


def cancel(flow_run_id: UUID) -> None:
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelled(), force=True)


def test_a_backfill_gives_way_to_live_runs(
    tmp_path: Path, on_session_broker: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a live run is due, each batch waits (at most WIS2_BACKFILL_YIELD_SECONDS) and
    says so; a run due over a minute ago (a backlog, a stranded run) is not a live event."""
    # counted on this test's own deployments: other tests' runs come and go on the server
    stale_deployment, stale = live_run(datetime.now(UTC) - timedelta(minutes=2))
    assert count_live_runs([stale_deployment]) == 0
    waiting_deployment, waiting = live_run(datetime.now(UTC))
    mine = [stale_deployment, waiting_deployment]
    assert count_live_runs(mine) == 1
    assert count_live_runs() >= 1  # and among all the live runs

    monkeypatch.setenv("WIS2_BACKFILL_YIELD_SECONDS", "0.6")
    source = write_events(tmp_path / "beside-live", [numbered_event(i) for i in range(600, 604)])
    started = time.monotonic()
    state, counts = run_backfill(source, batch_size=2)
    assert state.is_completed() and counts.published == 4
    assert time.monotonic() - started >= 2 * 0.6  # two batches, each after its full wait
    wait_for(lambda: flow_logs(state.state_details.flow_run_id).count(
        "s given to live events") == 2, 30, "the backfill's two 'given to live events' lines")

    cancel(waiting)
    cancel(stale)
    assert count_live_runs(mine) == 0


# --------------------------------------------------------------------------------------------
# killed in the middle, started again


def content(name: str) -> bytes:
    return f"profile {name}\n".encode()


def served_event(i: int, base_url: str) -> dict[str, Any]:
    event = numbered_event(i)
    name, asset = next(iter(event["data"]["assets"].items()))
    body = content(name)
    asset["href"] = f"{base_url}/{name}"
    asset["file:checksum"] = "1220" + hashlib.sha256(body).hexdigest()
    asset["file:size"] = len(body)
    return event


@pytest.fixture
def gated_files() -> Iterator[GatedFileServer]:
    files = GatedFileServer(content, hold=lambda name: False)  # the test names what to hold
    yield files
    files.close()


def test_killed_backfill_started_again_publishes_only_what_is_missing(
    tmp_path: Path, on_session_broker: Subscriber, gated_files: GatedFileServer, prefect_api,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = [served_event(i, gated_files.url) for i in range(600, 609)]
    held = {next(iter(e["data"]["assets"])) for e in events[3:6]}  # the second batch
    gated_files.hold = held.__contains__
    source = write_events(tmp_path / "archive", events)
    monkeypatch.setenv("WIS2_VERIFY_DATA", "true")
    env = {**os.environ, **prefect_api.client_env()}
    command = [str(Path(sys.executable).with_name("wis2-chain")), "backfill", str(source),
               "--local", "--batch-size", "3", "--rate", "0"]
    log = (tmp_path / "backfill.log").open("w")
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=log)
    try:
        assert gated_files.requested.wait(120), (tmp_path / "backfill.log").read_text()
        assert len(on_session_broker.wait_for(3)) == 3  # the first batch is out
        first.send_signal(signal.SIGKILL)  # in the middle: the second batch is downloading
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    gated_files.release()
    assert len(on_session_broker.settle(1.0)) == 3

    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "6 published, 3 already published" in second.stdout
    messages = on_session_broker.wait_for(9)
    assert sorted(data_ids(messages)) == sorted(set(data_ids(messages)))
    assert len(messages) == 9
    assert len(on_session_broker.settle()) == 9
