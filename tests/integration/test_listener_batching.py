"""The listener with batching on, as a user relies on it: real broker, real Prefect API, and a
real worker (the node's default `wis2-warm` type) running publish-notification / publish-batch
deployments.

What matters is on the origin topic: every event gets exactly one notification (one message id
per data_id, none twice), even after a SIGKILL mid-burst regroups redelivered events into other
batches; no run fails; bursts take fewer runs than events; an event on an idle listener gets a
run of the single-event deployment; malformed messages still go to the dead-letter store.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import RunningBroker
from chain.processes import ManagedProcess
from localnode.prefect_server import PrefectServer, prefect_cli
from tests.fixtures.gates import ApiGate
from tests.fixtures.paths import BUFR_EVENT, REPO
from tests.integration import test_listener
from tests.integration.test_listener import (
    TOPIC,
    Deployment,
    Listener,
    publish,
    run_events,
    wait_for,
)
from tests.integration.test_publish_notification import Subscriber

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ASSET = "IOPX01_LFVX_251403.BU"
make_listener = test_listener.make_listener  # the fixtures, shared
deployment = test_listener.deployment


def file_event(tag: str, i: int) -> bytes:
    """The reference event for a file of its own (own data_id)."""
    event = json.loads(BUFR_EVENT.read_text())
    event["id"] = f"{tag}-{i:04d}"
    asset = event["data"]["assets"].pop(ASSET)
    name = f"{tag.upper()}_{i:04d}.BU"
    asset["href"] = asset["href"].replace(ASSET, name)
    event["data"]["assets"][name] = asset
    return json.dumps(event).encode()


class Node:
    """A work pool with a wis2-warm worker (as `make demo` and compose run it), and for each test
    a pair of deployments on it. The process worker is tested in test_deployment.py."""

    def __init__(self, api: PrefectServer, tmp: Path) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.api, self.pool, self.block = api, f"batching-{suffix}", f"batching-{suffix}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
        env.update(api.client_env(), PREFECT_HOME=str(tmp / "worker-home"))
        created = subprocess.run(
            [prefect_cli(), "work-pool", "create", self.pool, "--type", "wis2-warm"], env=env,
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert created.returncode == 0, created.stdout + created.stderr
        env.update(WIS2_RESULTS_DIR=str(tmp / "results"), WIS2_VERIFY_DATA="false",
                   WIS2_BROKER_BLOCK=self.block, WIS2_PUBLISH_RETRIES="2",
                   WIS2_RETRY_BASE_DELAY="0.5", PREFECT_WORKER_QUERY_SECONDS="1")
        self.worker = ManagedProcess(
            "worker", [prefect_cli(), "worker", "start", "--pool", self.pool, "--type", "wis2-warm",
             "--limit", "4"],
            tmp / "worker.log", env=env, cwd=REPO)

    def deploy(self, broker: RunningBroker) -> tuple[Deployment, Deployment]:
        """publish-notification/<name> and publish-batch/<name> publishing on `broker`."""
        from blocks.mqtt_broker import MqttBroker
        from flows.publish_batch import publish_batch
        from flows.publish_notification import publish_notification

        MqttBroker.from_connection(broker.connection("publisher")).save(
            self.block, overwrite=True)
        name = f"batching-{uuid.uuid4().hex[:8]}"
        for flow in (publish_notification, publish_batch):
            flow.to_deployment(name=name, job_variables={"working_dir": str(REPO)}).apply(
                work_pool_name=self.pool)
        return (Deployment(self.api.api_url, existing=name),
                Deployment(self.api.api_url, existing=name, flow="publish-batch"))


@pytest.fixture(scope="module")
def node(prefect_api: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(prefect_api, tmp_path_factory.mktemp("batching-node"))
    node.worker.start()
    yield node
    node.worker.stop(timeout=20)


@pytest.fixture
def origin(mqtt_broker: RunningBroker) -> Iterator[Subscriber]:
    """What a Global Broker receives."""
    sub = Subscriber(mqtt_broker.connection("everyone"), "origin/a/wis2/#", persistent=True)
    yield sub
    sub.close()


def all_runs(*deployments: Deployment) -> list[Any]:
    return [run for d in deployments for run in d.runs()]


def events_in_runs(*deployments: Deployment) -> list[str]:
    return [event["id"] for run in all_runs(*deployments) for event in run_events(run)]


def wait_all_final(deployments: tuple[Deployment, ...], node: Node, listener: Listener,
                   timeout: float) -> list[Any]:
    def final() -> list[Any] | None:
        runs = all_runs(*deployments)
        return runs if all(r.state is not None and r.state.is_final() for r in runs) else None

    return wait_for(final, timeout, "every run to finish",
                    lambda: f"{listener.debug()}\n--- worker ---\n{node.worker.tail(60)}")


def assert_one_notification_per_event(origin: Subscriber, expected: list[str],
                                      runs: list[Any]) -> None:
    """Exactly one notification per event's file: no event lost, none published twice."""
    failed = [(r.name, r.state.message) for r in runs if not r.state.is_completed()]
    assert not failed, failed
    names = {f"{e.split('-')[0].upper()}_{e.split('-')[1]}.BU" for e in expected}
    origin.wait_for(len(names), 60)
    messages = origin.settle(1.5)
    data_ids = [m["properties"]["data_id"].rsplit("/", 1)[-1] for _, m in messages]
    assert sorted(data_ids) == sorted(names), "lost or duplicated notifications"
    assert len({m["id"] for _, m in messages}) == len(messages)


def test_idle_event_burst_and_malformed_messages(
    node: Node, mqtt_broker: RunningBroker, origin: Subscriber, make_listener
) -> None:
    single, batch = node.deploy(mqtt_broker)
    listener = make_listener(node.api.api_url, single.full_name, batch.full_name).start(60)

    # an event on an idle listener: a run of the single-event deployment, at once
    publish(mqtt_broker, [(TOPIC, file_event("idle", 0))])
    wait_for(lambda: single.event_ids() == ["idle-0000"], 30, "the single run", listener.debug)
    assert listener.stop() == 0

    # 50 events (and 3 malformed messages in their middle) queued while the listener is away
    burst = [(TOPIC, file_event("queued", i)) for i in range(50)]
    burst[20:20] = [(TOPIC, b"{not json"), (TOPIC, b"\xff\xfe"),
                    (TOPIC, json.dumps({"specversion": "1.0", "id": "x"}).encode())]
    publish(mqtt_broker, burst)
    listener.start(60)
    expected = ["idle-0000"] + [f"queued-{i:04d}" for i in range(50)]
    wait_for(lambda: sorted(events_in_runs(single, batch)) == sorted(expected), 60,
             "a run for every event", listener.debug)
    runs = wait_all_final((single, batch), node, listener, 150)
    assert len(runs) < len(expected), "a burst should take fewer runs than events"
    assert batch.runs(), "no batch run"
    assert all(r.parameters["dataset"] == "argo" for r in runs)
    assert_one_notification_per_event(origin, expected, runs)

    letters = json.loads(listener.cli("deadletters", "list", "--json").stdout)
    assert sorted(x["reason"] for x in letters) == ["invalid_event", "not_json", "not_utf8"]
    metrics = wait_for(lambda: (m := listener.metrics()) and m.get(
        "wis2_listener_oldest_unacked_age_seconds") == 0 and m, 10, "all acked")
    batches = metrics[f'wis2_listener_batches_created_total{{deployment="{batch.full_name}"}}']
    assert batches == len(batch.runs()) >= 1
    assert metrics["wis2_listener_batch_size_count"] == batches
    assert metrics["wis2_listener_batch_size_sum"] == sum(
        len(run_events(r)) for r in batch.runs())


def test_sigkill_mid_burst_publishes_each_event_once(
    node: Node, mqtt_broker: RunningBroker, origin: Subscriber, make_listener
) -> None:
    """The listener SIGKILLed while it holds events it cannot acknowledge yet (their run
    creation is held by a gate in front of the Prefect API: the middle of the burst is made, not
    raced); restarted, it gets them again and may group them otherwise: one notification per
    file all the same."""
    single, batch = node.deploy(mqtt_broker)
    gate = ApiGate(node.api.api_url, allow=1)
    try:
        listener = make_listener(gate.api_url, single.full_name, batch.full_name).start(60)
        count = 60
        publish(mqtt_broker, [(TOPIC, file_event("burst", i)) for i in range(count)])
        gate.wait_held(1, 60, listener.debug)  # events received, not acknowledged
        listener.kill()
        killed_at = len(events_in_runs(single, batch))
        assert killed_at < count  # the held creation's events are in no run
        gate.release()  # the held creation reaches the server after its listener died

        listener.start(60)
        expected = [f"burst-{i:04d}" for i in range(count)]
        wait_for(lambda: set(events_in_runs(single, batch)) == set(expected), 90,
                 "a run for every event", listener.debug)
        runs = wait_all_final((single, batch), node, listener, 180)
        assert len(runs) < count
        assert_one_notification_per_event(origin, expected, runs)
        wait_for(lambda: listener.metrics().get("wis2_listener_oldest_unacked_age_seconds")
                 == 0, 10, "all acked", listener.debug)
    finally:
        gate.close()


def test_missing_batch_deployment_falls_back_to_single_runs(
    mqtt_broker: RunningBroker, deployment: Deployment, make_listener
) -> None:
    """A node that did not deploy publish-batch still works: one run per event, one warning."""
    listener = make_listener(deployment.api_url, deployment.full_name,
                             f"publish-batch/never-deployed-{uuid.uuid4().hex[:6]}").start(60)
    assert listener.stop() == 0
    publish(mqtt_broker, [(TOPIC, file_event("nobatch", i)) for i in range(20)])
    listener.start(60)
    wait_for(lambda: len(deployment.runs()) == 20, 60, "20 single runs", listener.debug)
    assert sorted(deployment.event_ids()) == [f"nobatch-{i:04d}" for i in range(20)]
    assert listener.tail(400).count("batch deployment missing") == 1
    wait_for(lambda: listener.metrics().get("wis2_listener_oldest_unacked_age_seconds") == 0,
             10, "all acked", listener.debug)


def test_bulk_creation_keeps_each_batch_runs_idempotency_key(prefect_api: PrefectServer) -> None:
    """Several batch runs in ONE call (Prefect's bulk creation, `batch_runs_per_call`): the same
    call again (a retry after a lost answer) creates nothing, and a call with one batch more
    creates only that one; each run holds its batch's events."""
    import asyncio

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from listener.messages import check_message
    from listener.runs import RunCreator
    from listener.settings import Route
    from tests.unit.listener.helpers import settings

    batch = Deployment(prefect_api.api_url, flow="publish-batch")
    route = Route(topic_filter="diffusion/files/#", batch_deployment=batch.full_name)
    events = [check_message(settings(), "diffusion/files/x", file_event("bulk", i))[1]
              for i in range(6)]
    batches = [events[0:2], events[2:4], events[4:6]]

    refused: list[str] = []

    async def bulk(creator: RunCreator, some: list[Any]) -> list[Any]:
        """The call, made again while the server refuses a batch of it (a busy test server can
        answer one batch with a database error, e.g. SQLite's lock: the listener then creates
        that batch alone); a repeat is what this test checks anyway: the same keys."""
        for _ in range(5):
            results = await creator.create_batches(some, route)
            if not (errors := [r for r in results if isinstance(r, str)]):
                return results
            refused.extend(errors)
        raise AssertionError(f"the bulk call kept refusing batches: {refused}")

    async def create() -> list[list[Any]]:
        with temporary_settings({PREFECT_API_URL: prefect_api.api_url}):
            async with RunCreator() as creator:
                return [await bulk(creator, some)
                        for some in (batches[:2], batches[:2], batches)]

    first, again, more = asyncio.run(create())
    if refused:
        print(f"batches refused then created by a repeat: {refused}")
    ids = [[r.run_id for r in results] for results in (first, again, more)]
    assert ids[0] == ids[1] == ids[2][:2] and len(set(ids[2])) == 3, (first, again, more)
    runs = {run.id: sorted(e["id"] for e in run_events(run)) for run in batch.runs()}
    assert runs == {run_id: sorted(e.id for e in some) for run_id, some in zip(
        ids[2], batches, strict=True)}


def test_a_batch_is_held_until_full_while_runs_wait(
    prefect_api: PrefectServer, mqtt_broker: RunningBroker, make_listener
) -> None:
    """Three of the listener's runs wait Scheduled (their deployments have no worker: the chain
    is behind) and the threshold is 3: a batch is not cut at `batch_max_wait` (0 here) but held,
    its events unacknowledged, until it is full; the count is on /metrics. The events come in
    two groups, the second published only once every event of the first is placed: in the
    held batch (`wis2_listener_batch_held_events`: once a batch is held, every event received
    joins it) or in a run of its own (taken before the batch began); nothing raced."""
    single = Deployment(prefect_api.api_url)
    batch = Deployment(prefect_api.api_url, flow="publish-batch")
    size = 30
    listener = make_listener(prefect_api.api_url, single.full_name, batch.full_name,
                             batch_max_wait=0, batch_max_size=size, batch_hold_waiting_runs=3,
                             batch_hold_max=3600).start(60)
    for i in range(3):  # an idle listener: a run of its own each, left waiting
        publish(mqtt_broker, [(TOPIC, file_event("waiting", i))])
        wait_for(lambda i=i: len(single.runs()) == i + 1, 30, "a single run", listener.debug)

    publish(mqtt_broker, [(TOPIC, file_event("held", i)) for i in range(10)])

    def placed() -> dict[str, float] | None:
        alone = len(single.runs()) - 3
        m = listener.metrics()
        held_now = int(m["wis2_listener_batch_held_events"])
        return m if held_now and held_now + alone == 10 else None

    held = wait_for(placed, 30, "the burst placed", listener.debug)
    assert held["wis2_listener_runs_waiting"] >= 3
    assert batch.runs() == [], "the batch was cut before it was full"
    missing = size - int(held["wis2_listener_batch_held_events"])
    publish(mqtt_broker, [(TOPIC, file_event("fill", i)) for i in range(missing)])
    runs = wait_for(lambda: batch.runs() or None, 30, "the batch run", listener.debug)
    assert [len(run_events(r)) for r in runs] == [size]
    expected = {f"held-{i:04d}" for i in range(10)} | {f"fill-{i:04d}" for i in range(missing)}
    assert expected <= set(single.event_ids()) | set(batch.event_ids())
    wait_for(lambda: listener.metrics()["wis2_listener_in_flight"] == 0, 10, "all acked",
             listener.debug)
