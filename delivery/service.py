"""The delivery monitor's process: its MQTT sessions, its check loop and its `/metrics`.

One persistent session (fixed client id, `clean_start=False`, `WIS2_DELIVERY_SESSION_EXPIRY`)
on the node's broker (`WIS2_MQTT_*`, the publisher account: reads `origin/a/wis2/<centre-id>/#`
and sends redeliveries) and one on each watched Global Broker (`origin/`, `cache/` and
`monitor/a/wis2/<centre-id>/#`, QoS 1), so that what arrives while the monitor is away is
delivered when it is back (up to each broker's queue limit). A broker unreachable at start is
retried in the background; paho reconnects a lost session and the monitor subscribes again.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from typing import Any

import paho.mqtt.client as mqtt

from chain.delivery_store import DeliveryStore, records_location
from chain.ledger import ledger_location, open_ledger
from chain.metrics import DeliveryMetrics
from chain.mqtt import MqttConnection, MqttError, connect, new_client, publish_once
from chain.settings import ChainSettings
from delivery.monitor import DeliveryMonitor, ledger_puback_time
from delivery.settings import DeliverySettings, GlobalBroker
from listener.observability import HealthServer
from wis2.dataset import dataset_names
from wis2.delivery import subscriptions

log = logging.getLogger(__name__)

RETRY_DELAYS = (1, 2, 5, 10, 30, 60)  # seconds between attempts to reach a broker at start


class Session:
    """A persistent MQTT session: subscribes on each (re)connection, hands messages over."""

    def __init__(self, name: str, conn: MqttConnection, client_id: str, topics: list[str],
                 on_message: Any, session_expiry: int, metrics: DeliveryMetrics) -> None:
        self.name, self.conn, self.topics = name, conn, topics
        self.session_expiry = session_expiry
        self.metrics = metrics
        self.connected = False
        self.client = new_client(conn, client_id)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, msg: self._handle(on_message, msg)

    def _handle(self, on_message: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            on_message(msg.topic, msg.payload)
        except Exception:  # a bad message or a store failure never stops the session
            log.exception("%s: message on %s not handled", self.name, msg.topic)

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            return
        self.connected = True
        self.metrics.broker_connected.labels(broker=self.name).set(1)
        client.subscribe([(topic, 1) for topic in self.topics])
        log.info("connected to %s (session present: %s); subscribed to %s", self.name,
                 getattr(flags, "session_present", "?"), ", ".join(self.topics))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected = False
        self.metrics.broker_connected.labels(broker=self.name).set(0)
        log.warning("disconnected from %s: %s", self.name, reason)

    def start(self, stop: threading.Event) -> None:
        """Connect now, else keep trying in the background until `stop`."""
        self.metrics.broker_connected.labels(broker=self.name).set(0)

        def attempt() -> None:
            for number in range(10**9):
                try:
                    connect(self.conn, client=self.client, clean_start=False,
                            session_expiry=self.session_expiry)
                    return
                except MqttError as exc:
                    delay = RETRY_DELAYS[min(number, len(RETRY_DELAYS) - 1)]
                    log.warning("%s: %s; retrying in %s s", self.name, exc, delay)
                    if stop.wait(delay):
                        return

        threading.Thread(target=attempt, name=f"connect-{self.name}", daemon=True).start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _client_id(base: str, broker: GlobalBroker) -> str:
    return f"{base}-{re.sub(r'[^A-Za-z0-9-]', '-', broker.name)}"


class DeliveryService:
    """The whole monitor: sessions, check loop, HTTP endpoint."""

    def __init__(self, settings: DeliverySettings, chain: ChainSettings | None = None) -> None:
        self.settings = settings
        self.chain = chain or ChainSettings()
        self.metrics = DeliveryMetrics()
        ledger = ledger_location(self.chain)
        self.store = DeliveryStore(records_location(ledger))
        datasets = dataset_names(self.chain.datasets_dir)
        self.monitor = DeliveryMonitor(
            settings.centre_id, self.store, self.metrics, self._resend,
            relay_timeout=settings.relay_timeout, max_redeliveries=settings.max_redeliveries,
            datasets=datasets, brokers=[broker.name for broker in settings.brokers()],
            puback_time=ledger_puback_time(open_ledger(ledger)),
            not_relayed_window=settings.not_relayed_window)
        self.stopping = threading.Event()
        node = self.chain.mqtt.connection()
        self.sessions = [Session(
            "node", node, f"{settings.client_id}-node", [f"origin/a/wis2/{settings.centre_id}/#"],
            self.monitor.on_published, settings.session_expiry, self.metrics)]
        for broker in settings.brokers():
            self.sessions.append(Session(
                broker.name, broker.connection(), _client_id(settings.client_id, broker),
                subscriptions(settings.centre_id),
                lambda topic, payload, name=broker.name: self.monitor.on_global(
                    name, topic, payload),
                settings.session_expiry, self.metrics))
        self.http = HealthServer(settings.metrics_host, settings.metrics_port, self.metrics,
                                 self.health)  # type: ignore[arg-type]

    def _resend(self, topic: str, payload: bytes) -> None:
        publish_once(self.chain.mqtt.connection(), topic, payload)

    def health(self) -> dict[str, Any]:
        brokers = {s.name: s.connected for s in self.sessions}
        return {"status": "ok" if brokers["node"] else "degraded", "connected": brokers}

    def run(self) -> int:
        self.http.start()
        log.info("delivery monitor of %s: /metrics on %s:%s, records in %s, watching %s",
                 self.settings.centre_id, self.settings.metrics_host, self.http.port,
                 self.store.location, ", ".join(s.name for s in self.sessions[1:]) or "nothing")
        for session in self.sessions:
            session.start(self.stopping)
        if len(self.sessions) == 1:
            log.warning("no Global Broker to watch (WIS2_DELIVERY_GLOBAL_BROKERS): publications "
                        "are recorded, nothing is sent again nor reported undelivered")
        while not self.stopping.wait(self.settings.check_interval):
            if len(self.sessions) == 1:
                continue
            try:
                self.monitor.check()
            except Exception:  # e.g. the node's broker or the database away: next round
                log.exception("delivery check failed; trying again in %g s",
                              self.settings.check_interval)
        for session in self.sessions:
            session.stop()
        self.http.stop()
        return 0

    def request_stop(self, *_: Any) -> None:
        self.stopping.set()


def main() -> int:
    from listener.observability import configure_logging

    settings = DeliverySettings()  # type: ignore[call-arg]
    configure_logging(settings.log_level, settings.log_format)
    service = DeliveryService(settings)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    return service.run()
