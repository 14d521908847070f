"""A full disk under the Prefect database loses nothing: the node's PostgreSQL cluster with its
data directory on a small tmpfs this test mounts (root needed), filled to the last byte in the
middle of a burst.

A first burst's runs are created (the listener acknowledged every event) and held inside their
verify step (the node's gated file server: `bench/gated_files.py`); the database's disk is
filled; a second burst is published while it is full, and the first burst's downloads are let
through. While it is full, PostgreSQL refuses what needs a new page ("could not extend file": the
Prefect API answers 503; what fits in a page still succeeds, so which calls fail varies, and in
some tries none of the listener's), the listener keeps the events whose runs it cannot create
unacknowledged and retries (its log says the API is unavailable; none is dead-lettered), the
first burst's runs publish as far as their own writes fit (they need the database only to record
their states and artifacts, which the Prefect client retries), and the listener's free-space
alarm names the database's directory (metric, /healthz, log line). Once the filler is deleted
every event of both bursts is published with exactly one notification id, and every run ends
Completed (none Failed or Crashed).

The disk full until PostgreSQL's next checkpoint: PostgreSQL crashes and may stop (the last
test shows it on a cluster alone); the local node starts it again once space is freed (the
second test).
"""

from __future__ import annotations

import asyncio
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
from localnode.postgres import PG_USER, PostgresCluster
from tests.fixtures.disks import fill, small_tmpfs
from tests.fixtures.node import running_node, wait_subscribed
from tests.fixtures.waiting import wait_for
from wis2.dataset import load_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]  # a node on a busy machine

TOPIC = "diffusion/files/coriolis/argo/csv"
BURST = 8
DATABASE_DISK = "128m"  # the cluster after Prefect's migrations (~45 MB), and room to run


class SmallDatabaseDiskNode(BenchNode):
    """The local node, its PostgreSQL cluster's data in `database_dir` (the test's tmpfs, not a
    temporary directory), checkpoints once a day; the listener checks the disks every second
    (not every minute)."""

    database_dir: Path

    def _start_database(self) -> str | None:
        self.postgres = PostgresCluster(self.database_dir,
                                        log_path=self.run_dir / "logs" / "postgres.log")
        self._owns_postgres = True  # stopped by stop(); the directory is the test's
        self.postgres.start()
        # No timed checkpoint while the disk is full: on a full disk a checkpoint crashes
        # PostgreSQL, which may then stop (the next test); this test holds it full for seconds.
        self.postgres.execute("ALTER SYSTEM SET checkpoint_timeout = '1d'")
        self.postgres.execute("SELECT pg_reload_conf()")
        return self.postgres.create_database("prefect")

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), "WIS2_LISTENER_HOUSEKEEPING_SECONDS": "1"}


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
        ctx.publish(second)  # each one acknowledged by the broker: it holds them
        wait_for(lambda: "No space left on device" in log_text(node, "postgres"), 300,
                 "PostgreSQL to refuse a write for lack of space")

        def second_burst_taken() -> str | None:
            """Whether a run creation failed (the listener retries it), else None until every
            event is in a run (what fits in PostgreSQL's pages is still written: which calls
            fail, if any, varies from one try to the next)."""
            if "Prefect API unavailable" in log_text(node, "listener"):
                return "a run creation refused: retried"
            counters = ctx.counters()
            return ("every run created" if counters.received >= 2 * BURST
                    and counters.in_flight == 0 else None)

        intake = wait_for(second_burst_taken, 300,
                          "the listener to retry a run creation, or to create every run")
        ctx.open_gate()
        # the first burst's runs verify and publish (files, broker), as far as their writes to
        # the database fit in its pages: usually all 8, once 7 (what fits varies)
        origin.wait_for([e.data_id for e in first], time.monotonic() + 60)
        published_while_full = origin.received(e.data_id for e in first)
        _, status = wait_for(lambda: (h := health(node))[0] == 503 and h, 60,
                             "the listener's health check to fail")
        assert status["status"] == "disk_low" and str(pgdata) in status["disk_low"], status
        metrics = httpx.get(f"http://{node.settings.host}:{node.settings.metrics_port}/metrics",
                            timeout=10).text
        assert f'wis2_listener_disk_low{{path="{pgdata}"}} 1.0' in metrics
        broker_data = node.run_dir / "broker" / "data"  # watched too, not low
        assert f'wis2_listener_disk_low{{path="{broker_data}"}} 0.0' in metrics
        assert f"disk space low: {pgdata}" in log_text(node, "listener")
        # what fits in a page is still written (each connection fills its own last page):
        # some runs may still be created, and record their end, while the disk is full
        held = ctx.counters()
        assert held.rejected == 0, "an event dead-lettered for a full database"
        states = [r["state_type"] for r in flow_runs(node) if r["id"] in first_runs]
        print(f"while full: {intake}; listener {held}, first burst's runs {states} "
              f"({published_while_full} of {BURST} published), "
              f"{origin.received(e.data_id for e in second)} of the second burst published")

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


def test_a_full_database_disk_until_a_checkpoint_stops_postgresql_the_node_starts_it_again(
        node: SmallDatabaseDiskNode) -> None:
    """The disk stays full until PostgreSQL's next checkpoint (requested here): PostgreSQL
    PANICs and, its recovery finding no space either, may stop. The local node starts it again
    once space is freed (`LocalNode.keep_database_running`, every minute under `make demo`;
    while the disk is full it cannot); every event is then published once."""
    assert node.postgres is not None
    log = node.postgres.log_path
    factory = EventFactory(load_dataset("argo"), "fulldbc", files_url=node.files_url,
                           real_files=True)
    first, second = factory.batch("first", BURST), factory.batch("second", BURST)
    with Collector(node.state.connection("everyone"), node.settings.centre_id) as origin:
        ctx = FaultContext(node=node, factory=factory, collector=origin, events=BURST,
                           timeout=300, topic=TOPIC)
        ctx.close_gate()
        ctx.hold_in_flight(first, ctx.counters(), what="the first burst")

        filler = fill(node.database_dir)
        ctx.publish(second)
        with pytest.raises(Exception, match="connection was closed"):
            node.postgres.execute("CHECKPOINT")
        outcome = wait_for(lambda: (
            "stopped" if "shutting down due to startup process failure" in (
                text := log.read_text(errors="replace"))
            else "recovered" if text.count("ready to accept connections") >= 2 else None),
            60, "PostgreSQL to recover from the crash, or to stop")
        print(f"after the PANIC on a full disk, the node's PostgreSQL {outcome}")
        if outcome == "stopped":
            assert not node.keep_database_running()  # cannot start on the full disk
        ctx.open_gate()  # the runs go on against a database that is down or full
        wait_for(lambda: ctx.gate()["held"] == 0, 120, "the held downloads to be served")

        filler.unlink()
        assert node.keep_database_running()
        assert node.postgres.running
        everything = first + second
        assert origin.wait_for([e.data_id for e in everything], time.monotonic() + 600), (
            f"{origin.received(e.data_id for e in everything)} of {len(everything)} published "
            "after freeing")
        wait_for(lambda: all_runs_done(node), 300, "every run to end")
        assert ctx.counters().rejected == 0
        time.sleep(3)  # a duplicate would come right after (not a synchronisation)
    for event in everything:
        _, ids = origin.copies(event.data_id)
        assert ids == 1, f"{event.name}: {ids} notification ids"
    assert not failed_runs(node)


def test_a_checkpoint_on_a_full_disk_crashes_postgresql_and_loses_nothing(
        tmp_path: Path) -> None:
    """What happens to the database when the disk stays full until its next checkpoint (at most
    `checkpoint_timeout`, 5 minutes by default; requested here): the checkpointer PANICs (a file
    it must write finds no space) and the postmaster ends every connection (the Prefect
    server's too). It then replays its WAL: when the end-of-recovery checkpoint finds no space
    either (blocks written since the last checkpoint that the disk never held), it shuts down
    for good ("shutting down due to startup process failure"), else it accepts connections again
    on the full disk. Either way, once space is freed (and PostgreSQL started again if it
    stopped), nothing written before is lost and writes succeed."""
    database_dir = Path(tempfile.mkdtemp(prefix="wis2-full-db-disk-"))
    log = tmp_path / "postgres.log"
    try:
        with small_tmpfs(database_dir, "64m", "wis2-full-db-disk", owner="postgres"), \
                PostgresCluster(database_dir, log_path=log) as cluster:
            cluster.create_database("kept")
            cluster.execute("CREATE TABLE t (a text)", "kept")
            cluster.execute("INSERT INTO t SELECT repeat('x', 500) FROM generate_series(1, 100)",
                            "kept")
            filler = fill(database_dir)
            with pytest.raises(Exception) as dropped:
                cluster.execute("CHECKPOINT")
            assert "connection was closed" in str(dropped.value), dropped.value
            assert "PANIC:" in log.read_text() and "No space left on device" in log.read_text()
            outcome = wait_for(lambda: (
                "stopped" if "shutting down due to startup process failure" in (
                    text := log.read_text())
                else "recovered" if text.count("ready to accept connections") >= 2 else None),
                60, "PostgreSQL to recover from the crash, or to stop")
            print(f"after the PANIC on a full disk, PostgreSQL {outcome}")
            filler.unlink()
            if outcome == "stopped":
                cluster.kill()  # reap what is left of it
                cluster.start()
            cluster.execute("INSERT INTO t VALUES ('after')", "kept")
            assert asyncio.run(_count(cluster)) == 101
    finally:
        database_dir.rmdir()


async def _count(cluster: PostgresCluster) -> int:
    import asyncpg

    conn = await asyncpg.connect(host=cluster.host, port=cluster.port, user=PG_USER,
                                 database="kept", timeout=10)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM t"))
    finally:
        await conn.close()


def api(node: BenchNode, path: str, body: dict) -> httpx.Response:
    auth = tuple(node.state.prefect_auth_string.get_secret_value().split(":", 1))
    return httpx.post(f"{node.state.prefect_api_url}{path}", json=body, auth=auth, timeout=60)


def flow_runs(node: BenchNode) -> list[dict]:
    return api(node, "/flow_runs/filter", {"limit": 200}).json()


def failed_runs(node: BenchNode) -> list[str]:
    return [r["name"] for r in flow_runs(node) if r["state_type"] in ("FAILED", "CRASHED")]


def all_runs_done(node: BenchNode) -> bool:
    """No run pending or running (the daily metadata deployment's future runs stay Scheduled)."""
    return not [r for r in flow_runs(node) if r["state_type"] in ("PENDING", "RUNNING")]
