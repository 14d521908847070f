"""What the delivery monitor does with each message it receives, and its periodic check.

- On the node's broker, `origin/a/wis2/<centre-id>/#`: a notification of this node, recorded with
  its exact bytes (`chain.delivery_store`), `pending` until a watched Broker relays it.
- On a Global Broker, `origin/...`: a relay of one of ours (same `id`): `relayed`, with the
  Broker and the delay; `cache/...`: a Global Cache's copy, matched by `data_id` and `pubtime`
  (flagged when its integrity differs); `monitor/...`: a Catalogue report, kept with the latest
  metadata notification of its `metadata_id`.
- `check()`: a notification no Broker relayed within `relay_timeout` seconds of its last sending
  is sent again, the very message (same `id`, same `pubtime`), at most `max_redeliveries`
  times; then it is `undelivered`.

The node's own copy and a Global Broker's messages arrive on different connections, in either
order: a relay, cache copy or report that matches no record yet is kept in the delivery store
(`DeliveryStore.keep_early`: a restart, even after a SIGKILL, still matches it; at most
`EARLY_SECONDS`) and matched when the node's copy is recorded. Messages are handled one at a
time (a lock): the sessions' threads never interleave a match with a record.

A relay's delay counts from the PUBACK of the node's broker, as the chain recorded it in the
publication ledger (`puback_at` of the notification's entry: `puback_time`); when it is not
known (no ledger entry of this notification, an older chain, the ledger unreachable), from the
monitor's receipt of the node's own copy (`published_at`).

`check()` also sets `wis2_chain_not_relayed`: per watched Broker, the notifications published in
the last `not_relayed_window` seconds (and more than `relay_timeout` ago) that it did not relay.

A message that is not JSON, or lacks what it is matched by, is logged with the reason and
skipped: it never stops the monitor.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from chain.delivery_store import (
    DeliveryEvent,
    DeliveryRecord,
    DeliveryStore,
    EarlyMessage,
    initial_states,
    now_utc,
)
from chain.ledger import Ledger
from chain.metrics import DeliveryMetrics
from wis2.delivery import (
    CACHE_MISMATCH,
    CACHED,
    RELAYED,
    cache_copy,
    channel_of,
    due_for_redelivery,
    expects_cache_copy,
    integrity_of,
    parse_time,
)
from wis2.topics import centre_id_of_topic

log = logging.getLogger(__name__)

Resend = Callable[[str, bytes], None]  # (topic, payload): publish on the node's broker
PubackTime = Callable[[DeliveryRecord], datetime | None]  # the PUBACK time the chain recorded
PUBACK_MEMO = 10000  # PUBACK times remembered (one ledger read per notification, not per relay)


def ledger_puback_time(ledger: Ledger) -> PubackTime:
    """The PUBACK time of a record's notification in the publication ledger (`puback_at` of
    its data_id's entry when that entry is this notification), else None."""

    def puback_time(record: DeliveryRecord) -> datetime | None:
        try:
            entry = ledger.get(record.data_id)
        except Exception as exc:  # the ledger away: the monitor's receipt instead
            log.warning("ledger not read for %s: %s", record.data_id, exc)
            return None
        if entry is None or entry.notification_id != record.notification_id:
            return None
        value = (entry.model_extra or {}).get("puback_at")
        return parse_time(value) if isinstance(value, str) else None

    return puback_time


def _message(topic: str, payload: bytes, where: str) -> dict[str, Any] | None:
    try:
        message = json.loads(payload)
    except ValueError as exc:
        log.warning("%s: message on %s is not JSON (%s): skipped", where, topic, exc)
        return None
    if not isinstance(message, dict):
        log.warning("%s: message on %s is not a JSON object: skipped", where, topic)
        return None
    return message


class DeliveryMonitor:
    """The monitor's decisions (its connections are `delivery.service`'s)."""

    def __init__(self, centre_id: str, store: DeliveryStore, metrics: DeliveryMetrics,
                 resend: Resend, *, relay_timeout: float, max_redeliveries: int,
                 datasets: Mapping[str, str] | None = None, brokers: list[str] | None = None,
                 puback_time: PubackTime | None = None,
                 not_relayed_window: float = 86400.0) -> None:
        """`datasets`: {metadata_id: dataset name} (the `dataset` label; else the metadata_id);
        `brokers`: the watched Global Brokers' names; `puback_time`: the PUBACK time the chain
        recorded for a notification (`ledger_puback_time`)."""
        self.centre_id = centre_id
        self.store = store
        self.metrics = metrics
        self.resend = resend
        self.relay_timeout = relay_timeout
        self.max_redeliveries = max_redeliveries
        self.datasets = dict(datasets or {})
        self.brokers = list(brokers or [])
        self.puback_time = puback_time
        self.not_relayed_window = not_relayed_window
        self._lock = threading.RLock()
        self._puback: dict[str, datetime] = {}
        self._not_relayed_labels: set[tuple[str, str, str]] = set()

    def _keep_early(self, kind: str, key: str, broker: str, topic: str,
                    message: dict[str, Any], seen: datetime) -> None:
        if not self.store.keep_early(EarlyMessage(
                kind=kind, match_key=key, source=broker, topic=topic, message=message,
                seen_at=seen.isoformat(timespec="milliseconds")), seen):
            log.warning("%s: %s %s matches no notification of this node: dropped (too many "
                        "kept already)", broker, kind, key)
            return
        log.info("%s: %s %s matches no notification of this node yet: kept", broker, kind, key)

    def _adopt_early(self, record: DeliveryRecord) -> None:
        """Match what arrived before the node's copy of `record`."""
        keys = [("relay", record.notification_id),
                ("cache", f"{record.data_id} {record.pubtime}")]
        if record.metadata_id:
            keys.append(("report", record.metadata_id))
        handle = {"relay": self._relayed, "cache": self._cached, "report": self._reported}
        for early in self.store.take_early(keys):
            handle[early.kind](early.source, early.topic, early.message,
                               parse_time(early.seen_at))

    def _sent_at(self, record: DeliveryRecord) -> datetime:
        """When the node's broker acknowledged the notification (`puback_time`), else when the
        monitor received the node's copy."""
        if (known := self._puback.get(record.notification_id)) is not None:
            return known
        puback = self.puback_time(record) if self.puback_time is not None else None
        if puback is None:
            return parse_time(record.published_at)
        if len(self._puback) >= PUBACK_MEMO:
            self._puback.pop(next(iter(self._puback)))
        self._puback[record.notification_id] = puback
        return puback

    def _delay(self, record: DeliveryRecord, seen: datetime) -> float:
        """Seconds from the node's sending of `record` (`_sent_at`) to `seen`."""
        return max(0.0, (seen - self._sent_at(record)).total_seconds())

    def _labels(self, record: DeliveryRecord) -> dict[str, str]:
        return {"centre_id": centre_id_of_topic(record.topic) or self.centre_id,
                "dataset": record.dataset}

    # ---- the node's broker -----------------------------------------------------------------
    def on_published(self, topic: str, payload: bytes) -> DeliveryRecord | None:
        """A notification of this node seen on its broker: recorded once (a redelivery of ours
        comes back here too and changes nothing)."""
        with self._lock:
            return self._published(topic, payload)

    def _published(self, topic: str, payload: bytes) -> DeliveryRecord | None:
        message = _message(topic, payload, "node broker")
        if message is None:
            return None
        properties = message.get("properties") if isinstance(message.get("properties"),
                                                             dict) else {}
        missing = [f"$.{name}" for name, value in (
            ("id", message.get("id")), ("properties.data_id", properties.get("data_id")),
            ("properties.pubtime", properties.get("pubtime"))) if not isinstance(value, str)]
        if missing:
            log.warning("node broker: notification on %s lacks %s: not watched", topic,
                        ", ".join(missing))
            return None
        metadata_id = properties.get("metadata_id")
        state, cache_state = initial_states(expects_cache_copy(topic, message))
        now = now_utc()
        record = DeliveryRecord(
            notification_id=message["id"], data_id=properties["data_id"],
            metadata_id=metadata_id if isinstance(metadata_id, str) else None,
            pubtime=properties["pubtime"], topic=topic,
            dataset=self.datasets.get(str(metadata_id), str(metadata_id or "unknown")),
            payload=payload.decode("utf-8"), published_at=now, last_sent_at=now, state=state,
            cache_state=cache_state)
        if not self.store.add(record):
            return self.store.get(record.notification_id)
        self.metrics.recorded.labels(**self._labels(record)).inc()
        log.info("watching %s (%s) on %s", record.notification_id, record.data_id, topic)
        self._adopt_early(record)
        return record

    # ---- the Global Brokers ----------------------------------------------------------------
    def on_global(self, broker: str, topic: str, payload: bytes) -> None:
        """A message from Global Broker `broker` (its name) on one of the watched topics."""
        channel = channel_of(topic, self.centre_id)
        message = _message(topic, payload, broker)
        if message is None or channel is None:
            return
        handle = {"origin": self._relayed, "cache": self._cached, "monitor": self._reported}
        with self._lock:
            handle[channel](broker, topic, message, datetime.now(UTC))

    def _relayed(self, broker: str, topic: str, message: dict[str, Any],
                 seen: datetime) -> None:
        record = self.store.get(str(message.get("id")))
        if record is None:  # the node's own copy may reach the monitor after the relay
            self._keep_early("relay", str(message.get("id")), broker, topic, message, seen)
            return
        delay = self._delay(record, seen)
        if not self.store.add_event(DeliveryEvent(
                notification_id=record.notification_id, kind="relay", source=broker,
                seen_at=seen.isoformat(timespec="milliseconds"), delay_s=delay), state=RELAYED):
            return  # this Broker's repeat (a redelivery it relayed again)
        labels = self._labels(record)
        self.metrics.relayed.labels(**labels, broker=broker).inc()
        self.metrics.relay_delay.labels(**labels, broker=broker).observe(delay)
        if record.state != RELAYED:
            log.info("%s relayed %s (%s) after %.3f s", broker, record.notification_id,
                     record.data_id, delay)

    def _cached(self, broker: str, topic: str, message: dict[str, Any],
                seen: datetime) -> None:
        copy = cache_copy(message)
        if copy is None:
            log.warning("%s: cache copy on %s has no properties.data_id/pubtime: skipped",
                        broker, topic)
            return
        cache = copy.global_cache or broker
        records = self.store.by_data_id(copy.data_id, copy.pubtime)
        if not records:
            self._keep_early("cache", f"{copy.data_id} {copy.pubtime}", broker, topic, message,
                             seen)
        for record in records:
            ours = integrity_of(json.loads(record.payload))
            mismatch = ours is not None and copy.integrity != ours
            state = CACHE_MISMATCH if mismatch else CACHED
            if not self.store.add_event(DeliveryEvent(
                    notification_id=record.notification_id, kind="cache", source=cache,
                    seen_at=seen.isoformat(timespec="milliseconds"),
                    delay_s=self._delay(record, seen),
                    detail=copy.model_dump() | {"ours": ours}), cache_state=state):
                continue
            labels = self._labels(record)
            if mismatch:
                self.metrics.cache_mismatches.labels(**labels, cache=cache).inc()
                log.error("global cache %s republished %s (%s) with integrity %s, ours is %s",
                          cache, record.data_id, record.pubtime, copy.integrity, ours)
            else:
                self.metrics.cached.labels(**labels, cache=cache).inc()
                log.info("global cache %s cached %s", cache, record.data_id)

    def _reported(self, broker: str, topic: str, message: dict[str, Any],
                  seen: datetime) -> None:
        properties = message.get("properties") if isinstance(message.get("properties"),
                                                             dict) else {}
        metadata_id = properties.get("metadata_id")
        if not isinstance(metadata_id, str):
            log.warning("%s: catalogue report on %s has no properties.metadata_id: skipped",
                        broker, topic)
            return
        record = self.store.latest_metadata(metadata_id)
        if record is None:
            self._keep_early("report", metadata_id, broker, topic, message, seen)
            return
        if self.store.add_event(DeliveryEvent(
                notification_id=record.notification_id, kind="report",
                source=str(message.get("id") or broker),
                seen_at=seen.isoformat(timespec="milliseconds"),
                detail={"topic": topic, "properties": properties})):
            self.metrics.catalogue_reports.labels(**self._labels(record)).inc()
            log.info("catalogue report on %s for %s", topic, metadata_id)

    # ---- overdue notifications -------------------------------------------------------------
    def check(self, now: datetime | None = None) -> dict[str, int]:
        """Send again, or give up on, each notification overdue for a relay; returns counts."""
        with self._lock:
            return self._check(now or datetime.now(UTC))

    def _check(self, now: datetime) -> dict[str, int]:
        done = {"redelivered": 0, "undelivered": 0}
        for record in self.store.pending():
            decision = due_for_redelivery(parse_time(record.last_sent_at), False,
                                          record.redeliveries, now, self.relay_timeout,
                                          self.max_redeliveries)
            if decision == "redeliver":
                self.resend(record.topic, record.payload.encode("utf-8"))
                self.store.mark_sent_again(record.notification_id,
                                            now.isoformat(timespec="milliseconds"))
                self.metrics.redelivered.labels(**self._labels(record)).inc()
                done["redelivered"] += 1
                log.warning("no watched Broker relayed %s (%s) within %g s: sent again (%d/%d)",
                            record.notification_id, record.data_id, self.relay_timeout,
                            record.redeliveries + 1, self.max_redeliveries)
            elif decision == "undelivered":
                self.store.mark_undelivered(record.notification_id,
                                            now.isoformat(timespec="milliseconds"))
                self.metrics.undelivered.labels(**self._labels(record)).inc()
                done["undelivered"] += 1
                log.error("UNDELIVERED %s (%s): no watched Broker relayed it after %d "
                          "redeliveries", record.notification_id, record.data_id,
                          record.redeliveries)
        self.metrics.pending.set(len(self.store.pending()))
        self._count_not_relayed(now)
        return done

    def _count_not_relayed(self, now: datetime) -> None:
        """`wis2_chain_not_relayed`, per watched Broker (see the module docstring)."""
        since = (now - timedelta(seconds=self.not_relayed_window)).isoformat(
            timespec="milliseconds")
        until = (now - timedelta(seconds=self.relay_timeout)).isoformat(timespec="milliseconds")
        values: dict[tuple[str, str, str], int] = dict.fromkeys(self._not_relayed_labels, 0)
        for broker in self.brokers:
            for (topic, dataset), count in self.store.not_relayed(broker, since, until).items():
                key = (centre_id_of_topic(topic) or self.centre_id, dataset, broker)
                values[key] = values.get(key, 0) + count
        for (centre_id, dataset, broker), count in values.items():
            self.metrics.not_relayed.labels(centre_id=centre_id, dataset=dataset,
                                            broker=broker).set(count)
        self._not_relayed_labels = set(values)
