"""The benchmark's reading of the listener's Prometheus metrics."""

from __future__ import annotations

from bench.intake import parse_metrics


def test_listener_metrics_are_read_from_the_prometheus_text():
    text = "\n".join([
        "# HELP wis2_listener_events_received_total Messages received from the broker",
        "wis2_listener_events_received_total 12.0",
        'wis2_listener_runs_created_total{deployment="publish-notification/default"} 2.0',
        'wis2_listener_runs_created_total{deployment="publish-batch/default"} 3.0',
        'wis2_listener_rejected_total{reason="not_json"} 1.0',
        'wis2_listener_rejected_total{reason="too_large"} 0.0',
        "wis2_listener_in_flight 4.0",
        "wis2_listener_runs_created_created 1.7e+09",
    ])
    counters = parse_metrics(text)
    assert (counters.received, counters.runs_created, counters.rejected, counters.in_flight) == (
        12.0, 5.0, 1.0, 4.0)
