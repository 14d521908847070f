"""The backfill phase of the benchmark: an archive of N distinct events (a JSON-lines file)
announced with `wis2-chain backfill` through the node's `backfill/default` deployment and worker.

Measured: the time to announce it all, the rate held against the rate limit, what reached the
origin topic (lost, duplicated), and the backfill run's own summary. `run_steady_beside` runs the
steady phase while a backfill goes on, to show the live events' latency beside it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import chain
from bench.chain import Delivery, delivery_counts
from bench.collect import Collector
from bench.events import BenchEvent, EventFactory
from chain.mqtt import MqttConnection


class BackfillResult(Delivery):
    rate_limit: float | None
    batch_size: int
    exit_code: int | None
    message: str
    elapsed_seconds: float
    drained: bool
    achieved_rate: float  # notifications received per second over the whole backfill


def write_archive(events: list[BenchEvent], path: Path) -> Path:
    """The events as a JSON-lines archive (one CloudEvent per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for event in events:
            handle.write(event.payload + b"\n")
    return path


def run_backfill(
    events: list[BenchEvent], archive: Path, env: dict[str, str], collector: Collector,
    rate: float | None, batch_size: int, timeout: float, abort: threading.Event,
    on_start: Callable[[], None] | None = None,
) -> BackfillResult:
    """`wis2-chain backfill ARCHIVE` (deployment run, the node's worker) until its run ends."""
    write_archive(events, archive)
    command = [str(Path(sys.executable).with_name("wis2-chain")), "backfill", str(archive),
               "--batch-size", str(batch_size), "--timeout", str(int(timeout))]
    if rate is not None:
        command += ["--rate", str(rate)]
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if on_start is not None:
        on_start()
    try:
        output, _ = process.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    data_ids = [event.data_id for event in events]
    drained = collector.wait_for(data_ids, start + timeout, abort)
    elapsed = time.monotonic() - start
    lines = [line for line in (output or "").splitlines() if line.strip()]
    delivery = delivery_counts(events, collector, [], {d: 0.0 for d in data_ids})
    return BackfillResult(
        rate_limit=rate, batch_size=batch_size,
        exit_code=process.returncode, message=lines[-1][:500] if lines else "",
        elapsed_seconds=round(elapsed, 2), drained=drained,
        achieved_rate=round(collector.received(data_ids) / elapsed, 2) if elapsed else 0.0,
        **delivery,
    )


def run_phase(
    factory: EventFactory, env: dict[str, str], collector: Collector, fileserver: MqttConnection,
    topic: str, opts: Any, archive: Path, abort: threading.Event,
) -> dict[str, Any]:
    """The backfill of `opts.backfill` events and, while it runs, a steady stream of live events
    (`opts.rate` per second for `opts.steady_seconds`): {"backfill": ..., "steady_beside": ...}."""
    events = factory.batch("backfill", opts.backfill)
    live = factory.batch("beside", max(1, round(opts.steady_seconds * opts.rate)))
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def backfill() -> None:
        outcome["backfill"] = run_backfill(
            events, archive, env, collector, opts.backfill_rate or None,
            opts.backfill_batch_size, opts.backfill_timeout, abort, on_start=started.set)
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=backfill, name="backfill", daemon=True)
    thread.start()
    started.wait(60)
    # the live stream starts once the backfill's first notifications are out
    collector.wait_for(events[:1] and [events[0].data_id], time.monotonic() + 300, abort)
    steady = chain.run_steady(live, fileserver, topic, collector, opts.rate,
                              opts.steady_drain_timeout, abort)
    steady_ended = time.monotonic()
    thread.join(opts.backfill_timeout + 120)
    result = outcome.get("backfill")
    return {
        "backfill": result.model_dump() if result else {"message": "did not finish"},
        "steady_beside_backfill": steady.model_dump(),
        # the live stream ran entirely while the backfill was going on
        "steady_within_backfill": outcome.get("ended", float("inf")) >= steady_ended,
    }
