"""The cache of a cached task (`caching`), read and written by the batch tasks without a task run.

A `publish-batch` run builds and publishes many events in a few task runs (`flows.tasks.batch`),
yet each event's notifications and each notification's receipt must stay cached under the SAME key
as the single-event tasks use (`build_cache_key`, `publish_cache_key`), so that either path finds
what the other did. `CacheStore.of(task)` is Prefect's own `ResultStore` as the task engine sets it
up for that task (its result storage: the results directory, or Redis with WIS2_RESULTS_URL; its
serializer): a record written here is what a cache hit of that task reads, and the reverse.

No locks here, as for the single-event tasks (`caching`): the batch pipeline holds the ledger's
claim of its round's data_ids from the build to the record (`flows.batch_pipeline`), which
serializes a batch and any other run of the same files on every host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import Task
from prefect.context import get_run_context
from prefect.results import ResultStore, get_result_store

from wis2.notification import Notification

from .caching import publish_cache_key

__all__ = ["MISSING", "CacheStore", "acknowledged", "publish_key"]

MISSING: Any = object()  # `CacheStore.lookup`: nothing cached under the key


@dataclass
class CacheStore:
    """The result store of one cached task."""

    store: ResultStore

    @classmethod
    def of(cls, task: Task[Any, Any]) -> CacheStore:
        """The store the task engine uses for `task` (call inside a flow or task run)."""
        get_run_context()  # raises outside a run: the store would miss the run's settings
        return cls(store=get_result_store().update_for_task(task))

    def has(self, key: str) -> bool:
        return self.store.exists(key)

    def lookup(self, key: str) -> Any:
        """The cached value under `key`, else `MISSING`."""
        if not self.store.exists(key):
            return MISSING
        return self.store.read(key).result

    def save(self, key: str, value: Any) -> None:
        """Write `value` under `key` as a task run's commit does."""
        self.store.write(value, key=key)


def publish_key(note: Notification, topic: str) -> str:
    """The publish task's cache key of `note` on `topic` (`caching.publish_cache_key`)."""
    return publish_cache_key(None, {"notification": note, "topic": topic})


def acknowledged(publish: Task[Any, Any], topic: str) -> Callable[[Notification], bool]:
    """Whether the broker acknowledged a notification on `topic`: `publish`'s cache holds its
    receipt (written right after the PUBACK, by the single-event task or a batch)."""
    receipts = CacheStore.of(publish)
    return lambda note: receipts.has(publish_key(note, topic))
