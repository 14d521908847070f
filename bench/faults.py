"""The fault phase of the benchmark (`--faults`): one process of the live node dies (SIGKILL) in
the middle of the work, comes back, and we count what reached `origin/a/wis2/#`.

Each scenario is a function registered with `@scenario("name")`; it receives a `FaultContext`
(the running node, an event factory whose events name files the node's file server really serves,
the origin-topic collector) and returns a `FaultResult`: events sent, notifications lost, data_ids
published more than once, time to recover, runs left unfinished. Adding a scenario is one more
decorated function in this module (or in a module `bench/options.py` imports, so that `bench.run`
knows its name, as `bench/faults_scaled.py`): see `worker_sigkill_mid_burst`, the shortest.

"Mid-burst" is made, never raced: the node's file server holds every download while its gate is
closed (`bench/gated_files.py`), so flow runs that verify their data are provably Running when
the process is killed; the listener is provably away (stopped) or provably holding events (its
`/metrics`) before anything is killed. Every wait has a deadline.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench import chain
from bench.collect import Collector
from bench.events import BenchEvent, EventFactory
from bench.intake import ListenerCounters, read_counters
from bench.node import PROFILE_LISTENER_SETTINGS, BenchNode
from chain.mqtt import Publisher
from localnode.scaled import Topology

log = logging.getLogger(__name__)

# What the chain's processes need for the fault phase: the flows download and check each file
# (so runs hold at the file server's gate), and a download may wait at the gate for as long as a
# scenario keeps it closed.
FAULT_ENV = {"WIS2_VERIFY_DATA": "true", "WIS2_VERIFY_TIMEOUT": "600"}


class FaultResult(BaseModel):
    scenario: str
    events_sent: int
    received: int = 0
    lost: int = 0  # sent, no notification by the deadline
    duplicate_data_ids: int = 0  # data_ids received more than once
    distinct_message_ids_for_duplicates: int = 0  # >0: a second, DIFFERENT message for a file
    killed: str = ""  # what was killed, and what was in flight at that moment
    saved_after_ack_seconds: float | None = None  # broker: last PUBACK -> database written
    down_seconds: float | None = None  # kill -> the process answers again
    recovery_seconds: float | None = None  # the process answers again -> last notification
    runs: chain.FlowRunCounts | None = None  # the scenario's runs, after settling
    unfinished_runs: int = 0  # Scheduled/Pending/Running... left at the end
    # runs failed because a service was unavailable, then scheduled again (chain.failures)
    runs_rescheduled_unavailable: int = 0
    error: str | None = None  # the scenario could not be carried out as designed


@dataclass
class FaultContext:
    node: BenchNode
    factory: EventFactory  # real_files=True
    collector: Collector
    events: int  # events per scenario
    timeout: float  # deadline of each wait (seconds)
    topic: str
    settle_seconds: float = 3.0  # after the last notification, watch for duplicates this long
    server_down_seconds: float = 0.0  # keep the killed Prefect server down at least this long
    notes: dict[str, Any] = field(default_factory=dict)

    # ---- the file server's gate -----------------------------------------------------------
    def close_gate(self) -> None:
        self.node.gate_file.touch()

    def open_gate(self) -> None:
        self.node.gate_file.unlink(missing_ok=True)

    def gate(self) -> dict[str, Any]:
        s = self.node.settings
        url = f"http://{s.host}:{s.files_port}/_gate"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    # ---- waiting ----------------------------------------------------------------------------
    def wait(self, what: str, condition: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except OSError:  # a process being restarted
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{what}: not within {timeout or self.timeout:.0f}s")

    def wait_listener_subscribed(self) -> None:
        """The node is up once the listener serves /metrics, which it does before its broker
        session has subscribed: on a new session, an event published in between would not be
        queued for it. Wait for its `subscribed` log line (logged on the broker's SUBACK), in
        the log of every listener replica."""
        for listener in self.node.listeners():
            log_path = listener.log_path
            self.wait(f"{listener.name}'s subscription acknowledged by the broker",
                      lambda p=log_path: "msg=subscribed" in (text := p.read_text(
                          errors="replace")) or '"msg": "subscribed"' in text)

    def counters(self) -> ListenerCounters:
        """The listener's counters (summed over the replicas of a scaled node)."""
        return read_counters(self.node.listener_metrics_urls())

    def hold_in_flight(self, events: Sequence[BenchEvent], before: ListenerCounters,
                       slots: int | None = None, what: str = "") -> tuple[int, int]:
        """With the gate closed: publish `events`, wait until the listener has acknowledged
        them (each in a flow run) and until the runs the workers took (`slots` at most;
        default: one worker's limit) are held at the gate; (runs created, downloads held)."""
        self.publish(events)
        self.wait(f"the listener acknowledges {what or 'the burst'} (each event in a flow run)",
                  lambda: (c := self.counters()).received - before.received >= len(events)
                  and c.in_flight == 0)
        runs = int(self.counters().runs_created - before.runs_created)
        in_flight = max(1, min(runs, slots or self.node.settings.worker_limit))
        self.wait(f"{in_flight} flow run(s) held at the file server's gate (Running, each "
                  "verifying the data of its first event)",
                  lambda: self.gate()["held"] >= in_flight)
        return runs, self.gate()["held"]

    def publish(self, events: Sequence[BenchEvent]) -> None:
        """As the file server: QoS 1, each one acknowledged by the broker (PUBACK)."""
        with Publisher(self.node.state.connection("fileserver")) as pub:
            for event in events:
                pub.publish(self.topic, event.payload, qos=1)


Scenario = Callable[[FaultContext], FaultResult]
SCENARIOS: dict[str, Scenario] = {}
REPLICAS_NEEDED: dict[str, int] = {}  # scenario -> listener replicas it needs (default 1)


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    """Register a fault scenario under `name` (the key of its results)."""

    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


def count_deliveries(ctx: FaultContext, result: FaultResult, events: Sequence[BenchEvent],
                     back_at: float, marker: str) -> FaultResult:
    """Wait for every event's notification (bounded), then count lost / duplicated / runs.
    `back_at`: wall-clock time the killed process answered again; `marker`: what the ids of
    the scenario's events contain (`_<phase>_`)."""
    data_ids = [e.data_id for e in events]
    ctx.collector.wait_for(data_ids, time.monotonic() + ctx.timeout)
    time.sleep(ctx.settle_seconds)  # a duplicate would come right after
    arrivals = [t for t in (ctx.collector.first_arrival(d) for d in data_ids) if t is not None]
    dup_ids = distinct = 0
    for data_id in data_ids:
        copies, ids = ctx.collector.copies(data_id)
        if copies > 1:
            dup_ids += 1
            distinct += ids - 1
    result.received = len(arrivals)
    result.lost = len(events) - len(arrivals)
    result.duplicate_data_ids = dup_ids
    result.distinct_message_ids_for_duplicates = distinct
    if arrivals and not result.lost:
        result.recovery_seconds = round(max(max(arrivals) - back_at, 0.0), 2)
    runs = chain.flow_run_counts(ctx.node.state, marker, settle=30 if not result.lost else 5)
    result.runs = runs
    result.unfinished_runs = runs.unfinished
    result.runs_rescheduled_unavailable = chain.rescheduled_after_unavailable(ctx.node.state,
                                                                             marker)
    return result


def wall_from_monotonic(t: float) -> float:
    """The wall-clock time of a time.monotonic() reading (the collector stamps with time.time())."""
    return time.time() - (time.monotonic() - t)


@scenario("prefect-server-sigkill-mid-burst")
def prefect_server_sigkill_mid_burst(ctx: FaultContext) -> FaultResult:
    """Half the burst is in flow runs held Running at the file server's gate, the Prefect server
    is SIGKILLed, the other half is published while it is down (the listener holds it), the held
    runs are released while the server is still down (their next API calls fail and are
    retried), then the server is started again on the same port and database."""
    name = "prefect-server-sigkill-mid-burst"
    phase = "server"
    events = ctx.factory.batch(phase, ctx.events)
    first, second = events[: (len(events) + 1) // 2], events[(len(events) + 1) // 2:]
    result = FaultResult(scenario=name, events_sent=len(events))
    server = ctx.node.server
    assert server is not None
    before = ctx.counters()
    ctx.close_gate()
    try:
        _, held = ctx.hold_in_flight(first, before, what="the first half")
        server.kill()
        killed_at = time.monotonic()
        ctx.publish(second)
        # The listener takes some of them and cannot acknowledge them (no API to create their
        # runs); it stops reading beyond what it holds, and the broker keeps the rest.
        ctx.wait("the listener holds events of the second half, unacknowledged",
                 lambda: (c := ctx.counters()).received - before.received > len(first)
                 and c.in_flight >= 1)
        holding = int(ctx.counters().in_flight)
        result.killed = (f"Prefect server SIGKILLed with {held} download(s) of Running flow runs "
                         f"held at the file server; then {len(second)} more events published, "
                         f"{holding} of them held unacknowledged by the listener (any others "
                         "queued in the broker)")
    finally:
        ctx.open_gate()  # the held runs go on, and call the API while it is down
    time.sleep(max(1.0, ctx.server_down_seconds - (time.monotonic() - killed_at)))
    server.start(timeout=180)
    back_at = time.monotonic()
    result.down_seconds = round(back_at - killed_at, 2)
    log.info("%s: server back after %.1f s", name, result.down_seconds)
    return count_deliveries(ctx, result, events, wall_from_monotonic(back_at), f"_{phase}_")


# Mosquitto acknowledges a QoS 1 PUBLISH, then writes its database at the end of the same loop
# iteration (autosave_on_changes, autosave_interval 1): the broker is killed once the last event
# acknowledged is seen in that file, or after this long (the 60-second timer of the former
# setting never gets there).
SAVE_WAIT_SECONDS = 5.0


def wait_for_broker_save(db: Path, last: bytes, timeout: float) -> float | None:
    """Wait until mosquitto's database file `db` holds `last` (bytes of the last message it
    acknowledged; the file is written whole and renamed into place, so each read is a complete
    save, and a save holding the last message holds every earlier one still queued). The
    monotonic time it was seen, or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if last in db.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    return None


@scenario("broker-sigkill-listener-away")
def broker_sigkill_listener_away(ctx: FaultContext) -> FaultResult:
    """The listener is stopped (a deploy, a restart); the file server publishes the burst and the
    broker acknowledges each event (QoS 1, queued in the listener's persistent session); the
    broker is SIGKILLed and started again on the same persistence directory; the listener is
    started again."""
    name = "broker-sigkill-listener-away"
    phase = "broker"
    events = ctx.factory.batch(phase, ctx.events)
    result = FaultResult(scenario=name, events_sent=len(events))
    broker = ctx.node.broker
    assert broker is not None
    listeners = ctx.node.listeners()  # every replica away
    for listener in listeners:
        listener.stop()
    ctx.publish(events)  # every PUBACK received: the broker holds them for the listener
    acked = time.monotonic()
    saved = wait_for_broker_save(broker.run_dir / "data" / "mosquitto.db",
                                 events[-1].name.encode(), SAVE_WAIT_SECONDS)
    if saved is not None:
        result.saved_after_ack_seconds = round(saved - acked, 3)
    broker.kill()
    killed_at = time.monotonic()
    result.killed = (f"mosquitto SIGKILLed after acknowledging {len(events)} events to the file "
                     "server (the listener stopped), " + (
                         f"{result.saved_after_ack_seconds} s after the last acknowledgement, "
                         "once its database file held the last event" if saved is not None else
                         f"its database file did not hold the last event {SAVE_WAIT_SECONDS:.0f} "
                         "s after the last acknowledgement"))
    broker.start(timeout=60)
    for listener in listeners:
        listener.start(timeout=90)
    back_at = time.monotonic()
    result.down_seconds = round(back_at - killed_at, 2)
    return count_deliveries(ctx, result, events, wall_from_monotonic(back_at), f"_{phase}_")


@scenario("worker-sigkill-mid-burst")
def worker_sigkill_mid_burst(ctx: FaultContext) -> FaultResult:
    """The whole burst is in flow runs, those the worker took held Running at the file server's
    gate; the worker is SIGKILLed (its process group: with the process worker, its flow-run
    processes too) and started again with the same command line (same `--name`): its recovery
    (worker/recovery.py) reschedules the runs the dead worker had claimed."""
    name = "worker-sigkill-mid-burst"
    phase = "worker"
    events = ctx.factory.batch(phase, ctx.events)
    result = FaultResult(scenario=name, events_sent=len(events))
    worker = ctx.node.process("worker")
    before = ctx.counters()
    ctx.close_gate()
    try:
        runs, held = ctx.hold_in_flight(events, before)
        worker.kill()
        killed_at = time.monotonic()
        result.killed = (f"worker SIGKILLed with {held} download(s) of Running flow runs held at "
                         f"the file server, {runs} run(s) created for {len(events)} events")
    finally:
        ctx.open_gate()
    worker.start()
    back_at = time.monotonic()
    result.down_seconds = round(back_at - killed_at, 2)
    return count_deliveries(ctx, result, events, wall_from_monotonic(back_at), f"_{phase}_")


def prepare(node: BenchNode) -> None:
    """Make the node's flows verify their data (restart the worker with FAULT_ENV if needed)."""
    node.gate_file.unlink(missing_ok=True)
    node.extra_env.update(FAULT_ENV)
    for worker in [p for p in node.processes if p.name.split("-")[0] == "worker"]:
        if any(worker.env.get(k) != v for k, v in FAULT_ENV.items()):
            worker.stop(timeout=60)
            worker.env.update(FAULT_ENV)
            worker.start()


def run_faults(ctx: FaultContext, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the scenarios (by default all registered ones this node can run), one after the
    other."""
    prepare(ctx.node)
    ctx.wait_listener_subscribed()
    results: dict[str, Any] = {}
    replicas = len(ctx.node.listeners())
    for name in names or [n for n in SCENARIOS if REPLICAS_NEEDED.get(n, 1) <= replicas]:
        log.info("fault scenario %s (%d events)", name, ctx.events)
        t0 = time.monotonic()
        try:
            result = SCENARIOS[name](ctx)
        except Exception as exc:
            log.exception("fault scenario %s could not be carried out", name)
            result = FaultResult(scenario=name, events_sent=ctx.events, error=repr(exc)[:500])
        finally:
            ctx.open_gate()
        results[name] = {**result.model_dump(), "seconds": round(time.monotonic() - t0, 1)}
        log.info("fault scenario %s: %d/%d received, %d lost, %d duplicated, recovery %s s",
                 name, result.received, result.events_sent, result.lost,
                 result.duplicate_data_ids, result.recovery_seconds)
    return results


@contextmanager
def fault_node(run_dir: Path, database: str = "sqlite", events: int = 10,
               timeout: float = 180.0, tag: str = "FAULT", topology: Topology | None = None,
               worker_limit: int = 8, env: dict[str, str] | None = None
               ) -> Iterator[FaultContext]:
    """A whole node on free ports, ready for the scenarios (flows verify their data at the gated
    file server; Prefect on SQLite, or on a PostgreSQL cluster of its own; with `topology`, the
    scaled node: its workers and listener replicas, its own PostgreSQL and Redis shared by
    them), and the origin-topic collector: what the tests use; `env`: more environment of the
    chain's processes. Everything is stopped on exit."""
    from bench.node import ScaledBenchNode
    from chain.processes import free_port
    from localnode.node import NodeSettings
    from localnode.postgres import PostgresCluster
    from wis2.dataset import load_dataset

    postgres = None
    node: BenchNode | None = None
    try:
        database_url = None
        if database == "postgres" and topology is None:
            postgres = PostgresCluster(log_path=run_dir / "postgres.log").start()
            database_url = postgres.create_database("prefect")
        ports: list[int] = []
        while len(ports) < 5:
            port = free_port()
            if port not in ports:
                ports.append(port)
        broker, ws, prefect, files, metrics = ports
        settings = NodeSettings(
            _env_file=None, run_dir=run_dir / "node", broker_port=broker, broker_ws_port=ws,
            prefect_port=prefect, files_port=files, metrics_port=metrics, verify_data=True,
            database_url=database_url, database="sqlite", worker_type="warm",
            worker_limit=worker_limit)
        if topology is not None:
            node = ScaledBenchNode(settings, extra_env={**FAULT_ENV, **(env or {})},
                                   topology=topology,
                                   listener_settings=PROFILE_LISTENER_SETTINGS["scaled"])
        else:
            node = BenchNode(settings, extra_env={**FAULT_ENV, **(env or {})},
                             listener_settings=PROFILE_LISTENER_SETTINGS.get(database, {}))
        node.postgres = postgres
        node.start()
        state = node.state
        factory = EventFactory(load_dataset("argo"), tag, files_url=state.files_url,
                               real_files=True)
        with Collector(state.connection("everyone"), settings.centre_id) as collector:
            ctx = FaultContext(node=node, factory=factory, collector=collector, events=events,
                               timeout=timeout, topic=settings.event_topic)
            ctx.wait_listener_subscribed()
            yield ctx
    finally:
        if node is not None:
            node.stop()
        if postgres is not None:
            postgres.cleanup()
