"""The cache of a cached task (`caching`), read and written by the batch tasks without a task run.

A `publish-batch` run builds and publishes many events in a few task runs (`flows.tasks.batch`),
yet each event's notifications and each notification's receipt must stay cached under the SAME key
as the single-event tasks use (`build_cache_key`, `publish_cache_key`), so that either path finds
what the other did. `CacheStore.of(task)` is Prefect's own `ResultStore` as the task engine sets it
up for that task (its result storage: the results directory, or Redis with WIS2_RESULTS_URL; its
serializer): a record written here is what a cache hit of that task reads, and the reverse. On the
results directory it reaches the files through `ResultsDirectory`, which forms the same paths
without a `realpath` per access (Prefect's took a tenth of the worker's CPU in a burst).

No locks here, as for the single-event tasks (`caching`): the batch pipeline holds the ledger's
claim of its round's data_ids from the build to the record (`flows.batch_pipeline`), which
serializes a batch and any other run of the same files on every host.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.context import get_run_context
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore, get_result_store

from wis2.notification import Notification

from .caching import publish_cache_key

__all__ = ["MISSING", "CacheStore", "ResultsDirectory", "acknowledged", "path_in_base",
           "publish_key", "resolve_as_text"]

MISSING: Any = object()  # `CacheStore.lookup`: nothing cached under the key


@dataclass
class CacheStore:
    """The result store of one cached task."""

    store: ResultStore

    @classmethod
    def of(cls, task: Task[Any, Any]) -> CacheStore:
        """The store the task engine uses for `task` (call inside a flow or task run)."""
        get_run_context()  # raises outside a run: the store would miss the run's settings
        store = get_result_store().update_for_task(task)
        if type(store.result_storage) is LocalFileSystem:  # the results directory
            store = store.model_copy(update={"result_storage": ResultsDirectory(
                basepath=store.result_storage.basepath)})
        return cls(store=store)

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


class ResultsDirectory(LocalFileSystem):
    """Prefect's local file storage of the results directory, its paths formed without asking
    the file system each time.

    Prefect's `LocalFileSystem._resolve_path` resolves its base path and the key (two
    `realpath`s, a `stat` per path component) on every read and write, and `ResultStore.write`
    calls it four times. Here the base path is resolved once per process; a key is joined to it and
    normalised as text, and refused, as Prefect refuses it, when that leaves the base path. The
    paths, records and their `storage_key`s are Prefect's (symbolic links inside the results
    directory are not followed: the chain makes none). Never saved as a block: it only stands
    in for the task's own storage inside `CacheStore` (a task takes a saved block or a path).
    """

    _block_type_name = "WIS2 Results Directory"
    _block_type_slug = "wis2-results-directory"
    def _resolve_path(self, path: str) -> Path:
        return resolve_as_text(self, path)


_BASES: dict[str, Path] = {}  # a LocalFileSystem's basepath: its realpath, resolved once


def resolve_as_text(storage: LocalFileSystem, path: str | None) -> Path:
    """Prefect's `LocalFileSystem._resolve_path` of `storage` without the file system: its base
    path resolved once per process, `path` joined to it as text (`path_in_base`). The warm
    worker makes it every `LocalFileSystem`'s (`worker.engine.results_paths_as_text`)."""
    key = storage.basepath or "."
    base = _BASES.get(key)
    if base is None:
        base = _BASES[key] = Path(key).expanduser().resolve()
    return path_in_base(base, path)


def path_in_base(base: Path, path: str | None) -> Path:
    """`path` (relative to `base`, a resolved directory, or absolute) joined and normalised as
    text, as Prefect's `LocalFileSystem._resolve_path` forms it without the `realpath`s;
    refused, as Prefect refuses it, when it leaves `base`."""
    if path is None:
        return base
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = base / resolved
    resolved = Path(os.path.normpath(resolved))
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"Provided path {resolved} is outside of the base path {base}.")
    return resolved


def publish_key(note: Notification, topic: str) -> str:
    """The publish task's cache key of `note` on `topic` (`caching.publish_cache_key`)."""
    return publish_cache_key(None, {"notification": note, "topic": topic})


def acknowledged(publish: Task[Any, Any], topic: str) -> Callable[[Notification], bool]:
    """Whether the broker acknowledged a notification on `topic`: `publish`'s cache holds its
    receipt (written right after the PUBACK, by the single-event task or a batch)."""
    receipts = CacheStore.of(publish)
    return lambda note: receipts.has(publish_key(note, topic))
