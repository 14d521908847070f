"""A scaled local node: the node of `localnode/node.py` as several hosts would run it.

- N workers on the one work pool, each with its own name (`wis2-local-worker-<i>`), its own
  working directory and `WIS2_RESULTS_DIR` (`<run_dir>/hosts/worker-<i>/`), as separate hosts
  would have: they share nothing but the services below;
- M listener replicas on one shared subscription (`$share/<group>/diffusion/files/#`), each with
  its own client id (`wis2-chain-demo-listener-<i>`: its own persistent session) and metrics port;
- shared services: the Prefect server on a PostgreSQL cluster of its own
  (`localnode/postgres.py`), a `ledger` database in that cluster (`WIS2_LEDGER_URL`), a Redis of
  its own (`localnode/redis.py`): database 1 for the task results (`WIS2_RESULTS_URL`), database 0
  for the Prefect server's messaging when it runs with Redis (`prefect_redis`, the scale-out
  option of `localnode/prefect_server.py`; `separate_services` also splits the API and the
  background services into two processes).

Process names: `worker-<i>`, `listener-<i>`, `prefect-server` (and `prefect-services`), `redis`,
`postgres`. The default node (`LocalNode`) is unchanged.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from chain.processes import free_port, port_is_open
from localnode.node import REPO, LocalNode, NodeSettings
from localnode.postgres import PG_USER, PostgresCluster
from localnode.prefect_server import PrefectServer
from localnode.redis import RedisServer

log = logging.getLogger(__name__)

LEDGER_DATABASE = "ledger"
PREFECT_DATABASE = "prefect"
RESULTS_REDIS_DB = 1  # database 0: the Prefect server's messaging


class Topology(BaseModel):
    """How many of each, and how the Prefect server runs."""

    workers: int = Field(default=2, ge=1, description="Worker hosts on the work pool")
    listeners: int = Field(default=2, ge=1, description="Listener replicas on $share")
    share_group: str = Field(default="wis2", pattern=r"^[^/+#]+$")
    redis_messaging: bool = Field(
        default=True, description="The Prefect server's messaging on the node's Redis")
    separate_services: bool = Field(
        default=False, description="Prefect API and background services in two processes")


class ScaledNode(LocalNode):
    """`LocalNode` with N workers, M listener replicas and shared PostgreSQL and Redis."""

    def __init__(self, settings: NodeSettings | None = None,
                 topology: Topology | None = None, **node_options) -> None:
        super().__init__(settings, **node_options)  # server_env... (LocalNode)
        self.topology = topology or Topology()
        self.postgres: PostgresCluster | None = None
        self.redis: RedisServer | None = None
        self.listener_metrics_ports = [self.settings.metrics_port] + [
            free_port(self.settings.host) for _ in range(self.topology.listeners - 1)]

    # ---- shared services -------------------------------------------------------------------
    def make_server(self) -> PrefectServer:
        s, t = self.settings, self.topology
        # Not under run_dir (0700): as root the cluster runs as `postgres`, which must reach it.
        self.postgres = PostgresCluster(host=s.host, log_path=self.run_dir / "logs" /
                                        "postgres.log")
        self.processes.append(self.postgres)
        self.postgres.start()
        database_url = self.postgres.create_database(PREFECT_DATABASE)
        self.postgres.create_database(LEDGER_DATABASE)
        self.redis = RedisServer(self.run_dir / "redis", host=s.host,
                                 log_path=self.run_dir / "logs" / "redis.log")
        self.processes.append(self.redis)
        self.redis.start()
        return PrefectServer(
            self.run_dir / "prefect", port=s.prefect_port, host=s.host, ui=True,
            database_url=database_url, auth_string=self.prefect_auth_string,
            redis_url=self.redis.url(0) if t.redis_messaging or t.separate_services else None,
            separate_services=t.separate_services, extra_env=self.server_env,
            node_settings=self.server_node_settings)

    @property
    def ledger_url(self) -> str:
        assert self.postgres is not None
        return (f"postgresql://{PG_USER}@{self.postgres.host}:{self.postgres.port}/"
                f"{LEDGER_DATABASE}")

    @property
    def results_url(self) -> str:
        assert self.redis is not None
        return self.redis.url(RESULTS_REDIS_DB)

    def child_env(self) -> dict[str, str]:
        env = super().child_env()
        env.update({"WIS2_LEDGER_URL": self.ledger_url, "WIS2_RESULTS_URL": self.results_url})
        return env

    # ---- workers: one directory each, as separate hosts ------------------------------------
    def host_dir(self, name: str) -> Path:
        return self.run_dir / "hosts" / name

    def start_workers(self, env: dict[str, str], worker_type: str) -> None:
        for i in range(1, self.topology.workers + 1):
            self.start_worker(i, env, worker_type)

    def start_worker(self, i: int, env: dict[str, str], worker_type: str) -> None:
        name = f"worker-{i}"
        home = self.host_dir(name)
        (home / "results").mkdir(parents=True, exist_ok=True)
        worker_env = {**self.worker_env(env), "WIS2_RESULTS_DIR": str(home / "results")}
        self._spawn(name, self.worker_argv(worker_type, f"{self.WORKER_NAME}-{i}"), worker_env,
                    cwd=home)

    # ---- listener replicas on one shared subscription ---------------------------------------
    def replica_env(self, i: int) -> dict[str, str]:
        """Listener replica `i` (from 1): its own client id (session) and metrics port."""
        env = self.listener_env()
        env.update({
            "WIS2_LISTENER_CLIENT_ID": f"wis2-chain-demo-listener-{i}",
            "WIS2_LISTENER_SUBSCRIPTIONS":
                f'["$share/{self.topology.share_group}/diffusion/files/#"]',
            "WIS2_LISTENER_METRICS_PORT": str(self.listener_metrics_ports[i - 1]),
            "WIS2_LISTENER_DEADLETTER_DIR": str(self.host_dir(f"listener-{i}") / "deadletters"),
        })
        return env

    def start_listeners(self) -> None:
        for i in range(1, self.topology.listeners + 1):
            port = self.listener_metrics_ports[i - 1]
            self._spawn(f"listener-{i}", [sys.executable, "-m", "listener"], self.replica_env(i),
                        ready=lambda port=port: port_is_open(self.settings.host, port),
                        timeout=90, cwd=REPO)

    def stop(self) -> None:
        super().stop()
        if self.postgres is not None:
            self.postgres.cleanup()  # its data directory is a temporary one
            self.postgres = None
