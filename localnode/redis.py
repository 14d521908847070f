"""A Redis server of our own, as a child process: for the shared task results of a node with
several workers (tests, bench, `make demo` variants) and the Prefect server's Redis messaging.

`RedisServer(data_dir).start()` runs Debian's `redis-server` (installed by `make redis`) on a free
loopback port, protected mode on, its append-only file in `data_dir` (so a restarted server keeps
what it held); `url()` is what `WIS2_RESULTS_URL` takes; `stop()` a clean shutdown, `kill()` a
SIGKILL.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from chain.processes import ManagedProcess, free_port, port_is_open

log = logging.getLogger(__name__)


class RedisUnavailable(RuntimeError):
    """redis-server is not installed."""


def redis_server_path() -> Path:
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise RedisUnavailable(
        "Redis is not installed (no redis-server): run `make redis` (Debian redis-server)")


def redis_problem() -> str | None:
    """Why a Redis server of our own cannot be started here, or None."""
    try:
        redis_server_path()
    except RedisUnavailable as exc:
        return str(exc)
    return None


class RedisServer(ManagedProcess):
    """One redis-server on 127.0.0.1:<port>, its append-only file in `data_dir`."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None,
                 host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._made_dir: Path | None = None
        if data_dir is None:
            self._made_dir = Path(tempfile.mkdtemp(prefix="wis2-redis-"))
            data_dir = self._made_dir
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(redis_server_path()), "--port", str(self.port), "--bind", host,
            "--protected-mode", "yes", "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",  # results must never be evicted silently
            "--daemonize", "no", "--logfile", "",
        ]
        super().__init__("redis", argv, log_path or self.data_dir / "redis.log",
                         ready=self._ready)

    def _ready(self) -> bool:
        if not port_is_open(self.host, self.port):
            return False
        import redis

        try:
            return bool(redis.Redis(host=self.host, port=self.port, socket_timeout=2).ping())
        except redis.RedisError:  # loading its append-only file
            return False

    def start(self, timeout: float = 30.0) -> RedisServer:
        super().start(timeout)
        log.info("Redis on %s:%s, data in %s", self.host, self.port, self.data_dir)
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def cleanup(self) -> None:
        """Stop, and remove the data directory if this object made it."""
        self.stop()
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
