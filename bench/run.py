"""`python -m bench.run` (`make bench`): the end-to-end benchmark of the chain.

For each profile (Prefect server on SQLite; on a PostgreSQL cluster of its own,
`localnode/postgres.py`, when PostgreSQL is installed; `scaled`: the node of `localnode/scaled.py`,
2 workers and 2 listener replicas on `$share` sharing PostgreSQL and Redis, `--split-server` for
the Prefect API and services in two processes) it starts the
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
5. backfill: --backfill distinct events in a JSON-lines archive announced with `wis2-chain
   backfill` (the node's worker, rate limit --backfill-rate), while a steady stream of live
   events goes on beside it: time, rate held, lost and duplicated, live latency beside it;
6. faults (--faults; --faults-only skips 1-5): scenarios of bench/faults.py on the live node
   (Prefect server SIGKILLed mid-burst and restarted, broker SIGKILLed while the listener is
   away...): lost and duplicated notifications, time to recover, runs left unfinished;

with CPU seconds and peak RSS of every long-running process tree, and writes
`bench/out/<timestamp>/results.json` and `results.md` (the markdown is also printed).
With `--variant NAME:VAR=VALUE,...` (bench/variants.py) each profile is measured once per
variant, each on a fresh node, stored as `<profile>[<NAME>]`; `--count-requests` counts the
Prefect API requests of the steady and burst phases (bench/api_requests.py).
Nothing waits forever: every wait has a deadline, and a phase is aborted (its worker killed) when
the machine's available memory falls below --min-available-mb.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import backfill, chain, faults, stages
from bench.api_requests import SERVER_ENV as COUNT_REQUESTS_SERVER_ENV
from bench.api_requests import AccessLog, summarize
from bench.collect import Collector
from bench.events import EventFactory, FileMix
from bench.floor import run_floor
from bench.intake import run_intake
from bench.load import CpuHogs
from bench.machine import describe
from bench.node import PROFILE_LISTENER_SETTINGS, BenchNode, ScaledBenchNode
from bench.options import Options, parse_args
from bench.prefect_floor import run_prefect_floor
from bench.procmon import ProcessMonitor, burst_cpu
from bench.report import markdown
from bench.variants import Variant, result_key
from chain.processes import free_port
from localnode.node import WORK_POOL, LocalNode, NodeSettings
from localnode.postgres import PostgresCluster, postgres_problem
from localnode.prefect_server import prefect_cli
from localnode.redis import redis_problem
from localnode.scaled import Topology
from wis2.dataset import load_dataset

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


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
    services = getattr(node.server, "services", None)  # the split Prefect server's
    if services is not None and services.running and services.pid:
        pids[services.name] = services.pid
    postgres = getattr(node, "postgres", None)
    if postgres is not None and postgres.running and postgres.pid:
        pids["postgres"] = postgres.pid
    pids["bench (floor, publisher, subscriber)"] = os.getpid()
    return pids


def _work_pool(node: LocalNode, *args: str) -> None:
    subprocess.run([prefect_cli(), "work-pool", *args], env=node.child_env(),
                   capture_output=True, text=True, timeout=120, check=True)


def _phase_requests(access: AccessLog | None, mark: int, runs: dict[str, Any],
                    own: Counter[str]) -> dict[str, Any] | None:
    """The API requests of a phase since `mark`, less the bench's own (`own`), per flow run."""
    if access is None:
        return None
    return summarize(access.since(mark), runs.get("total") or None, own).model_dump()


def run_profile(profile: str, opts: Options, out_dir: Path,
                variant: Variant | None = None) -> dict[str, Any]:
    """One profile on a fresh node (as deployed, or changed by `variant`)."""
    run_name = profile if variant is None else f"{profile}-{variant.name}"  # its directory
    result: dict[str, Any] = {"profile": profile}
    if variant is not None:
        result["variant"] = variant.record()
    database_url = None
    postgres: PostgresCluster | None = None
    topology: Topology | None = None
    if profile in ("postgres", "scaled"):
        problem = postgres_problem() or (redis_problem() if profile == "scaled" else None)
        if problem:
            log.warning("%s profile skipped: %s", profile, problem)
            return {**result, "skipped": problem}
    if profile == "scaled":  # the node starts its own PostgreSQL and Redis (localnode/scaled.py)
        topology = Topology(workers=opts.scaled_workers, listeners=opts.scaled_listeners,
                            separate_services=opts.split_server)
        result["topology"] = topology.model_dump()
        result["database"] = ("PostgreSQL, a cluster of the node's own shared by every host "
                              "(Prefect database, ledger database); Redis of its own (task "
                              "results; Prefect messaging)")
    elif profile == "postgres":
        postgres = PostgresCluster(log_path=out_dir / run_name / "postgres.log").start()
        database_url = postgres.create_database("prefect")
        result["database"] = (f"PostgreSQL {postgres.bin_dir.parent.name}, a cluster of its own "
                              f"on 127.0.0.1:{postgres.port} (localnode/postgres.py)")
    else:
        result["database"] = "SQLite (file in the run directory)"
    broker_settings = dict(item.split("=", 1) for item in opts.broker_setting)
    result["broker_settings"] = broker_settings
    chain_env: dict[str, str | None] = {**dict(item.split("=", 1) for item in opts.chain_env),
                                        **(variant.chain_env if variant else {})}
    result["chain_env"] = chain_env
    server_env: dict[str, str | None] = {
        **(variant.server_env if variant else {}),
        **(COUNT_REQUESTS_SERVER_ENV if opts.count_requests else {})}
    server_node_settings = not (variant and variant.server_defaults)
    if server_env or not server_node_settings:
        result["server_env"] = server_env
        result["server_node_settings"] = server_node_settings

    result["pool_limit"] = opts.pool_limit if opts.pool_limit > 0 else None
    listener_settings: dict[str, str | None] = {
        **PROFILE_LISTENER_SETTINGS.get(profile, {}),
        **dict(item.split("=", 1) for item in opts.listener_setting),
        **(variant.listener_settings if variant else {})}
    result["chain_config"] = {"worker": opts.worker, "worker_limit": opts.worker_limit,
                              "batch_max_size": opts.batch_max_size,
                              "listener_settings": listener_settings}
    broker, ws, prefect, files, metrics = _distinct_ports(5)
    settings = NodeSettings(
        _env_file=None, run_dir=out_dir / run_name / "node", broker_port=broker,
        broker_ws_port=ws, prefect_port=prefect, files_port=files, metrics_port=metrics,
        verify_data=opts.faults_only or opts.verify, database_url=database_url, database="sqlite",
        worker_type=opts.worker,
        worker_limit=opts.worker_limit,
    )
    verify_env = chain_env.get("WIS2_VERIFY_DATA")
    result["verify_data"] = (settings.verify_data if verify_env is None
                             else verify_env.strip().lower() in ("1", "true", "yes", "on"))
    result["files"] = {"mix": opts.file_mix.spec, "latency_ms": opts.file_latency_ms}
    dataset = load_dataset(opts.dataset)
    node_options: dict[str, Any] = {"server_env": server_env,
                                    "server_node_settings": server_node_settings}
    if profile == "scaled":
        node_options["topology"] = topology
    node = (ScaledBenchNode if profile == "scaled" else BenchNode)(
        settings, standin_listener=opts.listener == "standin",
        listener_settings={"BATCH_MAX_SIZE": str(opts.batch_max_size), **listener_settings},
        extra_env={**(faults.FAULT_ENV if opts.faults_only else {}), **chain_env},
        files_latency_ms=opts.file_latency_ms,
        **node_options)
    if postgres is not None:
        node.postgres = postgres
    result["listener"] = ("stand-in (bench/standin_listener.py), NOT the project's listener"
                          if opts.listener == "standin" else "project (python -m listener)")
    abort = threading.Event()
    tag = f"BENCH{datetime.now(UTC).strftime('%H%M%S')}{profile[:2].upper()}"
    access: AccessLog | None = None
    try:
        t0 = time.monotonic()
        try:
            # The node's BrokerConfig reads WIS2_BROKER_* for what it does not set itself.
            saved = {k: os.environ.get(f"WIS2_BROKER_{k.upper()}") for k in broker_settings}
            os.environ.update({f"WIS2_BROKER_{k.upper()}": v for k, v in broker_settings.items()})
            try:
                node.start()
            finally:
                for k, v in saved.items():
                    os.environ.pop(f"WIS2_BROKER_{k.upper()}", None)
                    if v is not None:
                        os.environ[f"WIS2_BROKER_{k.upper()}"] = v
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
        factory = EventFactory(dataset, tag, files_url=state.files_url, real_files=True,
                               mix=opts.file_mix)
        chain_ready = result["startup_error"] is None
        if opts.count_requests:
            access = AccessLog(node.server.log_path)
        if chain_ready and opts.pool_limit > 0:
            _work_pool(node, "set-concurrency-limit", WORK_POOL, str(opts.pool_limit))

        def low_memory(available_mb: float) -> None:
            abort.set()
            for proc in node.processes:
                if proc.name.split("-")[0] == "worker":
                    proc.kill()

        def monitor() -> ProcessMonitor:
            return ProcessMonitor(_pids(node), min_available_mb=opts.min_available_mb,
                                  low_memory=low_memory, alone=frozenset({os.getpid()}))

        result["cpu_hogs"] = opts.cpu_hogs
        with CpuHogs(opts.cpu_hogs), \
                Collector(state.connection("everyone"), settings.centre_id) as collector:
            # 1. the floor, on an idle node
            floor = None
            if not opts.faults_only:
                floor_events = factory.batch("floor", 1 + (opts.floor_events or opts.burst))
                mon = monitor().start()
                floor = run_floor(floor_events, dataset, state.connection("publisher"),
                                  collector)
                result["floor"] = floor.model_dump()
                result["floor_processes"] = [u.model_dump() for u in mon.stop()]
                log.info("floor: %.1f events/s", floor.throughput_eps)

            if not chain_ready:
                result["chain"] = f"not measured: {result['startup_error']}"
                return result

            # 1b. Prefect's own floor: bare flow runs of no-op tasks, on the idle node's server
            if opts.prefect_floor_runs > 0 and not opts.faults_only:
                server_pids = [pid for name, pid in _pids(node).items()
                               if name.startswith("prefect-")]
                prefect_floor = run_prefect_floor(node.child_env(), server_pids,
                                                  opts.prefect_floor_runs)
                result["prefect_floor"] = prefect_floor.model_dump()
                log.info("Prefect floor: %.3f server CPU s per bare run",
                         prefect_floor.server_cpu_per_run)
            topic = settings.event_topic
            fileserver = state.connection("fileserver")

            # 2. the listener's intake alone, on an idle node: work pool paused, so no run is
            # executed; the runs it created are deleted before the pool is resumed
            if opts.intake > 0 and opts.listener == "project" and not opts.faults_only:
                _work_pool(node, "pause", WORK_POOL)
                try:
                    intake_events = factory.batch("intake", opts.intake)
                    mon = monitor().start()
                    intake = run_intake(intake_events, fileserver, topic,
                                        node.listener_metrics_urls(), opts.drain_timeout, abort)
                    result["intake"] = intake.model_dump()
                    result["intake_processes"] = [u.model_dump() for u in mon.stop()]
                    log.info("intake: %s events/s", intake.intake_eps)
                finally:
                    deleted = chain.delete_unstarted_runs(state)
                    _work_pool(node, "resume", WORK_POOL)
                log.info("intake: %d scheduled runs deleted, work pool resumed", deleted)

            # 3. steady
            if not opts.faults_only:
                count = max(1, round(opts.steady_seconds * opts.rate))
                steady_events = factory.batch("steady", count)
                mark, own = (access.mark() if access else 0), Counter[str]()
                mon = monitor().start()
                steady_sent: dict[str, float] = {}
                steady = chain.run_steady(steady_events, fileserver, topic, collector, opts.rate,
                                          opts.steady_drain_timeout, abort, steady_sent)
                result["steady"] = steady.model_dump()
                result["steady_processes"] = [u.model_dump() for u in mon.stop()]
                result["steady_runs"] = chain.flow_run_counts(
                    state, f"{tag}_steady_", settle=30 if steady.lost == 0 else 0,
                    requests=own).model_dump()
                if access is not None:
                    result["steady_requests"] = _phase_requests(
                        access, mark, result["steady_runs"], own)
                result["steady_timeline"] = stages.steady_timeline(
                    state, f"{tag}_steady_", steady_events, steady_sent, collector).model_dump()
                log.info("steady: %d/%d received, p50 %s s", steady.received, steady.events_sent,
                         steady.latency.p50)

            # 4. burst
            if not abort.is_set() and not opts.faults_only:
                burst_events = factory.batch("burst", opts.burst)
                mark, own = (access.mark() if access else 0), Counter[str]()
                mon = monitor().start()
                burst = chain.run_burst(burst_events, fileserver, topic, collector,
                                        opts.drain_timeout, abort)
                result["burst"] = burst.model_dump()
                result["burst_processes"] = [u.model_dump() for u in mon.stop()]
                result["burst_cpu"] = burst_cpu(result["burst_processes"],
                                                burst.events_sent)
                result["burst_runs"] = chain.flow_run_counts(
                    state, f"{tag}_burst_", settle=30 if burst.drained else 0,
                    requests=own).model_dump()
                if access is not None:
                    result["burst_requests"] = _phase_requests(
                        access, mark, result["burst_runs"], own)
                log.info("burst: %d/%d received in %.0f s", burst.received, burst.events_sent,
                         burst.elapsed_seconds)

            # 5. backfill: an archive through `wis2-chain backfill`, a steady stream beside it
            if opts.backfill > 0 and not abort.is_set() and not opts.faults_only:
                mon = monitor().start()
                result.update(backfill.run_phase(
                    factory, node.child_env(), collector, fileserver, topic, opts,
                    settings.run_dir / "backfill-archive.jsonl", abort))
                result["backfill_processes"] = [u.model_dump() for u in mon.stop()]
                log.info("backfill: %s", result["backfill"]["message"])

            # 6. faults, on the live node
            if opts.faults and not abort.is_set() and opts.listener == "project":
                mon = monitor().start()
                ctx = faults.FaultContext(
                    node=node, collector=collector, topic=topic,
                    factory=EventFactory(dataset, tag, files_url=state.files_url,
                                         real_files=True),
                    events=opts.fault_events, timeout=opts.fault_timeout,
                    server_down_seconds=opts.server_down_seconds)
                result["faults"] = faults.run_faults(ctx, opts.fault_scenario or None)
                result["faults_processes"] = [u.model_dump() for u in mon.stop()]

            if abort.is_set():
                result["aborted"] = (f"available memory fell below {opts.min_available_mb} MB: "
                                     "the worker was killed and the phase stopped")
            result["dead_letters"] = sum(  # of every listener replica
                1 for d in settings.run_dir.rglob("deadletters") for p in d.rglob("*")
                if p.is_file())
            floor_eps = floor.throughput_eps if floor is not None else None
            chain_eps = result.get("burst", {}).get("throughput_eps")
            result["chain_to_floor_ratio"] = (
                round(chain_eps / floor_eps, 5) if chain_eps and floor_eps else None)
        return result
    finally:
        node.stop()
        if postgres is not None:
            postgres.cleanup()


def run(opts: Options) -> tuple[dict[str, Any], Path]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = opts.out or OUT / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = ["sqlite", "postgres", "scaled"] if opts.profile == "all" else [opts.profile]
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "machine": describe(),
        "options": {k: (str(v) if isinstance(v, Path | FileMix) else v)
                    for k, v in vars(opts).items() if k != "variants"},
        "events": "distinct copies of data/demo-event.json (new id, file name, sha256 checksum "
                  f"of the file the node's file server generates; sizes {opts.file_mix.spec}, "
                  f"{opts.file_latency_ms:g} ms per request); data verification "
                  + ("on" if opts.verify else "off unless a profile's `verify_data` says on")
                  + (
                      "; in the fault phase on (each flow downloads its file from the node's "
                      "file server and checks it)" if opts.faults else ""),
        "profiles": {},
    }
    if opts.variants:
        results["variants"] = [v.model_dump() for v in opts.variants]
    for profile in profiles:
        for variant in opts.variants or [None]:  # one after the other, each on a fresh node
            key = result_key(profile, variant)
            log.info("=== profile %s ===", key)
            try:
                results["profiles"][key] = run_profile(profile, opts, out_dir, variant)
            except Exception as exc:  # report it and go on with the next profile
                log.exception("profile %s failed", key)
                results["profiles"][key] = {"profile": profile, "error": repr(exc)}
                if variant is not None:
                    results["profiles"][key]["variant"] = variant.record()
            _write(results, out_dir)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(results, out_dir)
    return results, out_dir


def _write(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(results))


def run_ledger_scale(opts: Options) -> int:
    """`--ledger-scale N`: the publication ledger alone (bench/ledger_scale.py)."""
    from bench import ledger_scale

    out_dir = opts.out or OUT / datetime.now(UTC).strftime("ledger-%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": "python -m bench.run " + " ".join(sys.argv[1:]),
               "machine": describe(), **ledger_scale.run(opts.ledger_scale, out_dir)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(ledger_scale.markdown(results))
    sys.stdout.write(ledger_scale.markdown(results))
    sys.stdout.write(f"\nresults: {out_dir / 'results.json'}\n")
    return 0


def run_soak(opts: Options) -> int:
    """`--soak`: the soak alone (bench/soak.py)."""
    from bench import soak

    out_dir = opts.out or OUT / datetime.now(UTC).strftime("soak-%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": "python -m bench.run " + " ".join(sys.argv[1:]),
               "machine": describe(), **soak.run(opts, out_dir)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(soak.markdown(results))
    sys.stdout.write(soak.markdown(results))
    sys.stdout.write(f"\nresults: {out_dir / 'results.json'}\n")
    return 0 if results.get("drained") and not results.get("second_ids") else 1


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
    if opts.ledger_scale:
        return run_ledger_scale(opts)
    if opts.soak:
        return run_soak(opts)
    results, out_dir = run(opts)
    sys.stdout.write(markdown(results))
    sys.stdout.write(f"\nresults: {out_dir / 'results.json'}\n")
    sys.stdout.flush()
    failed = [p for p, r in results["profiles"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
