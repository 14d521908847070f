"""`python -m bench.run` (`make bench`): the end-to-end benchmark of the chain.

For each profile (Prefect server on SQLite, and on PostgreSQL when one is reachable) it starts the
whole node on loopback with free ports (`localnode.node.LocalNode`: broker, Prefect server,
work pool, blocks, deployments, worker (`--worker`: warm in-process or process-per-run), listener
(`--batch-max-size`: adaptive batching, 1 = one run per event), file server; data verification
off), then measures:

1. the in-process floor (parse -> build -> validate -> publish in one loop, same broker);
2. intake: --intake events at once with the work pool paused, on the idle node: the listener's
   own rate (events acknowledged per second, each in a flow run); those runs are then deleted;
3. steady: one event every 1/rate s for --steady-seconds, latency event published -> notification;
4. burst: --burst distinct events at once, time to drain (bounded by --drain-timeout), lost and
   duplicated notifications, failed flow runs;

with CPU seconds and peak RSS of every long-running process tree, and writes
`bench/out/<timestamp>/results.json` and `results.md` (the markdown is also printed).
Nothing waits forever: every wait has a deadline, and a phase is aborted (its worker killed) when
the machine's available memory falls below --min-available-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import chain
from bench.collect import Collector
from bench.events import EventFactory
from bench.floor import run_floor
from bench.intake import run_intake
from bench.load import CpuHogs
from bench.machine import describe
from bench.procmon import ProcessMonitor
from bench.report import markdown
from chain.processes import free_port, port_is_open
from localnode.node import WORK_POOL, LocalNode, NodeSettings
from localnode.prefect_server import prefect_cli
from wis2.dataset import load_dataset

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


class Options(argparse.Namespace):
    profile: str
    steady_seconds: float
    rate: float
    steady_drain_timeout: float
    burst: int
    drain_timeout: float
    floor_events: int | None
    pool_limit: int
    worker: str
    worker_limit: int
    batch_max_size: int
    listener_setting: list[str]
    intake: int
    min_available_mb: float
    cpu_hogs: int
    tiny: bool
    out: Path | None
    listener: str
    dataset: str


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=["sqlite", "postgres", "all"], default="all",
                   help="Prefect server database (all: sqlite, then postgres when reachable)")
    p.add_argument("--steady-seconds", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=1.0, help="events per second, steady phase")
    p.add_argument("--steady-drain-timeout", type=float, default=300.0,
                   help="seconds to wait for the steady phase's stragglers")
    p.add_argument("--burst", type=int, default=1000, help="events published at once")
    p.add_argument("--drain-timeout", type=float, default=900.0,
                   help="seconds the burst may take to drain; what arrived by then is reported")
    p.add_argument("--floor-events", type=int, default=None,
                   help="events through the in-process floor (default: --burst)")
    p.add_argument("--worker", choices=["warm", "process"], default="warm",
                   help="warm: the wis2-warm worker (flow runs in-process); process: Prefect's "
                   "process worker (one Python process per run)")
    p.add_argument("--worker-limit", type=int, default=8,
                   help="`prefect worker start --limit`: flow runs at the same time")
    p.add_argument("--pool-limit", type=int, default=0,
                   help="work pool concurrency limit set for the run (0: none)")
    p.add_argument("--batch-max-size", type=int, default=50,
                   help="WIS2_LISTENER_BATCH_MAX_SIZE: events per batch run (1: no batching)")
    p.add_argument("--listener-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="another listener setting, as WIS2_LISTENER_<NAME>=VALUE (repeatable), "
                   "e.g. API_CONCURRENCY=4")
    p.add_argument("--intake", type=int, default=1000,
                   help="events of the listener intake phase (0: skip it)")
    p.add_argument("--min-available-mb", type=float, default=1500.0,
                   help="abort a phase when the machine's available memory falls below this")
    p.add_argument("--cpu-hogs", type=int, default=0, metavar="N",
                   help="N busy processes run through the measured phases (background load; "
                   "the floor is measured under it too)")
    p.add_argument("--tiny", action="store_true",
                   help="5 events per phase, short timeouts (the test suite's smoke run)")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--dataset", default="argo")
    p.add_argument("--listener", choices=["project", "standin"], default="project",
                   help="project: `python -m listener`; standin: bench/standin_listener.py, a "
                   "minimal stand-in (one flow run per event, nothing else) to measure the Prefect "
                   "side when the project's listener is unavailable")
    opts = p.parse_args(argv, namespace=Options())
    for item in opts.listener_setting:
        if "=" not in item or not item.split("=", 1)[0]:
            p.error(f"--listener-setting {item!r}: expected NAME=VALUE")
    if opts.tiny:
        opts.steady_seconds, opts.rate, opts.burst = 5.0, 1.0, 5
        opts.intake = min(opts.intake, 5)
        opts.steady_drain_timeout, opts.drain_timeout = 60.0, 60.0
        opts.floor_events = 5
    return opts


# ---- PostgreSQL ---------------------------------------------------------------------------------
def postgres_problem() -> str | None:
    """Why the postgres profile cannot run, or None."""
    if not port_is_open(PG_HOST, PG_PORT):
        return f"no PostgreSQL server on {PG_HOST}:{PG_PORT}"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed"
    try:
        asyncio.run(_pg("SELECT 1"))
    except Exception as exc:
        return f"cannot log in to PostgreSQL as {PG_USER}: {exc}"
    return None


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres",
                                 timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# ---- one profile --------------------------------------------------------------------------------
def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _pids(node: LocalNode) -> dict[str, int]:
    pids: dict[str, int] = {}
    if node.broker is not None and node.broker.process.pid:
        pids["mosquitto"] = node.broker.process.pid
    for proc in node.processes:
        if proc.pid is not None and proc.running:
            pids[proc.name] = proc.pid
    pids["bench (floor, publisher, subscriber)"] = os.getpid()
    return pids


# Listener settings of each profile as deployed: the PostgreSQL server takes concurrent run
# creations (compose.yml sets WIS2_LISTENER_API_CONCURRENCY=4); SQLite keeps the default 1.
# --listener-setting overrides them.
PROFILE_LISTENER_SETTINGS: dict[str, dict[str, str]] = {"postgres": {"API_CONCURRENCY": "4"}}


class BenchNode(LocalNode):
    """The node, with more listener settings (`{"BATCH_MAX_SIZE": "50"}` ->
    WIS2_LISTENER_BATCH_MAX_SIZE=50), or the stand-in listener when asked for."""

    def __init__(self, settings: NodeSettings, standin_listener: bool = False,
                 listener_settings: dict[str, str] | None = None) -> None:
        super().__init__(settings)
        self.standin_listener = standin_listener
        self.listener_settings = listener_settings or {}

    def listener_env(self) -> dict[str, str]:
        env = super().listener_env()
        env.update({f"WIS2_LISTENER_{k.upper()}": v for k, v in self.listener_settings.items()})
        return env

    def _spawn(self, name, argv, env, ready=None, timeout=60.0):
        if name == "listener" and self.standin_listener:
            argv = [sys.executable, "-m", "bench.standin_listener"]
        return super()._spawn(name, argv, env, ready=ready, timeout=timeout)


def _work_pool(node: LocalNode, *args: str) -> None:
    subprocess.run([prefect_cli(), "work-pool", *args], env=node.child_env(),
                   capture_output=True, text=True, timeout=120, check=True)


def run_profile(profile: str, opts: Options, out_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"profile": profile}
    database_url = None
    db_name = None
    if profile == "postgres":
        problem = postgres_problem()
        if problem:
            log.warning("postgres profile skipped: %s", problem)
            return {"profile": profile, "skipped": problem}
        db_name = f"wis2_bench_{os.getpid()}_{int(time.time())}"
        asyncio.run(_pg(f'CREATE DATABASE "{db_name}"'))
        database_url = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{db_name}"
        result["database"] = f"PostgreSQL {PG_HOST}:{PG_PORT}/{db_name}"
    else:
        result["database"] = "SQLite (file in the run directory)"

    result["pool_limit"] = opts.pool_limit if opts.pool_limit > 0 else None
    listener_settings = {**PROFILE_LISTENER_SETTINGS.get(profile, {}),
                         **dict(item.split("=", 1) for item in opts.listener_setting)}
    result["chain_config"] = {"worker": opts.worker, "worker_limit": opts.worker_limit,
                              "batch_max_size": opts.batch_max_size,
                              "listener_settings": listener_settings}
    broker, ws, prefect, files, metrics = _distinct_ports(5)
    settings = NodeSettings(
        _env_file=None, run_dir=out_dir / profile / "node", broker_port=broker,
        broker_ws_port=ws, prefect_port=prefect, files_port=files, metrics_port=metrics,
        verify_data=False, database_url=database_url, worker_type=opts.worker,
        worker_limit=opts.worker_limit,
    )
    dataset = load_dataset(opts.dataset)
    node = BenchNode(settings, standin_listener=opts.listener == "standin",
                     listener_settings={"BATCH_MAX_SIZE": str(opts.batch_max_size),
                                        **listener_settings})
    result["listener"] = ("stand-in (bench/standin_listener.py), NOT the project's listener"
                          if opts.listener == "standin" else "project (python -m listener)")
    abort = threading.Event()
    tag = f"BENCH{datetime.now(UTC).strftime('%H%M%S')}{profile[:2].upper()}"
    try:
        t0 = time.monotonic()
        try:
            node.start()
            result["startup_error"] = None
        except Exception as exc:
            log.error("the node did not start completely: %s", exc)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            result["startup_error"] = " ".join(lines[:2])[:500]
            result["startup_log_tail"] = str(exc)[-3000:]
        result["startup_seconds"] = round(time.monotonic() - t0, 1)
        if node.broker is None or node.server is None or not node.server.running:
            result["skipped"] = "the broker or the Prefect server did not start"
            return result
        state = node.state
        factory = EventFactory(dataset, tag, files_url=state.files_url)
        chain_ready = result["startup_error"] is None
        if chain_ready and opts.pool_limit > 0:
            _work_pool(node, "set-concurrency-limit", WORK_POOL, str(opts.pool_limit))

        def low_memory(available_mb: float) -> None:
            abort.set()
            for proc in node.processes:
                if proc.name == "worker":
                    proc.kill()

        def monitor() -> ProcessMonitor:
            return ProcessMonitor(_pids(node), min_available_mb=opts.min_available_mb,
                                  low_memory=low_memory, alone=frozenset({os.getpid()}))

        result["cpu_hogs"] = opts.cpu_hogs
        with CpuHogs(opts.cpu_hogs), \
                Collector(state.connection("everyone"), settings.centre_id) as collector:
            # 1. the floor, on an idle node
            floor_events = factory.batch("floor", 1 + (opts.floor_events or opts.burst))
            mon = monitor().start()
            floor = run_floor(floor_events, dataset, state.connection("publisher"), collector)
            result["floor"] = floor.model_dump()
            result["floor_processes"] = [u.model_dump() for u in mon.stop()]
            log.info("floor: %.1f events/s", floor.throughput_eps)

            if not chain_ready:
                result["chain"] = f"not measured: {result['startup_error']}"
                return result
            topic = settings.event_topic
            fileserver = state.connection("fileserver")

            # 2. the listener's intake alone, on an idle node: work pool paused, so no run is
            # executed; the runs it created are deleted before the pool is resumed
            if opts.intake > 0 and opts.listener == "project":
                _work_pool(node, "pause", WORK_POOL)
                try:
                    intake_events = factory.batch("intake", opts.intake)
                    mon = monitor().start()
                    intake = run_intake(
                        intake_events, fileserver, topic,
                        f"http://{settings.host}:{settings.metrics_port}/metrics",
                        opts.drain_timeout, abort)
                    result["intake"] = intake.model_dump()
                    result["intake_processes"] = [u.model_dump() for u in mon.stop()]
                    log.info("intake: %s events/s", intake.intake_eps)
                finally:
                    deleted = chain.delete_unstarted_runs(state)
                    _work_pool(node, "resume", WORK_POOL)
                log.info("intake: %d scheduled runs deleted, work pool resumed", deleted)

            # 3. steady
            count = max(1, round(opts.steady_seconds * opts.rate))
            steady_events = factory.batch("steady", count)
            mon = monitor().start()
            steady = chain.run_steady(steady_events, fileserver, topic, collector, opts.rate,
                                      opts.steady_drain_timeout, abort)
            result["steady"] = steady.model_dump()
            result["steady_processes"] = [u.model_dump() for u in mon.stop()]
            result["steady_runs"] = chain.flow_run_counts(
                state, f"{tag}_steady_",
                settle=30 if steady.lost == 0 else 0).model_dump()
            log.info("steady: %d/%d received, p50 %s s", steady.received, steady.events_sent,
                     steady.latency.p50)

            # 4. burst
            if not abort.is_set():
                burst_events = factory.batch("burst", opts.burst)
                mon = monitor().start()
                burst = chain.run_burst(burst_events, fileserver, topic, collector,
                                        opts.drain_timeout, abort)
                result["burst"] = burst.model_dump()
                result["burst_processes"] = [u.model_dump() for u in mon.stop()]
                result["burst_runs"] = chain.flow_run_counts(
                    state, f"{tag}_burst_",
                    settle=30 if burst.drained else 0).model_dump()
                log.info("burst: %d/%d received in %.0f s", burst.received, burst.events_sent,
                         burst.elapsed_seconds)

            if abort.is_set():
                result["aborted"] = (f"available memory fell below {opts.min_available_mb} MB: "
                                     "the worker was killed and the phase stopped")
            deadletters = settings.run_dir / "deadletters"
            result["dead_letters"] = (
                sum(1 for p in deadletters.rglob("*") if p.is_file())
                if deadletters.is_dir() else 0)
            floor_eps = floor.throughput_eps
            chain_eps = result.get("burst", {}).get("throughput_eps")
            result["chain_to_floor_ratio"] = (
                round(chain_eps / floor_eps, 5) if chain_eps and floor_eps else None)
        return result
    finally:
        node.stop()
        if db_name is not None:
            try:
                asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            except Exception as exc:
                log.warning("could not drop database %s: %s", db_name, exc)


def run(opts: Options) -> tuple[dict[str, Any], Path]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = opts.out or OUT / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = ["sqlite", "postgres"] if opts.profile == "all" else [opts.profile]
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "machine": describe(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "events": "distinct copies of data/demo-event.json (new id, file name, sha256 checksum); "
                  "data verification off (the flows do not download the files)",
        "profiles": {},
    }
    for profile in profiles:
        log.info("=== profile %s ===", profile)
        try:
            results["profiles"][profile] = run_profile(profile, opts, out_dir)
        except Exception as exc:  # report it and go on with the next profile
            log.exception("profile %s failed", profile)
            results["profiles"][profile] = {"profile": profile, "error": repr(exc)}
        _write(results, out_dir)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(results, out_dir)
    return results, out_dir


def _write(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(results))


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM, and SIGINT even when started in the background (ignored there): stop the node.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "prefect", "localnode"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results, out_dir = run(opts)
    sys.stdout.write(markdown(results))
    sys.stdout.write(f"\nresults: {out_dir / 'results.json'}\n")
    sys.stdout.flush()
    failed = [p for p, r in results["profiles"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
