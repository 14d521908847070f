"""The benchmark's node: `localnode.node.LocalNode` with more listener settings, the optional
stand-in listener, extra environment for the chain's processes, and the gated file server
(`bench/gated_files.py`) in place of `python -m http.server`. `ScaledBenchNode`: the same on the
scaled topology (`localnode/scaled.py`: N workers, M listener replicas, shared services)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from chain.processes import apply_env
from localnode.node import LocalNode, NodeSettings
from localnode.scaled import ScaledNode

# Listener settings of each profile as deployed (for the report: LocalNode sets them itself): the
# PostgreSQL server takes concurrent run creations (compose.yml sets
# WIS2_LISTENER_API_CONCURRENCY=4); SQLite keeps the default 1. --listener-setting overrides them.
PROFILE_LISTENER_SETTINGS: dict[str, dict[str, str]] = {
    profile: {"API_CONCURRENCY": LocalNode.POSTGRES_LISTENER_API_CONCURRENCY}
    for profile in ("postgres", "scaled")}


class BenchNode(LocalNode):
    """The node, with more listener settings (`{"BATCH_MAX_SIZE": "50"}` ->
    WIS2_LISTENER_BATCH_MAX_SIZE=50), `extra_env` for every chain process (e.g.
    `{"WIS2_VERIFY_TIMEOUT": "600"}`), or the stand-in listener when asked for; a value of None
    unsets the variable (the program's default). Its file server holds file requests while
    `gate_file` exists and answers each after `files_latency_ms` (see bench/gated_files.py).
    `server_env` and `server_node_settings`
    (LocalNode) change the Prefect server's environment."""

    def __init__(self, settings: NodeSettings, standin_listener: bool = False,
                 listener_settings: Mapping[str, str | None] | None = None,
                 extra_env: Mapping[str, str | None] | None = None,
                 files_latency_ms: float = 0.0, **node_options) -> None:
        super().__init__(settings, **node_options)
        self.files_latency_ms = files_latency_ms
        self.standin_listener = standin_listener
        self.listener_settings = dict(listener_settings or {})
        self.extra_env = dict(extra_env or {})
        self.postgres = None  # a PostgresCluster the bench started for this node, if any

    @property
    def gate_file(self) -> Path:
        return self.run_dir / "files-gate"

    def child_env(self) -> dict[str, str]:
        return apply_env(super().child_env(), self.extra_env)

    def worker_env(self, env: dict[str, str]) -> dict[str, str]:
        # over the worker's own settings too (PREFECT_CLIENT_MAX_RETRIES...)
        return apply_env(super().worker_env(env), self.extra_env)

    def listener_env(self) -> dict[str, str]:
        return apply_env(super().listener_env(), {f"WIS2_LISTENER_{k.upper()}": v
                                               for k, v in self.listener_settings.items()})

    def _spawn(self, name, argv, env, ready=None, timeout=60.0, **options):
        if name == "listener" and self.standin_listener:
            argv = [sys.executable, "-m", "bench.standin_listener"]
        if name == "files":
            s = self.settings
            argv = [sys.executable, "-m", "bench.gated_files", str(s.files_port),
                    "--bind", s.host, "--directory", str(self.run_dir / "www"),
                    "--gate-file", str(self.gate_file),
                    "--latency-ms", str(self.files_latency_ms)]
        return super()._spawn(name, argv, env, ready=ready, timeout=timeout, **options)

    def process(self, name: str):
        """The managed process `name` (worker, listener, files, prefect-server); on the scaled
        node, `worker` and `listener` are the first ones (`worker-1`, `listener-1`)."""
        for proc in self.processes:
            if proc.name == name:
                return proc
        for proc in self.processes:
            if proc.name.startswith(f"{name}-"):
                return proc
        raise KeyError(f"no process {name!r} in this node")

    def listeners(self) -> list:
        """The listener processes (one, or the replicas of the scaled node)."""
        return [p for p in self.processes if p.name == "listener"
                or p.name.startswith("listener-")]

    def listener_metrics_urls(self) -> list[str]:
        ports = getattr(self, "listener_metrics_ports", [self.settings.metrics_port])
        return [f"http://{self.settings.host}:{port}/metrics" for port in ports]


class ScaledBenchNode(BenchNode, ScaledNode):
    """The benchmark's node on the scaled topology (`topology=Topology(...)`)."""
