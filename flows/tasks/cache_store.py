"""The cache of a cached task (`caching`), read and written by the batch tasks without a task run.

A `publish-batch` run builds and publishes many events in a few task runs (`flows.tasks.batch`),
yet each event's notifications and each notification's receipt must stay cached under the SAME key
as the single-event tasks use (`build_cache_key`, `publish_cache_key`), so that either path finds
what the other did. `CacheStore.of(task)` is Prefect's own `ResultStore` as the task engine sets it
up for that task (result storage, serializer, lock manager of its cache policy): a record written
here is what a cache hit of that task reads, and the reverse. `locked(key)` takes the key's lock as
a SERIALIZABLE task transaction does (so a batch and a single run of one event wait for each
other); the lock of a process killed while holding it expires (`ExpiringLockManager`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import Task
from prefect.context import get_run_context
from prefect.results import ResultStore, get_result_store

__all__ = ["MISSING", "CacheStore"]

MISSING: Any = object()  # `CacheStore.lookup`: nothing cached under the key


@dataclass
class CacheStore:
    """The result store of one cached task; one lock holder per store (one batch task run)."""

    store: ResultStore
    holder: str = field(default_factory=lambda: f"batch-{uuid.uuid4()}")

    @classmethod
    def of(cls, task: Task[Any, Any]) -> CacheStore:
        """The store the task engine uses for `task` (call inside a flow or task run)."""
        get_run_context()  # raises outside a run: the store would miss the run's settings
        store = get_result_store().update_for_task(task)
        if store.lock_manager is None:
            raise ValueError(f"task {task.name!r} has no lock manager in its cache policy")
        return cls(store=store)

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold the key's lock (waits for another holder, as a cached task run does)."""
        self.store.acquire_lock(key, holder=self.holder)
        try:
            yield
        finally:
            self.store.release_lock(key, holder=self.holder)

    def has(self, key: str) -> bool:
        return self.store.exists(key)

    def lookup(self, key: str) -> Any:
        """The cached value under `key`, else `MISSING`."""
        if not self.store.exists(key):
            return MISSING
        return self.store.read(key, holder=self.holder).result

    def save(self, key: str, value: Any) -> None:
        """Write `value` under `key` as a task run's commit does (hold the key's lock)."""
        self.store.write(value, key=key, holder=self.holder)
