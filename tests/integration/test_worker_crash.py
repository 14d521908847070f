"""A worker SIGKILLed in the middle of a burst: nothing lost, nothing published twice.

Real broker, real Prefect server, real workers (`prefect worker start`). The middle of the burst
is made, not raced: the flows download each announced file (WIS2_VERIFY_DATA) from a file server
of the test that serves the first N downloads and holds every later one, so when the worker is
killed every run slot of the worker is provably busy and at most N notifications are out (a batch
run publishes once all its files are verified; test_publish_batch.py kills a batch run between
two acknowledgements of the broker). Then
the worker is SIGKILLed, runs it had claimed but not started are left Pending (as a worker
leaves them when it dies between its claim and the flow's start), a worker serves the pool
again, the file server is released, and the test counts what reaches `origin/a/wis2/#`: one
message per data_id, none with a second id, every run Completed (none Pending or Running).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.states import Pending

from broker.launcher import RunningBroker
from chain.processes import ManagedProcess
from localnode.prefect_server import PrefectServer, prefect_cli
from tests.fixtures.gates import GatedFileServer
from tests.fixtures.paths import DATA, REPO
from tests.integration.test_publish_notification import (  # noqa: F401  (fixtures)
    Subscriber,
    chain,
    on_session_broker,
    read_artifacts,
)
from worker.recovery import RECOVERING, WORKER_LABEL

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

DEMO_EVENT = DATA / "demo-event.json"
DEMO_FILE = DATA / "files" / "argo" / "dac" / "coriolis" / "6990001" / "profiles" / \
    "D6990001_001.csv"
HEARTBEAT = 5  # PREFECT_WORKER_HEARTBEAT_SECONDS of the test workers: dead after 15 s


@pytest.fixture
def files() -> Iterator[GatedFileServer]:
    server = GatedFileServer(DEMO_FILE)
    yield server
    server.close()


def file_event(tag: str, i: int, files_url: str) -> dict[str, Any]:
    """The demo event for a file of its own (own data_id), served by `files_url`."""
    event = json.loads(DEMO_EVENT.read_text())
    event["id"] = f"{tag}-{i:04d}"
    name = f"{tag.upper()}_{i:04d}.csv"
    [asset] = event["data"]["assets"].values()
    asset["href"] = f"{files_url}/argo/{name}"
    event["data"]["assets"] = {name: asset}
    event["data"]["id"] = f"{tag}-{i:04d}"
    return event


# ---- a pool, its deployments and workers ----------------------------------------------------
class CrashNode:
    """A work pool with publish-notification and publish-batch deployed on it."""

    def __init__(self, api: PrefectServer, broker: RunningBroker, tmp: Path,
                 worker_type: str = "wis2-warm", **settings: str) -> None:
        from blocks.mqtt_broker import MqttBroker
        from flows.publish_batch import publish_batch
        from flows.publish_notification import publish_notification

        suffix = uuid.uuid4().hex[:8]
        self.tmp, self.worker_type = tmp, worker_type
        self.pool, block = f"crash-{suffix}", f"crash-{suffix}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
        env.update(api.client_env(), PREFECT_HOME=str(tmp / "worker-home"))
        created = subprocess.run(
            [prefect_cli(), "work-pool", "create", self.pool, "--type", worker_type], env=env,
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert created.returncode == 0, created.stdout + created.stderr
        MqttBroker.from_connection(broker.connection("publisher")).save(block, overwrite=True)
        self.deployments: dict[str, uuid.UUID] = {}
        for flow in (publish_notification, publish_batch):
            self.deployments[flow.name] = flow.to_deployment(
                name=f"crash-{suffix}", job_variables={"working_dir": str(REPO)},
            ).apply(work_pool_name=self.pool)
        env.update(
            WIS2_PROJECT_DIR=str(REPO), WIS2_RESULTS_DIR=str(tmp / "results"),
            WIS2_VERIFY_DATA="true", WIS2_VERIFY_TIMEOUT="200", WIS2_BROKER_BLOCK=block,
            WIS2_PUBLISH_RETRIES="2", WIS2_RETRY_BASE_DELAY="0.5",
            PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_HEARTBEAT_SECONDS=str(HEARTBEAT),
            WIS2_RECOVERY_INTERVAL="2", WIS2_RECOVERY_UNCLAIMED_TIMEOUT="5",
            # one download at a time per run: N downloads held at the file server are N runs
            # holding their slots (with concurrent downloads, one batch run could hold them all)
            WIS2_VERIFY_CONCURRENCY="1",
        )
        env.update(settings)
        self.env = env
        self.workers: list[ManagedProcess] = []

    def worker(self, name: str, limit: int) -> ManagedProcess:
        worker = ManagedProcess(
            f"worker-{name}", [prefect_cli(), "worker", "start", "--pool", self.pool, "--type",
                               self.worker_type, "--limit", str(limit), "--name", name],
            self.tmp / f"worker-{name}.log", env=self.env, cwd=REPO)
        self.workers.append(worker)
        return worker

    def sidecar(self) -> ManagedProcess:
        """`wis2-chain recover --watch`, as it runs alongside a process worker."""
        recover = ManagedProcess(
            "recover", [str(Path(prefect_cli()).with_name("wis2-chain")), "recover", "--pool",
                        self.pool, "--watch"], self.tmp / "recover.log", env=self.env, cwd=REPO)
        self.workers.append(recover)
        return recover

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop(timeout=20)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(40)}" for p in self.workers)

    # runs ----------------------------------------------------------------------------------
    def create_runs(self, events: list[dict[str, Any]], batch: int) -> None:
        """Events in runs of publish-batch of `batch` events, then the rest one per run."""
        with get_client(sync_client=True) as client:
            chunks = [events[i:i + batch] for i in range(0, len(events) // 2, batch)]
            in_batches = sum(len(c) for c in chunks)
            for chunk in chunks:
                client.create_flow_run_from_deployment(
                    self.deployments["publish-batch"], parameters={"events": chunk})
            for event in events[in_batches:]:
                client.create_flow_run_from_deployment(
                    self.deployments["publish-notification"], parameters={"event": event})

    def runs(self) -> list[FlowRun]:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=list(self.deployments.values()))), limit=200)

    def wait_all_final(self, timeout: float) -> list[FlowRun]:
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs()
            if all(r.state is not None and r.state.is_final() for r in runs):
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not final after {timeout}s: "
                    f"{sorted((r.name, r.state_name) for r in runs if not r.state.is_final())}"
                    f"\n{self.logs()}")
            time.sleep(0.5)


def kill_worker(worker: ManagedProcess) -> None:
    """SIGKILL the worker and the flow-run processes it started (a crashed host or container:
    Prefect's process worker puts each flow-run process in a process group of its own)."""
    assert worker.pid is not None
    children = psutil.Process(worker.pid).children(recursive=True)
    worker.kill()
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def strand_claimed_runs(node: CrashNode, dead_worker: str, events: list[dict[str, Any]]) -> None:
    """Two runs left Pending as a dying worker leaves them: one claimed and labelled with the
    worker's name, one claimed before the worker could label it. No worker is alive, so nobody
    else can take them while this happens."""
    with get_client(sync_client=True) as client:
        for event, label in zip(events, (True, False), strict=True):
            run = client.create_flow_run_from_deployment(
                node.deployments["publish-notification"], parameters={"event": event})
            assert client.set_flow_run_state(run.id, Pending()).status.value == "ACCEPT"
            if label:
                client.update_flow_run_labels(run.id, {WORKER_LABEL: dead_worker})


def assert_published_once(origin: Subscriber, events: list[dict[str, Any]],
                          runs: list[FlowRun]) -> None:
    """Every event's file announced exactly once on origin/a/wis2/#, every run Completed."""
    assert all(r.state.is_completed() for r in runs), [
        (r.name, r.state_name, r.state.message) for r in runs if not r.state.is_completed()]
    expected = sorted(next(iter(e["data"]["assets"])) for e in events)
    origin.wait_for(len(expected), 60)
    messages = origin.settle(2.0)
    ids_per_file: dict[str, set[str]] = {}
    for _, message in messages:
        ids_per_file.setdefault(message["properties"]["data_id"].rsplit("/", 1)[-1],
                                set()).add(message["id"])
    assert sorted(ids_per_file) == expected, "lost notifications"
    second_ids = {f: ids for f, ids in ids_per_file.items() if len(ids) > 1}
    assert not second_ids, f"a data_id published with two message ids: {second_ids}"
    repeated = {k: n for k, n in Counter(m["id"] for _, m in messages).items() if n > 1}
    # The same message id again (killed after the broker's PUBACK, before the publication
    # was recorded) is what Global Brokers drop; the gate makes it impossible here.
    assert not repeated, f"sent twice: {repeated}"


def recovered_runs(runs: list[FlowRun]) -> list[str]:
    with get_client(sync_client=True) as client:
        return [r.name for r in runs
                if any(s.name == RECOVERING for s in client.read_flow_run_states(r.id))]


@pytest.fixture
def origin(mqtt_broker: RunningBroker) -> Iterator[Subscriber]:
    """What a Global Broker receives."""
    sub = Subscriber(mqtt_broker.connection("everyone"), "origin/a/wis2/#", persistent=True)
    yield sub
    sub.close()


@pytest.fixture
def make_node(prefect_api: PrefectServer, mqtt_broker: RunningBroker,
              tmp_path: Path) -> Iterator[Any]:
    nodes: list[CrashNode] = []

    def make(worker_type: str = "wis2-warm", **settings: str) -> CrashNode:
        node = CrashNode(prefect_api, mqtt_broker, tmp_path / f"node-{len(nodes)}", worker_type,
                         **settings)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


# ---- tests ----------------------------------------------------------------------------------
def test_warm_worker_killed_mid_burst_and_restarted(
    make_node: Any, files: GatedFileServer, origin: Subscriber
) -> None:
    """The wis2-warm worker SIGKILLed with 4 runs in flight and at most 5 notifications out
    (a batch run publishes once all its files are verified), restarted with the same command
    line: it reclaims its runs at start; the two runs left Pending (one never labelled) are
    recovered too."""
    node = make_node()
    files.allow = 5
    events = [file_event("warm", i, files.url) for i in range(18)]
    node.create_runs(events, batch=3)
    worker = node.worker("warm-1", limit=4).start()
    files.wait_held(4, 120, node.logs)  # all 4 run slots wait on a download
    kill_worker(worker)
    stranded = [r.name for r in node.runs() if r.state.is_running() or r.state.is_pending()]
    assert len(stranded) == 4, stranded
    assert len(origin.messages) <= 5

    pending = [file_event("pending", i, files.url) for i in range(2)]
    strand_claimed_runs(node, "warm-1", pending)
    files.release()
    worker.start()  # the same worker again (same --name)
    restarted = time.monotonic()
    runs = node.wait_all_final(150)
    assert_published_once(origin, events + pending, runs)
    assert len(recovered_runs(runs)) == 6, recovered_runs(runs)
    assert "recovery: rescheduled" in worker.tail(400)
    # generous bound: recovery itself is immediate here (the unlabelled one waits 5 s)
    assert time.monotonic() - restarted < 150


def test_warm_worker_killed_another_worker_takes_over(
    make_node: Any, files: GatedFileServer, origin: Subscriber
) -> None:
    """Two wis2-warm workers on the pool; one is SIGKILLed with its runs in flight and never
    comes back: the other reschedules them once the dead one misses 3 heartbeats."""
    node = make_node()
    files.allow = 3
    events = [file_event("twin", i, files.url) for i in range(16)]
    node.create_runs(events, batch=3)
    doomed = node.worker("doomed", limit=3).start()
    files.wait_held(3, 120, node.logs)
    survivor = node.worker("survivor", limit=3).start()
    files.wait_held(6, 120, node.logs)  # the survivor's slots are busy too
    # (a batch run publishes once all its files are verified: nothing is out yet, or at most
    # the few whose whole batch was let through)
    assert len(origin.messages) <= 3
    held_by_doomed = [r.name for r in node.runs() if (r.labels or {}).get(WORKER_LABEL)
                      == "doomed" and not r.state.is_final()]
    assert held_by_doomed, "the doomed worker held no run"
    kill_worker(doomed)
    files.release()
    runs = node.wait_all_final(150)
    assert_published_once(origin, events, runs)
    assert set(held_by_doomed) <= set(recovered_runs(runs))
    assert "its worker doomed sent no heartbeat" in survivor.tail(400)


def test_process_worker_killed_mid_burst_with_the_recovery_sidecar(
    make_node: Any, files: GatedFileServer, origin: Subscriber
) -> None:
    """Prefect's process worker (a process per run) SIGKILLed with its flow-run processes, then
    started again under another name; `wis2-chain recover --watch` reschedules the dead one's
    runs."""
    node = make_node("process")
    files.allow = 1
    events = [file_event("proc", i, files.url) for i in range(6)]
    node.create_runs(events, batch=3)
    node.sidecar().start()
    worker = node.worker("proc-1", limit=2).start()
    files.wait_held(2, 150, node.logs)  # both slots wait on a download
    kill_worker(worker)
    files.release()
    node.worker("proc-2", limit=2).start()
    runs = node.wait_all_final(200)
    assert_published_once(origin, events, runs)
    assert recovered_runs(runs)


def test_a_run_that_keeps_killing_its_worker_ends_failed(
    make_node: Any, prefect_api: PrefectServer, files: GatedFileServer
) -> None:
    """A run whose flow SIGKILLs the worker each time: rescheduled WIS2_RECOVERY_MAX_RETRIES
    (2) times, then Failed with an artifact naming its event, and not retried again."""
    node = make_node(WIS2_RECOVERY_MAX_RETRIES="2")  # 2: the count goes beyond one
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("crash-test-kill-worker"),
            name=f"kill-{uuid.uuid4().hex[:6]}",
            entrypoint="tests/integration/crash_flows.py:kill_worker_flow",
            work_pool_name=node.pool, work_queue_name="default")
        event = file_event("deadly", 0, files.url)
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"event": event})
    worker = node.worker("warm-deadly", limit=1)
    deaths = 0
    deadline = time.monotonic() + 200
    while True:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        if state is not None and state.is_final():
            break
        assert time.monotonic() < deadline, f"{state}\n{worker.tail(60)}"
        if not worker.running:  # a supervisor (systemd, compose) starts it again
            if worker.proc is not None:
                deaths += 1
            worker.start()
        time.sleep(0.5)
    assert state.is_failed(), f"{state.name}: {state.message}"
    assert "Failed after 2 recoveries" in state.message and "deadly-0000" in state.message
    assert deaths == 3  # the first run and two recoveries
    artifacts = read_artifacts(run.id)
    [failure] = [a for k, a in artifacts.items() if k.startswith("failed-")]
    assert "deadly-0000" in failure.data and "DEADLY_0000.csv" in failure.data
    time.sleep(6)  # three more looks of the recovery: still Failed, the worker alive
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.is_failed()
        running = [s for s in client.read_flow_run_states(run.id) if s.is_running()]
    assert len(running) == 3 and worker.running


def test_a_run_whose_process_keeps_dying_ends_failed(
    make_node: Any, files: GatedFileServer
) -> None:
    """Prefect's process worker: the flow-run process SIGKILLs itself, the worker reports the run
    Crashed ("Process exited with status code: -9"), Prefect never retries it;
    `wis2-chain recover --watch` reschedules it once (WIS2_RECOVERY_MAX_RETRIES=1), then fails
    it with its artifact."""
    node = make_node("process", WIS2_RECOVERY_MAX_RETRIES="1", WIS2_RECOVERY_CRASHED_GRACE="5")
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("crash-test-kill-worker"),
            name=f"kill-{uuid.uuid4().hex[:6]}",
            entrypoint="tests/integration/crash_flows.py:kill_worker_flow",
            work_pool_name=node.pool, work_queue_name="default",
            job_variables={"working_dir": str(REPO)})
        event = file_event("oom", 0, files.url)
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"event": event})
    node.sidecar().start()
    node.worker("proc-deadly", limit=1).start()
    deadline = time.monotonic() + 200
    while True:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        if state is not None and state.is_failed():
            break
        assert time.monotonic() < deadline, f"{state}\n{node.logs()}"
        time.sleep(0.5)
    assert "Failed after 1 recoveries" in state.message and "oom-0000" in state.message
    assert "status code" in state.message and "-9" in state.message
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(run.id)
    # it ran twice; a late second Crashed report of an attempt may have cost one more reschedule
    assert len([s for s in states if s.is_running()]) == 2
    assert [s.name for s in states if s.is_crashed() or s.name == RECOVERING][:2] == [
        "Crashed", RECOVERING]
    [failure] = [a for k, a in read_artifacts(run.id).items() if k.startswith("failed-")]
    assert "oom-0000" in failure.data


def test_the_node_commands_install_the_recovery() -> None:
    """compose.yml's worker: a name per container that a restart keeps (a restarted container
    reclaims its runs at once), a 10 s heartbeat (another worker takes over ~30 s after a
    death), restarted by compose."""
    import yaml

    from localnode.node import LocalNode

    compose = yaml.safe_load((REPO / "compose.yml").read_text())
    worker = compose["services"]["prefect-worker"]
    command = " ".join(worker["command"])
    assert "--type wis2-warm" in command and '--name "wis2-worker-$$(hostname)"' in command
    assert worker["environment"]["PREFECT_WORKER_HEARTBEAT_SECONDS"] == (
        f"${{PREFECT_WORKER_HEARTBEAT_SECONDS:-{LocalNode.WORKER_HEARTBEAT_SECONDS}}}")
    assert worker["restart"] == "unless-stopped"


# ---- a run killed between the broker's PUBACK and the ledger record -------------------------
def test_a_cached_publication_missing_from_the_ledger_is_recorded(
    on_session_broker: Subscriber, chain: Any  # noqa: F811 (fixtures of test_publish_notification)
) -> None:
    """The rerun of a run killed after its publication was cached but before the ledger record
    (the ledger decides canonical/update later) records it, and sends nothing again."""
    from chain.ledger import SqliteLedger
    from tests.integration.test_publish_notification import bufr_event, run

    first = run(bufr_event()).result()
    ledger = SqliteLedger.in_dir(chain.results)
    data_id = first.notifications[0].data_id
    assert ledger.forget(data_id)  # what the killed run left
    again = run(bufr_event())
    assert again.is_completed(), again.message
    assert [n.sent for n in again.result().notifications] == [False]
    entry = ledger.get(data_id)
    assert entry is not None and entry.notification_id == first.ids[0]
    assert [m["id"] for _, m in on_session_broker.settle()] == first.ids


def test_a_notification_the_ledger_holds_is_not_sent_again_without_its_cache(
    on_session_broker: Subscriber, chain: Any  # noqa: F811 (fixtures of test_publish_notification)
) -> None:
    """Another host (the ledger shared, the cached results not), or a lost results directory:
    the event is built again -- the same notification id -- and the ledger says the broker
    acknowledged it: nothing is sent again."""
    import shutil

    from chain.ledger import SqliteLedger
    from tests.integration.test_publish_notification import bufr_event, run

    first = run(bufr_event()).result()
    for cached in chain.results.glob("wnm-*"):
        cached.unlink() if cached.is_file() else shutil.rmtree(cached)
    assert not list(chain.results.glob("wnm-*"))
    again = run(bufr_event())
    assert again.is_completed(), again.message
    assert [(n.id, n.sent) for n in again.result().notifications] == [(first.ids[0], False)]
    assert [m["id"] for _, m in on_session_broker.settle()] == first.ids
    entry = SqliteLedger.in_dir(chain.results).get(first.notifications[0].data_id)
    assert entry is not None and entry.notification_id == first.ids[0]
