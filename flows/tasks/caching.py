"""Cache keys and result storage of the publishing tasks.

Idempotency rests on Prefect's cache, keyed by

- the build: ``wnm-build-<sha256(event identity, dataset name)>`` -- the event identity covers its
  source, id and asset checksums, so a retried run, a re-run from the UI or a redelivered event
  gets the SAME notifications (same ``id``, same ``pubtime``), while a changed file gets new ones
  (and a cached build that the ledger now contradicts, never announced, is built again and
  cached instead: `build.current_build`);
- the publication: ``wnm-published-<notification id>`` -- a notification already acknowledged by
  the broker is never sent again.

Where the results live (`result_storage`): ``WIS2_RESULTS_URL=redis://host:port/db`` puts them in
Redis, Prefect's own `RedisStorageContainer` block, shared by every worker host (a run rescheduled
on another host finds the results of the first); unset, files in ``WIS2_RESULTS_DIR`` (one host).

Prefect takes a result storage block only once saved on the server: the Redis one is saved as
``wis2-results-redis/wis2-results-<hash of the URL>`` (once per process; the URL is a secret
field of the block). It is Prefect's `RedisStorageContainer` that waits for Redis: a command
that cannot connect or gets no answer within ``WIS2_RESULTS_TIMEOUT`` is tried again with
backoff for up to ``WIS2_RESULTS_RETRY_SECONDS`` (`chain.failures.ride_out`): a Redis restarting
or unreachable for a while delays the runs, it does not fail their events. Past that, a write
fails the task (the run is scheduled again later), a read is a cache miss for Prefect (its
`ResultStore.exists` reads any error as "not cached"): the notification is built again with
the same id, and the ledger stops it from being announced twice.

No transaction locks (Prefect's lock managers): the pipeline holds the ledger's claim of the
event's data_ids from the build to the ledger record (`flows.pipeline.Pipeline.claimed`), so two
runs of one event, or of two events for one file, never build or publish at the same time on any
host. That claim is released the moment its holder dies (kernel flock, PostgreSQL session), while
a lock with a hold timeout (`prefect_redis.RedisLockManager`) would keep the rerun of a SIGKILLed
run waiting for the whole timeout; a second lock around the same critical section would add a
Redis round trip per task and a second way to wait, for nothing.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.redis import RedisStorageContainer
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import WritableFileSystem
from pydantic import Field, SecretStr

from chain.failures import ride_out
from chain.settings import ChainSettings


def build_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Event identity (source + id + asset checksums), operation and dataset name."""
    event = parameters["event"]
    dataset = parameters["dataset"]
    text = f"{event.identity_key()}\n{event.operation}\n{dataset.name}"
    return "wnm-build-" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def publish_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """One publication per notification id (and topic)."""
    notification = parameters["notification"]
    text = f"{notification.id}\n{parameters['topic']}"
    return "wnm-published-" + hashlib.sha256(text.encode("utf-8")).hexdigest()


BUILD_CACHE = CacheKeyFnPolicy(cache_key_fn=build_cache_key)
PUBLISH_CACHE = CacheKeyFnPolicy(cache_key_fn=publish_cache_key)


class ResultsRedis(RedisStorageContainer):
    """Prefect's Redis result storage, riding out a Redis that restarts or does not answer:
    each read and write retried on connection errors and timeouts for `retry_seconds`."""

    _block_type_name = "WIS2 Results Redis"
    _block_type_slug = "wis2-results-redis"

    retry_seconds: float = Field(
        default=120.0, ge=0, description="Seconds a read or write waits for an unreachable Redis")
    timeout: float = Field(
        default=10.0, gt=0, description="Seconds one command may take to connect and answer")

    def _command(self, name: str, *args: Any) -> Any:
        import redis

        assert self.connection_string is not None

        def once() -> Any:
            client = redis.Redis.from_url(self.connection_string.get_secret_value(),
                                          socket_timeout=self.timeout,
                                          socket_connect_timeout=self.timeout)
            try:
                return getattr(client, name)(*args)
            finally:
                client.close()

        return ride_out(once, seconds=self.retry_seconds, what="task results' Redis "
                        "(WIS2_RESULTS_URL)")

    async def aread_path(self, path: Path | str) -> bytes | None:
        return await anyio.to_thread.run_sync(self._command, "get", str(path))

    @async_dispatch(aread_path)
    def read_path(self, path: Path | str) -> bytes | None:
        return self._command("get", str(path))

    async def awrite_path(self, path: Path | str, content: bytes) -> bool:
        return await anyio.to_thread.run_sync(self._command, "set", str(path), content)

    @async_dispatch(awrite_path)
    def write_path(self, path: Path | str, content: bytes) -> bool:
        return self._command("set", str(path), content)


def result_storage(settings: ChainSettings) -> Path | WritableFileSystem:
    """Redis (WIS2_RESULTS_URL), else the results directory (Prefect reads a `Path` as an
    unsaved LocalFileSystem storage)."""
    if settings.results_url is not None:
        return redis_storage(settings.results_url.get_secret_value(),
                             settings.results_retry_seconds, settings.results_timeout)
    results = Path(settings.results_dir).expanduser().resolve()
    results.mkdir(parents=True, exist_ok=True)
    return results


_SAVING = threading.Lock()


def redis_storage(url: str, retry_seconds: float = 120.0, timeout: float = 10.0) -> ResultsRedis:
    """The Redis result storage for `url`, saved as a block (Prefect requires it)."""
    with _SAVING:  # the concurrent flow runs of a warm worker: one saves, the others reuse it
        return _saved_redis_storage(url, retry_seconds, timeout)


@lru_cache(maxsize=4)
def _saved_redis_storage(url: str, retry_seconds: float, timeout: float) -> ResultsRedis:
    block = ResultsRedis(connection_string=SecretStr(url), retry_seconds=retry_seconds,
                         timeout=timeout)
    name = "wis2-results-" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    for attempt in (1, 2, 3):
        try:
            block.save(name, overwrite=True)
            return block
        except ObjectAlreadyExists:  # another host registered the block (type) at the same time
            if attempt == 3:
                raise
    raise AssertionError("unreachable")
