"""Two listener replicas on one shared subscription (`$share/wis2/diffusion/files/#`), as the
scaled node runs them (`localnode/scaled.py`: real mosquitto, Prefect server on PostgreSQL,
Redis, a worker), one SIGKILLed mid-burst and restarted as a supervisor would (same client id).

What mosquitto 2.0 does with a shared-subscription member that dies (checked on Debian's 2.0.11,
README "Listener replicas"): the QoS 1 messages it received and had not acknowledged stay in its
persistent session and are sent to it again (DUP) when it comes back under the same client id;
they are not given to the other member. Messages published while it is away are still shared
out round-robin, and its share is queued in its session too (up to `max_queued_messages`).
So nothing is lost, provided the replica comes back, or its events are drained: a replica
started with `WIS2_LISTENER_RETIRE=true` resumes its session and unsubscribes, takes what the
session holds, and gets no new turn.

"The middle" is made: replica 1 reaches the Prefect API through a gate (tests/fixtures/gates.py)
that holds its run creations, so when it is killed it certainly holds events it received and
has not acknowledged. (Letting its first creation through raced the burst: its ~30 events of
the 60 could all fit in one batch, and no second creation came to be held.) We count
notifications on `origin/a/wis2/#`, not runs: a redelivered event may form another batch run;
the flows' idempotency must make that harmless.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.collect import Collector
from bench.events import EventFactory
from chain.mqtt import Publisher
from chain.processes import free_port
from localnode.node import NodeSettings
from localnode.scaled import ScaledNode, Topology
from tests.fixtures.gates import ApiGate
from tests.integration import test_listener
from tests.integration.test_listener import Deployment, event_payload, publish, wait_for
from wis2.dataset import load_dataset

TOPIC = "diffusion/files/coriolis/argo/csv"
# The listener tests' fixtures: a deployment with no worker, listeners as processes.
deployment = test_listener.deployment
make_listener = test_listener.make_listener


class GatedReplicaNode(ScaledNode):
    """Listener replica 1 talks to the Prefect API through `gate`, which holds its run
    creations until released."""

    def __init__(self, settings: NodeSettings, topology: Topology) -> None:
        super().__init__(settings, topology)
        self.gate = ApiGate(f"http://{settings.host}:{settings.prefect_port}/api", allow=0)

    def replica_env(self, i: int) -> dict[str, str]:
        env = super().replica_env(i)
        if i == 1:
            env["PREFECT_API_URL"] = self.gate.api_url
        return env

    def replica(self, i: int):
        return next(p for p in self.processes if p.name == f"listener-{i}")

    def counters(self, i: int) -> dict[str, float]:
        text = httpx.get(f"http://{self.settings.host}:{self.listener_metrics_ports[i - 1]}"
                         "/metrics", timeout=5).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples


@pytest.fixture
def node(tmp_path: Path) -> Iterator[GatedReplicaNode]:
    settings = NodeSettings(
        _env_file=None, run_dir=tmp_path / "node", broker_port=free_port(),
        broker_ws_port=free_port(), prefect_port=free_port(), files_port=free_port(),
        metrics_port=free_port(), verify_data=False, timeout=180,
    )
    # Two worker hosts sharing the ledger and the results: a redelivered event grouped into
    # another batch run may run on the other worker, and finds its notification there too.
    node = GatedReplicaNode(settings, Topology(workers=2, listeners=2))
    try:
        node.start()
        node.publish_metadata(settings.metadata_record)
        yield node
    finally:
        node.gate.close()
        node.stop()


def debug(node: GatedReplicaNode) -> str:
    return "\n".join(f"--- {p.name}\n{p.tail(40)}" for p in node.processes
                     if p.name.startswith(("listener", "worker")))


def test_replica_sigkilled_mid_burst_loses_and_doubles_nothing(node: GatedReplicaNode) -> None:
    factory = EventFactory(load_dataset("argo"), "replicas", files_url=node.files_url)
    first = factory.batch("first", 60)
    while_away = factory.batch("away", 20)
    with Collector(node.state.connection("everyone"), node.settings.centre_id) as collector:
        with Publisher(node.state.connection("fileserver")) as pub:
            for event in first:
                pub.publish(TOPIC, event.payload, qos=1)
        # Replica 1's run creations are held: it holds events it has not acknowledged.
        node.gate.wait_held(1, 120, lambda: debug(node))
        replica = node.replica(1)
        assert node.counters(1)["wis2_listener_in_flight"] >= 1
        replica.kill()
        node.gate.release()  # the held creation reaches the server after the kill
        with Publisher(node.state.connection("fileserver")) as pub:
            for event in while_away:  # shared out: replica 1's share waits in its session
                pub.publish(TOPIC, event.payload, qos=1)

        replica.start(90)  # as a supervisor would: same client id, same session
        events = first + while_away
        deadline = time.monotonic() + 240
        assert collector.wait_for([e.data_id for e in events], deadline), (
            f"{collector.received([e.data_id for e in events])}/{len(events)} notifications\n"
            + debug(node))
        time.sleep(3)  # a late second message for any file would show up now
        copies = {e.data_id: collector.copies(e.data_id) for e in events}
    doubled = {data_id: c for data_id, c in copies.items() if c != (1, 1)}
    assert not doubled, doubled
    # The restarted replica got its session back: the events it held, and its share of those
    # published while it was away, came to it again.
    restarted = node.counters(1)
    assert restarted["wis2_listener_events_received_total"] >= 1
    assert "session_present=True" in replica.tail(400)
    assert restarted["wis2_listener_in_flight"] == 0


def test_a_retired_replica_drains_its_session_and_gets_no_new_turn(
    mqtt_broker, deployment: Deployment, make_listener,
) -> None:
    """Replica 1 is stopped (its session keeps its subscription, so its turns of the shared
    subscription queue up there); started again with RETIRE, it takes them and unsubscribes:
    later events all go to replica 2."""
    shared = '["$share/wis2/diffusion/files/#"]'
    one = make_listener(deployment.api_url, deployment.full_name, subscriptions=shared,
                        client_id="replica-one").start(60)
    two = make_listener(deployment.api_url, deployment.full_name, subscriptions=shared,
                        client_id="replica-two").start(60)
    for replica in (one, two):
        wait_for(lambda r=replica: "msg=subscribed" in r.tail(200), 30, "the subscription",
                 replica.debug)
    assert one.stop() == 0  # SIGTERM: a clean exit, the session (and its subscription) stays
    publish(mqtt_broker, [(TOPIC, event_payload("away", i)) for i in range(20)])
    one.env["WIS2_LISTENER_RETIRE"] = "true"
    one.start(60)
    wait_for(lambda: "unsubscribed (retiring)" in one.tail(200), 30, "the unsubscription",
             one.debug)
    wait_for(lambda: len(deployment.runs()) == 20, 60, "20 runs", one.debug)
    wait_for(lambda: one.metrics()["wis2_listener_in_flight"] == 0
             and two.metrics()["wis2_listener_in_flight"] == 0, 30, "all acknowledged")
    drained = one.metrics()["wis2_listener_events_received_total"]
    taken_by_two = two.metrics()["wis2_listener_events_received_total"]
    assert drained >= 1 and drained + taken_by_two == 20  # its turns had waited in its session

    publish(mqtt_broker, [(TOPIC, event_payload("later", i)) for i in range(10)])
    wait_for(lambda: len(deployment.runs()) == 30, 60, "30 runs", two.debug)
    time.sleep(1)
    assert one.metrics()["wis2_listener_events_received_total"] == drained  # no new turn
    assert two.metrics()["wis2_listener_events_received_total"] == taken_by_two + 10
    assert sorted(deployment.event_ids()) == sorted(
        [f"away-{i:04d}" for i in range(20)] + [f"later-{i:04d}" for i in range(10)])
