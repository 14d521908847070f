"""A Prefect server as a child process with its own home and database (SQLite by default)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
from pydantic import SecretStr

from chain.processes import ManagedProcess, free_port

# Server settings of a WIS2 node (README: "The Prefect server's settings"); `extra_env` overrides
# them. Kept: the scheduler (the republish-metadata/daily cron deployment), cancellation cleanup,
# the foreman (worker status), the event persister and the event stream (the workers' wake-up and
# cancellation observer), the task run recorder, the repossessor, the database vacuum.
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
}


def prefect_cli() -> str:
    """The `prefect` executable of this Python environment."""
    return str(Path(sys.executable).with_name("prefect"))


class PrefectServer(ManagedProcess):
    """`prefect server start` on loopback. `api_url` is what clients put in PREFECT_API_URL.

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
        extra_env: dict[str, str] | None = None,
        auth_string: SecretStr | None = None,
    ) -> None:
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
        env.update(NODE_SERVER_SETTINGS)
        if auth_string is not None:
            env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string.get_secret_value()
        env.update(extra_env or {})
        super().__init__(
            "prefect-server",
            [prefect_cli(), "server", "start", "--host", host, "--port", str(self.port)],
            log_path=self.home / "server.log",
            env=env,
            ready=self.healthy,
        )

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
