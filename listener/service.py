"""The listener: MQTT messages in, Prefect flow runs out, each message acknowledged only once safe.

- paho-mqtt 2 client, MQTT 5, fixed client id, `clean_start=False` and a session expiry: the
  broker keeps the subscriptions and queues the messages while the listener is away.
- QoS 1 subscriptions with manual acknowledgement: a message is acknowledged only after the
  Prefect API accepted its flow run, or after it was written to the dead-letter store. The
  CONNECT's Receive Maximum (`max_in_flight`) bounds how many unacknowledged messages the broker
  sends: while the API is down nothing is acknowledged, so the broker keeps the rest queued.
- paho runs its network loop in its own thread (keep-alives continue); messages are handed to an
  asyncio loop where `concurrency` workers create the runs, retrying with exponential backoff.
- A message from an earlier connection is never acknowledged on a later one (its packet id may
  be reused): the broker redelivers it and its run's idempotency key makes it a duplicate.
- Adaptive batching: a worker that takes a message while others are queued behind it collects
  the valid ones (up to `batch_max_size`, waiting at most `batch_max_wait` for more) and creates
  ONE run of the route's `batch_deployment` for them, then acknowledges them all. A message on an
  idle listener gets a run of its own at once. A missing batch deployment (or a refused batch)
  falls back to one run per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from chain.mqtt import new_client
from listener.deadletters import DeadLetter, DeadLetterStore, Reason, utcnow
from listener.observability import HealthServer, Metrics
from listener.runs import ApiRejected, ApiUnavailable, DeploymentMissing, RunCreated, RunCreator
from listener.settings import ListenerSettings, Route
from wis2.cloudevent import CloudEvent, parse_event
from wis2.errors import FieldError, InvalidInput

log = logging.getLogger("listener")

BATCH_RECHECK = 60  # seconds before a missing batch deployment is looked up again
COLLECT_POLL = 0.005  # seconds between looks at the queue while a batch fills


@dataclass(eq=False)
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    generation: int
    received: float = field(default_factory=time.monotonic)
    received_at: datetime = field(default_factory=utcnow)


@dataclass
class Accepted:
    """A valid message: the route it takes and its event."""

    item: Inbound
    route: Route
    event: CloudEvent


@dataclass
class Rejection:
    reason: Reason
    message: str
    errors: list[FieldError] = field(default_factory=list)


def check_message(
    settings: ListenerSettings, topic: str, payload: bytes
) -> tuple[Route, CloudEvent] | Rejection:
    """The route and event of a message, or why it is rejected."""
    if len(payload) > settings.max_payload_bytes:
        return Rejection("too_large", f"payload of {len(payload)} bytes is over the limit of "
                         f"{settings.max_payload_bytes} bytes (WIS2_LISTENER_MAX_PAYLOAD_BYTES)")
    route = settings.route_for(topic)
    if route is None:
        filters = ", ".join(r.topic_filter for r in settings.routes) or "none"
        return Rejection("unmapped_topic", f"no route for topic {topic!r} (routes: {filters})")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"payload is not UTF-8 text (invalid byte at offset {exc.start})"
        return Rejection("not_utf8", message, [FieldError(path="$", message=message)])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        return Rejection("not_json", message, [FieldError(path="$", message=message)])
    except (ValueError, RecursionError) as exc:
        message = f"payload is not JSON that can be read: {exc}"
        return Rejection("not_json", message, [FieldError(path="$", message=message)])
    try:
        return route, parse_event(data)
    except InvalidInput as exc:
        return Rejection("invalid_event", exc.summary(), exc.errors)


class Listener:
    def __init__(self, settings: ListenerSettings) -> None:
        self.settings = settings
        self.store = DeadLetterStore(settings.deadletter_dir)
        self.metrics = Metrics(oldest_unacked=self.oldest_unacked_age, in_flight=self.in_flight)
        self.generation = 0
        self.connected = False
        self.stopping = False
        self.api_status = "unknown"
        self._lock = threading.Lock()
        self._unacked: dict[int, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Inbound | None] | None = None
        self._stop: asyncio.Event | None = None
        self._api_ok: asyncio.Event | None = None
        self._batch_missing: dict[str, float] = {}  # batch deployment -> when found missing
        self._api_gate: asyncio.Semaphore | None = None  # run creations at the same time
        self.client: mqtt.Client | None = None
        self.http: HealthServer | None = None

    # ---- state for /healthz and /metrics ---------------------------------------------------
    def oldest_unacked_age(self) -> float:
        with self._lock:
            oldest = min(self._unacked.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def in_flight(self) -> int:
        with self._lock:
            return len(self._unacked)

    def health(self) -> dict[str, Any]:
        if self.stopping:
            status = "stopping"
        elif not self.connected:
            status = "disconnected"
        else:
            status = "ok"
        with self._lock:
            in_flight = len(self._unacked)
        return {"status": status, "broker_connected": self.connected, "api": self.api_status,
                "in_flight": in_flight, "oldest_unacked_age_seconds": self.oldest_unacked_age()}

    # ---- MQTT (paho network thread) --------------------------------------------------------
    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry
        props.ReceiveMaximum = self.settings.max_in_flight
        return props

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection", extra={"reason": str(reason_code)})
            return
        with self._lock:
            self.generation += 1
            self.connected = True
        self.metrics.broker_connected.set(1)
        log.info("connected to the broker", extra={
            "broker": self.settings.connection().describe(), "client_id": self.settings.client_id,
            "session_present": flags.session_present, "generation": self.generation})
        client.subscribe([(f, 1) for f in self.settings.subscriptions])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for topic_filter, code in zip(self.settings.subscriptions, reason_codes, strict=False):
            if code.is_failure:
                log.error("subscription refused by the broker (check its ACL)",
                          extra={"topic_filter": topic_filter, "reason": str(code)})
            else:
                log.info("subscribed", extra={"topic_filter": topic_filter, "qos": code.value})

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self.connected = False
        self.metrics.broker_connected.set(0)
        if not self.stopping:
            log.warning("disconnected from the broker; reconnecting with backoff",
                        extra={"reason": str(reason_code)})

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if self.stopping or self._loop is None:
            return  # not acknowledged: the broker redelivers it to the next session
        item = Inbound(topic=message.topic, payload=bytes(message.payload), mid=message.mid,
                       qos=message.qos, dup=bool(message.dup), generation=self.generation)
        with self._lock:
            self._unacked[id(item)] = item.received
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)  # type: ignore[union-attr]

    def _start_mqtt(self) -> None:
        s = self.settings
        client = new_client(s.connection(), client_id=s.client_id, protocol=mqtt.MQTTv5)
        client.manual_ack_set(True)
        client.reconnect_delay_set(s.reconnect_min_delay, s.reconnect_max_delay)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=False,
                             properties=self._connect_properties())
        client.loop_start()  # connects, and reconnects with backoff, in its own thread
        self.client = client

    def _ack(self, item: Inbound) -> bool:
        """Acknowledge `item` if it came on the current connection; True when acknowledged."""
        with self._lock:
            self._unacked.pop(id(item), None)
            if item.qos == 0:
                return True
            if item.generation != self.generation or not self.connected or self.client is None:
                log.info("not acknowledged (connection changed): the broker will redeliver it",
                         extra={"topic": item.topic, "mid": item.mid})
                return False
            rc = self.client.ack(item.mid, item.qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("acknowledgement not sent", extra={"mid": item.mid,
                                                           "error": mqtt.error_string(rc)})
            return False
        return True

    def _abandon(self, item: Inbound) -> None:
        with self._lock:
            self._unacked.pop(id(item), None)

    # ---- processing (asyncio loop) ---------------------------------------------------------
    async def _dead_letter(self, item: Inbound, rejection: Rejection) -> None:
        letter = DeadLetter.new(item.topic, item.payload, rejection.reason, rejection.message,
                                rejection.errors, received=item.received_at)
        stored = await asyncio.to_thread(self.store.add, letter)
        self.metrics.rejected.labels(reason=rejection.reason).inc()
        log.warning("message rejected to the dead-letter store", extra={
            "reason": rejection.reason, "deadletter": stored.id, "topic": item.topic,
            "detail": rejection.message, "count": stored.count})
        self._ack(item)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _call_api(
        self, call: Callable[[], Awaitable[RunCreated]], items: list[Inbound],
        context: dict[str, Any], *, retry_missing: bool = True,
    ) -> RunCreated | None:
        """`call()` retried with backoff while the API is unavailable; None when stopping (the
        items are then left unacknowledged). `ApiRejected` (and `DeploymentMissing` when not
        `retry_missing`) are raised to the caller."""
        s = self.settings
        assert self._api_ok is not None
        delay = s.retry_min_delay
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._api_gate:  # type: ignore[union-attr]
                    result = await call()
            except ApiRejected:
                self._api_ok.set()
                raise
            except ApiUnavailable as exc:
                missing = isinstance(exc, DeploymentMissing)
                if missing and not retry_missing:
                    raise
                self.metrics.api_errors.inc()
                if not missing:
                    self.api_status = f"unavailable: {exc}"
                    self._api_ok.clear()  # the other workers wait instead of piling on
                if self.stopping:
                    log.warning("API unavailable while stopping: left unacknowledged for the "
                                "next session", extra={**context, "error": str(exc)})
                    for item in items:
                        self._abandon(item)
                    return None
                wait = min(delay, s.retry_max_delay) * random.uniform(1.0, 1.25)
                log.warning("Prefect API unavailable; retrying", extra={
                    **context, "attempt": attempt, "retry_in": round(wait, 2),
                    "error": str(exc)})
                await self._sleep_unless_stopping(wait)
                delay = min(delay * 2, s.retry_max_delay)
                continue
            self.api_status = "ok"
            self._api_ok.set()
            return result

    async def _create_run(self, creator: RunCreator, accepted: Accepted) -> None:
        item, route, event = accepted.item, accepted.route, accepted.event
        try:
            result = await self._call_api(
                lambda: creator.create(event, route), [item],
                {"event_id": event.id, "deployment": route.deployment})
        except ApiRejected as exc:
            await self._dead_letter(item, Rejection(
                "api_rejected", f"the Prefect API refused the flow run: {exc}",
                [FieldError(path="$", message=str(exc))]))
            return
        if result is None:
            return
        if result.created:
            self.metrics.runs_created.labels(deployment=route.deployment).inc()
            what = "flow run created"
        else:
            self.metrics.duplicates.labels(deployment=route.deployment).inc()
            what = "duplicate event: its flow run already exists"
        acked = self._ack(item)
        log.info(what, extra={"event_id": event.id, "topic": item.topic,
                              "deployment": route.deployment, "flow_run_id": str(result.run_id),
                              "flow_run": result.name, "redelivered": item.dup, "acked": acked})

    # ---- batches ---------------------------------------------------------------------------
    def _batching(self, route: Route) -> bool:
        """Whether events of `route` may be grouped now (its batch deployment not known missing)."""
        deployment = route.batch_deployment
        if self.settings.batch_max_size < 2 or deployment is None:
            return False
        missing_since = self._batch_missing.get(deployment)
        return missing_since is None or time.monotonic() - missing_since > BATCH_RECHECK

    def _batch_deployment_missing(self, deployment: str, exc: Exception) -> None:
        if deployment not in self._batch_missing:
            log.warning("batch deployment missing: bursts get one run per event until it is "
                        "deployed", extra={"deployment": deployment, "error": str(exc),
                                           "recheck_in": BATCH_RECHECK})
        self._batch_missing[deployment] = time.monotonic()

    async def _collect(self, first: Accepted) -> list[Accepted]:
        """`first` and the valid messages queued behind it (waiting at most batch_max_wait for
        more), up to batch_max_size; malformed ones are dead-lettered on the way."""
        assert self._queue is not None
        s = self.settings
        taken = [first]
        deadline = time.monotonic() + s.batch_max_wait
        while len(taken) < s.batch_max_size and not self.stopping:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(COLLECT_POLL, remaining))
                continue
            if item is None:  # the stop signal is for a worker: hand it back
                self._queue.put_nowait(None)
                break
            accepted = await self._accept(item)
            if accepted is not None:
                taken.append(accepted)
        return taken

    async def _create_batch(
        self, creator: RunCreator, route: Route, members: list[Accepted]
    ) -> None:
        deployment = route.batch_deployment
        assert deployment is not None
        events = [m.event for m in members]
        items = [m.item for m in members]
        try:
            result = await self._call_api(
                lambda: creator.create_batch(events, route), items,
                {"event_id": events[0].id, "events": len(events), "deployment": deployment},
                retry_missing=False)
        except DeploymentMissing as exc:
            self._batch_deployment_missing(deployment, exc)
            result = None
            fallback = True
        except ApiRejected as exc:
            log.warning("the Prefect API refused the batch run: one run per event instead",
                        extra={"deployment": deployment, "events": len(events),
                               "error": str(exc)})
            fallback = True
        else:
            fallback = False
            self._batch_missing.pop(deployment, None)
        if fallback:
            for member in members:
                await self._create_run(creator, member)
            return
        if result is None:
            return
        if result.created:
            self.metrics.runs_created.labels(deployment=deployment).inc()
            self.metrics.batches_created.labels(deployment=deployment).inc()
            self.metrics.batch_size.observe(len(members))
            what = "batch flow run created"
        else:
            self.metrics.duplicates.labels(deployment=deployment).inc()
            what = "duplicate batch: its flow run already exists"
        acked = sum(self._ack(item) for item in items)
        log.info(what, extra={"events": len(members), "first_event_id": events[0].id,
                              "deployment": deployment, "flow_run_id": str(result.run_id),
                              "flow_run": result.name, "redelivered": sum(i.dup for i in items),
                              "acked": acked})

    # ---- one message, or a burst ----------------------------------------------------------
    async def _internal_error(self, items: list[Inbound], exc: Exception) -> None:
        """A bug must not lose the messages nor stop the listener: dead-letter them."""
        log.exception("unexpected error handling a message",
                      extra={"topic": items[0].topic if items else None, "messages": len(items)})
        for item in items:
            try:
                await self._dead_letter(item, Rejection(
                    "internal_error", f"{type(exc).__name__}: {exc}"))
            except Exception:
                log.exception("could not write the dead letter; message left unacknowledged")
                self._abandon(item)

    async def _accept(self, item: Inbound) -> Accepted | None:
        """The message's route and event; None when it went to the dead-letter store."""
        self.metrics.events_received.inc()
        try:
            checked = check_message(self.settings, item.topic, item.payload)
            if isinstance(checked, Rejection):
                await self._dead_letter(item, checked)
                return None
            return Accepted(item, *checked)
        except Exception as exc:
            await self._internal_error([item], exc)
            return None

    async def _handle(self, creator: RunCreator, item: Inbound) -> None:
        accepted = await self._accept(item)
        if accepted is None:
            return
        assert self._queue is not None
        if not self._batching(accepted.route) or self._queue.empty():
            await self._create_runs(creator, [accepted])  # idle: a run at once, no added latency
            return
        groups = [[accepted]]
        try:
            by_route: dict[int, list[Accepted]] = {}
            for member in await self._collect(accepted):
                by_route.setdefault(id(member.route), []).append(member)
            groups = list(by_route.values())
        except Exception:  # a bug while collecting: the first event goes on alone
            log.exception("unexpected error collecting a batch")
        for members in groups:
            await self._create_runs(creator, members)

    async def _create_runs(self, creator: RunCreator, members: list[Accepted]) -> None:
        """One batch run for `members` (same route), or one run each."""
        try:
            if len(members) > 1 and self._batching(members[0].route):
                await self._create_batch(creator, members[0].route, members)
            else:
                for member in members:
                    await self._create_run(creator, member)
        except Exception as exc:
            await self._internal_error([m.item for m in members if self._is_unacked(m.item)], exc)

    def _is_unacked(self, item: Inbound) -> bool:
        with self._lock:
            return id(item) in self._unacked

    async def _worker(self, creator: RunCreator) -> None:
        assert self._queue is not None and self._api_ok is not None
        while not self.stopping:
            await self._api_ok.wait()
            item = await self._queue.get()
            if item is None or self.stopping:
                if item is not None:
                    self._abandon(item)
                return
            await self._handle(creator, item)

    def request_stop(self, why: str = "signal") -> None:
        if self.stopping:
            return
        log.info("stopping: finishing in-flight flow-run creations", extra={"why": why})
        self.stopping = True
        assert self._stop is not None and self._queue is not None and self._api_ok is not None
        self._stop.set()
        self._api_ok.set()
        for _ in range(self.settings.concurrency):
            self._queue.put_nowait(None)

    async def run(self) -> int:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._stop = asyncio.Event()
        self._api_ok = asyncio.Event()
        self._api_ok.set()
        self._api_gate = asyncio.Semaphore(s.api_concurrency)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.request_stop, sig.name)
        if s.metrics_port:
            self.http = HealthServer(s.metrics_host, s.metrics_port, self.metrics,
                                     self.health).start()
            log.info("serving /metrics and /healthz",
                     extra={"url": f"http://{s.metrics_host}:{self.http.port}/metrics"})
        log.info("starting", extra={
            "broker": s.connection().describe(), "client_id": s.client_id,
            "subscriptions": ",".join(s.subscriptions), "routes": json.dumps(
                [r.model_dump() for r in s.routes]), "max_in_flight": s.max_in_flight,
            "concurrency": s.concurrency, "deadletter_dir": str(s.deadletter_dir),
            "batch_max_size": s.batch_max_size, "batch_max_wait": s.batch_max_wait,
            "api_concurrency": s.api_concurrency})
        if 1 < s.batch_max_size and s.max_in_flight < s.batch_max_size * s.concurrency:
            log.warning("max_in_flight (MQTT Receive Maximum) is below batch_max_size x "
                        "concurrency: batches cannot fill during bursts", extra={
                            "max_in_flight": s.max_in_flight, "batch_max_size": s.batch_max_size,
                            "concurrency": s.concurrency})
        try:
            async with RunCreator(timeout=s.api_timeout) as creator:
                self._start_mqtt()
                workers = [asyncio.create_task(self._worker(creator))
                           for _ in range(s.concurrency)]
                await self._stop.wait()
                _done, pending = await asyncio.wait(workers, timeout=s.shutdown_timeout or None)
                for task in pending:
                    task.cancel()
                if pending:
                    log.warning("in-flight creations cut short by the shutdown timeout; their "
                                "messages stay unacknowledged", extra={"tasks": len(pending)})
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._shutdown_mqtt()
            if self.http is not None:
                self.http.stop()
        log.info("stopped")
        return 0

    def _shutdown_mqtt(self) -> None:
        if self.client is None:
            return
        with self._lock:
            self.connected = False
        try:
            self.client.disconnect()  # normal DISCONNECT: the session (and its queue) is kept
        finally:
            self.client.loop_stop()
