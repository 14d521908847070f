"""The chain's Prometheus metrics (prefix `wis2_chain_`; the listener keeps `wis2_listener_`),
labelled with `centre_id` and `dataset`, each family on a registry of its own:

- `FLOW_METRICS`: what the flows count in the process they run in (the `wis2-warm` worker, which
  serves them on `/metrics`): notifications published, failed (by reason), skipped as already
  published; validation failures by check; download bytes and seconds; event-to-PUBACK seconds.
  The data flows and `publish-metadata` count alike (a metadata notification's `dataset` label:
  the dataset whose `metadata_id` is the record's id, else the record's id; its time from the
  run's start to the PUBACK).
- `DeliveryMetrics`: what the delivery monitor (`delivery/`) counts: relayed per Global Broker,
  cached per Global Cache, integrity mismatches, redelivered, undelivered, not relayed per
  Global Broker (a gauge, from the delivery records), relay delay (from the PUBACK).

The names are those of deploy/grafana/wis2-chain-dashboard.json's queries.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from wis2.topics import centre_id_of_topic

LABELS = ("centre_id", "dataset")
# seconds: from a few milliseconds (PUBACK on loopback) to an hour (a backlog)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
DOWNLOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


# Failure reasons, by the name of the exception's class (or of one of its bases)
REASONS = {"InvalidInput": "invalid-input", "ValidationFailed": "validation",
           "DataMismatch": "data-mismatch", "ClaimTimeout": "claim-timeout",
           "LedgerUnavailable": "ledger", "PublishRefused": "broker-refused",
           "MqttError": "broker", "HTTPError": "download", "TimeoutError": "timeout"}
_UNKNOWN = (("centre_id", "unknown"), ("dataset", "unknown"))
_FLOW_LABELS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("wis2_flow_labels",
                                                                   default=_UNKNOWN)


def labels_of(topic: str, dataset: str) -> dict[str, str]:
    """The `centre_id` and `dataset` labels of a dataset published on `topic`."""
    return {"centre_id": centre_id_of_topic(topic) or "unknown", "dataset": dataset}


def reason_of(error: BaseException) -> str:
    """The `reason` label of a failure (see REASONS), else 'other'."""
    for cls in type(error).__mro__:
        if cls.__name__ in REASONS:
            return REASONS[cls.__name__]
    return "other"


class FlowMetrics:
    """The flows' metrics (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.published = Counter(
            "wis2_chain_notifications_published",
            "Notifications acknowledged by the node's broker (PUBACK)", LABELS, registry=r)
        self.failed = Counter(
            "wis2_chain_notifications_failed",
            "Events whose notifications were not published, by reason", (*LABELS, "reason"),
            registry=r)
        self.skipped = Counter(
            "wis2_chain_notifications_skipped",
            "Notifications not sent again: already published (same id or same file)", LABELS,
            registry=r)
        self.validation_failures = Counter(
            "wis2_chain_validation_failures",
            "Failed checks of the strict validation, by check", (*LABELS, "check"), registry=r)
        self.download_bytes = Counter(
            "wis2_chain_download_bytes", "Bytes downloaded to verify the data", LABELS,
            registry=r)
        self.download_seconds = Histogram(
            "wis2_chain_download_seconds", "Time to download and verify one file", LABELS,
            buckets=DOWNLOAD_BUCKETS, registry=r)
        self.event_to_puback = Histogram(
            "wis2_chain_event_to_puback_seconds",
            "From the event's time (CloudEvent `time`; a publish-metadata run: its start) to the "
            "broker's PUBACK", LABELS,
            buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- what the flows call (labels: `use_dataset`, set once per flow run) ----------------
    @staticmethod
    def use_dataset(topic: str, dataset: str) -> None:
        """The labels of what this flow run (this context) counts from now on."""
        _FLOW_LABELS.set(tuple(labels_of(topic, dataset).items()))

    def outcome(self, sent: list[bool], event_time: datetime | None) -> None:
        """An event's notifications: sent now (acknowledged), or not (already published)."""
        labels = dict(_FLOW_LABELS.get())
        for was_sent in sent:
            (self.published if was_sent else self.skipped).labels(**labels).inc()
        if any(sent) and event_time is not None:
            age = (datetime.now(UTC) - event_time).total_seconds()
            self.event_to_puback.labels(**labels).observe(max(0.0, age))

    def failure(self, error: BaseException) -> None:
        """An event failed: its reason, and the failed checks of a validation failure."""
        labels = dict(_FLOW_LABELS.get())
        self.failed.labels(**labels, reason=reason_of(error)).inc()
        report = getattr(error, "report", None)
        for check in getattr(report, "failures", None) or []:
            self.validation_failures.labels(**labels, check=str(check.id)).inc()

    def download(self, size: int, seconds: float) -> None:
        labels = dict(_FLOW_LABELS.get())
        self.download_bytes.labels(**labels).inc(size)
        self.download_seconds.labels(**labels).observe(seconds)


FLOW_METRICS = FlowMetrics()


class DeliveryMetrics:
    """The delivery monitor's metrics (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.recorded = Counter(
            "wis2_chain_delivery_recorded",
            "Notifications of the node seen by the delivery monitor", LABELS, registry=r)
        self.relayed = Counter(
            "wis2_chain_relayed", "Notifications relayed by a watched Global Broker",
            (*LABELS, "broker"), registry=r)
        self.relay_delay = Histogram(
            "wis2_chain_relay_delay_seconds",
            "From the publication on the node's broker to the relay by a Global Broker",
            (*LABELS, "broker"), buckets=LATENCY_BUCKETS, registry=r)
        self.cached = Counter(
            "wis2_chain_cached", "Core data republished by a Global Cache", (*LABELS, "cache"),
            registry=r)
        self.cache_mismatches = Counter(
            "wis2_chain_cache_integrity_mismatches",
            "Cache copies whose integrity differs from the published one", (*LABELS, "cache"),
            registry=r)
        self.catalogue_reports = Counter(
            "wis2_chain_catalogue_reports", "Reports of the Global Discovery Catalogue",
            LABELS, registry=r)
        self.redelivered = Counter(
            "wis2_chain_redelivered",
            "Notifications sent again (same id, same pubtime): no Broker had relayed them",
            LABELS, registry=r)
        self.undelivered = Counter(
            "wis2_chain_undelivered",
            "Notifications no watched Broker relayed after every redelivery", LABELS,
            registry=r)
        self.not_relayed = Gauge(
            "wis2_chain_not_relayed",
            "Undelivered per Global Broker: notifications published in the last "
            "WIS2_DELIVERY_NOT_RELAYED_WINDOW seconds, more than the relay timeout ago, that "
            "this watched Broker has not relayed", (*LABELS, "broker"), registry=r)
        self.pending = Gauge(
            "wis2_chain_delivery_pending",
            "Notifications waiting for a first relay", registry=r)
        self.broker_connected = Gauge(
            "wis2_chain_delivery_broker_connected",
            "1 while the monitor is connected to this broker", ("broker",), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
