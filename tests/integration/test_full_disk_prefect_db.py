"""A full disk under the Prefect database loses nothing: the node's PostgreSQL cluster with its
data directory on a small tmpfs this test mounts (root needed), filled to the last byte in the
middle of a burst.

A first burst's runs are created (the listener acknowledged every event) and held inside their
verify step (the node's gated file server: `bench/gated_files.py`); the database's disk is
filled; a second burst is published while it is full, and the first burst's downloads are let
through. While it is full, PostgreSQL refuses what needs more space ("could not extend file":
the Prefect API answers 500), the listener keeps the second burst's events unacknowledged and
retries (its log says the API is unavailable), the runs' API calls are retried by the Prefect
client, and the listener's free-space alarm names the database's directory (metric, /healthz,
log line). Once the filler is deleted every event of both bursts is published with exactly one
notification id, and no run is left Failed or Crashed.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.collect import Collector
from bench.events import EventFactory
from bench.faults import FaultContext
from bench.node import BenchNode
from localnode.postgres import PostgresCluster
from tests.fixtures.disks import fill, small_tmpfs
from tests.fixtures.node import running_node, wait_subscribed
from wis2.dataset import load_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]  # a node on a busy machine

TOPIC = "diffusion/files/coriolis/argo/csv"
BURST = 8
DATABASE_DISK = "128m"  # the cluster after Prefect's migrations (~45 MB), and room to run
# what a run of the first burst logs once its notifications are sent (a batch, one event)
WORK_DONE = re.compile(r"Flow run '[^']*fulldb_first_[^']*' - (batch .*: \d+ event\(s\): |"
                       r"notification \S+: sent)")


class SmallDatabaseDiskNode(BenchNode):
    """The local node, its PostgreSQL cluster's data in `database_dir` (the test's tmpfs, not a
    temporary directory); the listener checks the disks every second (not every minute)."""

    database_dir: Path
    client_max_retries: str | None = None  # PREFECT_CLIENT_MAX_RETRIES of the worker

    def _start_database(self) -> str | None:
        self.postgres = PostgresCluster(self.database_dir,
                                        log_path=self.run_dir / "logs" / "postgres.log")
        self._owns_postgres = True  # stopped by stop(); the directory is the test's
        self.postgres.start()
        return self.postgres.create_database("prefect")

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), "WIS2_LISTENER_HOUSEKEEPING_SECONDS": "1"}

    def worker_env(self, env: dict[str, str]) -> dict[str, str]:
        retries = ({"PREFECT_CLIENT_MAX_RETRIES": self.client_max_retries}
                   if self.client_max_retries else {})
        return {**super().worker_env(env), **retries}


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out ({timeout}s) waiting for {what}"
        time.sleep(1)
    return value


@contextmanager
def database_disk_node(run_dir: Path, **attributes) -> Iterator[SmallDatabaseDiskNode]:
    """A started `SmallDatabaseDiskNode` (more class attributes in `attributes`) whose database
    is on a tmpfs of its own; stopped (its PostgreSQL too) before the file system goes."""
    # in /tmp, not under pytest's 0700 directories: the postgres account must reach it
    database_dir = Path(tempfile.mkdtemp(prefix="wis2-full-db-disk-"))
    try:
        with small_tmpfs(database_dir, DATABASE_DISK, "wis2-full-db-disk", owner="postgres"):
            node_class = type("Node", (SmallDatabaseDiskNode,),
                              {"database_dir": database_dir, **attributes})
            with running_node(run_dir, timeout=240, node_class=node_class) as running:
                wait_subscribed(running)
                yield running
    finally:
        database_dir.rmdir()


@pytest.fixture
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallDatabaseDiskNode]:
    with database_disk_node(tmp_path_factory.mktemp("full-db-disk-node")) as running:
        yield running


@pytest.fixture
def impatient_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallDatabaseDiskNode]:
    """The node, its runs' Prefect client retrying an API call once (not 7 times, ~4 minutes):
    a full disk that outlasts the retries, in seconds."""
    with database_disk_node(tmp_path_factory.mktemp("full-db-disk-impatient"),
                            client_max_retries="1") as running:
        yield running


def health(node: BenchNode) -> tuple[int, dict]:
    response = httpx.get(f"http://{node.settings.host}:{node.settings.metrics_port}/healthz",
                         timeout=10)
    return response.status_code, response.json()


def log_text(node: BenchNode, name: str) -> str:
    return (node.run_dir / "logs" / f"{name}.log").read_text(errors="replace")


def test_a_full_database_disk_holds_the_events_and_loses_none(
        node: SmallDatabaseDiskNode) -> None:
    assert node.postgres is not None
    pgdata = node.postgres.pgdata
    factory = EventFactory(load_dataset("argo"), "fulldb", files_url=node.files_url,
                           real_files=True)
    first, second = factory.batch("first", BURST), factory.batch("second", BURST)
    with Collector(node.state.connection("everyone"), node.settings.centre_id) as origin:
        ctx = FaultContext(node=node, factory=factory, collector=origin, events=BURST,
                           timeout=300, topic=TOPIC)
        ctx.close_gate()  # every download waits
        ctx.hold_in_flight(first, ctx.counters(), what="the first burst")
        first_runs = {r["id"] for r in flow_runs(node) if r["state_type"] == "RUNNING"}

        filler = fill(node.database_dir)
        ctx.publish(second)
        wait_for(lambda: "No space left on device" in log_text(node, "postgres"), 300,
                 "PostgreSQL to refuse a write for lack of space")
        wait_for(lambda: "Prefect API unavailable" in log_text(node, "listener"), 300,
                 "the listener to retry a run creation")
        ctx.open_gate()
        # the first burst's runs verify and publish (files, broker: no database write needed)
        assert origin.wait_for([e.data_id for e in first], time.monotonic() + 300), (
            f"{origin.received(e.data_id for e in first)} of {BURST} published while full")
        _, status = wait_for(lambda: (h := health(node))[0] == 503 and h, 60,
                             "the listener's health check to fail")
        assert status["status"] == "disk_low" and str(pgdata) in status["disk_low"], status
        metrics = httpx.get(f"http://{node.settings.host}:{node.settings.metrics_port}/metrics",
                            timeout=10).text
        assert f'wis2_listener_disk_low{{path="{pgdata}"}} 1.0' in metrics
        assert f"disk space low: {pgdata}" in log_text(node, "listener")
        held = ctx.counters()
        assert held.in_flight >= 1, "the second burst's events are held unacknowledged"
        assert origin.received(e.data_id for e in second) == 0
        # their work done, the first burst's runs cannot record their end: Running until the
        # Prefect client's retries of their Completed state find the space
        wait_for(lambda: len(WORK_DONE.findall(log_text(node, "worker"))) >= len(first_runs),
                 120, "the first burst's runs to finish their work")
        states = [r["state_type"] for r in flow_runs(node) if r["id"] in first_runs]
        assert states == ["RUNNING"] * len(first_runs), states

        filler.unlink()
        everything = first + second
        assert origin.wait_for([e.data_id for e in everything], time.monotonic() + 600), (
            f"{origin.received(e.data_id for e in everything)} of {len(everything)} published "
            "after freeing")
        wait_for(lambda: health(node)[0] == 200, 60, "the health check to pass again")
        wait_for(lambda: all_runs_done(node), 300, "every run to end")
        ended = [r["state_type"] for r in flow_runs(node) if r["id"] in first_runs]
        assert ended == ["COMPLETED"] * len(first_runs), ended
        time.sleep(3)  # a duplicate would come right after (not a synchronisation)
    for event in everything:
        _, ids = origin.copies(event.data_id)
        assert ids == 1, f"{event.name}: {ids} notification ids"
    assert not failed_runs(node)


def test_a_full_database_disk_outlasting_the_runs_api_retries_loses_none(
        impatient_node: SmallDatabaseDiskNode) -> None:
    """The runs give up on the API while the disk is full (their engine fails: a log line, the
    run left Running, as nothing can be written); once space is freed the worker's recovery
    runs them again, and their caches make the rerun publish nothing twice."""
    node = impatient_node
    factory = EventFactory(load_dataset("argo"), "fulldbx", files_url=node.files_url,
                           real_files=True)
    burst = factory.batch("first", BURST)
    with Collector(node.state.connection("everyone"), node.settings.centre_id) as origin:
        ctx = FaultContext(node=node, factory=factory, collector=origin, events=BURST,
                           timeout=300, topic=TOPIC)
        ctx.close_gate()
        ctx.hold_in_flight(burst, ctx.counters())
        runs = {r["id"] for r in flow_runs(node) if r["state_type"] == "RUNNING"}

        filler = fill(node.database_dir)
        ctx.open_gate()
        wait_for(lambda: log_text(node, "worker").count("ended with an engine error")
                 >= len(runs), 300, "every run's engine to give up on the API")
        states = [r["state_type"] for r in flow_runs(node) if r["id"] in runs]
        print(f"while full: {origin.received(e.data_id for e in burst)} of {BURST} published; "
              f"runs {states}")

        filler.unlink()
        assert origin.wait_for([e.data_id for e in burst], time.monotonic() + 600), (
            f"{origin.received(e.data_id for e in burst)} of {BURST} published after freeing")
        wait_for(lambda: all(r["state_type"] == "COMPLETED" for r in flow_runs(node)
                             if r["id"] in runs), 600, "the runs to be run again and complete")
        wait_for(lambda: all_runs_done(node), 300, "every run to end")
        time.sleep(3)  # a duplicate would come right after (not a synchronisation)
    for event in burst:
        _, ids = origin.copies(event.data_id)
        assert ids == 1, f"{event.name}: {ids} notification ids"
    assert not failed_runs(node)
    print(f"copies: {[origin.copies(e.data_id)[0] for e in burst]}")


def flow_runs(node: BenchNode) -> list[dict]:
    auth = tuple(node.state.prefect_auth_string.get_secret_value().split(":", 1))
    return httpx.post(f"{node.state.prefect_api_url}/flow_runs/filter", json={"limit": 200},
                      auth=auth, timeout=60).json()


def failed_runs(node: BenchNode) -> list[str]:
    return [r["name"] for r in flow_runs(node) if r["state_type"] in ("FAILED", "CRASHED")]


def all_runs_done(node: BenchNode) -> bool:
    """No run pending or running (the daily metadata deployment's future runs stay Scheduled)."""
    return not [r for r in flow_runs(node) if r["state_type"] in ("PENDING", "RUNNING")]
