"""A PostgreSQL cluster of our own, as a child process: for the Prefect server of the tests, the
benchmark and the local node (`make demo`, unless `WIS2_DEMO_DATABASE=sqlite`).

`PostgresCluster(data_dir).start()` runs `initdb` (once: the same directory keeps its databases
across restarts) and `postgres` on a free loopback port, with trust authentication for loopback
only; `create_database()` / `url()` give the database a Prefect server connects to
(`postgresql+asyncpg://...`); `stop()` is a fast shutdown, `kill()` a SIGKILL of the whole cluster.

It uses Debian's `postgresql` package (`initdb` and `postgres` from /usr/lib/postgresql/<v>/bin,
installed by `make postgresql`). PostgreSQL refuses to run as root: when this process is root the
cluster runs as the `postgres` account (`runuser`), and its data directory is made in a directory
that account can reach (the default temporary directory), owned by it.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from chain.processes import ManagedProcess, free_port, port_is_open

log = logging.getLogger(__name__)

PG_USER = "postgres"  # the database superuser initdb creates
RUN_AS_WHEN_ROOT = "postgres"  # the Debian package's system account


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's programs are not installed, or cannot run here."""


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and postgres."""
    found = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            try:
                found.append((int(bindir.parent.name.split(".")[0]), bindir))
            except ValueError:
                continue
    if not found:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run "
            "`make postgresql` (Debian's postgresql package)")
    return max(found)[1]


def postgres_problem() -> str | None:
    """Why a cluster of our own cannot be started here, or None."""
    try:
        postgres_bin_dir()
    except PostgresUnavailable as exc:
        return str(exc)
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (the Prefect server's PostgreSQL driver)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS_WHEN_ROOT)
        except KeyError:
            return f"running as root and there is no {RUN_AS_WHEN_ROOT!r} account to run PostgreSQL"
    return None


# Autovacuum visits a table once 2 % of its rows are dead, not PostgreSQL's 20 %: Prefect's
# vacuum deletes the old runs and events every hour, and their space is reused only after
# autovacuum has marked it free; at 20 % the largest tables (events, event_resources) grew by a
# fifth of their size before each visit (bench/RESULTS.md, the soak). compose.yml: the same.
AUTOVACUUM_ARGS = ("-c", "autovacuum_vacuum_scale_factor=0.02")


class PostgresCluster(ManagedProcess):
    """One PostgreSQL cluster on 127.0.0.1:<port>, its data in `data_dir` (kept across restarts)."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None,
                 host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.bin_dir = postgres_bin_dir()
        self.host = host
        self.port = port or free_port(host)
        self.run_as = RUN_AS_WHEN_ROOT if os.geteuid() == 0 else None
        self._made_dir: Path | None = None
        if data_dir is None:
            # Not under pytest's or the run directory's 0700 parents: the postgres account must
            # be able to reach it.
            self._made_dir = Path(tempfile.mkdtemp(prefix="wis2-postgres-"))
            data_dir = self._made_dir
        self.data_dir = Path(data_dir)
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "socket"
        argv = self._as_owner([
            str(self.bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
            "-c", f"listen_addresses={host}", "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "max_connections=200", "-c", "fsync=on", *AUTOVACUUM_ARGS,
        ])
        super().__init__("postgres", argv, log_path or self.data_dir / "postgres.log",
                         ready=self._ready)

    # ---- as the cluster's owner ------------------------------------------------------------
    def _as_owner(self, argv: list[str]) -> list[str]:
        if self.run_as is None:
            return argv
        return ["runuser", "-u", self.run_as, "--", *argv]

    def _chown(self, path: Path) -> None:
        if self.run_as is not None:
            account = pwd.getpwnam(self.run_as)
            os.chown(path, account.pw_uid, account.pw_gid)

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(self._as_owner(argv), capture_output=True, text=True, timeout=120,
                              check=False)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{argv[0]} failed ({done.returncode}): "
                                      f"{(done.stderr or done.stdout).strip()[-2000:]}")

    def _ready(self) -> bool:
        if not port_is_open(self.host, self.port):
            return False
        try:
            self.execute("SELECT 1")
            return True
        except Exception:  # still starting up ("the database system is starting up")
            return False

    # ---- life cycle ------------------------------------------------------------------------
    def init(self) -> None:
        """`initdb` once: trust authentication, loopback only (the cluster is ours alone)."""
        if (self.pgdata / "PG_VERSION").is_file():
            return
        for path in (self.data_dir, self.pgdata, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
            self._chown(path)
        os.chmod(self.pgdata, 0o700)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        self._chown(self.log_path)
        self._run([str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", PG_USER,
                   "--auth=trust", "--encoding=UTF8", "--locale=C"])

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        self.init()
        super().start(timeout)
        log.info("PostgreSQL %s on %s:%s, data in %s", self.bin_dir.parent.name, self.host,
                 self.port, self.pgdata)
        return self

    def stop(self, timeout: float = 30.0, sig: int = 0) -> int | None:
        """Fast shutdown (SIGINT: running transactions are rolled back, then a clean exit)."""
        import signal

        return super().stop(timeout, sig or signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the whole cluster (postmaster and backends), then wait until the postmaster
        is reaped (as root it is the child of `runuser`, reaped by init a moment later): a
        `start()` right after would otherwise see its process in `postmaster.pid` and refuse
        ("Is another postmaster running?")."""
        pid = self._postmaster_pid()
        super().kill()
        deadline = time.monotonic() + 30
        while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        """Stop, and remove the data directory if this object made it."""
        self.stop()
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)

    # ---- databases -------------------------------------------------------------------------
    def execute(self, sql: str, database: str = "postgres") -> None:
        import asyncio

        asyncio.run(self._execute(sql, database))

    async def _execute(self, sql: str, database: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(host=self.host, port=self.port, user=PG_USER,
                                     database=database, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def create_database(self, name: str) -> str:
        """Create database `name` (no-op if it exists) and return its Prefect connection URL."""
        import asyncio

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(host=self.host, port=self.port, user=PG_USER,
                                         database="postgres", timeout=10)
            try:
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)

    def url(self, database: str) -> str:
        """What PREFECT_API_DATABASE_CONNECTION_URL takes."""
        return f"postgresql+asyncpg://{PG_USER}@{self.host}:{self.port}/{database}"

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
