"""The publish-notification flow end to end: a real Prefect server, a real broker, real artifacts.

The flow is called in-process (tracked by the API); what it published is read from an MQTT
subscriber on the dataset topic, and its runs and artifacts are read back with the client.
The ledger alone is tested in tests/unit/chain/test_ledger.py.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import paho.mqtt.client as mqtt
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStartTime,
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterState,
    TaskRunFilterStateName,
)
from prefect.client.schemas.objects import Artifact, FlowRun

from blocks.mqtt_broker import MqttBroker
from chain.ledger import SqliteLedger
from chain.mqtt import MqttConnection, connect
from flows.publish_notification import NotificationRunResult, publish_notification
from tests.fixtures.paths import BUFR_EVENT, NETCDF_EVENT
from wis2.dataset import load_dataset
from wis2.validation import validate_notification

pytestmark = pytest.mark.timeout(180)

ARGO = load_dataset("argo")
BUFR_ASSET = "IOPX01_LFVX_251403.BU"


# --------------------------------------------------------------------------------------------
# helpers


class Subscriber:
    """An MQTT 5 subscriber with a persistent session: it also gets what was published while the
    broker was down and it reconnected."""

    def __init__(self, conn: MqttConnection, topic: str, persistent: bool = False) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = connect(
            conn,
            f"test-sub-{uuid.uuid4().hex[:8]}",
            clean_start=not persistent,
            session_expiry=300 if persistent else 0,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, json.loads(message.payload)))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[tuple[str, dict[str, Any]]]:
        """The messages received, once there are at least `count`; AssertionError after
        `timeout` seconds (a silent return would leave the test to wait or assert on less)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(
                    f"{len(self.messages)} of {count} message(s) after {timeout} s on "
                    f"{sorted({topic for topic, _ in self.messages})}")
            return list(self.messages)

    def settle(self, seconds: float = 1.5) -> list[tuple[str, dict[str, Any]]]:
        """Everything received after a quiet period (to check nothing more arrives)."""
        time.sleep(seconds)
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def bufr_event() -> dict[str, Any]:
    return json.loads(BUFR_EVENT.read_text(encoding="utf-8"))


def netcdf_event() -> dict[str, Any]:
    return json.loads(NETCDF_EVENT.read_text(encoding="utf-8"))


def sha256_multihash(content: bytes) -> str:
    return "1220" + hashlib.sha256(content).hexdigest()


def read_flow_run(flow_run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def read_artifacts(flow_run_id: UUID) -> dict[str, Artifact]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {a.key or f"unkeyed-{a.id}": a for a in artifacts}


def run(event: Any, **kwargs: Any):
    """Run the flow in-process; returns its final state."""
    return publish_notification(event=event, return_state=True, **kwargs)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api):
    """Settings of the flow for one test: its own results dir (cache + ledger), fast retries,
    verification off, an MqttBroker block for the test's broker (set by `use_broker`)."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    results = tmp_path / "results"
    block = f"test-broker-{uuid.uuid4().hex[:8]}"
    for name, value in {
        "WIS2_RESULTS_DIR": str(results),
        "WIS2_VERIFY_DATA": "false",
        "WIS2_PUBLISH_RETRIES": "6",
        "WIS2_RETRY_BASE_DELAY": "0.5",
        "WIS2_RETRY_JITTER_FACTOR": "0.1",
        "WIS2_BROKER_BLOCK": block,
        "WIS2_DEFAULT_DATASET": "argo",
    }.items():
        monkeypatch.setenv(name, value)

    def use_broker(broker) -> None:
        MqttBroker.from_connection(broker.connection("publisher")).save(block, overwrite=True)

    return type("Chain", (), {"results": results, "block": block, "use_broker": use_broker})


@pytest.fixture
def on_session_broker(chain, session_broker) -> Iterator[Subscriber]:
    chain.use_broker(session_broker)
    sub = Subscriber(session_broker.connection("everyone"), ARGO.topic)
    yield sub
    sub.close()


# --------------------------------------------------------------------------------------------
# the reference events


@pytest.mark.parametrize(
    ("load_event", "label"),
    [(bufr_event, BUFR_ASSET), (netcdf_event, "R7901113_022.nc")],
    ids=["bufr", "netcdf"],
)
def test_reference_event_is_published(on_session_broker: Subscriber, load_event, label) -> None:
    event = load_event()
    state = run(event)
    assert state.is_completed(), state.message
    result: NotificationRunResult = state.result()
    flow_run_id = state.state_details.flow_run_id

    # the run: completed, named after the file
    flow_run = read_flow_run(flow_run_id)
    assert flow_run.state.is_completed()
    assert flow_run.name == label

    # what a Global Broker would receive: one valid WNM on the dataset topic
    messages = on_session_broker.wait_for(1)
    assert len(messages) == 1, messages
    topic, message = messages[0]
    assert topic == ARGO.topic == result.topic
    report = validate_notification(message, topic=topic)
    assert report.ok, report.rows()
    assert [message["id"]] == result.ids
    assert message["properties"]["data_id"] == result.notifications[0].data_id
    assert message["properties"]["data_id"].startswith("wis2/fr-ifremer-argo/data/core/")
    assert label in message["properties"]["data_id"]
    assert result.notifications[0].rel == "canonical"
    asset = next(iter(event["data"]["assets"].values()))
    assert message["links"][0]["href"] == asset["href"]

    # the artifacts an operator sees
    artifacts = read_artifacts(flow_run_id)
    key = label.lower().replace(".", "-").replace("_", "-")
    assert {f"wnm-{key}", f"validation-{key}", f"data-{key}"} <= set(artifacts), artifacts.keys()
    markdown = artifacts[f"wnm-{key}"]
    assert markdown.type == "markdown"
    assert message["id"] in markdown.data and topic in markdown.data
    table = artifacts[f"validation-{key}"]
    assert table.type == "table"
    assert json.loads(table.data), "validation table has rows"
    link = artifacts[f"data-{key}"]  # a link artifact (stored as markdown)
    assert asset["href"] in link.data


def test_same_event_again_reuses_the_notification(on_session_broker: Subscriber) -> None:
    """A redelivered event (new flow run, same event) yields the SAME notification, not a second
    one; it is not even sent again."""
    first = run(bufr_event())
    second = run(bufr_event())
    assert first.is_completed() and second.is_completed(), second.message
    one: NotificationRunResult = first.result()
    two: NotificationRunResult = second.result()
    assert first.state_details.flow_run_id != second.state_details.flow_run_id
    assert two.ids == one.ids
    assert [n.pubtime for n in two.notifications] == [n.pubtime for n in one.notifications]
    assert [n.sent for n in one.notifications] == [True]
    assert [n.sent for n in two.notifications] == [False]
    messages = on_session_broker.settle()
    assert [m["id"] for _, m in messages] == one.ids

    # the second run's artifact shows the same id
    artifacts = read_artifacts(second.state_details.flow_run_id)
    assert one.ids[0] in artifacts["wnm-iopx01-lfvx-251403-bu"].data


def test_concurrent_runs_of_one_event_publish_one_notification(
    on_session_broker: Subscriber,
) -> None:
    """Two runs of the same event at once (a redelivery racing the first delivery): the cache
    lock makes the second wait and reuse the first's notification."""
    states: list[Any] = []

    def one_run() -> None:
        states.append(run(bufr_event()))

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(one_run,))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(states) == 2 and all(s.is_completed() for s in states), states
    results: list[NotificationRunResult] = [s.result() for s in states]
    assert results[0].ids == results[1].ids
    assert sorted(n.sent for r in results for n in r.notifications) == [False, True]
    messages = on_session_broker.settle()
    assert [m["id"] for _, m in messages] == results[0].ids


def test_changed_file_is_published_as_update(on_session_broker: Subscriber, chain) -> None:
    first = run(bufr_event()).result()
    changed = bufr_event()
    asset = changed["data"]["assets"][BUFR_ASSET]
    content = b"a corrected BUFR file"
    asset["file:checksum"] = sha256_multihash(content)
    asset["file:size"] = len(content)
    state = run(changed)
    assert state.is_completed(), state.message
    second: NotificationRunResult = state.result()

    assert second.notifications[0].data_id == first.notifications[0].data_id
    assert second.ids != first.ids
    assert (first.notifications[0].rel, second.notifications[0].rel) == ("canonical", "update")
    messages = on_session_broker.wait_for(2)
    assert [m["id"] for _, m in messages] == first.ids + second.ids
    assert [lk["rel"] for lk in messages[1][1]["links"]].count("update") == 1
    assert validate_notification(messages[1][1], topic=ARGO.topic).ok

    entry = SqliteLedger.in_dir(chain.results).get(second.notifications[0].data_id)
    assert entry is not None
    assert (entry.notification_id, entry.rel) == (second.ids[0], "update")


def test_a_rerun_built_before_a_newer_version_was_announced_announces_an_update(
        on_session_broker: Subscriber, chain, session_broker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29: event A's run builds its notification (canonical: nothing announced yet) and
    fails before publishing (the broker unreachable: `Unavailable`); event B, a new version of
    the same file, is announced meanwhile (canonical). A's rerun (the same event: its build is
    cached) must not announce the file as canonical a second time: never announced, it is built
    again against the ledger, as an update of B. A further rerun of A, announced by then, keeps
    its message id and sends nothing."""
    from chain.processes import free_port

    first = bufr_event()  # A
    newer = bufr_event()  # B: the same file, another checksum
    newer["id"] = "IOPX01_LFVX_251403-corrected"
    content = b"a corrected BUFR file"
    newer["data"]["assets"][BUFR_ASSET]["file:checksum"] = sha256_multihash(content)
    newer["data"]["assets"][BUFR_ASSET]["file:size"] = len(content)

    MqttBroker(host="127.0.0.1", port=free_port("127.0.0.1"),
               username="publisher").save(chain.block, overwrite=True)
    monkeypatch.setenv("WIS2_PUBLISH_RETRIES", "0")
    failed = run(first)
    assert failed.is_failed() and failed.name == "Unavailable", failed
    chain.use_broker(session_broker)
    monkeypatch.setenv("WIS2_PUBLISH_RETRIES", "6")

    announced = run(newer)
    assert announced.is_completed(), announced.message
    b: NotificationRunResult = announced.result()
    assert b.notifications[0].rel == "canonical"

    rerun = run(first)
    assert rerun.is_completed(), rerun.message
    a: NotificationRunResult = rerun.result()
    assert a.notifications[0].rel == "update" and a.notifications[0].sent
    assert a.notifications[0].data_id == b.notifications[0].data_id

    again = run(first)
    assert again.is_completed(), again.message
    assert again.result().ids == a.ids and not again.result().notifications[0].sent

    messages = on_session_broker.settle()
    assert [m["id"] for _, m in messages] == b.ids + a.ids
    assert [[lk["rel"] for lk in m["links"] if lk["rel"] in ("canonical", "update")]
            for _, m in messages] == [["canonical"], ["update"]]
    assert validate_notification(messages[1][1], topic=ARGO.topic).ok
    assert messages[1][1]["properties"]["pubtime"] > messages[0][1]["properties"]["pubtime"]
    entry = SqliteLedger.in_dir(chain.results).get(a.notifications[0].data_id)
    assert entry is not None and (entry.notification_id, entry.rel) == (a.ids[0], "update")


def test_deletion_event_publishes_a_deletion(on_session_broker: Subscriber, chain) -> None:
    first = run(bufr_event()).result()
    deletion = bufr_event()
    deletion["id"] = "IOPX01_LFVX_251403-deleted"
    deletion["operation"] = "delete"
    state = run(deletion)
    assert state.is_completed(), state.message
    second: NotificationRunResult = state.result()
    assert second.notifications[0].rel == "deletion"
    assert second.notifications[0].data_id == first.notifications[0].data_id
    messages = on_session_broker.wait_for(2)
    assert [m["id"] for _, m in messages] == first.ids + second.ids
    assert [lk["rel"] for lk in messages[1][1]["links"]] == ["deletion"]
    assert validate_notification(messages[1][1], topic=ARGO.topic).ok
    entry = SqliteLedger.in_dir(chain.results).get(second.notifications[0].data_id)
    assert entry is not None and entry.rel == "deletion"


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_checksum_fails_the_run_with_the_field_named(on_session_broker: Subscriber) -> None:
    event = bufr_event()
    event["data"]["assets"][BUFR_ASSET]["file:checksum"] = "12zz-not-a-multihash"
    state = run(event)

    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    flow_run = read_flow_run(flow_run_id)
    assert flow_run.state.is_failed()
    assert "file:checksum" in flow_run.state.message

    artifacts = read_artifacts(flow_run_id)
    failures = [a for a in artifacts.values() if a.key and a.key.startswith("failed-")]
    assert failures, artifacts.keys()
    failure = failures[0].data
    assert "file:checksum" in failure
    assert "12zz-not-a-multihash" in failure  # the event as received, to fix and replay
    assert "publish-notification/default" in failure
    assert on_session_broker.settle() == []


def test_event_that_is_not_a_cloudevent_fails_cleanly(on_session_broker: Subscriber) -> None:
    state = run({"id": "x", "data": "not a STAC item"})
    assert state.is_failed()
    message = read_flow_run(state.state_details.flow_run_id).state.message
    assert "specversion" in message or "$.data" in message
    assert on_session_broker.settle(0.5) == []


def test_invalid_notification_fails_once_without_retry(
    on_session_broker: Subscriber, tmp_path: Path
) -> None:
    """A dataset that yields invalid messages (policy before `data` in data_id, the original
    chain's defect): the run fails at validation, never retries, publishes nothing."""
    template = "wis2/{centre_id}/{data_policy}/data/{href_path}"
    dataset = ARGO.model_copy(update={"name": "argo-bad", "data_id_template": template})
    path = tmp_path / "argo-bad.json"
    path.write_text(dataset.model_dump_json(), encoding="utf-8")

    state = run(bufr_event(), dataset=str(path))
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    assert "data-id" in read_flow_run(flow_run_id).state.message
    # The server records task runs from the engine's events in bulk (at most a second later).
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            validation = [t for t in task_runs if t.name.startswith("validate-notifications")]
            if (validation and validation[0].state is not None and validation[0].state.is_final()) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert [t.run_count for t in validation] == [1]
    assert not [t for t in task_runs if t.name.startswith("publish-notification")]
    artifacts = read_artifacts(flow_run_id)
    table = json.loads(artifacts["validation-iopx01-lfvx-251403-bu"].data)
    assert any(row["check"] == "data-id" and row["result"] == "FAILED" for row in table)
    assert "failed-iopx01-lfvx-251403-bu" in artifacts
    assert on_session_broker.settle() == []


# --------------------------------------------------------------------------------------------
# broker outage


def _publish_task_retried_since(since: datetime, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
                task_run_filter=TaskRunFilter(
                    name=TaskRunFilterName(like_="publish-notification"),
                    state=TaskRunFilterState(
                        name=TaskRunFilterStateName(any_=["AwaitingRetry", "Retrying"])
                    ),
                ),
            )
            if runs:
                return True
            time.sleep(0.2)
    return False


def test_broker_down_then_up_retries_and_publishes_once(chain, mqtt_broker) -> None:
    chain.use_broker(mqtt_broker)
    sub = Subscriber(mqtt_broker.connection("everyone"), ARGO.topic, persistent=True)
    try:
        mqtt_broker.stop()
        since = datetime.now(UTC)
        outcome: dict[str, Any] = {}
        context = contextvars.copy_context()  # the thread must talk to the test's Prefect API
        worker = threading.Thread(
            target=context.run, args=(lambda: outcome.update(state=run(bufr_event())),)
        )
        worker.start()
        assert _publish_task_retried_since(since), "the publish task never retried"
        mqtt_broker.start()
        worker.join(120)
        assert not worker.is_alive()

        state = outcome["state"]
        assert state.is_completed(), state.message
        result: NotificationRunResult = state.result()
        messages = sub.wait_for(1, timeout=30)
        messages = sub.settle(1.0)
        assert [m["id"] for _, m in messages] == result.ids
    finally:
        sub.close()


# --------------------------------------------------------------------------------------------
# data verification


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def _served_event(base_url: str, root: Path, content: bytes, announced: bytes) -> dict[str, Any]:
    path = root / "etc" / "bufr" / "202503" / BUFR_ASSET
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    event = bufr_event()
    event["id"] = f"verify-{uuid.uuid4().hex[:8]}"
    asset = event["data"]["assets"][BUFR_ASSET]
    asset["href"] = f"{base_url}/etc/bufr/202503/{BUFR_ASSET}"
    asset["file:checksum"] = sha256_multihash(announced)
    asset["file:size"] = len(announced)
    return event


def test_verify_data_accepts_the_announced_file(
    on_session_broker: Subscriber, file_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIS2_VERIFY_DATA", "true")
    base_url, root = file_server
    content = b"BUFR" + bytes(range(200)) + b"7777"
    state = run(_served_event(base_url, root, content, content))
    assert state.is_completed(), state.message
    assert state.result().verified is True
    assert len(on_session_broker.wait_for(1)) == 1


def test_verify_data_rejects_a_wrong_checksum(
    on_session_broker: Subscriber, file_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIS2_VERIFY_DATA", "true")
    base_url, root = file_server
    content = b"BUFR" + bytes(range(200)) + b"7777"
    other = bytes(reversed(content))  # same length, other checksum
    state = run(_served_event(base_url, root, content, other))
    assert state.is_failed()
    message = read_flow_run(state.state_details.flow_run_id).state.message
    assert "integrity" in message
    assert on_session_broker.settle() == []


# --------------------------------------------------------------------------------------------
# secrets


def test_artifacts_do_not_leak_the_password(on_session_broker: Subscriber, session_broker) -> None:
    password = session_broker.connection("publisher").password
    assert password is not None
    state = run(copy.deepcopy(bufr_event()))
    assert state.is_completed(), state.message
    artifacts = read_artifacts(state.state_details.flow_run_id)
    for artifact in artifacts.values():
        assert password.get_secret_value() not in str(artifact.data)
