"""Did WIS2 get it? The pure rules of delivery confirmation (no MQTT, no database).

A notification this node published on `origin/a/wis2/<centre-id>/...` is *relayed* when a watched
Global Broker republishes it (same `id`, same topic); core data is *cached* when a Global Cache
republishes it on `cache/a/wis2/<centre-id>/...` (a new `id`, the same `data_id` and `pubtime`,
`properties.global-cache`); discovery metadata gets the Global Discovery Catalogue's reports on
`monitor/a/wis2/<centre-id>/...`. These functions tell which is which, whether a cache copy is
expected and matches ours, when a notification is due for redelivery, and the daily summary.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Channel = Literal["origin", "cache", "monitor"]
CHANNELS: tuple[Channel, ...] = ("origin", "cache", "monitor")

# States of one published notification (the delivery record's `state`).
PENDING = "pending"  # published, no watched Broker relayed it yet, still within the wait
RELAYED = "relayed"  # at least one watched Broker relayed it
UNDELIVERED = "undelivered"  # no Broker relayed it after every allowed redelivery
STATES = (PENDING, RELAYED, UNDELIVERED)

# What a Global Cache did with it (the record's `cache_state`).
CACHE_NOT_EXPECTED = "not-expected"  # recommended data, `cache: false`, metadata
CACHE_AWAITED = "awaited"
CACHED = "cached"
CACHE_MISMATCH = "integrity-mismatch"  # a Cache's copy announces different integrity


def subscriptions(centre_id: str) -> list[str]:
    """The topics a delivery monitor subscribes to on each Global Broker."""
    return [f"{channel}/a/wis2/{centre_id}/#" for channel in CHANNELS]


def channel_of(topic: str, centre_id: str) -> Channel | None:
    """`origin`, `cache` or `monitor` for a topic of `centre_id`, else None."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[1:3] != ["a", "wis2"] or parts[3] != centre_id:
        return None
    return parts[0] if parts[0] in CHANNELS else None  # type: ignore[return-value]


def origin_topic(topic: str) -> str:
    """The origin topic a `cache/...` or `monitor/...` topic mirrors."""
    return "origin/" + topic.split("/", 1)[1]


def is_metadata_topic(topic: str) -> bool:
    parts = topic.split("/")
    return len(parts) > 4 and parts[4] == "metadata"


def expects_cache_copy(topic: str, message: Mapping[str, Any]) -> bool:
    """Whether a Global Cache should republish this notification: core data (topic
    `.../data/core/...`) whose `properties.cache` is not false; never recommended data or
    metadata (WIS2 Guide: Global Caches cache core data only)."""
    parts = topic.split("/")
    if len(parts) < 6 or parts[4] != "data" or parts[5] != "core":
        return False
    properties = message.get("properties") or {}
    return properties.get("cache", True) is not False


def integrity_of(message: Mapping[str, Any]) -> str | None:
    """`<method>:<value>` of a notification's `properties.integrity`, or None."""
    integrity = (message.get("properties") or {}).get("integrity") or {}
    if not integrity.get("method") or not integrity.get("value"):
        return None
    return f"{integrity['method']}:{integrity['value']}"


class CacheCopy(BaseModel):
    """A Global Cache's republication of one of our notifications."""

    notification_id: str = Field(description="The Cache's own `id` of its copy")
    data_id: str
    pubtime: str
    integrity: str | None = None
    href: str | None = Field(default=None, description="The Cache's canonical link")
    global_cache: str | None = Field(default=None, description="`properties.global-cache`")


def cache_copy(message: Mapping[str, Any]) -> CacheCopy | None:
    """The fields a cache copy is matched by, or None when it has no data_id or pubtime."""
    properties = message.get("properties") or {}
    data_id, pubtime = properties.get("data_id"), properties.get("pubtime")
    if not isinstance(data_id, str) or not isinstance(pubtime, str):
        return None
    href = next((link.get("href") for link in message.get("links") or []
                 if isinstance(link, dict) and link.get("rel") in ("canonical", "update")), None)
    return CacheCopy(notification_id=str(message.get("id")), data_id=data_id, pubtime=pubtime,
                     integrity=integrity_of(message), href=href,
                     global_cache=properties.get("global-cache"))


def parse_time(value: str) -> datetime:
    """An RFC 3339 timestamp (`Z` or offset) as an aware datetime."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def due_for_redelivery(last_sent: datetime, relayed: bool, redeliveries: int, now: datetime,
                       relay_timeout: float, max_redeliveries: int) -> Literal[
                           "wait", "redeliver", "undelivered", "done"]:
    """What to do with a notification: nothing yet (`wait`), send it again (`redeliver`), give
    up (`undelivered`), or nothing ever again (`done`: relayed)."""
    if relayed:
        return "done"
    if (now - last_sent).total_seconds() < relay_timeout:
        return "wait"
    return "redeliver" if redeliveries < max_redeliveries else "undelivered"


class BrokerDelays(BaseModel):
    """One Broker's relays in a report."""

    relayed: int
    not_relayed: int = Field(description="Notifications of the period this Broker did not relay")
    median_delay_s: float | None
    worst_delay_s: float | None


class DeliveryReport(BaseModel):
    """A dataset's delivery over a period (the daily report artifact)."""

    dataset: str
    published: int
    relayed: int
    pending: int
    undelivered: int
    cached: int
    cache_expected: int
    cache_mismatches: int
    redelivered: int
    brokers: dict[str, BrokerDelays]
    undelivered_data_ids: list[str]

    @property
    def undelivered_share(self) -> float:
        return self.undelivered / self.published if self.published else 0.0


def summarize(dataset: str, records: Iterable[Mapping[str, Any]],
              relays: Iterable[Mapping[str, Any]]) -> DeliveryReport:
    """The report of `records` (delivery records: `notification_id`, `data_id`, `state`,
    `cache_state`, `redeliveries`) and their `relays` (`source`, `delay_s`)."""
    records = list(records)
    delays: dict[str, list[float]] = {}
    for relay in relays:
        delays.setdefault(relay["source"], []).append(float(relay["delay_s"]))
    states = [r["state"] for r in records]
    caches = [r["cache_state"] for r in records]
    return DeliveryReport(
        dataset=dataset, published=len(records), relayed=states.count(RELAYED),
        pending=states.count(PENDING), undelivered=states.count(UNDELIVERED),
        cached=caches.count(CACHED), cache_expected=len(records) - caches.count(
            CACHE_NOT_EXPECTED),
        cache_mismatches=caches.count(CACHE_MISMATCH),
        redelivered=sum(1 for r in records if r["redeliveries"]),
        brokers={source: BrokerDelays(relayed=len(values), not_relayed=len(records) - len(values),
                                      median_delay_s=statistics.median(values),
                                      worst_delay_s=max(values))
                 for source, values in sorted(delays.items())},
        undelivered_data_ids=sorted(r["data_id"] for r in records if r["state"] == UNDELIVERED),
    )


def report_markdown(report: DeliveryReport, period: str) -> str:
    """The report as the Prefect artifact and `wis2-chain delivery status` show it."""
    share = f"{report.undelivered_share:.1%}"
    lines = [
        f"## Delivery of `{report.dataset}`, {period}", "",
        "| published | relayed | pending | undelivered | redelivered | cached / expected "
        "| cache integrity mismatches |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {report.published} | {report.relayed} | {report.pending} | {report.undelivered} "
        f"({share}) | {report.redelivered} | {report.cached} / {report.cache_expected} "
        f"| {report.cache_mismatches} |", "",
        "| Global Broker | relayed | not relayed | median delay (s) | worst delay (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for broker, delays in report.brokers.items():
        lines.append(f"| {broker} | {delays.relayed} | {delays.not_relayed} "
                     f"| {delays.median_delay_s:.3f} "
                     f"| {delays.worst_delay_s:.3f} |")
    if not report.brokers:
        lines.append("| (none) | 0 | | | |")
    lines += ["", f"### Undelivered ({report.undelivered})", ""]
    lines += [f"- `{data_id}`" for data_id in report.undelivered_data_ids] or ["none"]
    return "\n".join(lines) + "\n"
