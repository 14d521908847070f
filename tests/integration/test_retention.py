"""Retention on a real node (broker, Prefect server on PostgreSQL, warm worker, listener):
Prefect's database vacuum, as the node configures it (NODE_SERVER_SETTINGS: `flow_runs` on, 14
days), deletes a flow run that ended "15 days ago" with its task runs, logs and artifacts; the
results sweep deletes its task results; and expiry changes nothing that WIS2 sees: the same event
replayed afterwards is not announced again (no second id), a changed file is still an `update`.

Time is not waited for: the runs' `end_time` is moved 15 days back in the database and the result
files' mtime likewise; only the vacuum's loops are made short (2 s instead of an hour, and of a
day for the orphan sweep: a run's last log lines may reach the server after its run was deleted,
as orphans, which the daily sweep deletes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from chain.mqtt import connect, publish_once
from chain.retention import sweep_results
from chain.settings import ChainSettings
from localnode.node import LocalNode
from tests.fixtures.node import running_node, wait_subscribed
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # a node on a busy machine

DAY = 86400
TOPIC = "diffusion/files/coriolis/argo/csv"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    # The node's retention settings as they are; only the vacuum looks every 2 s.
    with running_node(tmp_path_factory.mktemp("retention-node"), timeout=240,
                      server_env={"PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "2",
                                  "PREFECT_SERVER_SERVICES_DB_VACUUM_ORPHAN_CLEANUP_LOOP_SECONDS":
                                  "2"}) as node:
        wait_subscribed(node)
        yield node


class Origin:
    """What a Global Broker receives: every data notification on the node's origin topics."""

    def __init__(self, node: LocalNode) -> None:
        self.messages: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.client = connect(node.state.connection("everyone"))
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(f"origin/a/wis2/{node.settings.centre_id}/data/#", qos=1)
        assert subscribed.wait(30), "no SUBACK from the broker"

    def _on_message(self, client, userdata, message) -> None:
        with self.changed:
            self.messages.append(json.loads(message.payload))
            self.changed.notify_all()

    def wait_count(self, count: int, timeout: float = 240) -> list[dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.messages) >= count, timeout), (
                f"{len(self.messages)} notifications after {timeout}s, expected {count}")
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def api(node: LocalNode, path: str, body: dict | None = None) -> list[dict[str, Any]]:
    auth = tuple(node.state.prefect_auth_string.get_secret_value().split(":", 1))
    response = httpx.post(f"{node.state.prefect_api_url}{path}",
                          json={**(body or {}), "limit": 200}, auth=auth, timeout=60)
    response.raise_for_status()
    return response.json()


def completed_runs(node: LocalNode) -> list[dict[str, Any]]:
    runs = api(node, "/flow_runs/filter")
    assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], runs
    return [r for r in runs if r["state_type"] == "COMPLETED"]


def event(node: LocalNode, event_id: str, content: bytes) -> bytes:
    """An event announcing www/retention/R1.csv (written with `content`) as the file server
    would: its size and sha3-256 multihash."""
    path = node.run_dir / "www" / "retention" / "R1.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    payload = json.loads((node.settings.event).read_text())
    payload["id"] = event_id
    payload["data"]["id"] = "R1"
    payload["data"]["assets"] = {"R1.csv": {
        "href": f"{node.files_url}/retention/R1.csv", "type": "text/csv", "roles": ["data"],
        "file:size": len(content),
        "file:checksum": "1620" + hashlib.sha3_256(content).hexdigest()}}
    return json.dumps(payload).encode()


def test_expired_runs_and_results_change_nothing_wis2_sees(node: LocalNode) -> None:
    fileserver = node.state.connection("fileserver")
    origin = Origin(node)
    try:
        first_event = event(node, "retention-R1-v1", b"PRES,TEMP\n1.0,12.5\n")
        publish_once(fileserver, TOPIC, first_event)
        [first] = origin.wait_count(1)
        assert first["links"][0]["rel"] == "canonical"
        runs = wait_for(lambda: completed_runs(node), 120, "the first run to complete")
        run_ids = [r["id"] for r in runs]
        in_runs = {"flow_runs": {"id": {"any_": run_ids}}}
        assert api(node, "/artifacts/filter", in_runs) and api(node, "/task_runs/filter", in_runs)
        # A run's log lines reach the server in batches, possibly after the run completed.
        wait_for(lambda: api(node, "/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}}}),
                 60, "the run's log lines")
        results = node.run_dir / "results"
        result_files = sorted(results.glob("wnm-*"))
        assert result_files, "the cached task results"

        # 15 days pass, for the runs and for their results.
        assert node.postgres is not None
        node.postgres.execute("UPDATE flow_run SET end_time = end_time - interval '15 days' "
                              "WHERE end_time IS NOT NULL", database="prefect")
        wait_for(lambda: not api(node, "/flow_runs/filter", in_runs), 180,
                 "the vacuum to delete the runs that ended 15 days ago")
        assert not api(node, "/task_runs/filter", in_runs)
        assert not api(node, "/artifacts/filter", in_runs)
        # Log lines sent after the vacuum deleted their run are orphans: the orphan sweep's.
        in_logs = {"logs": {"flow_run_id": {"any_": run_ids}}}
        wait_for(lambda: not api(node, "/logs/filter", in_logs), 60,
                 "the vacuum to delete the runs' logs, orphans included")
        stamp = time.time() - 15 * DAY
        for path in result_files:
            os.utime(path, (stamp, stamp))
        settings = ChainSettings(_env_file=None, results_dir=results)  # the default retention
        assert sweep_results(settings) == len(result_files)
        assert not list(results.glob("wnm-*"))
        assert (results / "publication-ledger.sqlite3").exists()

        # The same event again (a broker redelivery, a replay from the file server): its run
        # and results are gone, so it is processed again, and the ledger keeps it unannounced.
        publish_once(fileserver, TOPIC, first_event)
        replayed = wait_for(lambda: [r for r in completed_runs(node) if r["id"] not in run_ids],
                            180, "the replayed event's run to complete")
        assert len(replayed) == 1

        # The file changes: an update, under a new id. It is published after the replay's run
        # completed, so a notification of the replay would have reached the broker (PUBACK)
        # before this one, and the subscriber would receive it first: exactly two in all.
        publish_once(fileserver, TOPIC, event(node, "retention-R1-v2",
                                              b"PRES,TEMP\n1.0,12.5\n2.0,12.1\n"))
        first_again, update = origin.wait_count(2)
        assert first_again == first
        assert update["links"][0]["rel"] == "update"
        assert update["id"] != first["id"]
        assert update["properties"]["data_id"] == first["properties"]["data_id"]
        digest = hashlib.sha3_256(b"PRES,TEMP\n1.0,12.5\n2.0,12.1\n").digest()
        assert update["properties"]["integrity"]["value"] == base64.b64encode(digest).decode()
        time.sleep(2)  # nothing more follows (not a bound the result depends on)
        assert len(origin.messages) == 2
    finally:
        origin.close()


def test_the_node_keeps_its_log_files_bounded(node: LocalNode) -> None:
    """`make demo`'s rotation on the node's real log files (append-mode children)."""
    logs = [p for p in node.run_dir.rglob("*.log") if p.stat().st_size > 0]
    assert logs
    node.settings.log_max_bytes = 1
    assert node.rotate_logs() >= len(logs)
    for path in logs:
        assert path.with_name(path.name + ".1").exists()
        assert path.stat().st_size < 1 << 20
