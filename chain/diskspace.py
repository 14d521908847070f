"""Free space of the file systems a node writes to, and the alarm below a threshold.

Any process can watch the disks it depends on (the listener its dead letters, a worker its
results and ledger, an operator's extra paths: the Prefect database's, the broker's persistence):

    watch = DiskWatch(DiskSettings().paths_with(results_dir), DiskSettings().min_free_percent)
    for usage in watch.check():     # logs a warning when a file system goes low, once
        usage.path, usage.free_bytes, usage.free_percent, usage.low

`check()` logs a WARNING naming the path and its free space when a file system goes below the
threshold (and an INFO when it is back above), never more than once per change, so a log alert
fires days before the disk is full; callers turn the result into a metric and a health check
(`listener.observability`). A path that does not exist yet is measured at its nearest existing
parent (the file system it will be created on).

When the disk is full anyway, `retry_when_disk_full(call, path, reserve, timeout)` runs `call`
once `path`'s file system has `reserve` bytes free, and again after it failed for lack of space
(`out_of_space`: ENOSPC/EDQUOT, SQLite's "database or disk is full", or an I/O error while that
disk is full), logging the wait; after `timeout` seconds it raises `DiskFull` naming the path
(`flows.pipeline.Pipeline.when_disk_has_space`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
MIN_HEADROOM = 2**20  # after a write failed for lack of space: wait for 1 MiB more than then
T = TypeVar("T")


class DiskSettings(BaseSettings):
    """The free-space alarm: `WIS2_DISK_*` environment variables and `.env`."""

    model_config = SettingsConfigDict(env_prefix="WIS2_DISK_", env_file=".env", extra="ignore")

    min_free_percent: float = Field(
        default=10.0, ge=0, le=100,
        description="Free space (percent of the file system) below which a watched path is "
        "'low': a WARNING log line, the metric `..._disk_low` at 1 and a failing health check. "
        "10 %: days of warning on a disk sized from the soak figures "
        "(docs/operating/keeping-it-running.md)",
    )
    paths: list[Path] = Field(
        default_factory=list,
        description="More paths to watch besides each process's own (JSON list), e.g. the "
        "Prefect database's and the broker's persistence directories on this host",
    )

    def paths_with(self, *own: Path) -> list[Path]:
        """The process's own paths, then the configured ones (no repeats)."""
        seen: dict[str, Path] = {}
        for path in (*own, *self.paths):
            seen.setdefault(str(Path(path).expanduser()), Path(path).expanduser())
        return list(seen.values())


class DiskUsage(BaseModel):
    """One watched path's file system, measured now."""

    path: str
    free_bytes: int
    total_bytes: int
    free_percent: float
    low: bool


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest existing parent (where it would be created)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def measure(path: Path, min_free_percent: float) -> DiskUsage:
    """Free space of the file system holding `path` (space an unprivileged process may use)."""
    stat = os.statvfs(existing_parent(path))
    total = stat.f_blocks * stat.f_frsize
    free = stat.f_bavail * stat.f_frsize
    percent = 100.0 * free / total if total else 0.0
    return DiskUsage(path=str(path), free_bytes=free, total_bytes=total,
                     free_percent=round(percent, 3), low=percent < min_free_percent)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not other for other in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is 'no space left on device' / 'quota exceeded'."""
    for current in _chain(exc):
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        text = str(current).lower()
        if "no space left on device" in text or "database or disk is full" in text:
            return True
    return False


def is_io_error(exc: BaseException) -> bool:
    """Whether `exc` (or its cause) is an I/O error, as SQLite reports a WAL write that found
    no space ('disk I/O error', SQLITE_IOERR): a full disk when the disk is full."""
    return any((isinstance(current, OSError) and current.errno == errno.EIO)
               or "disk i/o error" in str(current).lower() for current in _chain(exc))


def out_of_space(exc: BaseException, path: Path, reserve_bytes: int) -> bool:
    """Whether `exc` is the disk holding `path` being full: 'no space left' said so, or an I/O
    error while that disk has no more than `reserve_bytes` (+ 1 MiB) free."""
    return is_disk_full(exc) or (
        is_io_error(exc) and measure(path, 0).free_bytes <= reserve_bytes + MIN_HEADROOM)


class DiskFull(OSError):
    """The file system holding `path` stayed full for longer than the run may wait."""

    def __init__(self, path: Path, waited: float) -> None:
        self.path = path
        super().__init__(errno.ENOSPC, f"no space left on the disk holding {path} "
                         f"(waited {waited:.0f} s for space; free it and re-run)")


def wait_for_space(path: Path, need_bytes: int, timeout: float, poll: float = 5.0,
                   sleep: Callable[[float], None] = time.sleep) -> float:
    """Return once the file system holding `path` has more than `need_bytes` free (at once if
    it has); meanwhile log a WARNING naming the path every minute. Returns the seconds waited;
    raises `DiskFull` after `timeout` seconds."""
    began = time.monotonic()
    last_log = -math.inf
    while True:
        free = measure(path, 0).free_bytes
        if free > need_bytes:
            return time.monotonic() - began
        waited = time.monotonic() - began
        if waited >= timeout:
            raise DiskFull(Path(path), waited)
        if waited - last_log >= 60:
            last_log = waited
            log.warning("disk full: %s has %d bytes free, %d needed: waiting for space "
                        "(at most %.0f s more)", path, free, need_bytes, timeout - waited,
                        extra={"path": str(path), "free_bytes": free})
        sleep(poll)


def retry_when_disk_full(call: Callable[[], T], path: Path, reserve_bytes: int, timeout: float,
                         poll: float = 5.0) -> T:
    """`call()`, once the disk holding `path` has more than `reserve_bytes` free; when it
    fails with 'no space left on device' (`is_disk_full`), wait for space and call it again
    (it must be safe to repeat: the chain's runs are, through their cache and the ledger), for
    `timeout` seconds in all, then `DiskFull`."""
    deadline = time.monotonic() + timeout
    need = reserve_bytes
    while True:
        wait_for_space(path, need, max(0.0, deadline - time.monotonic()), poll)
        try:
            return call()
        except Exception as exc:
            if not out_of_space(exc, path, reserve_bytes):
                raise
            log.error("no space left on the disk holding %s: %s; retrying once space is freed",
                      path, exc, extra={"path": str(path)})
            # more than what was free when it failed: no busy loop on a nearly full disk
            need = max(reserve_bytes, measure(path, 0).free_bytes) + MIN_HEADROOM


class DiskWatch:
    """The watched paths and their last state (to log a change once)."""

    def __init__(self, paths: Iterable[Path], min_free_percent: float) -> None:
        self.paths = [Path(p) for p in paths]
        self.min_free_percent = min_free_percent
        self._low: dict[str, bool] = {}
        self.last: list[DiskUsage] = []

    def check(self) -> list[DiskUsage]:
        """Measure every path; log when one goes low or recovers. A path that cannot be
        measured is logged and left out."""
        usages = []
        for path in self.paths:
            try:
                usage = measure(path, self.min_free_percent)
            except OSError as exc:
                log.warning("cannot measure free space", extra={"path": str(path),
                                                                "error": str(exc)})
                continue
            was_low = self._low.get(usage.path, False)
            if usage.low and not was_low:
                log.warning(
                    "disk space low: %s has %.1f%% free (%d MB), below %.1f%%", usage.path,
                    usage.free_percent, usage.free_bytes // 2**20, self.min_free_percent,
                    extra={"path": usage.path, "free_bytes": usage.free_bytes,
                           "free_percent": usage.free_percent})
            elif was_low and not usage.low:
                log.info("disk space back above the threshold: %s has %.1f%% free", usage.path,
                         usage.free_percent, extra={"path": usage.path,
                                                    "free_bytes": usage.free_bytes})
            self._low[usage.path] = usage.low
            usages.append(usage)
        self.last = usages
        return usages

    @property
    def low_paths(self) -> list[str]:
        return [u.path for u in self.last if u.low]
