"""A Prefect server as a child process with its own home and database (SQLite by default).

Scale-out option (Prefect's documented self-hosted layout): `redis_url` moves the server's
messaging, event ordering, concurrency leases and Docket onto Redis (prefect-redis), and
`separate_services=True` runs the API (`prefect server start --no-services`) and the background
services (`prefect server services start`) as two processes sharing the database and Redis. The
services need Redis: with the in-memory broker they would not see the API's events.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
from pydantic import SecretStr

from chain.processes import ManagedProcess, apply_env, free_port

# Server settings of a WIS2 node (README: "The Prefect server's settings"); `extra_env` overrides
# them, `node_settings=False` leaves them out (Prefect's defaults). Kept: the scheduler (the
# republish-metadata/daily cron deployment), cancellation cleanup, the foreman (worker status),
# the event persister and the event stream (the workers' wake-up and cancellation observer), the
# task run recorder, the repossessor, the database vacuum.
NODE_SERVER_SETTINGS: dict[str, str] = {
    # Late runs: a state write per Scheduled run older than 15 s, i.e. per run of a backlog,
    # while the backlog is what the server is busy with; "Late" changes nothing for a worker.
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    # No flow of the chain pauses or suspends itself.
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    # Automations (triggers and actions): the chain defines none; this service reads every event.
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    # Task runs reported by the flows' engine (5 per event) are written in bulk, not one
    # transaction each (at most 1 s later in the UI).
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    # Retention (docs/operating/keeping-it-running.md): the database vacuum deletes the flow
    # runs that ended more than 14 days ago, with their task runs, states, logs and artifacts
    # ("flow_runs"; Prefect's default vacuums only "events", so runs were kept for ever), every
    # hour (Prefect's default loop). 14 days: an incident noticed after a weekend or a holiday
    # can still be read in the UI and its runs retried, and the database stays a few GB at
    # 200,000 files a day. What was published is the publication ledger's, never vacuumed.
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(14 * 86400),
    # Events (the UI's event feed; the workers' wake-up stream needs seconds): 1 day, not
    # Prefect's 7. They are three quarters of the database at 20 files/s in batch runs, about
    # 10 kB per file (bench/RESULTS.md, the soak), more with a run per file; a run's states, logs
    # and artifacts are in the run, kept 14 days.
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P1D",  # ISO 8601 (no plain seconds here)
    # glibc's allocator: blocks over 128 kB (a batch run's parameters and its responses are
    # ~100 kB of JSON) are mapped and returned to the system when freed, instead of the
    # threshold rising to 32 MB and bursts leaving a fragmented heap behind; two arenas for
    # the server's few threads. Peak RSS in a burst of 10,000: 298 -> 262 MB (bench/RESULTS.md).
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_ARENA_MAX": "2",
}


def prefect_cli() -> str:
    """The `prefect` executable of this Python environment."""
    return str(Path(sys.executable).with_name("prefect"))


def redis_env(url: str) -> dict[str, str]:
    """Prefect server settings that put its messaging on Redis `url` (prefect-redis): events
    and their cache, causal ordering, concurrency leases, Docket's task queue."""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_URL": url,
        "PREFECT_SERVER_DOCKET_URL": url,
    }


class PrefectServer(ManagedProcess):
    """`prefect server start` on loopback. `api_url` is what clients put in PREFECT_API_URL.

    Its environment: NODE_SERVER_SETTINGS (unless `node_settings=False`), then `extra_env`
    (a value of None unsets that variable: Prefect's default).

    With `auth_string` ("user:password"), the API and the UI ask for it (Prefect's basic
    authentication, PREFECT_SERVER_API_AUTH_STRING); `client_env()` gives it to clients
    (PREFECT_API_AUTH_STRING). Only `GET /api/health` and `/api/ready` answer without it."""

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        database_url: str | None = None,
        ui: bool = False,
        extra_env: Mapping[str, str | None] | None = None,
        auth_string: SecretStr | None = None,
        redis_url: str | None = None,
        separate_services: bool = False,
        node_settings: bool = True,
    ) -> None:
        if separate_services and redis_url is None:
            raise ValueError("separate_services needs redis_url (Prefect's Redis messaging)")
        self.home = Path(home)
        self.auth_string = auth_string
        self.host = host
        self.port = port or free_port(host)
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="true" if ui else "false",
            PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
            PREFECT_LOGGING_LEVEL="WARNING",
            # The UI asks the browser to call this API address (else it assumes port 4200).
            PREFECT_UI_API_URL=f"http://{host}:{self.port}/api",
            PREFECT_SERVER_API_HOST=host,
            PREFECT_SERVER_API_PORT=str(self.port),
        )
        if node_settings:
            env.update(NODE_SERVER_SETTINGS)
        if auth_string is not None:
            env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string.get_secret_value()
        if redis_url is not None:
            env.update(redis_env(redis_url))
        apply_env(env, extra_env or {})  # None: unset (Prefect's default)
        # SQLite: Prefect's server with write transactions that wait for the lock instead of
        # failing (localnode/sqlite_server.py)
        prefect = ([sys.executable, "-m", "localnode.sqlite_server"]
                   if self.database_url.startswith("sqlite") else [prefect_cli()])
        argv = [*prefect, "server", "start", "--host", host, "--port", str(self.port)]
        self.services: ManagedProcess | None = None
        if separate_services:
            argv.append("--no-services")
            services_log = self.home / "services.log"
            self.services = ManagedProcess(
                "prefect-services", [*prefect, "server", "services", "start"],
                log_path=services_log, env=env,
                ready=lambda: "Starting services" in services_log.read_text(errors="replace"))
        super().__init__("prefect-server", argv, log_path=self.home / "server.log", env=env,
                         ready=self.healthy)

    # ---- the API process and, when separate, the services process --------------------------
    def start(self, timeout: float = 60.0) -> PrefectServer:
        super().start(timeout)  # the API first: it migrates the database
        if self.services is not None:
            self.services.start(timeout)
        return self

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        if self.services is not None:
            self.services.stop(timeout, sig)
        return super().stop(timeout, sig)

    def kill(self) -> None:
        """SIGKILL the API and, when separate, the services process (a crash of the host)."""
        if self.services is not None:
            self.services.kill()
        super().kill()

    def tail(self, lines: int = 60) -> str:
        text = super().tail(lines)
        if self.services is not None:
            text += f"\n--- {self.services.log_path}\n{self.services.tail(lines)}"
        return text

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client_env(self) -> dict[str, str]:
        """Environment for a process that talks to this server."""
        env = {"PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if self.auth_string is not None:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string.get_secret_value()
        return env

    def client_settings(self) -> dict:
        """Prefect settings for this process's client (`temporary_settings(updates=...)`)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        updates: dict = {PREFECT_API_URL: self.api_url}
        if self.auth_string is not None:
            updates[PREFECT_API_AUTH_STRING] = self.auth_string.get_secret_value()
        return updates
