"""The soak bench (`make bench BENCH_ARGS="--soak --soak-events 100000 --soak-rate 25"`).

The PostgreSQL node (as `make demo` and compose run it: the node's Prefect server settings,
warm worker, listener with batching) takes events at a sustained rate, one in
`BAD_EVERY` malformed (a dead letter each), with every retention compressed to
`--soak-retention-seconds` (default 3601 s: Prefect's database vacuum refuses less than an hour)
so that it acts during the run: the vacuum of flow runs and events (its loop every 60 s), of
orphaned logs and stale artifact collections (every sixth of the retention), the results sweep
(every 60 s), the dead letters (checked every 10 s).

Sampled every `--soak-sample-seconds`: each process's RSS (with its children), the Prefect
database's size, the results directory's size, the dead letters, the free disk. At the end:
every good event published exactly once (no loss, no second id), and for each series its slope
after the first retention cycle (per 10,000 events) and whether it plateaus. A PNG of the series.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.collect import Collector
from bench.events import EventFactory
from bench.node import BenchNode
from bench.png import small_multiples
from bench.procmon import tree_sample
from chain.diskspace import measure
from chain.mqtt import Publisher
from chain.processes import free_port
from localnode.node import NodeSettings
from localnode.postgres import PostgresCluster
from wis2.dataset import load_dataset

log = logging.getLogger(__name__)

TOPIC = "diffusion/files/coriolis/argo/csv"
BAD_EVERY = 100  # one malformed message in 100: the dead letters grow, and are removed
PLATEAU_TOLERANCE = 0.10  # growth over the window after the first cycle, relative to the mean


def soak_env(retention_seconds: int, batch_wait: float = 1.0,
             ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(Prefect server env, chain env, listener settings) with every retention compressed, and
    the listener's batch wait."""
    server = {"PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(retention_seconds),
              "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "60",
              # orphaned logs and stale artifact collections (the latest artifact of a key whose
              # artifacts were vacuumed with their runs): daily for a node's 14 days, a sixth of
              # the compressed retention here (left daily, they grew through the whole soak)
              "PREFECT_SERVER_SERVICES_DB_VACUUM_ORPHAN_CLEANUP_LOOP_SECONDS":
                  str(max(60, retention_seconds // 6)),
              "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": f"PT{retention_seconds}S"}
    days = f"{retention_seconds / 86400:.6f}"
    chain = {"WIS2_RESULTS_RETENTION_DAYS": days, "WIS2_HOUSEKEEPING_SECONDS": "60"}
    listener = {"DEADLETTER_RETENTION_DAYS": days, "HOUSEKEEPING_SECONDS": "10",
                "BATCH_MAX_WAIT": str(batch_wait)}
    return server, chain, listener


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class Sampler:
    """A sample every `interval` seconds, in a thread."""

    def __init__(self, node: BenchNode, postgres: PostgresCluster, interval: float,
                 sent: list[int], collector: Collector) -> None:
        self.node, self.postgres, self.interval = node, postgres, interval
        self.sent, self.collector = sent, collector
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self.t0 = time.monotonic()

    def _db_bytes(self) -> int | None:
        import psycopg

        url = self.postgres.url("prefect").replace("postgresql+asyncpg://", "postgresql://")
        try:
            with psycopg.connect(url, connect_timeout=10) as conn:
                row = conn.execute("SELECT pg_database_size('prefect')").fetchone()
                return int(row[0]) if row else None
        except psycopg.Error:
            return None

    def sample(self) -> dict[str, Any]:
        node = self.node
        rss = {}
        pids = {proc.name: proc.pid for proc in node.processes if proc.running and proc.pid}
        if node.broker is not None and node.broker.process.pid:
            pids["mosquitto"] = node.broker.process.pid
        if self.postgres.running and self.postgres.pid:
            pids["postgres"] = self.postgres.pid
        for name, pid in pids.items():
            rss[name] = round(tree_sample(pid)[1] / 2**20, 1)
        return {
            "t": round(time.monotonic() - self.t0, 1),
            "sent": self.sent[0],
            "published": len(self.collector.arrivals),
            "rss_mb": rss,
            "prefect_db_mb": (lambda b: round(b / 2**20, 1) if b else None)(self._db_bytes()),
            "results_mb": round(dir_bytes(node.run_dir / "results") / 2**20, 2),
            "deadletters": len(list((node.run_dir / "deadletters").glob("*.json"))),
            "free_disk_mb": round(measure(node.run_dir, 0).free_bytes / 2**20),
        }

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self._keep(self.sample())
            except Exception:
                log.exception("soak sample failed")
            self.stop.wait(self.interval)

    def _keep(self, sample: dict[str, Any]) -> None:
        """Kept, and appended to samples.jsonl as it comes (a run cut short keeps its series)."""
        self.samples.append(sample)
        with (self.node.run_dir.parent / "samples.jsonl").open("a") as out:
            out.write(json.dumps(sample) + "\n")

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self._keep(self.sample())


def series_of(samples: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    names = sorted({name for s in samples for name in s["rss_mb"]})
    out: dict[str, list[float | None]] = {
        f"rss_mb[{name}]": [s["rss_mb"].get(name) for s in samples] for name in names}
    for key in ("prefect_db_mb", "results_mb", "deadletters", "free_disk_mb"):
        out[key] = [s[key] for s in samples]
    return out


def slope_per_10k(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (events published), per 10,000 events."""
    if len(xs) < 3 or max(xs) == min(xs):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den * 10000


def plateaus(samples: list[dict[str, Any]], after_t: float,
             events_per_day: float) -> dict[str, Any]:
    """For each series, after `after_t` (the first retention cycle): its slope per 10,000
    events, what that slope would add in a year at `events_per_day`, and whether it plateaus
    (the growth over the window is within PLATEAU_TOLERANCE of its mean)."""
    window = [i for i, s in enumerate(samples) if s["t"] >= after_t]
    result: dict[str, Any] = {}
    for name, values in series_of(samples).items():
        points = [(samples[i]["published"], values[i]) for i in window
                  if values[i] is not None]
        if len(points) < 3:
            result[name] = {"slope_per_10k": None, "plateau": None}
            continue
        xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
        slope = slope_per_10k(xs, ys)
        growth = (slope or 0.0) * (max(xs) - min(xs)) / 10000
        mean = statistics.fmean(ys) or 1.0
        result[name] = {
            "slope_per_10k": round(slope, 4) if slope is not None else None,
            "per_year": round((slope or 0.0) * events_per_day * 365 / 10000, 1),
            "plateau": abs(growth) <= PLATEAU_TOLERANCE * abs(mean) or name == "free_disk_mb",
        }
    return result


def run(opts: Any, out_dir: Path) -> dict[str, Any]:
    retention = int(opts.soak_retention_seconds)
    server_env, chain_env, listener_settings = soak_env(retention, opts.soak_batch_wait)
    result: dict[str, Any] = {
        "events": opts.soak_events, "rate": opts.soak_rate, "retention_seconds": retention,
        "server_env": server_env, "chain_env": chain_env, "listener_settings": listener_settings,
        "bad_every": BAD_EVERY}
    postgres = PostgresCluster(log_path=out_dir / "soak" / "postgres.log").start()
    settings = NodeSettings(
        _env_file=None, run_dir=out_dir / "soak" / "node", broker_port=free_port(),
        broker_ws_port=free_port(), prefect_port=free_port(), files_port=free_port(),
        metrics_port=free_port(), verify_data=False,
        database_url=postgres.create_database("prefect"))
    node = BenchNode(settings, listener_settings=listener_settings, extra_env=chain_env,
                     server_env=server_env)
    node.postgres = postgres
    try:
        node.start()
        listener_log = node.run_dir / "logs" / "listener.log"
        deadline = time.monotonic() + 120
        while "msg=subscribed" not in listener_log.read_text() and time.monotonic() < deadline:
            time.sleep(1)
        factory = EventFactory(load_dataset(opts.dataset), "SOAK" + datetime.now(UTC).strftime(
            "%H%M%S"), files_url=node.files_url)
        sent = [0]
        good: list[str] = []
        with Collector(node.state.connection("everyone"), settings.centre_id) as collector, \
                Sampler(node, postgres, opts.soak_sample_seconds, sent, collector) as sampler, \
                Publisher(node.state.connection("fileserver")) as fileserver:
            started = time.monotonic()
            for n in range(opts.soak_events):
                due = started + n / opts.soak_rate
                if (pause := due - time.monotonic()) > 0:
                    time.sleep(pause)
                if n % BAD_EVERY == BAD_EVERY - 1:
                    fileserver.publish(TOPIC, f'{{"soak": {n}, "not json'.encode(), qos=1)
                else:
                    event = factory.make("soak", n)
                    good.append(event.data_id)
                    fileserver.publish(TOPIC, event.payload, qos=1)
                sent[0] = n + 1
            result["publish_seconds"] = round(time.monotonic() - started, 1)
            drained = collector.wait_for(good, time.monotonic() + opts.drain_timeout)
            result["drain_seconds"] = round(time.monotonic() - started, 1)
            sampler.stop.wait(2 * opts.soak_sample_seconds)  # the last samples, drained
        samples = sampler.samples
        (out_dir / "samples.json").write_text(json.dumps(samples) + "\n")
        result["drained"] = drained
        result["lost"] = len(good) - collector.received(good)
        result["second_ids"] = sum(1 for d in good if collector.copies(d)[1] > 1)
        result["samples"] = samples
        first_cycle = retention + 120  # a flow run's age + the vacuum's loop and a margin
        result["first_retention_cycle_t"] = first_cycle
        elapsed = samples[-1]["t"] if samples else 0
        if elapsed < first_cycle + 10 * opts.soak_sample_seconds:
            result["plateau_check"] = (
                f"not possible: the run lasted {elapsed:.0f} s, the first retention cycle "
                f"ends at {first_cycle} s (Prefect's minimum retention is one hour)")
        else:
            result["plateau_check"] = plateaus(samples, first_cycle, events_per_day=200000)
        series = series_of(samples)
        small_multiples(out_dir / "soak.png", [s["t"] for s in samples],
                        list(series.values()), marker_x=first_cycle)
        result["plot"] = str(out_dir / "soak.png")
        result["plot_panels"] = {name: [min(v for v in vals if v is not None),
                                        max(v for v in vals if v is not None)]
                                 for name, vals in series.items()
                                 if any(v is not None for v in vals)}
        return result
    finally:
        node.stop()
        postgres.cleanup()


def markdown(results: dict[str, Any]) -> str:
    r = results
    lines = [f"### Soak: {r['events']:,} events at {r['rate']} events/s, retention "
             f"{r['retention_seconds']} s", "",
             f"- published: every good event {'yes' if r.get('drained') else 'NO'}; lost "
             f"{r.get('lost')}; second ids {r.get('second_ids')}; publishing took "
             f"{r.get('publish_seconds')} s, drained at {r.get('drain_seconds')} s",
             f"- plot (panels in this order, each from 0 to 1.1 x its max; x: seconds; red: the "
             f"first retention cycle): `{r.get('plot')}`"]
    for name, (low, high) in r.get("plot_panels", {}).items():
        lines.append(f"  - {name}: {low} .. {high}")
    check = r.get("plateau_check")
    if isinstance(check, str):
        lines.append(f"- plateau check: {check}")
    elif check:
        lines += ["", "| series | slope per 10,000 events | per year at 200,000/day | plateau |",
                  "| --- | ---: | ---: | --- |"]
        for name, row in check.items():
            lines.append(f"| {name} | {row['slope_per_10k']} | {row.get('per_year')} "
                         f"| {row['plateau']} |")
    return "\n".join(lines) + "\n"
