"""The MQTT side of the listener, on paho's network thread.

- paho-mqtt 2 client, MQTT 5, fixed client id, `clean_start=False` and a session expiry: the
  broker keeps the subscriptions and queues the messages while the listener is away.
- QoS 1 subscriptions with manual acknowledgement. The CONNECT's Receive Maximum
  (`max_in_flight`) bounds how many unacknowledged messages the broker sends; `InFlight` keeps
  the received ones not acknowledged yet (for /metrics and /healthz).
- A message from an earlier connection is never acknowledged on a later one (its packet id may
  be reused): the broker redelivers it and its run's idempotency key makes it a duplicate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from chain.mqtt import new_client
from listener.messages import Inbound
from listener.observability import Metrics
from listener.settings import ListenerSettings
from listener.stopping import StopSignal

log = logging.getLogger("listener")


class InFlight:
    """The messages received and neither acknowledged nor abandoned yet (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._received: dict[int, float] = {}  # id(item) -> item.received

    def add(self, item: Inbound) -> None:
        with self._lock:
            self._received[id(item)] = item.received

    def remove(self, item: Inbound) -> None:
        with self._lock:
            self._received.pop(id(item), None)

    def __contains__(self, item: Inbound) -> bool:
        with self._lock:
            return id(item) in self._received

    def count(self) -> int:
        with self._lock:
            return len(self._received)

    def oldest_age(self) -> float:
        """Seconds since the oldest of them was received (0 when there is none)."""
        with self._lock:
            oldest = min(self._received.values(), default=None)
        return 0.0 if oldest is None else self._clock() - oldest


def connect_properties(settings: ListenerSettings) -> Properties:
    """The CONNECT properties: how long the broker keeps the session, and Receive Maximum."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.session_expiry
    props.ReceiveMaximum = settings.max_in_flight
    return props


class MqttSession:
    """The broker connection: connects (and reconnects with backoff), subscribes, hands each
    message to `deliver` (on paho's thread), acknowledges or abandons it."""

    def __init__(
        self, settings: ListenerSettings, metrics: Metrics, in_flight: InFlight,
        stop: StopSignal,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.in_flight = in_flight
        self.stop = stop
        self.generation = 0  # connections made; a message is acknowledged on its own one only
        self.connected = False
        self.client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._deliver: Callable[[Inbound], None] | None = None

    def start(self, deliver: Callable[[Inbound], None]) -> None:
        """Connect in paho's own thread; each message received is passed to `deliver`."""
        s = self.settings
        self._deliver = deliver
        client = new_client(s.connection(), client_id=s.client_id, protocol=mqtt.MQTTv5)
        client.manual_ack_set(True)
        client.reconnect_delay_set(s.reconnect_min_delay, s.reconnect_max_delay)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=False,
                             properties=connect_properties(s))
        client.loop_start()  # connects, and reconnects with backoff, in its own thread
        self.client = client

    def ack(self, item: Inbound) -> bool:
        """Acknowledge `item` if it came on the current connection; True when acknowledged."""
        self.in_flight.remove(item)
        if item.qos == 0:
            return True
        with self._lock:
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

    def abandon(self, item: Inbound) -> None:
        """Leave `item` unacknowledged: the broker redelivers it to the next session."""
        self.in_flight.remove(item)

    def shutdown(self) -> None:
        """A normal DISCONNECT: the broker keeps the session (and queues what comes)."""
        if self.client is None:
            return
        with self._lock:
            self.connected = False
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    # ---- paho callbacks (network thread) ---------------------------------------------------
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
        if self.settings.retire:
            log.warning("retiring: unsubscribing; the events this session still holds are "
                        "taken, no new ones come (stop once nothing is in flight)",
                        extra={"client_id": self.settings.client_id})
            client.unsubscribe(list(self.settings.subscriptions))
            return
        client.subscribe([(f, 1) for f in self.settings.subscriptions])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for topic_filter, code in zip(self.settings.subscriptions, reason_codes, strict=False):
            if code.is_failure:
                log.error("subscription refused by the broker (check its ACL)",
                          extra={"topic_filter": topic_filter, "reason": str(code)})
            else:
                log.info("subscribed", extra={"topic_filter": topic_filter, "qos": code.value})

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        log.info("unsubscribed (retiring)", extra={
            "topic_filters": ",".join(self.settings.subscriptions),
            "reasons": ",".join(str(code) for code in reason_codes)})

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self.connected = False
        self.metrics.broker_connected.set(0)
        if not self.stop.requested:
            log.warning("disconnected from the broker; reconnecting with backoff",
                        extra={"reason": str(reason_code)})

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if self.stop.requested or self._deliver is None:
            return  # not acknowledged: the broker redelivers it to the next session
        item = Inbound(topic=message.topic, payload=bytes(message.payload), mid=message.mid,
                       qos=message.qos, dup=bool(message.dup), generation=self.generation)
        self.in_flight.add(item)
        self._deliver(item)
