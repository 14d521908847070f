"""The listener's intake alone: events published at once -> every message acknowledged.

The work pool is paused for this phase, so the worker takes no run and the listener's rate is
measured against the Prefect API alone. Progress is read from the listener's own Prometheus
endpoint: messages received, flow runs created, and messages still unacknowledged. The phase is
over when every event was received and nothing is left unacknowledged (each message then has its
run, or is in the dead-letter store).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Sequence

from pydantic import BaseModel

from bench.events import BenchEvent
from chain.mqtt import MqttConnection, MqttError, Publisher

log = logging.getLogger(__name__)


class ListenerCounters(BaseModel):
    received: float = 0.0  # wis2_listener_events_received_total
    runs_created: float = 0.0  # wis2_listener_runs_created_total, all deployments
    rejected: float = 0.0  # wis2_listener_rejected_total, all reasons
    in_flight: float = 0.0  # wis2_listener_in_flight


class IntakeResult(BaseModel):
    events_sent: int
    publish_errors: list[str]
    publish_seconds: float
    completed: bool  # every event received and acknowledged before the deadline
    intake_seconds: float | None  # first publish -> last acknowledgement
    intake_eps: float | None  # events acknowledged per second
    runs_created: int  # flow runs the listener created for them
    rejected: int  # dead-lettered (should be 0)
    events_per_run: float | None


def parse_metrics(text: str) -> ListenerCounters:
    """The counters this phase needs, from the Prometheus text format."""
    counters = ListenerCounters()
    names = {
        "wis2_listener_events_received_total": "received",
        "wis2_listener_runs_created_total": "runs_created",
        "wis2_listener_rejected_total": "rejected",
        "wis2_listener_in_flight": "in_flight",
    }
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        field = names.get(name_labels.split("{", 1)[0])
        if field is not None:
            setattr(counters, field, getattr(counters, field) + float(value))
    return counters


def read_counters(metrics_url: str | Sequence[str]) -> ListenerCounters:
    """The counters of one listener, or summed over several replicas."""
    urls = [metrics_url] if isinstance(metrics_url, str) else list(metrics_url)
    total = ListenerCounters()
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            one = parse_metrics(response.read().decode("utf-8"))
        for field in ListenerCounters.model_fields:
            setattr(total, field, getattr(total, field) + getattr(one, field))
    return total


def run_intake(
    events: Sequence[BenchEvent], conn: MqttConnection, topic: str,
    metrics_url: str | Sequence[str],
    timeout: float, abort: threading.Event,
) -> IntakeResult:
    before = read_counters(metrics_url)
    errors: list[str] = []
    sent = 0
    with Publisher(conn) as pub:
        start = time.monotonic()
        for event in events:
            if abort.is_set():
                break
            try:
                pub.publish(topic, event.payload, qos=1)
                sent += 1
            except MqttError as exc:
                errors.append(f"{event.name}: {exc}")
        publish_seconds = time.monotonic() - start
    deadline = start + timeout
    done_at: float | None = None
    now = before
    while time.monotonic() < deadline and not abort.is_set():
        try:
            now = read_counters(metrics_url)
        except OSError as exc:
            log.warning("listener metrics unreadable: %s", exc)
            time.sleep(0.5)
            continue
        if now.received - before.received >= sent and now.in_flight == 0:
            done_at = time.monotonic()
            break
        time.sleep(0.05)
    runs = int(now.runs_created - before.runs_created)
    elapsed = (done_at - start) if done_at is not None else None
    return IntakeResult(
        events_sent=sent, publish_errors=errors[:20], publish_seconds=round(publish_seconds, 3),
        completed=done_at is not None,
        intake_seconds=round(elapsed, 3) if elapsed is not None else None,
        intake_eps=round(sent / elapsed, 1) if elapsed else None,
        runs_created=runs, rejected=int(now.rejected - before.rejected),
        events_per_run=round(sent / runs, 1) if runs else None,
    )
