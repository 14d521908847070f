"""chain.metrics: the flows' metrics with their dataset labels, failure reasons and failed
checks, and their exposition on the worker's /metrics (a real HTTP server on a free port)."""

from __future__ import annotations

import contextvars
import urllib.request
from datetime import UTC, datetime, timedelta

from chain.ledger_entry import ClaimTimeout
from chain.metrics import FlowMetrics, reason_of
from chain.mqtt import PublishRefused
from listener.observability import serve_metrics
from wis2.errors import FieldError, InvalidInput
from wis2.validation import ValidationFailed, ValidationReport

TOPIC = "origin/a/wis2/fr-ifremer-argo/data/core/ocean/surface-based-observations/" \
        "drifting-ocean-profilers"
ARGO = {"centre_id": "fr-ifremer-argo", "dataset": "argo"}


def test_reasons() -> None:
    assert reason_of(InvalidInput([FieldError(path="$.id", message="missing")],
                                  what="event")) == "invalid-input"
    assert reason_of(ClaimTimeout("wis2/x", 1.0)) == "claim-timeout"
    assert reason_of(PublishRefused("t", "Not authorized")) == "broker-refused"
    assert reason_of(TimeoutError()) == "timeout"
    assert reason_of(KeyError("x")) == "other"


def in_a_run(metrics: FlowMetrics) -> None:
    """What a flow run counts: its labels set once, for its own context only."""
    metrics.use_dataset(TOPIC, "argo")
    metrics.outcome([True, False], datetime.now(UTC) - timedelta(seconds=3))
    report = ValidationReport(subject="wnm x", kind="wnm")
    report.add("integrity", False, "bad digest")
    report.add("schema", True)
    metrics.failure(ValidationFailed(report))
    metrics.download(1000, 0.2)


def test_flow_metrics_and_their_labels() -> None:
    metrics = FlowMetrics()
    contextvars.copy_context().run(in_a_run, metrics)
    value = metrics.registry.get_sample_value
    assert value("wis2_chain_notifications_published_total", ARGO) == 1
    assert value("wis2_chain_notifications_skipped_total", ARGO) == 1
    assert value("wis2_chain_notifications_failed_total", ARGO | {"reason": "validation"}) == 1
    assert value("wis2_chain_validation_failures_total", ARGO | {"check": "integrity"}) == 1
    assert value("wis2_chain_validation_failures_total", ARGO | {"check": "schema"}) is None
    assert value("wis2_chain_download_bytes_total", ARGO) == 1000
    assert value("wis2_chain_download_seconds_count", ARGO) == 1
    assert value("wis2_chain_event_to_puback_seconds_count", ARGO) == 1
    assert value("wis2_chain_event_to_puback_seconds_bucket", ARGO | {"le": "2.5"}) == 0
    # outside any run's context (a fresh one: an earlier test of this process may have set the
    # labels in its own): the unknown labels, never another run's
    contextvars.Context().run(metrics.failure, KeyError("x"))
    assert value("wis2_chain_notifications_failed_total",
                 {"centre_id": "unknown", "dataset": "unknown", "reason": "other"}) == 1


def test_served_on_metrics() -> None:
    metrics = FlowMetrics()
    contextvars.copy_context().run(in_a_run, metrics)
    server = serve_metrics("127.0.0.1", 0, metrics, "test")
    assert server is not None
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        assert ('wis2_chain_notifications_published_total{centre_id="fr-ifremer-argo",'
                'dataset="argo"} 1.0') in text
        # a port already taken: logged, no server, the caller goes on
        assert serve_metrics("127.0.0.1", server.port, metrics, "test") is None
    finally:
        server.stop()
    assert serve_metrics("127.0.0.1", None, metrics, "test") is None
