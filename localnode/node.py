"""The whole node on loopback, as `make demo` runs it: broker, Prefect server (with UI), work pool,
worker, blocks, deployments, listener and a small HTTP file server for the demo data.

`LocalNode.start()` brings everything up in order and `stop()` stops every process it started.
The Prefect server's database is, by default, a PostgreSQL cluster of the node's own
(`localnode/postgres.py`, Debian's `postgresql` programs, its data in a temporary directory removed
at `stop()`); `WIS2_DEMO_DATABASE=sqlite` puts it on SQLite in the run directory, and
`WIS2_DEMO_DATABASE_URL` on a database of your own.
The Prefect API and UI ask for a generated "user:password" auth string (Prefect's basic
authentication), given to the worker, the listener and every CLI call.
Its state (ports, the generated broker passwords and the Prefect auth string) is written to
`<run_dir>/node.json` (mode 0600) so that `make demo-event` can send another event to the running
node."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.launcher import BrokerConfig, RunningBroker, start_broker
from chain.deployments import PUBLISH_METADATA, PUBLISH_NOTIFICATION_FLOW
from chain.files import write_atomically
from chain.mqtt import MqttConnection, connect, publish_once
from chain.processes import ManagedProcess, port_is_open, rotate_log
from localnode.postgres import PostgresCluster
from localnode.prefect_server import PrefectServer, prefect_cli

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
WORK_POOL = "wis2-pool"
WORKER_TYPES = {"warm": "wis2-warm", "process": "process"}  # WIS2_DEMO_WORKER_TYPE -> pool type
DEMO_FILES_PORT = 8765  # the port written in data/demo-event.json's asset href


class NodeSettings(BaseSettings):
    """Ports and paths of the local node (`WIS2_DEMO_*`)."""

    model_config = SettingsConfigDict(env_prefix="WIS2_DEMO_", env_file=".env", extra="ignore")

    run_dir: Path = Field(default=REPO / "run" / "demo", description="State, logs, databases")
    host: str = Field(default="127.0.0.1", description="Address every service of the node binds")
    broker_port: int = Field(default=18830, description="MQTT port of the demo broker")
    broker_ws_port: int = Field(default=18081, description="MQTT over websockets port")
    prefect_port: int = Field(default=4200, description="Prefect server and UI")
    files_port: int = Field(default=DEMO_FILES_PORT, description="HTTP server of the demo data")
    metrics_port: int = Field(default=9464, description="Listener /healthz and /metrics")
    centre_id: str = Field(default="fr-ifremer-argo", description="WIS2 centre-id of the node")
    event: Path = Field(default=REPO / "data" / "demo-event.json",
                        description="Event the demo sends once the node is up")
    event_topic: str = Field(default="diffusion/files/coriolis/argo/csv",
                             description="Topic the demo event is sent on")
    metadata_record: Path = Field(default=REPO / "data" / "demo-metadata.json",
                                  description="WCMP2 record published before the data")
    verify_data: bool = Field(default=True, description="Flows download and check the data")
    timeout: float = Field(default=240.0, description="Seconds to wait for the notification")
    database: Literal["postgres", "sqlite"] = Field(
        default="postgres", description="Prefect server database when database_url is unset: "
        "a PostgreSQL cluster of the node's own, or SQLite in run_dir")
    database_url: str | None = Field(
        default=None, description="Prefect server database of your own (overrides database)")
    worker_type: Literal["warm", "process"] = Field(
        default="warm", description="wis2-warm worker (runs in its process) or Prefect's process")
    worker_limit: int = Field(default=8, ge=1, description="Flow runs at once (worker --limit)")
    prefect_auth_string: SecretStr | None = Field(
        default=None, description="'user:password' the Prefect API and UI ask for "
        "(default: admin and a generated password, in node.json)")
    log_max_bytes: int = Field(
        default=20 * 2**20, gt=0,
        description="Size at which a process's log file under run_dir is rotated (3 old "
        "copies kept: at most ~80 MB per process)")
    observability: bool = Field(
        default=False, description="Also serve the worker's /metrics (worker_metrics_port) and "
        "run the delivery monitor (delivery_metrics_port); `make demo` turns it on")
    worker_metrics_port: int = Field(default=9467, description="wis2-warm worker /metrics")
    delivery_metrics_port: int = Field(default=9466,
                                       description="Delivery monitor /healthz and /metrics")
    global_brokers: list[str] = Field(
        default_factory=list, description="Global Brokers the delivery monitor watches (URLs; "
        "none: it records what the node publishes)")


class NodeState(BaseModel):
    """What a second command needs to talk to the running node."""

    host: str
    broker_port: int
    prefect_api_url: str
    ui_url: str
    files_url: str
    passwords: dict[str, SecretStr]
    prefect_auth_string: SecretStr

    def prefect_settings(self) -> dict:
        """Prefect client settings for this node (`temporary_settings(updates=...)`)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        return {PREFECT_API_URL: self.prefect_api_url,
                PREFECT_API_AUTH_STRING: self.prefect_auth_string.get_secret_value()}

    def connection(self, role: str) -> MqttConnection:
        return MqttConnection(host=self.host, port=self.broker_port, username=role,
                              password=self.passwords[role], client_id_prefix=f"demo-{role}")

    def save(self, path: Path) -> None:
        data = self.model_dump(mode="json")
        data["passwords"] = {k: v.get_secret_value() for k, v in self.passwords.items()}
        data["prefect_auth_string"] = self.prefect_auth_string.get_secret_value()
        write_atomically(path, json.dumps(data, indent=2))  # mode 0600: it holds passwords

    @classmethod
    def load(cls, path: Path) -> NodeState:
        return cls.model_validate_json(path.read_text())


class PortTaken(RuntimeError):
    pass


class LocalNode:
    WORKER_CLIENT_MAX_RETRIES = "7"  # compose.yml too (measured: bench/RESULTS.md, fault phase)
    # also retried: a 500, what the Prefect server answers while its PostgreSQL refuses
    # connections (asyncpg's ConnectionRefusedError is not among the errors it answers 503 for;
    # docs/operating/outages.md); compose.yml too
    WORKER_CLIENT_RETRY_CODES = "500"
    CLIENT_CSRF_SUPPORT = "false"
    WORKER_QUERY_SECONDS = "1"  # the worker polls for new runs every second (compose.yml too)
    # Recovery (worker/recovery.py): a worker heartbeat every 10 s, so a dead worker's runs are
    # rescheduled ~30 s after it died; a fixed name, so a restarted worker reclaims its own at
    # once (compose.yml too).
    WORKER_HEARTBEAT_SECONDS = "10"
    # glibc's allocator in the warm worker: two arenas, not up to 8 per core for its task and
    # flow threads, each keeping freed memory of its own (the worker's RSS rose ~3 MB per
    # 10,000 events through the 100,000-event soak with glibc's default; bench/RESULTS.md).
    WORKER_MALLOC_ENV = {"MALLOC_ARENA_MAX": "2"}
    # The broker and dataset blocks kept 30 s by the flows in the warm worker's process
    # (blocks/loading.py): two API reads fewer per run; a block edited in the UI is used by the
    # runs that start 30 s later at most (compose.yml too).
    WORKER_BLOCK_CACHE_SECONDS = "30"
    WORKER_NAME = "wis2-local-worker"
    # Run creations the listener sends at once: PostgreSQL takes concurrent writes (compose.yml
    # too); SQLite serialises them, so the listener's default (1) stays.
    POSTGRES_LISTENER_API_CONCURRENCY = "4"

    def __init__(self, settings: NodeSettings | None = None,
                 server_env: Mapping[str, str | None] | None = None,
                 server_node_settings: bool = True) -> None:
        """`server_env`: more environment of the Prefect server (None: unset), over its node
        settings; `server_node_settings=False`: without them (`PrefectServer(node_settings=)`)."""
        self.settings = settings or NodeSettings()
        self.server_env = dict(server_env or {})
        self.server_node_settings = server_node_settings
        self.run_dir = self.settings.run_dir
        self.processes: list[ManagedProcess] = []
        self.broker: RunningBroker | None = None
        self.server: PrefectServer | None = None
        self.postgres: PostgresCluster | None = None  # the Prefect server's database cluster
        self._owns_postgres = False  # started by start(), removed by stop()
        self.passwords = {role: SecretStr(secrets.token_urlsafe(18))
                          for role in ("fileserver", "listener", "publisher", "monitor")}
        self.passwords["everyone"] = SecretStr("everyone")
        self.prefect_auth_string = self.settings.prefect_auth_string or SecretStr(
            f"admin:{secrets.token_urlsafe(18)}")

    # ---- addresses -------------------------------------------------------------------------
    @property
    def files_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.files_port}"

    @property
    def state(self) -> NodeState:
        assert self.server is not None
        return NodeState(host=self.settings.host, broker_port=self.settings.broker_port,
                         prefect_api_url=self.server.api_url, ui_url=self.server.url,
                         files_url=self.files_url, passwords=self.passwords,
                         prefect_auth_string=self.prefect_auth_string)

    def check_ports(self) -> None:
        s = self.settings
        wanted = {
            "WIS2_DEMO_BROKER_PORT": s.broker_port, "WIS2_DEMO_BROKER_WS_PORT": s.broker_ws_port,
            "WIS2_DEMO_PREFECT_PORT": s.prefect_port, "WIS2_DEMO_FILES_PORT": s.files_port,
            "WIS2_DEMO_METRICS_PORT": s.metrics_port,
        }
        if s.observability:
            wanted |= {"WIS2_DEMO_WORKER_METRICS_PORT": s.worker_metrics_port,
                       "WIS2_DEMO_DELIVERY_METRICS_PORT": s.delivery_metrics_port}
        taken = [f"{port} ({name})" for name, port in wanted.items() if port_is_open(s.host, port)]
        if taken:
            raise PortTaken(
                f"port(s) already in use on {s.host}: {', '.join(taken)}. Stop what uses them "
                "(an earlier `make demo`?) or choose other ports, e.g. "
                "`WIS2_DEMO_PREFECT_PORT=4300 make demo`."
            )

    def child_env(self) -> dict[str, str]:
        """Environment of every chain process: Prefect client, broker, paths."""
        assert self.server is not None
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
        env.update(self.server.client_env())
        env.update({
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_WORKER_QUERY_SECONDS": self.WORKER_QUERY_SECONDS,
            # The server has no CSRF protection: no GET /csrf-token (answered 422) per new client,
            # i.e. per flow run on the worker (compose.yml too).
            "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": self.CLIENT_CSRF_SUPPORT,
            "WIS2_MQTT_HOST": s.host,
            "WIS2_MQTT_PORT": str(s.broker_port),
            "WIS2_MQTT_USERNAME": "publisher",
            "WIS2_MQTT_PASSWORD": self.passwords["publisher"].get_secret_value(),
            "WIS2_RESULTS_DIR": str(self.run_dir / "results"),
            "WIS2_VERIFY_DATA": "true" if s.verify_data else "false",
            "WIS2_METADATA_DIR": str(self.run_dir / "www" / "metadata"),
            "WIS2_METADATA_BASE_URL": f"{self.files_url}/metadata",
            "WIS2_PROJECT_DIR": str(REPO),
        })
        if os.environ.get("WIS2_BUNDLE_DIR"):
            env["WIS2_BUNDLE_DIR"] = os.environ["WIS2_BUNDLE_DIR"]
        return env

    def listener_env(self) -> dict[str, str]:
        s = self.settings
        env = self.child_env()
        env.update({
            "WIS2_LISTENER_HOST": s.host,
            "WIS2_LISTENER_PORT": str(s.broker_port),
            "WIS2_LISTENER_USERNAME": "listener",
            "WIS2_LISTENER_PASSWORD": self.passwords["listener"].get_secret_value(),
            "WIS2_LISTENER_CLIENT_ID": "wis2-chain-demo-listener",
            "WIS2_LISTENER_DEADLETTER_DIR": str(self.run_dir / "deadletters"),
            "WIS2_LISTENER_METRICS_PORT": str(s.metrics_port),
            # the free-space alarm also watches the worker's results and ledger, the broker's
            # persistence and the Prefect database's cluster (one host: chain/diskspace.py)
            "WIS2_DISK_PATHS": json.dumps([str(path) for path in self.watched_disks()]),
        })
        if self.database_url.startswith("postgresql"):
            env["WIS2_LISTENER_API_CONCURRENCY"] = self.POSTGRES_LISTENER_API_CONCURRENCY
        return env

    def watched_disks(self) -> list[Path]:
        """What the listener's free-space alarm watches besides its dead letters: the results
        and ledger, the broker's persistence directory and, when the node runs it, the data
        directory of the Prefect database's PostgreSQL cluster (a database elsewhere is
        watched on its own host)."""
        paths = [self.run_dir / "results", self.run_dir / "broker" / "data"]
        if self.postgres is not None:
            paths.append(self.postgres.pgdata)
        return paths

    @property
    def database_url(self) -> str:
        """The Prefect server's database (known once start() has begun)."""
        assert self.server is not None
        return self.server.database_url

    def _start_database(self) -> str | None:
        """The PostgreSQL cluster of the node's own, unless a database was given or SQLite asked
        for; returns the URL for the Prefect server (None: its SQLite default)."""
        s = self.settings
        if s.database_url is not None or s.database == "sqlite":
            return s.database_url
        log.info("starting PostgreSQL for the Prefect server (WIS2_DEMO_DATABASE=sqlite: SQLite)")
        self.postgres = PostgresCluster(log_path=self.run_dir / "logs" / "postgres.log")
        self._owns_postgres = True
        self.postgres.start()
        return self.postgres.create_database("prefect")

    # ---- start / stop ----------------------------------------------------------------------
    def _run(self, argv: list[str], env: dict[str, str], what: str) -> None:
        log.info("%s: %s", what, " ".join(argv))
        done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], ready=None,
               timeout: float = 60.0, cwd: Path = REPO) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.run_dir / "logs" / f"{name}.log", env=env,
                              cwd=cwd, ready=ready)
        self.processes.append(proc)
        proc.start(timeout)
        return proc

    def start(self) -> NodeState:
        s = self.settings
        self.check_ports()
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        (self.run_dir / "www" / "metadata").mkdir(parents=True)
        self.run_dir.chmod(0o700)  # secrets (node.json, the Prefect database, broker files)
        (self.run_dir / "www" / "argo").symlink_to(REPO / "data" / "files" / "argo")
        py = sys.executable

        log.info("starting the broker on %s:%s", s.host, s.broker_port)
        config = BrokerConfig(
            _env_file=None, host=s.host, mqtt_port=s.broker_port, ws_port=s.broker_ws_port,
            centre_id=s.centre_id, run_dir=self.run_dir / "broker",
            **{f"{role}_password": pw for role, pw in self.passwords.items()},
        )
        self.broker = start_broker(config, self.run_dir / "broker")

        log.info("starting the Prefect server (UI) on port %s", s.prefect_port)
        self.server = self.make_server()
        self.processes.append(self.server)
        self.server.start(timeout=180)
        env = self.child_env()

        self._spawn("files", [py, "-m", "http.server", str(s.files_port), "--bind", s.host,
                              "--directory", str(self.run_dir / "www")], env,
                    ready=lambda: port_is_open(s.host, s.files_port))
        prefect = prefect_cli()
        worker_type = WORKER_TYPES[s.worker_type]
        self._run([prefect, "work-pool", "create", WORK_POOL, "--type", worker_type,
                   "--overwrite"], env, "create work pool")
        self._run([str(Path(py).with_name("wis2-chain")), "blocks", "register"], env,
                  "register blocks")
        self._run([prefect, "--no-prompt", "deploy", "--all"], env, "deploy")
        self.start_workers(env, worker_type)
        if worker_type == "process":  # wis2-warm reschedules stranded runs itself
            self._spawn("recover", [str(Path(py).with_name("wis2-chain")), "recover", "--pool",
                                    WORK_POOL, "--watch"], env)
        self.start_listeners()
        if s.observability:
            self.start_delivery_monitor()
        state = self.state
        state.save(self.run_dir / "node.json")
        return state

    def make_server(self) -> PrefectServer:
        s = self.settings
        return PrefectServer(self.run_dir / "prefect", port=s.prefect_port, host=s.host, ui=True,
                             database_url=self._start_database(),
                             auth_string=self.prefect_auth_string, extra_env=self.server_env,
                             node_settings=self.server_node_settings)

    def worker_env(self, env: dict[str, str]) -> dict[str, str]:
        metrics = ({"WIS2_WORKER_METRICS_PORT": str(self.settings.worker_metrics_port)}
                   if self.settings.observability else {})
        return {**env, "PREFECT_WORKER_HEARTBEAT_SECONDS": self.WORKER_HEARTBEAT_SECONDS,
                # ~4 minutes of API retries: a run rides out a Prefect server restart
                "PREFECT_CLIENT_MAX_RETRIES": self.WORKER_CLIENT_MAX_RETRIES,
                "PREFECT_CLIENT_RETRY_EXTRA_CODES": self.WORKER_CLIENT_RETRY_CODES,
                "WIS2_BLOCK_CACHE_SECONDS": self.WORKER_BLOCK_CACHE_SECONDS,
                **self.WORKER_MALLOC_ENV, **metrics}

    def start_delivery_monitor(self) -> None:
        """The delivery monitor (`delivery/`): the node's broker as publisher, the results
        directory of the worker (the report flows read the same records)."""
        s = self.settings
        env = {**self.child_env(), "WIS2_DELIVERY_CENTRE_ID": s.centre_id,
               "WIS2_DELIVERY_GLOBAL_BROKERS": json.dumps(s.global_brokers),
               "WIS2_DELIVERY_METRICS_HOST": s.host,
               "WIS2_DELIVERY_METRICS_PORT": str(s.delivery_metrics_port),
               "WIS2_DELIVERY_CLIENT_ID": "wis2-chain-demo-delivery"}
        self._spawn("delivery-monitor", [sys.executable, "-m", "delivery"], env,
                    ready=lambda: port_is_open(s.host, s.delivery_metrics_port), timeout=90)

    def worker_argv(self, worker_type: str, name: str) -> list[str]:
        return [prefect_cli(), "worker", "start", "--pool", WORK_POOL, "--type", worker_type,
                "--limit", str(self.settings.worker_limit), "--name", name]

    def start_workers(self, env: dict[str, str], worker_type: str) -> None:
        self._spawn("worker", self.worker_argv(worker_type, self.WORKER_NAME),
                    self.worker_env(env))

    def start_listeners(self) -> None:
        s = self.settings
        self._spawn("listener", [sys.executable, "-m", "listener"], self.listener_env(),
                    ready=lambda: port_is_open(s.host, s.metrics_port), timeout=90)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.postgres is not None and self._owns_postgres:
            self.postgres.cleanup()
            self.postgres, self._owns_postgres = None, False

    def keep_database_running(self) -> bool:
        """Start the node's own PostgreSQL cluster again if it stopped, as `compose.yml`'s
        restart policy does (on a full disk a checkpoint PANICs PostgreSQL, and its recovery may
        end in "shutting down due to startup process failure"); True when it runs. While it
        cannot start (the disk still full) it logs why, and the next call tries again. `make
        demo` calls it every minute."""
        if self.postgres is None or not self._owns_postgres or self.postgres.running:
            return True
        log.warning("the Prefect database's PostgreSQL stopped (its log: %s): starting it again",
                    self.postgres.log_path)
        try:
            self.postgres.kill()  # what may be left of it
            self.postgres.start()
        except Exception as exc:
            log.error("PostgreSQL did not start again (is the disk holding %s full?): %s",
                      self.postgres.pgdata, str(exc).strip().splitlines()[-1:])
            return False
        return True

    def rotate_logs(self) -> int:
        """Rotate the log files under run_dir over `log_max_bytes` (`chain.processes.rotate_log`);
        returns how many were rotated."""
        return sum(rotate_log(path, self.settings.log_max_bytes)
                   for path in sorted(self.run_dir.rglob("*.log")) if path.is_file())

    # ---- using it --------------------------------------------------------------------------
    def event_payload(self, path: Path) -> bytes:
        """The event, with the demo file server's address if its port was changed."""
        text = path.read_text(encoding="utf-8")
        return text.replace(f"127.0.0.1:{DEMO_FILES_PORT}",
                            f"{self.settings.host}:{self.settings.files_port}").encode()

    def send_and_wait(self, event: Path, topic: str, timeout: float) -> dict[str, Any]:
        """Publish `event` as the file server and return the first data notification received
        on the origin topics (subscribed as `everyone`, like a Global Broker)."""
        received: list[dict[str, Any]] = []
        got = threading.Event()
        state = self.state

        def on_message(client, userdata, message):
            if "/data/" in message.topic:
                received.append({"topic": message.topic, "message": json.loads(message.payload)})
                got.set()

        subscriber = connect(state.connection("everyone"))
        subscriber.on_message = on_message
        subscriber.subscribe(f"origin/a/wis2/{self.settings.centre_id}/#", qos=1)
        try:
            time.sleep(0.5)
            publish_once(state.connection("fileserver"), topic, self.event_payload(event))
            if not got.wait(timeout):
                raise TimeoutError(
                    f"no notification within {timeout:.0f}s; see the logs in "
                    f"{self.run_dir / 'logs'} and the runs at {state.ui_url}"
                )
        finally:
            subscriber.disconnect()
            subscriber.loop_stop()
        return received[0]

    def publish_metadata(self, record: Path) -> None:
        """Run the publish-metadata deployment for `record` and wait for it (metadata first)."""
        params = json.dumps({"record_location": str(record.resolve()), "operation": "create"})
        self._run([prefect_cli(), "deployment", "run", PUBLISH_METADATA,
                   "--params", params, "--watch", "--watch-timeout", "180"],
                  self.child_env(), "publish metadata")

    def latest_flow_run_url(self, flow_name: str = PUBLISH_NOTIFICATION_FLOW) -> str | None:
        import asyncio

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.settings import temporary_settings

        async def latest() -> str | None:
            async with get_client() as client:
                runs = await client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                    sort=FlowRunSort.START_TIME_DESC, limit=1)
                return str(runs[0].id) if runs else None

        assert self.server is not None
        with temporary_settings(updates=self.server.client_settings()):
            run_id = asyncio.run(latest())
        return f"{self.server.url}/runs/flow-run/{run_id}" if run_id else None
