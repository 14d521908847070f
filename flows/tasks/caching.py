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

Prefect's transactions take these locks with no hold timeout, so the lock of a holder that was
killed (SIGKILL, OOM) would never be released and the rerun of its event would wait forever.
`ExpiringLockManager` records who holds each lock (host, pid, process start time) and gives it a
hold timeout (`WIS2_CACHE_LOCK_TIMEOUT`): a lock expires as soon as its holder process is gone (same
host), or once the timeout has passed (any host, e.g. a results directory on shared storage).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pydantic_core
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.types._datetime import now

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


log = logging.getLogger(__name__)


@cache
def _host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc), None when unknown.

    With the pid it identifies one process: a pid reused by a later process has another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command name


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return started is None or _process_start(pid) in (None, started)


class ExpiringLockManager(FileSystemLockManager):
    """`FileSystemLockManager` whose locks expire when their holder dies (or after a timeout).

    Each lock file also names its holder process (`host`, `pid`, `started`). A lock is stale,
    and removed by whoever looks at it next, when its holder ran on this host and is no longer
    alive, or when its hold timeout has passed (`hold_timeout` argument, else `default_hold`)."""

    def __init__(self, lock_files_directory: Path, default_hold: float | None = None) -> None:
        super().__init__(lock_files_directory)
        self.default_hold = default_hold

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        self._ensure_lock_files_directory_exists()
        hold = self.default_hold if hold_timeout is None else hold_timeout
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                if not self.wait_for_lock(key, acquire_timeout):
                    return False
            lock_path = self._lock_path_for_key(key)
            try:
                fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self.is_lock_holder(key, holder):
                    return True
                continue  # another holder was faster: wait for it
            expiration = now("UTC") + timedelta(seconds=hold) if hold is not None else None
            info = {"holder": holder, "expiration": str(expiration) if expiration else None,
                    "host": _host(), "pid": os.getpid(), "started": _process_start(os.getpid())}
            with os.fdopen(fd, "wb") as lock_file:
                lock_file.write(pydantic_core.to_json(info))
            self._locks[key] = {"holder": holder, "expiration": expiration, "path": lock_path}
            return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Release; a lock that expired meanwhile (and maybe went to another holder) is left."""
        if self.is_lock_holder(key, holder):
            Path(self._lock_path_for_key(key)).unlink(missing_ok=True)
        else:
            log.warning("cache lock %s expired before its holder released it", key)
        self._locks.pop(key, None)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        try:
            info = self._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # a lock file being written right now: locked
            return True
        if info is None:
            return False
        pid = info.get("pid")  # type: ignore[misc]  # our extra fields
        if (isinstance(pid, int) and info.get("host") == _host()  # type: ignore[misc]
                and not _process_alive(pid, info.get("started"))):  # type: ignore[misc]
            log.warning("cache lock %s: its holder (pid %s) is gone; lock released", key, pid)
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        expiration = info.get("expiration")
        if expiration is not None and expiration < now("UTC"):
            log.warning("cache lock %s: held past its timeout; lock released", key)
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True


def lock_manager(settings: ChainSettings) -> ExpiringLockManager:
    return ExpiringLockManager(Path(settings.results_dir).expanduser() / "locks",
                               default_hold=settings.cache_lock_timeout)
