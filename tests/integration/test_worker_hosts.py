"""Two worker hosts, one truth: two workers on one pool that share nothing but the services.

Each worker has a working directory and a WIS2_RESULTS_DIR of its own (as two hosts would); they
share a PostgreSQL cluster of the test's own (the Prefect server's database and the publication
ledger, WIS2_LEDGER_URL), a Redis server of the test's own (task results, WIS2_RESULTS_URL) and
the broker. The events reach the pool as publish-batch runs of 25 events (what the listener makes
of a burst) created through the Prefect API.

(a) 400 events (16 batch runs: 8 in flight at the kill, 8 waiting); the flows download each
file (WIS2_VERIFY_DATA) from a gated file server that serves the first 30 downloads and holds the
next ones: both workers' run slots are provably busy when one worker is SIGKILLed (at most 30
notifications out: a batch run publishes once all its files are verified), holding the claims of
their batches' data_ids; the survivor's recovery reschedules the dead worker's runs. Every file:
exactly one message id on origin/a/wis2/#, none missing.
(b) 20 already-published events run again as custom runs of publish-notification: nothing new.
(c) Two new hosts of one run slot each: the first version of a file is held in flight on one
(its download gated), its update, started on the other, waits for the data_id's claim
(an advisory lock seen waiting in PostgreSQL), and is announced as rel=update after the
canonical.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from broker.launcher import RunningBroker
from chain.processes import ManagedProcess
from localnode.postgres import PG_USER, PostgresCluster
from localnode.prefect_server import PrefectServer, prefect_cli
from localnode.redis import RedisServer
from tests.fixtures.gates import GatedFileServer
from tests.fixtures.prefect_api import QUIET_SERVICES
from tests.integration.test_publish_notification import Subscriber
from tests.integration.test_worker_crash import (
    DEMO_FILE,
    CrashNode,
    assert_published_once,
    file_event,
    kill_worker,
    recovered_runs,
)
from worker.recovery import WORKER_LABEL

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]
BURST = 1000  # 40 publish-batch runs of 25: far more than the two workers' 8 run slots


@pytest.fixture(scope="module")
def pg_prefect(postgres_cluster: PostgresCluster,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server of this module's own, its database in the test's PostgreSQL cluster."""
    server = PrefectServer(home=tmp_path_factory.mktemp("prefect-home"),
                           database_url=postgres_cluster.create_database("prefect"),
                           extra_env=QUIET_SERVICES)
    server.start(timeout=180)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server
    server.stop()


@pytest.fixture
def origin(mqtt_broker: RunningBroker) -> Iterator[Subscriber]:
    sub = Subscriber(mqtt_broker.connection("everyone"), "origin/a/wis2/#", persistent=True)
    yield sub
    sub.close()


def host_worker(node: CrashNode, name: str, limit: int) -> ManagedProcess:
    """A worker as on a host of its own: own working directory, WIS2_RESULTS_DIR, PREFECT_HOME."""
    home = node.tmp / f"host-{name}"
    home.mkdir(parents=True, exist_ok=True)
    env = {**node.env, "WIS2_RESULTS_DIR": str(home / "results"),
           "PREFECT_HOME": str(home / "prefect-home")}
    worker = ManagedProcess(
        f"worker-{name}", [prefect_cli(), "worker", "start", "--pool", node.pool, "--type",
                           node.worker_type, "--limit", str(limit), "--name", name],
        home / "worker.log", env=env, cwd=home)
    node.workers.append(worker)
    return worker


def create_runs(node: CrashNode, flow: str, parameters: list[dict[str, Any]]) -> None:
    with get_client(sync_client=True) as client:
        for params in parameters:
            client.create_flow_run_from_deployment(node.deployments[flow], parameters=params)


def updated_event(event: dict[str, Any], files_url: str, content: bytes) -> dict[str, Any]:
    """The same file (same path, same data_id) with another content: an update."""
    update = json.loads(json.dumps(event))
    update["id"] = event["id"] + "-v2"
    [asset] = update["data"]["assets"].values()
    asset["href"] = files_url + "/" + asset["href"].split("/", 3)[3]
    asset["file:size"] = len(content)
    asset["file:checksum"] = "1620" + hashlib.sha3_256(content).hexdigest()
    return update


def waiting_claims(ledger_url: str) -> int:
    with psycopg.connect(ledger_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                           "AND NOT granted").fetchone()
    return int(row[0]) if row else 0


def test_two_worker_hosts_share_one_truth(
    pg_prefect: PrefectServer, postgres_cluster: PostgresCluster, redis_server: RedisServer,
    mqtt_broker: RunningBroker, origin: Subscriber, tmp_path: Path,
) -> None:
    postgres_cluster.create_database("wis2_ledger")
    ledger_url = f"postgresql://{PG_USER}@{postgres_cluster.host}:{postgres_cluster.port}" \
        "/wis2_ledger"
    node = CrashNode(pg_prefect, mqtt_broker, tmp_path, WIS2_LEDGER_URL=ledger_url,
                     WIS2_RESULTS_URL=redis_server.url())
    files = GatedFileServer(DEMO_FILE, allow=30)
    try:
        # (a) a burst of 400 events, one worker SIGKILLed in the middle ----------------------
        events = [file_event("host", i, files.url) for i in range(BURST)]
        create_runs(node, "publish-batch",
                    [{"events": events[i:i + 25]} for i in range(0, len(events), 25)])
        doomed = host_worker(node, "doomed", 4).start()
        files.wait_held(4, 180, node.logs)  # its 4 slots wait on a download, 30 files out
        survivor = host_worker(node, "survivor", 4).start()
        files.wait_held(8, 180, node.logs)  # the survivor's slots are busy too
        assert len(origin.messages) <= 30
        held_by_doomed = [r.name for r in node.runs() if (r.labels or {}).get(WORKER_LABEL)
                          == "doomed" and not r.state.is_final()]
        assert len(held_by_doomed) == 4, held_by_doomed
        kill_worker(doomed)
        files.release()
        runs = node.wait_all_final(900)  # generous: a loaded shared 2-core machine
        assert_published_once(origin, events, runs)
        assert set(held_by_doomed) <= set(recovered_runs(runs))
        published = len(origin.messages)
        assert published == len(events)

        # (b) an operator replays 20 published events from the UI: nothing new -----------------
        create_runs(node, "publish-notification", [{"event": e} for e in events[::BURST // 20]])
        runs = node.wait_all_final(180)
        assert all(r.state.is_completed() for r in runs)
        assert len(origin.settle(2.0)) == published, "a replayed event was announced again"

        # (c) an update while the first version is in flight on the other host -----------------
        survivor.stop(timeout=30)
        host_worker(node, "host-c1", 1).start()
        host_worker(node, "host-c2", 1).start()
        v1_files = GatedFileServer(DEMO_FILE)  # holds every download
        content = DEMO_FILE.read_bytes() + b"# corrected\n"
        v2_path = tmp_path / "v2.csv"
        v2_path.write_bytes(content)
        v2_files = GatedFileServer(v2_path, allow=10)
        try:
            v1 = file_event("upd", 0, v1_files.url)
            v2 = updated_event(v1, v2_files.url, content)
            create_runs(node, "publish-notification", [{"event": v1}])
            v1_files.wait_held(1, 120, node.logs)  # v1 in flight on one host (its only slot)
            create_runs(node, "publish-notification", [{"event": v2}])
            deadline = time.monotonic() + 120
            while waiting_claims(ledger_url) < 1:  # v2, on the other host, waits for the claim
                assert time.monotonic() < deadline, node.logs()
                time.sleep(0.2)
            v1_files.release()
            runs = node.wait_all_final(180)
        finally:
            v1_files.close()
            v2_files.close()
        assert all(r.state.is_completed() for r in runs), [
            (r.name, r.state_name, r.state.message) for r in runs if not r.state.is_completed()]
        last_two = sorted((r for r in runs if r.deployment_id == node.deployments[
            "publish-notification"]), key=lambda r: r.created)[-2:]
        assert {(r.labels or {}).get(WORKER_LABEL) for r in last_two} == {"host-c1", "host-c2"}
        messages = origin.wait_for(published + 2, 60)[published:]
        assert len(origin.settle(2.0)) == published + 2
        rels = [(m["properties"]["data_id"].rsplit("/", 1)[-1],
                 next(lk["rel"] for lk in m["links"] if lk["rel"] in ("canonical", "update")))
                for _, m in messages]
        assert rels == [("UPD_0000.csv", "canonical"), ("UPD_0000.csv", "update")]
    finally:
        files.close()
        node.stop()
