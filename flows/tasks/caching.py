"""Cache keys and result storage of the publishing tasks.

Idempotency rests on Prefect's cache, keyed by

- the build: ``wnm-build-<sha256(event identity, dataset name)>`` -- the event identity covers its
  source, id and asset checksums, so a retried run, a re-run from the UI or a redelivered event
  gets the SAME notifications (same ``id``, same ``pubtime``), while a changed file gets new ones;
- the publication: ``wnm-published-<notification id>`` -- a notification already acknowledged by
  the broker is never sent again.

Where the results live (`result_storage`): ``WIS2_RESULTS_URL=redis://host:port/db`` puts them in
Redis, Prefect's own `RedisStorageContainer` block, shared by every worker host (a run rescheduled
on another host finds the results of the first); unset, files in ``WIS2_RESULTS_DIR`` (one host).

Prefect takes a result storage block only once saved on the server: the Redis one is saved as
``redis-storage-container/wis2-results-<hash of the URL>`` (once per process; the URL is a secret
field of the block).

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

from prefect.blocks.redis import RedisStorageContainer
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import WritableFileSystem
from pydantic import SecretStr

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


def result_storage(settings: ChainSettings) -> Path | WritableFileSystem:
    """Redis (WIS2_RESULTS_URL), else the results directory (Prefect reads a `Path` as an
    unsaved LocalFileSystem storage)."""
    if settings.results_url is not None:
        return redis_storage(settings.results_url.get_secret_value())
    results = Path(settings.results_dir).expanduser().resolve()
    results.mkdir(parents=True, exist_ok=True)
    return results


_SAVING = threading.Lock()


def redis_storage(url: str) -> RedisStorageContainer:
    """Prefect's Redis result storage for `url`, saved as a block (Prefect requires it)."""
    with _SAVING:  # the concurrent flow runs of a warm worker: one saves, the others reuse it
        return _saved_redis_storage(url)


@lru_cache(maxsize=4)
def _saved_redis_storage(url: str) -> RedisStorageContainer:
    block = RedisStorageContainer(connection_string=SecretStr(url))
    name = "wis2-results-" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    for attempt in (1, 2, 3):
        try:
            block.save(name, overwrite=True)
            return block
        except ObjectAlreadyExists:  # another host registered the block (type) at the same time
            if attempt == 3:
                raise
    raise AssertionError("unreachable")
