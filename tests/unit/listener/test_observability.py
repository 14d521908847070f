"""The listener's logfmt / JSON log lines and its Prometheus metrics."""

from __future__ import annotations

import json
import logging

from listener.observability import LogfmtFormatter, Metrics


def test_logfmt_and_metrics() -> None:
    record = logging.makeLogRecord({"msg": "flow run created", "levelname": "INFO",
                                    "name": "listener", "event_id": "a b", "run": "x"})
    line = LogfmtFormatter().format(record)
    assert 'msg="flow run created"' in line and 'event_id="a b"' in line and "run=x" in line
    assert json.loads(LogfmtFormatter(as_json=True).format(record))["event_id"] == "a b"
    metrics = Metrics(oldest_unacked=lambda: 4.5)
    text = metrics.render().decode()
    for name in ("wis2_listener_events_received_total", "wis2_listener_rejected_total",
                 "wis2_listener_api_errors_total", "wis2_listener_oldest_unacked_age_seconds 4.5"):
        assert name in text
