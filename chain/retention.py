"""Retention of the cached task results: what the worker removes, and when.

The build and publish tasks keep their results (`flows.tasks.caching`) so that a retried or
re-run flow run finds the same notifications and does not publish twice. Once a flow run is
older than the Prefect server keeps runs (`PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD`,
14 days on this node), nothing can retry it; its results are needed no more: whether a file was
already announced, and under which id, is the publication ledger's to say (it is never swept),
and a replayed event gets the same notification id again (a UUID derived from the event).

- Results in files (`WIS2_RESULTS_DIR`): the result files (`wnm-build-*`, `wnm-published-*`,
  top level only) older than `WIS2_RESULTS_RETENTION_DAYS` are deleted. The ledger, its claims
  file and the copies of the metadata records in the same directory are not touched.
- Results in Redis (`WIS2_RESULTS_URL`): the result keys without an expiry get one of
  `WIS2_RESULTS_RETENTION_DAYS` (Redis stays `noeviction`: nothing vanishes before its time).

`Housekeeper` runs the sweep every `WIS2_HOUSEKEEPING_SECONDS` in the warm worker (each worker
host sweeps its own results directory; on Redis every host sets the same expiries, harmlessly).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from chain.diskspace import DiskSettings, DiskWatch
from chain.settings import ChainSettings

log = logging.getLogger(__name__)

RESULT_PREFIXES = ("wnm-build-", "wnm-published-")  # `flows.tasks.caching` cache keys
DAY = 86400.0


def sweep_result_files(directory: Path, max_age_seconds: float,
                       now: float | None = None) -> int:
    """Delete the result files of `directory` last written more than `max_age_seconds` ago;
    returns how many. Other files (ledger, claims, metadata records) are kept."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return 0
    cutoff = (time.time() if now is None else now) - max_age_seconds
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(RESULT_PREFIXES) or not entry.is_file(
                    follow_symlinks=False):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another host or process removed it
                continue
    return removed


def expire_redis_results(url: str, ttl_seconds: float) -> int:
    """Give every result key of the Redis at `url` without an expiry one of `ttl_seconds`;
    returns how many. (A key expires at most one sweep interval later than its age says.)"""
    import redis

    client = redis.Redis.from_url(url)
    try:
        expired = 0
        ttl = max(1, int(ttl_seconds))
        for prefix in RESULT_PREFIXES:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    expired += _expire_unset(client, batch, ttl)
                    batch = []
            expired += _expire_unset(client, batch, ttl)
        return expired
    finally:
        client.close()


def _expire_unset(client: object, keys: list[bytes], ttl: int) -> int:
    if not keys:
        return 0
    pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
    for key in keys:
        pipe.expire(key, ttl, nx=True)  # only keys with no expiry yet (Redis >= 7)
    return sum(1 for done in pipe.execute() if done)


def sweep_results(settings: ChainSettings, now: float | None = None) -> int:
    """One sweep of the results where `settings` put them (files or Redis)."""
    max_age = settings.results_retention_days * DAY
    if settings.results_url is not None:
        count = expire_redis_results(settings.results_url.get_secret_value(), max_age)
        if count:
            log.info("results retention: %d Redis result keys given an expiry of %.1f days",
                     count, settings.results_retention_days)
        return count
    count = sweep_result_files(settings.results_dir, max_age, now)
    if count:
        log.info("results retention: removed %d result files older than %.1f days from %s",
                 count, settings.results_retention_days, settings.results_dir)
    return count


class Housekeeper:
    """Every `settings.housekeeping_seconds`, in a running event loop: the results sweep, and
    the free space of the results directory's file system (`chain.diskspace`: a WARNING when
    it goes below WIS2_DISK_MIN_FREE_PERCENT)."""

    def __init__(self, settings: ChainSettings) -> None:
        self.settings = settings
        disk = DiskSettings()
        self.disk = DiskWatch(disk.paths_with(settings.results_dir), disk.min_free_percent)

    def once(self) -> int:
        self.disk.check()
        return sweep_results(self.settings)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.once)
            except Exception:  # a failed sweep is retried next time; never stops the worker
                log.exception("results retention sweep failed")
            await asyncio.sleep(self.settings.housekeeping_seconds)
