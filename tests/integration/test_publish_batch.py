"""The publish-batch flow in-process (real Prefect API, real broker): every event of a batch is
published even when one fails; a batch run again publishes nothing new (per-event caching); a
batch run makes the same task runs whatever its number of events; an event published in a batch
and run alone (or the reverse) is published once; a batch killed in the middle of its
publications and run again sends every file once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun

from blocks.mqtt_broker import MqttBroker
from chain.ledger import SqliteLedger
from flows.publish_batch import BatchRunResult, publish_batch
from flows.publish_notification import NotificationRunResult, publish_notification
from tests.fixtures.gates import MqttPublishGate
from tests.fixtures.paths import REPO
from tests.integration import test_publish_notification
from tests.integration.test_publish_notification import (
    ARGO,
    BUFR_ASSET,
    Subscriber,
    bufr_event,
    read_artifacts,
    read_flow_run,
    sha256_multihash,
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


# ---- batch-level tasks ------------------------------------------------------------------------
BATCH_TASKS = ["build-batch", "load-dataset", "publish-batch", "record-batch", "validate-batch"]


def task_runs(flow_run_id: UUID, count: int, timeout: float = 60.0) -> list[TaskRun]:
    """The flow run's task runs, once `count` of them are final (the API records them from the
    client's events, shortly after the run)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = [r for r in runs if r.state is not None and r.state.is_final()]
            if len(final) >= count or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def task_names(runs: list[TaskRun]) -> list[str]:
    return sorted(r.name.rsplit("-", 1)[0] for r in runs)


def test_a_batch_run_makes_the_same_task_runs_whatever_its_size(
    on_session_broker: Subscriber,
) -> None:
    small = publish_batch(events=[numbered_event(i) for i in (30, 31)], return_state=True)
    large = publish_batch(events=[numbered_event(i) for i in range(32, 40)], return_state=True)
    assert small.is_completed() and large.is_completed(), (small.message, large.message)
    for state in (small, large):
        runs = task_runs(state.state_details.flow_run_id, len(BATCH_TASKS))
        assert task_names(runs) == BATCH_TASKS, task_names(runs)
    assert len(on_session_broker.wait_for(10)) == 10


def test_an_event_of_a_batch_run_alone_and_the_reverse_is_published_once(
    on_session_broker: Subscriber, chain: Any,
) -> None:
    """The batch tasks read and write the single-event tasks' caches (same keys, same store)."""
    in_batch = publish_batch(events=[numbered_event(i) for i in (40, 41)], return_state=True)
    assert in_batch.is_completed(), in_batch.message
    batched: BatchRunResult = in_batch.result()
    # the ledger would tell the single run the notification was acknowledged (not sent again,
    # no publish task run): without that entry only the shared caches can tell
    [data_id] = [n.data_id for n in batched.events[0].notifications]
    # the time of the broker's PUBACK, kept for the delivery monitor's relay delays
    puback_at = (SqliteLedger.in_dir(chain.results).get(data_id).model_extra or {})["puback_at"]
    assert SqliteLedger.in_dir(chain.results).forget(data_id)
    alone = publish_notification(event=numbered_event(40), return_state=True)
    assert alone.is_completed(), alone.message
    single: NotificationRunResult = alone.result()
    assert single.ids == [batched.events[0].notifications[0].id]
    assert [n.sent for n in single.notifications] == [False]
    runs = task_runs(alone.state_details.flow_run_id, 5)  # recorded again
    states = {r.name.rsplit("-", 1)[0]: r.state_name for r in runs}
    assert states["build-notifications"] == "Cached" and states["publish-notification"] == \
        "Cached", states
    # recorded again with the PUBACK time of the publication (the cached receipt's), not now
    again = SqliteLedger.in_dir(chain.results).get(data_id)
    assert again is not None and (again.model_extra or {})["puback_at"] == puback_at

    first = publish_notification(event=numbered_event(42), return_state=True).result()
    again = publish_batch(events=[numbered_event(i) for i in (42, 43)], return_state=True)
    assert again.is_completed(), again.message
    second: BatchRunResult = again.result()
    assert [e.status for e in second.events] == ["cached", "published"]
    assert second.events[0].notifications[0].id == first.ids[0]

    messages = on_session_broker.settle()
    assert sorted(m["id"] for _, m in messages) == sorted(batched.ids + second.ids)
    assert len({m["properties"]["data_id"] for _, m in messages}) == 4


def test_a_file_announced_twice_in_one_batch_is_an_update_decided_after_the_first(
    on_session_broker: Subscriber,
) -> None:
    """Two events of one batch for the same file, the second with a new checksum: the second
    is built in a second round, once the first is recorded (rel=update), as alone."""
    created, changed = numbered_event(50), numbered_event(50)
    changed["id"] = "batch-050-changed"
    [asset] = changed["data"]["assets"].values()
    asset["file:checksum"] = sha256_multihash(b"the file changed")
    state = publish_batch(events=[created, changed, numbered_event(51)], return_state=True)
    assert state.is_completed(), state.message
    result: BatchRunResult = state.result()
    rels = [n.rel for e in result.events for n in e.notifications]
    assert rels == ["canonical", "update", "canonical"]
    runs = task_runs(state.state_details.flow_run_id, 9)
    assert Counter(task_names(runs)) == Counter(
        [*BATCH_TASKS, "build-batch", "publish-batch", "record-batch", "validate-batch"])
    assert len(on_session_broker.settle()) == 3


KILLED_BATCH = """
import json, sys
from flows.publish_batch import publish_batch
publish_batch(events=json.loads(sys.argv[1]), dataset="argo")
"""


def test_a_batch_killed_after_some_acknowledgements_then_rerun_sends_each_file_once(
    chain: Any, session_broker: Any, prefect_api: Any, tmp_path: Any,
) -> None:
    """The process running a batch is SIGKILLed while the broker has acknowledged exactly 3 of
    its 6 notifications (a gate in front of the broker holds the 4th); the rerun sends the 3
    others, nothing twice."""
    origin = Subscriber(session_broker.connection("everyone"), "origin/a/wis2/#")
    direct = session_broker.connection("publisher")
    gate = MqttPublishGate(direct.host, direct.port, allow=3)
    events = [numbered_event(i) for i in range(60, 66)]
    try:
        MqttBroker.from_connection(direct.model_copy(update={"port": gate.port})).save(
            chain.block, overwrite=True)
        env = {**os.environ, **prefect_api.client_env(), "PYTHONPATH": str(REPO),
               "PREFECT_HOME": str(tmp_path / "killed-home")}
        log = (tmp_path / "killed.log").open("w")
        proc = subprocess.Popen([sys.executable, "-c", KILLED_BATCH, json.dumps(events)],
                                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            gate.wait_held(1, 120, lambda: (tmp_path / "killed.log").read_text()[-3000:])
            assert len(origin.wait_for(3)) == 3
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()
            log.close()
    finally:
        gate.close()
    chain.use_broker(session_broker)
    rerun = publish_batch(events=events, dataset="argo", return_state=True)
    assert rerun.is_completed(), rerun.message
    result: BatchRunResult = rerun.result()
    assert [e.status for e in result.events] == ["cached"] * 3 + ["published"] * 3
    messages = origin.settle()
    origin.close()
    per_file = Counter(m["properties"]["data_id"].rsplit("/", 1)[-1] for _, m in messages)
    assert per_file == {f"IOPX01_LFVX_{i:06d}.BU": 1 for i in range(60, 66)}, per_file
    assert sorted(m["id"] for _, m in messages) == sorted(result.ids)


def test_a_file_that_does_not_match_fails_alone_in_a_verified_batch(
    on_session_broker: Subscriber, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WIS2_VERIFY_DATA on: one verify-batch task run downloads every file; the event whose
    file does not match its checksum fails alone, naming the field, the others are published."""
    from tests.fixtures.gates import GatedFileServer
    from tests.integration.test_worker_crash import DEMO_FILE, file_event

    monkeypatch.setenv("WIS2_VERIFY_DATA", "true")
    files = GatedFileServer(DEMO_FILE, allow=100)
    try:
        events = [file_event("verified", i, files.url) for i in range(3)]
        [asset] = events[1]["data"]["assets"].values()
        asset["file:checksum"] = sha256_multihash(b"not this file")
        state = publish_batch(events=events, return_state=True)
    finally:
        files.close()
    assert state.is_failed()
    result: BatchRunResult = state.result(raise_on_failure=False)
    assert [e.status for e in result.events] == ["published", "failed", "published"]
    assert "DataMismatch" in (result.events[1].error or "")
    failure = read_artifacts(state.state_details.flow_run_id)[
        "failed-batch-3-events-verified-0000-csv"].data
    assert "$.properties.integrity.value" in failure and "verified-0001" in failure
    runs = task_runs(state.state_details.flow_run_id, len(BATCH_TASKS) + 1)
    assert task_names(runs) == sorted([*BATCH_TASKS, "verify-batch"])
    assert len(on_session_broker.settle()) == 2


def test_a_verified_batch_downloads_its_files_concurrently_within_the_setting(
    on_session_broker: Subscriber, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WIS2_VERIFY_CONCURRENCY=3: a batch of 8 verified events downloads 3 files at the same
    time (the server holds them until 3 wait), never more; all 8 are published."""
    import threading

    from tests.fixtures.gates import GatedFileServer
    from tests.integration.test_worker_crash import DEMO_FILE, file_event

    monkeypatch.setenv("WIS2_VERIFY_DATA", "true")
    monkeypatch.setenv("WIS2_VERIFY_CONCURRENCY", "3")
    files = GatedFileServer(DEMO_FILE, allow=0)
    held: list[BaseException] = []

    def open_once_three_wait() -> None:
        try:
            files.wait_held(3, timeout=150)
        except AssertionError as exc:
            held.append(exc)
        finally:
            files.release()

    opener = threading.Thread(target=open_once_three_wait, daemon=True)
    opener.start()
    try:
        events = [file_event("concurrent", i, files.url) for i in range(8)]
        state = publish_batch(events=events, return_state=True)
    finally:
        opener.join(150)
        files.close()
    assert not held, held
    assert state.is_completed(), state
    result: BatchRunResult = state.result()
    assert [e.status for e in result.events] == ["published"] * 8
    assert files.most_at_once == 3
    assert len(on_session_broker.settle()) == 8


def test_a_batch_with_the_broker_away_fails_each_event_and_sends_them_once_later(
    chain: Any, session_broker: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No broker past the retries: every event of the batch fails (replayable), nothing is
    cached as published; the same batch once the broker is back sends each notification once."""
    monkeypatch.setenv("WIS2_PUBLISH_RETRIES", "1")
    monkeypatch.setenv("WIS2_RETRY_BASE_DELAY", "0.1")
    direct = session_broker.connection("publisher")
    gone = MqttPublishGate(direct.host, direct.port, allow=0)
    gone.close()  # a port nobody listens on any more
    MqttBroker.from_connection(direct.model_copy(update={"port": gone.port})).save(
        chain.block, overwrite=True)
    events = [numbered_event(i) for i in (70, 71, 72)]
    state = publish_batch(events=events, return_state=True)
    assert state.is_failed()
    failed: BatchRunResult = state.result(raise_on_failure=False)
    assert [e.status for e in failed.events] == ["failed"] * 3
    assert "3 of 3 event(s) failed" in read_flow_run(state.state_details.flow_run_id).state.message

    origin = Subscriber(session_broker.connection("everyone"), ARGO.topic)
    chain.use_broker(session_broker)
    again = publish_batch(events=events, return_state=True)
    assert again.is_completed(), again.message
    result: BatchRunResult = again.result()
    assert [e.status for e in result.events] == ["published"] * 3
    assert sorted(m["id"] for _, m in origin.settle()) == sorted(result.ids)
    origin.close()


def test_a_batch_rerun_built_before_a_newer_version_was_announced_announces_an_update(
    on_session_broker: Subscriber, chain: Any, session_broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 29, in a batch (as the single-event test of test_publish_notification): the batch
    builds and caches its events' notifications, then fails to publish (no broker); a new
    version of one file is announced meanwhile (canonical); the batch's rerun builds that
    event again against the ledger (an update), and reuses the other event's build."""
    monkeypatch.setenv("WIS2_PUBLISH_RETRIES", "0")
    direct = session_broker.connection("publisher")
    gone = MqttPublishGate(direct.host, direct.port, allow=0)
    gone.close()  # a port nobody listens on any more
    MqttBroker.from_connection(direct.model_copy(update={"port": gone.port})).save(
        chain.block, overwrite=True)
    events = [numbered_event(80), numbered_event(81)]
    assert publish_batch(events=events, return_state=True).is_failed()
    chain.use_broker(session_broker)
    monkeypatch.setenv("WIS2_PUBLISH_RETRIES", "1")

    newer = numbered_event(80)
    newer["id"] = "batch-080-corrected"
    [asset] = newer["data"]["assets"].values()
    asset["file:checksum"] = sha256_multihash(b"the file was corrected")
    announced: NotificationRunResult = publish_notification(event=newer)
    assert announced.notifications[0].rel == "canonical"

    again = publish_batch(events=events, return_state=True)
    assert again.is_completed(), again.message
    result: BatchRunResult = again.result()
    assert [[n.rel for n in e.notifications] for e in result.events] == [["update"],
                                                                          ["canonical"]]
    messages = on_session_broker.settle()
    assert [m["id"] for _, m in messages] == announced.ids + result.ids
    rels = [next(lk["rel"] for lk in m["links"] if lk["rel"] in ("canonical", "update"))
            for _, m in messages]
    assert rels == ["canonical", "update", "canonical"]
