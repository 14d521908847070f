"""What the local node's free-space alarm watches (the listener's `WIS2_DISK_PATHS`): the
results and ledger, the broker's persistence directory, and the data directory of the Prefect
database's PostgreSQL cluster when the node runs one (tests/integration/test_full_disk*.py fill
each of them)."""

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
