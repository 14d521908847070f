"""The origin-topic subscriber of the benchmark: records when each notification arrives.

It subscribes as `everyone` (like a Global Broker) to ``origin/a/wis2/<centre-id>/data/#`` and keys
what it receives by `properties.data_id`, so notifications are matched to the events sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable

from chain.mqtt import MqttConnection, MqttError, connect

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, conn: MqttConnection, centre_id: str) -> None:
        self.conn = conn
        self.topic = f"origin/a/wis2/{centre_id}/data/#"
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.message_ids: dict[str, list[str]] = defaultdict(list)
        self.unreadable = 0
        self.client = None

    def _on_message(self, client, userdata, message) -> None:
        now = time.time()
        try:
            doc = json.loads(message.payload)
            data_id = doc["properties"]["data_id"]
            message_id = str(doc.get("id"))
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.unreadable += 1
            return
        with self._changed:
            self.arrivals[data_id].append(now)
            self.message_ids[data_id].append(message_id)
            self._changed.notify_all()

    def start(self, timeout: float = 10.0) -> Collector:
        subscribed = threading.Event()
        self.client = connect(self.conn)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(self.topic, qos=1)
        # After a broker restart (fault phase) paho reconnects with a clean session: subscribe
        # again on every reconnection.
        self.client.on_connect = lambda client, *args: client.subscribe(self.topic, qos=1)
        if not subscribed.wait(timeout):
            self.stop()
            raise MqttError(f"no SUBACK for {self.topic} within {timeout}s")
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def received(self, data_ids: Iterable[str]) -> int:
        with self._lock:
            return sum(1 for d in data_ids if d in self.arrivals)

    def wait_for(self, data_ids: Iterable[str], deadline: float,
                 abort: threading.Event | None = None) -> bool:
        """Wait until every data_id arrived (True) or time.monotonic() passes `deadline`."""
        wanted = set(data_ids)
        with self._changed:
            while True:
                missing = wanted.difference(self.arrivals)
                if not missing:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or (abort is not None and abort.is_set()):
                    return False
                self._changed.wait(min(left, 1.0))

    def first_arrival(self, data_id: str) -> float | None:
        with self._lock:
            times = self.arrivals.get(data_id)
            return min(times) if times else None

    def copies(self, data_id: str) -> tuple[int, int]:
        """(messages received, distinct message ids) for one data_id."""
        with self._lock:
            ids = self.message_ids.get(data_id, [])
            return len(ids), len(set(ids))
