"""The in-process floor: the same kind of events through parse -> build -> validate -> publish in
one Python loop, no Prefect, no listener, one MQTT connection, against the node's broker.

It is what the chain's code costs by itself; the chain's throughput divided by the floor's
throughput says how much the orchestration (listener, Prefect API, worker, one process per
flow run) costs on top of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from pydantic import BaseModel

from bench.collect import Collector
from bench.events import BenchEvent
from bench.stats import LatencySummary, summarize
from chain.mqtt import MqttConnection, Publisher
from wis2.cloudevent import parse_event
from wis2.dataset import DatasetDescription
from wis2.mapping import build_notifications
from wis2.validation import validate_notification

log = logging.getLogger(__name__)


class StageTimes(BaseModel):
    """Mean milliseconds per event of each step."""

    parse_ms: float
    build_ms: float
    validate_ms: float
    publish_ms: float


class FloorResult(BaseModel):
    events: int
    cold_first_event_ms: float  # the first event of a fresh process (schemas loaded), not counted
    published: int
    invalid: int
    errors: list[str]
    loop_seconds: float
    throughput_eps: float
    stages: StageTimes
    received: int
    lost: int
    latency: LatencySummary  # loop picks the event up -> subscriber receives the notification


def run_floor(
    events: Sequence[BenchEvent],
    dataset: DatasetDescription,
    publisher: MqttConnection,
    collector: Collector,
    receive_timeout: float = 30.0,
) -> FloorResult:
    """Process `events` one after the other; the collector must already be subscribed.

    The first event warms the process up (schema loading, first connection use): it is timed
    apart (`cold_first_event_ms`, what every new flow-run process pays) and not counted."""
    warmup, events = events[0], events[1:]
    if not events:
        raise ValueError("the floor needs at least 2 events (the first one warms up)")
    parse_s = build_s = validate_s = publish_s = 0.0
    published = invalid = 0
    errors: list[str] = []
    started: dict[str, float] = {}
    with Publisher(publisher) as pub:
        t_cold = time.perf_counter()
        for note in build_notifications(parse_event(warmup.payload), dataset):
            validate_notification(note.to_dict(), topic=dataset.topic, profile="publish")
            pub.publish(dataset.topic, note.to_json().encode("utf-8"), qos=1)
        cold_ms = 1000 * (time.perf_counter() - t_cold)
        loop_start = time.perf_counter()
        for event in events:
            started[event.data_id] = time.time()
            t0 = time.perf_counter()
            try:
                parsed = parse_event(event.payload)
                t1 = time.perf_counter()
                notifications = build_notifications(parsed, dataset)
                t2 = time.perf_counter()
                reports = [
                    validate_notification(n.to_dict(), topic=dataset.topic, profile="publish")
                    for n in notifications
                ]
                t3 = time.perf_counter()
                parse_s += t1 - t0
                build_s += t2 - t1
                validate_s += t3 - t2
                for note, report in zip(notifications, reports, strict=True):
                    if not report.ok:
                        invalid += 1
                        errors.append(f"{event.name}: " + "; ".join(
                            f"{c.id}: {c.message}" for c in report.failures))
                        continue
                    pub.publish(dataset.topic, note.to_json().encode("utf-8"), qos=1)
                    published += 1
                publish_s += time.perf_counter() - t3
            except Exception as exc:  # report, never stop the measurement
                errors.append(f"{event.name}: {exc}")
        loop_seconds = time.perf_counter() - loop_start

    deadline = time.monotonic() + receive_timeout
    collector.wait_for([e.data_id for e in events], deadline)
    latencies = []
    for event in events:
        arrived = collector.first_arrival(event.data_id)
        if arrived is not None:
            latencies.append(arrived - started[event.data_id])
    n = max(len(events), 1)
    return FloorResult(
        events=len(events),
        cold_first_event_ms=round(cold_ms, 1),
        published=published,
        invalid=invalid,
        errors=errors[:20],
        loop_seconds=round(loop_seconds, 3),
        throughput_eps=round(len(events) / loop_seconds, 2) if loop_seconds > 0 else 0.0,
        stages=StageTimes(
            parse_ms=round(1000 * parse_s / n, 3), build_ms=round(1000 * build_s / n, 3),
            validate_ms=round(1000 * validate_s / n, 3),
            publish_ms=round(1000 * publish_s / n, 3),
        ),
        received=len(latencies),
        lost=len(events) - len(latencies),
        latency=summarize(latencies),
    )
