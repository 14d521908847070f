"""The MQTT listener as a user runs it: `python -m listener` with a real broker and Prefect API.

Each test registers a deployment of a flow named "publish-notification" (no worker: runs are only
created) under a name of its own and routes the listener to it, then counts that deployment's
flow runs through the Prefect client. These tests run with batching off (no batch deployment in
the route): one run per event; tests/integration/test_listener_batching.py covers batching.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.launcher import RunningBroker
from chain.mqtt import Publisher
from chain.processes import ManagedProcess, free_port
from localnode.prefect_server import PrefectServer
from tests.fixtures.gates import ApiGate
from tests.fixtures.paths import BUFR_EVENT, REPO
from tests.fixtures.prefect_api import QUIET_SERVICES

FLOW = "publish-notification"
TOPIC = "diffusion/files/coriolis/argo/bufr"


# ---- helpers ---------------------------------------------------------------------------------
def event_payload(tag: str, i: int = 0) -> bytes:
    event = json.loads(BUFR_EVENT.read_text())
    event["id"] = f"{tag}-{i:04d}"
    return json.dumps(event).encode()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             on_fail: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_fail()}")
        time.sleep(0.3)


def publish(broker: RunningBroker, payloads: list[tuple[str, bytes]]) -> None:
    with Publisher(broker.connection("fileserver")) as pub:
        for topic, payload in payloads:
            pub.publish(topic, payload, qos=1)


class Deployment:
    """A deployment of a flow (publish-notification by default), and its runs (no worker
    needed)."""

    def __init__(self, api_url: str, existing: str | None = None, name: str | None = None,
                 flow: str = FLOW) -> None:
        self.api_url = api_url
        self.flow = flow
        self.name = existing or name or f"listener-{uuid.uuid4().hex[:8]}"
        with self.client() as client:
            if existing:
                self.id = client.read_deployment_by_name(f"{flow}/{existing}").id
            else:
                flow_id = client.create_flow_from_name(flow)
                self.id = client.create_deployment(flow_id=flow_id, name=self.name)

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient
        return SyncPrefectClient(self.api_url)

    def runs(self) -> list[Any]:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        runs: list[Any] = []
        with self.client() as client:
            while True:
                page = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.id])),
                    limit=200, offset=len(runs))
                runs += page
                if len(page) < 200:
                    return runs

    def event_ids(self) -> list[str]:
        """The ids of the events of every run (a batch run has several)."""
        return [event["id"] for run in self.runs() for event in run_events(run)]


def run_events(run: Any) -> list[dict[str, Any]]:
    """The events of a run: `event` (publish-notification) or `events` (publish-batch)."""
    if "events" in run.parameters:
        return list(run.parameters["events"])
    return [run.parameters["event"]]


class Listener(ManagedProcess):
    def __init__(self, tmp: Path, broker: RunningBroker, api_url: str, deployment: str,
                 batch_deployment: str | None = None, **settings: Any) -> None:
        conn = broker.connection("listener")
        self.metrics_port = free_port()
        self.deadletter_dir = tmp / "deadletters"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
        env.update({
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(tmp / "listener-prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "WIS2_LISTENER_HOST": conn.host,
            "WIS2_LISTENER_PORT": str(conn.port),
            "WIS2_LISTENER_USERNAME": conn.username or "",
            "WIS2_LISTENER_PASSWORD": conn.password.get_secret_value() if conn.password else "",
            "WIS2_LISTENER_CLIENT_ID": f"test-listener-{uuid.uuid4().hex[:8]}",
            "WIS2_LISTENER_DEADLETTER_DIR": str(self.deadletter_dir),
            "WIS2_LISTENER_METRICS_PORT": str(self.metrics_port),
            "WIS2_LISTENER_ROUTES": json.dumps(  # no batch deployment: one run per event
                [{"topic_filter": "diffusion/files/#", "deployment": deployment,
                  "batch_deployment": batch_deployment, "dataset": "argo"}]),
            "WIS2_LISTENER_RETRY_MIN_DELAY": "0.2",
            "WIS2_LISTENER_RETRY_MAX_DELAY": "2",
            "WIS2_LISTENER_RECONNECT_MAX_DELAY": "2",
            "WIS2_LISTENER_LOG_LEVEL": "DEBUG",
        })
        env.update({f"WIS2_LISTENER_{k.upper()}": str(v) for k, v in settings.items()})
        self.fileserver = broker.connection("fileserver")
        super().__init__("listener", [sys.executable, "-m", "listener"],
                         tmp / f"listener-{uuid.uuid4().hex[:4]}.log", env=env, cwd=REPO,
                         ready=self.healthy)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url("/healthz"), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        text = httpx.get(self.url("/metrics"), timeout=5).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "listener", *args], env={**self.env, **env},
                              cwd=REPO, capture_output=True, text=True, timeout=60, check=False)

    def debug(self) -> str:
        return f"--- listener log ({self.log_path}) ---\n{self.tail(40)}"


@pytest.fixture
def deployment(prefect_api: PrefectServer) -> Deployment:
    return Deployment(prefect_api.api_url)


@pytest.fixture
def make_listener(tmp_path: Path, mqtt_broker: RunningBroker) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def make(api_url: str, deployment: str, batch_deployment: str | None = None,
             **settings: Any) -> Listener:
        listener = Listener(tmp_path, mqtt_broker, api_url, deployment, batch_deployment,
                            **settings)
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop(timeout=20)


# ---- tests -----------------------------------------------------------------------------------
def test_events_queued_while_stopped_become_runs(
    mqtt_broker: RunningBroker, deployment: Deployment, make_listener
) -> None:
    listener = make_listener(deployment.api_url, deployment.full_name).start(60)
    publish(mqtt_broker, [(TOPIC, event_payload("warmup"))])
    wait_for(lambda: len(deployment.runs()) == 1, 30, "the warm-up run", listener.debug)
    assert listener.stop() == 0  # SIGTERM: clean exit, the broker keeps the session

    publish(mqtt_broker, [(TOPIC, event_payload("queued", i)) for i in range(50)])
    listener.start(60)
    wait_for(lambda: len(deployment.runs()) == 51, 60, "51 runs", listener.debug)
    ids = deployment.event_ids()
    assert sorted(ids) == sorted(["warmup-0000"] + [f"queued-{i:04d}" for i in range(50)])
    run = next(r for r in deployment.runs() if r.parameters["event"]["id"] == "queued-0007")
    assert run.parameters["dataset"] == "argo"
    assert run.idempotency_key.startswith(f"wis2-listener:{deployment.full_name}:")
    assert "wis2-listener" in run.tags
    metrics = wait_for(lambda: (m := listener.metrics()) and m.get(
        "wis2_listener_oldest_unacked_age_seconds") == 0 and m, 10, "all acked")
    assert metrics[f'wis2_listener_runs_created_total{{deployment="{deployment.full_name}"}}'] == 50
    assert metrics["wis2_listener_events_received_total"] == 50
    assert "connected to the broker" in listener.tail(400)
    assert "session_present=True" in listener.tail(400)


def test_sigkill_mid_burst_gives_exactly_one_run_per_event(
    mqtt_broker: RunningBroker, deployment: Deployment, make_listener,
    request: pytest.FixtureRequest,
) -> None:
    """Killed while run creations are held by a gate in front of the Prefect API (events
    received and not acknowledged: the middle of the burst is made, not raced); a held creation
    reaches the server after the kill, as one sent just before a crash."""
    gate = ApiGate(deployment.api_url, allow=25)
    request.addfinalizer(gate.close)
    listener = make_listener(gate.api_url, deployment.full_name).start(60)
    count = 120
    publish(mqtt_broker, [(TOPIC, event_payload("burst", i)) for i in range(count)])
    gate.wait_held(1, 60, listener.debug)
    listener.kill()
    killed_at = len(deployment.runs())
    assert 0 < killed_at <= 25  # the held creation's event is in no run yet
    gate.release()

    listener.start(60)
    wait_for(lambda: len(deployment.runs()) >= count, 90, f"{count} runs", listener.debug)
    time.sleep(1.5)  # any late duplicate would show up now
    runs = deployment.runs()
    ids = [run.parameters["event"]["id"] for run in runs]
    assert len(runs) == count and sorted(ids) == sorted(f"burst-{i:04d}" for i in range(count))
    assert len({run.idempotency_key for run in runs}) == count
    wait_for(lambda: listener.metrics().get("wis2_listener_oldest_unacked_age_seconds") == 0,
             10, "all acked", listener.debug)


def test_broker_restart_reconnects(
    mqtt_broker: RunningBroker, deployment: Deployment, make_listener
) -> None:
    listener = make_listener(deployment.api_url, deployment.full_name).start(60)
    mqtt_broker.stop()
    status = wait_for(lambda: not listener.healthy() and httpx.get(listener.url("/healthz")), 20,
                      "/healthz to report the lost broker", listener.debug)
    assert status.status_code == 503 and status.json()["broker_connected"] is False
    assert listener.metrics()["wis2_listener_broker_connected"] == 0
    mqtt_broker.start()
    wait_for(listener.healthy, 30, "the listener to reconnect", listener.debug)
    publish(mqtt_broker, [(TOPIC, event_payload("reconnected"))])
    wait_for(lambda: deployment.event_ids() == ["reconnected-0000"], 30, "the run",
             listener.debug)
    assert listener.running
    assert "disconnected from the broker; reconnecting with backoff" in listener.tail(200)


def test_events_wait_for_a_missing_deployment(
    mqtt_broker: RunningBroker, prefect_api: PrefectServer, make_listener
) -> None:
    name = f"listener-later-{uuid.uuid4().hex[:8]}"
    listener = make_listener(prefect_api.api_url, f"{FLOW}/{name}").start(60)
    publish(mqtt_broker, [(TOPIC, event_payload("early"))])
    wait_for(lambda: "not found" in listener.tail(50), 20, "the missing deployment in the log",
             listener.debug)
    assert listener.metrics()["wis2_listener_in_flight"] == 1  # held, not acknowledged
    deployment = Deployment(prefect_api.api_url, name=name)  # deployed at last
    wait_for(lambda: deployment.event_ids() == ["early-0000"], 30, "the run", listener.debug)
    assert not list(listener.deadletter_dir.glob("*.json"))


def test_prefect_api_outage_loses_nothing(
    tmp_path: Path, mqtt_broker: RunningBroker, make_listener
) -> None:
    server = PrefectServer(home=tmp_path / "own-prefect", extra_env=QUIET_SERVICES)
    server.start(timeout=120)
    try:
        deployment = Deployment(server.api_url)
        listener = make_listener(server.api_url, deployment.full_name, max_in_flight=10).start(60)
        publish(mqtt_broker, [(TOPIC, event_payload("before", i)) for i in range(10)])
        wait_for(lambda: len(deployment.runs()) == 10, 30, "10 runs", listener.debug)

        server.stop()
        outage_started = time.monotonic()
        publish(mqtt_broker, [(TOPIC, event_payload("during", i)) for i in range(30)])
        time.sleep(10)
        during = listener.metrics()
        assert during["wis2_listener_api_errors_total"] >= 1
        assert during["wis2_listener_oldest_unacked_age_seconds"] >= 5
        # Receive Maximum: 10 messages held unacknowledged, the other 20 stay queued in the broker
        assert during["wis2_listener_in_flight"] == 10
        assert listener.running and httpx.get(listener.url("/healthz")).json()["api"].startswith(
            "unavailable")
        time.sleep(max(0.0, 15 - (time.monotonic() - outage_started)))

        server.start(timeout=120)  # same port, same database
        publish(mqtt_broker, [(TOPIC, event_payload("after", i)) for i in range(5)])
        wait_for(lambda: len(deployment.runs()) >= 45, 90, "45 runs", listener.debug)
        time.sleep(1.5)
        ids = deployment.event_ids()
        expected = ([f"before-{i:04d}" for i in range(10)] + [f"during-{i:04d}" for i in
                    range(30)] + [f"after-{i:04d}" for i in range(5)])
        assert sorted(ids) == sorted(expected)
        assert not list(listener.deadletter_dir.glob("*.json"))
        assert "Prefect API unavailable; retrying" in listener.tail(2000)
    finally:
        server.stop()


def test_malformed_payloads_go_to_dead_letters_and_can_be_replayed(
    tmp_path: Path, mqtt_broker: RunningBroker, deployment: Deployment, make_listener
) -> None:
    listener = make_listener(
        deployment.api_url, deployment.full_name, max_payload_bytes=20000,
        routes=json.dumps([{"topic_filter": "diffusion/files/coriolis/#",
                            "deployment": deployment.full_name, "batch_deployment": None,
                            "dataset": "argo"}]),
    ).start(60)
    not_event = json.loads(event_payload("broken"))
    del not_event["source"]
    not_event["data"]["properties"]["datetime"] = "yesterday"
    bad = {
        "not_utf8": (TOPIC, b"\xff\xfe\xfd not text"),
        "not_json": (TOPIC, b'{"specversion": "1.0", '),
        "invalid_event": (TOPIC, json.dumps(not_event).encode()),
        "too_large": (TOPIC, b" " * 30000),
        "unmapped_topic": ("diffusion/files/elsewhere/x", event_payload("unmapped")),
    }
    publish(mqtt_broker, [*bad.values(), (TOPIC, event_payload("valid"))])

    wait_for(lambda: deployment.event_ids() == ["valid-0000"], 30, "the valid run",
             listener.debug)
    wait_for(lambda: len(list(listener.deadletter_dir.glob("*.json"))) == 5, 10,
             "5 dead letters", listener.debug)
    listed = listener.cli("deadletters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = {x["reason"]: x for x in json.loads(listed.stdout)}
    assert set(letters) == set(bad)
    for reason, (topic, _) in bad.items():
        assert letters[reason]["topic"] == topic and letters[reason]["status"] == "open"
    assert "30000 bytes" in letters["too_large"]["message"]

    shown = listener.cli("deadletters", "show", letters["invalid_event"]["id"])
    record = json.loads(shown.stdout)
    paths = {e["path"] for e in record["errors"]}
    assert "$.source" in paths and any("datetime" in p for p in paths), record["errors"]
    assert json.loads(record["payload"])["id"] == "broken-0000"
    assert json.loads(listener.cli("deadletters", "show", letters["not_utf8"]["id"]).stdout)[
        "payload_base64"]
    assert listener.cli("deadletters", "show", "0123456789abcdef").returncode == 1

    m = listener.metrics()
    for reason in bad:
        assert m[f'wis2_listener_rejected_total{{reason="{reason}"}}'] == 1, reason
    assert m["wis2_listener_events_received_total"] == 6
    assert m[f'wis2_listener_runs_created_total{{deployment="{deployment.full_name}"}}'] == 1
    assert m["wis2_listener_api_errors_total"] == 0
    log = listener.tail(400)
    assert "reason=invalid_event" in log and "$.source" in log

    # The listener account may not publish: replaying with it is refused, clearly.
    refused = listener.cli("deadletters", "replay", letters["not_json"]["id"])
    assert refused.returncode == 1 and "not replayed" in refused.stderr

    # Fix the broken event and replay it as the file server.
    fixed = tmp_path / "fixed.json"
    not_event["source"] = json.loads(event_payload("x"))["source"]
    not_event["data"]["properties"]["datetime"] = "2024-01-01T00:00:00Z"
    fixed.write_text(json.dumps(not_event))
    fs = listener.fileserver
    replay_env = {"WIS2_LISTENER_REPLAY_USERNAME": fs.username or "",
                  "WIS2_LISTENER_REPLAY_PASSWORD": fs.password.get_secret_value()}
    replayed = listener.cli("deadletters", "replay", letters["invalid_event"]["id"],
                            "--payload-file", str(fixed), **replay_env)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed on {TOPIC}" in replayed.stdout
    # The unmapped one, to a topic the listener routes.
    replayed = listener.cli("deadletters", "replay", letters["unmapped_topic"]["id"],
                            "--topic", TOPIC, **replay_env)
    assert replayed.returncode == 0, replayed.stderr
    wait_for(lambda: sorted(deployment.event_ids()) == ["broken-0000", "unmapped-0000",
                                                        "valid-0000"],
             30, "the replayed runs", listener.debug)
    remaining = json.loads(listener.cli("deadletters", "list", "--json").stdout)
    assert {x["reason"] for x in remaining} == {"not_utf8", "not_json", "too_large"}

    # Replaying the unfixed ones brings them back, as the same records seen twice.
    replayed = listener.cli("deadletters", "replay", "--all", **replay_env)
    assert replayed.returncode == 0 and replayed.stdout.count("replayed on") == 3, replayed
    wait_for(lambda: [x["count"] for x in json.loads(
        listener.cli("deadletters", "list", "--json").stdout)] == [2, 2, 2], 30,
        "the 3 replayed dead letters to come back", listener.debug)
    everything = json.loads(listener.cli("deadletters", "list", "--all", "--json").stdout)
    assert sorted(x["status"] for x in everything) == ["open"] * 3 + ["replayed"] * 2
    assert len(deployment.runs()) == 3
    assert listener.running


@pytest.mark.slow
def test_end_to_end_with_a_worker(
    tmp_path: Path, mqtt_broker: RunningBroker, prefect_api: PrefectServer, make_listener
) -> None:
    """Reference event on the file server's topic -> listener -> flow run on a process worker
    -> one valid WIS2 notification on the origin topic."""
    from blocks.mqtt_broker import MqttBroker
    from chain.mqtt import connect
    from flows.publish_notification import publish_notification
    from localnode.prefect_server import prefect_cli
    from wis2.dataset import load_dataset
    from wis2.validation import validate_notification

    suffix = uuid.uuid4().hex[:8]
    pool, name, block = f"listener-e2e-{suffix}", f"listener-e2e-{suffix}", f"e2e-{suffix}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
    env.update(prefect_api.client_env(), PREFECT_HOME=str(tmp_path / "worker-home"))
    created = subprocess.run([prefect_cli(), "work-pool", "create", pool, "--type", "process"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    MqttBroker.from_connection(mqtt_broker.connection("publisher")).save(block)
    publish_notification.to_deployment(
        name=name, job_variables={"working_dir": str(REPO)}).apply(work_pool_name=pool)

    topic = load_dataset("argo").topic
    received: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    sub = connect(mqtt_broker.connection("everyone"))
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.on_message = lambda c, u, m: received.append((m.topic, m.payload))
    sub.subscribe("origin/a/wis2/#", qos=1)
    assert subscribed.wait(10)

    env.update(WIS2_RESULTS_DIR=str(tmp_path / "results"), WIS2_VERIFY_DATA="false",
               WIS2_BROKER_BLOCK=block, WIS2_PUBLISH_RETRIES="1", WIS2_RETRY_BASE_DELAY="0.5")
    worker = ManagedProcess("worker", [prefect_cli(), "worker", "start", "--pool", pool],
                            tmp_path / "worker.log", env=env, cwd=REPO)
    try:
        listener = make_listener(prefect_api.api_url, f"{FLOW}/{name}").start(60)
        worker.start()
        publish(mqtt_broker, [(TOPIC, BUFR_EVENT.read_bytes())])
        wait_for(lambda: received, 150, "a notification on origin/a/wis2/#",
                 lambda: f"{listener.debug()}\n--- worker ---\n{worker.tail(60)}")
        deployment = Deployment(prefect_api.api_url, existing=name)
        wait_for(lambda: (s := deployment.runs()[0].state) and s.is_final(), 90, "the run's end",
                 lambda: worker.tail(60))
        time.sleep(1)  # a second (unwanted) message would arrive now
    finally:
        worker.stop(timeout=20)
        sub.loop_stop()
        sub.disconnect()

    assert len(received) == 1, [t for t, _ in received]
    got_topic, payload = received[0]
    assert got_topic == topic
    report = validate_notification(payload, topic=got_topic)
    assert report.ok, report.failures
    message = json.loads(payload)
    assert message["properties"]["data_id"].endswith("IOPX01_LFVX_251403.BU")
    [run] = deployment.runs()
    assert run.parameters["event"]["id"] == json.loads(BUFR_EVENT.read_text())["id"]
    assert run.state is not None and run.state.is_completed(), run.state
    created = f'wis2_listener_runs_created_total{{deployment="{FLOW}/{name}"}}'
    assert listener.metrics()[created] == 1
