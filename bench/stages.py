"""Where the steady phase's latency goes: the timeline of each single-event run, read from the
Prefect API after the phase (so the reads cost the phase nothing).

For every run of one event: when it was created, Pending, Running, each task's start and end, the
notification's arrival on the origin topic (the bench's collector) and Completed, all as seconds
after the event was sent (one host, one clock). The medians of each point, in order, are the
typical run's timeline: the steps between two points are what a change must shorten.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from bench.chain import chain_runs, event_ids, node_client
from bench.collect import Collector
from bench.events import BenchEvent
from bench.stats import percentile
from localnode.node import NodeState

log = logging.getLogger(__name__)

SLOWEST = 3  # runs of the tail shown beside the medians


class Point(BaseModel):
    name: str
    p50: float  # seconds after the event was sent, median over the runs
    p90: float
    runs: int  # runs that have this point


class Timeline(BaseModel):
    runs: int  # single-event runs of the phase read
    points: list[Point]  # in the order of their medians
    # the runs whose notification arrived last (the latency's tail): each point's seconds
    slowest: list[dict[str, float]] = []
    error: str | None = None


def _seconds(when: datetime | None) -> float | None:
    return when.timestamp() if when is not None else None


def _task_name(name: str) -> str:
    """`publish-notification-3f2` -> `publish-notification` (Prefect adds a suffix)."""
    head, _, tail = name.rpartition("-")
    return head if head and len(tail) <= 4 else name


async def _timelines(node: NodeState, phase_marker: str,
                     sent_by_event: Mapping[str, float], arrival_by_event: Mapping[str, float],
                     ) -> list[dict[str, float]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found: list[dict[str, float]] = []
    async with node_client(node) as client:
        async for run in chain_runs(client):
            ids = event_ids(run.parameters)
            if len(ids) != 1 or phase_marker not in ids[0] or ids[0] not in sent_by_event:
                continue
            sent = sent_by_event[ids[0]]
            points: dict[str, float] = {}
            for state in await client.read_flow_run_states(run.id):
                label = f"flow run {state.type.value.title()}"
                if label not in points and (at := _seconds(state.timestamp)) is not None:
                    points[label] = at - sent
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[run.id])))
            for task in tasks:
                name = _task_name(task.name)
                if (start := _seconds(task.start_time)) is not None:
                    points.setdefault(f"{name} started", start - sent)
                if (end := _seconds(task.end_time)) is not None:
                    points.setdefault(f"{name} ended", end - sent)
            if ids[0] in arrival_by_event:
                points["notification received"] = arrival_by_event[ids[0]] - sent
            found.append(points)
    return found


def steady_timeline(node: NodeState, phase_marker: str, events: Sequence[BenchEvent],
                    sent: Mapping[str, float], collector: Collector) -> Timeline:
    """The median timeline of the phase's single-event runs (`sent`: data_id -> wall time)."""
    sent_by_event: dict[str, float] = {}
    arrival_by_event: dict[str, float] = {}
    for event in events:
        event_id = str(json.loads(event.payload).get("id", ""))
        if event.data_id in sent:
            sent_by_event[event_id] = sent[event.data_id]
            if arrivals := collector.arrivals.get(event.data_id):
                arrival_by_event[event_id] = arrivals[0]
    try:
        runs = asyncio.run(_timelines(node, phase_marker, sent_by_event, arrival_by_event))
    except Exception as exc:  # reported, never fails the bench
        log.warning("cannot read the steady runs' timelines: %s", exc)
        return Timeline(runs=0, points=[], error=str(exc))
    return summarize_runs(runs)


def summarize_runs(runs: Sequence[Mapping[str, float]]) -> Timeline:
    """The median and p90 of each point over `runs` (each a point's seconds after its event
    was sent), and the `SLOWEST` runs by their notification's arrival."""
    by_point: dict[str, list[float]] = defaultdict(list)
    for points in runs:
        for name, value in points.items():
            by_point[name].append(value)
    summary = [Point(name=name, p50=round(statistics.median(values), 4),
                     p90=round(percentile(values, 90) or 0.0, 4), runs=len(values))
               for name, values in by_point.items()]
    late = sorted((points for points in runs if "notification received" in points),
                  key=lambda points: -points["notification received"])[:SLOWEST]
    return Timeline(runs=len(runs), points=sorted(summary, key=lambda p: p.p50),
                    slowest=[{k: round(v, 4) for k, v in points.items()} for points in late])


def markdown(timeline: Mapping[str, Any]) -> list[str]:
    """The timeline as a table (each point's median and p90, seconds after the event was sent)."""
    if timeline.get("error"):
        return [f"- steady timeline: not read ({timeline['error']})"]
    slowest = timeline.get("slowest") or []
    lines = [f"Steady phase, the timeline of {timeline['runs']} single-event runs (seconds after "
             "the event was sent; then the runs whose notification arrived last):", "",
             "| point | p50 | p90 | runs |" + "".join(f" slowest {i + 1} |"
                                                   for i in range(len(slowest))),
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(slowest)]
    for p in timeline["points"]:
        tail = "".join(f" {_at(run.get(p['name']))} |" for run in slowest)
        lines.append(f"| {p['name']} | {p['p50']:.3f} | {p['p90']:.3f} | {p['runs']} |{tail}")
    return lines


def _at(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"
