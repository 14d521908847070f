"""The chain phases of the benchmark: events published as the file server on the node's broker,
notifications received on the origin topic, flow runs counted through the Prefect API.

- steady: one event every 1/rate seconds for `seconds`, then wait (bounded) for the stragglers;
  latency = event published -> notification received.
- burst: `count` distinct events published back to back; time to drain = first event published ->
  last notification received, bounded by `drain_timeout` (what arrived by then is reported).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from bench.collect import Collector
from bench.events import BenchEvent
from bench.stats import LatencySummary, summarize
from chain.deployments import PUBLISH_BATCH_FLOW, PUBLISH_NOTIFICATION_FLOW
from chain.failures import UNAVAILABLE
from chain.mqtt import MqttConnection, MqttError, Publisher
from worker.recovery import RECOVERING

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter

    from localnode.node import NodeState

log = logging.getLogger(__name__)

FLOW_NAMES = (PUBLISH_NOTIFICATION_FLOW, PUBLISH_BATCH_FLOW)


class Delivery(BaseModel):
    """What came back for a set of events."""

    events_sent: int
    publish_errors: list[str]
    received: int
    lost: int  # sent, no notification by the deadline
    duplicate_data_ids: int  # data_ids received more than once
    duplicate_messages: int  # extra copies beyond the first, all data_ids together
    distinct_message_ids_for_duplicates: int  # >0: a second, DIFFERENT message for a file


class SteadyResult(Delivery):
    rate: float
    seconds: float
    latency: LatencySummary
    waited_seconds: float  # after the last event, for the stragglers


class BurstResult(Delivery):
    publish_seconds: float  # to publish all events (PUBACK each)
    drained: bool  # every event's notification arrived before the deadline
    drain_seconds: float | None  # first publish -> last notification (None: not drained)
    elapsed_seconds: float  # first publish -> end of the wait
    first_notification_seconds: float | None
    throughput_eps: float  # notifications received per second of elapsed (or drain) time
    latency: LatencySummary


class FlowRunCounts(BaseModel):
    """States of the flow runs (publish-notification and publish-batch) of one phase, matched
    to the phase's events by their ids."""

    total: int
    batch_runs: int = 0  # runs handling several events (publish-batch)
    events_covered: int = 0  # distinct events of the phase found in some run
    by_state: dict[str, int]
    failed: int  # FAILED or CRASHED
    unfinished: int  # SCHEDULED, PENDING, RUNNING, PAUSED... at the time of the query
    events_with_several_runs: int
    error: str | None = None


def delivery_counts(events: Sequence[BenchEvent], collector: Collector, errors: list[str],
                    sent: dict[str, float]) -> dict:
    received = dup_ids = dup_msgs = distinct_dups = 0
    for event in events:
        if event.data_id not in sent:
            continue
        copies, distinct = collector.copies(event.data_id)
        if copies:
            received += 1
        if copies > 1:
            dup_ids += 1
            dup_msgs += copies - 1
            distinct_dups += distinct - 1
    return {
        "events_sent": len(sent), "publish_errors": errors[:20], "received": received,
        "lost": len(sent) - received, "duplicate_data_ids": dup_ids,
        "duplicate_messages": dup_msgs, "distinct_message_ids_for_duplicates": distinct_dups,
    }


def _latencies(events: Sequence[BenchEvent], collector: Collector,
               sent: dict[str, float]) -> list[float]:
    out = []
    for event in events:
        arrived = collector.first_arrival(event.data_id)
        if arrived is not None and event.data_id in sent:
            out.append(arrived - sent[event.data_id])
    return out


def run_steady(
    events: Sequence[BenchEvent], conn: MqttConnection, topic: str, collector: Collector,
    rate: float, drain_timeout: float, abort: threading.Event,
    sent: dict[str, float] | None = None,
) -> SteadyResult:
    """`sent`: filled with each event's send time (data_id -> wall time)."""
    sent = {} if sent is None else sent
    errors: list[str] = []
    with Publisher(conn) as pub:
        t0 = time.monotonic()
        for i, event in enumerate(events):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0 and abort.wait(delay):
                break
            if abort.is_set():
                break
            sent[event.data_id] = time.time()
            try:
                pub.publish(topic, event.payload, qos=1)
            except MqttError as exc:
                errors.append(f"{event.name}: {exc}")
                del sent[event.data_id]
    end_sent = time.monotonic()
    collector.wait_for(sent, end_sent + drain_timeout, abort)
    waited = time.monotonic() - end_sent
    return SteadyResult(
        rate=rate, seconds=round(len(events) / rate, 1),
        latency=summarize(_latencies(events, collector, sent)),
        waited_seconds=round(waited, 1), **delivery_counts(events, collector, errors, sent),
    )


def run_burst(
    events: Sequence[BenchEvent], conn: MqttConnection, topic: str, collector: Collector,
    drain_timeout: float, abort: threading.Event,
) -> BurstResult:
    sent: dict[str, float] = {}
    errors: list[str] = []
    with Publisher(conn) as pub:
        start_wall, start = time.time(), time.monotonic()
        for event in events:
            if abort.is_set():
                break
            sent[event.data_id] = time.time()
            try:
                pub.publish(topic, event.payload, qos=1)
            except MqttError as exc:
                errors.append(f"{event.name}: {exc}")
                del sent[event.data_id]
        publish_seconds = time.monotonic() - start
    drained = collector.wait_for(sent, start + drain_timeout, abort)
    elapsed = time.monotonic() - start
    arrivals = [t for t in (collector.first_arrival(d) for d in sent) if t is not None]
    last = max(arrivals) - start_wall if arrivals else None
    first = min(arrivals) - start_wall if arrivals else None
    span = last if drained and last else elapsed
    return BurstResult(
        publish_seconds=round(publish_seconds, 3),
        drained=drained and bool(sent),
        drain_seconds=round(last, 2) if drained and last is not None else None,
        elapsed_seconds=round(elapsed, 2),
        first_notification_seconds=round(first, 2) if first is not None else None,
        throughput_eps=round(len(arrivals) / span, 3) if span else 0.0,
        latency=summarize(_latencies(events, collector, sent)),
        **delivery_counts(events, collector, errors, sent),
    )


def event_ids(parameters: dict) -> list[str]:
    """The ids of the events a run handles: `event` (publish-notification) or `events`
    (publish-batch). A run is named after its file only once it starts, so runs are matched to
    events by their parameters."""
    if not isinstance(parameters, dict):
        return []
    events = parameters.get("events")
    if not isinstance(events, list):
        events = [parameters.get("event")]
    return [str(e.get("id", "")) for e in events if isinstance(e, dict)]


@asynccontextmanager
async def node_client(node: NodeState,
                      requests: Counter[str] | None = None) -> AsyncIterator[PrefectClient]:
    """A Prefect client of the node's API (this process's own settings left as they are);
    `requests` counts its requests by route (bench/api_requests.py), retries included."""
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    from bench.api_requests import route

    httpx_settings = None
    if requests is not None:
        async def count(request) -> None:
            requests[route(request.method, request.url.path)] += 1

        httpx_settings = {"event_hooks": {"request": [count]}}
    with temporary_settings(updates=node.prefect_settings()):
        async with get_client(httpx_settings=httpx_settings) as client:
            yield client


def _chain_flows() -> FlowFilter:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return FlowFilter(name=FlowFilterName(any_=list(FLOW_NAMES)))


def _state_key(state: Any) -> str:
    """The state type, but UNAVAILABLE for a Failed run the recovery will schedule again
    (`chain.failures`: a service was unavailable): not final yet."""
    if state is None:
        return "NONE"
    if state.type.value == "FAILED" and state.name == UNAVAILABLE:
        return "UNAVAILABLE"
    return state.type.value


async def chain_runs(client: PrefectClient) -> AsyncIterator[Any]:
    """Every run of the chain's flows, read page by page."""
    offset = 0
    while True:
        page = await client.read_flow_runs(flow_filter=_chain_flows(), limit=200, offset=offset)
        for run in page:
            yield run
        if len(page) < 200:
            return
        offset += len(page)


async def _read_runs(node: NodeState,
                     requests: Counter[str] | None = None) -> list[tuple[list[str], str]]:
    async with node_client(node, requests) as client:
        return [(event_ids(r.parameters), _state_key(r.state)) async for r in chain_runs(client)]


def rescheduled_after_unavailable(node: NodeState, phase_marker: str) -> int:
    """How many runs of the phase failed because a service was unavailable (a Failed state
    named Unavailable in their history, `chain.failures`) and were scheduled again."""
    return _runs_whose_states(node, phase_marker, lambda s: s.is_failed()
                              and s.name == UNAVAILABLE)


def rescheduled_as_their_workers_died(node: NodeState, phase_marker: str) -> int:
    """How many runs of the phase the recovery rescheduled because it judged their worker dead
    (a `Recovering` state naming the worker, `worker.recovery.stranded_reason`): in a phase
    where no worker dies, each is a live worker's run taken from it."""
    return _runs_whose_states(node, phase_marker, lambda s: s.is_scheduled()
                              and s.name == RECOVERING and "its worker " in (s.message or ""))


def _runs_whose_states(node: NodeState, phase_marker: str, which: Callable[[Any], bool]) -> int:
    """How many runs of the phase have a state `which` accepts in their history (-1: unknown)."""

    async def count() -> int:
        found = 0
        async with node_client(node) as client:
            async for run in chain_runs(client):
                if any(phase_marker in i for i in event_ids(run.parameters)):
                    states = await client.read_flow_run_states(run.id)
                    found += any(which(s) for s in states)
        return found

    try:
        return asyncio.run(count())
    except Exception as exc:  # reported as unknown, never fails the bench
        log.warning("cannot read flow run states: %s", exc)
        return -1


def flow_run_counts(node: NodeState, phase_marker: str, settle: float = 0.0,
                    requests: Counter[str] | None = None) -> FlowRunCounts:
    """Count the flow runs whose event id contains `phase_marker` (the events of one phase);
    wait up to `settle` seconds for the unfinished ones (they finish after publishing).
    `requests`: counts the API requests made for it, by route."""
    deadline = time.monotonic() + settle
    counts = _flow_run_counts(node, phase_marker, requests)
    while counts.unfinished and counts.error is None and time.monotonic() < deadline:
        time.sleep(2)
        counts = _flow_run_counts(node, phase_marker, requests)
    return counts


def _flow_run_counts(node: NodeState, phase_marker: str,
                     requests: Counter[str] | None = None) -> FlowRunCounts:
    try:
        runs = asyncio.run(_read_runs(node, requests))
    except Exception as exc:  # the server may be overloaded: report it, do not fail the bench
        log.warning("cannot read flow runs: %s", exc)
        return FlowRunCounts(total=0, by_state={}, failed=0, unfinished=0,
                             events_with_several_runs=0, error=str(exc))
    mine = [(ids, state) for ids, state in runs if any(phase_marker in i for i in ids)]
    states = Counter(state for _, state in mine)
    per_event = Counter(i for ids, _ in mine for i in ids if phase_marker in i)
    finished = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    return FlowRunCounts(
        total=len(mine), by_state=dict(sorted(states.items())),
        failed=states["FAILED"] + states["CRASHED"],
        unfinished=sum(n for s, n in states.items() if s not in finished),
        batch_runs=sum(1 for ids, _ in mine if len(ids) > 1),
        events_covered=len(per_event),
        events_with_several_runs=sum(1 for n in per_event.values() if n > 1),
    )


async def _delete_unstarted(node: NodeState) -> int:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    unstarted = FlowRunFilter(state=FlowRunFilterState(
        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])))
    deleted = 0
    async with node_client(node) as client:
        while True:
            page = await client.read_flow_runs(flow_filter=_chain_flows(),
                                               flow_run_filter=unstarted, limit=200)
            for run in page:
                await client.delete_flow_run(run.id)
            deleted += len(page)
            if len(page) < 200:
                return deleted


def delete_unstarted_runs(node: NodeState) -> int:
    """Delete the runs no worker has taken (after the intake phase, with the pool paused)."""
    return asyncio.run(_delete_unstarted(node))
