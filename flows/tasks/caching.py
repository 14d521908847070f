"""Cache keys, result storage and retry settings of the publishing tasks.

Idempotency rests on Prefect's cache: results are persisted under ``ChainSettings.results_dir``
(a local directory), keyed by

- the build: ``wnm-build-<sha256(event identity, dataset name)>`` -- the event identity covers its
  source, id and asset checksums, so a retried run, a re-run from the UI or a redelivered event
  gets the SAME notifications (same ``id``, same ``pubtime``), while a changed file gets new ones;
- the publication: ``wnm-published-<notification id>`` -- a notification already acknowledged by
  the broker is never sent again.

Both use SERIALIZABLE isolation with file locks under ``<results_dir>/locks``: two concurrent runs
for one event wait for each other instead of building two different notifications.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy
from prefect.locking.filesystem import FileSystemLockManager

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


def result_storage(settings: ChainSettings) -> Path:
    """The results directory (Prefect reads a `Path` as an unsaved LocalFileSystem storage)."""
    results = Path(settings.results_dir).expanduser().resolve()
    results.mkdir(parents=True, exist_ok=True)
    return results


def lock_manager(settings: ChainSettings) -> FileSystemLockManager:
    return FileSystemLockManager(Path(settings.results_dir).expanduser() / "locks")
