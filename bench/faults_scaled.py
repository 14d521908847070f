"""Fault scenarios of the scaled node (`--profile scaled`: listener replicas on `$share`).

`listener-replica-sigkill-mid-burst`: listener replica 1 is frozen (SIGSTOP) before the burst, so
the share of the burst the broker gives it (round-robin between the replicas of the shared
subscription, Receive Maximum at a time) is certainly received and unacknowledged when it is
SIGKILLed: made, not raced. The other replicas go on with their share; replica 1 is started again
with the same client id (a supervisor's restart), and its persistent session gives it back what
it held and what was queued for it meanwhile (mosquitto 2.0 keeps a dead member's share in its
session: README, "Listener replicas").
"""

from __future__ import annotations

import logging
import os
import signal
import time

from bench.faults import (
    REPLICAS_NEEDED,
    FaultContext,
    FaultResult,
    count_deliveries,
    scenario,
    wall_from_monotonic,
)
from bench.intake import read_counters

log = logging.getLogger(__name__)

NAME = "listener-replica-sigkill-mid-burst"
REPLICAS_NEEDED[NAME] = 2


@scenario(NAME)
def listener_replica_sigkill_mid_burst(ctx: FaultContext) -> FaultResult:
    phase = "replica"
    events = ctx.factory.batch(phase, ctx.events)
    result = FaultResult(scenario=NAME, events_sent=len(events))
    replicas = ctx.node.listeners()
    urls = ctx.node.listener_metrics_urls()
    if len(replicas) < 2:
        result.error = "needs at least 2 listener replicas (--profile scaled)"
        return result
    victim, victim_url, others = replicas[0], urls[0], urls[1:]
    assert victim.pid is not None
    before = read_counters(others)
    os.killpg(victim.pid, signal.SIGSTOP)  # it reads nothing more, acknowledges nothing more
    try:
        ctx.publish(events)  # each PUBACK: routed, replica 1's share sent or queued to it
    finally:
        victim.kill()  # SIGKILL ends a stopped process too
    killed_at = time.monotonic()
    ctx.wait("the other replicas acknowledge their share",
             lambda: (c := read_counters(others)).received > before.received
             and c.in_flight == 0)
    others_took = int(read_counters(others).received - before.received)
    while_down = ctx.collector.received([e.data_id for e in events])
    victim.start(timeout=90)
    back_at = time.monotonic()
    result.down_seconds = round(back_at - killed_at, 2)
    ctx.wait(f"{victim.name} gets its session back",
             lambda: (c := read_counters(victim_url)).received >= 1 and c.in_flight == 0)
    returned = int(read_counters(victim_url).received)
    result.killed = (f"{victim.name} frozen (SIGSTOP) during a burst of {len(events)} events, "
                     f"then SIGKILLed; the other replica(s) took {others_took} "
                     f"({while_down} notifications while it was down); restarted with its "
                     f"client id, it received {returned} from its session")
    log.info("%s: %s", NAME, result.killed)
    return count_deliveries(ctx, result, events, wall_from_monotonic(back_at), f"_{phase}_")


# ---- the shared services go away: the ledger's PostgreSQL, the results' Redis ----------------
SERVICE_DOWN_SECONDS = 3.0  # "restarted a few seconds later" (a supervisor's restart)
LONG_DOWN_SECONDS = 60.0


def service_outage_mid_burst(ctx: FaultContext, name: str, phase: str, service: str,
                             down: float, freeze: bool = False) -> FaultResult:
    """The burst is in flow runs, those the workers took held Running at the file server's gate
    (each holding the ledger's claim of its files, its build result written to Redis); then
    the node's `service` process (`postgres`: the Prefect database and the ledger; `redis`: the
    task results) is SIGKILLed, or frozen (SIGSTOP: it accepts connections and answers
    nothing, as a host cut off the network), the held runs are released while it is away, and
    `down` seconds later it is started again on its data (or SIGCONT). Made, not raced: the
    gate holds the runs until the service is gone."""
    events = ctx.factory.batch(phase, ctx.events)
    result = FaultResult(scenario=name, events_sent=len(events))
    try:
        proc = ctx.node.process(service)
    except KeyError:
        result.error = f"the node has no {service} of its own (--profile scaled)"
        return result
    assert proc.pid is not None
    before = ctx.counters()
    ctx.close_gate()
    try:
        slots = ctx.node.settings.worker_limit * len(
            [p for p in ctx.node.processes if p.name.split("-")[0] == "worker"])
        runs, held = ctx.hold_in_flight(events, before, slots)
        if freeze:
            os.killpg(proc.pid, signal.SIGSTOP)
        else:
            proc.kill()
        gone_at = time.monotonic()
        how = "frozen (SIGSTOP: unreachable)" if freeze else "SIGKILLed"
        result.killed = (f"{service} {how} with {held} download(s) of Running flow runs held at "
                         f"the file server, {runs} run(s) created for {len(events)} events; "
                         f"released while it was away, back after {down:g} s")
    finally:
        ctx.open_gate()  # the held runs go on and need the service while it is away
    time.sleep(max(0.0, down - (time.monotonic() - gone_at)))
    if freeze:
        os.killpg(proc.pid, signal.SIGCONT)
    else:
        proc.start(timeout=180)
    back_at = time.monotonic()
    result.down_seconds = round(back_at - gone_at, 2)
    log.info("%s: %s back after %.1f s", name, service, result.down_seconds)
    return count_deliveries(ctx, result, events, wall_from_monotonic(back_at), f"_{phase}_")


def _register(name: str, phase: str, service: str, down: float, freeze: bool = False) -> None:
    """`phase`: what the scenario's event ids contain (unique among the scenarios)."""
    REPLICAS_NEEDED[name] = 2  # the scaled node's: its own PostgreSQL and Redis
    scenario(name)(lambda ctx: service_outage_mid_burst(ctx, name, phase, service, down, freeze))


_register("postgres-sigkill-mid-burst", "pgkill", "postgres", SERVICE_DOWN_SECONDS)
_register("postgres-sigkill-60s-mid-burst", "pgkill60", "postgres", LONG_DOWN_SECONDS)
_register("redis-sigkill-mid-burst", "rdkill", "redis", SERVICE_DOWN_SECONDS)
_register("redis-sigkill-60s-mid-burst", "rdkill60", "redis", LONG_DOWN_SECONDS)
_register("redis-unreachable-60s-mid-burst", "rdstop60", "redis", LONG_DOWN_SECONDS,
          freeze=True)
