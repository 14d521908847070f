"""The publication ledger at scale (`make bench BENCH_ARGS="--ledger-scale 1000000"`).

Fills an SQLite ledger and a PostgreSQL ledger (a cluster the bench starts) with realistic
entries (Argo-like data_ids, a sha512 checksum, a UUID, pubtime, recorded_at) through
`record_many`, in transactions of `FILL_CHUNK`; at each checkpoint (10 %, 100 % ...) it measures
the size on disk and the latency of what a batch round does: `get_many` of 50 keys (random,
recorded) and `record_many` of 50 new entries (timed `SAMPLES` times each).
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chain.ledger import SqliteLedger
from chain.ledger_entry import LedgerEntry
from chain.ledger_postgres import PostgresLedger

log = logging.getLogger(__name__)

FILL_CHUNK = 1000
BATCH = 50
SAMPLES = 200
CHECKSUM = "sha512:" + "A" * 86 + "=="  # the length of a base64 sha512 digest


def data_id(n: int) -> str:
    """An Argo-like data_id: float n // 400, profile n % 400."""
    return (f"wis2/fr-ifremer-argo/data/core/argo/dac/coriolis/{6900000 + n // 400}/"
            f"profiles/R{6900000 + n // 400}_{n % 400:03d}.nc")


def entry(n: int) -> LedgerEntry:
    return LedgerEntry(checksum=CHECKSUM, notification_id=str(uuid.uuid4()), rel="canonical",
                       pubtime="2026-12-05T12:00:00.123456Z")


def fill(ledger: Any, start: int, stop: int) -> float:
    """Record entries start..stop-1; returns the seconds taken."""
    began = time.perf_counter()
    for low in range(start, stop, FILL_CHUNK):
        ledger.record_many({data_id(n): entry(n) for n in range(low, min(stop, low + FILL_CHUNK))})
    return time.perf_counter() - began


def latency_ms(operation: Callable[[int], object], samples: int = SAMPLES) -> dict[str, float]:
    times = []
    for i in range(samples):
        began = time.perf_counter()
        operation(i)
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return {"p50": round(statistics.median(times), 2),
            "p95": round(times[int(0.95 * (len(times) - 1))], 2),
            "max": round(times[-1], 2)}


def measure(ledger: Any, size: int, next_new: list[int]) -> dict[str, Any]:
    rng = random.Random(size)

    def get50(_: int) -> None:
        keys = [data_id(rng.randrange(size)) for _ in range(BATCH)]
        found = ledger.get_many(keys)
        assert len(found) == len(set(keys)), "a recorded key was not found"

    def record50(_: int) -> None:
        start = next_new[0]
        next_new[0] += BATCH
        ledger.record_many({data_id(n): entry(n) for n in range(start, start + BATCH)})

    return {"get_many_50_ms": latency_ms(get50), "record_many_50_ms": latency_ms(record50)}


def sqlite_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")
               if not p.name.endswith("init-lock"))


def run_one(name: str, ledger: Any, size_of: Callable[[], int], entries: int,
            checkpoints: list[int]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    done = 0
    # new keys for record_many of 50 come from beyond the fill
    next_new = [entries * 2]
    for target in checkpoints:
        seconds = fill(ledger, done, target)
        done = target
        row = {"entries": target, "fill_seconds": round(seconds, 1),
               "fill_entries_per_s": round((target - (rows[-1]["entries"] if rows else 0))
                                           / seconds) if seconds else None}
        row.update(measure(ledger, target, next_new))
        size = size_of()
        row["entries_total"] = target + next_new[0] - entries * 2  # with record_many's
        row["bytes_on_disk"] = size
        row["bytes_per_entry"] = round(size / row["entries_total"])
        log.info("%s ledger, %d entries: %s", name, target, row)
        rows.append(row)
    return {"rows": rows}


def run(entries: int, out_dir: Path) -> dict[str, Any]:
    from localnode.postgres import PostgresCluster

    checkpoints = sorted({max(1, entries // 100), max(1, entries // 10), entries})
    results: dict[str, Any] = {"entries": entries, "batch": BATCH, "samples": SAMPLES,
                               "fill_chunk": FILL_CHUNK}
    with tempfile.TemporaryDirectory(prefix="ledger-scale-", dir=out_dir) as tmp:
        path = Path(tmp) / "publication-ledger.sqlite3"
        sqlite = SqliteLedger(path)
        results["sqlite"] = run_one("SQLite", sqlite, lambda: sqlite_size(path), entries,
                                    checkpoints)
    with PostgresCluster(log_path=out_dir / "ledger-postgres.log") as cluster:
        cluster.create_database("ledger")
        url = cluster.url("ledger").replace("postgresql+asyncpg://", "postgresql://")
        postgres = PostgresLedger(url)

        def pg_size() -> int:
            import psycopg

            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT pg_total_relation_size('publications')").fetchone()
                return int(row[0]) if row else 0

        results["postgres"] = run_one("PostgreSQL", postgres, pg_size, entries, checkpoints)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"### Publication ledger, {results['entries']:,} entries",
             "", "(entries: filled, then measured; the record_many samples add "
             f"{SAMPLES * BATCH:,} more at each step, counted in the size per entry)", "",
             "| ledger | entries | size on disk | bytes/entry | get_many 50 p50 / p95 (ms) "
             "| record_many 50 p50 / p95 (ms) | fill (entries/s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("sqlite", "postgres"):
        for row in results.get(name, {}).get("rows", []):
            g, r = row["get_many_50_ms"], row["record_many_50_ms"]
            lines.append(
                f"| {name} | {row['entries_total']:,} | {row['bytes_on_disk'] / 2**20:.1f} MB "
                f"| {row['bytes_per_entry']} | {g['p50']} / {g['p95']} | {r['p50']} / {r['p95']} "
                f"| {row['fill_entries_per_s']:,} |")
    return "\n".join(lines) + "\n"
