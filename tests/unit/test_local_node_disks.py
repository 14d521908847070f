"""The local node and its disks: what its free-space alarm watches (the listener's
`WIS2_DISK_PATHS`: the results and ledger, the broker's persistence directory, and the data
directory of the Prefect database's PostgreSQL cluster when the node runs one), and its
PostgreSQL started again after a full disk stopped it (tests/integration/test_full_disk*.py
fill each of them)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from localnode.node import LocalNode, NodeSettings


def _watched(node: LocalNode) -> list[str]:
    node.server = node.make_server()
    return json.loads(node.listener_env()["WIS2_DISK_PATHS"])


def test_the_results_and_the_brokers_persistence_are_watched(tmp_path: Path) -> None:
    node = LocalNode(NodeSettings(_env_file=None, run_dir=tmp_path, database="sqlite"))
    assert _watched(node) == [str(tmp_path / "results"), str(tmp_path / "broker" / "data")]


def test_the_prefect_databases_cluster_is_watched_when_the_node_runs_it(tmp_path: Path) -> None:
    node = LocalNode(NodeSettings(_env_file=None, run_dir=tmp_path, database="sqlite"))
    node.postgres = SimpleNamespace(pgdata=tmp_path / "pg" / "pgdata")  # type: ignore[assignment]
    assert _watched(node)[-1] == str(tmp_path / "pg" / "pgdata")


class _Cluster:
    """Stands in for the node's PostgresCluster: stopped; starts, or fails to (a full disk)."""

    def __init__(self, tmp_path: Path, starts: bool) -> None:
        self.running, self.starts = False, starts
        self.log_path, self.pgdata = tmp_path / "postgres.log", tmp_path / "pgdata"

    def kill(self) -> None:
        pass

    def start(self) -> None:
        if not self.starts:
            raise RuntimeError("postgres exited early:\nshutting down due to startup process "
                               "failure")
        self.running = True


def test_the_node_starts_its_stopped_database_again(tmp_path: Path) -> None:
    node = LocalNode(NodeSettings(_env_file=None, run_dir=tmp_path, database="sqlite"))
    assert node.keep_database_running()  # SQLite: nothing to do
    node.postgres, node._owns_postgres = _Cluster(tmp_path, starts=False), True  # type: ignore
    assert not node.keep_database_running()  # the disk still full: tried, logged, not running
    node.postgres.starts = True  # type: ignore[attr-defined]
    assert node.keep_database_running() and node.postgres.running
