"""Prometheus metrics (own registry) and the `/metrics` + `/healthz` HTTP endpoint."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from listener.deadletters import REASONS

log = logging.getLogger(__name__)

PREFIX = "wis2_listener"


class ListenerMetrics:
    """Counters and gauges of one listener process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_received = Counter(
            f"{PREFIX}_events_received", "MQTT messages received (redeliveries included)",
            registry=r)
        self.runs_created = Counter(
            f"{PREFIX}_runs_created", "Flow runs created by the Prefect API", registry=r)
        self.duplicates = Counter(
            f"{PREFIX}_duplicates",
            "Events whose flow run already existed (same idempotency key)", registry=r)
        self.rejected = Counter(
            f"{PREFIX}_rejected", "Events refused and written to the dead-letter store",
            ["reason"], registry=r)
        for reason in REASONS:
            self.rejected.labels(reason=reason)
        self.api_errors = Counter(
            f"{PREFIX}_api_errors",
            "Failed Prefect API calls (unreachable, 5xx, timeouts), each retried", registry=r)
        self.deadletter_errors = Counter(
            f"{PREFIX}_deadletter_errors", "Failed writes to the dead-letter store, each retried",
            registry=r)
        self.acked = Counter(f"{PREFIX}_acked", "Events acknowledged to the broker", registry=r)
        self.broker_connected = Gauge(
            f"{PREFIX}_broker_connected", "1 when connected and subscribed", registry=r)
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight", "Events received and not yet acknowledged", registry=r)
        self.oldest_unacked_age = Gauge(
            f"{PREFIX}_oldest_unacked_age_seconds",
            "Age of the oldest event received and not yet acknowledged (0: none)", registry=r)
        self._unacked: dict[int, float] = {}
        self._lock = threading.Lock()
        self._next = 0
        self.oldest_unacked_age.set_function(self._oldest_age)
        self.in_flight.set_function(lambda: len(self._unacked))

    def track(self) -> int:
        """Start tracking one unacknowledged event; returns a token for `untrack`."""
        with self._lock:
            self._next += 1
            self._unacked[self._next] = time.monotonic()
            return self._next

    def untrack(self, token: int) -> None:
        with self._lock:
            self._unacked.pop(token, None)

    def _oldest_age(self) -> float:
        with self._lock:
            oldest = min(self._unacked.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """`GET /metrics` (Prometheus text) and `GET /healthz` (JSON; 200 when healthy, else 503)."""

    def __init__(
        self, metrics: ListenerMetrics, host: str, port: int,
        health: Callable[[], dict[str, Any]],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/health"):
                    status = outer.health()
                    body = json.dumps(status).encode()
                    self._send(200 if status.get("healthy") else 503, body, "application/json")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http %s", format % args)

        self.health = health
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
