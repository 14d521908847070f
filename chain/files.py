"""Files the chain writes: atomic replacement and an exclusive lock, one implementation each.

`write_atomically` writes a temporary file beside the target, syncs it and renames it over the
target (then syncs the directory): a reader sees the old or the new file, never a torn one, and a
crash leaves no partial file. `atomic_path` is the same for a file another program writes
(`mosquitto_passwd`). `exclusive_lock` serialises read-modify-write cycles between processes of one
host (`fcntl.flock` on a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRIVATE = 0o600  # secrets, ledgers, dead letters: the owner only
PUBLIC = 0o644  # files a web server serves


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = PRIVATE) -> Iterator[Path]:
    """A temporary path beside `path`; on success it replaces `path` with `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, mode)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def write_atomically(path: Path, data: bytes | str, mode: int = PRIVATE) -> None:
    """Replace `path` with `data` (text is written as UTF-8), durably."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode) as tmp, tmp.open("wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (created if missing) for the block's duration."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
