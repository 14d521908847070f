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
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


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


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is 'no space left on device' / 'quota exceeded'."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        text = str(current).lower()
        if "no space left on device" in text or "database or disk is full" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


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
