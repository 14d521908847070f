"""The options of `python -m bench.run` (`make bench BENCH_ARGS="..."`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import faults, faults_scaled  # noqa: F401 (registers its scenarios)
from bench.events import FileMix
from bench.variants import SERVER_DEFAULTS, Variant, parse_variants
from listener.settings import ListenerSettings

DESCRIPTION = "The end-to-end benchmark of the chain (bench/run.py)."
DEFAULT_FILE_MIX = "20000:795,500000:200,20000000:5"


class Options(argparse.Namespace):
    profile: str
    scaled_workers: int
    scaled_listeners: int
    split_server: bool
    steady_seconds: float
    rate: float
    steady_drain_timeout: float
    burst: int
    drain_timeout: float
    floor_events: int | None
    prefect_floor_runs: int
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
    faults: bool
    faults_only: bool
    fault_scenario: list[str]
    fault_events: int
    fault_timeout: float
    server_down_seconds: float
    broker_setting: list[str]
    chain_env: list[str]
    backfill: int
    backfill_rate: float
    backfill_batch_size: int
    backfill_timeout: float
    variant: list[str]
    variants: list[Variant]  # parsed from --variant
    count_requests: bool
    verify: bool
    file_mix: FileMix
    file_latency_ms: float
    ledger_scale: int
    soak: bool
    soak_events: int
    soak_rate: float
    soak_retention_seconds: float
    soak_sample_seconds: float


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=DESCRIPTION)
    p.add_argument("--profile", choices=["sqlite", "postgres", "scaled", "all"], default="all",
                   help="sqlite / postgres: the node with its Prefect server on that database; "
                   "scaled: --scaled-workers workers, --scaled-listeners listener replicas on "
                   "$share, shared PostgreSQL and Redis (localnode/scaled.py); all: the three, "
                   "those needing PostgreSQL / Redis when installed")
    p.add_argument("--scaled-workers", type=int, default=2, help="workers of the scaled node")
    p.add_argument("--scaled-listeners", type=int, default=2,
                   help="listener replicas of the scaled node")
    p.add_argument("--split-server", action="store_true",
                   help="scaled: the Prefect API and its background services in two processes "
                   "(`prefect server start --no-services` + `prefect server services start`)")
    p.add_argument("--steady-seconds", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=1.0, help="events per second, steady phase")
    p.add_argument("--steady-drain-timeout", type=float, default=300.0,
                   help="seconds to wait for the steady phase's stragglers")
    p.add_argument("--burst", type=int, default=1000, help="events published at once")
    p.add_argument("--drain-timeout", type=float, default=900.0,
                   help="seconds the burst may take to drain; what arrived by then is reported")
    p.add_argument("--floor-events", type=int, default=None,
                   help="events through the in-process floor (default: --burst)")
    p.add_argument("--prefect-floor-runs", type=int, default=50,
                   help="flow runs of 5 no-op tasks run with Prefect's engine against the node's "
                   "server, no worker or listener (bench/prefect_floor.py); 0: not measured")
    p.add_argument("--worker", choices=["warm", "process"], default="warm",
                   help="warm: the wis2-warm worker (flow runs in-process); process: Prefect's "
                   "process worker (one Python process per run)")
    p.add_argument("--worker-limit", type=int, default=8,
                   help="`prefect worker start --limit`: flow runs at the same time")
    p.add_argument("--pool-limit", type=int, default=0,
                   help="work pool concurrency limit set for the run (0: none)")
    p.add_argument("--batch-max-size", type=int,
                   default=ListenerSettings.model_fields["batch_max_size"].default,
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
    p.add_argument("--backfill", type=int, default=10000,
                   help="events of the backfill phase: an archive announced with `wis2-chain "
                   "backfill` through the node's worker, a steady stream beside it (0: skip it)")
    p.add_argument("--backfill-rate", type=float, default=50.0,
                   help="the backfill's rate limit, notifications/s (0: none)")
    p.add_argument("--backfill-batch-size", type=int, default=50,
                   help="events per publish-batch run of the backfill")
    p.add_argument("--backfill-timeout", type=float, default=1800.0,
                   help="seconds the backfill may take; what arrived by then is reported")
    p.add_argument("--faults", action="store_true",
                   help="after the measured phases, run the fault scenarios (bench/faults.py) on "
                   "the live node: lost / duplicated notifications and time to recover")
    p.add_argument("--faults-only", action="store_true",
                   help="only the fault scenarios (no floor, intake, steady, burst)")
    p.add_argument("--fault-scenario", action="append", default=[], metavar="NAME",
                   choices=sorted(faults.SCENARIOS),
                   help="run only this scenario (repeatable; default: all)")
    p.add_argument("--fault-events", type=int, default=200, help="events per fault scenario")
    p.add_argument("--fault-timeout", type=float, default=600.0,
                   help="deadline (s) of each wait of a fault scenario")
    p.add_argument("--server-down-seconds", type=float, default=0.0,
                   help="keep the SIGKILLed Prefect server down at least this long (default: "
                   "start it again at once)")
    p.add_argument("--broker-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a node broker setting, as WIS2_BROKER_<NAME>=VALUE (repeatable), e.g. "
                   "AUTOSAVE_ON_CHANGES=false AUTOSAVE_INTERVAL=60 (the former, non-durable "
                   "default)")
    p.add_argument("--chain-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable of every chain process (worker, listener...), "
                   "e.g. PREFECT_CLIENT_MAX_RETRIES=7 (repeatable)")
    p.add_argument("--variant", action="append", default=[],
                   metavar="NAME[:VAR=VALUE,...]",
                   help="measure each profile once per variant, on a fresh node, side by side "
                   "(repeatable): PREFECT_SERVER_* to the Prefect server (over the node's "
                   "server settings), WIS2_LISTENER_* to the listener, anything else to every "
                   f"chain process; VAR= unsets VAR (the default); {SERVER_DEFAULTS}: the "
                   "server without the node's settings; NAME alone: the node as deployed. "
                   "E.g. --variant base --variant nowake:WIS2_WORKER_WAKEUP=false")
    p.add_argument("--count-requests", action="store_true",
                   help="count the Prefect API requests of the steady and burst phases (the "
                   "server's access log, PREFECT_SERVER_LOGGING_LEVEL=INFO), per flow run and "
                   "per route")
    p.add_argument("--verify", action="store_true",
                   help="the flows download and check each event's file (WIS2_VERIFY_DATA=true, "
                   "the chain's default) in every phase; without it, verification is off unless "
                   "a variant or --chain-env sets WIS2_VERIFY_DATA=true")
    p.add_argument("--file-mix", type=FileMix, default=FileMix(DEFAULT_FILE_MIX),
                   metavar="BYTES:COUNT,...",
                   help="sizes of the events' files, spread evenly in each phase (default "
                   f"{DEFAULT_FILE_MIX}: 20 kB BUFR, 500 kB NetCDF, a few 20 MB files)")
    p.add_argument("--file-latency-ms", type=float, default=50.0,
                   help="milliseconds the node's file server waits before answering each file "
                   "request (a remote data server)")
    p.add_argument("--tiny", action="store_true",
                   help="5 events per phase, short timeouts (the test suite's smoke run)")
    p.add_argument("--ledger-scale", type=int, default=0, metavar="N",
                   help="only measure the publication ledger filled with N entries, SQLite and "
                   "PostgreSQL (bench/ledger_scale.py): size, get_many and record_many of 50")
    p.add_argument("--soak", action="store_true",
                   help="only the soak (bench/soak.py): --soak-events at --soak-rate through "
                   "the PostgreSQL node with every retention compressed, sampled")
    p.add_argument("--soak-events", type=int, default=100000)
    p.add_argument("--soak-rate", type=float, default=25.0, help="events per second")
    p.add_argument("--soak-retention-seconds", type=float, default=3601.0,
                   help="every retention during the soak (Prefect's minimum: over an hour)")
    p.add_argument("--soak-sample-seconds", type=float, default=10.0)
    p.add_argument("--soak-batch-wait", type=float, default=1.0,
                   help="the listener's WIS2_LISTENER_BATCH_MAX_WAIT during the soak: at a "
                   "sustained rate, fewer and larger runs (the default 0.2 s makes a run of ~3 "
                   "events at 16/s, more than a 2-core node's Prefect server keeps up with)")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--dataset", default="argo")
    p.add_argument("--listener", choices=["project", "standin"], default="project",
                   help="project: `python -m listener`; standin: bench/standin_listener.py, a "
                   "minimal stand-in (one flow run per event, nothing else) to measure the Prefect "
                   "side when the project's listener is unavailable")
    opts = p.parse_args(argv, namespace=Options())
    for option in ("listener_setting", "broker_setting", "chain_env"):
        for item in getattr(opts, option):
            if "=" not in item or not item.split("=", 1)[0]:
                p.error(f"--{option.replace('_', '-')} {item!r}: expected NAME=VALUE")
    try:
        opts.variants = parse_variants(opts.variant)
    except ValueError as exc:
        p.error(str(exc))
    opts.faults = opts.faults or opts.faults_only
    if opts.tiny:
        opts.steady_seconds, opts.rate, opts.burst = 5.0, 1.0, 5
        opts.intake = min(opts.intake, 5)
        opts.steady_drain_timeout, opts.drain_timeout = 60.0, 60.0
        opts.floor_events = 5
        opts.prefect_floor_runs = min(opts.prefect_floor_runs, 3)
        opts.backfill = min(opts.backfill, 5)
        opts.backfill_timeout = min(opts.backfill_timeout, 180.0)
        opts.fault_events = min(opts.fault_events, 6)
        opts.fault_timeout = min(opts.fault_timeout, 180.0)
    return opts
