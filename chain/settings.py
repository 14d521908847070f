"""Settings of the chain's own processes (CLI, flows on a worker): env vars `WIS2_*` and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chain.mqtt import PublisherConnection
from wis2.dataset import DEFAULT_DATASETS_DIR


class ChainSettings(BaseSettings):
    """Configuration of the publishing chain (flows, CLI, block registration)."""

    model_config = SettingsConfigDict(
        env_prefix="WIS2_", env_file=".env", extra="ignore",
        env_nested_delimiter="_", env_nested_max_split=1,  # WIS2_MQTT_CA_CERTS -> mqtt.ca_certs
    )

    bundle_dir: Path | None = Field(
        default=None,
        description="Local copy of the WIS2 validator bundles (laid out like shared/wis2-bundle); "
        "unset: download them with the libraries' online syncs",
    )
    datasets_dir: Path = Field(
        default=DEFAULT_DATASETS_DIR, description="Dataset descriptions (<name>.json)"
    )
    default_dataset: str = Field(default="argo", description="Dataset used when none is named")
    verify_data: bool = Field(
        default=True,
        description="Download each canonical link and check length and integrity before "
        "publishing (streamed and hashed in constant memory, http/https only, stopped as soon "
        "as it exceeds the announced length)",
    )
    verify_timeout: float = Field(
        default=30.0, description="Seconds allowed for each network operation of that download "
        "(connect, each read)")
    verify_max_bytes: int = Field(
        default=2 * 1024**3, gt=0,
        description="Largest file the verification downloads (bytes, default 2 GiB): an "
        "announced length above it is refused without downloading, a download without length "
        "stops there",
    )
    verify_max_seconds: float = Field(
        default=900.0, gt=0,
        description="Longest time one file's download may take: then it is abandoned and "
        "retried, as a network error",
    )
    verify_concurrency: int = Field(
        default=8, ge=1,
        description="Files one flow run downloads and hashes at the same time to verify them (a "
        "batch's downloads run concurrently, at most this many; each streamed and hashed chunk "
        "by chunk); 1: one after another",
    )
    results_dir: Path = Field(
        default=Path.home() / ".wis2-chain" / "results",
        description="Where cached task results, the SQLite publication ledger and its claims "
        "file (claims.lock) are persisted (one worker host)",
    )
    results_retention_days: float = Field(
        default=14.0, gt=0,
        description="Days the cached task results are kept (files: deleted; Redis: expire). "
        "14, as long as the Prefect server keeps flow runs: a run that can still be retried "
        "finds its results; afterwards the publication ledger alone decides (chain/retention.py)",
    )
    housekeeping_seconds: float = Field(
        default=3600.0, gt=0,
        description="Seconds between two sweeps of the results by each warm worker",
    )
    disk_reserve_mb: float = Field(
        default=64.0, ge=0,
        description="Free space (MB) the results directory's file system must have before a "
        "run processes an event; below it, and after a write failed for lack of space, the run "
        "waits (a log line naming the disk every minute) instead of failing",
    )
    disk_full_wait_seconds: float = Field(
        default=86400.0, ge=0,
        description="Longest time a run waits for disk space, then fails naming the disk "
        "(its events then need a replay); a day: the free-space alarm (WIS2_DISK_*) warned "
        "long before",
    )
    ledger_url: str | None = Field(
        default=None,
        description="PostgreSQL database of the publication ledger shared by every worker host, "
        "e.g. postgresql://wis2@db:5432/wis2_ledger (no password in it: PGPASSWORD or ~/.pgpass); "
        "unset: an SQLite ledger in results_dir (one worker host)",
    )
    results_url: SecretStr | None = Field(
        default=None,
        description="Redis holding the build and publish task results shared by every worker "
        "host, e.g. redis://cache:6379/0; unset: files in results_dir (one worker host)",
    )
    ledger_retry_seconds: float = Field(
        default=120.0, ge=0,
        description="Seconds a ledger read, record or claim waits for the PostgreSQL of "
        "WIS2_LEDGER_URL when its connection is lost or refused (retried with backoff); then "
        "the run fails as unavailable and is scheduled again later (WIS2_RECOVERY_*)",
    )
    results_retry_seconds: float = Field(
        default=120.0, ge=0,
        description="Seconds a read or write of the task results waits for the Redis of "
        "WIS2_RESULTS_URL when it cannot be reached (retried with backoff); a read still "
        "impossible then is a cache miss (the ledger still stops a second announcement), a "
        "write fails the run as unavailable (scheduled again later)",
    )
    results_timeout: float = Field(
        default=10.0, gt=0,
        description="Seconds one Redis command of the task results may take (connect, answer) "
        "before it counts as unreachable and is retried",
    )
    wnm_kpi: bool = Field(default=False, description="Also run pywis-pubsub's KPI (needs network)")
    wcmp2_kpi: bool = Field(default=False, description="Also run pywcmp's KPI (needs network)")
    block_cache_seconds: float = Field(
        default=0.0, ge=0,
        description="Seconds a flow run's process keeps the broker and dataset blocks it read "
        "(blocks/loading.py; the warm worker runs every flow run in one process): a block "
        "edited since is seen by the runs after that delay; 0: read at each run",
    )
    # Retries of the flows' network tasks (verify data, publish): exponential backoff + jitter.
    publish_retries: int = Field(default=5, ge=0, description="Retries of verify/publish tasks")
    retry_base_delay: float = Field(
        default=2.0, ge=0, description="Seconds before the first retry; doubles on each retry"
    )
    retry_jitter_factor: float = Field(default=0.5, ge=0, description="Random extra delay factor")
    cache_lock_timeout: float | None = Field(
        default=300.0, gt=0,
        description="Seconds an event's run may wait for another run holding one of its data_ids "
        "(a killed holder releases its claim at once); unset: no limit")
    # Backfills (`backfill` flow, `wis2-chain backfill`): how fast and in which groups.
    backfill_rate: float = Field(
        default=20.0, ge=0,
        description="Most notifications per second a backfill sends (0: no limit); live events "
        "keep their latency beside it",
    )
    backfill_batch_size: int = Field(
        default=50, ge=1, description="Events per publish-batch run of a backfill")
    backfill_yield_seconds: float = Field(
        default=10.0, ge=0,
        description="Most seconds a backfill waits, before each of its batches, while runs of "
        "live events are due, pending or running (flows/live_priority.py; 0: never waits)")
    broker_block: str = Field(default="wis2-broker", description="Name of the MqttBroker block")
    # Discovery metadata (publish-metadata flow): where records are served from, if by this node.
    metadata_dir: Path | None = Field(
        default=None, description="Directory the published WCMP2 records are written to"
    )
    metadata_base_url: str | None = Field(
        default=None, description="Public URL of metadata_dir (records: <url>/<record-id>.json)"
    )

    # The broker the flows publish on when no `MqttBroker` block exists, and the defaults of the
    # block created by `wis2-chain blocks register`: WIS2_MQTT_HOST, WIS2_MQTT_PORT, ...
    mqtt: PublisherConnection = Field(default_factory=PublisherConnection)

    @field_validator("ledger_url")
    @classmethod
    def _ledger_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql://user@host:port/database URL")
        from psycopg.conninfo import conninfo_to_dict

        if "password" in conninfo_to_dict(value):
            raise ValueError("must not contain a password: set PGPASSWORD or ~/.pgpass (libpq) "
                             "on each worker host")
        return value

    @field_validator("results_url")
    @classmethod
    def _results_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://host:port/db URL")
        return value


@lru_cache
def get_settings() -> ChainSettings:
    return ChainSettings()
