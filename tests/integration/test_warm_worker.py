"""The `wis2-warm` worker type: flow runs executed in the worker's process, flow code kept imported.

A real `prefect worker start --type wis2-warm --limit 2` subprocess serves a `wis2-warm` pool with
a deployment of publish-notification (its job variables and pull step as prefect.yaml writes
them); runs are created through the API and their states, logs and artifacts read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelling

from blocks.mqtt_broker import MqttBroker
from chain.processes import ManagedProcess
from localnode.prefect_server import prefect_cli
from tests.fixtures.paths import BUFR_EVENT, REPO
from tests.integration.test_publish_notification import ARGO, BUFR_ASSET, Subscriber, read_artifacts

pytestmark = pytest.mark.timeout(240)

POOL = "wis2-warm-test"
LIMIT = 2


class WarmNode:
    """The pool, a deployment of publish-notification on it, and a running warm worker."""

    def __init__(self, env: dict[str, str], deployment_id: uuid.UUID,
                 sleep_deployment_id: uuid.UUID, worker: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.env, self.worker, self.log = env, worker, log
        self.deployment_id, self.sleep_deployment_id = deployment_id, sleep_deployment_id

    def create_run(self, event: dict[str, Any], name: str | None = None) -> FlowRun:
        with get_client(sync_client=True) as client:
            return client.create_flow_run_from_deployment(
                self.deployment_id, parameters={"event": event}, name=name)

    def create_sleep_run(self, seconds: float, gate: Path | None = None) -> FlowRun:
        parameters: dict[str, object] = {"seconds": seconds}
        if gate is not None:
            parameters["gate"] = str(gate)
        with get_client(sync_client=True) as client:
            return client.create_flow_run_from_deployment(
                self.sleep_deployment_id, parameters=parameters)

    def wait_final(self, run_ids: list[uuid.UUID], timeout: float = 60) -> list[FlowRun]:
        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while True:
                runs = [client.read_flow_run(i) for i in run_ids]
                if all(r.state is not None and r.state.is_final() for r in runs):
                    return runs
                assert self.worker.poll() is None, f"the worker exited:\n{self.tail()}"
                assert time.monotonic() < deadline, (
                    f"not final: {[(r.name, r.state_name) for r in runs]}\n{self.tail()}")
                time.sleep(0.3)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="module")
def warm_node(prefect_api, session_broker, tmp_path_factory) -> Iterator[WarmNode]:
    tmp = tmp_path_factory.mktemp("warm-worker")
    block = f"warm-broker-{uuid.uuid4().hex[:8]}"
    MqttBroker.from_connection(session_broker.connection("publisher")).save(block)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
    env.update(prefect_api.client_env(), PREFECT_HOME=str(tmp / "home"))
    done = subprocess.run([prefect_cli(), "work-pool", "create", POOL, "--type", "wis2-warm",
                           "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    def deploy(flow_name: str, entrypoint: str) -> uuid.UUID:
        """A deployment as prefect.yaml makes it: job variables env and a pull step (which the
        warm worker does not run)."""
        with get_client(sync_client=True) as client:
            return client.create_deployment(
                flow_id=client.create_flow_from_name(flow_name),
                name=f"warm-{uuid.uuid4().hex[:6]}", entrypoint=entrypoint,
                work_pool_name=POOL, work_queue_name="default",
                job_variables={"env": {"WIS2_PROJECT_DIR": str(REPO)}},
                pull_steps=[{"prefect.deployments.steps.set_working_directory":
                             {"directory": str(REPO)}}],
            )

    deployment_id = deploy("publish-notification",
                           "flows/publish_notification.py:publish_notification")
    sleep_deployment_id = deploy("warm-test-sleep", "tests/integration/warm_flows.py:sleep_flow")
    env.update(
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
        WIS2_PROJECT_DIR=str(REPO),
        WIS2_RESULTS_DIR=str(tmp / "results"),
        WIS2_VERIFY_DATA="false",
        WIS2_BROKER_BLOCK=block,
        WIS2_PUBLISH_RETRIES="1",
        WIS2_RETRY_BASE_DELAY="0.5",
    )
    log = tmp / "worker.log"
    worker = ManagedProcess(
        "worker", [prefect_cli(), "worker", "start", "--pool", POOL, "--type", "wis2-warm",
                   "--limit", str(LIMIT)], log_path=log, env=env, cwd=tmp).start()
    assert worker.proc is not None
    node = WarmNode(env, deployment_id, sleep_deployment_id, worker.proc, log)
    try:
        yield node
    finally:
        worker.stop(timeout=30)  # SIGTERM to its group, SIGKILL after the timeout


@pytest.fixture
def subscriber(session_broker) -> Iterator[Subscriber]:
    sub = Subscriber(session_broker.connection("everyone"), ARGO.topic)
    yield sub
    sub.close()


def event(label: str, **changes: Any) -> dict[str, Any]:
    data = json.loads(BUFR_EVENT.read_text(encoding="utf-8"))
    data["id"] = f"warm-{label}-{uuid.uuid4().hex[:8]}"
    for key, value in changes.items():
        data["data"]["assets"][BUFR_ASSET][key] = value
    return data


def children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_run_completes_in_the_worker_process(warm_node: WarmNode, subscriber) -> None:
    created = warm_node.create_run(event("ok"))
    seen_children: set[int] = set()
    deadline = time.monotonic() + 90
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            seen_children.update(p.pid for p in children(warm_node.worker.pid))
            run = client.read_flow_run(created.id)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(0.1)
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[created.id]))
        deadline = time.monotonic() + 15  # the worker sends its logs in batches
        while time.monotonic() < deadline:
            logs = client.read_logs(log_filter)
            if any("Finished in state Completed" in entry.message for entry in logs):
                break
            time.sleep(0.5)
        states = [st.name for st in client.read_flow_run_states(created.id)]

    assert run.state.is_completed(), f"{run.state_name}: {run.state.message}\n{warm_node.tail()}"
    # in the worker's process at once: no Submitting state between Pending and Running
    assert states == ["Scheduled", "Pending", "Running", "Completed"], states
    # executed by the worker process itself: its pid is the run's infrastructure, no child
    assert run.infrastructure_pid == str(warm_node.worker.pid)
    assert not seen_children, f"the worker started processes: {seen_children}"
    messages = subscriber.wait_for(1)
    assert len(messages) == 1, messages
    assert messages[0][1]["properties"]["data_id"].endswith(BUFR_ASSET)
    key = BUFR_ASSET.lower().replace(".", "-").replace("_", "-")
    assert {f"wnm-{key}", f"validation-{key}"} <= set(read_artifacts(created.id))
    # the flow's and its tasks' logs reached the API
    texts = [entry.message for entry in logs]
    assert any("Finished in state Completed" in t for t in texts), texts
    assert any(entry.task_run_id is not None for entry in logs), texts
    # no flow-run heartbeat (WIS2_WORKER_FLOW_HEARTBEATS, off): the engine would send one as the
    # run starts, before its tasks' events, which the worker sends the same way
    names = run_events(created.id, until="prefect.task-run.Completed")
    assert "prefect.flow-run.heartbeat" not in names, names


def test_a_run_keeps_the_name_it_was_created_with_or_gets_its_flows(warm_node: WarmNode) -> None:
    """A run created with the name its flow gives it (as the listener creates them) and one
    with Prefect's random name: both end named after their file, with the worker's pid (written
    with the engine's PATCH, WIS2_WORKER_MERGE_RUN_PATCHES) and its labels (set beside the
    run's start)."""
    label = BUFR_ASSET.rsplit("/", 1)[-1]
    named = warm_node.create_run(event("named"), name=label)
    unnamed = warm_node.create_run(event("unnamed"))
    assert unnamed.name != label

    runs = warm_node.wait_final([named.id, unnamed.id])

    for run in runs:
        assert run.state.is_completed(), f"{run.state_name}: {run.state.message}"
        assert run.name == label, run.name
        assert run.infrastructure_pid == str(warm_node.worker.pid)
    deadline = time.monotonic() + 30  # the labels' PATCH is not awaited by the run's start
    with get_client(sync_client=True) as client:
        while True:
            labels = [client.read_flow_run(run.id).labels or {} for run in runs]
            if all(lb.get("prefect.worker.name") for lb in labels) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    for lb in labels:
        assert lb.get("prefect.worker.type") == "wis2-warm" and lb.get("prefect.worker.name"), lb


def run_events(flow_run_id: uuid.UUID, until: str, timeout: float = 60) -> list[str]:
    """The names of the persisted heartbeat and `until` events about the run, once one named
    `until` is among them."""
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            event_filter = EventFilter(  # its `occurred.until` is its creation time
                any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
                event=EventNameFilter(name=["prefect.flow-run.heartbeat", until]))
            names = [e.event for e in client.read_events(event_filter, limit=50).events]
            if until in names:
                return names
            assert time.monotonic() < deadline, f"no {until} event: {names}"
            time.sleep(0.5)


def test_a_failed_run_leaves_the_worker_running(warm_node: WarmNode, subscriber) -> None:
    bad = warm_node.create_run(event("bad", **{"file:checksum": "12zz-not-a-multihash"}))
    [failed] = warm_node.wait_final([bad.id])
    assert failed.state.is_failed(), f"{failed.state_name}: {failed.state.message}"
    assert "file:checksum" in failed.state.message
    assert subscriber.settle(0.5) == []

    good = warm_node.create_run(event("after-bad"))
    [completed] = warm_node.wait_final([good.id])
    assert completed.state.is_completed(), f"{completed.state.message}\n{warm_node.tail()}"
    assert warm_node.worker.poll() is None


def test_the_limit_bounds_concurrent_runs(warm_node: WarmNode, tmp_path: Path) -> None:
    """6 runs queued at once (a flow loaded from a file outside the installed package), each held
    until the test opens their gate: `--limit` of them Running, the others left waiting while
    those are held, then all Completed, never more than `--limit` Running at a time."""
    gate = tmp_path / "gate"
    ids = [warm_node.create_sleep_run(0.0, gate=gate).id for _ in range(6)]
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 180
        while True:  # the worker fills its slots with held runs
            states = [client.read_flow_run(i).state for i in ids]
            running = sum(1 for s in states if s is not None and s.is_running())
            if running >= LIMIT:
                break
            assert warm_node.worker.poll() is None, f"the worker exited:\n{warm_node.tail()}"
            assert time.monotonic() < deadline, (
                f"{running} Running: {[s and s.name for s in states]}")
            time.sleep(0.2)
        # several of the worker's polls (every second) while every slot is held: none takes more
        time.sleep(3)
        states = [client.read_flow_run(i).state for i in ids]
        assert sum(1 for s in states if s is not None and s.is_running()) == LIMIT, (
            [s and s.name for s in states])
    gate.touch()
    runs = warm_node.wait_final(ids, timeout=180)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.message) for r in runs]

    intervals: list[tuple[datetime, datetime]] = []
    with get_client(sync_client=True) as client:
        for run in runs:
            states = client.read_flow_run_states(run.id)
            started = min(s.timestamp for s in states if s.is_running())
            ended = max(s.timestamp for s in states if s.is_final())
            intervals.append((started, ended))
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at one instant
    running, most = 0, 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most == LIMIT, f"at most {most} runs Running at once (limit {LIMIT}): {intervals}"


def test_a_flow_that_cannot_be_loaded_crashes_only_its_run(warm_node: WarmNode) -> None:
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("warm-test-missing"),
            name=f"missing-{uuid.uuid4().hex[:6]}", entrypoint="flows/no_such_flow.py:nope",
            work_pool_name=POOL, work_queue_name="default")
        missing = client.create_flow_run_from_deployment(deployment_id)
    [crashed] = warm_node.wait_final([missing.id])
    assert crashed.state.is_crashed(), f"{crashed.state_name}: {crashed.state.message}"
    assert "flows/no_such_flow.py" in crashed.state.message
    assert "not found" in crashed.state.message

    [completed] = warm_node.wait_final([warm_node.create_sleep_run(0.1).id])
    assert completed.state.is_completed(), completed.state.message


def test_a_cancelled_run_ends_cancelled(warm_node: WarmNode) -> None:
    """Best effort: the thread is not interrupted; the run ends Cancelled when the flow returns."""
    run = warm_node.create_sleep_run(4.0)
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while not client.read_flow_run(run.id).state.is_running():
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        client.set_flow_run_state(run.id, Cancelling(message="test cancel"))
    [cancelled] = warm_node.wait_final([run.id], timeout=30)
    assert cancelled.state.is_cancelled(), f"{cancelled.state_name}: {cancelled.state.message}"
    assert warm_node.worker.poll() is None
