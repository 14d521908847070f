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
