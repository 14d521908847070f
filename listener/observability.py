"""Logs (logfmt or JSON lines), Prometheus metrics on their own registry, `/healthz`."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from chain.diskspace import DiskUsage
from listener.deadletters import REASONS

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=... logger=... msg="..." key=value ...` (fields from `extra=`)."""

    def __init__(self, as_json: bool = False) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                fields[key] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, ensure_ascii=False, default=str)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


def configure_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    formatter = LogfmtFormatter(as_json=fmt == "json")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "prefect", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Metrics:
    """The listener's Prometheus metrics (prefix `wis2_listener_`), on a registry of their own."""

    def __init__(
        self,
        oldest_unacked: Callable[[], float] | None = None,
        in_flight: Callable[[], float] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_received = Counter(
            "wis2_listener_events_received", "Messages received from the broker", registry=r)
        self.runs_created = Counter(
            "wis2_listener_runs_created", "Flow runs created", ["deployment"], registry=r)
        self.batches_created = Counter(
            "wis2_listener_batches_created",
            "Batch flow runs created (one run for several events; also in runs_created)",
            ["deployment"], registry=r)
        self.batch_size = Histogram(
            "wis2_listener_batch_size", "Events in each batch flow run created",
            buckets=(2, 5, 10, 20, 50, 100, 200, 500), registry=r)
        self.duplicates = Counter(
            "wis2_listener_duplicates",
            "Events whose flow run already existed (same idempotency key)", ["deployment"],
            registry=r)
        self.rejected = Counter(
            "wis2_listener_rejected", "Messages rejected to the dead-letter store", ["reason"],
            registry=r)
        self.api_errors = Counter(
            "wis2_listener_api_errors", "Failed Prefect API calls (retried)", registry=r)
        self.oldest_unacked = Gauge(
            "wis2_listener_oldest_unacked_age_seconds",
            "Age of the oldest received message not acknowledged yet", registry=r)
        self.in_flight = Gauge(
            "wis2_listener_in_flight", "Messages received and not acknowledged yet", registry=r)
        self.runs_waiting = Gauge(
            "wis2_listener_runs_waiting",
            "The listener's flow runs waiting Scheduled, as last counted while a batch filled "
            "(counted only with WIS2_LISTENER_BATCH_HOLD_WAITING_RUNS set)",
            registry=r)
        self.batch_held_events = Gauge(
            "wis2_listener_batch_held_events",
            "Events of the batch held now until it is full (0: none held)", registry=r)
        self.broker_connected = Gauge(
            "wis2_listener_broker_connected", "1 when connected to the broker", registry=r)
        self.disk_free_bytes = Gauge(
            "wis2_listener_disk_free_bytes",
            "Free bytes of the file system holding a watched path (chain.diskspace)", ["path"],
            registry=r)
        self.disk_low = Gauge(
            "wis2_listener_disk_low",
            "1 when a watched path's file system has less free space than "
            "WIS2_DISK_MIN_FREE_PERCENT", ["path"], registry=r)
        self.deadletters_expired = Counter(
            "wis2_listener_deadletters_expired",
            "Dead letters deleted by retention (WIS2_LISTENER_DEADLETTER_RETENTION_DAYS)",
            registry=r)
        for reason in REASONS:
            self.rejected.labels(reason=reason)
        if oldest_unacked is not None:
            self.oldest_unacked.set_function(oldest_unacked)
        if in_flight is not None:
            self.in_flight.set_function(in_flight)

    def set_disk(self, usages: list[DiskUsage]) -> None:
        for usage in usages:
            self.disk_free_bytes.labels(path=usage.path).set(usage.free_bytes)
            self.disk_low.labels(path=usage.path).set(1 if usage.low else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """HTTP endpoint: `/metrics` (Prometheus text) and `/healthz` (JSON)."""

    def __init__(
        self, host: str, port: int, metrics: Metrics, health: Callable[[], dict[str, Any]]
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = outer.metrics.render(), CONTENT_TYPE_LATEST, 200
                elif path in ("/healthz", "/health", "/"):
                    status = outer.health()
                    code = 200 if status.get("status") == "ok" else 503
                    body, ctype = json.dumps(status).encode(), "application/json"
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.metrics = metrics
        self.health = health
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="wis2-listener-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(host: str, port: int | None, metrics: Any, what: str) -> HealthServer | None:
    """`/metrics` of `metrics` (anything with `render() -> bytes`) and a `/healthz` always ok,
    for a process whose metrics are not its job (the worker): None when `port` is None or taken
    (logged; the process goes on)."""
    if port is None:
        return None
    try:
        server = HealthServer(host, port, metrics, lambda: {"status": "ok"}).start()
    except OSError as exc:
        logging.getLogger(__name__).error("%s: cannot serve /metrics on %s:%s: %s", what, host,
                                          port, exc)
        return None
    logging.getLogger(__name__).info("%s: metrics on http://%s:%s/metrics", what, host,
                                     server.port)
    return server
