"""Settings of the MQTT listener: environment variables `WIS2_LISTENER_*` and `.env`.

Lists (`subscriptions`, `routes`) are given as JSON, e.g.
``WIS2_LISTENER_ROUTES='[{"topic_filter": "diffusion/files/#",
"deployment": "publish-notification/default", "dataset": "argo"}]'`` (one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from paho.mqtt.client import topic_matches_sub
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chain.deployments import PUBLISH_BATCH, PUBLISH_NOTIFICATION
from chain.mqtt import MqttConnection


def _check_filter(value: str) -> str:
    """An MQTT topic filter (`+` and `#` wildcards), optionally `$share/<group>/<filter>`."""
    if not value or "\x00" in value:
        raise ValueError("a topic filter is a non-empty string without NUL characters")
    levels = value.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or any(c in levels[1] for c in "+#"):
            raise ValueError(f"{value!r}: a shared subscription is $share/<group>/<filter>")
        levels = levels[2:]
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{value!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"{value!r}: '+' must be a whole level")
    return value


def _check_deployment(value: str | None) -> str | None:
    if value is None:
        return value
    flow, _, name = value.partition("/")
    if not flow or not name:
        raise ValueError(f"deployment {value!r} must be '<flow name>/<deployment name>'")
    return value


def strip_share(topic_filter: str) -> str:
    """`$share/group/a/b` -> `a/b` (the filter messages are matched against)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class Route(BaseModel):
    """Events received on topics matching `topic_filter` start runs of `deployment` (flow/name);
    events that arrive together start one run of `batch_deployment` (None: never batched)."""

    topic_filter: str
    deployment: str = PUBLISH_NOTIFICATION
    batch_deployment: str | None = Field(
        default=PUBLISH_BATCH,
        description="Deployment of a flow taking `events` (a list) for bursts; None: no batching",
    )
    dataset: str | None = Field(default="argo", description="`dataset` parameter of the run")

    @field_validator("topic_filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        return _check_filter(value)

    @field_validator("deployment", "batch_deployment")
    @classmethod
    def _deployment(cls, value: str | None) -> str | None:
        return _check_deployment(value)

    def matches(self, topic: str) -> bool:
        return topic_matches_sub(strip_share(self.topic_filter), topic)


class ListenerSettings(BaseSettings, MqttConnection):
    """Configuration of `wis2-listener` (`python -m listener`). The broker connection fields
    (`host`, `port`, `tls`, `username`, `password`...) are `chain.mqtt.MqttConnection`'s."""

    model_config = SettingsConfigDict(
        env_prefix="WIS2_LISTENER_", env_file=".env", extra="ignore"
    )

    # ---- broker (MqttConnection's fields, with the listener's defaults) --------------------
    broker_host: str | None = Field(default=None, description="Alias of `host` (wins if set)")
    broker_port: int | None = Field(default=None, ge=1, le=65535, description="Alias of `port`")
    username: str | None = Field(default="listener", description="Account allowed to subscribe")
    keepalive: int = Field(default=30, ge=5, description="Seconds between keep-alive pings")
    client_id_prefix: str = Field(default="wis2-listener", description="MQTT client id prefix")
    client_id: str = Field(
        default="wis2-chain-listener",
        description="Fixed MQTT client id: the broker keeps this client's session and queues "
        "its messages while it is away. Two listeners must not share one id (use $share/).",
    )
    session_expiry: int = Field(
        default=3 * 24 * 3600, ge=0, description="Seconds the broker keeps the session (3 days)"
    )
    subscriptions: list[str] = Field(
        default_factory=lambda: ["diffusion/files/#"],
        description="Topic filters the listener subscribes to (JSON list; $share/<group>/... "
        "for replicas)",
    )
    retire: bool = Field(
        default=False,
        description="Drain and retire this client id: resume its session but UNSUBSCRIBE "
        "instead of subscribing (the broker gives it no new events, e.g. no more turns of a "
        "$share group) and create the runs of what the session still holds; stop it once "
        "/metrics shows nothing in flight and nothing more received",
    )
    reconnect_min_delay: int = Field(
        default=1, ge=1, description="Seconds before the first reconnection to the broker")
    reconnect_max_delay: int = Field(
        default=60, ge=1, description="Longest wait between reconnections (doubling from the min)")

    # ---- events -> flow runs --------------------------------------------------------------
    routes: list[Route] = Field(
        default_factory=lambda: [Route(topic_filter="diffusion/files/#")],
        description="First matching route wins; a topic no route matches is rejected",
    )
    max_payload_bytes: int = Field(
        default=1024 * 1024, ge=1,
        description="Larger messages are dead-lettered without being parsed")
    max_in_flight: int = Field(
        default=200, ge=1, le=65535,
        description="MQTT 5 Receive Maximum: unacknowledged messages the broker may send us "
        "(at least batch_max_size, or batches cannot fill; more keeps more events "
        "unacknowledged in the broker's database, which the node's durable broker writes out "
        "on every change)",
    )
    concurrency: int = Field(
        default=4, ge=1,
        description="Workers taking messages (each may hold a batch, or retry a missing "
        "deployment without holding the others)",
    )
    api_concurrency: int = Field(
        default=1, ge=1,
        description="Flow-run creations sent to the Prefect API at the same time. A SQLite "
        "server answers 503 to concurrent writes; while one is in flight the next batch fills",
    )
    batch_max_size: int = Field(
        default=200, ge=1,
        description="Most events in one batch run (1: no batching, one run per event)",
    )
    batch_runs_per_call: int = Field(
        default=1, ge=1, le=100,
        description="Batch runs created in one Prefect API call (`POST /deployments/{id}/"
        "create_flow_run/bulk`, each run with its own idempotency key): a worker that finds a "
        "burst collects up to batch_max_size x this many events, one run per batch_max_size "
        "of them; 1: one call per run",
    )
    batch_max_wait: float = Field(
        default=0.2, ge=0,
        description="Seconds a worker that found events queued, or took its event less than "
        "this after the one before (a stream), waits for more to fill a batch (an event on an "
        "idle listener never waits)",
    )
    batch_hold_waiting_runs: int = Field(
        default=0, ge=0,
        description="While at least this many of the listener's runs wait Scheduled (due, "
        "not yet taken by a worker: the chain is behind), a batch is held past "
        "batch_max_wait until it is full (batch_max_size), for at most batch_hold_max "
        "seconds: fewer, larger runs. 0 (the default): never held; the events held stay "
        "in the broker's database, which the node's durable broker writes out on every "
        "change (docs/concepts/batches.md)")
    batch_hold_max: float = Field(
        default=5.0, ge=0, description="Longest a batch is held for the above (s)")
    busy_retries: int = Field(
        default=3, ge=0, description="Quick retries of a call the API answered 503 (busy: on "
        "SQLite, a transaction that met another's write; the server asks to try again), before "
        "the back-off below")
    busy_retry_delay: float = Field(
        default=0.05, gt=0, description="Delay before the first quick retry (s), doubling")
    retry_min_delay: float = Field(default=1.0, gt=0, description="First API retry delay (s)")
    retry_max_delay: float = Field(default=60.0, gt=0, description="Longest API retry delay (s)")
    api_timeout: float = Field(default=30.0, gt=0, description="Timeout of one API call (s)")
    shutdown_timeout: float = Field(
        default=30.0, ge=0, description="Seconds given to in-flight creations on SIGTERM"
    )

    # ---- operations -----------------------------------------------------------------------
    deadletter_dir: Path = Field(
        default=Path.home() / ".wis2-chain" / "deadletters",
        description="Where rejected messages are kept, to read and replay")
    deadletter_retention_days: float = Field(
        default=30.0, gt=0,
        description="Days a dead letter is kept after it was last received, then deleted "
        "(logged). 30: longer than the flow runs (14), an operator has a month to see, fix "
        "and replay it",
    )
    housekeeping_seconds: float = Field(
        default=60.0, gt=0,
        description="Seconds between two checks of the free disk space (WIS2_DISK_*) and "
        "sweeps of the dead letters",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address of the /metrics and /healthz endpoint")
    metrics_port: int = Field(default=9464, ge=0, le=65535, description="0: no HTTP endpoint")
    log_format: Literal["logfmt", "json"] = Field(
        default="logfmt", description="Log lines as logfmt (key=value) or JSON")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    # Replaying dead letters publishes on the file server's topics: the listener account may
    # only read them, so `deadletters replay` logs in with these when set.
    replay_username: str | None = Field(
        default=None, description="Account `deadletters replay` publishes with (the file "
        "server's); unset: the listener's")
    replay_password: SecretStr | None = Field(
        default=None, description="Password of replay_username")

    @field_validator("subscriptions")
    @classmethod
    def _subscriptions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one subscription is needed")
        return [_check_filter(v) for v in value]

    @model_validator(mode="after")
    def _aliases_and_bounds(self) -> ListenerSettings:
        if self.broker_host:
            self.host = self.broker_host
        if self.broker_port:
            self.port = self.broker_port
        if self.retry_max_delay < self.retry_min_delay:
            raise ValueError("retry_max_delay must be >= retry_min_delay")
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay must be >= reconnect_min_delay")
        return self

    def connection(self, replay: bool = False) -> MqttConnection:
        """The broker connection; `replay`: with the replay account when one is set."""
        connection = super().connection()
        if replay and self.replay_username:
            connection = connection.model_copy(
                update={"username": self.replay_username, "password": self.replay_password})
        return connection

    def route_for(self, topic: str) -> Route | None:
        return next((r for r in self.routes if r.matches(topic)), None)
